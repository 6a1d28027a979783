"""Tables and plots of the analyses (`evaluate stitch`, `evaluate meta`, `evaluate geometry`), read
from their results (evaluate/results.py; a saved JSON reads back with Result.from_dict); the JSON
goes through the one artifact writer, stores.artifacts.write_artifact, which scrubs credentials."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sae_harvest.evaluate.report import _fmt, origin_text, save_plots
from sae_harvest.evaluate.results import GeometryResult, MetaResult, StitchResult


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # no display needed
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> None:
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    _pyplot().close(fig)


# --- stitch ------------------------------------------------------------------------------------
def print_stitch(doc: StitchResult, console: Console) -> None:
    s = doc.summary
    t = Table(title=f"SAE stitching {doc.small.d_sae} -> {doc.large.d_sae} latents at "
                    f"{doc.site}, theta {doc.threshold:g}",
              caption=f"{s.n_novel} novel and {s.n_reconstruction} reconstruction latents in "
                      f"{s.n_groups} swap groups; {s.n_orphans} small latents without a partner"
                      f"{_dead_text(doc)}. "
                      f"MSE: squared error summed over d, mean over {doc.tokens:,} tokens (position >= 1), "
                      f"{escape(origin_text(doc.eval_tokens))}.")
    for col in ("point", "latents", "L0", "MSE", "ΔCE"):
        t.add_column(col, justify="right" if col != "point" else "left")
    path = doc.path
    n_novel = s.n_novel
    ends = [("small SAE", path[0]), ("+ novel latents", path[n_novel]),
            ("+ swapped groups", path[n_novel + s.n_groups]), ("large SAE", path[-1])]
    for label, p in ends:
        t.add_row(label, str(p["latents"]), _fmt(p["l0"], ".2f"), _fmt(p["mse"], ".5g"),
                  _fmt(p["ce_increase"], ".4f"))
    console.print(t)
    console.print(f"novel latents added one by one lowered MSE at {_pct(s.novel_steps_lowering_mse)} of "
                  f"steps; group swaps at {_pct(s.swap_steps_lowering_mse)}; largest single-step MSE rise "
                  f"{_fmt(s.largest_step_mse_increase_rel, '.2%')} of the small SAE's MSE. Added alone: "
                  f"{_pct(s.novel_alone_lowering_mse)} of novel latents lower MSE, "
                  f"{_pct(s.reconstruction_alone_raising_mse)} of reconstruction latents raise it.",
                  highlight=False)


def _dead_text(doc: StitchResult) -> str:
    """Dead latents (firing on none of the tokens): left out with --live-only, else counted above."""
    s = doc.summary
    if s.n_dead_small is None:
        return ""
    how = "left out" if doc.live_only else "counted in the classes"
    return f"; dead on these tokens: {s.n_dead_small} small, {s.n_dead_large} large ({how})"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0%}"


def plot_stitch(doc: StitchResult, path) -> list[str]:
    """draw_stitch's PNG at path, replacing only a plot of ours (report.save_plots); [path]."""
    return save_plots(lambda p: draw_stitch(doc, p), path)


