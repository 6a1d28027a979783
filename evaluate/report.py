"""Output of `evaluate splice`: a rich table, a JSON file, and a Pareto-front plot.

Plots, like the JSON reports (stores/artifacts.write_report), replace only a file this tool wrote:
each PNG carries the text chunk Software = "sae_harvest ..." (save_plots), which no other writer puts
there; anything else at the path is refused with one line."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import zlib
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sae_harvest.stores.artifacts import REPORT_MARK, check_report_folder, check_report_path, write_report


def series_label(r: dict) -> str:
    """One Pareto series per training method: e2e-trained relu SAEs are not local relu SAEs, and a
    g-SAE is one series per gradient mode of its selection: gtopk+causal, gtopk+paper, gtopk (none)."""
    if r.get("loss") not in (None, "local"):
        return r["loss"] + (f" ({r['arch']})" if r["arch"] != "relu" else "")
    mode = r.get("grad_mode")
    if mode is None and r.get("grad_select"):   # results.json written before grad_mode existed
        mode = "paper"
    return r["arch"] + (f"+{mode}" if mode not in (None, "none") else "")


def point_label(r: dict) -> str | None:
    """A Pareto point's label: its swept value (k16, λ300), with the run when rows come from several."""
    value = f"k{r['k']}" if r.get("k") is not None else f"λ{r['l1']:g}" if r.get("l1") is not None else None
    if value and r.get("run") and "/" in str(r.get("name", "")):
        return f"{r['run']} {value}"
    return value


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pareto_front(points) -> list[tuple[float, float]]:
    """The points (x, y) not dominated when both coordinates are minimised (fewer latents,
    smaller CE increase), sorted by x; y then strictly decreases. Non-finite points are ignored."""
    pts = sorted({(float(x), float(y)) for x, y in points if _finite(x) and _finite(y)})
    front: list[tuple[float, float]] = []
    for x, y in pts:
        # Sorted by x then y: a point is optimal iff it beats the best y of every smaller-or-equal x.
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


