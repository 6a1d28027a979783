"""A cross-layer transcoder's training step (train/clt.py) at a given shape: tokens/s and peak memory.

The step is the trainer's own (train.local._step on a train.runs.new_run: loss, backward, clipping,
fused Adam, dead-latent counts), on random inputs and targets already on the device, so it times the
CLT and not the store feed (bench/train.py times the feed). Per F (latents per layer) and arch: the
median over --repeats of --iters steps after --warmup, the peak device memory of those steps (CUDA:
max_memory_allocated; CPU: the process's peak resident set, which counts everything), and the
parameter count with, for --shard-decoders, the largest rank's share on 2, 4 and 8 ranks
(train/clt_shard.py's split).

    python bench/clt.py                                   # tiny, CPU
    python bench/clt.py --device cuda --layers 12 --d 768 --f 8192,24576 --batch-size 4096   # GPT-2 small
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from sae_harvest.train.clt_shard import layer_costs, split_layers
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.local import _step
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.runs import new_run

from common import report


def one(args, device, f: int, arch: str) -> dict:
    n, d, batch = args.layers, args.d, args.batch_size
    torch.manual_seed(0)
    sae_cfg = SAEConfig(arch=arch, d_in=n * d, d_sae=n * f, k=args.k, clt_layers=n, l1_coeff=args.l1)
    cfg = TrainConfig(out="unused", clt=True, arch=arch, batch_size=batch, device=device.type)
    clt = make_sae(sae_cfg)
    run = new_run(cfg, "clt", clt, {}, device)
    x = torch.randn(batch, n * d, device=device)
    y = torch.randn(batch, n * d, device=device)
    autocast = device.type == "cuda" and args.dtype == "bf16"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        _step(run, x, None, 1.0, cfg, 10**12, autocast, False, target=y)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        sync()
        times.append((time.perf_counter() - t0) / args.iters)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = clt.parameter_count()
    costs = layer_costs(n, d, f, arch == "jumprelu")
    assert sum(costs) == params
    shards = {}
    for ranks in (2, 4, 8):
        if ranks <= n:
            plan = split_layers(costs, ranks)
            shards[ranks] = {"layers": [[sl.start, sl.stop] for sl in plan],
                             "largest_rank_parameters": max(sum(costs[sl.start:sl.stop]) for sl in plan)}
    ms = statistics.median(times) * 1e3
    return {"arch": arch, "layers": n, "d": d, "f_per_layer": f, "k": args.k if arch == "topk" else None,
            "batch_size": batch, "dtype": args.dtype if device.type == "cuda" else "fp32",
            "ms_per_step": ms, "ms_repeats": [t * 1e3 for t in times], "tok_s": batch / (ms / 1e3),
            "peak_bytes": peak, "peak_source": "cuda max_memory_allocated" if device.type == "cuda" else "ru_maxrss",
            "parameters": params, "param_adam_grad_bytes": 16 * params, "shards": shards}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--f", default="256", help="latents per layer, comma list")
    p.add_argument("--archs", default="topk,jumprelu")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="CUDA: bf16 autocast as train fit")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    for f in (int(v) for v in args.f.split(",")):
        for arch in args.archs.split(","):
            try:
                rows.append(one(args, device, f, arch))
            except torch.cuda.OutOfMemoryError as e:   # record it and go on to the next shape
                rows.append({"arch": arch, "f_per_layer": f, "layers": args.layers, "d": args.d,
                             "batch_size": args.batch_size, "error": f"out of memory: {str(e).splitlines()[0]}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report({"rows": rows, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
           args.json)


if __name__ == "__main__":
    main()
