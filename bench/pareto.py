"""Pareto fronts of every architecture at one site of the offline default model, over several seeds.

One harvested store; per seed, every sweep is trained (seeded init and batch order) and all SAEs of
that seed are evaluated together on the same held-out tokens (g-SAEs under both gradient modes,
causal and paper). Each paper claim is a ratio CE(A) / CE(B) at equal L0 per seed; the verdict rule (verdict(), and
docs/results.md) is a paired 95% t-interval of the per-seed log ratio over >= 5 seeds: a tie when it
contains 1, else agrees or disagrees with the claim. Writes pareto.json (all points, per-seed ratios, verdicts) and prints the verdicts.

    python bench/pareto.py --out bench-out/pareto       # ~15 min on 2 CPU cores (3 seeds)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from sae_harvest.evaluate.demo import SWEEPS as DEMO_SWEEPS, run_demo
from sae_harvest.evaluate.report import series_label

# the demo's local sweeps (one source), and e2e / e2e+ds from its middle local relu SAE (--init);
# e2e's lambda is on KL's scale (docs/e2e.md)
_E2E = {"l1": (1.0, 3.0), "batch_size": 2048, "lr": 1e-3, "epochs": None, "init": "relu/relu_l1-300"}
SWEEPS = [row for row in DEMO_SWEEPS if row[2].get("loss", "local") == "local"] + [
    ("e2e", "relu", {"loss": "e2e", **_E2E}),
    ("e2e_ds", "relu", {"loss": "e2e+ds", **_E2E}),
]
LOCAL = {"batch_size": 1024, "epochs": 1}
# (A, B, metric, expected): the papers' claims as ratios metric(A) / metric(B) at equal L0.
# "<": A is lower; ">": A is higher; "~": no difference detectable (the interval contains 1).
CLAIMS = (("e2e", "relu", "ce_increase", "<"), ("gated", "relu", "ce_increase", "<"),
          ("batchtopk", "topk", "ce_increase", "<"), ("gtopk+causal", "topk", "ce_increase", "<"),
          ("gtopk+paper", "topk", "ce_increase", "<"), ("jumprelu", "gated", "ce_increase", "<"),
          ("matryoshka_batchtopk", "batchtopk", "ce_increase", "~"),   # trades some reconstruction for nesting
          ("e2e", "relu", "downstream_mse", ">"), ("e2e+ds", "relu", "downstream_mse", "~"),
          ("e2e+ds", "relu", "ce_increase", "<"))
L0_GRID = (8, 16, 32, 64)


def interp_ce(points, l0):
    """A metric (CE increase, downstream MSE) of a series at a given L0, by log-linear interpolation (None outside its range)."""
    pts = sorted(p for p in points if p[0] > 0)
    if not pts:
        return None
    xs, ys = np.log([p[0] for p in pts]), [p[1] for p in pts]
    if not (xs[0] <= np.log(l0) <= xs[-1]):
        return None
    return float(np.interp(np.log(l0), xs, ys))


# two-sided 95% Student t quantiles t(0.975, df); beyond the table the df-30 value is conservative
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}
MIN_SEEDS = 5


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high): the 95% Student t-interval of the mean per-seed log ratio,
    exponentiated. Paired: each seed's A and B share the store, the evaluation tokens and the seed."""
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    n = len(logs)
    mean = float(logs.mean())
    half = T975[max(d for d in T975 if d <= n - 1)] * float(logs.std(ddof=1)) / np.sqrt(n)
    return float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half))


