"""What the held-out split costs the training feed: the block reader over the training sequences'
rows against the same reader over every row (no split filter), in the same run.

Both sides drop position-0 rows and return values as stored (the trainer's `decode=False` feed);
"train" also drops every row of a held-out sequence (`seq % every == 0`), found through `rows/seq`
block by block. Rows are shuffled across sequences within a window, so a held-out row falls every
~`every` rows of a block. Two figures per side: one epoch on a freshly opened store (the filter
reads `rows/pos` and `rows/seq` of every block) and a second epoch on the same open (what later
epochs cost: with the per-open kept-row cache they read neither). Rates are delivered bytes/s and
rows scanned/s (train delivers 1/every fewer rows by design), per wall second and per CPU second of
the process (all its threads: on a shared box other processes' load moves the wall time, much
less the work); ratios are train / all within one repeat; repeats alternate the sides; medians.

    python bench/split.py                          # 256k rows x 256 fp16, every 20th sequence held out
    python bench/split.py --store /tmp/s.zarr      # reuse (or keep) the synthetic store
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from common import report, synthetic_store
from sae_harvest.stores import open_store

SITE = "blocks.0.resid_pre"


def run_side(path: str, seqs: str, batch: int) -> dict:
    """Seconds and delivered bytes of a first and a second epoch on one open of the store (two
    one-epoch iterators over the same open, so each is timed alone; the second is what a later
    epoch costs)."""
    store = open_store(path)
    res = {}
    for name in ("first", "second"):
        it = store.batches(SITE, batch, seqs=seqs, seed=0, exclude_pos0=True, decode=False, epochs=1,
                           drop_last=False)
        t0, c0, nbytes = time.perf_counter(), time.process_time(), 0
        for b in it:
            nbytes += b["acts"][SITE].nbytes
        res[name] = (time.perf_counter() - t0, time.process_time() - c0, nbytes)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256 * 1024)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--store", help="synthetic store to use (made there if absent, and kept)")
    p.add_argument("--json")
    args = p.parse_args()
    tmp = None if args.store else tempfile.mkdtemp(prefix="bench-split-")
    path = args.store or os.path.join(tmp, "s.zarr")
    if not os.path.exists(path):
        synthetic_store(path, args.d, args.rows)
    store = open_store(path)
    run_side(path, "all", args.batch_size)          # warm the page cache
    sides = {(s, e): [] for s in ("train", "all") for e in ("first", "second")}
    scanned = store.n_rows                           # rows each epoch's blocks cover, both sides
    for _ in range(args.repeats):
        for seqs in ("train", "all"):
            for epoch, (t, cpu, nbytes) in run_side(path, seqs, args.batch_size).items():
                sides[(seqs, epoch)].append((nbytes / t, scanned / t, nbytes / cpu, scanned / cpu))
    result = {"rows": store.n_rows, "d": store.width(SITE), "every": store.split.every,
              "batch_size": args.batch_size, "repeats": args.repeats}
    for epoch in ("first", "second"):
        tr, al = sides[("train", epoch)], sides[("all", epoch)]
        result[f"{epoch} epoch"] = {
            "train_GiB_s": statistics.median(x[0] for x in tr) / 2**30,
            "all_GiB_s": statistics.median(x[0] for x in al) / 2**30,
            "ratio_delivered_bytes": statistics.median(a[0] / b[0] for a, b in zip(tr, al)),
            "ratio_rows_scanned": statistics.median(a[1] / b[1] for a, b in zip(tr, al)),
            "repeats_ratio_delivered": [round(a[0] / b[0], 3) for a, b in zip(tr, al)],
            # per CPU second of this process (all its threads): what the filter costs in work, which
            # other processes' load on a shared box does not change the way it changes wall time
            "cpu_ratio_delivered_bytes": statistics.median(a[2] / b[2] for a, b in zip(tr, al)),
            "cpu_ratio_rows_scanned": statistics.median(a[3] / b[3] for a, b in zip(tr, al)),
            "repeats_cpu_ratio_delivered": [round(a[2] / b[2], 3) for a, b in zip(tr, al)]}
    report(result, args.json)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
