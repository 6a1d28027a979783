"""Whether each SAE has plateaued, judged across seeds: the plateau rule of bench/plateau.py
(held-out loss and held-out L0 move < P% between two budgets), but on the 95% t-interval of the
per-seed change over >= 5 seeds instead of on one searched seed's change.

Why: on the tuned runs one seed's change between 128 and 256 epochs varies by ±4-10% across seeds
(bench/overfit.py, docs/results.md), so one seed's 2% rule reads noise both ways: it stopped TopK
at a "turn" that three other seeds did not repeat. Here each seed's change is a log ratio
loss(2B) / loss(B) of the same SAE (same seed, same store, same held-out tokens), and the 95%
Student t-interval of their mean (bench/verdicts.py ratio_interval) says, per SAE and budget pair:

- **settled**: the interval lies inside (1 - P%, 1 + P%), for the loss and for the L0;
- **falls** / **rises**: the loss interval lies below / above 1 and is not inside the band (still
  improving / getting worse on held-out tokens);
- **undecided**: the interval contains 1 but is wider than the band (more seeds would tell).

A sweep folder has plateaued at a budget pair when every SAE of it is settled. Records come from
each seed's plateau.json journal (bench/plateau.py), and only records trained with that seed count
(lr_tune.py copies seed 0's record of the tuning budget into every seed's journal as superseded).

    python bench/plateau_seeds.py /work/runs/out/pareto-tuned --pct 2      # a line per SAE and pair
    python bench/plateau_seeds.py OUT --json docs/results-plateau-seeds.json --markdown
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from verdicts import MIN_SEEDS, ratio_interval

IGNORED = ("epochs", "checkpoint_every", "log_every")   # config fields a budget may change


def journals(out: str) -> dict[int, dict]:
    """{seed: its plateau.json}, from OUT/seed<N>/plateau.json."""
    found = {}
    for path in sorted(Path(out).glob("seed*/plateau.json")):
        m = re.fullmatch(r"seed(\d+)", path.parent.name)
        if m:
            found[int(m.group(1))] = json.loads(path.read_text())
    return found


def _comparable(entry: dict, seed: int) -> dict | None:
    """The budget's config minus what a budget may change, if that budget was trained with `seed`."""
    cfg = json.loads(entry["config"])
    if cfg.get("seed") != seed:
        return None
    return {k: v for k, v in cfg.items() if k not in IGNORED}


def changes(per_seed: dict[int, dict]) -> dict:
    """{folder: {sae: {"B->2B": {seed: (loss ratio, l0 ratio)}}}} for every consecutive doubling
    both of whose budgets were trained with that seed and with one config."""
    out: dict = {}
    for seed, journal in per_seed.items():
        for folder, budgets in journal.items():
            for b in sorted(int(e) for e in budgets):
                lo, hi = budgets.get(str(b)), budgets.get(str(2 * b))
                if hi is None:
                    continue
                ca, cb = _comparable(lo, seed), _comparable(hi, seed)
                if ca is None or cb is None or ca != cb:
                    continue
                for sae, after in hi["training"].items():
                    before = lo["training"].get(sae)
                    if not before:
                        continue
                    pair = (_ratio(before.get("held_out_loss"), after.get("held_out_loss")),
                            _ratio(before.get("held_out_l0"), after.get("held_out_l0")))
                    if pair[0] is None:
                        continue
                    out.setdefault(folder, {}).setdefault(sae, {}).setdefault(f"{b}->{2 * b}", {})[seed] = pair
    return out


def _ratio(a, b) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0:
        return None
    return b / a


def judge(ratios: list[float], pct: float) -> tuple[str, list[float] | None]:
    """settled / falls / rises / undecided for one metric's per-seed ratios (see the module doc)."""
    if len(ratios) < MIN_SEEDS:
        return f"untested (fewer than {MIN_SEEDS} seeds)", None
    centre, lo, hi = ratio_interval(ratios)
    band = pct / 100
    if 1 - band < lo and hi < 1 + band:
        status = "settled"
    elif hi < 1:
        status = "falls"
    elif lo > 1:
        status = "rises"
    else:
        status = "undecided"
    return status, [centre, lo, hi]