def verdict(ratios: list[float], expected: str = "<") -> dict:
    """The one verdict rule (docs/results.md): over >= MIN_SEEDS seeds, the 95% t-interval of the
    per-seed log ratio metric(A) / metric(B); "tie" when it contains 1, else A is "lower" or
    "higher". The claim "<" (A lower) or ">" (A higher) agrees or disagrees with a non-tie; a tie
    is a tie. The claim "~" (A no worse than B within noise) agrees with a tie and disagrees with
    either side. Fewer seeds: "untested"."""
    if len(ratios) < MIN_SEEDS:
        return {"verdict": f"untested (fewer than {MIN_SEEDS} seeds)", "outcome": None, "interval": None}
    centre, lo, hi = ratio_interval(ratios)
    outcome = "tie" if lo <= 1 <= hi else ("lower" if hi < 1 else "higher")
    if expected == "~":
        result = "agrees" if outcome == "tie" else "disagrees"
    elif outcome == "tie":
        result = "tie"
    else:
        result = "agrees" if (outcome == "lower") == (expected == "<") else "disagrees"
    return {"verdict": result, "outcome": outcome, "ratio": centre, "interval": [lo, hi]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/pareto")
    p.add_argument("--tokens", type=int, default=80_000)
    p.add_argument("--eval-tokens", type=int, default=8_192)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--d-sae", type=int, default=256)
    p.add_argument("--report-only", action="store_true", help="recompute the verdicts from --out/pareto.json")
    args = p.parse_args()
    t0 = time.perf_counter()
    if args.report_only:
        with open(os.path.join(args.out, "pareto.json")) as f:
            report(args, json.load(f)["series_per_seed"], t0)
        return
    store = os.path.join(args.out, "store.zarr")
    per_seed = []
    for seed in range(args.seeds):
        results = run_demo(os.path.join(args.out, f"seed{seed}"), tokens=args.tokens, eval_tokens=args.eval_tokens,
                           sweeps=SWEEPS, seed=seed, store=store, local=LOCAL, d_sae=args.d_sae)
        series: dict[str, list] = {}
        for r in results:
            series.setdefault(series_label(r), []).append(
                {"name": r["name"], "l0": r["l0"], "ce_increase": r["ce_increase"], "kl": r["kl"],
                 "alive": r["alive"], "nmse_nobos": r["nmse_nobos"], "grad_mode": r.get("grad_mode"),
                 "downstream_mse": r["downstream_mse"], "downstream_mse_ln": r["downstream_mse_ln"]})
        per_seed.append({k: sorted(v, key=lambda q: q["l0"]) for k, v in series.items()})
        report(args, per_seed, t0)   # after every seed, so a cut-off run still leaves its data


def report(args, per_seed, t0):
    comparisons = {}
    for a, b, metric, expected in CLAIMS:
        rows = []
        for l0 in L0_GRID:
            ratios = []
            for series in per_seed:
                ca = interp_ce([(q["l0"], q[metric]) for q in series.get(a, [])], l0)
                cb = interp_ce([(q["l0"], q[metric]) for q in series.get(b, [])], l0)
                if ca is not None and cb is not None and cb > 0:
                    ratios.append(ca / cb)
            if ratios and len(ratios) == len(per_seed):
                rows.append({"l0": l0, "ratios": ratios, "min": min(ratios), "max": max(ratios),
                             **verdict(ratios, expected)})
        # and at A's own sweep points (B interpolated there): works when the L0 ranges barely overlap
        names = sorted({q["name"] for series in per_seed for q in series.get(a, [])})
        for name in names:
            ratios, l0s = [], []
            for series in per_seed:
                qa = next((q for q in series.get(a, []) if q["name"] == name), None)
                cb = None if qa is None else interp_ce([(q["l0"], q[metric]) for q in series.get(b, [])], qa["l0"])
                if qa is not None and cb is not None and cb > 0 and qa[metric] is not None:
                    ratios.append(qa[metric] / cb)
                    l0s.append(qa["l0"])
            if ratios and len(ratios) == len(per_seed):
                rows.append({"at": name, "l0": float(np.mean(l0s)), "ratios": ratios, "min": min(ratios),
                             "max": max(ratios), **verdict(ratios, expected)})
        comparisons[f"{a} vs {b}: {metric} {expected}"] = rows
    out = {"seeds_done": len(per_seed), "tokens": args.tokens, "eval_tokens": args.eval_tokens,
           "d_sae": args.d_sae, "local": LOCAL, "sweeps": [[f, a, e] for f, a, e in SWEEPS],
           "series_per_seed": per_seed, "comparisons": comparisons, "seconds": time.perf_counter() - t0}
    with open(os.path.join(args.out, "pareto.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"--- {len(per_seed)} seed(s), {time.perf_counter() - t0:.0f} s")
    for claim, rows in comparisons.items():
        print(claim)
        for r in rows:
            where = f"{r['at']} (L0 {r['l0']:.1f})" if "at" in r else f"L0 {r['l0']:>3}"
            ci = f"{r['ratio']:.2f}, 95% CI [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]" if r["interval"] \
                else f"seeds {r['min']:.2f}-{r['max']:.2f}"
            print(f"  {where}: ratio {ci}, {len(r['ratios'])} seeds  {r['verdict']}")

if __name__ == "__main__":
    main()