# --- table -------------------------------------------------------------------------------------
def _fmt(v, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


_COLUMNS = (  # header, key, format
    ("L0", "l0", ".1f"), ("ΔCE", "ce_increase", ".4f"), ("ΔCE≥1", "ce_increase_nobos", ".4f"),
    ("KL", "kl", ".4f"), ("LR0", "loss_recovered_zero", ".3f"), ("LRμ", "loss_recovered_mean", ".3f"),
    # fixed decimals: ".3g" printed 0.22 next to 0.0983 in one column
    ("NMSE", "nmse", ".4f"), ("NMSE≥1", "nmse_nobos", ".4f"), ("EV≥1", "explained_variance_nobos", ".3f"),
)


def print_table(results: list[dict], console: Console | None = None) -> None:
    """One row per SAE. A site column only when the SAEs sit at several sites."""
    console = console or Console()
    if not results:
        return
    r0 = results[0]
    several_sites = len({r["site"] for r in results}) > 1
    table = Table(title=f"SAE splice evaluation, {r0['model']}" +
                  ("" if several_sites else f", {r0['site']}"),
                  caption=f"clean CE {_fmt(r0['ce_clean'], '.4f')} nats "
                          f"({_fmt(r0['ce_clean_nobos'], '.4f')} without position 0) on "
                          f"{r0['tokens']:,} tokens {escape(origin_text(r0.get('eval_tokens')))}; position 0 "
                          f"{'spliced' if r0.get('splice_bos') else 'kept clean'}. ≥1: position 0 "
                          f"excluded. LR0 / LRμ: loss recovered vs zero / mean ablation. EV: explained "
                          f"variance." + (" gtopk+causal / +paper: gradient mode of the selection."
                                          if any(r.get("grad_mode") in ("causal", "paper") for r in results) else ""))
    table.add_column("SAE", overflow="fold")
    table.add_column("arch")
    if several_sites:
        table.add_column("site")
    table.add_column("alive", justify="right")
    for header, _, _ in _COLUMNS:
        table.add_column(header, justify="right")
    for r in results:
        arch = series_label(r)
        head = [r["name"], arch] + ([r["site"]] if several_sites else [])
        table.add_row(*head, f"{r['alive']}/{r['d_sae']}",
                      *(_fmt(r.get(key), spec) for _, key, spec in _COLUMNS))
    console.print(table)


def print_per_layer(results: list[dict], console: Console | None = None) -> None:
    """Per covered layer, for each CLT row (results[i]["per_layer"]): the NMSE of its prediction of
    that MLP output inside the replacement model, its L0 and alive latents."""
    console = console or Console()
    for r in results:
        per = r.get("per_layer")
        if not per:
            continue
        table = Table(title=f"{r['name']}: replacement model, per layer (positions >= 1)")
        for header in ("target", "NMSE", "L0", "alive"):
            table.add_column(header, justify="left" if header == "target" else "right")
        for site, m in per.items():
            table.add_row(site, _fmt(m.get("nmse"), ".4f"), _fmt(m.get("l0"), ".1f"), str(m.get("alive")))
        console.print(table)


# --- files -------------------------------------------------------------------------------------
def write_json(results: list[dict], path, config: dict | None = None, *, writer: str = "evaluate splice") -> None:
    """{"config": EvalConfig, "results": [...]} in the order evaluated; undefined metrics are null
    (never NaN); credentials scrubbed; config.written_by marks it as ours, and only a report of
    ours at `path` is replaced (stores.artifacts.write_report)."""
    write_report(path, {"config": config or {}, "results": results}, writer=writer, indent=2)


# --- plots: PNGs marked as ours ----------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SOFTWARE = b"Software\0"
PLOT_MARK = f"{REPORT_MARK} evaluate"     # the Software text of every plot written here


def _chunks(data: bytes):
    """(type, body, whole chunk) of each complete chunk of PNG bytes, signature skipped."""
    at = 8
    while at + 12 <= len(data):
        n = int.from_bytes(data[at:at + 4], "big")
        if at + 12 + n > len(data):
            return
        yield data[at + 4:at + 8], data[at + 8:at + 8 + n], data[at:at + 12 + n]
        at += 12 + n


def _marked(png: bytes) -> bytes:
    """The PNG with its Software text (matplotlib's) replaced by PLOT_MARK, right after the header."""
    text = _SOFTWARE + PLOT_MARK.encode()
    ours = len(text).to_bytes(4, "big") + b"tEXt" + text + zlib.crc32(b"tEXt" + text).to_bytes(4, "big")
    out = [PNG_SIGNATURE]
    for kind, body, chunk in _chunks(png):
        if kind == b"tEXt" and body.startswith(_SOFTWARE):
            continue
        out.append(chunk)
        if kind == b"IHDR":
            out.append(ours)
    return b"".join(out)


def is_own_plot(path) -> bool:
    """path is a PNG written by save_plots: its Software text, right after the header, is ours."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if not head.startswith(PNG_SIGNATURE):
        return False
    for kind, body, _ in _chunks(head):
        if kind == b"tEXt" and body.startswith(_SOFTWARE):
            return body[len(_SOFTWARE):].decode("latin-1").split(" ")[0] == REPORT_MARK
        if kind == b"IDAT":
            return False
    return False


def check_plot_path(path) -> None:
    """One UserError line unless a plot may be written at path (nothing there, or a plot of ours)."""
    check_report_path(path, is_own_plot)


def save_plots(draw, path) -> list[str]:
    """draw(p) writes one PNG at p, or several named from the prefix p, and returns their paths (None:
    just p). It draws into a fresh folder beside `path`; each PNG is then marked as ours and renamed
    onto its name beside `path`, once every such name is free or a plot of ours. Returns the paths."""
    path = Path(path)
    check_report_folder(path)      # before a folder is made there
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        drawn = [Path(p) for p in (draw(tmp / path.name) or [tmp / path.name])]
        final = [path.parent / p.name for p in drawn]
        for f in final:
            check_plot_path(f)
        for p, f in zip(drawn, final):
            data = p.read_bytes()
            if data.startswith(PNG_SIGNATURE):
                p.write_bytes(_marked(data))
            os.replace(p, f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # made by mkdtemp above: only what draw left there
    return [str(f) for f in final]


def write_plot(results: list[dict], path) -> list[str]:
    """Two panels, L0 and alive latents vs CE increase; per architecture every SAE as a marker
    and its Pareto front (both axes minimised) as a line. Only a plot of ours at path is replaced;
    returns [path]."""
    return save_plots(lambda p: _draw_pareto(results, p), path)


def _draw_pareto(results: list[dict], path) -> None:
    """write_plot's figure, saved as a PNG at path."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed; also safe in threads and on servers
    import matplotlib.pyplot as plt

    # SAEs at different sites are not comparable: one series per (architecture, site) then.
    several_sites = len({r["site"] for r in results}) > 1
    by_arch: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        label = series_label(r)
        by_arch[label + (f" @ {r['site']}" if several_sites else "")].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (xkey, xlabel) in zip(axes, (("l0", "L0 (active latents per token)"),
                                          ("alive", "alive latents"))):
        for i, (arch, rows) in enumerate(sorted(by_arch.items())):
            color = f"C{i % 10}"
            pts = sorted((r[xkey], r["ce_increase"]) for r in rows
                         if _finite(r.get(xkey)) and _finite(r.get("ce_increase")))
            if not pts:
                continue
            ax.plot(*zip(*pts), "o", color=color, alpha=0.35)
            front = pareto_front(pts)
            ax.plot(*zip(*front), "o-", color=color, label=arch)
            for r in rows:   # each point says which swept value it is (k16, l1=300)
                if _finite(r.get(xkey)) and _finite(r.get("ce_increase")) and point_label(r):
                    ax.annotate(point_label(r), (r[xkey], r["ce_increase"]), textcoords="offset points",
                                xytext=(4, 3), fontsize=7, color=color)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("CE increase (nats)")
        ces = [r["ce_increase"] for r in results if _finite(r.get("ce_increase"))]
        if ces and min(ces) > 0 and max(ces) / min(ces) > 20:   # fronts span decades: log shows them all
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    if results:
        fig.suptitle(f"{results[0]['model']} - {results[0]['tokens']:,} tokens")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def origin_text(origin: dict | None) -> str:
    """Where the evaluation tokens came from, for captions: the store's held-out sequences or text."""
    if not origin:
        return "(origin not recorded)"
    if origin.get("source") == "store":
        return (f"from {origin['sequences']:,} of the {origin['held_out_seqs']:,} held-out sequences of "
                f"{origin['store']} (every {origin['every']}th, {origin['origin']})")
    skip = f" after {origin['skip_docs']:,} documents" if origin.get("skip_docs") else ""
    return f"from dataset {origin.get('dataset')}{skip} (not a held-out split)"
