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
    """part=(rank, world): yield only this rank's contiguous share of every batch (batch_size is the
    global batch, cut exactly as with world 1), reading only the rows of that share.
    decode=False: values come back as stored (float16 / float32, bfloat16 as uint16 bits); see
    `encodings`. Yields {"rows": int64 [n], "acts": {site: [n, d]}, "grads": {...}}."""

    def __init__(self, store, sites, batch_size: int, *, rows: tuple[int, int] | None = None,
                 block_rows: int | None = None, seed: int = 0, grads: bool = False,
                 exclude_pos0: bool = False, prefetch: int = 4, state: dict | None = None,
                 epochs: int | None = None, drop_last: bool = True, part: tuple[int, int] = (0, 1),
                 decode: bool = True):
        self.store = store
        self.sites = [sites] if isinstance(sites, str) else list(sites)
        for site in self.sites:
            store.width(site)  # raises a clear StoreError for an unknown site
        if grads and not store.has_grads:
            from .errors import StoreError
            raise StoreError(f"store {store.path} has no gradients (harvest with --grads)")
        self.batch_size = int(batch_size)
        self.rank, self.world = int(part[0]), int(part[1])
        if self.world > 1 and (self.batch_size % self.world or not drop_last):
            raise ValueError("split batches need batch_size divisible by the world size and drop_last")
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
        self.decode = decode
        self.encodings = {"acts/" + s: store.encoding(s) for s in self.sites}
        if grads:
            self.encodings.update({"grads/" + s: store.encoding(s, grads=True) for s in self.sites})
        s = state or {"epoch": 0, "block": 0, "offset": 0}
        self._state = (int(s["epoch"]), int(s["block"]), int(s["offset"]))

    def state(self) -> dict:
        """Position after the last batch yielded: the next batch starts there."""
        epoch, block, offset = self._state
        return {"epoch": epoch, "block": block, "offset": offset}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))

    def _kept(self, index: int):
        """Raw rows of a block that are not position 0 (None: all rows are kept)."""
        if not self.exclude_pos0:
            return None
        a, b = self.blocks[index]
        return np.flatnonzero(self.store.rows_pos[a:b] != 0) + a

    def _plan(self, pool):
        """Cut the blocks into batches from row counts alone (no values read yet). Per block yields
        (block index, kept raw rows or None for all, steps): a step is ("rows", lo, hi), a range of
        the block's kept rows in this rank's share, or ("end", state), a batch complete. The
        position arrays of the next blocks are fetched ahead on `pool` (object-store latency)."""
        epoch, block, offset = self._state
        size = self.batch_size
        mine = (self.rank * size // self.world, (self.rank + 1) * size // self.world)
        have = 0
        while self.epochs is None or epoch < self.epochs:
            order = self._order(epoch)
            kept = {}
            for pos in range(block, len(order)):
                for ahead in range(pos, min(pos + self.prefetch, len(order))):
                    if ahead not in kept:
                        kept[ahead] = pool.submit(self._kept, int(order[ahead]))
                index = int(order[pos])
                a, b = self.blocks[index]
                keep = kept.pop(pos).result()
                n = len(keep) if keep is not None else b - a
                steps = []
                while offset < n:
                    take = min(n - offset, size - have)
                    lo, hi = max(have, mine[0]), min(have + take, mine[1])
                    if hi > lo:
                        steps.append(("rows", offset + lo - have, offset + hi - have))
                    have += take
                    offset += take
                    if have == size:
                        state = (epoch, pos, offset) if offset < n else (epoch, pos + 1, 0)
                        steps.append(("end", state if state[1] < len(order) else (epoch + 1, 0, 0)))
                        have = 0
                if self.epochs is not None and epoch == self.epochs - 1 and pos == len(order) - 1 \
                        and have and not self.drop_last:
                    steps.append(("end", (epoch + 1, 0, 0)))
                    have = 0
                yield index, keep, steps
                offset = 0
            epoch, block = epoch + 1, 0

    def _read(self, index: int, keep, steps) -> list[dict]:
        """The values of the block's "rows" steps; adjacent ranges are read as one."""
        a, _ = self.blocks[index]
        ranges = [(lo, hi) for kind, lo, hi in (s for s in steps if s[0] == "rows")] if steps else []
        merged = []
        for lo, hi in ranges:
            if merged and merged[-1][1] == lo:
                merged[-1][1] = hi
            else:
                merged.append([lo, hi])
        pieces = []
        for lo, hi in merged:
            rows = keep[lo:hi] if keep is not None else np.arange(a + lo, a + hi, dtype=np.int64)
            span = slice(int(rows[0]), int(rows[-1]) + 1)
            pick = rows - span.start if keep is not None else slice(None)
            out = {"rows": rows.astype(np.int64)}
            for site in self.sites:
                out["acts/" + site] = self.store.acts(site, span, decode=self.decode)[pick]
                if self.grads:
                    out["grads/" + site] = self.store.grads(site, span, decode=self.decode)[pick]
            pieces.append((lo, out))
        # split the merged reads back into the steps' ranges
        result = []
        for lo, hi in ranges:
            start, values = next((s, v) for s, v in reversed(pieces) if s <= lo)
            result.append({k: v[lo - start:hi - start] for k, v in values.items()})
        return result

    def _ahead(self):
        with ThreadPoolExecutor(2 * self.prefetch) as pool:   # block reads + position lookups
            ahead = deque()
            for index, keep, steps in self._plan(pool):
                ahead.append((steps, pool.submit(self._read, index, keep, steps)))
                if len(ahead) >= self.prefetch:
                    yield ahead.popleft()
            while ahead:
                yield ahead.popleft()

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
        """Yield batches of batch_size rows (this rank's batch_size / world)."""
        parts = []
        for steps, fut in self._ahead():
            values = iter(fut.result())
            for step in steps:
                if step[0] == "rows":
                    parts.append(next(values))
                else:
                    self._state = step[1]
                    yield self._batch(parts)
                    parts = []
