"""Where training batches come from: a store (the normal case) or a tensor (meta-SAEs).

A feed yields {"acts": float32 tensor [n, d], "grads": tensor or None} and can
report and restore its position, so `--resume` continues on exactly the next batch.
"""
from __future__ import annotations

import numpy as np
import torch


class StoreFeed:
    def __init__(self, store, site: str, batch_size: int, *, rows: tuple[int, int], seed: int,
                 grads: bool, exclude_pos0: bool, state: dict | None = None):
        self.iter = store.batches(site, batch_size, rows=rows, seed=seed, grads=grads,
                                  exclude_pos0=exclude_pos0, state=state)
        self.site = site
        self.grads = grads

    def __iter__(self):
        for batch in self.iter:
            acts = torch.from_numpy(batch["acts"][self.site])
            grads = torch.from_numpy(batch["grads"][self.site]) if self.grads else None
            yield {"acts": acts, "grads": grads}

    def state(self) -> dict:
        return self.iter.state()


class TensorFeed:
    """Seeded reshuffle every epoch; used for the meta-SAE's few thousand decoder rows."""

    def __init__(self, data: torch.Tensor, batch_size: int, *, seed: int, state: dict | None = None):
        self.data = data
        self.batch_size = min(batch_size, len(data))
        self.seed = seed
        s = state or {"epoch": 0, "offset": 0}
        self.epoch, self.offset = int(s["epoch"]), int(s["offset"])

    def __iter__(self):
        while True:
            order = torch.from_numpy(np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data)))
            while self.offset + self.batch_size <= len(order):
                idx = order[self.offset:self.offset + self.batch_size]
                self.offset += self.batch_size
                yield {"acts": self.data[idx], "grads": None}
            self.epoch, self.offset = self.epoch + 1, 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


def holdout_split(store, fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train rows, held-out rows): the held-out part is the last whole blocks of the store."""
    block = store.block_rows
    n = store.n_rows
    held = int(round(n * fraction / block)) * block if fraction > 0 else 0
    if fraction > 0 and held == 0:
        held = min(block, n // 2)
    held = min(held, n // 2)
    return (0, n - held), (n - held, n)


def sample_rows(store, site: str, rows: tuple[int, int], n: int, seed: int, exclude_pos0: bool,
                grads: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """A random sample of up to n rows (activations, gradients) from a row range: for the input
    scale, b_dec init and gtopk's beta calibration."""
    lo, hi = rows
    rng = np.random.default_rng(seed)
    # choice over the count, not over np.arange: memory follows n, not the store's row count
    idx = lo + np.sort(rng.choice(hi - lo, size=min(n, hi - lo), replace=False))
    if exclude_pos0:
        idx = idx[store.rows_pos.get_orthogonal_selection((idx,)) != 0]
    return store.acts(site, idx), (store.grads(site, idx) if grads else None)
