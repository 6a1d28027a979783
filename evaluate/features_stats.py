"""Exact streaming statistics of every latent of an SAE over a store's rows (`evaluate features`).

Everything here is fed blocks of encoded rows (`feats [b, F]` with their global row indices) and
keeps state of fixed size, independent of the number of rows:

  - fires [F] (int64), sum [F] (float64), max [F]: density = fires / rows, mean over firing rows;
  - hist [F, HIST_BINS] (int64) on fixed log-spaced edges (HIST_EDGES), the same for every latent,
    so per-rank histograms merge by adding;
  - the top N rows of every latent, kept as int64 keys `value bits << 32 | (ROW_LIMIT - row)`:
    a positive float32's bits order like its value, and the low half breaks ties by the smaller
    row, so keys are unique and "the N largest keys" is exactly a brute-force sort by
    (value desc, row asc), on any split of the rows over blocks or ranks;
  - band samples (a second pass, once the final max is known): band j of a latent holds its
    firing values in (j max/B, (j+1) max/B]; every (row, latent) gets a fixed pseudo-random
    priority (splitmix64 of row and latent, `band_priority`) and each band keeps the k rows of
    smallest priority: a uniform sample without replacement, exact and the same on any split.

A latent "fires" on a row when its activation is > 0 (every architecture here outputs >= 0).
"""
from __future__ import annotations

import numpy as np
import torch

ROW_LIMIT = (1 << 32) - 1          # rows are packed into the low 32 bits of a key
LOW = (1 << 32) - 1
# 10 bins per decade from 1e-4 to 1e4 (80 bins) plus one below and one above: bin 0 holds
# (0, 1e-4), bin i (1..80) holds [edge[i-1], edge[i]), bin 81 holds [1e4, inf).
HIST_EDGES = 10.0 ** (np.arange(-40, 41) / 10.0)
HIST_BINS = len(HIST_EDGES) + 1


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


_GOLDEN, _M1, _M2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic, the same bits as uint64)."""
    x = x + _GOLDEN
    x = (x ^ _lsr(x, 30)) * _M1
    x = (x ^ _lsr(x, 27)) * _M2
    return x ^ _lsr(x, 31)


def band_priority(rows: torch.Tensor, latents: torch.Tensor, seed: int) -> torch.Tensor:
    """int64 in [0, 2^31): the fixed random priority of (row, latent) for the band samples."""
    return _lsr(_mix64(_mix64(rows + (seed << 40)) + latents), 33)


def row_keys(high: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keys `high << 32 | (ROW_LIMIT - row)`: larger high first, then smaller row."""
    return (high << 32) | (ROW_LIMIT - rows)


def key_rows(keys: torch.Tensor) -> torch.Tensor:
    return ROW_LIMIT - (keys & LOW)


def key_values(keys: torch.Tensor) -> torch.Tensor:
    """The float32 value packed into a top-N key (keys < 0 are empty slots: NaN)."""
    bits = (keys >> 32).to(torch.int32)
    return torch.where(keys >= 0, bits.view(torch.float32), torch.full_like(bits, float("nan"), dtype=torch.float32))


class TopTable:
    """For each of S segments, the K largest int64 keys seen (-1: empty slot), merged exactly."""

    def __init__(self, segments: int, k: int, device):
        self.keys = torch.full((segments, k), -1, dtype=torch.int64, device=device)

    def add(self, segment: torch.Tensor, key: torch.Tensor) -> None:
        k = self.keys.shape[1]
        cand = key > self.keys[segment, k - 1]      # cannot enter a full segment otherwise
        segment, key = segment[cand], key[cand]
        if not len(key):
            return
        # per segment, the k largest candidates: sort by key (desc), then stably by segment
        order = torch.argsort(key, descending=True, stable=True)
        segment, key = segment[order], key[order]
        order = torch.argsort(segment, stable=True)
        segment, key = segment[order], key[order]
        starts = torch.searchsorted(segment, segment, right=False)
        rank = torch.arange(len(segment), device=segment.device) - starts
        keep = rank < k
        segment, key, rank = segment[keep], key[keep], rank[keep]
        touched = torch.unique(segment)
        fresh = torch.full((len(touched), k), -1, dtype=torch.int64, device=key.device)
        fresh[torch.searchsorted(touched, segment), rank] = key
        merged = torch.cat([self.keys[touched], fresh], dim=1)
        self.keys[touched] = merged.topk(k, dim=1).values   # keys are unique: no tie to break


def merged_keys(parts: list[torch.Tensor], k: int) -> torch.Tensor:
    """The K largest keys per segment over the tables of ranks that saw disjoint rows (keys are
    unique, so this is exactly the table of one process that saw them all)."""
    return torch.cat(parts, dim=1).topk(k, dim=1).values