def draw_stitch(doc: StitchResult, path) -> None:
    """Fig. 10 (max cosine), fig. 4 (dMSE of each latent added alone), fig. 5 (the path, here by
    step: a swap keeps the number of latents about the same), CE."""
    plt = _pyplot()
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    theta, cos = doc.threshold, doc.max_cosine
    ax[0, 0].hist(cos, bins=50, range=(min(0.0, min(cos)), 1.0), color="C0")
    ax[0, 0].axvline(theta, color="k", ls="--", label=f"theta {theta:g}")
    ax[0, 0].set(xlabel="max decoder cosine to the small SAE", ylabel="large SAE latents")
    ax[0, 0].legend()
    novel = set(doc.novel)
    for label, color, pick in (("novel", "C1", True), ("reconstruction", "C0", False)):
        pts = [(c, d) for i, (c, d) in enumerate(zip(cos, doc.alone_delta_mse)) if (i in novel) == pick]
        if pts:
            ax[0, 1].scatter(*zip(*pts), s=6, color=color, label=label, alpha=0.6)
    ax[0, 1].axhline(0, color="k", lw=0.8)
    ax[0, 1].axvline(theta, color="k", ls="--")
    ax[0, 1].set(xlabel="max decoder cosine", ylabel="MSE change, latent added alone")
    ax[0, 1].legend()
    steps = doc.path
    for phase, color in (("start", "k"), ("novel", "C1"), ("swap", "C0"), ("drop", "C2")):
        rows = [s for s in steps if s["phase"] == phase]
        if rows:
            ax[1, 0].plot([s["step"] for s in rows], [s["mse"] for s in rows], ".", ms=3, color=color,
                          label=phase)
    twin = ax[1, 0].twinx()
    twin.plot([s["step"] for s in steps], [s["l0"] for s in steps], "-", color="gray", lw=0.8)
    twin.set_ylabel("L0 (gray)")
    ax[1, 0].set(xlabel="step along the path (novel adds, then group swaps, then drops)", ylabel="MSE")
    ax[1, 0].legend()
    ce = [(s["step"], s["ce_increase"]) for s in steps if s["ce_increase"] is not None]
    if ce:
        ax[1, 1].plot(*zip(*ce), "o-", color="C3")
    ax[1, 1].set(xlabel="step along the path", ylabel="CE increase (nats)")
    for a in ax.flat:
        a.grid(alpha=0.3)
    fig.suptitle(f"stitching {doc.small.d_sae} -> {doc.large.d_sae} at {doc.site}")
    _save(fig, path)


# --- meta --------------------------------------------------------------------------------------
def print_meta(doc: MetaResult, console: Console) -> None:
    m = doc.meta
    warn = "" if m.trained_on_this_sae is not False else f" (it was trained on {m.trained_on})"
    console.print(f"meta-SAE {m.path}{warn}: {m.d_sae} meta-latents ({m.arch}) on the "
                  f"{doc.sae.d_sae} unit decoder rows of {doc.sae.path}\n"
                  f"meta-L0 {doc.meta_l0:.2f}, explained variance {_fmt(doc.explained_variance, '.2%')}, "
                  f"mean cosine(row, meta reconstruction) {doc.mean_cosine:.3f}, "
                  f"{doc.alive_meta_latents}/{m.d_sae} meta-latents used, "
                  f"{doc.latents_without_meta} latents with none", highlight=False, markup=False)   # paths
    t = Table(title="meta-latent decompositions",
              caption="meta-latent (value, SAE latents using it: the top ones); sharing: latents with "
                      "the most meta-latents in common (how many, decoder cosine)")
    for col in ("latent", "cos", "meta-latents", "sharing"):
        t.add_column(col, justify="right" if col in ("latent", "cos") else "left", overflow="fold")
    for s in doc.samples:
        parts = "\n".join(f"m{p['meta_latent']} ({p['value']:.2f}, {p['used_by']}: "
                          f"{', '.join(str(u['latent']) for u in p['top_users'])})" for p in s.decomposition)
        sharing = "\n".join(f"{j['latent']} ({len(j['shared'])}, {j['cosine']:.2f})" for j in s.sharing)
        t.add_row(str(s.latent), f"{s.reconstruction_cosine:.2f}", parts or "-", sharing or "-")
    console.print(t)


