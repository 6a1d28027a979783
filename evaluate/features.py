"""`evaluate features`: a feature browser built from the store alone, no model forward.

Pass 1 (features_stats.LatentStats) streams the store's rows once per site, encoding them with every
SAE at that site: density, mean, max, histogram, top N. Pass 2 streams them again for the band
samples (the bands need the final max). Pass 3 (features_contexts) streams the rows of the
sequences the examples come from and records every latent's activation on every context token.
The unembedding (weights only) gives logit effects; decoder cosines give neighbours.
features_out writes the offline page or the Neuronpedia export. Under torchrun each rank takes a
contiguous share of the rows and the states merge exactly (sums, max, top keys).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_harvest.stores.cli import opt
from sae_harvest.stores.artifacts import enclosing_store
from sae_harvest.stores.urls import scrub_tree

from .features_out import written_by_us
from .features_stats import ROW_LIMIT, BandSamples, LatentStats, encode, encoded_slices, merged_keys
from .eval_tokens import EvaluateError, check_fits_store



@dataclass(frozen=True)
class FeaturesConfig:
    store: str = opt(None, "Store to read (needs its `tokens`).")
    saes: tuple[str, ...] = opt((), "SAE checkpoint folder; repeat for several.", cli=False)
    out: str = opt(None, "Output folder (new, empty, or one this command wrote before).")
    format: str = opt("html", "html: the offline page; neuronpedia: Neuronpedia's batch JSONL.",
                      choices=("html", "neuronpedia"))
    tokens: int | None = opt(None, "Use the store's first N rows (rows are shuffled; default all).")
    top: int = opt(20, "Top activating examples per latent.")
    bands: int = opt(5, "Activation bands of equal width between 0 and each latent's max.")
    band_examples: int = opt(4, "Examples sampled uniformly per band.")
    before: int = opt(24, "Context tokens before each example's token.")
    after: int = opt(8, "Context tokens after it.")
    pos0: bool = opt(False, "Count position 0 (BOS) rows too (default: left out, as in training).",
                     flag="--pos0")
    model: str | None = opt(None, "Model for the tokenizer and unembedding (default: the store's).")
    block_rows: int = opt(8192, "Rows read and encoded per step.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    seed: int = opt(0, "Seed of the band samples.")
    latent: int | None = opt(None, "Print the address of this latent's view at the end.")

    def to_dict(self) -> dict:
        return scrub_tree(dataclasses.asdict(self))


@dataclass
class Source:
    """One --sae: the SAE, its site, and what the passes found."""
    index: int
    path: str
    name: str
    site: str
    sae: object
    stats: dict | None = None
    bands: dict | None = None


# ---- inputs ------------------------------------------------------------------------------------
def check_inputs(cfg: FeaturesConfig, dev) -> tuple[object, list[Source]]:
    """Open the store and every SAE and check they fit, before anything is written."""
    from sae_harvest.stores import open_store
    from sae_harvest.stores import layout
    from sae_harvest.train.sae_io import CFG_NAME, load_sae
    from sae_harvest.train.saelens_format import hook_name_of

    if not cfg.saes:
        raise EvaluateError("no SAE given (--sae PATH)")
    if not cfg.store or not cfg.out:
        raise EvaluateError("--store and --out are required")
    for name in ("top", "bands", "band_examples", "block_rows"):
        if getattr(cfg, name) <= 0:
            raise EvaluateError(f"--{name.replace('_', '-')} must be positive")
    if cfg.before < 0 or cfg.after < 0 or (cfg.tokens is not None and cfg.tokens <= 0):
        raise EvaluateError("--before/--after must be >= 0 and --tokens positive")
    check_out(cfg.out)
    store = open_store(cfg.store)
    try:
        store.group[layout.TOKENS]
    except KeyError:
        raise EvaluateError(f"store {cfg.store} has no `tokens` array: contexts cannot be shown") from None
    if store.n_rows >= ROW_LIMIT:
        raise EvaluateError(f"store {cfg.store} has {store.n_rows} rows; at most {ROW_LIMIT - 1} are supported")
    sources = []
    for i, path in enumerate(cfg.saes):
        sae = load_sae(path, device=dev)
        folder = Path(path).parent if Path(path).is_file() else Path(path)
        saved = json.loads((folder / CFG_NAME).read_text())
        site = hook_name_of(saved)
        check_fits_store(path, sae, site, store, cfg.store, saved)
        name = (saved.get("sae_harvest") or {}).get("sweep_name") or folder.name
        if name in {s.name for s in sources}:
            name = f"{name} ({i})"
        sources.append(Source(i, str(path), name, site, sae))
    if cfg.latent is not None:
        widest = max(s.sae.cfg.d_sae for s in sources)
        if not 0 <= cfg.latent < widest:
            raise EvaluateError(f"--latent {cfg.latent} is out of range: the SAEs have latents 0 to {widest - 1}")
    return store, sources


def check_out(out: str) -> None:
    """Refuse an --out that is a file, or a non-empty folder this command did not write."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise EvaluateError(f"--out {out} is a file, not a folder")
    store = enclosing_store(p)
    if store is not None:   # it would become part of the store (and block its --overwrite)
        raise EvaluateError(f"--out {out} is inside the Zarr store {store}; write the browser outside it")
    if p.is_dir() and any(p.iterdir()) and not written_by_us(p):
        raise EvaluateError(f"--out {out} is a non-empty folder that `evaluate features` did not write; "
                            f"choose a new or empty folder")


