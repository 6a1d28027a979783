"""Where the SAE step's time goes, part by part, and a sweep as one batched step.

parts: one TopK SAE (d_in -> d_sae, k, batch), each part timed alone on data in memory, in the
same run: the encoder forward, the top-k, the decoder (dense, gathered), forward + backward with
the dense and the sparse encoder backward (train/sparse_topk.py), Adam (fused, foreach, the
per-tensor loop), the decoder constraint + clipping, the dead-latent bookkeeping, and (with
--compile) forward + backward under torch.compile (compile time printed apart).
sweep: 8 TopK SAEs of one shape (k = 16..128) trained as one stacked step (train/stacked.py)
against the same 8 as a Python loop of single steps and against one SAE's step.
Every figure is the median of --repeats timings of --iters calls each (repeats alternate over
the variants), reported per step and, for the sweep, as a ratio to one SAE's step.

    python bench/train_parts.py                          # 256 -> 4096, k 32, batch 4096, CPU
    python bench/train_parts.py --only sweep --d-sae 2048
    python bench/train_parts.py --device cuda --dtype bf16 --d-in 768 --d-sae 24576 --compile
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.runs import Run, make_adam, optimizer_step
from sae_harvest.train.stacked import StackedTopK, stacked_step

from common import report
from roofline import device_peaks, roofline, step_cost

SWEEP_KS = (16, 24, 32, 48, 64, 80, 96, 128)


def _timer(device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, iters):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - t0) / iters
    return timed


def _sae(args, device, k=None, seed=0):
    torch.manual_seed(seed)
    return make_sae(SAEConfig(arch="topk", d_in=args.d_in, d_sae=args.d_sae, k=k or args.k)).to(device)


def parts(args, device, bf16) -> dict:
    timed = _timer(device)
    sae = _sae(args, device)
    x = torch.randn(args.batch_size, args.d_in, device=device)
    cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), cast:
        pre = sae.pre_acts(x)
        vals, idx = pre.topk(args.k, dim=-1, sorted=False)
        feats = torch.zeros_like(pre).scatter(-1, idx, vals)

    def fwd_bwd(sparse_backward, sparse_decode=False, model=None):
        def run():
            sae.use_sparse_backward, sae.use_sparse_decode = sparse_backward, sparse_decode
            with cast:
                loss = model(x) if model is not None else sae.loss(x).loss
            loss.backward()
            sae.zero_grad(set_to_none=True)
        return run

    def no_grad(fn):
        def run():
            with torch.no_grad(), cast:
                fn()
        return run

    params = list(sae.parameters())
    grads = [torch.randn_like(p) for p in params]

    def with_grads(fn):   # the forward + backward variants leave .grad None: give every call its gradients
        def run():
            for p, g in zip(params, grads):
                p.grad = g
            fn()
        return run
    optimizers = {"Adam, trainer's (fused where supported)": make_adam(params, 1e-4, (0.9, 0.999)),
                  "Adam, foreach": torch.optim.Adam(params, lr=1e-4, foreach=True),
                  "Adam, per-tensor loop": torch.optim.Adam(params, lr=1e-4, foreach=False)}
    since = torch.zeros(args.d_sae, dtype=torch.long, device=device)

    def bookkeeping():
        since.add_(args.batch_size)
        since.masked_fill_(feats.gt(0).any(0), 0)

    def constraint():
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        sae.set_decoder_norm_to_unit_norm()

    variants = {
        "encoder forward (matmul + ReLU)": no_grad(lambda: sae.pre_acts(x)),
        "top-k selection": no_grad(lambda: pre.topk(args.k, dim=-1, sorted=False)),
        "decoder forward, dense": no_grad(lambda: sae.decode(feats)),
        "decoder forward, gathered k rows": no_grad(lambda: sae.sparse_decode(idx, vals)),
        "forward + backward, dense backward": fwd_bwd(False),
        "forward + backward, sparse backward": fwd_bwd(True),
        "forward + backward, sparse backward + gathered decode": fwd_bwd(True, True),
        **{name: with_grads(opt.step) for name, opt in optimizers.items()},
        "decoder constraint + clipping": with_grads(constraint),
        "dead-latent bookkeeping": bookkeeping,
    }
    compile_s = None
    if args.compile:
        compiled = torch.compile(lambda inputs: sae.loss(inputs).loss)
        t0 = time.perf_counter()
        fwd_bwd(False, model=compiled)()
        compile_s = time.perf_counter() - t0
        variants["forward + backward, dense backward, torch.compile"] = fwd_bwd(False, model=compiled)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, args.iters))
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, v in med.items():
        print(f"  {name:58s} {1e3 * v:9.2f} ms/step", flush=True)
    if compile_s is not None:
        print(f"  (torch.compile's first call: {compile_s:.1f} s)")
    peaks = device_peaks(device, bf16)
    rl = {}
    for name, sb in (("forward + backward, dense backward", False), ("forward + backward, sparse backward", True)):
        cost = step_cost(args.d_in, args.d_sae, args.k, args.batch_size, sparse_decode=False, sparse_backward=sb,
                         bf16=bf16)
        rl[name] = roofline(args.batch_size / med[name], cost, peaks)
    return {"ms_per_step": {k: 1e3 * v for k, v in med.items()},
            "repeats_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
            "compile_s": compile_s, "roofline": rl}


def sweep(args, device, bf16) -> dict:
    """8 SAEs: stacked step vs a loop of single steps vs one SAE's step (trainer's step functions)."""
    timed = _timer(device)
    x = torch.randn(args.batch_size, args.d_in, device=device)
    cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    dead_after = 10**12   # the steady state before any latent can be dead: no AuxK in either form

    def loop_step(ks):
        runs = []
        for k in ks:
            sae = _sae(args, device, k)
            runs.append(Run(name=str(k), sae=sae, opt=make_adam(sae.parameters(), 1e-4, sae.adam_betas), lr=1e-4,
                            since_fired=torch.zeros(args.d_sae, dtype=torch.long, device=device)))

        def run():
            for r in runs:
                with cast:
                    out = r.sae.loss(x)
                out.loss.backward()
                optimizer_step(r, 1.0, 10.0, fired=(out.feats > 0).any(0), tokens=len(x))
        return run

    stack = StackedTopK([_sae(args, device, k) for k in SWEEP_KS])
    opt = make_adam(stack.parameters(), 1e-4, (0.9, 0.999))
    since = torch.zeros(len(SWEEP_KS), args.d_sae, dtype=torch.long, device=device)

    def stacked():
        with cast:
            stacked_step(stack, opt, x, since, dead_after, 0, 1e-4, 10.0)

    variants = {"one SAE's step (k=32)": loop_step((32,)), f"{len(SWEEP_KS)} SAEs, loop of steps": loop_step(SWEEP_KS),
                f"{len(SWEEP_KS)} SAEs, one stacked step": stacked}
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, args.iters))
    med = {name: statistics.median(v) for name, v in times.items()}
    one = med["one SAE's step (k=32)"]
    for name, v in med.items():
        print(f"  {name:40s} {1e3 * v:9.2f} ms/step  {v / one:5.2f}x one SAE's step", flush=True)
    return {"ks": list(SWEEP_KS), "ms_per_step": {k: 1e3 * v for k, v in med.items()},
            "ratio_to_one_sae": {k: v / one for k, v in med.items()},
            "repeats_ms": {k: [1e3 * t for t in v] for k, v in times.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time forward + backward under torch.compile")
    p.add_argument("--only", default="parts,sweep")
    p.add_argument("--json")
    args = p.parse_args()
    device = torch.device(args.device)
    bf16 = (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    result = {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "batch_size": args.batch_size,
              "device": str(device), "dtype": "bf16" if bf16 else "fp32", "torch_threads": torch.get_num_threads()}
    if "parts" in args.only:
        print(f"== step parts: TopK {args.d_in} -> {args.d_sae}, k={args.k}, batch {args.batch_size}", flush=True)
        result["parts"] = parts(args, device, bf16)
    if "sweep" in args.only:
        print(f"== sweep of {len(SWEEP_KS)} TopK SAEs {args.d_in} -> {args.d_sae}, batch {args.batch_size}", flush=True)
        result["sweep"] = sweep(args, device, bf16)
    report(result, args.json)


if __name__ == "__main__":
    main()
