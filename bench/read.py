"""Store feed throughput: the trainer's access pattern against reading the same shard files raw.

The feed side is exactly what `train fit` consumes: train.feeds.StoreFeed over the rows of the
store's training sequences (contiguous blocks in a seeded random order, read-ahead threads,
position-0 rows and held-out sequences filtered out per block; "every row" is the same block reader
without the held-out filter, as before the split), values
shipped as stored (fp16) and widened to float32 by the consumer as the trainer's `prepare` does
(on the device; here the CPU); on CUDA read straight into pinned buffers, and (the previous
path, for the ratio) copied into pinned memory on a thread after the read. "decode on host" is the old path: the
block reader decoding to float32 numpy before the trainer sees it. The raw side reads every shard
file of the site's activations with plain file reads (local) or s3fs cat (loopback S3, moto).
Throughput is stored bytes per second; repeats alternate; medians reported.

    python bench/read.py                       # 512k rows x 256 fp16 (256 MiB), local + loopback S3
    python bench/read.py --rows 1000000 --no-s3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from common import synthetic_store, report
from sae_harvest.stores import open_store
from sae_harvest.train.feeds import StoreFeed

SITE = "blocks.0.resid_pre"


def shard_files(store_path: str, fs=None) -> list[str]:
    root = f"{store_path}/acts/{SITE}"
    if fs is None:
        return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f != "zarr.json"]
    return [p for p in fs.find(root) if not p.endswith("zarr.json")]


def raw_seconds(files, fs=None) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    if fs is None:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                n += len(fh.read())
    else:
        for data in fs.cat(files).values():
            n += len(data)
    return time.perf_counter() - t0, n


def feed_seconds(store_path, batch, widen: bool, decode_on_host: bool, direct: bool = True) -> tuple[float, int]:
    store = open_store(store_path)
    steps = (store.n_rows - store.n_rows // store.ctx_len) // batch
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    n = 0
    if decode_on_host:
        it = store.batches(SITE, batch, seqs="train", seed=0, exclude_pos0=True)
        for i, b in zip(range(steps), it):
            x = torch.from_numpy(b["acts"][SITE])
            n += x.numel() * 2   # stored bytes
    else:
        feed = StoreFeed(store, SITE, batch, seed=0, grads=False, exclude_pos0=True, pin=cuda, direct=direct)
        for i, b in zip(range(steps), feed):
            x = b.acts
            if cuda:
                x = x.to("cuda", non_blocking=True)
            if widen:
                x = x.float()
            n += b.acts.numel() * b.acts.element_size()
        if cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def block_seconds(store_path, batch, seqs: str) -> tuple[float, int]:
    """The block reader alone over the training sequences' rows or over every row (no held-out
    filter, as before the split): what filtering held-out sequences through rows/seq costs, in the
    same run."""
    store = open_store(store_path)
    steps = (store.n_rows - store.n_rows // store.ctx_len) // batch
    t0 = time.perf_counter()
    n = 0
    for i, b in zip(range(steps), store.batches(SITE, batch, seqs=seqs, seed=0, exclude_pos0=True, decode=False)):
        n += b["acts"][SITE].nbytes
    return time.perf_counter() - t0, n


def measure(store_path, batch, repeats, fs=None) -> dict:
    files = shard_files(store_path, fs)
    raw_seconds(files, fs)   # warm the page cache / connections
    variants = [("feed (stored 16-bit)", False, False, True), ("feed + float32 on device", True, False, True),
                ("decode on host (old)", False, True, True)]
    if torch.cuda.is_available():   # read straight into pinned buffers (now) vs copied into them (before)
        variants.append(("feed, copied into pinned memory (old)", False, False, False))
    sides = {"raw": [], **{v[0]: [] for v in variants}, "blocks, training sequences": [],
             "blocks, every row (no split filter)": []}
    for _ in range(repeats):
        t, n = raw_seconds(files, fs)
        sides["raw"].append(n / t)
        for name, widen, host, direct in variants:
            t, n = feed_seconds(store_path, batch, widen, host, direct)
            sides[name].append(n / t)
        for name, seqs in (("blocks, training sequences", "train"), ("blocks, every row (no split filter)", "all")):
            t, n = block_seconds(store_path, batch, seqs)
            sides[name].append(n / t)
    med = {k: statistics.median(v) / 2**30 for k, v in sides.items()}
    return {"GiB_s": med, "ratio_to_raw": {k: v / med["raw"] for k, v in med.items()},
            "repeats": {k: [x / 2**30 for x in v] for k, v in sides.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512 * 1024)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-read-")
    store = os.path.join(tmp, "s.zarr")
    synthetic_store(store, args.d, args.rows)
    results = {"rows": args.rows, "d": args.d, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
               "local": measure(store, args.batch_size, args.repeats)}
    print(json.dumps(results["local"]["ratio_to_raw"], indent=1), flush=True)
    if not args.no_s3:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.s3server import s3_server
        import s3fs
        with s3_server() as bucket:
            fs = s3fs.S3FileSystem()
            fs.put(store, f"{bucket}/s.zarr", recursive=True)
            results["s3"] = measure(f"{bucket}/s.zarr", args.batch_size, args.repeats, fs)
    report(results, args.json)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
