"""The training feed: contiguous blocks in a seeded random order, read ahead by threads.

Rows in a store are already shuffled across sequences within each window, so a
contiguous block is a fair sample; reading whole blocks keeps reads large (one
chunk or more) and cheap on object storage. The iterator is deterministic given
its arguments, and `state()` / `state=` resume it exactly.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import layout


class KeptCache:
    """Which rows of each block a feed keeps (position 0 and the held-out or training sequences
    filtered out), kept per store open (`Store.kept_cache`) so epochs after the first read no
    `rows/pos` or `rows/seq`: one bit per row and filter (128 MiB per billion rows; past `budget`
    bytes nothing more is cached and blocks are filtered by reading, as before). Every entry holds
    its kept-row count: an entry whose bitmap does not have its block's length or count is dropped
    and the block's rows are read again, never trusted."""

    def __init__(self, budget: int = 256 << 20):
        self.budget, self.nbytes = budget, 0
        self._entries: dict[tuple, tuple[int, np.ndarray]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple, a: int, b: int) -> np.ndarray | None:
        """The kept absolute rows of block [a, b) under filter `key`, or None (not cached, or an
        entry that does not fit the block: dropped)."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        count, bits = entry
        if len(bits) == -(-(b - a) // 8):
            keep = np.flatnonzero(np.unpackbits(bits, count=b - a))
            if len(keep) == count:
                return keep + a
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]
                self.nbytes -= bits.nbytes
        return None

    def put(self, key: tuple, a: int, b: int, keep: np.ndarray) -> None:
        mask = np.zeros(b - a, dtype=bool)
        mask[keep - a] = True
        bits = np.packbits(mask)
        with self._lock:
            if key not in self._entries and self.nbytes + bits.nbytes <= self.budget:
                self._entries[key] = (len(keep), bits)
                self.nbytes += bits.nbytes


class BlockBatches:
    """part=(rank, world): yield only this rank's contiguous share of every batch (batch_size is the
    global batch, cut exactly as with world 1), reading only the rows of that share.
    decode=False: values come back as stored (float16 / float32, bfloat16 as uint16 bits); see
    `encodings`. seqs="train" / "held_out": only the rows of the store's training / held-out
    sequences (stores/split.py), filtered per block through `rows/seq`; "all": every row.
    Yields {"rows": int64 [n], "acts": {site: [n, d]}, "grads": {...}}.
    alloc(shape, dtype) -> a writable C-contiguous array: where each batch's value arrays are
    allocated (default np.empty); the block reads write straight into them (the training feed
    passes pinned host memory on CUDA, so no batch is copied again before the device copy)."""

    def __init__(self, store, sites, batch_size: int, *, rows: tuple[int, int] | None = None,
                 block_rows: int | None = None, seed: int = 0, grads: bool = False,
                 exclude_pos0: bool = False, prefetch: int = 4, state: dict | None = None,
                 epochs: int | None = None, drop_last: bool = True, part: tuple[int, int] = (0, 1),
                 decode: bool = True, seqs: str = "all", alloc=None):
        self.store = store
        self.alloc = alloc or np.empty
        if seqs not in ("all", "train", "held_out"):
            raise ValueError(f"seqs={seqs!r}: use all, train or held_out")
        self.seqs = seqs
        self.split = store.split if seqs != "all" else None
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
        self.encodings = {layout.acts_path(s): store.encoding(s) for s in self.sites}
        if grads:
            self.encodings.update({layout.grads_path(s): store.encoding(s, grads=True) for s in self.sites})
        s = state or {"epoch": 0, "block": 0, "offset": 0}
        self._state = (int(s["epoch"]), int(s["block"]), int(s["offset"]))

    def state(self) -> dict:
        """Position after the last batch yielded: the next batch starts there."""
        epoch, block, offset = self._state
        return {"epoch": epoch, "block": block, "offset": offset}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))

    def _kept(self, index: int):
        """Raw rows of a block that are not position 0 and belong to the wanted sequences (None: all
        rows are kept)."""
        if not self.exclude_pos0 and self.split is None:
            return None
        a, b = self.blocks[index]
        cache = getattr(self.store, "kept_cache", None)
        key = (a, b, self.exclude_pos0, self.seqs, None if self.split is None else self.split.every)
        if cache is not None:
            cached = cache.get(key, a, b)
            if cached is not None:
                return cached
        keep = np.ones(b - a, dtype=bool)
        # no same-store check after these two reads (a read of zarr.json each, a GET on object
        # storage): the block's values are read after them, and that read checks; a block whose
        # rows are all filtered out returns nothing
        if self.exclude_pos0:
            keep &= self.store.read_rows(layout.ROWS_POS, a, b, confirm=False) != 0
        if self.split is not None:
            held = self.split.is_held_out(self.store.read_rows(layout.ROWS_SEQ, a, b, confirm=False))
            keep &= held if self.seqs == "held_out" else ~held
        keep = np.flatnonzero(keep) + a
        if cache is not None:
            cache.put(key, a, b, keep)
        return keep

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

    def _new_batch(self) -> dict:
        """Empty arrays for one batch (this rank's share); the block reads write straight into them."""
        n = self.batch_size // self.world
        out = {"rows": np.empty(n, dtype=np.int64)}
        for name, enc in self.encodings.items():
            d = self.store.width(name.split("/", 1)[1])
            out[name] = self.alloc((n, d), np.dtype(np.float32 if self.decode else layout.storage_dtype(enc)))
        return out

    def _targets(self, steps: list, current: list) -> list:
        """Give every "rows" step its place in a batch: ("rows", lo, hi, batch, at); an "end" step
        becomes ("end", state, batch, filled). `current` = [batch arrays or None, rows filled]."""
        out = []
        for step in steps:
            if current[0] is None:
                current[:] = [self._new_batch(), 0]
            if step[0] == "rows":
                out.append(("rows", step[1], step[2], current[0], current[1]))
                current[1] += step[2] - step[1]
            else:
                out.append(("end", step[1], current[0], current[1]))
                current[:] = [None, 0]
        return out

    def _read(self, index: int, keep, ops: list) -> None:
        """Read the block's "rows" ops into their batches: one read per op and array, only the
        kept rows copied out of the chunks (nothing is gathered or concatenated afterwards)."""
        a, _ = self.blocks[index]
        for op in ops:
            if op[0] != "rows":
                continue
            _, lo, hi, batch, at = op
            rows = keep[lo:hi] if keep is not None else np.arange(a + lo, a + hi, dtype=np.int64)
            first, stop = int(rows[0]), int(rows[-1]) + 1
            batch["rows"][at:at + len(rows)] = rows
            for name, enc in self.encodings.items():
                if self.decode:
                    values = self.store.read_rows(name, first, stop, keep=rows if keep is not None else None)
                    batch[name][at:at + len(rows)] = layout.decode(values, enc)
                else:
                    self.store.read_rows(name, first, stop, keep=rows if keep is not None else None,
                                         out=batch[name][at:at + len(rows)])

    def _ahead(self):
        current = [None, 0]
        with ThreadPoolExecutor(2 * self.prefetch) as pool:   # block reads + position lookups
            ahead = deque()
            for index, keep, steps in self._plan(pool):
                ops = self._targets(steps, current)
                ahead.append((ops, pool.submit(self._read, index, keep, ops)))
                if len(ahead) >= self.prefetch:
                    yield ahead.popleft()
            while ahead:
                yield ahead.popleft()

    def _batch(self, arrays: dict, filled: int) -> dict:
        batch = {"rows": arrays["rows"][:filled], "acts": {}, "grads": {}}
        for site in self.sites:
            batch["acts"][site] = arrays[layout.acts_path(site)][:filled]
            if self.grads:
                batch["grads"][site] = arrays[layout.grads_path(site)][:filled]
        return batch

    def __iter__(self):
        """Yield batches of batch_size rows (this rank's batch_size / world). A batch's rows come
        from the blocks up to the one holding its end, whose reads are all done when it is yielded
        (futures are taken in order)."""
        for ops, fut in self._ahead():
            fut.result()
            for op in ops:
                if op[0] == "end":
                    self._state = op[1]
                    yield self._batch(op[2], op[3])
