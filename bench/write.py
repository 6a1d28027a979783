"""Store writer throughput: `StoreWriter.write_window` against writing the same bytes raw.

A harvest hands each shuffle window to the writer; on a GPU the writer, not the model, bound the
harvest (docs/benchmarks.md). This times the writer alone on windows shaped like the GPU bench's
(sites x acts+grads, fp16), against (a) a raw baseline in the same run: the same number of bytes
written to one file per shard with plain `write` calls, and (b) the previous writer: zarr's chunk
writes, then every shard read back to hash it (selected by making the direct codec decline the
arrays, which is exactly the fallback the writer takes for pipelines it does not write itself).
Throughput is bytes of activations+gradients per second; repeats alternate; medians reported.

    python bench/write.py                              # 2 sites x 256 wide, 4 windows of 64k rows
    python bench/write.py --sites 4 --d 768 --window-rows 131072 --windows 4
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from sae_harvest.stores import StoreWriter, layout

from common import report  # bench/ is the script directory


def windows(args):
    rng = np.random.default_rng(0)
    ctx = 128
    seqs = args.window_rows // ctx
    values = rng.standard_normal((args.window_rows, args.d)).astype(np.float16)
    for w in range(args.windows):
        arrays = {f"blocks.{i}.resid_pre": values for i in range(args.sites)}
        yield (w, np.zeros((seqs, ctx), np.int32), np.repeat(np.arange(seqs) + w * seqs, ctx).astype(np.int32),
               np.tile(np.arange(ctx, dtype=np.int32), seqs), arrays, arrays)


def store_seconds(root: str, args, direct: bool, compressor: str | None = None) -> tuple[float, int]:
    path = os.path.join(root, "s.zarr")
    shutil.rmtree(path, ignore_errors=True)
    sites = {f"blocks.{i}.resid_pre": {"d": args.d, "encoding": "float16"} for i in range(args.sites)}
    w = StoreWriter.create(path, meta={"model": {"name": "bench"}}, sites=sites,
                           grads={"encoding": "float16", "definition": "bench"}, ctx_len=128,
                           n_seqs=args.windows * args.window_rows // 128, window_seqs=args.window_rows // 128,
                           compressor=compressor)
    if not direct:
        w._plain = {name: None for name in w._plain}
    n = 0
    t0 = time.perf_counter()
    for window, tokens, seq, pos, acts, grads in windows(args):
        w.write_window(window, tokens, seq, pos, acts, grads)
        n += sum(v.nbytes for v in acts.values()) + sum(v.nbytes for v in grads.values())
    dt = time.perf_counter() - t0
    w.close()
    return dt, n


def raw_seconds(root: str, args, shard_bytes: int) -> tuple[float, int]:
    path = os.path.join(root, "raw")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    n = 0
    t0 = time.perf_counter()
    for window, _, _, _, acts, grads in windows(args):
        for kind, arrays in (("a", acts), ("g", grads)):
            for site, values in arrays.items():
                data = memoryview(values).cast("B")
                for i in range(0, len(data), shard_bytes):
                    with open(os.path.join(path, f"{kind}{site}.{window}.{i}"), "wb") as f:
                        f.write(data[i:i + shard_bytes])
                n += values.nbytes
    return time.perf_counter() - t0, n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--window-rows", type=int, default=65536)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="where to write (default: a temporary folder)")
    p.add_argument("--compressors", default="", help="also the store writer with these --compressor values "
                   "(comma list; rates in uncompressed bytes)")
    p.add_argument("--json")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench-write-", dir=args.dir)
    _, shard_rows = layout.row_geometry(args.window_rows, 2 * args.d)
    runs = [("raw write", lambda: raw_seconds(root, args, shard_rows * 2 * args.d)),
            ("store writer", lambda: store_seconds(root, args, True)),
            ("zarr + read-back (old)", lambda: store_seconds(root, args, False))]
    runs += [(f"store writer, {c}", lambda c=c: store_seconds(root, args, True, c))
             for c in args.compressors.split(",") if c]
    sides = {name: [] for name, _ in runs}
    try:
        for _ in range(args.repeats):
            for name, run in runs:
                t, n = run()
                sides[name].append(n / t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) / 2**30 for k, v in sides.items()}
    result = {"args": vars(args), "cpus": os.cpu_count(), "GiB_s": med,
              "ratio_to_raw": {k: v / med["raw write"] for k, v in med.items()},
              "repeats": {k: [x / 2**30 for x in v] for k, v in sides.items()}}
    report(result, args.json)


if __name__ == "__main__":
    main()
