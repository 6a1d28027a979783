"""Pareto fronts of every architecture at one site of the offline default model.

Wider sweeps than the demo (same store, same training budget per SAE), then one evaluation of
all SAEs on the same held-out tokens. Writes the Pareto data as JSON, a plot, and prints the
comparisons that docs/results.md discusses (each paper's claim against what we measured).

    python bench/pareto.py --out bench-out/pareto       # ~15 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from sae_harvest.evaluate.demo import run_demo
from sae_harvest.evaluate.report import series_label

SWEEPS = [
    ("relu", "relu", {"l1": (10.0, 30.0, 100.0, 300.0, 1000.0)}),
    ("gated", "gated", {"l1": (0.3, 1.0, 3.0, 10.0, 30.0)}),
    ("topk", "topk", {"k": (4, 8, 16, 32, 64)}),
    ("batchtopk", "batchtopk", {"k": (4, 8, 16, 32, 64)}),
    ("gtopk", "gtopk", {"k": (4, 8, 16, 32, 64)}),
    ("jumprelu", "jumprelu", {"l1": (0.03, 0.1, 0.3, 1.0, 3.0), "threshold_init": 0.1}),
    ("matryoshka", "matryoshka_batchtopk", {"k": (4, 8, 16, 32, 64)}),
    ("e2e", "relu", {"loss": "e2e", "l1": (0.1, 0.3, 1.0, 3.0), "batch_size": 2048, "lr": 1e-3, "epochs": None,
                     "init": "relu/relu_l1-30"}),
]


def interp_ce(points, l0):
    """CE increase of a series at a given L0, by log-linear interpolation (None outside its range)."""
    pts = sorted(points)
    xs, ys = np.log([p[0] for p in pts]), [p[1] for p in pts]
    if not (xs[0] <= np.log(l0) <= xs[-1]):
        return None
    return float(np.interp(np.log(l0), xs, ys))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/pareto")
    p.add_argument("--tokens", type=int, default=250_000)
    p.add_argument("--eval-tokens", type=int, default=32_768)
    args = p.parse_args()
    results = run_demo(args.out, tokens=args.tokens, eval_tokens=args.eval_tokens, sweeps=SWEEPS)
    series: dict[str, list] = {}
    for r in results:
        series.setdefault(series_label(r), []).append((r["l0"], r["ce_increase"], r["alive"], r["name"]))
    pareto = {name: sorted(pts) for name, pts in series.items()}
    comparisons = {}
    for a, b in (("e2e", "relu"), ("gated", "relu"), ("batchtopk", "topk"), ("gtopk+grad", "topk"),
                 ("jumprelu", "gated"), ("matryoshka_batchtopk", "batchtopk")):
        rows = []
        for l0 in (8, 16, 32, 64):
            ca = interp_ce([(x, y) for x, y, *_ in pareto.get(a, [])], l0)
            cb = interp_ce([(x, y) for x, y, *_ in pareto.get(b, [])], l0)
            if ca is not None and cb is not None:
                rows.append({"l0": l0, a: ca, b: cb, "ratio": ca / cb})
        comparisons[f"{a} vs {b}"] = rows
    out = {"series": pareto, "comparisons": comparisons}
    with open(os.path.join(args.out, "pareto.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(comparisons, indent=2))


if __name__ == "__main__":
    main()
