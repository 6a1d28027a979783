"""Compressed shards (zstd, blosc) in the direct reader and writer (stores/shards.py,
stores/chunk_codecs.py) against zarr-python, the independent reference: the bytes written are
zarr's bytes, reads equal zarr's, every chunk's crc32c is still checked, and a frame that passes
its crc32c but does not hold a whole chunk is refused, never read as stale or zero rows."""
from __future__ import annotations

import dataclasses
import json
import struct

import google_crc32c
import numpy as np
import pytest
import zarr

from sae_harvest.stores import StoreError, open_store, shards
from sae_harvest.stores.chunk_codecs import COMPRESSORS, stated_size, zarr_codecs
from sae_harvest.stores.verify import verify_store
from tests.test_shards import make_store

COMPRESSED = [c for c in COMPRESSORS if c != "none"]


def zarr_array(path, shape, chunk, shard, dtype, codecs):
    group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    arr = group.create_array("a", shape=shape, dtype=dtype, chunks=chunk, shards=shard,
                             compressors=codecs, fill_value=0)
    return arr.with_config({"write_empty_chunks": True})


def test_every_harvest_choice_is_a_known_compressor():
    from sae_harvest.harvest.run import HarvestConfig
    field = next(f for f in dataclasses.fields(HarvestConfig) if f.name == "compressor")
    assert set(field.metadata["choices"]) == set(COMPRESSORS)
    with pytest.raises(ValueError, match="unknown compressor"):
        zarr_codecs("gzip")


