"""The demo: the whole pipeline on the offline default model and corpus, on 2 CPU cores.

harvest (three sites, with gradients) -> train every registered architecture (train/registry.py:
relu, gated, topk, batchtopk, gtopk, jumprelu, matryoshka_batchtopk), e2e SAEs (a small sweep each),
one skip transcoder of layer 1's MLP and a small cross-layer transcoder over every layer (from a
second, small store of every layer's MLP input and output) -> evaluate them together in the live
model -> table, JSON, Pareto plot -> the feature browser.
Re-running continues where a previous run stopped.
"""
from __future__ import annotations

import time
from pathlib import Path

from sae_harvest.harvest.default_model import OFFLINE_DATASET, OFFLINE_MODEL, default_model_dir
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.stores.artifacts import check_report_path, write_report
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit
from sae_harvest.train.registry import ARCHITECTURES

from sae_harvest.evaluate.report import check_plot_path, print_per_layer, print_table, write_json, write_plot
from sae_harvest.evaluate.config import EvalConfig
from sae_harvest.evaluate.replace import evaluate_all

SITE = "blocks.2.resid_pre"
SITES = "blocks.2.resid_pre,blocks.1.mlp_in,blocks.1.mlp_out"
D_SAE = 1024

# The tuned sweep of each architecture (values of its sweep field). An architecture registered in
# train/registry.py without a row here still runs, with DEFAULT_SWEEP for its sweep field.
TUNED = {
    "relu": {"l1": (100.0, 300.0, 1000.0)},   # L0 ~96 / 49 / 10 (docs/results-pareto.json)
    "gated": {"l1": (0.3, 1.0, 3.0)},
    "topk": {"k": (8, 16, 32)},
    "batchtopk": {"k": (8, 16, 32)},
    "gtopk": {"k": (8, 16, 32)},
    # jumprelu: lambda per active latent; theta starts at sqrt(lambda), its fixed point (train/jumprelu.py),
    # since a short run cannot move it far
    "jumprelu": {"l1": (0.1, 0.3, 1.0)},
    "matryoshka_batchtopk": {"k": (8, 16, 32)},
}
DEFAULT_SWEEP = {"k": {"k": (8, 16, 32)}, "l1_coeff": {"l1": (0.3, 1.0, 3.0)}}
FOLDERS = {"matryoshka_batchtopk": "matryoshka"}
# e2e: starts from the local relu_l1-300 SAE (--init), the paper's 16 sequences per step, one pass
# over the store's training sequences; its lambda is on KL's scale (nats), far below local's
E2E_SWEEP = ("e2e", "relu", {"loss": "e2e", "l1": (0.3, 1.0), "batch_size": 2048, "lr": 1e-3, "epochs": None,
                             "init": "relu/relu_l1-300"})


def registry_sweeps() -> list[tuple[str, str, dict]]:
    """(folder, arch, extra TrainConfig fields), one sweep and one Pareto series per row: every
    architecture of the registry, in its order, then e2e."""
    return [(FOLDERS.get(name, name), name, TUNED.get(name) or DEFAULT_SWEEP[cls.sweep_field])
            for name, cls in ARCHITECTURES.items()] + [E2E_SWEEP]


# a skip transcoder of layer 1's MLP (docs/training.md, "Transcoders"): spliced in place of its output
TRANSCODER_SWEEP = ("transcoder", "topk", {"k": (16,), "site": "blocks.1.mlp_in", "target": "blocks.1.mlp_out",
                                           "skip": True})
# a cross-layer transcoder over all 4 layers of the default model (docs/training.md, "Cross-layer
# transcoders"), 256 latents and k = 8 per layer, scored as a replacement model. It needs mlp_in and
# mlp_out at every layer but no gradients, so it reads its own store (CLT_STORE, CLT_TOKENS): adding
# those 6 sites with gradients to the main store would triple its 380 MB. Both harvests cut the
# same sequences from the same corpus, so the main store's held-out sequences, which every row is
# evaluated on, are held out of the CLT's store too.
CLT_STORE, CLT_TOKENS = "clt-store.zarr", 65_536
# lr 3e-3: its ~120 steps at the default 5e-4 left held-out NMSE at 0.31, at 3e-3 0.055
CLT_SWEEP = ("clt", "topk", {"k": (8,), "d_sae": 256, "site": "blocks.*.mlp_in", "target": "blocks.*.mlp_out",
                             "clt": True, "store": CLT_STORE, "lr": 3e-3})
SWEEPS = registry_sweeps() + [TRANSCODER_SWEEP, CLT_SWEEP]
LOCAL = {"batch_size": 1024, "epochs": 2}   # ~470 steps: enough for these small SAEs to settle


def _done(folder: Path) -> bool:
    return folder.is_dir() and all((p / "cfg.json").exists() for p in folder.iterdir()
                                   if p.is_dir() and p.name != "checkpoint") and any(folder.iterdir())


