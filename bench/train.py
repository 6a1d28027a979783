"""`train fit` throughput from a store against a bare step loop of the same SAE on data already
in memory (same architecture, optimizer, batch, per-step decoder constraint), in the same run.

Rates are marginal (N and 2N tokens, rate = N / time difference), so store opening, sampling
for the normalisation constant and b_dec init cancel out. Repeats alternate; medians reported.

    python bench/train.py                                   # TopK d=256 -> 4096, k=32, 4096-token batches
    python bench/train.py --device cuda --dtype bf16 --d-in 768 --d-sae 24576 --k 32 --tokens 20000000
    python bench/train.py --dtype bf16 --decode sparse --d-in 64 --d-sae 1024 --tokens 40960 --repeats 1  # CPU dry run
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit
from sae_harvest.train.registry import SAEConfig, make_sae

from common import synthetic_store, report


def bare_loop(arch, d, d_sae, k, batch, tokens, device, bf16: bool, sparse: bool) -> float:
    cfg = SAEConfig(arch=arch, d_in=d, d_sae=d_sae, k=k if arch in ("topk", "batchtopk", "gtopk") else 0,
                    l1_coeff=1.0)
    torch.manual_seed(0)
    sae = make_sae(cfg).to(device)
    if sparse:
        sae.enable_sparse_decode()
    opt = torch.optim.Adam(sae.parameters(), lr=sae.default_lr(d_sae))
    data = torch.randn(16 * batch, d, device=device)
    steps = max(1, tokens // batch)
    # the trainer's dead-latent bookkeeping: AuxK (TopK family) runs once a latent can be dead, which
    # the host knows from a bound it tightens every 10 steps (train fit's log_every, where it syncs)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    dead_after = max(batch, min(10_000_000, tokens // 4))
    bound = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        x = data[(i % 16) * batch:(i % 16 + 1) * batch]
        dead = since_fired >= dead_after if bound >= dead_after else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae.loss(x, dead_mask=dead)
        out.loss.backward()
        since_fired += batch
        since_fired.masked_fill_((out.feats > 0).any(0), 0)
        bound = int(since_fired.max()) if (i + 1) % 10 == 0 else bound + batch
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
    sync()
    return time.perf_counter() - t0


def fit_seconds(store, out, arch, d_sae, k, batch, tokens, device, bf16: bool, sparse: bool) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(store=store, out=out, arch=arch, d_sae=d_sae, k=(k,), l1=(1.0,), batch_size=batch,
                      tokens=tokens, device=device, checkpoint_every=10**9,
                      autocast="on" if bf16 else "off", sparse_decode="on" if sparse else "off")
    t0 = time.perf_counter()
    summaries = fit(cfg, progress=False)
    seconds = time.perf_counter() - t0
    FEED_WAIT.append(sum(s.get("feed_wait_s", 0.0) for s in summaries.values()))
    return seconds


FEED_WAIT: list = []   # seconds each fit's step loop waited on the store feed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="topk", help="comma list")
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096 * 40, help="N: runs use N and 2N tokens")
    p.add_argument("--store-rows", type=int, default=None, help="default: 2N + 10%% (one epoch)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"),
                   help="SAE step precision (default: bf16 autocast on CUDA, fp32 on CPU)")
    p.add_argument("--decode", default="auto", choices=("auto", "sparse", "dense"),
                   help="TopK decode (auto: sparse on CUDA when k <= d_sae/16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    device = torch.device(args.device)
    bf16 = (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    sparse = args.decode == "sparse" or (args.decode == "auto" and device.type == "cuda")
    setting = (bf16, sparse)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    store = os.path.join(tmp, "s.zarr")
    N = args.tokens
    t0 = time.perf_counter()
    synthetic_store(store, args.d_in, args.store_rows or int(2.2 * N))
    print(f"store built in {time.perf_counter() - t0:.1f} s", flush=True)
    results = []
    for arch in args.arch.split(","):
        bare_loop(arch, args.d_in, args.d_sae, args.k, args.batch_size, 2 * args.batch_size, device, *setting)  # warm-up
        ratios, fit_rates, bare_rates = [], [], []
        for rep in range(args.repeats):
            out = os.path.join(tmp, "out")
            f1 = fit_seconds(store, out, arch, args.d_sae, args.k, args.batch_size, N, args.device, *setting)
            f2 = fit_seconds(store, out, arch, args.d_sae, args.k, args.batch_size, 2 * N, args.device, *setting)
            b1 = bare_loop(arch, args.d_in, args.d_sae, args.k, args.batch_size, N, device, *setting)
            b2 = bare_loop(arch, args.d_in, args.d_sae, args.k, args.batch_size, 2 * N, device, *setting)
            fr, br = N / max(f2 - f1, 1e-9), N / max(b2 - b1, 1e-9)
            fit_rates.append(fr)
            bare_rates.append(br)
            ratios.append(fr / br)
            print(f"{arch} repeat {rep}: train fit {fr:,.0f} tok/s, bare loop {br:,.0f} tok/s, ratio {fr / br:.3f}, "
                  f"feed waits {FEED_WAIT[-2]:.2f} s / {FEED_WAIT[-1]:.2f} s", flush=True)
        results.append({"arch": arch, "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k,
                        "batch_size": args.batch_size, "device": str(device),
                        "dtype": "bf16" if bf16 else "fp32", "decode": "sparse" if sparse else "dense", "tokens": [N, 2 * N],
                        "fit_tok_s": statistics.median(fit_rates), "bare_tok_s": statistics.median(bare_rates),
                        "ratio_median": statistics.median(ratios), "ratios": ratios,
                        "feed_wait_s": FEED_WAIT[-2:], "torch_threads": torch.get_num_threads()})
    report(results, args.json)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
