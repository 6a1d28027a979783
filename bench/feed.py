"""The training feed over compressed stores: each `--compressor` against the uncompressed store.

One synthetic store per compressor (`common.synthetic_store`: the same rows, so the same values,
in every store), written by the store writer as `harvest run --compressor C` writes them. Each
side is the trainer's feed (`train.feeds.StoreFeed`: random blocks, read-ahead threads,
position-0 rows and held-out sequences dropped, values as stored) over one epoch; the rate is
*delivered* (uncompressed) bytes per second, so the ratio to `none` is what a compressor costs or
gains the trainer. Page cache warm (every store is read once first): this measures decoding on
the CPU, the case where the disk does not bind; where it does, the compression ratio printed is
the most a compressor can gain. Rates per wall second and per CPU second of the process (on a
shared box other processes' load moves the first far more than the second). Repeats alternate the
stores; medians reported.

    python bench/feed.py                                 # 256k rows x 256 fp16, every compressor
    python bench/feed.py --encoding bfloat16 --compressors none,zstd-1
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from common import report, synthetic_store
from sae_harvest.stores import open_store
from sae_harvest.stores.chunk_codecs import COMPRESSORS
from sae_harvest.train.feeds import StoreFeed

SITE = "blocks.0.resid_pre"


def stored_bytes(path: str) -> int:
    root = os.path.join(path, "acts", SITE)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files
               if f != "zarr.json")


def feed_rate(path: str, batch: int) -> tuple[float, float]:
    """Delivered bytes per wall second and per CPU second (all the process's threads) of one
    epoch of the trainer's feed."""
    store = open_store(path)
    feed = StoreFeed(store, SITE, batch, seed=0, grads=False, exclude_pos0=True, pin=False)
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    steps = (store.n_rows * 9 // 10) // batch       # < one epoch of the training rows
    for _, b in zip(range(steps), feed):
        n += b.acts.numel() * b.acts.element_size()
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256 * 1024)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--encoding", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--compressors", default=",".join(COMPRESSORS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="keep the stores here (reused when present)")
    p.add_argument("--json")
    args = p.parse_args()
    names = args.compressors.split(",")
    if "none" not in names:
        names = ["none"] + names
    tmp = args.dir or tempfile.mkdtemp(prefix="bench-feed-")
    stores, rates = {}, {c: [] for c in names}
    for c in names:
        stores[c] = os.path.join(tmp, f"{c}-{args.encoding}-{args.rows}-{args.d}.zarr")
        if not os.path.exists(stores[c]):
            t0 = time.perf_counter()
            synthetic_store(stores[c], args.d, args.rows, compressor=c, encoding=args.encoding)
            print(f"{c}: written in {time.perf_counter() - t0:.1f} s", flush=True)
        feed_rate(stores[c], args.batch_size)        # warm the page cache
    for _ in range(args.repeats):
        for c in names:
            rates[c].append(feed_rate(stores[c], args.batch_size))
    raw = stored_bytes(stores["none"])
    med = {c: statistics.median(x[0] for x in v) for c, v in rates.items()}
    cpu = {c: statistics.median(x[1] for x in v) for c, v in rates.items()}
    result = {"rows": args.rows, "d": args.d, "encoding": args.encoding, "batch_size": args.batch_size,
              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "compression_ratio": {c: raw / stored_bytes(stores[c]) for c in names},
              "delivered_GiB_s": {c: v / 2**30 for c, v in med.items()},
              "ratio_to_none": {c: v / med["none"] for c, v in med.items()},
              "repeats_ratio_to_none": {c: [round(x[0] / y[0], 3) for x, y in zip(rates[c], rates["none"])]
                                        for c in names},
              # per CPU second: the decoding work, which other processes' load moves less than wall time
              "delivered_GiB_per_cpu_s": {c: v / 2**30 for c, v in cpu.items()},
              "cpu_ratio_to_none": {c: v / cpu["none"] for c, v in cpu.items()},
              "repeats_cpu_ratio_to_none": {c: [round(x[1] / y[1], 3) for x, y in zip(rates[c], rates["none"])]
                                            for c in names}}
    report(result, args.json)
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