def run_demo(out: str = "demo-out", *, tokens: int = 250_000, train_tokens: int | None = None,
             eval_tokens: int | None = None, sweeps=None, console=None, seed: int = 0, store: str | None = None,
             local: dict | None = None, d_sae: int = D_SAE, eval_every: int = 20,
             clt_tokens: int = CLT_TOKENS) -> list[dict]:
    """`seed` seeds every SAE's initialisation and batch order; `store` reuses a harvested store
    (several seeds, one harvest); `local` overrides the local trainers' budget (LOCAL); the store
    holds every `eval_every`-th sequence out (evaluated on: eval_tokens of them, default all)."""
    out_dir = Path(out)
    # the reports it ends with replace only the demo's own (a re-run's): refused before any work
    for name in ("results.json", "timing.json"):
        check_report_path(out_dir / name)
    check_plot_path(out_dir / "pareto.png")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = console.print if console is not None else print

    say(f"[1/4] offline default model (built once, cached): {default_model_dir()}")
    store = Path(store) if store else out_dir / "store.zarr"
    say(f"[2/4] harvest {tokens:,} tokens at {SITES} with gradients -> {store}")
    harvest(HarvestConfig(out=str(store), model=OFFLINE_MODEL, dataset=OFFLINE_DATASET, sites=SITES, grads=True,
                          tokens=tokens, ctx_len=128, batch_size=16, shuffle_window=1 << 16, device="auto",
                          eval_every=eval_every),
            resume=True, console=console)
    clt_store = out_dir / CLT_STORE
    if any(extra.get("store") == CLT_STORE for _, _, extra in sweeps or SWEEPS):
        say(f"      and {clt_tokens:,} tokens at every layer's mlp_in and mlp_out (for the CLT) -> {clt_store}")
        harvest(HarvestConfig(out=str(clt_store), model=OFFLINE_MODEL, dataset=OFFLINE_DATASET,
                              sites="blocks.*.mlp_in,blocks.*.mlp_out", tokens=clt_tokens, ctx_len=128,
                              batch_size=16, shuffle_window=1 << 16, device="auto", eval_every=eval_every),
                resume=True, console=console)

    say(f"[3/4] train SAEs at {SITE}, a transcoder of blocks.1's MLP and a cross-layer transcoder")
    paths = []
    for folder, arch, extra in sweeps or SWEEPS:
        target = out_dir / "saes" / folder
        if "init" in extra:
            extra = {**extra, "init": str(out_dir / "saes" / extra["init"])}
        if extra.get("store") == CLT_STORE:
            extra = {**extra, "store": str(clt_store)}
        # a row may name its own store (bench/pareto.py: a g-SAE on a label-free gradient store)
        cfg = TrainConfig(**{"store": str(store), "site": SITE, "arch": arch, "d_sae": d_sae, "out": str(target),
                             "seed": seed, "tokens": train_tokens, "checkpoint_every": 10**9, "log_every": 5,
                             **(local or LOCAL), **extra})
        if not _done(target):
            say(f"  {folder}: {arch} {extra}")
            fit(cfg, overwrite=True, console=console)
        paths += sorted(str(p) for p in target.iterdir() if (p / "cfg.json").exists())

    say(f"[4/4] evaluate {len(paths)} SAEs spliced into the model on "
        f"{'all the' if eval_tokens is None else f'{eval_tokens:,}'} held-out tokens")
    eval_cfg = EvalConfig(saes=tuple(paths), store=str(store), tokens=eval_tokens, batch_size=16)
    results = evaluate_all(eval_cfg, console=console)   # transcoders too (evaluate/replace.py)
    import sys

    from rich.console import Console
    wide = Console(width=None if sys.stdout.isatty() else 180)
    print_table(results, wide)
    print_per_layer(results, wide)   # the CLT's replacement model, layer by layer
    write_json(results, out_dir / "results.json", config=eval_cfg.to_dict(), writer="evaluate demo")
    write_plot(results, out_dir / "pareto.png")
    write_report(out_dir / "timing.json", {"seconds": time.perf_counter() - t0}, writer="evaluate demo", indent=None)
    page = demo_browser(out_dir, store, paths, console)
    say(f"done in {time.perf_counter() - t0:,.0f} s. Outputs in {out_dir}/: results.json (every metric), "
        f"pareto.png (L0 and alive latents vs CE increase), saes/ (checkpoints, metrics.jsonl), store.zarr, "
        f"{CLT_STORE}")
    if page:
        say(f"feature browser (open it in a web browser, works offline): {page}")
    return results


def demo_browser(out_dir: Path, store, paths: list[str], console=None) -> str:
    """The feature browser for one SAE of every sweep (the middle one in name order; docs/features.md).
    A CLT is left out, saying so: the browser reads one site per dictionary from the store, and a
    CLT's latents read one site per layer (its replacement-model scores are in results.json)."""
    from sae_harvest.evaluate.features import FeaturesConfig, run_features
    from sae_harvest.evaluate.features_out import latent_url
    from sae_harvest.evaluate.replace import is_clt_folder

    say = console.print if console is not None else print
    by_folder: dict[str, list[str]] = {}
    for p in paths:
        if is_clt_folder(p):
            say(f"feature browser: {Path(p).name} left out (a cross-layer transcoder: its latents read every "
                f"layer's MLP input, the browser one site per dictionary)")
            continue
        by_folder.setdefault(Path(p).parent.name, []).append(p)
    chosen = [group[len(group) // 2] for group in by_folder.values()]
    if not chosen:
        say("feature browser: no dictionary it can show; not written")
        return ""
    say(f"feature browser for {len(chosen)} SAEs -> {out_dir / 'features'}")
    run_features(FeaturesConfig(store=str(store), saes=tuple(chosen), out=str(out_dir / "features"), tokens=65536,
                                top=10, band_examples=3), console=console)
    return latent_url(str(out_dir / "features"), 0, 0).split("#")[0]
