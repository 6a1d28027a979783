"""Larger batches against held-out NMSE (issue 21 item 1): TopK at several batch sizes, one token
budget, on a store of the offline default model.

Harvests one site of stdlib-gpt2 (the demo's, `blocks.2.resid_pre`) once, then trains one TopK
SAE per (batch size, lr rule) with `train fit` on the same tokens (same seed, so the same
initialisation; the batch order differs with the batch size), and reports the held-out NMSE
(`train fit`'s own held-out report: the store's held-out sequences, never trained on), the
steps, steps/s and tokens/s. The learning rate: the architecture's default (`2e-4 /
sqrt(d_sae / 2^14)`, tuned at the default batch of 4096) either kept (`none`) or scaled by
sqrt(batch / 4096) (`sqrt`, the rule for Adam: the gradient noise's standard deviation falls as
1/sqrt(batch)). Runs are in one process, one after another; OMP_NUM_THREADS=1 keeps it off the
other cores.

    OMP_NUM_THREADS=1 python bench/batch_size.py --tokens 524288          # sqrt and none, 4 batch sizes
    python bench/batch_size.py --store S --batch-sizes 4096,16384 --lr-scale sqrt --device cuda
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile

import torch

from common import report
from sae_harvest.evaluate.demo import SITE
from sae_harvest.harvest.default_model import OFFLINE_MODEL
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.stores import open_store
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit
from sae_harvest.train.topk import TopKSAE

BASE_BATCH = 4096      # the batch the default lr was set at (train fit's default --batch-size)


def make_store(path: str, tokens: int) -> None:
    """stdlib-gpt2 at SITE, with the usual 1/20 of the sequences held out."""
    harvest(HarvestConfig(out=path, model=OFFLINE_MODEL, dataset="stdlib-py", sites=SITE, tokens=tokens,
                          ctx_len=128, batch_size=16, device="cpu"), progress=False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="store to train on (harvested there if absent, and kept)")
    p.add_argument("--tokens", type=int, default=524_288, help="training tokens of every run")
    p.add_argument("--batch-sizes", default="1024,2048,4096,8192")
    p.add_argument("--lr-scale", default="sqrt,none", help="sqrt and/or none (comma list)")
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-batch-")
    store = args.store or os.path.join(tmp, "s.zarr")
    if not os.path.exists(store):
        # the harvest holds out 1/20 and drops position 0: harvest enough for one pass of --tokens
        make_store(store, int(args.tokens * 20 / 19 * 128 / 127) + 128 * 40)
    s = open_store(store)
    d_sae = args.expansion * s.width(SITE)
    base_lr = TopKSAE.default_lr(d_sae)
    rows = []
    for rule in args.lr_scale.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            lr = base_lr * (math.sqrt(batch / BASE_BATCH) if rule == "sqrt" else 1.0)
            out = os.path.join(tmp, f"{rule}-{batch}")
            summary = next(iter(fit(TrainConfig(store=store, out=out, site=SITE, arch="topk", k=(args.k,),
                                                d_sae=d_sae, batch_size=batch, tokens=args.tokens, lr=lr,
                                                device=args.device, checkpoint_every=10**9, seed=0),
                                    progress=False).values()))
            held = summary["held_out"]
            row = {"lr_scale": rule, "batch_size": batch, "lr": lr, "steps": summary["steps"],
                   "tokens": summary["tokens"], "seconds": summary["seconds"],
                   "steps_per_s": summary["steps"] / summary["seconds"], "tokens_per_s": summary["tokens_per_s"],
                   "held_out_nmse": held["nmse"], "held_out_tokens": held["held_out_tokens"]}
            rows.append(row)
            print(f"{rule:>4} batch {batch:>5}: lr {lr:.2e}, {row['steps']} steps, {row['steps_per_s']:.2f} steps/s, "
                  f"{row['tokens_per_s'] or 0:,.0f} tok/s, held-out NMSE {row['held_out_nmse']:.4f}", flush=True)
    report({"store": store, "site": SITE, "d_sae": d_sae, "k": args.k, "base_lr": base_lr,
            "torch_threads": torch.get_num_threads(), "runs": rows}, args.json)
    shutil.rmtree(tmp, ignore_errors=True)      # the SAEs (and the store, unless --store named it)


if __name__ == "__main__":
    main()
