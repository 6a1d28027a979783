"""The store format: version, array names, value encodings and chunk geometry.

Everything a reader in another language needs is written into the store itself
(`attrs["sae_store"]` and per-array `attrs["encoding"]`); this module is the one
place that decides it. See docs/store-format.md.
"""
from __future__ import annotations

import math

import numpy as np

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)      # a version-1 store is read as before and never written to
ROOT_ATTR = "sae_store"

# format 2: completion lives in small JSON objects written atomically, one per window, not in a
# counter that several writers would share (docs/store-format.md)
WINDOWS_PREFIX = "windows"
FINAL_KEY = "final.json"        # written once every window record is present and arrays are sized
LEASE_KEY = "lease.json"        # who is writing the store now (stores/lease.py)


def window_key(window: int) -> str:
    return f"{WINDOWS_PREFIX}/{window:08d}.json"

TOKENS = "tokens"
ROWS_SEQ = "rows/seq"
ROWS_POS = "rows/pos"


def acts_path(site: str) -> str:
    return f"acts/{site}"


def grads_path(site: str) -> str:
    return f"grads/{site}"


# zarr-python 3.1 has no bfloat16 dtype, so bf16 values are stored as their raw
# bits in uint16 and tagged with attrs["encoding"] = "bfloat16". This section is the one codec
# for that: numpy (encode/decode) and torch (torch_to_stored ... stored_to_torch) sides.
ENCODINGS = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}

# the largest finite magnitude each encoding holds: a harvest refuses a window with more
MAX_ABS = {"float16": 65504.0, "bfloat16": 3.38e38, "float32": 3.4e38}


def storage_dtype(encoding: str) -> np.dtype:
    try:
        return np.dtype(ENCODINGS[encoding])
    except KeyError:
        raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}") from None


def encode(values: np.ndarray, encoding: str) -> np.ndarray:
    """float32 array -> the stored representation."""
    if encoding == "bfloat16":
        if values.dtype == np.uint16:  # already bf16 bits (encoded on the device)
            return values
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        # round to nearest even, as torch's .to(bfloat16) does; NaN stays NaN
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))
        out = (rounded >> 16).astype(np.uint16)
        nan = np.isnan(values)
        if nan.any():
            out[nan] = 0x7FC0
        return out
    return np.asarray(values, dtype=ENCODINGS[encoding])


def decode(stored: np.ndarray, encoding: str) -> np.ndarray:
    """Stored representation -> float32."""
    if encoding == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32, copy=False)


# The torch side. torch's numpy bridge has no bfloat16 (and torch had no uint16 before 2.3), so a
# bf16 tensor crosses to numpy as its bits (int16 in torch, uint16 in numpy), never converted: no
# copy, no rounding. torch is imported only here, so reading a store (verify, info) never loads it.

def torch_dtype(encoding: str):
    """The torch dtype of an encoding's values (bfloat16 for bfloat16, whatever its bits are stored as)."""
    import torch

    return {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[encoding]


def torch_to_stored(values, encoding: str):
    """A tensor cast to the encoding, on its own device (a 16-bit encoding halves the copy to host)."""
    return values.to(torch_dtype(encoding))


def stored_to_numpy(values) -> np.ndarray:
    """A host tensor of an encoding's torch dtype (torch_to_stored) as the array the store holds,
    without a copy: bfloat16 as its uint16 bits."""
    import torch

    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().view(np.uint16)
    return values.numpy()


def torch_bits_dtype(stored: np.dtype):
    """The torch dtype with the bits of a stored numpy dtype (uint16: int16, bfloat16's bits), for
    buffers allocated by torch that the store's reads then fill."""
    import torch

    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
            np.dtype(np.uint16): torch.int16}[np.dtype(stored)]


def bf16_bits_to_torch(bits, encoding: str):
    """A tensor of stored bits (torch_bits_dtype) as the encoding's values, without a copy."""
    import torch

    return bits.view(torch.bfloat16) if encoding == "bfloat16" else bits


def stored_to_torch(values: np.ndarray, encoding: str):
    """Stored values (as read) as a tensor of the encoding's dtype, without a copy for a contiguous
    array: bfloat16 from its uint16 bits."""
    import torch

    values = np.ascontiguousarray(values)
    return bf16_bits_to_torch(torch.from_numpy(values.view(np.int16) if encoding == "bfloat16" else values),
                              encoding)


CHUNK_MIN_BYTES = 1 << 20      # zarr/object-store reads below ~1 MB are latency bound
SHARD_MAX_BYTES = 256 << 20    # one object per shard; keeps single PUTs well below S3 limits


def _divisors(n: int) -> list[int]:
    small, large = [], []
    for i in range(1, math.isqrt(n) + 1):
        if n % i == 0:
            small.append(i)
            if i != n // i:
                large.append(n // i)
    return small + large[::-1]


def row_geometry(window_rows: int, row_bytes: int, chunk_rows: int | None = None) -> tuple[int, int]:
    """(chunk_rows, shard_rows) for a [n_rows, d] array written one window at a time.

    Both divide `window_rows`, so each window covers whole shards: the writer never
    rewrites part of a shard another write owns (zarr-python #3682), and a killed
    window is simply rewritten on resume. `chunk_rows` (a divisor of window_rows) fixes the
    chunk: the per-row int32 arrays take the activations' chunk rows, so the training feed's
    read of a block's positions touches only that block's rows, not a 1 MB chunk of them.
    """
    divisors = _divisors(window_rows)
    chunk = chunk_rows or next((c for c in divisors if c * row_bytes >= CHUNK_MIN_BYTES), window_rows)
    if window_rows % chunk:
        raise ValueError(f"chunk of {chunk} rows does not divide the window's {window_rows}")
    shard = chunk
    for s in divisors:
        if s % chunk == 0 and s * row_bytes <= SHARD_MAX_BYTES:
            shard = max(shard, s)
    return chunk, shard


def window_seqs_for(shuffle_window_tokens: int, ctx_len: int) -> int:
    """Sequences per shuffle window: at least the requested tokens, a multiple of 8 for divisors."""
    seqs = max(1, math.ceil(shuffle_window_tokens / ctx_len))
    return seqs if seqs < 8 else math.ceil(seqs / 8) * 8


def shard_span(first: int, count: int, shard: int) -> range:
    """Indices of the shards (of `shard` rows each) that rows [first, first + count) touch."""
    if count <= 0:
        return range(0)
    return range(first // shard, (first + count - 1) // shard + 1)


def shard_key(name: str, index: int, ndim: int) -> str:
    """Store key of shard `index` along the rows of array `name` (default v3 chunk keys)."""
    return "/".join([name, "c", str(index)] + ["0"] * (ndim - 1))
