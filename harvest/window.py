"""One shuffle window: compute its rows on the device, hand it to a writer thread.

The hot path never waits on the device per batch: the overflow/NaN check accumulates a running
peak on the device and reads it once per window (before the window can be written, so bad values
never get a record), and device-to-host copies go into pinned buffers without blocking; the rows
of batch i are scattered into the window while the device runs batch i + 1. A window's last batch
is drained and its values checked on the writer thread, so the device never idles between windows.
"""
from __future__ import annotations

import math
import queue
import threading

import numpy as np
import torch

from sae_harvest.stores import layout
from sae_harvest.stores.writer import WindowJob

from .errors import HarvestError
from .grad_targets import site_grads
from .sites import capture

def _host_copy(values: torch.Tensor) -> torch.Tensor:
    """A pinned host tensor the device copies `values` into without the host waiting (CPU
    tensors are returned as they are); the copy is done once a later recorded event is."""
    if values.device.type != "cuda":
        return values
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    return host


class BufferPool:
    """Window-sized host arrays, handed back after their window is written and reused: a fresh
    array costs a page fault per 4 KiB on the thread that first writes it, here the compute thread."""

    def __init__(self):
        self._free: dict = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple, dtype) -> np.ndarray:
        with self._lock:
            free = self._free.get((shape, np.dtype(dtype)))
            if free:
                return free.pop()
        return np.empty(shape, dtype)

    def give(self, arrays) -> None:
        with self._lock:
            for a in arrays:
                self._free.setdefault((a.shape, a.dtype), []).append(a)


class _Copies:
    """Device-to-host copies in flight for one batch, drained after the next batch is queued."""

    def __init__(self, device: torch.device, pool: BufferPool):
        self.cuda = device.type == "cuda"
        self.pool = pool
        self.items: list = []
        self.event = None

    def add(self, buffers: dict, key: str, values: torch.Tensor, dest: slice, window_rows: int):
        self.items.append((buffers, key, _host_copy(values), dest, window_rows))

    def seal(self):
        if self.cuda:
            self.event = torch.cuda.Event()
            self.event.record()
        return self

    def drain(self):
        if self.event is not None:
            self.event.synchronize()
        for buffers, key, host, dest, window_rows in self.items:
            array = layout.stored_to_numpy(host)
            if buffers[key] is None:
                buffers[key] = self.pool.take((window_rows, array.shape[1]), array.dtype)
            buffers[key][dest] = array     # rows in harvest order: a plain copy (the writer shuffles)
        self.items = []


def compute_window(cfg, plan, model, device, window: int, seqs, positions, advance,
                   pool: BufferPool | None = None) -> "PendingWindow":
    """Run window `window`'s sequences (with the stream positions after each) through the model,
    for the sites and encodings of `plan` (a harvest.config.HarvestPlan). Its last batch may still
    be on the device when this returns, so the next window's first batch is queued before anyone
    waits on it (PendingWindow.finish)."""
    ctx, window_seqs, sites, grad_enc = plan.ctx_len, plan.window_seqs, plan.sites, plan.grad_encoding
    site_enc = plan.site_encodings
    window_rows = window_seqs * ctx
    # row h of the window (in harvest order) is stored at slot perm[h]
    perm = np.random.default_rng([cfg.seed, window]).permutation(window_rows)
    pool = pool or BufferPool()
    first_seq = window * window_seqs
    acts = {s.name: None for s in sites}
    grads = {s.name: None for s in sites} if grad_enc else None
    rows_seq = np.empty(window_rows, np.int32)
    rows_pos = np.empty(window_rows, np.int32)
    # running max |value| per (kind, site), on the device: one host read per window
    peaks = {}
    pending = None
    for b0 in range(0, len(seqs), cfg.batch_size):
        batch = np.stack(seqs[b0:b0 + cfg.batch_size])
        dest = slice(b0 * ctx, (b0 + len(batch)) * ctx)
        ids = torch.from_numpy(batch).to(device=device, dtype=torch.long, non_blocking=True)
        target = getattr(cfg, "grad_target", "labels")
        captured = capture(model, ids, sites, grads=grad_enc is not None and target == "labels",
                           stop_early=grad_enc is None)
        if grad_enc is not None and target != "labels":   # harvest/grad_targets.py
            captured.grads = site_grads(model, ids, sites, target)
        copies = _Copies(device, pool)
        for s in sites:
            parts = [("activations", acts, captured.acts[s.name], site_enc[s.name])]
            if grads is not None:
                parts.append(("gradients", grads, captured.grads[s.name], grad_enc))
            for what, buffers, values, enc in parts:
                values = values.detach().reshape(-1, values.shape[-1])
                peak = values.abs().amax()
                key = (what, s.name, enc)
                peaks[key] = peak if key not in peaks else torch.maximum(peaks[key], peak)
                copies.add(buffers, s.name, layout.torch_to_stored(values, enc), dest, window_rows)
        copies.seal()
        if pending is not None:
            pending.drain()      # batch i - 1's copies, while the device works on batch i
        pending = copies
        rows_seq[dest] = np.repeat(np.arange(first_seq + b0, first_seq + b0 + len(batch), dtype=np.int32), ctx)
        rows_pos[dest] = np.tile(np.arange(ctx, dtype=np.int32), len(batch))
        advance(len(batch) * ctx)
    return PendingWindow(window, seqs, positions, ctx, perm, acts, grads, rows_seq, rows_pos, pending,
                         _Peaks(peaks, device), pool)


