"""`train fit --loss e2e | e2e+ds` throughput against a bare loop of what an e2e step cannot avoid.

Per step the trainer runs one clean forward (no grad) and, per SAE, one forward with the SAE's
reconstruction spliced in at the site plus one backward that stops at the SAE. The bare loop does
the same model work with the cheapest possible "SAE" (a single scale parameter at the site) and
the same KL loss, so the ratio shows what the trainer adds beyond the model's own forward and
backward passes (the SAE's matmuls, logging, feed, dead-latent tracking). Rates are marginal
(N and 2N tokens); repeats alternate; medians reported.

    python bench/e2e.py                                         # offline default model, CPU, tiny
    python bench/e2e.py --device cuda --model gpt2-small-random --site blocks.6.resid_pre \\
        --ctx-len 1024 --batch-size 8192 --tokens 1048576 --expansion 60
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from sae_harvest.harvest.default_model import OFFLINE_DATASET, OFFLINE_MODEL, resolve_model
from sae_harvest.harvest.models import load_model
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.harvest.sites import Site, splice
from sae_harvest.stores import open_store
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit

from common import report  # bench/ is the script directory


def bare_loop(model, site, ids, seqs_per_step, device) -> float:
    w = torch.ones((), device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(ids) - seqs_per_step + 1, seqs_per_step):
        batch = ids[i:i + seqs_per_step].to(device)
        with torch.no_grad():
            clean = F.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
        with splice(model, site, lambda a: a * w):
            logp = F.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
        F.kl_div(logp, clean, log_target=True, reduction="batchmean").backward()
    sync()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=OFFLINE_MODEL)
    p.add_argument("--site", default="blocks.2.resid_pre")
    p.add_argument("--loss", default="e2e,e2e+ds", help="comma list")
    p.add_argument("--arch", default="topk")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2048, help="tokens per step")
    p.add_argument("--tokens", type=int, default=2048 * 8, help="N: runs use N and 2N tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-e2e-")
    if args.model == "gpt2-small-random":
        from common import gpt2_small_random
        model_path = gpt2_small_random(tmp)
    else:
        model_path = resolve_model(args.model)
    device = torch.device(args.device)
    N = args.tokens
    store = os.path.join(tmp, "s.zarr")
    t0 = time.perf_counter()
    harvest(HarvestConfig(out=store, model=model_path, dataset=OFFLINE_DATASET, sites=args.site,
                          tokens=int(2.2 * N), ctx_len=args.ctx_len, batch_size=16, device=args.device,
                          shuffle_window=max(args.ctx_len * 16, N // 4)), progress=False)
    print(f"store harvested in {time.perf_counter() - t0:.1f} s", flush=True)
    model, _ = load_model(model_path, device=device)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    ids = torch.from_numpy(open_store(store).tokens[:].astype("int64"))
    seqs_per_step = max(1, args.batch_size // args.ctx_len)
    site = Site.parse(args.site)
    bare_loop(model, site, ids[:seqs_per_step], seqs_per_step, device)   # warm-up

    def fit_seconds(loss, tokens):
        out = os.path.join(tmp, "out")
        shutil.rmtree(out, ignore_errors=True)
        cfg = TrainConfig(store=store, out=out, loss=loss, model=model_path, site=args.site, arch=args.arch,
                          k=(args.k,), expansion=args.expansion, batch_size=args.batch_size, tokens=tokens,
                          device=args.device, checkpoint_every=10**9)
        t = time.perf_counter()
        fit(cfg, progress=False)
        return time.perf_counter() - t

    n_seqs = N // args.ctx_len
    results = []
    for loss in args.loss.split(","):
        fit_rates, bare_rates = [], []
        for rep in range(args.repeats):
            f1, f2 = fit_seconds(loss, N), fit_seconds(loss, 2 * N)
            b1 = bare_loop(model, site, ids[:n_seqs], seqs_per_step, device)
            b2 = bare_loop(model, site, ids[:2 * n_seqs], seqs_per_step, device)
            fr, br = N / max(f2 - f1, 1e-9), N / max(b2 - b1, 1e-9)
            fit_rates.append(fr)
            bare_rates.append(br)
            print(f"{loss} repeat {rep}: train fit {fr:,.0f} tok/s, bare loop {br:,.0f} tok/s, ratio {fr / br:.3f}",
                  flush=True)
        fr, br = statistics.median(fit_rates), statistics.median(bare_rates)
        results.append({"loss": loss, "model": args.model, "site": args.site, "arch": args.arch, "k": args.k,
                        "expansion": args.expansion, "ctx_len": args.ctx_len, "batch_size": args.batch_size,
                        "device": str(device), "fit_tok_s": fr, "bare_tok_s": br, "ratio": fr / br,
                        "fit_rates": fit_rates, "bare_rates": bare_rates})
    report(results, args.json)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