class LatentStats:
    """Pass 1: density, mean, max, histogram and top N of every latent."""

    def __init__(self, d_sae: int, top_n: int, device):
        self.d_sae, self.device = d_sae, device
        self.rows = 0
        self.fires = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self.hist = torch.zeros(d_sae * HIST_BINS, dtype=torch.int64, device=device)
        self.edges = torch.tensor(HIST_EDGES, dtype=torch.float32, device=device)
        self.top = TopTable(d_sae, top_n, device)

    def add(self, feats: torch.Tensor, rows: torch.Tensor, top_only: bool = False) -> None:
        """feats [b, F] float32 of the global rows `rows` [b] (int64, on feats' device)."""
        self.rows += len(feats)
        r, f = (feats > 0).nonzero(as_tuple=True)
        v = feats[r, f]
        self.top.add(f, row_keys(v.view(torch.int32).to(torch.int64), rows[r]))
        if top_only:     # the benchmark's bare pass
            return
        self.fires += torch.bincount(f, minlength=self.d_sae)
        self.sum.index_add_(0, f, v.double())
        self.max.scatter_reduce_(0, f, v, reduce="amax")
        b = torch.bucketize(v, self.edges, right=True)   # edges[b-1] <= v < edges[b]
        self.hist.index_add_(0, f * HIST_BINS + b, torch.ones_like(b))

    def result(self) -> dict:
        """numpy arrays: rows, fires, density, mean (over firing rows), max, hist [F, HIST_BINS],
        top_rows / top_values [F, N] (row -1 and NaN where a latent fired on fewer rows)."""
        keys = self.top.keys.cpu()
        fires = self.fires.cpu().numpy()
        return {"rows": self.rows, "fires": fires, "density": fires / max(self.rows, 1),
                "mean": np.where(fires > 0, self.sum.cpu().numpy() / np.maximum(fires, 1), 0.0),
                "max": self.max.cpu().numpy(), "hist": self.hist.view(self.d_sae, HIST_BINS).cpu().numpy(),
                "top_rows": torch.where(keys >= 0, key_rows(keys), -1).numpy(),
                "top_values": key_values(keys).numpy()}


class BandSamples:
    """Pass 2: per latent and band, how many firing rows fall in it and k of them sampled
    uniformly (smallest band_priority)."""

    def __init__(self, maxima: np.ndarray, bands: int, k: int, seed: int, device):
        self.bands, self.seed = bands, seed
        self.max = torch.as_tensor(maxima, dtype=torch.float64, device=device)
        self.count = torch.zeros(len(maxima) * bands, dtype=torch.int64, device=device)
        self.table = TopTable(len(maxima) * bands, k, device)

    def add(self, feats: torch.Tensor, rows: torch.Tensor) -> None:
        r, f = (feats > 0).nonzero(as_tuple=True)
        band = band_of(feats[r, f].double(), self.max[f], self.bands)
        segment = f * self.bands + band
        self.count += torch.bincount(segment, minlength=len(self.count))
        # smallest priority first == largest (2^31 - 1 - priority)
        high = ((1 << 31) - 1) - band_priority(rows[r], f, self.seed)
        self.table.add(segment, row_keys(high, rows[r]))

    def result(self) -> dict:
        """count [F, B]; rows [F, B, k] sampled rows (-1: the band holds fewer than k)."""
        keys = self.table.keys.cpu()
        F = len(self.max)
        return {"count": self.count.view(F, self.bands).cpu().numpy(),
                "rows": torch.where(keys >= 0, key_rows(keys), -1).view(F, self.bands, -1).numpy()}


def band_of(values: torch.Tensor, maxima: torch.Tensor, bands: int) -> torch.Tensor:
    """Band index of firing values (float64): ceil(v * B / max) - 1, clamped to [0, B-1]."""
    return (torch.ceil(values * bands / maxima) - 1).clamp(0, bands - 1).to(torch.int64)


def mini_hist(hist_row: np.ndarray, bins: int = 16) -> tuple[int, list[int]]:
    """(first fine bin, counts) of a latent's histogram cut to the bins it uses, then coarsened to at
    most `bins` bars for the index table (whole fine bins per bar, so counts stay exact sums)."""
    used = np.nonzero(hist_row)[0]
    if not len(used):
        return 0, []
    lo, hi = int(used[0]), int(used[-1]) + 1
    step = -(-(hi - lo) // bins)
    return lo, [int(hist_row[i:i + step].sum()) for i in range(lo, hi, step)]


def encode(sae, x: np.ndarray, g: np.ndarray | None, dev) -> torch.Tensor:
    dtype = sae.W_dec.dtype
    with torch.no_grad():
        xt = torch.from_numpy(x).to(dev, dtype)
        gt = torch.from_numpy(g).to(dev, dtype) if g is not None else None
        return sae.encode(xt, gt).float()


ENCODED_ELEMENTS = 1 << 25     # latents x rows encoded at once (128 MB of float32), whatever the width


def encoded_slices(sae, n: int):
    """Row slices of a block small enough that their encoding holds at most ENCODED_ELEMENTS values."""
    step = max(1, ENCODED_ELEMENTS // sae.cfg.d_sae)
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]
