"""The training feed: contiguous blocks in a seeded random order, read ahead by threads.

Rows in a store are already shuffled across sequences within each window, so a
contiguous block is a fair sample; reading whole blocks keeps reads large (one
chunk or more) and cheap on object storage. The iterator is deterministic given
its arguments, and `state()` / `state=` resume it exactly.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np



class BlockBatches:
    def __init__(self, store, sites, batch_size: int, *, rows: tuple[int, int] | None = None,
                 block_rows: int | None = None, seed: int = 0, grads: bool = False,
                 exclude_pos0: bool = False, prefetch: int = 4, state: dict | None = None,
                 epochs: int | None = None, drop_last: bool = True):
        self.store = store
        self.sites = [sites] if isinstance(sites, str) else list(sites)
        for site in self.sites:
            store.width(site)  # raises a clear StoreError for an unknown site
        if grads and not store.has_grads:
            from .errors import StoreError
            raise StoreError(f"store {store.path} has no gradients (harvest with --grads)")
        self.batch_size = int(batch_size)
        start, stop = rows if rows is not None else (0, store.n_rows)
        self.block_rows = int(block_rows or max(store.block_rows, self.batch_size))
        # block edges sit on absolute multiples of block_rows so reads align with chunks
        edges = list(range(start - start % self.block_rows + self.block_rows, stop, self.block_rows))
        bounds = [start] + [e for e in edges if e > start] + [stop]
        self.blocks = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        self.seed = seed
        self.grads = grads
        self.exclude_pos0 = exclude_pos0
        self.prefetch = max(1, prefetch)
        self.epochs = epochs
        self.drop_last = drop_last
        s = state or {"epoch": 0, "block": 0, "offset": 0}
        self._state = (int(s["epoch"]), int(s["block"]), int(s["offset"]))

    def state(self) -> dict:
        epoch, block, offset = self._state
        return {"epoch": epoch, "block": block, "offset": offset}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))

    def _read_block(self, index: int) -> dict:
        a, b = self.blocks[index]
        out = {"rows": np.arange(a, b, dtype=np.int64)}
        for site in self.sites:
            out["acts/" + site] = self.store.acts(site, slice(a, b))
            if self.grads:
                out["grads/" + site] = self.store.grads(site, slice(a, b))
        if self.exclude_pos0:
            keep = self.store.rows_pos[a:b] != 0
            out = {k: v[keep] for k, v in out.items()}
        return out

    def _positions(self):
        epoch, block, _ = self._state
        while self.epochs is None or epoch < self.epochs:
            order = self._order(epoch)
            for pos in range(block, len(order)):
                yield epoch, pos, int(order[pos])
            epoch, block = epoch + 1, 0

    def _blocks(self):
        with ThreadPoolExecutor(self.prefetch) as pool:
            ahead = deque()
            positions = self._positions()
            for epoch, pos, index in positions:
                ahead.append((epoch, pos, pool.submit(self._read_block, index)))
                if len(ahead) >= self.prefetch:
                    break
            while ahead:
                epoch, pos, fut = ahead.popleft()
                nxt = next(positions, None)
                if nxt is not None:
                    ahead.append((nxt[0], nxt[1], pool.submit(self._read_block, nxt[2])))
                yield epoch, pos, fut.result()

    def _batch(self, parts: list[dict]) -> dict:
        keys = parts[0].keys()
        cat = {k: (parts[0][k] if len(parts) == 1 else np.concatenate([p[k] for p in parts])) for k in keys}
        batch = {"rows": cat["rows"], "acts": {}, "grads": {}}
        for site in self.sites:
            batch["acts"][site] = cat["acts/" + site]
            if self.grads:
                batch["grads"][site] = cat["grads/" + site]
        return batch

    def __iter__(self):
        """Yield {"rows": int64 [n], "acts": {site: f32 [n, d]}, "grads": {...}} with n == batch_size."""
        parts, have = [], 0
        first = True
        for epoch, pos, block in self._blocks():
            n = len(block["rows"])
            offset = self._state[2] if first else 0
            first = False
            while offset < n:
                take = min(n - offset, self.batch_size - have)
                parts.append({k: v[offset:offset + take] for k, v in block.items()})
                have += take
                offset += take
                if have == self.batch_size:
                    self._state = (epoch, pos, offset) if offset < n else (epoch, pos + 1, 0)
                    if self._state[1] == len(self.blocks):
                        self._state = (epoch + 1, 0, 0)
                    yield self._batch(parts)
                    parts, have = [], 0
            if self.epochs is not None and epoch == self.epochs - 1 and pos == len(self.blocks) - 1 \
                    and parts and not self.drop_last:
                self._state = (epoch + 1, 0, 0)
                yield self._batch(parts)
                parts, have = [], 0
