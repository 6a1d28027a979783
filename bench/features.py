"""`evaluate features`: the statistics pass against a bare pass, and peak memory as the store grows.

The bare pass reads the same rows, encodes them and keeps the exact top N of every latent (what
any dashboard must do); the statistics pass also keeps density, mean, max and the log histogram.
Both run here in the same process on the same store, best of --repeats, and we print bare/stats
(the goal: >= 0.8). Then the whole command (3 passes, page written) runs in a child process on
a store of --rows and one of 4 x --rows, and we print each child's peak RSS: it should not grow
with the store.

    python bench/features.py                                   # CPU: 4096 latents, 65,536 rows
    python bench/features.py --device cuda --d-sae 24576 --rows 10_000_000 --d 768 --no-memory
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from sae_harvest.evaluate.features import blocks, encode
from sae_harvest.evaluate.features_stats import LatentStats
from sae_harvest.stores import open_store
from sae_harvest.stores.cli import pick_device
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_io import save_sae

from common import report, synthetic_store  # bench/ is the script directory

SITE = "blocks.0.resid_pre"


def one_pass(store, sae, dev, block: int, top: int, bare: bool) -> float:
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    stats = LatentStats(sae.cfg.d_sae, top, dev)
    sync()
    t0 = time.perf_counter()
    for x, _, idx, _, _ in blocks(store, SITE, (0, store.n_rows), block, False, False):
        stats.add(encode(sae, x, None, dev), torch.from_numpy(idx).to(dev), top_only=bare)
    sync()
    return time.perf_counter() - t0


def child(args) -> None:
    """One whole `evaluate features` run; prints its peak RSS (MiB) as JSON."""
    from sae_harvest.evaluate.features import FeaturesConfig, run_features

    t0 = time.perf_counter()
    run_features(FeaturesConfig(store=args.store, saes=(args.sae,), out=args.out, model="stdlib-gpt2",
                                block_rows=args.block_rows, device=args.device), progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--d", type=int, default=128, help="site width (128: the offline default model, whose "
                                                       "unembedding the memory runs use)")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32, help="TopK SAE's k")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--block-rows", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-memory", action="store_true", help="skip the two whole-command runs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--sae", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    dev = pick_device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "s.zarr")
        synthetic_store(store_path, args.d, args.rows)
        sae = make_sae(SAEConfig("topk", args.d, args.d_sae, k=args.k))
        sae_path = os.path.join(tmp, "sae")
        save_sae(sae, sae_path, extra_cfg={"hook_name": SITE})
        sae = sae.to(dev).eval()
        store = open_store(store_path)
        one_pass(store, sae, dev, args.block_rows, args.top, True)      # warm-up (page cache, kernels)
        bare, stats = [], []
        for _ in range(args.repeats):
            bare.append(one_pass(store, sae, dev, args.block_rows, args.top, True))
            stats.append(one_pass(store, sae, dev, args.block_rows, args.top, False))
        n = store.n_rows
        result = {"device": str(dev), "rows": n, "d": args.d, "d_sae": args.d_sae, "k": args.k,
                  "bare_rows_per_s": n / min(bare), "stats_rows_per_s": n / min(stats),
                  "ratio_stats_vs_bare": min(bare) / min(stats)}
        if not args.no_memory:
            runs = []
            for rows in (args.rows, 4 * args.rows):
                path = os.path.join(tmp, f"s{rows}.zarr")
                synthetic_store(path, args.d, rows)
                out = subprocess.run([sys.executable, __file__, "--child", "--store", path, "--sae", sae_path,
                                      "--out", os.path.join(tmp, f"out{rows}"), "--block-rows", str(args.block_rows),
                                      "--device", args.device], capture_output=True, text=True, check=True)
                runs.append({"rows": rows, **json.loads(out.stdout.strip().splitlines()[-1])})
            result["whole_command"] = runs
            result["peak_rss_ratio_4x_rows"] = runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    report(result, args.json)


if __name__ == "__main__":
    main()
