"""Does a longer budget fit the training split? Each SAE's NMSE on every training row of its store
against every held-out row, at several budgets of one run.

A held-out loss that rises between two budgets (bench/plateau.py's "turned") has two readings: the
SAE fits the training split (its training NMSE still falls while the held-out one rises), or the
optimisation itself went worse (both rise). The NMSE is the one the trainer reports (train/held_out.py:
sum ||x - x_hat||^2 / sum ||x||^2, position 0 left out as in training, g-SAEs selecting with the
store's gradients), so the held-out column reproduces each SAE's summary.json. Each SAE is read
against the store it trained on (the label-free g-SAE against the label-free store).

    python bench/overfit.py --store bench-out/pareto/store.zarr \\
        --budgets bench-out/pareto-tuned/seed3/epochs128 bench-out/pareto-tuned/seed3/epochs256 \\
        --json bench-out/overfit-seed3.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common import write_json


def sae_names(root: Path) -> list[str]:
    """folder/name of every saved SAE under a budget's root (root/folder/name/cfg.json)."""
    return sorted(str(p.parent.relative_to(root)) for p in root.glob("*/*/cfg.json"))


def nmse_on(sae, store, site: str, seqs: str, exclude_pos0: bool, batch_size: int = 4096) -> dict:
    """held_out_report of a saved SAE (its input scale folded in) on every row of the store's
    training ("train") or held-out ("held_out") sequences."""
    from sae_harvest.train.held_out import held_out_reconstruction

    grads = bool(getattr(sae, "uses_grads", False))

    def rows():
        for b in store.batches(site, batch_size, seqs=seqs, grads=grads, exclude_pos0=exclude_pos0, epochs=1,
                               drop_last=False):
            yield torch.from_numpy(b["acts"][site]), torch.from_numpy(b["grads"][site]) if grads else None

    with torch.no_grad():
        return held_out_reconstruction(sae, rows(), 1.0, "cpu")


def measure(store_path: str | None, budgets: list[str]) -> dict:
    """{folder/name: {budget root: {"train": report, "held_out": report}}} for the SAEs every budget
    has, each read against the store it trained on (its cfg.json's; `store_path` instead must be that
    store: the same creation id), so a g-SAE selects with the gradients it trained with."""
    from sae_harvest.stores import open_store
    from sae_harvest.train.sae_io import load_sae

    roots = [Path(b) for b in budgets]
    names = sorted(set.intersection(*(set(sae_names(r)) for r in roots)))
    if not names:
        raise ValueError(f"no SAE (folder/name/cfg.json) is under every one of {', '.join(budgets)}")
    opened = {}
    out = {}
    for name in names:
        out[name] = {}
        for root in roots:
            cfg = json.loads((root / name / "cfg.json").read_text())
            ours = cfg.get("sae_harvest") or {}
            path = store_path or ours.get("store")
            if not path:
                raise ValueError(f"{root / name}: its cfg.json records no store; give --store")
            if path not in opened:
                opened[path] = open_store(path)
            store = opened[path]
            trained_on = (ours.get("held_out") or {}).get("creation_id")
            if trained_on != store.attrs.get("creation_id"):
                raise ValueError(f"{root / name} was trained on another store (creation id {trained_on}) than "
                                 f"{path} ({store.attrs.get('creation_id')})")
            site = ours.get("hook_name")
            exclude_pos0 = not (ours.get("training") or {}).get("include_bos", False)   # as train/local.py
            sae = load_sae(str(root / name), device="cpu")
            out[name][str(root)] = {seqs: nmse_on(sae, store, site, seqs, exclude_pos0)
                                    for seqs in ("train", "held_out")}
    return out


