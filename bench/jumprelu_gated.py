"""JumpReLU against Gated and ReLU on the Pareto axes of docs/results.md (L0 vs CE increase / NMSE),
several seeds, after the issue-10 threshold init (theta_0 = sqrt(lambda), train/jumprelu.py).

Same store, budget and evaluation as bench/pareto.py (one pass of 80k tokens, d_sae 256, batch 1024,
the same Adam betas for all, every held-out token of the store, position 0 clean; verdicts by
pareto.verdict, >= 5 seeds); only the relu, gated and jumprelu sweeps, with a wider
jumprelu lambda grid so its L0 range covers gated's. Each comparison is metric(A) / metric(B) at A's
own sweep points (B interpolated log-linearly in L0 there), per seed.

    python bench/jumprelu_gated.py --out bench-out/jg      # ~7 min on 2 idle CPU cores (5 seeds)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from pareto import LOCAL, interp_ce, training_record, verdict
from sae_harvest.evaluate.demo import SWEEPS as DEMO_SWEEPS, run_demo
from sae_harvest.evaluate.report import series_label

JUMPRELU_L1 = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
SWEEPS = [row for row in DEMO_SWEEPS if row[1] in ("relu", "gated") and row[2].get("loss", "local") == "local"]
SWEEPS.append(("jumprelu", "jumprelu", {"l1": JUMPRELU_L1}))
# (A, B, expected): A's points, B interpolated there; the papers' claims: jumprelu at or beyond gated's
# front (so gated's points lie above jumprelu's: ">"), both beyond relu's
PAIRS = (("jumprelu", "gated", "<"), ("gated", "jumprelu", ">"), ("jumprelu", "relu", "<"), ("gated", "relu", "<"))
METRICS = ("ce_increase", "nmse_nobos")


def compare(per_seed):
    out = {}
    for a, b, expected in PAIRS:
        for metric in METRICS:
            rows = []
            for name in sorted({q["name"] for s in per_seed for q in s.get(a, [])}):
                ratios, l0s = [], []
                for s in per_seed:
                    qa = next((q for q in s.get(a, []) if q["name"] == name), None)
                    vb = None if qa is None else interp_ce([(q["l0"], q[metric]) for q in s.get(b, [])], qa["l0"])
                    if vb:
                        ratios.append(qa[metric] / vb)
                        l0s.append(qa["l0"])
                if len(ratios) == len(per_seed):
                    rows.append({"at": name, "l0": float(np.mean(l0s)), "ratios": ratios,
                                 "min": min(ratios), "max": max(ratios), **verdict(ratios, expected)})
            out[f"{a} vs {b}: {metric} {expected}"] = rows
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/jumprelu_gated")
    p.add_argument("--tokens", type=int, default=80_000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=10, help="the store holds every N-th sequence out")
    p.add_argument("--betas", default="0,0.999", help="Adam betas for every architecture ('arch': each its own)")
    p.add_argument("--d-sae", type=int, default=256)
    args = p.parse_args()
    betas = None if args.betas == "arch" else tuple(float(b) for b in args.betas.split(","))
    t0 = time.perf_counter()
    store = os.path.join(args.out, "store.zarr")
    per_seed = []
    for seed in range(args.seeds):
        results = run_demo(os.path.join(args.out, f"seed{seed}"), tokens=args.tokens, sweeps=SWEEPS, seed=seed,
                           store=store, local={**LOCAL, "adam_betas": betas}, d_sae=args.d_sae,
                           eval_every=args.eval_every)
        series = {}
        for r in results:
            rec = training_record(r["sae"])
            if "moved" in rec:   # thresholds and gates against their starts
                m = rec["moved"]
                print(f"seed {seed} {r['name']}: {m['what']} median {m['median']:.3f} [{m['q05']:.3f}, "
                      f"{m['q95']:.3f}], {m['moved_over_5pct']:.0%} moved > 5%; {rec['steps']} steps")
            series.setdefault(series_label(r), []).append(
                {k: r[k] for k in ("name", "l0", "ce_increase", "nmse_nobos", "alive", "kl")})
        per_seed.append({k: sorted(v, key=lambda q: q["l0"]) for k, v in series.items()})
        comparisons = compare(per_seed)
        with open(os.path.join(args.out, "jumprelu_gated.json"), "w") as f:
            json.dump({"seeds_done": len(per_seed), "args": vars(args), "local": LOCAL,
                       "sweeps": [[f, a, e] for f, a, e in SWEEPS], "series_per_seed": per_seed,
                       "comparisons": comparisons, "seconds": time.perf_counter() - t0}, f, indent=2)
    print(f"--- {len(per_seed)} seed(s), {time.perf_counter() - t0:.0f} s")
    for label in ("relu", "gated", "jumprelu"):
        names = [q["name"] for q in per_seed[0].get(label, [])]
        for name in names:
            pts = [next(q for q in s[label] if q["name"] == name) for s in per_seed]
            l0, ce, nm = (np.array([q[k] for q in pts]) for k in ("l0", "ce_increase", "nmse_nobos"))
            print(f"{name:>22}: L0 {l0.mean():6.1f}±{l0.std(ddof=1) if len(l0) > 1 else 0:.1f}  "
                  f"CE+ {ce.mean():.3f}±{ce.std(ddof=1) if len(ce) > 1 else 0:.3f}  NMSE {nm.mean():.3f}")
    for claim, rows in comparisons.items():
        print(claim)
        for r in rows:
            ci = f"{r['ratio']:.2f}, 95% CI [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]" if r["interval"] \
                else f"seeds {r['min']:.2f}-{r['max']:.2f}"
            print(f"  {r['at']} (L0 {r['l0']:.1f}): ratio {ci}  {r['verdict']}")


if __name__ == "__main__":
    main()
