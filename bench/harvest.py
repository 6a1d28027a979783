"""Harvest throughput against a bare forward+backward loop over the same model, context and batch.

Both are timed as *marginal* rates: each is run for N and 2N tokens and the rate is N divided
by the difference in wall time, so model loading, imports and store creation cancel out.
Repeats alternate between the two and the median ratio is reported (these machines are noisy).

    python bench/harvest.py                       # offline default model, CPU
    python bench/harvest.py --model gpt2-small-random --device cuda --tokens 2000000
    python bench/harvest.py --nproc 2              # harvest under torchrun, 2 processes

With --nproc N the harvest runs as `torchrun --nproc-per-node N -m sae_harvest.harvest run`; its
marginal rate (store tokens over the wall-time difference of N and 2N tokens, so launcher start-up
cancels out) is compared with N bare loops' rate (one bare loop's rate times N: the ideal).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time

import torch

from sae_harvest.harvest.default_model import OFFLINE_DATASET, OFFLINE_MODEL, resolve_dataset, resolve_model
from sae_harvest.harvest.models import get_adapter, load_model
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.harvest.sites import next_token_loss_sum
from sae_harvest.stores import fs

from common import four_sites, gpt2_small_random, report  # bench/ is the script directory


def bare_loop(model, device, ctx, batch, tokens, vocab) -> float:
    """Seconds for forward + summed CE + backward to the embeddings, over `tokens` tokens."""
    g = torch.Generator().manual_seed(0)
    steps = max(1, tokens // (ctx * batch))
    ids = torch.randint(vocab, (steps, batch, ctx), generator=g)
    emb = model.get_input_embeddings()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        x = ids[i].to(device)
        inputs = emb(x).detach().requires_grad_(True)
        logits = model(inputs_embeds=inputs, use_cache=False).logits
        loss = next_token_loss_sum(logits, x)
        torch.autograd.grad(loss, inputs)
    sync()
    return time.perf_counter() - t0


WAITED: list = []   # the one-process runs' summaries say where the loop stood waiting


def harvest_seconds(cfg: HarvestConfig, nproc: int = 1) -> float:
    shutil.rmtree(cfg.out, ignore_errors=True)
    t0 = time.perf_counter()
    if nproc == 1:
        summary = harvest(cfg, progress=False)
        WAITED.append({"tokens": cfg.tokens, **summary["waited"]})
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "sae_harvest.harvest", "run",
                "--quiet"]
        for field in dataclasses.fields(cfg):
            value = getattr(cfg, field.name)
            flag = "--" + field.name.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    args.append(flag)
            elif value is not None:
                args += [flag, str(value)]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=OFFLINE_MODEL)
    p.add_argument("--dataset", default=OFFLINE_DATASET)
    p.add_argument("--sites", default=None, help="default: 4 sites from layer 0 to the last layer")
    p.add_argument("--tokens", type=int, default=65536, help="N: runs use N and 2N tokens")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-grads", action="store_true")
    p.add_argument("--nproc", type=int, default=1, help="harvest under torchrun with this many processes")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-harvest-")
    model_path = gpt2_small_random(tmp) if args.model == "gpt2-small-random" else resolve_model(args.model)
    device = torch.device(args.device)
    model, tok = load_model(model_path, device=device)
    adapter = get_adapter(model)
    sites = args.sites or four_sites(adapter.n_layers)
    corpus = resolve_dataset(args.dataset)
    ratios, harvest_rates, bare_rates, bpt = [], [], [], None
    N = args.tokens
    # warm-up: caches, tokenizer, allocator
    bare_loop(model, device, args.ctx_len, args.batch_size, args.ctx_len * args.batch_size * 2, len(tok))

    def cfg(tokens, name):
        return HarvestConfig(out=os.path.join(tmp, name), model=model_path, dataset=corpus, sites=sites,
                             grads=not args.no_grads, tokens=tokens, ctx_len=args.ctx_len,
                             batch_size=args.batch_size, device=args.device, shuffle_window=N // 2)

    harvest_seconds(cfg(N // 4, "warmup.zarr"), args.nproc)   # first-call costs (dataset cache, allocator) out of the figures
    for rep in range(args.repeats):
        h1 = harvest_seconds(cfg(N, "a.zarr"), args.nproc)
        h2 = harvest_seconds(cfg(2 * N, "b.zarr"), args.nproc)
        bpt = fs.du(os.path.join(tmp, "b.zarr")) / (2 * N)
        b1 = bare_loop(model, device, args.ctx_len, args.batch_size, N, len(tok))
        b2 = bare_loop(model, device, args.ctx_len, args.batch_size, 2 * N, len(tok))
        h_rate, b_rate = N / max(h2 - h1, 1e-9), args.nproc * N / max(b2 - b1, 1e-9)
        harvest_rates.append(h_rate)
        bare_rates.append(b_rate)
        ratios.append(h_rate / b_rate)
        waited = f", waited {WAITED[-1]}" if args.nproc == 1 else ""
        print(f"repeat {rep}: harvest {h_rate:,.0f} tok/s, bare fwd+bwd {b_rate:,.0f} tok/s, ratio {h_rate / b_rate:.3f}"
              f"{waited}", flush=True)
    result = {
        "model": args.model, "device": str(device), "nproc": args.nproc, "sites": sites, "grads": not args.no_grads,
        "ctx_len": args.ctx_len, "batch_size": args.batch_size, "tokens": [N, 2 * N],
        "harvest_tok_s": statistics.median(harvest_rates), "bare_tok_s": statistics.median(bare_rates),
        "ratio_median": statistics.median(ratios), "ratios": ratios, "bytes_per_token": bpt,
        "torch_threads": torch.get_num_threads(), "waited": WAITED,
    }
    report(result, args.json)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
