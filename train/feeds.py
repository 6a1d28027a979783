"""Where training batches come from: a store (the normal case) or a tensor (meta-SAEs).

A feed yields `Batch`es and can report and restore its
position, so `--resume` continues on exactly the next batch. A store feed yields the values as
stored (float16, bfloat16 or float32 tensors): the trainer converts them to float32 on the device,
so the host never spends a pass over the batch decoding it. On CUDA the shard reads write each
batch straight into pinned host memory (`PinnedBuffers`), so the host-to-device copy is
asynchronous and no batch is copied on the host after it is read.
Under torchrun (part = (rank, world)) each rank gets its own share of every global batch.
A store feed reads only the rows of the store's training sequences (stores/split.py).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from sae_harvest.stores.urls import scrub
from sae_harvest.stores.layout import acts_path, bf16_bits_to_torch, grads_path, stored_to_torch, torch_bits_dtype



@dataclass(frozen=True)
class Batch:
    """One batch as a feed yields it and a trainer's `prepare` reads it. A store or decoder-row feed
    fills acts (and grads when the SAE uses them); the e2e feed fills seqs, the token sequences the
    step replays through the model (it has no stored activations)."""
    acts: torch.Tensor | None = None    # [n, d]: as stored (16-bit from a store), float32 decoder rows
    grads: torch.Tensor | None = None   # [n, d] or None
    seqs: torch.Tensor | None = None    # int64 [n] sequence indices into the store's `tokens`


# Stored values as a tensor of their own 16/32-bit type, without a copy (bfloat16: from its bits);
# the codec is the store layout's (stores/layout.py)
as_tensor = stored_to_torch


class PinnedBuffers:
    """Batch arrays allocated as torch tensors (pinned when pin=True, from torch's caching host
    allocator) for the block reads to write into; tensor(array) hands back the tensor itself, so
    the device copy sees allocator-owned pinned memory (which the allocator keeps from reuse
    until an asynchronous copy out of it has finished)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._live: dict[int, torch.Tensor] = {}   # data pointer -> tensor, until the batch is yielded

    def __call__(self, shape, dtype: np.dtype) -> np.ndarray:
        t = torch.empty(shape, dtype=torch_bits_dtype(dtype), pin_memory=self.pin)
        array = t.numpy()
        self._live[array.ctypes.data] = t
        return array

    def tensor(self, array: np.ndarray, encoding: str) -> torch.Tensor:
        t = self._live.pop(array.ctypes.data)[:len(array)]
        return bf16_bits_to_torch(t, encoding)


class StoreFeed:
    """direct=True (the default with pin): batches read straight into PinnedBuffers; direct=False
    with pin: the previous path, each batch copied into pinned memory on a background thread.
    train/multisite.py's MultiFeed is this over several sites (`site` a list, its own _tensors)."""

    def __init__(self, store, site: str, batch_size: int, *, seed: int, grads: bool, exclude_pos0: bool,
                 state: dict | None = None, part: tuple[int, int] = (0, 1), pin: bool = False,
                 direct: bool | None = None):
        self.buffers = PinnedBuffers(pin) if (pin if direct is None else direct) else None
        # the rows of the store's training sequences only: held-out sequences are never trained on
        self.iter = store.batches(site, batch_size, seqs="train", seed=seed, grads=grads,
                                  exclude_pos0=exclude_pos0, state=state, part=part, decode=False,
                                  alloc=self.buffers)
        self.site = site
        self.grads = grads
        self.pin = pin
        self._state = self.iter.state()

    def _tensors(self):
        enc = self.iter.encodings
        convert = self.buffers.tensor if self.buffers is not None else as_tensor
        for batch in self.iter:
            acts = convert(batch["acts"][self.site], enc[acts_path(self.site)])
            grads = convert(batch["grads"][self.site], enc[grads_path(self.site)]) if self.grads else None
            if self.pin and self.buffers is None:
                acts = acts.pin_memory()
                grads = grads.pin_memory() if grads is not None else None
            yield Batch(acts=acts, grads=grads), self.iter.state()

    def __iter__(self):
        copies = self.pin and self.buffers is None   # only the copying path needs a thread of its own
        batches = _background(self._tensors()) if copies else self._tensors()
        for batch, state in batches:
            self._state = state    # the position after the batch the trainer now holds
            yield batch

    def state(self) -> dict:
        return self._state


def _background(it, depth: int = 2):
    """Run a generator in a thread, `depth` items ahead (for pinning batches off the step's path)."""
    q: queue.Queue = queue.Queue(depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:   # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class TensorFeed:
    """Seeded reshuffle every epoch; used for the meta-SAE's few thousand decoder rows."""

    @staticmethod
    def _batch(rows: torch.Tensor) -> Batch:
        return Batch(acts=rows)

    def __init__(self, data: torch.Tensor, batch_size: int, *, seed: int, state: dict | None = None,
                 part: tuple[int, int] = (0, 1)):
        self.data = data
        self.part = part
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
                rank, world = self.part   # this rank's share of the global batch
                idx = idx[rank * len(idx) // world:(rank + 1) * len(idx) // world]
                yield self._batch(self.data[idx])
            self.epoch, self.offset = self.epoch + 1, 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


class SequenceFeed(TensorFeed):
    """TensorFeed over sequence indices (e2e): the same seeded order, yielded as Batch.seqs."""

    @staticmethod
    def _batch(rows: torch.Tensor) -> Batch:
        return Batch(seqs=rows)


def held_out_origin(store, tokens: int | None = None, sequences: int | None = None) -> dict:
    """How many held-out tokens a report used and where they came from, for every JSON that
    reports on held-out data (stores/split.py)."""
    split = store.split
    return {"source": "store", "store": scrub(store.path), "held_out": True, **split.to_attrs(),
            "creation_id": store.attrs.get("creation_id"),
            "held_out_seqs": split.n_held_out(store.n_seqs), "sequences": sequences, "tokens": tokens}


def train_tokens(store, exclude_pos0: bool) -> int:
    """Rows of the store's training sequences (position 0 left out when exclude_pos0)."""
    n_train = store.n_seqs - store.split.n_held_out(store.n_seqs)
    return n_train * (store.ctx_len - (1 if exclude_pos0 else 0))


def sample_rows(store, site: str, n: int, seed: int, exclude_pos0: bool,
                grads: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """A random sample of up to n rows (activations, gradients) of the store's training sequences:
    for the input scale, b_dec init and gtopk's beta calibration."""
    rng = np.random.default_rng(seed)
    total = store.n_rows
    # choice over the count, not over np.arange: memory follows n, not the store's row count
    idx = np.sort(rng.choice(total, size=min(n, total), replace=False))
    idx = idx[~store.split.is_held_out(store.rows_seq.get_orthogonal_selection((idx,)))]
    if exclude_pos0:
        idx = idx[store.rows_pos.get_orthogonal_selection((idx,)) != 0]
    return store.acts(site, idx), (store.grads(site, idx) if grads else None)
