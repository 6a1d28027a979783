"""Whether each SAE has plateaued, judged across seeds: the plateau rule of bench/plateau.py
(held-out loss and held-out L0 move < P% between two budgets), but on the 95% t-interval of the
per-seed change over >= 5 seeds instead of on one searched seed's change.

Why: on the tuned runs one seed's change between 128 and 256 epochs varies by ±4-10% across seeds
(bench/overfit.py, docs/results.md), so one seed's 2% rule reads noise both ways: it stopped TopK
at a "turn" that three other seeds did not repeat. Here each seed's change is a ratio
loss(2B) / loss(B) of the same SAE (same seed, store, config and held-out tokens), and the 95%
Student t-interval of the mean log ratio (bench/verdicts.py ratio_interval) says, per SAE and
budget pair, for the loss and for the L0:

- **settled**: the interval lies inside (1 - P%, 1 + P%);
- **falls** / **rises**: the interval lies below / above 1 and not inside the band (the loss still
  improves / gets worse on held-out tokens);
- **undecided**: the interval contains 1 but is wider than the band (more seeds would tell).

An SAE is settled when both are; its L0 is judged on the seeds that recorded one (bench/plateau.py
judges a journal without L0 records on its loss alone, and so does this, saying so). An SAE is
**untestable** when a seed has it at one budget and not the other, or a loss that is missing, not
finite or <= 0, or an L0 of 0 (a dead SAE): never judged on the seeds that remain. A sweep folder
has plateaued at a budget pair when every SAE of it is settled; it has not when any SAE is
untestable or tested and not settled; otherwise (settled ones plus ones with < 5 seeds) untested.
Only records trained with the journal's seed count (lr_tune.py copies seed 0's record of the
tuning budget into every seed's journal), and a budget pair counts only when every seed trained it
with one config (all but the seed and the budget's own fields).

    python bench/plateau_seeds.py bench-out/pareto-tuned --pct 2     # per folder and budget pair
    python bench/plateau_seeds.py OUT --json docs/results-plateau-seeds.json --markdown
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from pathlib import Path

from plateau import JournalError, check_journal, positive
from verdicts import MIN_SEEDS, ratio_interval

IGNORED = ("epochs", "checkpoint_every", "log_every")   # config fields a budget may change
PER_SEED = ("seed", "out", "init")                       # config fields seeds may differ in


def journals(out: str, seeds: list[int] | None = None) -> dict[int, dict]:
    """{seed: its plateau.json}, from OUT/seed<N>/plateau.json (only `seeds`, if given: a run's own,
    not another run's left in the folder), each checked for the shape bench/plateau.py writes
    (ValueError naming the file otherwise)."""
    found = {}
    for path in sorted(Path(out).glob("seed*/plateau.json")):
        m = re.fullmatch(r"seed(\d+)", path.parent.name)
        if not m or (seeds is not None and int(m.group(1)) not in seeds):
            continue
        try:
            journal = json.loads(path.read_text())
            check_journal(journal)
        except (OSError, ValueError) as e:
            raise JournalError(f"{path}: {e}") from None
        found[int(m.group(1))] = journal
    return found


def _config(entry: dict, seed: int) -> dict | None:
    """The budget's config minus what a budget or a seed may change, if it was trained with `seed`."""
    cfg = json.loads(entry["config"])
    if cfg.get("seed") != seed:
        return None
    return {k: v for k, v in cfg.items() if k not in IGNORED + PER_SEED}


def _change(before: dict | None, after: dict | None, b: int) -> dict:
    """One seed's change of one SAE: {"loss": ratio | None, "l0": ratio | None, "why": problem | None}."""
    if before is None or after is None:
        return {"loss": None, "l0": None, "why": f"missing at {2 * b if after is None else b} epochs"}
    a, z = before.get("held_out_loss"), after.get("held_out_loss")
    if not (positive(a) and positive(z)):
        return {"loss": None, "l0": None, "why": "held-out loss missing, not finite or <= 0"}
    la, lz = before.get("held_out_l0"), after.get("held_out_l0")
    if la is None or lz is None:
        return {"loss": z / a, "l0": None, "why": None}
    if not (positive(la) and positive(lz)):
        return {"loss": None, "l0": None, "why": "L0 is 0 or not finite (a dead SAE)"}
    return {"loss": z / a, "l0": lz / la, "why": None}


def changes(per_seed: dict[int, dict]) -> dict:
    """{folder: {"B->2B": {"config_ok": bool, "saes": {sae: {seed: change}}}}} for every consecutive
    doubling both of whose budgets a seed trained with its own seed; a seed whose two budgets had
    different configs makes the SAE untestable (never dropped: the others would be judged alone)."""
    out: dict = {}
    configs: dict = {}
    for seed, journal in sorted(per_seed.items()):
        for folder, budgets in journal.items():
            for b in sorted(int(e) for e in budgets):
                lo, hi = budgets[str(b)], budgets.get(str(2 * b))
                if hi is None:
                    continue
                ca, cb = _config(lo, seed), _config(hi, seed)
                if ca is None or cb is None:
                    continue   # another seed's record (lr_tune.py's copy): not this seed's SAE
                pair = f"{b}->{2 * b}"
                configs.setdefault((folder, pair), []).append(ca)
                saes = out.setdefault(folder, {}).setdefault(pair, {"config_ok": True, "saes": {}})["saes"]
                for sae in set(lo["training"]) | set(hi["training"]):
                    saes.setdefault(sae, {})[seed] = _change(lo["training"].get(sae), hi["training"].get(sae), b) \
                        if ca == cb else {"loss": None, "l0": None, "why": "its two budgets had different configs"}
    for (folder, pair), cfgs in configs.items():
        out[folder][pair]["config_ok"] = all(c == cfgs[0] for c in cfgs)
    return out


def judge(ratios: list[float], pct: float) -> tuple[str, list[float] | None]:
    """settled / falls / rises / undecided for one metric's per-seed ratios (see the module doc)."""
    if len(ratios) < MIN_SEEDS:
        return f"untested ({len(ratios)} < {MIN_SEEDS} seeds)", None
    centre, lo, hi = ratio_interval(ratios)
    band = pct / 100
    if 1 - band < lo and hi < 1 + band:
        return "settled", [centre, lo, hi]
    return ("falls" if hi < 1 else "rises" if lo > 1 else "undecided"), [centre, lo, hi]


def judge_sae(by_seed: dict[int, dict], pct: float, config_ok: bool) -> dict:
    seeds = sorted(by_seed)
    entry = {"seeds": seeds, "loss": {"status": None, "ratio": None}, "l0": {"status": None, "ratio": None}}
    problems = [f"seed {s}: {by_seed[s]['why']}" for s in seeds if by_seed[s]["why"]]
    if not config_ok:
        problems.insert(0, "the seeds trained it with different configs")
    if problems:
        return {**entry, "status": "untestable", "why": "; ".join(problems)}
    loss_status, loss_iv = judge([by_seed[s]["loss"] for s in seeds], pct)
    l0s = [by_seed[s]["l0"] for s in seeds if by_seed[s]["l0"] is not None]
    l0_status, l0_iv = judge(l0s, pct) if l0s else ("not recorded", None)
    entry["loss"], entry["l0"] = {"status": loss_status, "ratio": loss_iv}, {"status": l0_status, "ratio": l0_iv}
    if loss_status.startswith("untested"):
        return {**entry, "status": "untested"}
    if loss_status == "settled" and l0_status in ("settled", "not recorded"):
        return {**entry, "status": "settled"}
    if loss_status == "settled" and l0_status.startswith("untested"):
        return {**entry, "status": "untested"}
    return {**entry, "status": f"loss {loss_status}" + ("" if l0_status == "settled" else f", L0 {l0_status}")}


def _natural(name: str):
    return [float(t) if re.fullmatch(r"\d+(\.\d+)?", t) else t for t in re.split(r"(\d+(?:\.\d+)?)", name)]


def report(per_seed: dict[int, dict], pct: float) -> dict:
    """{"rule", "pct", "folders": {folder: {"pairs": {pair: {"plateau": True | False | None, "saes"}}}}}."""
    folders = {}
    for folder, pairs in sorted(changes(per_seed).items()):
        judged = {}
        for pair, p in sorted(pairs.items(), key=lambda kv: int(kv[0].split("->")[0])):
            saes = {sae: judge_sae(p["saes"][sae], pct, p["config_ok"]) for sae in sorted(p["saes"], key=_natural)}
            st = [s["status"] for s in saes.values()]
            plateau = True if all(s == "settled" for s in st) else \
                None if all(s in ("settled", "untested") for s in st) else False
            judged[pair] = {"plateau": plateau, "saes": saes}
        folders[folder] = {"pairs": judged}
    return {"rule": f"per SAE: the 95% t-interval of the per-seed ratio (>= {MIN_SEEDS} seeds) of held-out loss "
                    f"and of held-out L0 between two budgets lies inside 1 ± {pct:g}%; a folder plateaus when "
                    "every SAE of it does", "pct": pct, "folders": folders}


def summary(out: str, pct: float, seeds: list[int] | None = None) -> dict:
    """{folder: {"B->2B": "plateaued" | "not plateaued" | "untested"}}: what bench/pareto.py writes
    into pareto.json beside the rows, so each row's budget says whether its folder plateaued across
    seeds (the run's `seeds` only)."""
    rep = report(journals(out, seeds), pct)
    return {folder: {pair: VERDICT[e["plateau"]] for pair, e in f["pairs"].items()} for folder, f in rep["folders"].items()}


def _pct(iv) -> str:
    if iv is None:
        return "-"
    c, lo, hi = (100 * (x - 1) for x in iv)
    return f"{c:+.1f}% [{lo:+.1f}, {hi:+.1f}]"


VERDICT = {True: "plateaued", False: "not plateaued", None: "untested"}


def lines(rep: dict, markdown: bool = False) -> list[str]:
    """Text: a line per folder and budget pair, then one per SAE (~90 columns). Markdown: a table."""
    out = ["| folder | SAE | epochs | seeds | held-out loss change [95% CI] | L0 change [95% CI] | status |",
           "|---|---|---|---|---|---|---|"] if markdown else []
    for folder, f in rep["folders"].items():
        for pair, entry in f["pairs"].items():
            seeds = sorted({x for s in entry["saes"].values() for x in s["seeds"]})
            if markdown:
                out.append(f"| {folder} | (all) | {pair} | {len(seeds)} | | | **{VERDICT[entry['plateau']]}** |")
            else:
                out.append(f"{folder} {pair} epochs, seeds {','.join(map(str, seeds))}: {VERDICT[entry['plateau']]}")
            if all(s["status"] == "untested" and s["loss"]["ratio"] is None for s in entry["saes"].values()):
                continue   # too few seeds at this pair: the folder line says it
            for sae, s in entry["saes"].items():
                status = s["status"] + (f" ({s['why']})" if s.get("why") else "")
                if markdown:
                    out.append(f"| {folder} | {sae} | {pair} | {len(s['seeds'])} | {_pct(s['loss']['ratio'])} | "
                               f"{_pct(s['l0']['ratio'])} | {status} |")
                else:
                    out.append(f"  {sae:24s} loss {_pct(s['loss']['ratio']):22s} L0 {_pct(s['l0']['ratio']):21s} {status}")
    return out


def wide_lines(rep: dict) -> list[str]:
    """Markdown, one row per SAE: its loss and L0 change at every budget pair judged on >= MIN_SEEDS
    seeds, side by side, and its status at the last; a bold row per folder says whether it plateaued
    at each pair (the table of docs/results.md)."""
    def judged(entry):
        return any(s["loss"]["ratio"] is not None for s in entry["saes"].values())
    pairs = sorted({pair for f in rep["folders"].values() for pair, e in f["pairs"].items() if judged(e)},
                   key=lambda pair: int(pair.split("->")[0]))
    if not pairs:
        return ["(no budget pair has enough seeds to judge)"]
    last = pairs[-1].replace("->", " → ")
    head = [f"held-out loss, {p.replace('->', ' → ')} | L0, {p.replace('->', ' → ')}" for p in pairs]
    out = ["| SAE (mean change over the seeds [95% CI]) | " + " | ".join(head) + f" | at {last.split(' → ')[1]} |",
           "|---|" + "---|---|" * len(pairs) + "---|"]
    for folder, f in rep["folders"].items():
        saes = sorted({sae for e in f["pairs"].values() for sae in e["saes"]}, key=_natural)
        for sae in saes:
            cells = []
            for pair in pairs:
                s = f["pairs"].get(pair, {}).get("saes", {}).get(sae)
                cells += [_pct(s["loss"]["ratio"]), _pct(s["l0"]["ratio"])] if s else ["-", "-"]
            s = f["pairs"].get(pairs[-1], {}).get("saes", {}).get(sae)
            status = (s["status"] + (f" ({s['why']})" if s.get("why") else "")) if s else "-"
            name = sae if sae.startswith(folder + "_") else f"{folder}/{sae}"
            out.append(f"| {name} | " + " | ".join(cells) + f" | {status} |")
        cells = []
        for pair in pairs:
            cells += [f"**{VERDICT[f['pairs'][pair]['plateau']]}**" if pair in f["pairs"] else "-", ""]
        out.append(f"| **{folder}** | " + " | ".join(cells) + " | |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a bench/pareto.py --out folder (seed<N>/plateau.json inside)")
    p.add_argument("--pct", type=float, default=2.0, help="the plateau band, percent (default 2, bench/plateau.py's)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--wide", action="store_true",
                   help="print a markdown table with a row per SAE and its budget pairs side by side")
    args = p.parse_args(argv)
    if not (args.pct > 0 and math.isfinite(args.pct)):
        p.error("--pct must be a number > 0")

    def fail(msg: str) -> int:
        print(f"plateau_seeds: error: {msg}", file=sys.stderr)
        return 2

    try:
        per_seed = journals(args.out)
    except ValueError as e:
        return fail(str(e))
    if not per_seed:
        return fail(f"{args.out}: no seed<N>/plateau.json inside")
    rep = report(per_seed, args.pct)
    rep["seeds"] = sorted(per_seed)
    print(textwrap.fill(f"plateau judged across seeds {rep['seeds']}: {rep['rule']}", 88))
    print("\n".join(wide_lines(rep) if args.wide else lines(rep, args.markdown)))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
        except OSError as e:
            return fail(f"--json {args.json}: {e.strerror or e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
