"""The demo: the whole pipeline on the offline default model and corpus, on 2 CPU cores.

harvest (three sites, with gradients) -> train relu, gated, topk, batchtopk, gtopk, jumprelu,
matryoshka_batchtopk and e2e SAEs (a small sweep each) and one skip transcoder of layer 1's MLP
-> evaluate them together in the live model -> table, JSON, Pareto plot.
Re-running continues where a previous run stopped.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from sae_harvest.harvest.default_model import OFFLINE_DATASET, OFFLINE_MODEL, default_model_dir
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit

from sae_harvest.evaluate.report import print_table, write_json, write_plot
from sae_harvest.evaluate.config import EvalConfig
from sae_harvest.evaluate.replace import evaluate_all

SITE = "blocks.2.resid_pre"
SITES = "blocks.2.resid_pre,blocks.1.mlp_in,blocks.1.mlp_out"
D_SAE = 1024

# (folder, arch, extra TrainConfig fields): each row is one sweep, one Pareto series
SWEEPS = [
    ("relu", "relu", {"l1": (100.0, 300.0, 1000.0)}),   # L0 ~94 / 47 / 9 (docs/results.md)
    ("gated", "gated", {"l1": (0.3, 1.0, 3.0)}),
    ("topk", "topk", {"k": (8, 16, 32)}),
    ("batchtopk", "batchtopk", {"k": (8, 16, 32)}),
    ("gtopk", "gtopk", {"k": (8, 16, 32)}),
    # jumprelu: lambda per active latent; theta starts at 0.1, since a short run cannot grow it far
    ("jumprelu", "jumprelu", {"l1": (0.1, 0.3, 1.0)}),
    ("matryoshka", "matryoshka_batchtopk", {"k": (8, 16, 32)}),
    # e2e: starts from the local relu_l1-300 SAE (--init), the paper's 16 sequences per step, one pass
    # over the store's training sequences; its lambda is on KL's scale (nats), far below local's
    ("e2e", "relu", {"loss": "e2e", "l1": (0.3, 1.0), "batch_size": 2048, "lr": 1e-3, "epochs": None,
                     "init": "relu/relu_l1-300"}),
    # a skip transcoder of layer 1's MLP (docs/training.md, "Transcoders"): spliced in place of its output
    ("transcoder", "topk", {"k": (16,), "site": "blocks.1.mlp_in", "target": "blocks.1.mlp_out", "skip": True}),
]
LOCAL = {"batch_size": 1024, "epochs": 2}   # ~470 steps: enough for these small SAEs to settle


def _done(folder: Path) -> bool:
    return folder.is_dir() and all((p / "cfg.json").exists() for p in folder.iterdir()
                                   if p.is_dir() and p.name != "checkpoint") and any(folder.iterdir())


def run_demo(out: str = "demo-out", *, tokens: int = 250_000, train_tokens: int | None = None,
             eval_tokens: int = 16_384, sweeps=None, console=None, seed: int = 0, store: str | None = None,
             local: dict | None = None, d_sae: int = D_SAE) -> list[dict]:
    """`seed` seeds every SAE's initialisation and batch order; `store` reuses a harvested store
    (several seeds, one harvest); `local` overrides the local trainers' budget (LOCAL)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = console.print if console is not None else print

    say(f"[1/4] offline default model (built once, cached): {default_model_dir()}")
    store = Path(store) if store else out_dir / "store.zarr"
    say(f"[2/4] harvest {tokens:,} tokens at {SITES} with gradients -> {store}")
    harvest(HarvestConfig(out=str(store), model=OFFLINE_MODEL, dataset=OFFLINE_DATASET, sites=SITES, grads=True,
                          tokens=tokens, ctx_len=128, batch_size=16, shuffle_window=1 << 16, device="auto"),
            resume=True, console=console)

    say(f"[3/4] train SAEs at {SITE} and a transcoder of blocks.1's MLP")
    paths = []
    for folder, arch, extra in sweeps or SWEEPS:
        target = out_dir / "saes" / folder
        if "init" in extra:
            extra = {**extra, "init": str(out_dir / "saes" / extra["init"])}
        cfg = TrainConfig(store=str(store), arch=arch, d_sae=d_sae, out=str(target), seed=seed,
                          tokens=train_tokens, checkpoint_every=10**9, log_every=5,
                          **{"site": SITE, **(local or LOCAL), **extra})
        if not _done(target):
            say(f"  {folder}: {arch} {extra}")
            fit(cfg, overwrite=True, console=console)
        paths += sorted(str(p) for p in target.iterdir() if (p / "cfg.json").exists())

    say(f"[4/4] evaluate {len(paths)} SAEs spliced into the model on {eval_tokens:,} held-out tokens")
    eval_cfg = EvalConfig(saes=tuple(paths), store=str(store), tokens=eval_tokens, batch_size=16)
    results = evaluate_all(eval_cfg, console=console)   # transcoders too (evaluate/replace.py)
    import sys

    from rich.console import Console
    print_table(results, Console(width=None if sys.stdout.isatty() else 180))
    write_json(results, out_dir / "results.json", config=eval_cfg.to_dict())
    write_plot(results, out_dir / "pareto.png")
    (out_dir / "timing.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    say(f"done in {time.perf_counter() - t0:,.0f} s. Outputs in {out_dir}/: results.json (every metric), "
        f"pareto.png (L0 and alive latents vs CE increase), saes/ (checkpoints, metrics.jsonl), store.zarr")
    return results
