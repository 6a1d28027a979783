"""Where a harvest's threads spend their time: a sampling profile (every 2 ms, sys._current_frames)
of one in-process harvest, for finding what keeps it from the bare loop's rate.

    python bench/profile_harvest.py                                   # offline default model, CPU
    python bench/profile_harvest.py --model gpt2-small-random --device cuda --ctx-len 1024 --tokens 262144

Prints, per thread (main, tokenize, store-writer, shard pool), the share of samples whose innermost
frame of this project (or, failing that, the innermost frame) is each function and line.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time

from sae_harvest.harvest.default_model import OFFLINE_DATASET, OFFLINE_MODEL, resolve_dataset, resolve_model
from sae_harvest.harvest.run import HarvestConfig, harvest

from common import four_sites, gpt2_small_random


def where(frame) -> str:
    inner = frame
    while frame is not None:
        if "sae_harvest" in frame.f_code.co_filename or "/harvest/" in frame.f_code.co_filename \
                or "/stores/" in frame.f_code.co_filename:
            break
        frame = frame.f_back
    f = frame or inner
    leaf = f"{os.path.basename(inner.f_code.co_filename)}:{inner.f_code.co_name}" if f is not inner else ""
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno} {f.f_code.co_name}" + (f" > {leaf}" if leaf else "")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=OFFLINE_MODEL)
    p.add_argument("--dataset", default=OFFLINE_DATASET)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shuffle-window", type=int, default=None, help="default: tokens / 4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-profile-")
    model = gpt2_small_random(tmp) if args.model == "gpt2-small-random" else resolve_model(args.model)
    from transformers import AutoConfig
    warm = HarvestConfig(out=os.path.join(tmp, "warm.zarr"), model=model, dataset=resolve_dataset(args.dataset),
                         sites=four_sites(AutoConfig.from_pretrained(model).num_hidden_layers), grads=True,
                         tokens=args.tokens // 4, ctx_len=args.ctx_len, batch_size=args.batch_size,
                         device=args.device, shuffle_window=args.tokens // 8)
    harvest(warm, progress=False)   # first-call costs (dataset cache, allocator) out of the profile
    cfg = dataclasses.replace(warm, out=os.path.join(tmp, "s.zarr"), tokens=args.tokens,
                              shuffle_window=args.shuffle_window or args.tokens // 4)
    samples: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    stop = threading.Event()
    def sample():
        me = threading.get_ident()
        while not stop.is_set():
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident != me:
                    name = names.get(ident, "?")
                    samples[name.split("_")[0] if name.startswith("ThreadPool") else name][where(frame)] += 1
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    summary = harvest(cfg, progress=False)
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - t0
    print(f"harvest of {args.tokens:,} tokens: {seconds:.1f} s, {args.tokens / seconds:,.0f} tok/s; "
          f"waited {summary['waited']}")
    result = {"tokens": args.tokens, "seconds": seconds, "waited": summary["waited"], "threads": {}}
    for name, counter in sorted(samples.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counter.values())
        top, n = counter.most_common(1)[0]
        if n > 0.98 * total and any(w in top for w in ("wait", "_worker", "select")):
            continue     # an idle thread (the asyncio/zarr pools, the lease heartbeat, ...)
        print(f"-- {name}: {total} samples")
        result["threads"][name] = [(k, v / total) for k, v in counter.most_common(args.top)]
        for k, v in counter.most_common(args.top):
            print(f"  {100 * v / total:5.1f}%  {k}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
