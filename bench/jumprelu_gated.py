"""JumpReLU against Gated and ReLU on the Pareto axes of docs/results.md (L0 vs CE increase / NMSE),
several seeds, after the issue-10 threshold init (theta_0 = sqrt(lambda), train/jumprelu.py).

Same store, evaluation and rule as bench/pareto.py (d_sae 256, batch 1024, the same Adam betas for
all, every held-out token of the store, position 0 clean; verdicts by bench/verdicts.py, >= 5 seeds);
only the relu, gated and jumprelu sweeps, with a wider jumprelu lambda grid so its L0 range covers
gated's. Per seed, each sweep folder is trained to its own plateau (--until-plateau P, as in
bench/pareto.py: training only, bench/plateau.py), then the three are evaluated together once. Each
comparison is metric(A) / metric(B) at A's own sweep points (B interpolated log-linearly in L0
there), per seed. Re-running the same command resumes; --report-only recomputes the verdicts from
jumprelu_gated.json.

    python bench/jumprelu_gated.py --out bench-out/jg --seeds 5 --until-plateau 2   # a real plateau: hours
    python bench/jumprelu_gated.py --out bench-out/jg --store bench-out/pareto/store.zarr --seeds 5 \
        --until-plateau 2 --max-epochs 8 --plateau-seeds 1                          # capped: ~8 min of one core
    python bench/jumprelu_gated.py --out bench-out/jg --report-only
    # each folder at its tuned lr (bench/lr_tune.py: jumprelu's tuned on lambda 0.1 / 0.3 / 1)
    python bench/jumprelu_gated.py --out bench-out/jg-tuned --store bench-out/pareto/store.zarr --seeds 5 \
        --until-plateau 2 --max-epochs 64 --plateau-seeds 1 --lrs bench-out/lr-tune
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from lr_tune import TunedLrError, adopt_records, load_lrs
from pareto import LOCAL, fixed_budgets, with_lrs
from plateau import SeedTrainer, say
from seed_eval import evaluate_seed, harvest_store
from sae_harvest.evaluate.demo import SITE, SWEEPS as DEMO_SWEEPS
from sae_harvest.stores.urls import scrub_tree
from verdicts import at_points, print_budget, print_rows

JUMPRELU_L1 = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
SWEEPS = [row for row in DEMO_SWEEPS if row[1] in ("relu", "gated") and row[2].get("loss", "local") == "local"]
SWEEPS.append(("jumprelu", "jumprelu", {"l1": JUMPRELU_L1}))
# (A, B, expected): A's points, B interpolated there; the papers' claims: jumprelu at or beyond gated's
# front (so gated's points lie above jumprelu's: ">"), both beyond relu's
PAIRS = (("jumprelu", "gated", "<"), ("gated", "jumprelu", ">"), ("jumprelu", "relu", "<"), ("gated", "relu", "<"))
METRICS = ("ce_increase", "nmse_nobos")


def compare(per_seed):
    """Every pair's rows at A's own sweep points, B interpolated there (bench/verdicts.py)."""
    return {f"{a} vs {b}: {metric} {expected}": at_points(per_seed, a, b, metric, expected)
            for a, b, expected in PAIRS for metric in METRICS}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/jumprelu_gated")
    p.add_argument("--tokens", type=int, default=80_000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=10, help="the store holds every N-th sequence out")
    p.add_argument("--betas", default="0,0.999", help="Adam betas for every architecture ('arch': each its own)")
    p.add_argument("--d-sae", type=int, default=256)
    p.add_argument("--store", default=None, help="the store (default --out/store.zarr; bench/pareto.py's, to share "
                                                 "one harvest)")
    p.add_argument("--epochs", type=int, default=1, help="the first budget (epochs)")
    p.add_argument("--until-plateau", type=float, default=0.0,
                   help="double each sweep's epochs until every SAE's held-out loss and L0 move < this %% (0: one budget)")
    p.add_argument("--max-epochs", type=int, default=64)
    p.add_argument("--plateau-seeds", type=int, default=None,
                   help="search the plateau on the first N seeds only (as bench/pareto.py)")
    p.add_argument("--report-only", action="store_true", help="recompute the verdicts from --out/jumprelu_gated.json")
    p.add_argument("--lrs", default=None, help="tuned learning rates (bench/lr_tune.py's --out folder, or a JSON "
                                               "{folder: lr}); default: each architecture's")
    args = p.parse_args()
    t0 = time.perf_counter()
    out_json = os.path.join(args.out, "jumprelu_gated.json")
    if args.report_only:
        with open(out_json) as f:
            doc = json.load(f)
        report(doc["series_per_seed"], compare(doc["series_per_seed"]), doc.get("budgets", []), doc["seconds"])
        return
    try:
        betas = None if args.betas == "arch" else tuple(float(b) for b in args.betas.split(","))
    except ValueError as e:
        p.error(f"--betas: {e}")
    args.tuned_lrs = {}
    if args.lrs:   # before the harvest: a bad --lrs is one line now
        try:
            args.tuned_lrs = load_lrs(args.lrs, rows=SWEEPS, d_sae=args.d_sae, local={**LOCAL, "adam_betas": betas})
        except TunedLrError as e:
            p.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    store = harvest_store(args.store or os.path.join(args.out, "store.zarr"), args.tokens, args.eval_every)
    rows = with_lrs(SWEEPS, args.tuned_lrs)
    per_seed, budgets, eval_tokens = [], [], None
    for seed in range(args.seeds):
        wall, cpu, tag = time.perf_counter(), time.process_time(), f"seed {seed}"
        root = os.path.join(args.out, f"seed{seed}")
        trainer = SeedTrainer(root, store=store, site=SITE, seed=seed, d_sae=args.d_sae,
                              local={**LOCAL, "adam_betas": betas}, tag=tag)
        if args.lrs:
            adopt_records(trainer, args.lrs)   # the tuning's runs of the same config (relu, gated at seed 0)
        paths, sweeps_done = trainer.run(rows, first=args.epochs, pct=args.until_plateau, max_epochs=args.max_epochs,
                                         fixed=fixed_budgets(budgets, args.plateau_seeds))
        series, eval_tokens = evaluate_seed(paths, store, root, tag)
        per_seed.append({k: v for k, v in series.items() if k in ("relu", "gated", "jumprelu")})
        budgets.append({"seed": seed, "sweeps": sweeps_done, "seconds": time.perf_counter() - wall,
                        "cpu_seconds": time.process_time() - cpu})
        say(f"[{tag}] done: {time.perf_counter() - wall:.0f} s (CPU {time.process_time() - cpu:.0f} s)")
        comparisons = compare(per_seed)
        with open(out_json, "w") as f:   # after every seed: a cut-off run keeps its data
            json.dump(scrub_tree({"seeds_done": len(per_seed), "args": vars(args), "local": LOCAL,
                                  "sweeps": [[f, a, e] for f, a, e in rows], "budgets": budgets,
                                  "eval_tokens": eval_tokens,
                                  "series_per_seed": per_seed, "comparisons": comparisons,
                                  "seconds": time.perf_counter() - t0}), f, indent=2)
    report(per_seed, comparisons, budgets, time.perf_counter() - t0)


def report(per_seed, comparisons, budgets, seconds):
    print(f"--- {len(per_seed)} seed(s), {seconds:.0f} s")
    for b in budgets:
        print_budget(b)
    for label in ("relu", "gated", "jumprelu"):
        names = [q["name"] for q in per_seed[0].get(label, [])]
        for name in names:
            pts = [next(q for q in s[label] if q["name"] == name) for s in per_seed]
            l0, ce, nm = (np.array([q[k] for q in pts]) for k in ("l0", "ce_increase", "nmse_nobos"))
            print(f"{name:>22}: L0 {l0.mean():6.1f}±{l0.std(ddof=1) if len(l0) > 1 else 0:.1f}  "
                  f"CE+ {ce.mean():.3f}±{ce.std(ddof=1) if len(ce) > 1 else 0:.3f}  NMSE {nm.mean():.3f}")
    for claim, rows in comparisons.items():
        print_rows(claim, rows)


if __name__ == "__main__":
    from plateau import JournalError
    try:
        main()
    except JournalError as e:   # one line; the journal is neither trained on nor rewritten
        raise e.exit("jumprelu_gated") from None
