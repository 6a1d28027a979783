"""Pass 3 of `evaluate features`: the tokens around every example and the latent's activation on
each of them, from the store alone.

Examples are laid out on a fixed grid per SAE: slot f*N + j is latent f's j-th top row, slot
F*N + (f*B + b)*k + j its j-th sample of band b (row -1: no such example). Each slot gets the
window [pos - before, pos + after] of its sequence. The rows of a sequence all lie in its shuffle
window (docs/store-format.md), so the pass reads only the windows holding a selected sequence,
finds the selected rows through `rows/seq`, encodes just those, and writes each value into every
slot whose window covers it. Values and tokens go into memory-mapped files beside the output
(memory stays bounded whatever the number of latents and examples); under torchrun each rank
fills the rows of its share and the files are summed. Every cell inside its sequence must be
filled exactly once, or the pass raises: a missing row never shows as zero.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .features_stats import encode, encoded_slices
from .splice import EvaluateError

PAIRS_PER_STEP = 1 << 22


class Contexts:
    """Per SAE index: examples (rows, seqs, positions, latents) and the [slots, W] value and token maps."""

    def __init__(self, work: Path, width: int, before: int):
        self.work, self.width, self.before = work, width, before
        self.rows, self.seqs, self.pos, self.latents, self.values, self.tokens = {}, {}, {}, {}, {}, {}

    def close(self) -> None:
        self.values.clear()
        self.tokens.clear()
        shutil.rmtree(self.work, ignore_errors=True)


def example_rows(src, cfg) -> np.ndarray:
    return np.concatenate([src.stats["top_rows"].reshape(-1), src.bands["rows"].reshape(-1)]).astype(np.int64)


def example_latents(src, cfg) -> np.ndarray:
    F, N = src.sae.cfg.d_sae, cfg.top
    k = cfg.bands * cfg.band_examples
    return np.concatenate([np.repeat(np.arange(F), N), np.repeat(np.arange(F), k)]).astype(np.int64)


def _read_at(arr, rows: np.ndarray, step: int = 1 << 20) -> np.ndarray:
    """arr[rows] for sorted unique rows, in steps (a zarr orthogonal read per step)."""
    out = [np.asarray(arr.get_orthogonal_selection((rows[i:i + step],))) for i in range(0, len(rows), step)]
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def collect_contexts(store, sources, cfg, dev, rank: int, world: int, bar) -> Contexts:
    W = cfg.before + cfg.after + 1
    parent = Path(cfg.out).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{Path(cfg.out).name}.work-{rank}-", dir=parent))
    ctx = Contexts(work, W, cfg.before)
    try:
        _fill(ctx, store, sources, cfg, dev, rank, world, bar)
    except BaseException:
        ctx.close()
        raise
    return ctx


def _fill(ctx, store, sources, cfg, dev, rank, world, bar) -> None:
    W, work = ctx.width, ctx.work
    for src in sources:
        rows = example_rows(src, cfg)
        valid = rows >= 0
        uniq, inverse = np.unique(rows[valid], return_inverse=True)
        seq = np.full(len(rows), -1, np.int64)
        pos = np.full(len(rows), -1, np.int64)
        seq[valid] = _read_at(store.rows_seq, uniq)[inverse]
        pos[valid] = _read_at(store.rows_pos, uniq)[inverse]
        ctx.rows[src.index], ctx.seqs[src.index], ctx.pos[src.index] = rows, seq, pos
        ctx.latents[src.index] = example_latents(src, cfg)
        # a new memory-mapped file reads as zeros: ranks add their values into it, then it is summed
        ctx.values[src.index] = _map(work / f"values-{src.index}.npy", np.float32, (len(rows), W))
    filled = {s.index: _map(work / f"filled-{s.index}.npy", np.int32, (len(ctx.rows[s.index]), W)) for s in sources}
    for site in sorted({s.site for s in sources}):
        here = [s for s in sources if s.site == site]
        _site_pass(store, site, here, ctx, filled, cfg, dev, rank, world, bar)
    for src in sources:
        _merge(ctx.values[src.index], world, dev)
        _merge(filled[src.index], world, dev)
        _check_filled(src, ctx, filled[src.index], store)
        if rank == 0:
            ctx.tokens[src.index] = _tokens(store, ctx, src.index, work)


def _map(path, dtype, shape) -> np.ndarray:
    return np.lib.format.open_memmap(path, "w+", dtype, shape)


def _site_pass(store, site, here, ctx, filled, cfg, dev, rank, world, bar) -> None:
    ctx_len, per_window = store.ctx_len, store.attrs["window_seqs"]
    selected = np.zeros(store.n_seqs, bool)
    by_seq = {}
    for s in here:
        seq = ctx.seqs[s.index]
        selected[seq[seq >= 0]] = True
        order = np.argsort(seq, kind="stable")
        by_seq[s.index] = (order, seq[order])
    windows = np.unique(np.nonzero(selected)[0] // per_window)
    window_rows = per_window * ctx_len
    starts = [a for w in windows for a in range(w * window_rows, min((w + 1) * window_rows, store.n_rows),
                                               cfg.block_rows)]
    mine = starts[len(starts) * rank // world: len(starts) * (rank + 1) // world]
    grads = store.has_grads and any(s.sae.uses_grads for s in here)
    task = bar.add_task("contexts", total=len(starts) * cfg.block_rows, info="")
    for a in mine:
        b = min(a + cfg.block_rows, (a // window_rows + 1) * window_rows, store.n_rows)
        seq = np.asarray(store.rows_seq[a:b]).astype(np.int64)
        match = np.nonzero(selected[seq])[0]
        bar.advance(task, cfg.block_rows * world)
        if not len(match):
            continue
        pos = np.asarray(store.rows_pos[a:b]).astype(np.int64)[match]
        seq = seq[match]
        x = store.acts(site, slice(a, b))[match]
        g = store.grads(site, slice(a, b))[match] if grads else None
        for s in here:
            for sl in encoded_slices(s.sae, len(x)):
                feats = encode(s.sae, x[sl], g[sl] if g is not None and s.sae.uses_grads else None, dev)
                _scatter(feats, seq[sl], pos[sl], by_seq[s.index], ctx, s.index, filled[s.index])


def _scatter(feats, seq, pos, sorted_by_seq, ctx, i, filled) -> None:
    """Write feats[row, latent of slot] into every slot whose window covers the row."""
    order, sorted_seq = sorted_by_seq
    lo = np.searchsorted(sorted_seq, seq, "left")
    cnt = np.searchsorted(sorted_seq, seq, "right") - lo
    cum = np.cumsum(cnt)
    start = 0
    while start < len(seq):   # bounded pairs per step, however many slots share a sequence
        stop = max(start + 1, int(np.searchsorted(cum, (cum[start - 1] if start else 0) + PAIRS_PER_STEP, "right")))
        c = cnt[start:stop]
        rep = np.repeat(np.arange(start, stop), c)
        within = np.arange(len(rep)) - np.repeat(np.cumsum(c) - c, c)
        slot = order[np.repeat(lo[start:stop], c) + within]
        off = pos[rep] - ctx.pos[i][slot] + ctx.before
        ok = (off >= 0) & (off < ctx.width)
        rep, slot, off = rep[ok], slot[ok], off[ok]
        if len(rep):
            lat = torch.from_numpy(ctx.latents[i][slot]).to(feats.device)
            r = torch.from_numpy(rep).to(feats.device)
            ctx.values[i][slot, off] = feats[r, lat].cpu().numpy()
            np.add.at(filled, (slot, off), 1)
        start = stop


def _merge(arr: np.ndarray, world: int, dev, step: int = 1 << 16) -> None:
    """Sum a memory-mapped array over the ranks, in steps (on the device: NCCL reduces only CUDA tensors)."""
    if world == 1:
        return
    import torch.distributed as dist

    for a in range(0, len(arr), step):
        t = torch.from_numpy(np.array(arr[a:a + step])).to(dev)
        dist.all_reduce(t)
        arr[a:a + step] = t.cpu().numpy()


def _inside(pos: np.ndarray, rows: np.ndarray, before: int, width: int, ctx_len: int) -> np.ndarray:
    """[slots, W] bool: the cell is a position of its example's sequence."""
    p = pos[:, None] - before + np.arange(width)[None, :]
    return (rows[:, None] >= 0) & (p >= 0) & (p < ctx_len)