class _Peaks:
    """The window's peak |values|, copied to the host behind its last batch (no wait here)."""

    def __init__(self, peaks: dict, device: torch.device):
        self.keys = list(peaks)
        self.event = None
        self.host = None
        if self.keys:
            self.host = _host_copy(torch.stack([peaks[k].float() for k in self.keys]))
            if device.type == "cuda":
                self.event = torch.cuda.Event()
                self.event.record()

    def check(self) -> None:
        """Refuse the window (before it can be written) if any value overflowed its encoding."""
        if not self.keys:
            return
        if self.event is not None:
            self.event.synchronize()
        for (what, name, encoding), peak in zip(self.keys, self.host.tolist()):
            if not math.isfinite(peak) or peak > layout.MAX_ABS[encoding]:
                raise HarvestError(
                    f"non-finite {what} at {name} (in {encoding}): the model overflowed or the encoding can't hold "
                    f"the values; use --dtype float32/bfloat16 and --act-encoding bfloat16/float32")


class PendingWindow:
    """A computed window whose last batch may still be copying off the device. finish() waits for
    it, checks the values and gives the WindowJob to write; the writer thread calls it, so the
    device starts the next window meanwhile."""

    def __init__(self, window, seqs, positions, ctx, perm, acts, grads, rows_seq, rows_pos, pending, peaks: _Peaks,
                 pool: BufferPool):
        self.window, self.n_seqs, self._ctx = window, len(seqs), ctx
        self._seqs, self._positions, self._perm = seqs, positions, perm
        self._acts, self._grads, self._rows_seq, self._rows_pos = acts, grads, rows_seq, rows_pos
        self._pending, self._peaks, self._pool = pending, peaks, pool
        self._job = None

    def finish(self) -> WindowJob:
        if self._job is not None:
            return self._job
        if self._pending is not None:
            self._pending.drain()
        self._peaks.check()
        seqs, ctx = self._seqs, self._ctx
        # stored row i is harvest row order[i]: the slots in use, in slot order (a short last
        # window keeps only its filled slots, still in shuffled order)
        order = np.argsort(self._perm[:len(seqs) * ctx])
        tokens = np.stack(seqs) if seqs else np.zeros((0, ctx), np.int32)
        acts = {k: v for k, v in self._acts.items() if v is not None}
        grads = {k: v for k, v in self._grads.items() if v is not None} if self._grads is not None else None
        self._job = WindowJob(window=self.window, tokens=tokens, rows_seq=self._rows_seq, rows_pos=self._rows_pos,
                              acts=acts, grads=grads, order=order,
                              position=self._positions[-1] if self._positions else None)
        self._pending = None
        return self._job

    def release(self) -> None:
        """After the window is written: its arrays go back to the pool for a later window."""
        if self._job is not None:
            self._pool.give([*self._job.acts.values(), *(self._job.grads or {}).values()])
        self._job = self._acts = self._grads = None


# A test's fault injection (tests/kill_launcher.py): called on the writer thread as
# after_record(rank, records written so far by this process) after each window record. None in use.
after_record = None


class WindowWriter(threading.Thread):
    """Writes finished windows in order on a background thread.

    One window is written while the next is computed; handing over a window waits until the
    previous one is on disk, so host memory holds at most two windows.
    """

    def __init__(self, writer):
        super().__init__(daemon=True, name="store-writer")
        self.writer = writer
        self.jobs: queue.Queue = queue.Queue()
        self.free = threading.Semaphore(1)
        self.error: BaseException | None = None

    def run(self):
        written = 0
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_job(job.finish())
                    job.release()
                    written += 1
                    if after_record is not None:
                        after_record(self.writer.rank, written)
                except BaseException as e:  # surfaced in the main thread
                    self.error = e
            del job
            self.free.release()
        self.writer.close()     # its shard-writing threads end with this one

    def put(self, job):
        self._check()
        self.free.acquire()
        self._check()
        self.jobs.put(job)

    def close(self):
        self.jobs.put(None)
        self.join()
        self._check()

    def abort(self):
        self.error = self.error or RuntimeError("harvest aborted")
        self.jobs.put(None)

    def _check(self):
        if self.error is not None:
            raise self.error
