"""SAE stitching (Leask et al. 2024, sec. 4) over several seeds and size pairs on the offline default model.

Per seed, SAEs of each size are trained on the same store, each size with its own seed (seed x 1000
+ d_sae: no two SAEs of a pair share initial rows), then `evaluate stitch` runs for each adjacent pair
(small -> 2x larger) at each cosine threshold on the store's held-out sequences; the summaries are
collected and reported as mean ± standard deviation over seeds, with the overlap of each pair: the
share of the large SAE's latents that match a small latent (reconstruction latents) and of the small
SAE's latents that some large latent matches. The paper's claim (adding the novel latents lowers
MSE, swapping groups interpolates smoothly) presupposes that the pair overlaps: a large SAE that
mostly re-learns the small one's latents plus a few new ones.

    python bench/stitch_seeds.py --store STORE.zarr --out bench-out/stitch   # ~10 min on 2 CPU cores

The defaults reproduce the first run (docs/results.md), where the larger SAEs came out worse; the
fair rerun (a 600k-token store, one lr for all sizes, 3 epochs, 64 -> 128 -> 256) is

    python bench/stitch_seeds.py --store STORE600K.zarr --out bench-out/stitch-fair --sizes 64,128,256 \
        --lr 8e-3 --epochs 3

The paper's regime (Leask et al.: L1-ReLU GPT-2 SAEs of 768 to 98,304 latents at d = 768, doubling):
ReLU/L1 SAEs at least 8x overcomplete, at doubling sizes (d = 128 here: 1024 -> 2048 -> 4096):

    python bench/stitch_seeds.py --store STORE.zarr --out bench-out/stitch-paper --paper-regime --seeds 5
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

KEYS = ("large_matched", "small_matched", "n_novel", "n_reconstruction", "n_groups", "n_orphans", "mse_small", "mse_after_novel", "mse_after_swaps",
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
    p.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: up to 16384 of the "
                                                               "store's held-out ones)")
    p.add_argument("--arch", default="topk", choices=("topk", "relu"))
    p.add_argument("--l1", type=float, default=300.0, help="--arch relu: the L1 coefficient (every size)")
    p.add_argument("--paper-regime", action="store_true",
                   help="ReLU/L1 SAEs at 8x, 16x, 32x the site's width (overrides --arch and --sizes)")
    p.add_argument("--ce-points", type=int, default=3)
    args = p.parse_args()
    if args.paper_regime:
        from sae_harvest.stores import open_store
        d = open_store(args.store).width(SITE)
        args.arch, args.sizes = "relu", f"{8 * d},{16 * d},{32 * d}"
    sizes = [int(s) for s in args.sizes.split(",")]
    name = f"topk_k{args.k}" if args.arch == "topk" else f"relu_l1-{args.l1:g}"
    sweep = {"k": (args.k,)} if args.arch == "topk" else {"l1": (args.l1,)}
    thresholds = [float(t) for t in args.thresholds.split(",")]
    t0 = time.perf_counter()
    runs = []
    for seed in range(args.seeds):
        for d_sae in sizes:
            out = os.path.join(args.out, f"seed{seed}", f"{args.arch}-{d_sae}")
            if not os.path.exists(os.path.join(out, name, "cfg.json")):
                wall, cpu = time.perf_counter(), time.process_time()
                fit(TrainConfig(out=out, store=args.store, site=SITE, arch=args.arch, d_sae=d_sae, **sweep,
                                batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                                seed=seed * 1000 + d_sae, device="cpu",   # independent initialisations
                                checkpoint_every=10**9, log_every=50), overwrite=True, progress=False)
                print(f"seed {seed}: trained {args.arch} d_sae {d_sae}: {time.perf_counter() - wall:.1f} s "
                      f"(CPU {time.process_time() - cpu:.1f} s)", flush=True)
        for small, large in zip(sizes, sizes[1:]):
            for theta in thresholds:
                wall, cpu = time.perf_counter(), time.process_time()
                doc = run_stitch(StitchConfig(
                    small=os.path.join(args.out, f"seed{seed}", f"{args.arch}-{small}", name),
                    large=os.path.join(args.out, f"seed{seed}", f"{args.arch}-{large}", name),
                    store=args.store, tokens=args.tokens, ce_points=args.ce_points, threshold=theta,
                    device="cpu"), progress=False).to_dict()
                summary = doc["summary"]
                overlap = {"large_matched": summary["n_reconstruction"] / large,   # reconstruction latents
                           "small_matched": 1 - summary["n_orphans"] / small}      # small latents some large one matches
                runs.append({"seed": seed, "pair": f"{small}->{large}", "threshold": theta, **summary, **overlap,
                             "eval_tokens": doc.get("eval_tokens")})
                print(f"seed {seed} {small}->{large} theta {theta}: " +
                      ", ".join(f"{k} {doc['summary'].get(k)}" for k in ("n_novel", "mse_small", "mse_after_novel",
                                                                          "mse_large")) +
                      f"; {time.perf_counter() - wall:.1f} s (CPU {time.process_time() - cpu:.1f} s)", flush=True)
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
