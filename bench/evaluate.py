"""`evaluate splice` throughput against the bare clean forward pass over the same tokens.

The evaluator does, per batch: one clean forward that records the site and downstream layers,
one zero- and one mean-ablation forward per site, and one spliced forward per SAE. The bare
baseline is one plain forward per batch. We report tokens/s of both and the cost per SAE in
units of clean forwards (ideal: ~1 forward + the SAE's own matmuls), all in the same run.

    python bench/evaluate.py                        # offline default model, CPU, TopK SAEs
    python bench/evaluate.py --device cuda --model gpt2-small-random --tokens 262144
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from sae_harvest.evaluate.config import EvalConfig
from sae_harvest.evaluate.splice import evaluate_saes
from sae_harvest.harvest.default_model import OFFLINE_DATASET, OFFLINE_MODEL, resolve_model
from sae_harvest.harvest.models import get_adapter, load_model
from sae_harvest.train.sae_io import save_sae
from sae_harvest.train.registry import SAEConfig, make_sae

from common import report  # bench/ is the script directory


def bare_forward(model, ids, batch, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            model(input_ids=ids[i:i + batch].to(device), use_cache=False)
    sync()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=OFFLINE_MODEL)
    p.add_argument("--dataset", default=OFFLINE_DATASET)
    p.add_argument("--site", default="blocks.2.resid_pre")
    p.add_argument("--n-saes", type=int, default=4)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32768, help="N: runs use N and 2N tokens")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-eval-")
    if args.model == "gpt2-small-random":
        from common import gpt2_small_random
        model_path = gpt2_small_random(tmp)
    else:
        model_path = resolve_model(args.model)
    device = torch.device(args.device)
    model, tok = load_model(model_path, device=device)
    d = get_adapter(model).d_model
    paths = []
    for i in range(args.n_saes):
        torch.manual_seed(i)
        sae = make_sae(SAEConfig(arch="topk", d_in=d, d_sae=args.expansion * d, k=args.k))
        path = os.path.join(tmp, f"sae{i}")
        save_sae(sae, path, extra_cfg={"hook_name": args.site})
        paths.append(path)
    N = args.tokens
    ids = torch.randint(len(tok), (2 * N // args.ctx_len, args.ctx_len))
    bare_forward(model, ids[:args.batch_size], args.batch_size, device)   # warm-up

    def evaluate(tokens):
        t0 = time.perf_counter()
        evaluate_saes(EvalConfig(model=model_path, saes=tuple(paths), dataset=args.dataset, tokens=tokens,
                                 ctx_len=args.ctx_len, batch_size=args.batch_size, device=args.device),
                      progress=False)
        return time.perf_counter() - t0

    eval_rates, bare_rates = [], []
    for rep in range(args.repeats):
        e1, e2 = evaluate(N), evaluate(2 * N)
        b1 = bare_forward(model, ids[:N // args.ctx_len], args.batch_size, device)
        b2 = bare_forward(model, ids, args.batch_size, device)
        er, br = N / max(e2 - e1, 1e-9), N / max(b2 - b1, 1e-9)
        eval_rates.append(er)
        bare_rates.append(br)
        print(f"repeat {rep}: evaluate {er:,.0f} tok/s ({args.n_saes} SAEs), bare forward {br:,.0f} tok/s", flush=True)
    er, br = statistics.median(eval_rates), statistics.median(bare_rates)
    # forwards per batch: 1 clean + 2 ablations + n_saes spliced (+ the mean-ablation pass, stopped early)
    per_sae = (br / er - 3) / args.n_saes
    result = {"model": args.model, "device": str(device), "site": args.site, "n_saes": args.n_saes,
              "d_sae": args.expansion * d, "k": args.k, "ctx_len": args.ctx_len, "batch_size": args.batch_size,
              "evaluate_tok_s": er, "bare_forward_tok_s": br, "ratio": er / br,
              "clean_forwards_per_sae": per_sae, "eval_rates": eval_rates, "bare_rates": bare_rates}
    report(result, args.json)


if __name__ == "__main__":
    main()
