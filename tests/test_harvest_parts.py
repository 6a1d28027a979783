"""The harvest's pieces on their own (issue 17 item 3): the plan's counts against hand
computations, the one cross-rank stop, and the typed window job from the computed window to the
store's rows."""
import dataclasses

import numpy as np
import pytest
import torch

from sae_harvest.harvest.config import HarvestConfig, HarvestPlan
from sae_harvest.harvest.errors import HarvestError
from sae_harvest.harvest.run import stop_if_any
from sae_harvest.harvest.sites import parse_sites
from sae_harvest.harvest.window import BufferPool, PendingWindow, _Peaks
from sae_harvest.stores import StoreWriter, open_store
from sae_harvest.stores.dist import Dist
from sae_harvest.stores.writer import WindowJob


def _plan(family="gpt2", **kw):
    cfg = HarvestConfig(out="x.zarr", **{"ctx_len": 32, "shuffle_window": 256, **kw})
    return HarvestPlan.of(cfg, parse_sites("blocks.0.resid_pre,blocks.1.mlp_out", 2), family)


def test_plan_counts_by_hand():
    # 1300 tokens of 32: 40.6 -> 41 sequences; 256 tokens -> 8 sequences a window; 41 = 5 * 8 + 1
    p = _plan(tokens=1300)
    assert (p.n_seqs, p.window_seqs, p.n_windows) == (41, 8, 6)
    assert [p.window_size(w) for w in range(6)] == [8, 8, 8, 8, 8, 1]
    # 300 tokens -> 10 sequences, rounded up to a multiple of 8 (layout.window_seqs_for)
    assert (_plan(tokens=1024, shuffle_window=300).window_seqs, _plan(tokens=1024, shuffle_window=300).n_windows) \
        == (16, 2)
    # a window never holds more sequences than the harvest: 100 tokens -> 4 sequences, one window
    small = _plan(tokens=100)
    assert (small.n_seqs, small.window_seqs, small.n_windows, small.window_size(0)) == (4, 4, 1, 4)


def test_plan_encodings():
    assert _plan(tokens=64).act_encoding == "float16" and _plan(tokens=64).grad_encoding is None
    assert _plan("gemma", tokens=64).act_encoding == "bfloat16"     # fp16 overflows on Gemma
    p = _plan(tokens=64, act_encoding="float32", grads=True, grad_encoding="float32")
    assert (p.act_encoding, p.grad_encoding) == ("float32", "float32")
    assert p.site_encodings == {"blocks.0.resid_pre": "float32", "blocks.1.mlp_out": "float32"}
    assert _plan(tokens=64, grads=True).grad_encoding == "bfloat16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.n_seqs = 3


class _TwoRanks(Dist):
    """Rank 0 of two, the other rank's contribution to each all-reduce given."""

    def __init__(self, peer: list[int]):
        super().__init__(rank=0, world=2)
        self.peer = peer

    def all_sum(self, values):
        return [a + b for a, b in zip(values, self.peer)]


def test_stop_if_any_sums_and_stops_every_rank():
    assert stop_if_any(_TwoRanks([5, 0]), None, 3) == [8]
    assert stop_if_any(Dist(), None, 3, 4) == [3, 4]
    assert stop_if_any(_TwoRanks([0]), None) == []
    mine = HarvestError("non-finite activations at blocks.0.resid_pre")
    with pytest.raises(HarvestError) as got:          # this rank failed: its own error
        stop_if_any(_TwoRanks([0, 0]), mine, 3)
    assert got.value is mine
    with pytest.raises(HarvestError, match=r"^another rank stopped \(see its error\)$"):   # the peer failed
        stop_if_any(_TwoRanks([2, 1]), None, 3)
    with pytest.raises(OSError):                      # a writer thread's error is raised as it is
        stop_if_any(Dist(), OSError(28, "No space left on device"))


def test_finished_window_is_a_window_job_the_writer_stores_in_shuffled_order(tmp_path):
    ctx, n_seqs, d = 4, 2, 3
    rows = n_seqs * ctx
    perm = np.array([5, 2, 7, 0, 6, 1, 3, 4])         # harvest row h goes to slot perm[h]
    acts = np.arange(rows * d, dtype=np.float32).reshape(rows, d)   # row h holds 3h, 3h+1, 3h+2
    seqs = [np.arange(ctx, dtype=np.int32) + 10 * i for i in range(n_seqs)]
    rows_seq = np.repeat(np.arange(n_seqs, dtype=np.int32), ctx)
    rows_pos = np.tile(np.arange(ctx, dtype=np.int32), n_seqs)
    pending = PendingWindow(0, seqs, [{"doc": 1}, {"doc": 2}], ctx, perm, {"s": acts}, None, rows_seq, rows_pos,
                            None, _Peaks({}, torch.device("cpu")), BufferPool())
    job = pending.finish()
    assert isinstance(job, WindowJob) and pending.finish() is job
    assert job.position == {"doc": 2} and job.grads is None
    np.testing.assert_array_equal(job.tokens, np.stack(seqs))
    np.testing.assert_array_equal(job.order, [3, 5, 1, 6, 7, 0, 4, 2])   # slot i holds harvest row order[i]
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.window = 1
    w = StoreWriter.create(str(tmp_path / "s.zarr"), meta={"model": {"name": "m"}},
                           sites={"s": {"d": d, "encoding": "float32"}}, grads=None, ctx_len=ctx, n_seqs=n_seqs,
                           window_seqs=n_seqs)
    w.write_job(job)
    w.finish()
    store = open_store(str(tmp_path / "s.zarr"))
    slot_of = {h: int(perm[h]) for h in range(rows)}
    want = np.empty_like(acts)
    for h, slot in slot_of.items():
        want[slot] = acts[h]
    np.testing.assert_array_equal(store.acts("s", slice(None)), want)
    np.testing.assert_array_equal(store.rows_seq[:], [rows_seq[h] for h in np.argsort(perm)])
    np.testing.assert_array_equal(store.tokens[:], np.stack(seqs))