def summarise(reports: dict[str, dict], rose_pct: float = 2.0) -> dict:
    """Over every report (a label, e.g. a seed, to measure()'s JSON) and consecutive budget pair
    of it, per SAE: the held-out/train NMSE gap before and after, and the change of each NMSE; the
    counts docs/results.md quotes (the gap widens or narrows; where the held-out NMSE rose by more
    than rose_pct, whether the training NMSE rose with it: a worse optimum, not a fit to the rows)."""
    pairs = []
    for label, rep in sorted(reports.items()):
        budgets = [str(Path(b)) for b in rep["budgets"]]
        for before, after in zip(budgets, budgets[1:]):
            for sae, per in sorted(rep["saes"].items()):
                if before not in per or after not in per:
                    continue
                a, b = per[before], per[after]
                gap = [r["held_out"]["nmse"] / r["train"]["nmse"] - 1 for r in (a, b)]
                pairs.append({"run": label, "sae": sae, "budgets": [Path(before).name, Path(after).name],
                              "gap": gap, "held_out_change": b["held_out"]["nmse"] / a["held_out"]["nmse"] - 1,
                              "train_change": b["train"]["nmse"] / a["train"]["nmse"] - 1})
    if not pairs:
        raise ValueError("no SAE is in two budgets of any report")
    moves = [100 * (q["gap"][1] - q["gap"][0]) for q in pairs]
    gaps = [100 * g for q in pairs for g in q["gap"]]
    rose = [q for q in pairs if q["held_out_change"] > rose_pct / 100]
    return {"pairs": len(pairs), "gap_pct": [min(gaps), max(gaps)], "widens": sum(m > 0 for m in moves),
            "narrows": sum(m <= 0 for m in moves), "gap_change_points": [min(moves), max(moves)],
            "gap_change_mean": sum(moves) / len(moves), "held_out_rose": len(rose),
            "train_rose_with_it": sum(q["train_change"] > rose_pct / 100 for q in rose),
            "rose_pct": rose_pct, "rows": pairs}


def summary_lines(s: dict) -> list[str]:
    lo, hi = s["gap_change_points"]
    out = [f"{s['pairs']} SAE-run pairs; the held-out NMSE sits {s['gap_pct'][0]:.1f}% to {s['gap_pct'][1]:.1f}% "
           f"above the training NMSE",
           f"the gap widens in {s['widens']}, narrows in {s['narrows']} ({lo:+.1f} to {hi:+.1f} points, mean "
           f"{s['gap_change_mean']:+.2f})",
           f"held-out NMSE up > {s['rose_pct']:g}% in {s['held_out_rose']}; the training NMSE rose > "
           f"{s['rose_pct']:g}% with it in {s['train_rose_with_it']}"]
    for q in s["rows"]:
        if q["held_out_change"] > s["rose_pct"] / 100:
            out.append(f"  {q['run']} {q['sae']}: held-out {100 * q['held_out_change']:+.1f}%, "
                       f"train {100 * q['train_change']:+.1f}%")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=None,
                   help="the store the SAEs were trained on (default: each SAE's own, from its cfg.json)")
    p.add_argument("--budgets", nargs="+",
                   help="budget folders of one run, smallest first (e.g. seed3/epochs128 seed3/epochs256)")
    p.add_argument("--json", default=None, help="write the reports here")
    p.add_argument("--summary", nargs="+", default=None, metavar="JSON",
                   help="instead: summarise --json reports (each one run's, or one file of {run: report}), "
                        "no SAE read")
    args = p.parse_args(argv)
    if (args.summary is None) == (args.budgets is None):
        p.error("give --budgets (measure) or --summary (summarise reports), one of them")
    if args.summary:
        try:
            reports = {}
            for path in args.summary:
                doc = json.loads(Path(path).read_text())
                reports.update({path: doc} if "saes" in doc else doc)
            print("\n".join(summary_lines(summarise(reports))))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
            p.error(f"--summary: {type(e).__name__}: {e}")
        return 0
    try:
        result = measure(args.store, args.budgets)
    except Exception as e:   # noqa: BLE001  (a bad path or a store that does not read: one line)
        p.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    first = args.budgets[0]
    print(f"{'SAE':<28} {'budget':<12} {'NMSE train':>10} {'held-out':>10} {'gap':>7}  change from {Path(first).name}")
    for name, per in result.items():
        base = per[str(Path(first))]
        for root in args.budgets:
            r = per[str(Path(root))]
            tr, ho = r["train"]["nmse"], r["held_out"]["nmse"]
            change = "" if root == first else \
                f"  train {(tr / base['train']['nmse'] - 1) * 100:+.1f}%, held-out {(ho / base['held_out']['nmse'] - 1) * 100:+.1f}%"
            print(f"{name:<28} {Path(root).name:<12} {tr:>10.5f} {ho:>10.5f} {(ho / tr - 1) * 100:>+6.1f}%{change}")
    if args.json:
        write_json(args.json, {"store": args.store, "budgets": args.budgets, "saes": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
