"""The plain shard layout this tool writes, encoded and read without zarr's per-chunk machinery.

Every array of a store is a Zarr v3 `sharding_indexed` array split along its first axis, with
inner codecs [bytes(little), crc32c] (or [bytes(little), zstd or blosc, crc32c]: `--compressor`,
stores/chunk_codecs.py) and index codecs [bytes(little), crc32c] at the end. Such a shard is:
each inner chunk's bytes (compressed, if so) followed by their crc32c, in order, then the index
(offset and length of every chunk, little-endian uint64, C order) and the index's crc32c.
zarr-python writes exactly these bytes (tests/test_shards.py and test_shards_compressed.py compare
them), so any Zarr v3 reader still reads what `encode_shard` writes. Going around zarr here is
what keeps the harvest's writer and the training feed near disk speed: one write or one ranged
read per shard span instead of a task per chunk. Every chunk's crc32c is still checked on read,
before it is decompressed. Arrays with any other pipeline (another codec, a store another tool
wrote) are read and written through zarr.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
from dataclasses import dataclass

import google_crc32c
import numpy as np
import xxhash

from . import chunk_codecs, fs
from .errors import StoreError

_EMPTY = np.uint64(2**64 - 1)       # an index entry for a chunk that was never written
_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_PLAIN_CODECS = [_BYTES, {"name": "crc32c"}]


def _crc(buf) -> bytes:
    """crc32c as the codec stores it (4 bytes, little-endian). google_crc32c takes numpy arrays
    and bytes but not memoryviews, so buffers go in as a uint8 view (no copy)."""
    return struct.pack("<I", google_crc32c.value(np.frombuffer(buf, dtype=np.uint8)))


@dataclass(frozen=True)
class Plain:
    """Geometry of an array in the plain layout: shards and chunks cut along axis 0 only."""
    name: str
    shape: tuple
    shard_rows: int
    chunk_rows: int
    dtype: np.dtype
    compressor: str | None = None     # the chunks' compressor entry as JSON text; None: stored raw

    @property
    def codec(self):
        """The numcodecs compressor (configured as zarr-python configures it), or None."""
        return None if self.compressor is None else chunk_codecs.compressor(self.compressor)

    @property
    def row_shape(self) -> tuple:
        return tuple(self.shape[1:])

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.dtype.itemsize

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.row_bytes

    @property
    def index_bytes(self) -> int:
        return 16 * self.chunks_per_shard + 4

    def key(self, shard: int) -> str:
        return "/".join([self.name, "c", str(shard)] + ["0"] * (len(self.shape) - 1))


def plain(name: str, arr) -> Plain | None:
    """The array's Plain geometry, or None when its codecs or grid are anything else."""
    try:
        meta = json.loads(json.dumps(arr.metadata.to_dict(), default=str))   # tuples -> lists
    except (AttributeError, TypeError, ValueError):
        return None
    codecs = meta.get("codecs") or []
    if meta.get("zarr_format") != 3 or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    if meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}:
        return None
    conf = codecs[0].get("configuration", {})
    inner = conf.get("codecs") or []
    compressor = None
    if len(inner) == 3 and [inner[0], inner[2]] == _PLAIN_CODECS and chunk_codecs.readable(inner[1]):
        compressor = json.dumps(inner[1], sort_keys=True)
    elif inner != _PLAIN_CODECS:
        return None
    if conf.get("index_codecs") != _PLAIN_CODECS or conf.get("index_location", "end") != "end":
        return None
    shape = tuple(meta["shape"])
    shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    chunk = tuple(conf["chunk_shape"])
    dtype = np.dtype(meta["data_type"]) if isinstance(meta["data_type"], str) else None
    if dtype is None or dtype.kind not in "iuf" or not shape or shard[1:] != shape[1:] \
            or chunk[1:] != shape[1:] or shard[0] % chunk[0]:
        return None
    return Plain(name, shape, int(shard[0]), int(chunk[0]), dtype.newbyteorder("<"), compressor)