# ---- streaming over rows -----------------------------------------------------------------------
def rank_rows(n_rows: int, block: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous share of rows [0, n_rows), in whole blocks."""
    blocks = -(-n_rows // block)
    lo, hi = blocks * rank // world, blocks * (rank + 1) // world
    return min(lo * block, n_rows), min(hi * block, n_rows)


def blocks(store, site: str, rows: tuple[int, int], block: int, pos0: bool, grads: bool):
    """(x, g, global rows, positions, rows read) for every block of rows [lo, hi), read one block ahead."""
    lo, hi = rows

    def read(a):
        sl = slice(a, min(a + block, hi))
        pos = np.asarray(store.rows_pos[sl])
        keep = np.ones(len(pos), bool) if pos0 else pos != 0
        x = store.acts(site, sl)[keep]
        g = store.grads(site, sl)[keep] if grads else None
        return x, g, np.arange(sl.start, sl.stop, dtype=np.int64)[keep], pos[keep], len(pos)

    starts = list(range(lo, hi, block))
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(read, starts[0]) if starts else None
        for i in range(len(starts)):
            cur = nxt.result()
            nxt = pool.submit(read, starts[i + 1]) if i + 1 < len(starts) else None
            yield cur


def stream(store, site, sources, rows, cfg, dev, bar, task, add) -> None:
    """Feed add(source, feats, rows_tensor, positions) every block of every SAE at `site`."""
    grads = store.has_grads and any(s.sae.uses_grads for s in sources)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    for x, g, idx, pos, n in blocks(store, site, rows, cfg.block_rows, cfg.pos0, grads):
        r = torch.from_numpy(idx).to(dev)
        for s in sources:
            for sl in encoded_slices(s.sae, len(x)):
                add(s, encode(s.sae, x[sl], g[sl] if g is not None and s.sae.uses_grads else None, dev), r[sl], pos[sl])
        if bar is not None:
            bar.advance(task, n * world)   # rank 0 shows the whole job's rows, assuming equal speed


# ---- torchrun ----------------------------------------------------------------------------------
def init_world(dev_name: str):
    """(rank, world, device); a process group when started by torchrun."""
    import torch.distributed as dist
    from sae_harvest.stores.cli import pick_device
    from sae_harvest.train.distributed import launched

    if not launched():
        return 0, 1, pick_device(dev_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = pick_device(dev_name)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def merge_stats(st: LatentStats, world: int) -> None:
    import torch.distributed as dist

    if world == 1:
        return
    for t, op in ((st.fires, dist.ReduceOp.SUM), (st.sum, dist.ReduceOp.SUM), (st.hist, dist.ReduceOp.SUM),
                  (st.max, dist.ReduceOp.MAX)):
        dist.all_reduce(t, op=op)
    n = torch.tensor([st.rows], dtype=torch.int64, device=st.fires.device)
    dist.all_reduce(n)
    st.rows = int(n)
    merge_table(st.top, world)


def merge_table(table, world: int) -> None:
    import torch.distributed as dist

    if world == 1:
        return
    parts = [torch.empty_like(table.keys) for _ in range(world)]
    dist.all_gather(parts, table.keys)
    table.keys = merged_keys(parts, table.keys.shape[1])


def merge_bands(b: BandSamples, world: int) -> None:
    import torch.distributed as dist

    if world == 1:
        return
    dist.all_reduce(b.count)
    merge_table(b.table, world)


def progress_bar(console=None, disable: bool = False):
    """pass, bar, percent, rows/s, eta, elapsed: within 80 columns for a billion rows."""
    from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from sae_harvest.stores.progress import RateColumn

    return Progress(TextColumn("[bold]{task.description:<8}"), BarColumn(bar_width=20), TaskProgressColumn(),
                    RateColumn("rows"), TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn(),
                    console=console, disable=disable, transient=False, refresh_per_second=4)


# ---- the whole command -------------------------------------------------------------------------
def run_features(cfg: FeaturesConfig, *, progress: bool = True, console=None) -> dict:
    """Compute everything and write cfg.out; returns the summary (also in features.json)."""
    from .features_contexts import collect_contexts
    from .features_neuronpedia import write_neuronpedia
    from .features_out import write_output
    from .features_page import write_page

    rank, world, dev = init_world(cfg.device)
    store, sources = check_inputs(cfg, dev)
    t0 = time.perf_counter()
    n_total = store.n_rows if cfg.tokens is None else min(cfg.tokens, store.n_rows)
    rows = rank_rows(n_total, cfg.block_rows, rank, world)
    sites = sorted({s.site for s in sources})
    bar = progress_bar(console, disable=not progress or rank != 0)
    contexts, summary = None, None
    try:
        with bar:
            for site in sites:
                _stats_and_bands(store, site, [s for s in sources if s.site == site], rows, n_total, cfg, dev,
                                 world, bar)
            contexts = collect_contexts(store, sources, cfg, dev, rank, world, bar)
        if rank == 0:
            summary = write_output(cfg, store, sources, contexts, dev, seconds=time.perf_counter() - t0,
                                   write_format=write_page if cfg.format == "html" else write_neuronpedia)
    finally:   # the memory-mapped work files go, whatever happened
        if contexts is not None:
            contexts.close()
    if world > 1:
        torch.distributed.barrier()
    return summary


def _stats_and_bands(store, site, here, rows, n_total, cfg, dev, world, bar) -> None:
    """Passes 1 and 2 for the SAEs at one site: s.stats, then s.bands (needs the merged max)."""
    acc = {s.index: LatentStats(s.sae.cfg.d_sae, cfg.top, dev) for s in here}
    task = bar.add_task("stats", total=n_total, info="")
    stream(store, site, here, rows, cfg, dev, bar, task, lambda s, f, r, p: acc[s.index].add(f, r))
    for s in here:
        merge_stats(acc[s.index], world)
        s.stats = acc[s.index].result()
    bands = {s.index: BandSamples(s.stats["max"], cfg.bands, cfg.band_examples, cfg.seed, dev) for s in here}
    task = bar.add_task("bands", total=n_total, info="")
    stream(store, site, here, rows, cfg, dev, bar, task, lambda s, f, r, p: bands[s.index].add(f, r))
    for s in here:
        merge_bands(bands[s.index], world)
        s.bands = bands[s.index].result()
