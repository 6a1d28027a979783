"""Store format: writer/reader round trip, encodings, geometry, the batch feed, S3."""
import json

import numpy as np
import pytest
import zarr

from sae_harvest.stores import StoreError, StoreWriter, open_store
from sae_harvest.stores import layout


def _write_store(path, *, n_seqs=12, ctx=8, window_seqs=4, d=16, grads=True, finish=True, windows=None):
    rng = np.random.default_rng(0)
    sites = {"blocks.0.resid_pre": {"d": d, "encoding": "float16"},
             "blocks.1.mlp_out": {"d": d + 4, "encoding": "bfloat16"}}
    w = StoreWriter.create(str(path), meta={"model": {"name": "m"}}, sites=sites,
                           grads={"encoding": "bfloat16", "definition": "test"} if grads else None,
                           ctx_len=ctx, n_seqs=n_seqs, window_seqs=window_seqs)
    truth = {s: np.zeros((n_seqs * ctx, sites[s]["d"]), np.float32) for s in sites}
    n_windows = -(-n_seqs // window_seqs)
    for win in range(n_windows if windows is None else windows):
        seqs = np.arange(win * window_seqs, min((win + 1) * window_seqs, n_seqs))
        rows_seq = np.repeat(seqs, ctx)
        rows_pos = np.tile(np.arange(ctx), len(seqs))
        perm = rng.permutation(len(rows_seq))
        acts = {s: rng.normal(size=(len(perm), sites[s]["d"])).astype(np.float32) for s in sites}
        g = {s: (rng.normal(size=(len(perm), sites[s]["d"])) * 1e-7).astype(np.float32) for s in sites}
        r0 = win * window_seqs * ctx
        for s in sites:
            truth[s][r0:r0 + len(perm)] = acts[s]
        tokens = rng.integers(0, 100, size=(len(seqs), ctx))
        w.write_window(win, tokens, rows_seq[perm], rows_pos[perm], acts, g if grads else None)
    if finish:
        w.finish(n_seqs)
    return truth


def test_round_trip_and_encodings(tmp_path):
    path = tmp_path / "s.zarr"
    truth = _write_store(path)
    store = open_store(str(path))
    assert store.n_rows == 96 and store.n_seqs == 12 and store.ctx_len == 8
    assert store.sites == ["blocks.0.resid_pre", "blocks.1.mlp_out"]
    a = store.acts("blocks.0.resid_pre", slice(0, 96))
    np.testing.assert_allclose(a, truth["blocks.0.resid_pre"], rtol=1e-3, atol=1e-3)
    b = store.acts("blocks.1.mlp_out", slice(None))
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, truth["blocks.1.mlp_out"], rtol=8e-3, atol=1e-6)
    idx = np.array([50, 3, 3, 95, 0])
    np.testing.assert_array_equal(store.acts("blocks.1.mlp_out", idx), b[idx])
    # every row's (seq, pos) appears exactly once
    pairs = set(zip(store.rows_seq[:].tolist(), store.rows_pos[:].tolist()))
    assert len(pairs) == 96
    assert store.tokens.shape == (12, 8) and store.tokens.dtype == np.int32


def test_tiny_gradients_survive_bf16(tmp_path):
    path = tmp_path / "s.zarr"
    _write_store(path)
    store = open_store(str(path))
    g = store.grads("blocks.0.resid_pre", slice(None))
    assert np.abs(g).max() < 1e-5 and np.abs(g).max() > 0
    # re-encode the same rows: relative per-row error stays < 1e-2
    x = (np.random.default_rng(1).normal(size=(64, 16)) * 1e-7).astype(np.float32)
    back = layout.decode(layout.encode(x, "bfloat16"), "bfloat16")
    err = np.linalg.norm(back - x, axis=1) / np.linalg.norm(x, axis=1)
    assert err.max() < 1e-2
    # fp16 would not: that is why gradients are not stored as fp16
    fp16 = x.astype(np.float16).astype(np.float32)
    assert (np.linalg.norm(fp16 - x, axis=1) / np.linalg.norm(x, axis=1)).max() > 1e-2