def encode_shard(layout: Plain, values: np.ndarray) -> list:
    """The bytes of one shard holding `values` (at most shard_rows rows; the rest are zeros, as
    zarr fills a partly written shard), as a list of buffers to write in order."""
    values = np.ascontiguousarray(values, dtype=layout.dtype)
    if values.shape[1:] != layout.row_shape or len(values) > layout.shard_rows:
        raise ValueError(f"{layout.name}: {values.shape} does not fit a shard of "
                         f"{(layout.shard_rows, *layout.row_shape)}")
    pieces, index = [], np.empty((layout.chunks_per_shard, 2), dtype="<u8")
    offset = 0
    for c in range(layout.chunks_per_shard):
        rows = values[c * layout.chunk_rows:(c + 1) * layout.chunk_rows]
        if len(rows) < layout.chunk_rows:
            full = np.zeros((layout.chunk_rows, *layout.row_shape), dtype=layout.dtype)
            full[:len(rows)] = rows
            rows = full
        data = memoryview(rows).cast("B")
        if layout.codec is not None:
            data = layout.codec.encode(data)
        pieces += [data, _crc(data)]
        index[c] = (offset, len(data) + 4)
        offset += len(data) + 4
    index_bytes = index.tobytes()
    pieces += [index_bytes, _crc(index_bytes)]
    return pieces


def _runs(index: np.ndarray, first: int, last: int) -> list[list[int]]:
    """Chunks first..last grouped into runs stored back to back (one read each)."""
    runs = [[first]]
    for c in range(first + 1, last + 1):
        if int(index[c, 0]) == int(index[runs[-1][-1], 0]) + int(index[runs[-1][-1], 1]):
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs


