"""The training feed reading shards straight into its own (on CUDA: pinned) buffers: the same
bytes as the copying path, for every stored encoding, with no copy after the read."""
import numpy as np
import pytest
import torch

from sae_harvest.stores import open_store
from sae_harvest.train.feeds import PinnedBuffers, StoreFeed
from tests.test_train_loop import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("feed") / "s.zarr"
    make_store(path)
    return open_store(str(path))


@pytest.mark.parametrize("site", ["blocks.0.resid_pre", "blocks.1.resid_pre"])   # float32, float16 (+ bf16 grads)
def test_direct_buffers_hold_the_bytes_of_the_copying_path(store, site):
    kw = dict(seed=3, grads=True, exclude_pos0=True)
    plain = StoreFeed(store, site, 96, **kw, direct=False)
    direct = StoreFeed(store, site, 96, **kw, direct=True)
    assert isinstance(direct.buffers, PinnedBuffers) and plain.buffers is None
    n = 0
    for a, b in zip(plain, direct):
        for key in ("acts", "grads"):
            a_key, b_key = getattr(a, key), getattr(b, key)
            assert a_key.dtype == b_key.dtype and a_key.shape == b_key.shape
            assert torch.equal(a_key.view(torch.int16 if a_key.element_size() == 2 else torch.int32),
                               b_key.view(torch.int16 if b_key.element_size() == 2 else torch.int32))
        n += 1
        if n == 12:   # past one epoch of blocks' worth of batches
            break
    assert n == 12
    assert plain.state() == direct.state()
    # against the store's own decoding, so the test does not only compare two paths of one reader
    rows = next(iter(store.batches(site, 96, seqs="train", seed=3, exclude_pos0=True)))["rows"]
    first = next(iter(StoreFeed(store, site, 96, **kw, direct=True)))
    np.testing.assert_array_equal(first.acts.float().numpy(), store.acts(site, rows))


def test_direct_batches_are_the_buffers_the_reads_wrote():
    buffers = PinnedBuffers(pin=False)
    array = buffers((8, 4), np.dtype(np.uint16))
    array[:] = np.arange(32, dtype=np.uint16).reshape(8, 4)
    t = buffers.tensor(array[:5], "bfloat16")
    assert t.dtype == torch.bfloat16 and t.shape == (5, 4)
    assert t.data_ptr() == array.ctypes.data   # no copy
    assert torch.equal(t.view(torch.int16), torch.from_numpy(array[:5].view(np.int16)))
    assert not buffers._live   # handed over: the feed holds no reference to yielded batches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_buffers_are_pinned():
    buffers = PinnedBuffers(pin=True)
    array = buffers((16, 8), np.dtype(np.float16))
    assert buffers.tensor(array, "float16").is_pinned()