def report(per_seed: dict[int, dict], pct: float) -> dict:
    """{"rule", "pct", "folders": {folder: {"pairs": {pair: {"plateau": bool|None, "saes": {...}}}}}}.
    An SAE is settled only when both its loss and its L0 are; a folder's pair plateaued when every
    SAE of it is (None: some SAE untested)."""
    folders = {}
    for folder, saes in sorted(changes(per_seed).items()):
        pairs: dict = {}
        for sae, by_pair in sorted(saes.items()):
            for pair, by_seed in by_pair.items():
                loss = [v[0] for v in by_seed.values()]
                l0 = [v[1] for v in by_seed.values() if v[1] is not None]
                loss_status, loss_iv = judge(loss, pct)
                l0_status, l0_iv = judge(l0, pct) if len(l0) == len(loss) else ("no L0 record", None)
                settled = loss_status == "settled" and l0_status == "settled"
                status = "settled" if settled else "untested" if loss_status.startswith("untested") else \
                    f"loss {loss_status}, L0 {l0_status}"
                pairs.setdefault(pair, {"saes": {}})["saes"][sae] = {
                    "seeds": sorted(by_seed), "status": status, "loss": {"status": loss_status, "ratio": loss_iv},
                    "l0": {"status": l0_status, "ratio": l0_iv}}
        for pair, entry in pairs.items():
            st = [s["status"] for s in entry["saes"].values()]
            entry["plateau"] = None if "untested" in st else all(s == "settled" for s in st)
        folders[folder] = {"pairs": dict(sorted(pairs.items(), key=lambda kv: int(kv[0].split("->")[0])))}
    return {"rule": f"per SAE: the 95% t-interval of the per-seed ratio (>= {MIN_SEEDS} seeds) of held-out loss "
                    f"and of held-out L0 between two budgets lies inside 1 ± {pct:g}%", "pct": pct, "folders": folders}


def _pct(iv) -> str:
    if iv is None:
        return "-"
    c, lo, hi = (100 * (x - 1) for x in iv)
    return f"{c:+.1f}% [{lo:+.1f}, {hi:+.1f}]"


def lines(rep: dict, markdown: bool = False) -> list[str]:
    out = []
    if markdown:
        out += ["| SAE | budgets | held-out loss change [95% CI] | L0 change [95% CI] | status |", "|---|---|---|---|---|"]
    for folder, f in rep["folders"].items():
        for pair, entry in f["pairs"].items():
            if entry["plateau"] is None and all(s["loss"]["ratio"] is None for s in entry["saes"].values()):
                seeds = sorted({x for s in entry["saes"].values() for x in s["seeds"]})
                out.append(f"| {folder} | {pair} | - | - | untested: seeds {seeds} |" if markdown else
                           f"  {folder} {pair}: untested (seeds {seeds})")
                continue
            for sae, s in entry["saes"].items():
                cells = [sae, pair, _pct(s["loss"]["ratio"]), _pct(s["l0"]["ratio"]), s["status"]]
                out.append("| " + " | ".join(cells) + " |" if markdown else
                           f"{sae:26s} {pair:9s} loss {cells[2]:26s} L0 {cells[3]:26s} {s['status']}")
            verdict = {True: "plateaued", False: "not plateaued", None: "untested"}[entry["plateau"]]
            if not markdown:
                out.append(f"  {folder} {pair}: {verdict}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a bench/pareto.py --out folder (seed<N>/plateau.json inside)")
    p.add_argument("--pct", type=float, default=2.0, help="the plateau band, percent (default 2, bench/plateau.py's)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    if not args.pct > 0:
        p.error("--pct must be > 0")
    try:
        per_seed = journals(args.out)
    except (OSError, ValueError) as e:
        p.error(f"{args.out}: {e}")
    if not per_seed:
        p.error(f"{args.out}: no seed<N>/plateau.json inside")
    try:
        rep = report(per_seed, args.pct)
    except (KeyError, TypeError, ValueError) as e:
        p.error(f"{args.out}: a plateau.json without the records bench/plateau.py writes ({e!r})")
    rep["seeds"] = sorted(per_seed)
    print("\n".join(lines(rep, args.markdown)))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
