"""bf16 harvests against an fp32 one (issue 21): tok/s and the per-row error of stored activations
and gradients.

Harvests the same tokens (same corpus, seed and shuffle, so row i is the same (sequence, position)
in every store, checked through rows/seq and rows/pos) four ways:
  fp32 reference  --dtype float32, acts and grads stored as float32 (the reference store)
  fp32            --dtype float32, the default encodings (fp16/bf16 acts, bf16 grads): the
                  encodings' own error, the floor of the rows below
  bf16            --dtype bfloat16 (model weights and compute in bf16), default encodings
  fp32 + autocast --dtype float32 with the whole harvest under torch.autocast(bfloat16) (no CLI
                  flag: the bench wraps harvest() in-process; matmuls in bf16, weights fp32)
and reports each one's harvest-loop tok/s (`harvest run`'s own rate: after model load and store
creation) against the fp32 reference's, and per site, for activations and gradients, the
per-row relative error ||x - ref|| / ||ref|| against the reference store: median, p99, max and the
fraction of rows above 1e-2. Rows whose reference norm is 0 (a gradient at the last position) are
left out. The model's attention implementation (SDPA expected) is printed with the table.

    python bench/bf16_harvest.py --device cuda --model gpt2-small-random-path --tokens 131072
    python bench/bf16_harvest.py --tokens 4096 --ctx-len 64 --batch-size 4     # CPU dry run
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile

import numpy as np
import torch

from common import four_sites, report
from sae_harvest.harvest.default_model import OFFLINE_MODEL, resolve_model
from sae_harvest.harvest.models import get_adapter, load_model
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.stores import open_store

VARIANTS = {   # name: (dtype, act encoding, grad encoding, autocast)
    "fp32 reference": ("float32", "float32", "float32", False),
    "fp32": ("float32", "auto", "bfloat16", False),
    "bf16": ("bfloat16", "auto", "bfloat16", False),
    "fp32 + autocast": ("float32", "auto", "bfloat16", True),
}


def run(cfg: HarvestConfig, autocast: bool, device: str) -> dict:
    ctx = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if autocast \
        else contextlib.nullcontext()
    with ctx:
        return harvest(cfg, progress=False)


def row_errors(x: np.ndarray, ref: np.ndarray) -> dict:
    norm = np.linalg.norm(ref, axis=1)
    live = norm > 0
    err = np.linalg.norm(x[live] - ref[live], axis=1) / norm[live]
    if not len(err):
        return {"rows": 0}
    return {"rows": int(live.sum()), "median": float(np.median(err)), "p99": float(np.quantile(err, 0.99)),
            "max": float(err.max()), "frac_above_1e-2": float((err > 1e-2).mean())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=OFFLINE_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json")
    args = p.parse_args()
    model, _ = load_model(resolve_model(args.model), device="cpu")
    sites = four_sites(get_adapter(model).n_layers)
    attn = getattr(model.config, "_attn_implementation", None)
    del model
    tmp = tempfile.mkdtemp(prefix="bench-bf16-")
    names = ["fp32 reference"] + [v for v in args.variants.split(",") if v != "fp32 reference"]
    stores, speed = {}, {}
    for name in names:
        dtype, act_enc, grad_enc, autocast = VARIANTS[name]
        out = os.path.join(tmp, name.replace(" ", "_").replace("+", "p") + ".zarr")
        cfg = HarvestConfig(out=out, model=args.model, dataset="stdlib-py", sites=sites, grads=True,
                            tokens=args.tokens, ctx_len=args.ctx_len, batch_size=args.batch_size,
                            device=args.device, dtype=dtype, act_encoding=act_enc, grad_encoding=grad_enc)
        summary = run(cfg, autocast, args.device)
        speed[name] = summary["tokens_per_s"]
        stores[name] = open_store(out)
        print(f"{name}: {speed[name]:,.0f} tok/s", flush=True)
    ref = stores["fp32 reference"]
    rows = np.arange(ref.n_rows)
    result = {"model": args.model, "device": args.device, "attn_implementation": attn, "sites": sites,
              "tokens": args.tokens, "ctx_len": args.ctx_len, "batch_size": args.batch_size, "variants": {}}
    ref_values = {(kind, s): (ref.acts if kind == "acts" else ref.grads)(s, rows)
                  for s in ref.sites for kind in ("acts", "grads")}
    for name in names[1:]:
        st = stores[name]
        for arr in ("rows/seq", "rows/pos"):
            if not np.array_equal(st.read_rows(arr, 0, st.n_rows), ref.read_rows(arr, 0, ref.n_rows)):
                raise SystemExit(f"{name}: {arr} differs from the reference store's: rows not comparable")
        errors = {f"{kind} {s}": row_errors((st.acts if kind == "acts" else st.grads)(s, rows), want)
                  for (kind, s), want in ref_values.items()}
        result["variants"][name] = {
            "tok_s": speed[name], "ratio_to_fp32_reference": speed[name] / speed["fp32 reference"],
            "encodings": {"acts": st.encoding(st.sites[0]), "grads": st.encoding(st.sites[0], grads=True)},
            "errors": errors}
    result["reference_tok_s"] = speed["fp32 reference"]
    report(result, args.json)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
