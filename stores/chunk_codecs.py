"""The compressors a store's chunks may carry, for the direct shard reader and writer.

Only standard Zarr v3 codecs, built exactly as zarr-python 3 builds them (numcodecs' `Zstd` and
`Blosc` from the array's own codec configuration), so a chunk this tool compresses is the chunk
zarr-python would have written (tests/test_shards.py compares the bytes) and any Zarr v3 reader
(zarr-python, TensorStore) reads it. `harvest run --compressor` names one of `COMPRESSORS`.
"""
from __future__ import annotations

import functools
import json

import numcodecs.blosc
import zarr
from numcodecs.blosc import Blosc
from numcodecs.zstd import Zstd

# zarr-python sets this too: blosc's global-context path is not thread-safe, and the feed and the
# writer decode and encode chunks on several threads at once
numcodecs.blosc.use_threads = False

# --compressor name -> the zarr codec (before crc32c). Byte shuffle for blosc: bench/codecs.py
# measured bit shuffle below byte shuffle on activations and gradients alike.
COMPRESSORS = {
    "none": None,
    "zstd": lambda: zarr.codecs.ZstdCodec(level=3),      # the level `--compressor zstd` always wrote
    "zstd-1": lambda: zarr.codecs.ZstdCodec(level=1),
    "blosc-zstd": lambda: zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
    "blosc-lz4": lambda: zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
}


def zarr_codecs(compressor: str | None) -> list:
    """The codecs a new array gets for `--compressor`: [compressor?, crc32c]; ValueError if unknown."""
    name = compressor or "none"
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {compressor!r}; use {', '.join(COMPRESSORS)}")
    make = COMPRESSORS[name]
    return ([make()] if make else []) + [zarr.codecs.Crc32cCodec()]


_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def readable(codec: dict) -> bool:
    """Whether the direct reader and writer handle this codec entry (a dict of array metadata)."""
    try:
        compressor(json.dumps(codec, sort_keys=True))
        return True
    except (KeyError, TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def compressor(spec: str):
    """The numcodecs object for one codec entry (JSON text, so the Plain layout stays hashable),
    configured as zarr-python configures it; KeyError/ValueError for anything else."""
    codec = json.loads(spec)
    conf = codec.get("configuration") or {}
    if codec["name"] == "zstd":
        if set(conf) - {"level", "checksum"}:
            raise ValueError(f"zstd configuration {conf}")
        return Zstd.from_config({"level": int(conf.get("level", 0)), "checksum": bool(conf.get("checksum", False))})
    if codec["name"] == "blosc":
        if set(conf) != {"typesize", "cname", "clevel", "shuffle", "blocksize"}:
            raise ValueError(f"blosc configuration {conf}")
        return Blosc.from_config({"cname": conf["cname"], "clevel": int(conf["clevel"]),
                                  "shuffle": _BLOSC_SHUFFLE[conf["shuffle"]],
                                  "blocksize": int(conf["blocksize"]), "typesize": int(conf["typesize"])})
    raise ValueError(f"codec {codec['name']!r}")


def stated_size(codec, frame) -> int | None:
    """The uncompressed size a compressed chunk's own header states, or None when it states none.
    Decoding into a buffer larger than the frame leaves the rest of the buffer as it was, so the
    reader checks this before decoding in place (a short frame would otherwise read as stale rows)."""
    view = memoryview(frame).cast("B")
    if isinstance(codec, Blosc):       # blosc header: version, versionlz, flags, typesize, nbytes (<u4)
        return int.from_bytes(view[4:8], "little") if len(view) >= 16 else None
    # zstd frame header (RFC 8878 3.1.1): magic, descriptor, [window], [dictionary id], [content size]
    if len(view) < 6 or bytes(view[:4]) != b"\x28\xb5\x2f\xfd":
        return None
    desc = view[4]
    fcs_flag, single, dict_flag = desc >> 6, (desc >> 5) & 1, desc & 3
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if width == 0 or len(view) < at + width:
        return None
    size = int.from_bytes(view[at:at + width], "little")
    return size + 256 if width == 2 else size
