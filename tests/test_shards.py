"""The direct shard codec (stores/shards.py) against zarr-python, the independent reference:
the bytes it writes are the bytes zarr writes, zarr reads them back, and its reads equal zarr's
and catch every flipped bit zarr's crc32c codec catches."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import xxhash
import pytest
import zarr

from sae_harvest.stores import StoreError, open_store, shards
from sae_harvest.stores.writer import StoreWriter

CODECS = [zarr.codecs.Crc32cCodec()]


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """Castagnoli CRC computed bytewise in Python: the reference for the checksums we record."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def test_reference_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283     # the standard check value (RFC 3720)


def zarr_array(path, shape, chunk, shard, dtype, compressors=CODECS):
    group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    arr = group.create_array("a", shape=shape, dtype=dtype, chunks=chunk, shards=shard,
                             compressors=compressors, fill_value=0)
    return group, arr.with_config({"write_empty_chunks": True})


@pytest.mark.parametrize("dtype,width", [(np.float16, (24,)), (np.int32, ()), (np.uint16, (8,)), (np.float32, (3,))])
def test_shard_bytes_equal_zarrs(tmp_path, dtype, width):
    rows, chunk, shard = 96, 8, 32
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((rows, *width)) * 100).astype(dtype)
    values[8:16] = 0    # an all-zero chunk is written, not skipped
    _, arr = zarr_array(tmp_path / "z", (rows, *width), (chunk, *width), (shard, *width), dtype)
    arr[:] = values
    plain = shards.plain("a", arr)
    assert plain is not None and (plain.shard_rows, plain.chunk_rows) == (shard, chunk)
    for i in range(rows // shard):
        ours = b"".join(bytes(p) for p in shards.encode_shard(plain, values[i * shard:(i + 1) * shard]))
        theirs = (tmp_path / "z" / plain.key(i)).read_bytes()
        assert ours == theirs, f"shard {i} differs from zarr's"


def test_partial_shard_matches_zarr_and_zarr_reads_ours(tmp_path):
    width = (16,)
    values = np.arange(40 * 16, dtype=np.float16).reshape(40, 16)
    _, arr = zarr_array(tmp_path / "z", (64, 16), (8, 16), (32, 16), np.float16)
    arr[:40] = values          # the second shard is only partly written: zarr fills with zeros
    plain = shards.plain("a", arr)
    # zarr writes only the chunks a partial write touches (the rest are marked empty in the index);
    # we read those, and refuse rows of a chunk that was never written rather than return zeros
    reader = shards.ShardReader(str(tmp_path / "z"), plain)
    np.testing.assert_array_equal(reader.read(30, 40), values[30:40])
    with pytest.raises(StoreError, match="never written"):
        reader.read(38, 42)

    # written by us, read by zarr
    _, fresh = zarr_array(tmp_path / "y", (64, 16), (8, 16), (32, 16), np.float16)
    written = shards.write_shards(str(tmp_path / "y"), shards.plain("a", fresh), 0, values)
    assert [k for k, _, _ in written] == ["a/c/0/0", "a/c/1/0"]
    for key, size, digest in written:
        data = (tmp_path / "y" / key).read_bytes()
        assert len(data) == size and digest == "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()
    back = zarr.open_array(store=str(tmp_path / "y"), path="a", mode="r")
    np.testing.assert_array_equal(back[:40], values)
    np.testing.assert_array_equal(back[40:], 0)


def test_reads_equal_zarr_for_any_span_and_kept_rows(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.standard_normal((128, 12)).astype(np.float16)
    _, arr = zarr_array(tmp_path / "z", (128, 12), (8, 12), (32, 12), np.float16)
    arr[:] = values
    reader = shards.ShardReader(str(tmp_path / "z"), shards.plain("a", arr))
    for a, b in [(0, 128), (3, 5), (7, 9), (30, 70), (31, 32), (96, 128), (50, 50)]:
        np.testing.assert_array_equal(reader.read(a, b), values[a:b])
        keep = np.sort(rng.choice(np.arange(a, b), size=(b - a) // 2, replace=False)) if b > a else np.array([], int)
        np.testing.assert_array_equal(reader.read(a, b, keep=keep), values[keep])
    out = np.full((10, 12), 7, dtype=np.float16)
    reader.read(60, 70, out=out)
    np.testing.assert_array_equal(out, values[60:70])
    with pytest.raises(ValueError):
        reader.read(0, 10, keep=np.array([3, 12]))       # a kept row outside the span


def test_other_pipelines_are_not_plain(tmp_path):
    # zstd and blosc are read directly now (tests/test_shards_compressed.py); gzip is not
    _, arr = zarr_array(tmp_path / "z", (64, 4), (8, 4), (32, 4), np.float16,
                        compressors=[zarr.codecs.GzipCodec(), zarr.codecs.Crc32cCodec()])
    assert shards.plain("a", arr) is None
    _, arr = zarr_array(tmp_path / "y", (64, 4), (8, 4), (32, 4), np.float16, compressors=None)
    assert shards.plain("a", arr) is None       # no crc32c: not what this tool writes
    _, arr = zarr_array(tmp_path / "x", (64, 4), (8, 2), (32, 4), np.float16)
    assert shards.plain("a", arr) is None       # chunks cut across the row


def make_store(path, rows_seqs=64, ctx=16, d=32, compressor=None):
    w = StoreWriter.create(str(path), meta={"model": {"name": "t"}},
                           sites={"s": {"d": d, "encoding": "float16"}}, grads=None,
                           ctx_len=ctx, n_seqs=rows_seqs, window_seqs=32, compressor=compressor)
    rng = np.random.default_rng(2)
    acts = {}
    for window in range(rows_seqs // 32):
        n = 32 * ctx
        acts[window] = rng.standard_normal((n, d)).astype(np.float16)
        w.write_window(window, np.arange(32 * ctx, dtype=np.int32).reshape(32, ctx),
                       rng.permutation(n).astype(np.int32) // ctx + window * 32,
                       np.tile(np.arange(ctx, dtype=np.int32), 32), {"s": acts[window]})
    w.finish()
    return np.concatenate([acts[k] for k in sorted(acts)])


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_store_reads_fast_path_equal_zarr_and_records_hash_the_files(tmp_path, compressor):
    values = make_store(tmp_path / "s", compressor=compressor)
    store = open_store(str(tmp_path / "s"))
    assert store._shard_reader("acts/s") is not None      # zstd shards are read directly too
    np.testing.assert_array_equal(store.acts("s", slice(0, store.n_rows), decode=False), values)
    np.testing.assert_array_equal(store.acts("s", slice(100, 900), decode=False), values[100:900])
    # zarr alone reads the same
    raw = zarr.open_group(store=str(tmp_path / "s"), mode="r")["acts/s"]
    np.testing.assert_array_equal(raw[:], values)
    for record in store.records.values():
        for key, size, digest in record["shards"]["acts/s"]:
            data = (tmp_path / "s" / key).read_bytes()
            assert len(data) == size and digest == "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()


def test_flipped_bits_anywhere_raise(tmp_path):
    make_store(tmp_path / "s")
    key = "acts/s/c/0/0"
    path = tmp_path / "s" / key
    good = path.read_bytes()
    plain = open_store(str(tmp_path / "s"))._shard_reader("acts/s").layout
    for where in (5, plain.chunk_bytes + 2, len(good) - 10, len(good) - 2):   # data, crc, index, index crc
        bad = bytearray(good)
        bad[where] ^= 0x10
        path.write_bytes(bytes(bad))
        store = open_store(str(tmp_path / "s"))
        with pytest.raises(StoreError, match="acts/s.*corrupt"):
            store.acts("s", slice(0, 64))
        # zarr, the reference, refuses the same bytes
        with pytest.raises(Exception):
            zarr.open_group(store=str(tmp_path / "s"), mode="r")["acts/s"][0:64]
    path.write_bytes(good)
    np.testing.assert_array_equal(open_store(str(tmp_path / "s")).acts("s", slice(0, 4), decode=False),
                                  zarr.open_group(store=str(tmp_path / "s"), mode="r")["acts/s"][0:4])


def test_position_arrays_take_the_activations_chunk(tmp_path):
    make_store(tmp_path / "s", d=32)
    meta = json.loads((tmp_path / "s" / "rows" / "pos" / "zarr.json").read_text())
    acts = json.loads((tmp_path / "s" / "acts" / "s" / "zarr.json").read_text())
    inner = lambda m: m["codecs"][0]["configuration"]["chunk_shape"][0]   # noqa: E731
    assert inner(meta) == inner(acts)
    assert os.path.exists(tmp_path / "s" / "rows" / "pos" / "c" / "0")


def test_verify_reads_sha256_records_of_early_format_2_stores(tmp_path):
    from sae_harvest.stores.verify import verify_store
    make_store(tmp_path / "s")
    for rec_path in (tmp_path / "s" / "windows").iterdir():
        record = json.loads(rec_path.read_text())
        for name, entries in record["shards"].items():
            for entry in entries:
                entry[2] = hashlib.sha256((tmp_path / "s" / entry[0]).read_bytes()).hexdigest()
        rec_path.write_text(json.dumps(record))
    assert verify_store(str(tmp_path / "s")) == []
    shard = tmp_path / "s" / "rows" / "seq" / "c" / "0"
    data = bytearray(shard.read_bytes())
    data[3] ^= 1
    shard.write_bytes(bytes(data))
    assert any("checksum mismatch" in p for p in verify_store(str(tmp_path / "s")))


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_write_window_order_equals_writing_the_gathered_rows(tmp_path, compressor):
    """write_window(order=...) (the harvest's shuffle, gathered shard by shard on the writing
    threads) stores exactly what writing the rows already gathered does: same files, same bytes,
    including a short last window whose buffers are longer than its rows."""
    ctx, d, window_seqs, n_seqs = 8, 16, 32, 56       # windows of 32 and 24 sequences
    rng = np.random.default_rng(5)
    paths = {how: tmp_path / how for how in ("gathered", "order")}
    writers = {how: StoreWriter.create(str(p), meta={"model": {"name": "t"}},
                                       sites={"s": {"d": d, "encoding": "float16"}},
                                       grads={"encoding": "bfloat16", "definition": "t"}, ctx_len=ctx,
                                       n_seqs=n_seqs, window_seqs=window_seqs, compressor=compressor)
               for how, p in paths.items()}
    for window, seqs in ((0, 32), (1, 24)):
        n, buffer_rows = seqs * ctx, window_seqs * ctx
        acts = rng.standard_normal((buffer_rows, d)).astype(np.float16)
        grads = rng.standard_normal((buffer_rows, d)).astype(np.float32)
        rows_seq = np.repeat(np.arange(seqs, dtype=np.int32) + window * window_seqs, ctx)
        rows_pos = np.tile(np.arange(ctx, dtype=np.int32), seqs)
        order = rng.permutation(n)
        tokens = rng.integers(0, 50, (seqs, ctx)).astype(np.int32)
        writers["gathered"].write_window(window, tokens, rows_seq[order], rows_pos[order], {"s": acts[order]},
                                         {"s": grads[order]})
        writers["order"].write_window(window, tokens, rows_seq, rows_pos, {"s": acts}, {"s": grads}, order=order)
    for w in writers.values():
        w.finish()

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and p.suffix != ".json"}

    a, b = files(paths["gathered"]), files(paths["order"])
    assert a.keys() == b.keys() and len(a) > 4
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    store = open_store(str(paths["order"]))
    assert store.n_rows == n_seqs * ctx