class ShardReader:
    """Rows of a plain-layout array: per shard, its index (read once) and one ranged read of the
    chunks the rows touch, each chunk's crc32c checked, rows copied straight into the caller's
    array. Local reads go into a per-thread buffer that is reused, so steady reads touch no
    fresh memory but the output."""

    def __init__(self, path: str, layout: Plain, digests: dict[str, str] | None = None):
        self.path, self.layout = str(path), layout
        # {shard key: the window record's checksum}: a read that covers a whole shard checks it,
        # so a swapped or transplanted shard (each chunk's crc32c intact) is caught on read too
        self.digests = digests or {}
        self._index: dict[int, np.ndarray] = {}
        self._index_raw: dict[int, bytes] = {}
        self._local = not fs.is_url(path)   # local reads go into a reused per-thread buffer
        self._buffers = threading.local()

    def _corrupt(self, shard: int, what: str) -> StoreError:
        return StoreError(f"store {self.path}: array {self.layout.name}: corrupt data in shard "
                          f"{self.layout.key(shard)} ({what})")

    def _buffer(self, n: int, which: str = "raw") -> memoryview:
        """A per-thread buffer of n bytes, reused: "raw" for what storage returns, "plain" for
        decompressed chunks."""
        buf = getattr(self._buffers, which, None)
        if buf is None or len(buf) < n:
            buf = bytearray(n)
            setattr(self._buffers, which, buf)
        return memoryview(buf)[:n]

    def index(self, shard: int) -> np.ndarray:
        """[chunks_per_shard, 2] (offset, nbytes) of the shard's chunks, its crc checked."""
        if shard not in self._index:
            lay = self.layout
            try:
                raw = bytes(fs.read_range(self.path, lay.key(shard), -lay.index_bytes, 0))
            except OSError as e:
                raise self._corrupt(shard, f"cannot read its index: {e}") from None
            if len(raw) != lay.index_bytes or _crc(raw[:-4]) != raw[-4:]:
                raise self._corrupt(shard, "shard index checksum mismatch")
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
            written = index[:, 0] != _EMPTY     # zarr leaves chunks a partial write never touched
            lengths = index[written, 1]
            # a compressed chunk has any length; a crc32c and at least one byte of frame it must have
            if (lengths != lay.chunk_bytes + 4).any() if lay.codec is None else (lengths < 5).any():
                raise self._corrupt(shard, "chunk lengths differ from the array's geometry")
            self._index[shard] = index
            self._index_raw[shard] = raw
        return self._index[shard]

    def _check_whole(self, shard: int, run: list[int], raw) -> None:
        """When one read got every chunk of a shard, stored from offset 0: compare the shard's
        checksum (those bytes and the index) with its window record's."""
        digest = self.digests.get(self.layout.key(shard))
        if digest is None or not digest.startswith(XXH3 + ":") or len(run) != self.layout.chunks_per_shard \
                or int(self._index[shard][run[0], 0]) != 0:
            return
        if checksum([raw, self._index_raw[shard]]) != digest:
            raise self._corrupt(shard, "its checksum differs from its window record's: swapped, copied in "
                                       "from another store, or altered")

    def _chunks(self, a: int, b: int) -> dict[int, np.ndarray]:
        """{global chunk number: its rows as [chunk_rows, row_bytes] uint8} for every chunk rows
        [a, b) touch, each read in as few reads as the shard's layout allows, crc-checked, then
        decompressed (into a reused per-thread buffer) when the array is compressed."""
        lay = self.layout
        plan = []          # (shard, chunks stored back to back, their bytes)
        for shard in range(a // lay.shard_rows, (b - 1) // lay.shard_rows + 1):
            base = shard * lay.shard_rows
            first = (max(a, base) - base) // lay.chunk_rows
            last = (min(b, base + lay.shard_rows) - 1 - base) // lay.chunk_rows
            index = self.index(shard)
            if (index[first:last + 1, 0] == _EMPTY).any():
                raise self._corrupt(shard, "a chunk holding recorded rows was never written")
            plan += [(shard, run, int(index[run, 1].sum())) for run in _runs(index, first, last)]
        buf = self._buffer(sum(n for _, _, n in plan)) if self._local else None
        codec = lay.codec
        plain = self._buffer(sum(len(run) for _, run, _ in plan) * lay.chunk_bytes, "plain") if codec else None
        chunks, at, k = {}, 0, 0
        for shard, run, nbytes in plan:
            lo = int(self._index[shard][run[0], 0])
            raw = fs.read_range(self.path, lay.key(shard), lo, lo + nbytes,
                                into=None if buf is None else buf[at:at + nbytes])
            at += nbytes
            if len(raw) != nbytes:
                raise self._corrupt(shard, f"{len(raw)} bytes where the index says {nbytes}")
            raw = memoryview(raw)
            pos = 0
            for c in run:
                size = int(self._index[shard][c, 1])
                data, crc = raw[pos:pos + size - 4], raw[pos + size - 4:pos + size]
                pos += size
                if _crc(data) != crc:
                    raise self._corrupt(shard, f"chunk {c} checksum mismatch")
                if codec is not None:
                    out = plain[k * lay.chunk_bytes:(k + 1) * lay.chunk_bytes]
                    k += 1
                    try:    # in place only when the frame says it fills the buffer exactly
                        exact = chunk_codecs.stated_size(codec, data) == lay.chunk_bytes
                        data = codec.decode(data, out=out) if exact else codec.decode(data)
                    except Exception as e:     # a frame that passed its crc32c but does not decode
                        raise self._corrupt(shard, f"chunk {c} does not decompress: {e}") from None
                    if memoryview(data).nbytes != lay.chunk_bytes:
                        raise self._corrupt(shard, f"chunk {c} decompresses to {memoryview(data).nbytes} "
                                                   f"bytes, not {lay.chunk_bytes}")
                chunks[shard * lay.chunks_per_shard + c] = \
                    np.frombuffer(data, dtype=np.uint8).reshape(lay.chunk_rows, lay.row_bytes)
            self._check_whole(shard, run, raw)
        return chunks

    def read(self, a: int, b: int, out: np.ndarray | None = None, keep: np.ndarray | None = None) -> np.ndarray:
        """Rows [a, b) as stored (no decoding), or only the sorted absolute rows `keep` within
        them; written into `out` when given (len(out) rows: b - a, or len(keep))."""
        lay = self.layout
        if keep is not None and len(keep) and (keep.min() < a or keep.max() >= b):
            raise ValueError(f"keep rows outside [{a}, {b})")
        n = b - a if keep is None else len(keep)
        if out is None:
            out = np.empty((n, *lay.row_shape), dtype=lay.dtype)
        if len(out) != n:
            raise ValueError(f"out has {len(out)} rows for {n}")
        if n == 0:
            return out
        chunks = self._chunks(a, b)
        dest = out.reshape(n, -1).view(np.uint8)
        size = lay.chunk_rows
        if keep is None:
            row, s = a, 0
            while s < n:            # copy rows a.. into dest, chunk by chunk
                c, r = divmod(row, size)
                take = min(n - s, size - r)
                dest[s:s + take] = chunks[c][r:r + take]
                s, row = s + take, row + take
            return out
        # one gather per chunk, not one copy per run of consecutive rows: held-out sequences leave
        # a gap every ~`every` rows (rows are shuffled across sequences), so runs are short
        # (tests/test_split.py); "clip" skips take's buffering, the rows are checked to lie in [a, b)
        keep = np.asarray(keep, dtype=np.int64)
        chunk_of = keep // size
        cuts = (np.flatnonzero(np.diff(chunk_of)) + 1).tolist()
        for s, e in zip([0] + cuts, cuts + [n]):
            c = int(chunk_of[s])
            np.take(chunks[c], keep[s:e] - c * size, axis=0, out=dest[s:e], mode="clip")
        return out


def write_shards(path: str, layout: Plain, first_row: int, values: np.ndarray) -> list[list]:
    """Write rows [first_row, first_row + len(values)) as whole shards (first_row on a shard
    boundary) and return [[key, bytes, checksum], ...] of each: the checksum of exactly the bytes
    handed to storage, computed as they are written (no read-back; `harvest verify` re-reads)."""
    if first_row % layout.shard_rows:
        raise ValueError(f"{layout.name}: row {first_row} is not on a shard boundary")
    written = []
    for i in range(0, len(values), layout.shard_rows):
        key = layout.key((first_row + i) // layout.shard_rows)
        pieces = encode_shard(layout, values[i:i + layout.shard_rows])
        fs.write_pieces(path, key, pieces)
        written.append([key, sum(len(p) for p in pieces), checksum(pieces)])
    return written


def checksum(pieces) -> str:
    """A window record's checksum of one object: xxh3-128 of all its bytes, "xxh3_128:<32 hex>".

    Not a crc32c of the whole object (the first records of this change): a shard ends every chunk
    and its index with their own crc32c, so the crc32c of the whole shard is the CRC residue, the
    same constant for every shard, and swapped or transplanted shards passed. No crc32c of the
    payloads either: it is linear, so a pattern XORed into a chunk that keeps the chunk's crc32c
    valid (a multiple of the CRC polynomial) also keeps any crc32c over the payloads. xxh3 is not
    linear and runs at ~12 GB/s a core (sha256: ~1 GB/s). It guards against damage and mix-ups,
    not forgery (see docs/security.md)."""
    h = xxhash.xxh3_128()
    for piece in pieces:
        h.update(piece)
    return f"{XXH3}:{h.hexdigest()}"


XXH3 = "xxh3_128"
# what a crc32c record of the first format-2 stores holds for every shard: the CRC residue
CRC32C_RESIDUE = "crc32c:7059f117"


def checksum_rule(digest) -> str:
    """How a record's checksum is checked: "xxh3", "sha256", or "legacy-crc32c" (the residue:
    verify then checks every chunk's and the index's own crc32c inside the shard instead)."""
    if not isinstance(digest, str):
        return "unknown"
    if digest.startswith(XXH3 + ":"):
        return "xxh3"
    if digest.startswith("crc32c:"):
        return "legacy-crc32c"
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return "sha256"
    return "unknown"


def checksum_matches(data: bytes, digest: str, layout: "Plain | None" = None) -> bool:
    """Whether `data` has the record's checksum. Legacy crc32c records carry no information about
    the data (the residue); for them the shard's own chunk and index crc32c are checked (needs
    the array's plain layout; an array of another pipeline has only its size checked)."""
    rule = checksum_rule(digest)
    if rule == "xxh3":
        return checksum([data]) == digest
    if rule == "sha256":
        return hashlib.sha256(data).hexdigest() == digest
    if rule == "legacy-crc32c":
        return layout is None or internal_crcs_ok(layout, data)
    return False


def internal_crcs_ok(layout: Plain, data: bytes) -> bool:
    """Every chunk's crc32c and the index's crc32c inside one plain-layout shard hold."""
    view = memoryview(data)
    if len(view) < layout.index_bytes:
        return False
    raw = view[len(view) - layout.index_bytes:]
    if _crc(raw[:-4]) != bytes(raw[-4:]):
        return False
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
    for offset, nbytes in index:
        if offset == _EMPTY:
            continue
        offset, nbytes = int(offset), int(nbytes)
        if nbytes < 4 or offset + nbytes > len(view) - layout.index_bytes:
            return False
        if _crc(view[offset:offset + nbytes - 4]) != bytes(view[offset + nbytes - 4:offset + nbytes]):
            return False
    return True