def _check_filled(src, ctx, filled, store, step: int = 1 << 16) -> None:
    i = src.index
    for a in range(0, len(filled), step):
        sl = slice(a, a + step)
        inside = _inside(ctx.pos[i][sl], ctx.rows[i][sl], ctx.before, ctx.width, store.ctx_len)
        bad = np.nonzero(inside & (filled[sl] != 1))
        if len(bad[0]):
            slot = a + int(bad[0][0])
            raise EvaluateError(f"store {store.path}: sequence {int(ctx.seqs[i][slot])} position "
                                f"{int(ctx.pos[i][slot]) - ctx.before + int(bad[1][0])} was found "
                                f"{int(filled[sl][bad][0])} times in rows/seq (expected once): the store is damaged")
        ctx.values[i][sl][~inside] = np.nan


def _tokens(store, ctx, i, work, step: int = 4096) -> np.ndarray:
    """[slots, W] int32 token ids around every example (-1 outside its sequence)."""
    seqs = ctx.seqs[i]
    out = np.lib.format.open_memmap(work / f"tokens-{i}.npy", "w+", np.int32, (len(seqs), ctx.width))
    out[:] = -1
    uniq = np.unique(seqs[seqs >= 0])
    order = np.argsort(seqs, kind="stable")
    sorted_seq = seqs[order]
    for a in range(0, len(uniq), step):
        part = uniq[a:a + step]
        toks = np.asarray(store.tokens.get_orthogonal_selection((part, slice(None))))
        lo, hi = np.searchsorted(sorted_seq, part[0], "left"), np.searchsorted(sorted_seq, part[-1], "right")
        slots = order[lo:hi]
        rowof = np.searchsorted(part, seqs[slots])
        p = ctx.pos[i][slots][:, None] - ctx.before + np.arange(ctx.width)[None, :]
        inside = (p >= 0) & (p < store.ctx_len)
        vals = toks[rowof[:, None], np.clip(p, 0, store.ctx_len - 1)]
        out[slots] = np.where(inside, vals, -1)
    return out
