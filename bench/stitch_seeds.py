"""SAE stitching (Leask et al. 2024, sec. 4) over several seeds and size pairs on the offline default model.

Per seed, TopK SAEs (k = 16) of each size are trained on the same store (seeded init and batch order),
then `evaluate stitch` runs for each adjacent pair (small -> 2x larger) at each cosine threshold;
the summaries are collected and reported as mean ± standard deviation over seeds.

    python bench/stitch_seeds.py --store STORE.zarr --out bench-out/stitch   # ~10 min on 2 CPU cores

The defaults reproduce the first run (docs/results.md), where the larger SAEs came out worse; the
fair rerun (a 600k-token store, one lr for all sizes, 3 epochs, 64 -> 128 -> 256) is

    python bench/stitch_seeds.py --store STORE600K.zarr --out bench-out/stitch-fair --sizes 64,128,256 \
        --lr 8e-3 --epochs 3
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from sae_harvest.evaluate.demo import SITE
from sae_harvest.evaluate.stitch import StitchConfig, run_stitch
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit

KEYS = ("n_novel", "n_reconstruction", "n_groups", "n_orphans", "mse_small", "mse_after_novel", "mse_after_swaps",
        "mse_large", "l0_small", "l0_after_novel", "novel_steps_lowering_mse", "swap_steps_lowering_mse",
        "largest_step_mse_increase_rel", "novel_alone_lowering_mse", "reconstruction_alone_raising_mse",
        "ce_increase_small", "ce_increase_after_novel", "ce_increase_large")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="a store of the offline default model at " + SITE)
    p.add_argument("--out", default="bench-out/stitch")
    p.add_argument("--sizes", default="128,256,512")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every size (default: TopK's, "
                                                           "2e-4/sqrt(d_sae/2^14), lower for larger SAEs)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--thresholds", default="0.7,0.4")
    p.add_argument("--tokens", type=int, default=8192, help="evaluation tokens")
    p.add_argument("--ce-points", type=int, default=3)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    t0 = time.perf_counter()
    runs = []
    for seed in range(args.seeds):
        for d_sae in sizes:
            out = os.path.join(args.out, f"seed{seed}", f"topk-{d_sae}")
            if not os.path.exists(os.path.join(out, f"topk_k{args.k}", "cfg.json")):
                fit(TrainConfig(out=out, store=args.store, site=SITE, arch="topk", k=(args.k,), d_sae=d_sae,
                                batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, seed=seed,
                                device="cpu",
                                checkpoint_every=10**9, log_every=50), overwrite=True, progress=False)
        for small, large in zip(sizes, sizes[1:]):
            for theta in thresholds:
                doc = run_stitch(StitchConfig(
                    small=os.path.join(args.out, f"seed{seed}", f"topk-{small}", f"topk_k{args.k}"),
                    large=os.path.join(args.out, f"seed{seed}", f"topk-{large}", f"topk_k{args.k}"),
                    store=args.store, tokens=args.tokens, ce_points=args.ce_points, threshold=theta,
                    device="cpu"), progress=False)
                runs.append({"seed": seed, "pair": f"{small}->{large}", "threshold": theta, **doc["summary"]})
                print(f"seed {seed} {small}->{large} theta {theta}: " +
                      ", ".join(f"{k} {doc['summary'].get(k)}" for k in ("n_novel", "mse_small", "mse_after_novel",
                                                                          "mse_large")), flush=True)
        with open(os.path.join(args.out, "stitch_seeds.json"), "w") as f:
            json.dump({"args": vars(args), "runs": runs, "seconds": time.perf_counter() - t0}, f, indent=2)
    print(f"--- {args.seeds} seed(s), {time.perf_counter() - t0:.0f} s; mean ± sd over seeds")
    # the experiment's premise: the larger SAE of each pair reconstructs better, in every seed
    for small, large in zip(sizes, sizes[1:]):
        rows = [r for r in runs if r["pair"] == f"{small}->{large}" and r["threshold"] == thresholds[0]]
        ratio = np.array([r["mse_large"] / r["mse_small"] for r in rows])
        print(f"premise {small}->{large}: MSE(large) / MSE(small) per seed {np.round(ratio, 3).tolist()}: "
              + ("holds in every seed" if (ratio < 1).all() else "FAILS in at least one seed"))
    for small, large in zip(sizes, sizes[1:]):
        for theta in thresholds:
            rows = [r for r in runs if r["pair"] == f"{small}->{large}" and r["threshold"] == theta]
            print(f"{small}->{large}, theta {theta}:")
            for key in KEYS:
                vals = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
                if len(vals):
                    print(f"  {key:>34}: {vals.mean():.4g} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.2g}  "
                          f"[{vals.min():.4g}, {vals.max():.4g}]")


if __name__ == "__main__":
    main()