# --- geometry ----------------------------------------------------------------------------------
def print_geometry(doc: GeometryResult, console: Console) -> None:
    t = Table(title="dictionary geometry",
              caption="NN cos: each latent's max decoder cosine to another latent of the same SAE "
                      "(mean / median). Frequency: fraction of held-out tokens a latent fires on" +
                      next((f" ({f['eval_tokens']['tokens']:,} tokens of the "
                            f"{f['eval_tokens']['held_out_seqs']:,} held-out sequences of {escape(f['eval_tokens']['store'])})"
                            for f in (s.frequency for s in doc.saes) if f and f.get("eval_tokens")), "") + ".")
    for col in ("SAE", "site", "arch", "latents", "NN cos mean", "NN cos median", "dead", "freq median",
                ">1%", ">10%"):
        t.add_column(col, justify="left" if col in ("SAE", "site", "arch") else "right", overflow="fold")
    for s in doc.saes:
        f = s.frequency or {}
        t.add_row(s.name, str(s.site), s.arch + ("" if s.loss == "local" else f" ({s.loss})"),
                  str(s.d_sae), f"{s.nn_cosine['mean']:.3f}", f"{s.nn_cosine['median']:.3f}",
                  _fmt(f.get("dead")), _fmt(f.get("median"), ".3%"), _fmt(f.get("above_1pct"), ".1%"),
                  _fmt(f.get("above_10pct"), ".1%"))
    console.print(t)
    if doc.cross:
        c = Table(title="cross-SAE max decoder cosine (each latent of A to its closest latent of B)")
        for col in ("A", "B", "mean", "median", "p10"):
            c.add_column(col, justify="left" if col in ("A", "B") else "right", overflow="fold")
        for x in doc.cross:
            c.add_row(x.a, x.b, f"{x.mean:.3f}", f"{x.median:.3f}", f"{x.p10:.3f}")
        console.print(c)


def _step_hist(ax, hist: dict, label, style):
    edges, counts = hist["edges"], hist["counts"]
    total = sum(counts) or 1
    ax.stairs([n / total for n in counts], edges, label=label, **style)


def series_styles(n: int) -> list[dict]:
    """n distinguishable line styles: 10 colours, then the same colours dashed, dotted, dash-dotted
    (12 cross series of 4 SAEs used to repeat C0 and C1)."""
    dashes = ("-", "--", ":", "-.")
    return [{"color": f"C{i % 10}", "linestyle": dashes[(i // 10) % len(dashes)]} for i in range(n)]


def plot_geometry(doc: GeometryResult, prefix) -> list[str]:
    """draw_geometry's PNGs beside prefix, replacing only plots of ours (report.save_plots)."""
    return save_plots(lambda p: draw_geometry(doc, p), prefix)


def draw_geometry(doc: GeometryResult, prefix) -> list[str]:
    """PREFIX-nn.png, PREFIX-cross.png (2+ SAEs), PREFIX-freq.png (with a store); the paths written.
    The x axis spans the data (the histograms' shared range), not a fixed [-1, 1]."""
    plt = _pyplot()
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s, style in zip(doc.saes, series_styles(len(doc.saes))):
        _step_hist(ax, s.nn_cosine["hist"], f"{s.name} (mean {s.nn_cosine['mean']:.3f})", style)
    ax.set(xlabel="max cosine to another latent of the same SAE", ylabel="fraction of latents")
    ax.legend(fontsize=8), ax.grid(alpha=0.3)
    _save(fig, f"{prefix}-nn.png")
    written.append(f"{prefix}-nn.png")
    if doc.cross:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for x, style in zip(doc.cross, series_styles(len(doc.cross))):
            _step_hist(ax, x.hist, f"{x.a} -> {x.b} (mean {x.mean:.3f})", style)
        ax.set(xlabel="max cosine of a latent of A to the latents of B", ylabel="fraction of A's latents")
        ax.legend(fontsize=8), ax.grid(alpha=0.3)
        _save(fig, f"{prefix}-cross.png")
        written.append(f"{prefix}-cross.png")
    with_freq = [s for s in doc.saes if s.frequency]
    if with_freq:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for s, style in zip(with_freq, series_styles(len(with_freq))):
            f = s.frequency
            floor = 0.5 / f["tokens"]   # dead latents drawn at the left edge
            vals = sorted(max(v, floor) for v in f["values"])
            ys = [(k + 1) / len(vals) for k in range(len(vals))]
            ax.step(vals, ys, where="post", **style,
                    label=f"{s.name} (median {f['median']:.2%}, {f['dead']} dead)")
        ax.set_xscale("log")
        ax.set(xlabel="latent activation frequency (fraction of held-out tokens)", ylabel="CDF over latents")
        ax.legend(fontsize=8), ax.grid(alpha=0.3)
        _save(fig, f"{prefix}-freq.png")
        written.append(f"{prefix}-freq.png")
    return written