@pytest.mark.parametrize("compressor", COMPRESSED + ["zstd-default"])
@pytest.mark.parametrize("dtype,width", [(np.float16, (24,)), (np.int32, ()), (np.uint16, (8,))])
def test_compressed_shard_bytes_equal_zarrs_and_reads_equal_zarrs(tmp_path, compressor, dtype, width):
    rows, chunk, shard = 96, 8, 32
    codecs = [zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()] if compressor == "zstd-default" \
        else zarr_codecs(compressor)
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((rows, *width)) * 100).astype(dtype)
    values[8:16] = 0            # an all-zero chunk compresses to a short frame
    values[40:48] = 3
    arr = zarr_array(tmp_path / "z", (rows, *width), (chunk, *width), (shard, *width), dtype, codecs)
    arr[:] = values
    plain = shards.plain("a", arr)
    assert plain is not None and plain.codec is not None
    for i in range(rows // shard):
        ours = b"".join(bytes(p) for p in shards.encode_shard(plain, values[i * shard:(i + 1) * shard]))
        assert ours == (tmp_path / "z" / plain.key(i)).read_bytes(), f"shard {i} differs from zarr's"
    reader = shards.ShardReader(str(tmp_path / "z"), plain)
    for a, b in [(0, 96), (3, 5), (7, 9), (30, 70), (31, 32), (64, 96), (10, 10)]:
        np.testing.assert_array_equal(reader.read(a, b), values[a:b])
        keep = np.sort(rng.choice(np.arange(a, b), size=(b - a) // 2, replace=False)) if b > a else np.array([], int)
        np.testing.assert_array_equal(reader.read(a, b, keep=keep), values[keep])


@pytest.mark.parametrize("compressor", COMPRESSED)
def test_compressed_store_is_written_and_read_directly_and_verifies(tmp_path, compressor):
    values = make_store(tmp_path / "s", compressor=compressor)
    store = open_store(str(tmp_path / "s"))
    for name in ("acts/s", "rows/seq", "rows/pos", "tokens"):
        assert store._shard_reader(name) is not None and store._shard_reader(name).layout.codec is not None
    np.testing.assert_array_equal(store.acts("s", slice(0, store.n_rows), decode=False), values)
    raw = zarr.open_group(store=str(tmp_path / "s"), mode="r")
    np.testing.assert_array_equal(raw["acts/s"][:], values)
    np.testing.assert_array_equal(store.read_rows("rows/seq", 0, store.n_rows), raw["rows/seq"][:])
    # the training feed's filtered reads
    got = np.concatenate([b["acts"]["s"] for b in store.batches("s", 64, seqs="train", exclude_pos0=True,
                                                                  decode=False, epochs=1, drop_last=False)])
    seq, pos = raw["rows/seq"][:], raw["rows/pos"][:]
    assert len(got) == int(((pos != 0) & (seq % store.split.every != 0)).sum())
    assert verify_store(str(tmp_path / "s")) == []


def _rewrite_chunk(path, plain, shard, chunk, frame: bytes) -> None:
    """Put `frame` (with a valid crc32c) in place of one chunk of a shard and fix the index, as a
    writer with a bug, not bit rot, would: every crc32c holds."""
    data = (path / plain.key(shard)).read_bytes()
    index = np.frombuffer(data[-plain.index_bytes:-4], dtype="<u8").reshape(-1, 2).copy()
    pieces = []
    for c, (off, n) in enumerate(index):
        pieces.append(frame + struct.pack("<I", google_crc32c.value(frame)) if c == chunk
                      else data[int(off):int(off + n)])
    offset = 0
    for c, piece in enumerate(pieces):
        index[c] = (offset, len(piece))
        offset += len(piece)
    raw_index = index.tobytes()
    (path / plain.key(shard)).write_bytes(b"".join(pieces) + raw_index
                                          + struct.pack("<I", google_crc32c.value(raw_index)))


@pytest.mark.parametrize("compressor", ["zstd", "blosc-lz4"])
def test_a_short_or_undecodable_frame_with_valid_crcs_raises(tmp_path, compressor):
    rng = np.random.default_rng(3)
    values = rng.standard_normal((64, 16)).astype(np.float16)
    arr = zarr_array(tmp_path / "z", (64, 16), (8, 16), (32, 16), np.float16, zarr_codecs(compressor))
    arr[:] = values
    plain = shards.plain("a", arr)
    reader = shards.ShardReader(str(tmp_path / "z"), plain)
    reader.read(0, 64)          # fills the per-thread buffers with the right rows first
    short = bytes(plain.codec.encode(values[:4].tobytes()))       # half a chunk
    assert stated_size(plain.codec, short) == plain.chunk_bytes // 2
    _rewrite_chunk(tmp_path / "z", plain, 0, 1, short)
    with pytest.raises(StoreError, match="chunk 1 decompresses to"):
        shards.ShardReader(str(tmp_path / "z"), plain).read(8, 16)
    with pytest.raises(Exception):          # zarr refuses it too
        zarr.open_array(store=str(tmp_path / "z"), path="a", mode="r")[8:16]
    _rewrite_chunk(tmp_path / "z", plain, 0, 2, b"\x00" * 40)      # not a frame at all
    with pytest.raises(StoreError, match="chunk 2 does not decompress"):
        shards.ShardReader(str(tmp_path / "z"), plain).read(16, 24)


@pytest.mark.parametrize("compressor", ["zstd-1", "blosc-zstd"])
def test_flipped_bits_in_a_compressed_shard_raise(tmp_path, compressor):
    make_store(tmp_path / "s", compressor=compressor)
    path = tmp_path / "s" / "acts/s/c/0/0"
    good = path.read_bytes()
    for where in (20, len(good) // 2, len(good) - 10, len(good) - 2):    # frames, index, index crc
        bad = bytearray(good)
        bad[where] ^= 0x10
        path.write_bytes(bytes(bad))
        with pytest.raises(StoreError, match="acts/s.*corrupt"):
            open_store(str(tmp_path / "s")).acts("s", slice(0, 512))
        with pytest.raises(Exception):
            zarr.open_group(store=str(tmp_path / "s"), mode="r")["acts/s"][0:512]
    path.write_bytes(good)


def test_harvest_compressor_writes_compressed_shards_with_the_same_rows(tmp_path):
    """`harvest run --compressor zstd-1` (through the config the CLI is generated from): every array
    carries the codec, the store verifies, and its rows equal an uncompressed harvest's."""
    from sae_harvest.harvest.run import HarvestConfig, harvest
    from tests.tiny_models import make_tiny_model, write_corpus
    corpus = write_corpus(tmp_path / "docs.jsonl", n_docs=60, max_words=40)
    model = make_tiny_model("gpt2", tmp_path / "gpt2")
    stores = {}
    for comp in ("none", "zstd-1"):
        out = tmp_path / f"{comp}.zarr"
        harvest(HarvestConfig(out=str(out), model=model, dataset=str(corpus), sites="blocks.1.resid_pre", grads=True,
                              tokens=1024, ctx_len=32, batch_size=8, shuffle_window=512, device="cpu",
                              compressor=comp), progress=False)
        stores[comp] = open_store(str(out))
        assert verify_store(str(out)) == []
    meta = json.loads((tmp_path / "zstd-1.zarr" / "acts" / "blocks.1.resid_pre" / "zarr.json").read_text())
    assert meta["codecs"][0]["configuration"]["codecs"][1] == \
        {"name": "zstd", "configuration": {"level": 1, "checksum": False}}
    a, b = stores["none"], stores["zstd-1"]
    rows, site = slice(0, a.n_rows), "blocks.1.resid_pre"
    assert a.n_rows == b.n_rows > 0
    np.testing.assert_array_equal(a.acts(site, rows, decode=False), b.acts(site, rows, decode=False))
    np.testing.assert_array_equal(a.grads(site, rows, decode=False), b.grads(site, rows, decode=False))

    def size(comp):
        return sum(f.stat().st_size for f in (tmp_path / f"{comp}.zarr" / "rows" / "pos").glob("c/**/*")
                   if f.is_file())
    assert 0 < size("zstd-1") < size("none") / 2         # positions 0..31 as int32 compress well
