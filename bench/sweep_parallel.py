"""A sweep on N ranks: data parallel (every rank holds every SAE, reads 1/N of each batch, gradients
all-reduced) against `--sweep-parallel` (SAE i on rank i mod N, every rank reads every batch), and
against one process, in the same run.

Each side is a `train fit` launch (torchrun for N ranks) over the same store and sweep; its rate is
marginal (T and 2T tokens, rate = T / wall-time difference), so process start-up, store opening
and the normalisation sample cancel out. Throughput is sweep tokens per second (tokens each SAE of
the sweep trains on, per second of wall time). Repeats alternate; medians reported.

    python bench/sweep_parallel.py                      # 4 TopK SAEs 256 -> 2048, 2 ranks, CPU (gloo)
    python bench/sweep_parallel.py --nproc 8 --device cuda --d-in 768 --d-sae 24576 --tokens 20000000
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from common import synthetic_store, report


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def launch_seconds(mode: str, args, store: str, out: str, tokens: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    fit = ["-m", "sae_harvest.train", "fit", "--store", store, "--out", out, "--arch", "topk",
           "--k", ",".join(str(k) for k in args.k), "--d-sae", str(args.d_sae), "--batch-size", str(args.batch_size),
           "--tokens", str(tokens), "--device", args.device,
           "--checkpoint-every", "1000000000", "--quiet"]
    env = dict(os.environ)
    if mode == "one process":
        cmd = [sys.executable, *fit]
        env["OMP_NUM_THREADS"] = str(args.threads * args.nproc)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_port()), *fit]
        if mode == "sweep parallel":
            cmd.append("--sweep-parallel")
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{mode} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", default="8,16,32,64", help="the sweep: one TopK SAE per k")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=262144, help="T: the runs train T and 2T tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    args.k = [int(k) for k in args.k.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench-sweep-")
    store = os.path.join(tmp, "s.zarr")
    synthetic_store(store, args.d_in, 2 * args.tokens + 131072)
    modes = ("one process", "data parallel", "sweep parallel")
    rates = {m: [] for m in modes}
    try:
        for _ in range(args.repeats):
            for mode in modes:
                t1 = launch_seconds(mode, args, store, os.path.join(tmp, "o"), args.tokens)
                t2 = launch_seconds(mode, args, store, os.path.join(tmp, "o"), 2 * args.tokens)
                rates[mode].append(len(args.k) * args.tokens / max(t2 - t1, 1e-9))
                print(f"{mode}: {rates[mode][-1]:,.0f} sweep tokens/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in rates.items()}
    result = {"args": vars(args), "cpus": os.cpu_count(), "sweep_tok_s": med,
              "ratio_to_one_process": {m: v / med["one process"] for m, v in med.items()}, "repeats": rates}
    report(result, args.json)


if __name__ == "__main__":
    main()
