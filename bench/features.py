"""`evaluate features`: the statistics pass against a bare pass, and peak memory as the store grows.

The bare pass reads the same rows, encodes them and keeps the exact top N of every latent (what
any dashboard must do); the statistics pass also keeps density, mean, max and the log histogram.
Both run here in the same process on the same store, best of --repeats, and we print bare/stats
(the goal: >= 0.8). Then the whole command (3 passes, page written) runs in a child process on
a store of --rows and one of 4 x --rows, with the same shuffle window (a harvest's is fixed by
--shuffle-window, not by the store's size), and we print each child's peak RSS: it should not grow
with the store.

    python bench/features.py --rows 32768                      # CPU: 4096 latents
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

from common import report  # bench/ is the script directory

SITE = "blocks.0.resid_pre"


def synthetic_store(path: str, d: int, rows: int, window_seqs: int, ctx: int = 128) -> None:
    """Sparse combinations of a random dictionary, fp16, in shuffle windows of a fixed size (as a
    harvest's --shuffle-window is: it does not grow with the store), unlike common.synthetic_store."""
    import math

    import numpy as np

    from sae_harvest.stores import StoreWriter

    rng = np.random.default_rng(0)
    n_seqs = rows // ctx
    dictionary = rng.normal(size=(4 * d, d)).astype(np.float32) / math.sqrt(d)
    w = StoreWriter.create(path, meta={"model": {"name": "synthetic"}}, sites={SITE: {"d": d, "encoding": "float16"}},
                           grads=None, ctx_len=ctx, n_seqs=n_seqs, window_seqs=window_seqs)
    for win in range(-(-n_seqs // window_seqs)):
        seqs = np.arange(win * window_seqs, min((win + 1) * window_seqs, n_seqs))
        n = len(seqs) * ctx
        codes = (rng.random((n, 4 * d), dtype=np.float32) < 0.02) * rng.random((n, 4 * d), dtype=np.float32)
        perm = rng.permutation(n)
        w.write_window(win, rng.integers(0, 1000, (len(seqs), ctx)), np.repeat(seqs, ctx)[perm],
                       np.tile(np.arange(ctx), len(seqs))[perm], {SITE: (codes @ dictionary * 10)[perm]})
    w.finish(n_seqs)


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
    ap.add_argument("--window-seqs", type=int, default=128, help="shuffle window (sequences of 128), both stores")
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
        synthetic_store(store_path, args.d, args.rows, args.window_seqs)
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
                synthetic_store(path, args.d, rows, args.window_seqs)
                out = subprocess.run([sys.executable, __file__, "--child", "--store", path, "--sae", sae_path,
                                      "--out", os.path.join(tmp, f"out{rows}"), "--block-rows", str(args.block_rows),
                                      "--device", args.device], capture_output=True, text=True, check=True)
                runs.append({"rows": rows, **json.loads(out.stdout.strip().splitlines()[-1])})
            result["whole_command"] = runs
            result["peak_rss_ratio_4x_rows"] = runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    report(result, args.json)


if __name__ == "__main__":
    main()
