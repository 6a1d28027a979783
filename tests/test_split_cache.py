"""The per-open cache of the rows a feed keeps per block (stores.batches.KeptCache): epochs after
the first read no rows/pos or rows/seq, every epoch yields exactly the rows the split rule and the
position-0 filter keep (brute force over zarr's rows/seq and rows/pos), and an entry that does not
fit its block is rebuilt from the store, never trusted."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from sae_harvest.stores import open_store
from sae_harvest.stores.batches import KeptCache

from tests.test_shards import make_store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("kept") / "s"
    make_store(path, rows_seqs=256, ctx=16, d=32)      # 8 windows of 512 rows: 8 blocks
    return str(path)


def expected(path: str, seqs: str) -> np.ndarray:
    """Brute force: the rows of the wanted sequences that are not position 0, from zarr."""
    group = zarr.open_group(store=path, mode="r")
    seq, pos = np.asarray(group["rows/seq"][:]), np.asarray(group["rows/pos"][:])
    held = seq % open_store(path).split.every == 0
    return np.flatnonzero((pos != 0) & (held if seqs == "held_out" else ~held))


def epochs_of(store, seqs: str, epochs: int, reads: list) -> list[np.ndarray]:
    """Rows (and values, checked) of each epoch, counting the filter's reads per epoch."""
    read_rows = store.read_rows

    def counting(name, *args, **kwargs):
        if name in ("rows/seq", "rows/pos"):
            reads.append(name)
        return read_rows(name, *args, **kwargs)

    store.read_rows = counting
    it = store.batches("s", 64, seqs=seqs, exclude_pos0=True, decode=False, epochs=epochs, drop_last=False,
                       prefetch=1)
    rows, values = [], []
    for batch in it:
        rows.append(batch["rows"].copy())
        values.append(batch["acts"]["s"].copy())
    store.read_rows = read_rows
    rows, values = np.concatenate(rows), np.concatenate(values)
    acts = zarr.open_group(store=store.path, mode="r")["acts/s"]
    np.testing.assert_array_equal(values, np.asarray(acts[:])[rows])
    return np.split(rows, epochs)


def test_later_epochs_read_no_filter_arrays_and_keep_the_same_rows(store_path):
    store = open_store(store_path)
    reads: list = []
    per_epoch = epochs_of(store, "train", 3, reads)
    want = expected(store_path, "train")
    for rows in per_epoch:
        np.testing.assert_array_equal(np.sort(rows), want)
    assert len(reads) == 2 * 8          # rows/pos and rows/seq of each of the 8 blocks, once
    # a held-out feed on the same open has its own entries: never the training rows
    reads.clear()
    held = epochs_of(store, "held_out", 2, reads)
    for rows in held:
        np.testing.assert_array_equal(np.sort(rows), expected(store_path, "held_out"))
    assert len(reads) == 2 * 8
    assert store.kept_cache.nbytes == 2 * 8 * 512 // 8


@pytest.mark.parametrize("damage", ["short", "flipped", "other-block"])
def test_an_entry_that_does_not_fit_its_block_is_rebuilt(store_path, damage):
    store = open_store(store_path)
    reads: list = []
    epochs_of(store, "train", 1, reads)
    cache = store.kept_cache
    for key, (count, bits) in list(cache._entries.items()):
        if damage == "short":
            cache._entries[key] = (count, bits[:-1])
        elif damage == "flipped":       # one row more than the block keeps: the count says so
            bad = bits.copy()
            i = int(np.flatnonzero(np.unpackbits(bad) == 0)[0])
            bad[i // 8] |= 1 << (7 - i % 8)
            cache._entries[key] = (count, bad)
        else:                           # a bitmap of another (smaller) block under this key
            cache._entries[key] = (count, np.packbits(np.ones(8, dtype=bool)))
    reads.clear()
    for rows in epochs_of(store, "train", 2, reads):
        np.testing.assert_array_equal(np.sort(rows), expected(store_path, "train"))
    assert len(reads) == 2 * 8          # every damaged entry was dropped, the block read again, once


def test_a_full_cache_caches_nothing_and_the_feed_stays_right(store_path):
    store = open_store(store_path)
    store._kept_cache = KeptCache(budget=0)
    reads: list = []
    for rows in epochs_of(store, "train", 2, reads):
        np.testing.assert_array_equal(np.sort(rows), expected(store_path, "train"))
    assert len(reads) == 2 * 2 * 8 and store.kept_cache.nbytes == 0