def test_bf16_encoding_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).normal(size=(1000,)).astype(np.float32) * 10
    ours = layout.encode(x, "bfloat16")
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, ref)
    back = torch.from_numpy(ours.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(layout.decode(ours, "bfloat16"), back)


def test_torch_side_of_the_codec_matches_the_numpy_side():
    """stores/layout.py's torch side (the harvest's device cast and host view, the feed's view) against
    its numpy side, an independent implementation of the same rounding: the same bits, no copies."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).normal(size=(64, 8)).astype(np.float32) * 50
    # round-to-nearest-even ties (1 + 2^-8 and 1 + 3 * 2^-8 lie halfway between two bf16 values), zeros,
    # subnormals, infinities, NaN
    x.flat[:8] = np.array([0x3F808000, 0x3F818000, 0x80000000, 0x00000001, 0x7F800000, 0xFF800000, 0x7FC00000,
                           0x3F7FFFFF], np.uint32).view(np.float32)
    for enc in ("bfloat16", "float16", "float32"):
        stored = layout.torch_to_stored(torch.from_numpy(x), enc)
        assert stored.dtype == layout.torch_dtype(enc)
        host = layout.stored_to_numpy(stored)
        assert host.dtype == layout.storage_dtype(enc) and host.ctypes.data == stored.data_ptr()   # a view
        # the same bits, NaN aside: torch's CPU cast gives NaN as 0xFFFF, numpy's as 0x7FC0 (a harvest
        # refuses a window holding NaN before it is written, harvest/window.py _Peaks)
        nan = np.isnan(x)
        np.testing.assert_array_equal(host[~nan], layout.encode(x, enc)[~nan])
        assert np.isnan(layout.decode(host[nan], enc)).all()
        back = layout.stored_to_torch(host, enc)
        assert back.dtype == layout.torch_dtype(enc) and back.data_ptr() == host.ctypes.data
        np.testing.assert_array_equal(back.float().numpy(), layout.decode(host, enc))
    bits = layout.encode(x, "bfloat16")
    assert bits[0, 0] == 0x3F80 and bits[0, 1] == 0x3F82 and bits[0, 6] == 0x7FC0   # ties to even, NaN
    # buffers torch allocates for the reads: the stored bits, viewed as bfloat16 without a copy
    buf = torch.empty(bits.shape, dtype=layout.torch_bits_dtype(bits.dtype))
    buf.numpy()[:] = bits
    t = layout.bf16_bits_to_torch(buf, "bfloat16")
    assert t.dtype == torch.bfloat16 and t.data_ptr() == buf.data_ptr()
    np.testing.assert_array_equal(t.float().numpy(), layout.decode(bits, "bfloat16"))
    assert layout.bf16_bits_to_torch(buf, "float16") is buf


def test_only_standard_codecs_and_sharding(tmp_path):
    path = tmp_path / "s.zarr"
    _write_store(path)
    meta = json.loads((path / "acts" / "blocks.0.resid_pre" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    codec_names = [c["name"] for c in meta["codecs"]]
    assert codec_names == ["sharding_indexed"]
    inner = [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]]
    assert set(inner) <= {"bytes", "zstd", "blosc", "gzip", "crc32c", "transpose"}
    assert meta["attributes"]["encoding"] == "float16"


def test_geometry_chunks_at_least_1mb_and_shards_divide_window():
    window_rows = 1 << 20
    chunk, shard = layout.row_geometry(window_rows, 768 * 2)
    assert chunk * 768 * 2 >= 1 << 20 and window_rows % chunk == 0
    assert shard % chunk == 0 and window_rows % shard == 0 and shard * 768 * 2 <= 256 << 20
    chunk, shard = layout.row_geometry(1000 * 128, 64 * 4)   # awkward window
    assert (1000 * 128) % shard == 0 and shard % chunk == 0 and chunk * 256 >= 1 << 20


def test_incomplete_store_refused_unless_partial(tmp_path):
    path = tmp_path / "s.zarr"
    _write_store(path, finish=False, windows=2)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(str(path))
    store = open_store(str(path), allow_partial=True)
    assert store.n_rows == 2 * 4 * 8


def test_missing_and_foreign_store(tmp_path):
    with pytest.raises(StoreError, match="no store"):
        open_store(str(tmp_path / "nope"))
    zarr.open_group(str(tmp_path / "g"), mode="w")
    with pytest.raises(StoreError, match="not a sae_store"):
        open_store(str(tmp_path / "g"))
    _write_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="it has: blocks.0.resid_pre"):
        open_store(str(tmp_path / "s.zarr")).acts("blocks.9.resid_pre", slice(0, 2))


def test_windows_in_order_only(tmp_path):
    w = StoreWriter.create(str(tmp_path / "s.zarr"), meta={}, sites={"a": {"d": 2, "encoding": "float32"}},
                           grads=None, ctx_len=2, n_seqs=4, window_seqs=2)
    with pytest.raises(StoreError, match="out of order"):
        w.write_window(1, np.zeros((2, 2)), np.zeros(4), np.zeros(4), {"a": np.zeros((4, 2))})


def test_finish_shrinks_to_rows_written(tmp_path):
    path = tmp_path / "s.zarr"
    w = StoreWriter.create(str(path), meta={}, sites={"a": {"d": 2, "encoding": "float32"}},
                           grads=None, ctx_len=2, n_seqs=8, window_seqs=4)
    w.write_window(0, np.ones((3, 2)), np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1] * 3),
                   {"a": np.arange(12, dtype=np.float32).reshape(6, 2)})
    w.finish(3)
    store = open_store(str(path))
    assert store.n_rows == 6 and store.tokens.shape == (3, 2)
    np.testing.assert_array_equal(store.acts("a", slice(None)), np.arange(12).reshape(6, 2))


def test_batches_deterministic_cover_and_resume(tmp_path):
    path = tmp_path / "s.zarr"
    truth = _write_store(path, n_seqs=40, ctx=8, window_seqs=8)
    store = open_store(str(path))
    site = "blocks.0.resid_pre"
    it = store.batches(site, 24, block_rows=32, seed=3, epochs=1, drop_last=False)
    batches = list(it)
    rows = np.concatenate([b["rows"] for b in batches])
    assert sorted(rows.tolist()) == list(range(320))          # every row once per epoch
    assert rows[:32].tolist() != list(range(32))               # block order is shuffled
    for b in batches:
        np.testing.assert_allclose(b["acts"][site], truth[site][b["rows"]], rtol=1e-3, atol=1e-3)
    again = [b["rows"] for b in store.batches(site, 24, block_rows=32, seed=3, epochs=1, drop_last=False)]
    assert all((x == y).all() for x, y in zip(again, [b["rows"] for b in batches]))
    # resume from the state after batch 5 of an infinite iterator
    it = store.batches(site, 24, block_rows=32, seed=3, grads=True)
    full = []
    for i, b in enumerate(it):
        full.append(b["rows"])
        if i == 4:
            state = it.state()
        if i == 20:
            break
    resumed = store.batches(site, 24, block_rows=32, seed=3, grads=True, state=state)
    for i, b in zip(range(5, 21), resumed):
        np.testing.assert_array_equal(b["rows"], full[i])
        assert b["grads"][site].shape == (24, 16)


def test_batches_exclude_pos0_and_row_range(tmp_path):
    path = tmp_path / "s.zarr"
    _write_store(path, n_seqs=16, ctx=8, window_seqs=8)
    store = open_store(str(path))
    it = store.batches("blocks.0.resid_pre", 10, block_rows=16, rows=(0, 96), exclude_pos0=True,
                       epochs=1, drop_last=False)
    rows = np.concatenate([b["rows"] for b in it])
    assert rows.max() < 96 and len(rows) == 96 - (store.rows_pos[:96] == 0).sum()
    assert (store.rows_pos[:][rows] != 0).all()


def test_s3_round_trip_against_real_server(tmp_path):
    pytest.importorskip("moto.server")
    from tests.s3server import s3_server
    with s3_server() as bucket:
        url = f"{bucket}/stores/s.zarr"
        truth = _write_store(url)
        store = open_store(url)
        assert store.n_rows == 96
        np.testing.assert_allclose(store.acts("blocks.0.resid_pre", slice(None)), truth["blocks.0.resid_pre"],
                                   rtol=1e-3, atol=1e-3)
        rows = np.concatenate([b["rows"] for b in store.batches("blocks.1.mlp_out", 16, epochs=1, grads=True)])
        assert sorted(rows.tolist()) == list(range(96))
        # nothing secret in the metadata
        assert "testing" not in json.dumps(store.attrs)
