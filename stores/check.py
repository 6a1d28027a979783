"""Check a store's metadata before anything uses it, so a hand-edited or damaged zarr.json (a key
missing, format_version "1", ctx_len -3, an array's codecs changed) is one StoreError or verify
line naming it, not a KeyError deep inside a reader or values decoded wrongly; and tell window
records written for another store (creation_id) from the store's own."""
from __future__ import annotations

import json

from . import chunk_codecs, layout, shards
from .errors import StoreError
from .urls import scrub

# key: (allowed types, what the value must satisfy, how to say it)
_INT = (int,)
_REQUIRED = {
    "format_version": (_INT, lambda v: v >= 1, "a positive integer"),
    "ctx_len": (_INT, lambda v: v >= 1, "a positive integer"),
    "window_seqs": (_INT, lambda v: v >= 1, "a positive integer"),
    "n_rows": (_INT, lambda v: v >= 0, "a non-negative integer"),
    "n_seqs": (_INT, lambda v: v >= 0, "a non-negative integer"),
    "complete": ((bool,), lambda v: True, "true or false"),
    "sites": ((dict,), lambda v: len(v) > 0, "a non-empty object"),
}


def _ok(value, types) -> bool:
    if isinstance(value, bool) and bool not in types:   # True is an int to Python, not to a reader
        return False
    return isinstance(value, types)


_V1_ONLY = {"windows_done": (_INT, lambda v: v >= 0, "a non-negative integer")}   # v2 keeps per-window records


def check_root_attrs(attrs, path) -> None:
    """Raise StoreError unless attrs is of a format this tool reads and has every key a reader or a
    resumed writer relies on, each of the right type and range."""
    where = f"store {scrub(path)}"
    if not isinstance(attrs, dict):
        raise StoreError(f"{where}: attrs['{layout.ROOT_ATTR}'] is a {type(attrs).__name__}, not an object")
    version = attrs.get("format_version")
    if "format_version" in attrs and (type(version) is not int or version < 1):
        raise StoreError(f"{where}: root attribute format_version = {version!r} must be a positive integer")
    if version is not None and version not in layout.READABLE_VERSIONS:
        raise StoreError(f"{where} has format {version!r}; this tool reads formats "
                         f"{', '.join(map(str, layout.READABLE_VERSIONS))}")
    required = {**_REQUIRED, **(_V1_ONLY if version == 1 else {})}   # a missing version: said below
    for key, (types, valid, what) in required.items():
        if key not in attrs:
            raise StoreError(f"{where}: root attributes lack {key!r} (damaged or hand-edited zarr.json)")
        value = attrs[key]
        if not _ok(value, types) or not valid(value):
            raise StoreError(f"{where}: root attribute {key} = {value!r} must be {what}")
    for name, site in attrs["sites"].items():
        if not isinstance(site, dict) or not _ok(site.get("d"), _INT) or not 1 <= site["d"] < 2**31 \
                or site.get("encoding") not in layout.ENCODINGS:
            raise StoreError(f"{where}: site {name!r} needs a positive integer d below 2^31 and an encoding in "
                             f"{', '.join(layout.ENCODINGS)}; it has {site!r}")
    grads = attrs.get("grads")
    if grads is not None and (not isinstance(grads, dict) or grads.get("encoding") not in layout.ENCODINGS):
        raise StoreError(f"{where}: root attribute grads = {grads!r} must be null or name an encoding")


_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_CRC = {"name": "crc32c"}


def _layout_problem(name: str, arr, attrs: dict) -> str | None:
    """How the array's codecs and chunk layout differ from those this tool's writer gives it, or
    None. zarr decodes whatever the metadata says: an `"endian": "big"` edited into a zarr.json
    reads every value byte-swapped with every crc32c intact, and a changed chunk shape reads
    other bytes as rows. Format 2: the plain layout (stores/shards.py); format 1 wrote the same
    without crc32c on the chunks (its chunks may carry one: stores made by format 2 and relabelled)."""
    try:
        meta = json.loads(json.dumps(arr.metadata.to_dict(), default=str))   # tuples -> lists
        codecs = meta.get("codecs") or []
        conf = (codecs[0].get("configuration") or {}) if len(codecs) == 1 else {}
        inner = list(conf.get("codecs") or [])
        shape, shard = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        chunk = conf.get("chunk_shape")
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return "unreadable codec or chunk metadata"
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return f"codecs {[c.get('name') for c in codecs]}, where this tool writes one sharding_indexed codec"
    if meta.get("storage_transformers") or meta.get("chunk_key_encoding") != \
            {"name": "default", "configuration": {"separator": "/"}} or meta["chunk_grid"].get("name") != "regular":
        return "chunk keys, grid or storage transformers differ from what this tool writes"
    if not inner or inner[0] != _BYTES:
        return f"chunk codecs start with {inner[:1]}, where this tool writes bytes, little-endian"
    crc = inner[-1] == _CRC
    compressors = inner[1:-1] if crc else inner[1:]
    if attrs["format_version"] >= 2 and not crc:
        return "chunks carry no crc32c codec, which this tool writes last"
    if len(compressors) > 1 or compressors and not chunk_codecs.readable(compressors[0]):
        return f"chunk codecs {[c.get('name') for c in inner]} are not ones this tool writes"
    if conf.get("index_codecs") != [_BYTES, _CRC] or conf.get("index_location", "end") != "end":
        return "the shard index is not stored as this tool writes it (bytes little-endian, crc32c, at the end)"
    window = attrs["window_seqs"] * (1 if name == layout.TOKENS else attrs["ctx_len"])
    if not chunk or shard[1:] != shape[1:] or chunk[1:] != shape[1:] or shard[0] % chunk[0] or window % shard[0]:
        return (f"chunks {chunk} in shards {shard}: this tool cuts only rows, chunks dividing shards "
                f"dividing the window's {window} rows")
    if attrs["format_version"] >= 2 and shards.plain(name, arr) is None:    # what the direct reader needs
        return "codecs or chunk layout differ from what this tool writes"
    return None


def check_arrays(group, attrs: dict, path, rows: int | None = None, seqs: int | None = None) -> list[str]:
    """Problems (one line each) between the root attributes and the arrays' own metadata: every
    array the attributes imply exists, with the codecs and chunk layout this tool writes, the width
    `d`, the storage dtype of its encoding, the same `encoding` attribute, and at least the rows
    (`rows`, `seqs`) a reader will use. A hand edit of `d`, an encoding or a codec then stops a
    reader before it allocates or decodes anything."""
    import numpy as np

    expect = {layout.TOKENS: ((attrs["ctx_len"],), np.int32, None),
              layout.ROWS_SEQ: ((), np.int32, None), layout.ROWS_POS: ((), np.int32, None)}
    grads = attrs.get("grads")
    for site, meta in attrs["sites"].items():
        expect[layout.acts_path(site)] = ((meta["d"],), layout.storage_dtype(meta["encoding"]), meta["encoding"])
        if grads:
            expect[layout.grads_path(site)] = ((meta["d"],), layout.storage_dtype(grads["encoding"]),
                                               grads["encoding"])
    problems = []
    for name, (width, dtype, encoding) in expect.items():
        try:
            arr = group[name]
            shape, stored, arr_encoding = tuple(arr.shape), np.dtype(arr.dtype), arr.attrs.get("encoding")
        except KeyError:
            problems.append(f"array {name}: missing (no zarr.json)")
            continue
        except Exception as e:     # unreadable array metadata
            problems.append(f"array {name}: unreadable metadata ({type(e).__name__})")
            continue
        layout_problem = _layout_problem(name, arr, attrs)
        if layout_problem:
            problems.append(f"array {name}: {layout_problem}")
        if shape[1:] != tuple(width):
            problems.append(f"array {name}: shape {list(shape)}, the root attributes say rows of {list(width)}")
        if stored != np.dtype(dtype):
            problems.append(f"array {name}: stored as {stored}, the root attributes' encoding needs {np.dtype(dtype)}")
        if encoding is not None and arr_encoding != encoding:
            problems.append(f"array {name}: encoding attribute {arr_encoding!r}, the root attributes say {encoding!r}")
        need = seqs if name == layout.TOKENS else rows
        if need is not None and shape and shape[0] < need:
            problems.append(f"array {name}: {shape[0]} rows, the records hold {need}")
    return problems


def foreign_records(records: dict[int, dict], attrs: dict, strict: bool = True) -> list[str]:
    """One line per window record written for another store: its creation_id (records carry their
    store's since this version) is not the root's. Such a window, shards and record, was copied in
    from another store: a sibling harvest with another seed passes every checksum. Records or a
    root without one (older stores) are not judged here: see unbound_windows.

    strict=False (readers, a resumed writer) passes a store whose records all name one store that
    is not the root's: the root's id was rewritten (a relabelled copy), not a window copied in;
    `harvest verify` (strict) still reports every window of it."""
    mine = attrs.get("creation_id")
    named = {w: r["creation_id"] for w, r in records.items() if r.get("creation_id") is not None}
    relabelled = mine not in named.values() and len(named) == len(records) and len(set(named.values())) == 1
    if mine is None or relabelled and not strict:
        return []
    why = "copied in from another store" if mine in named.values() else \
        "no window names this store (its creation_id rewritten, or every window from another store)"
    return [f"window {w}: its record was written for store {named[w]!r}, not this one ({mine!r}): {why}"
            for w in sorted(named) if named[w] != mine]


def unbound_windows(records: dict[int, dict], attrs: dict) -> list[int]:
    """Windows whose record, or whose store, names no creation_id (written before records carried
    it): a window copied in from another store cannot be told from the store's own there."""
    return [w for w in sorted(records) if attrs.get("creation_id") is None or records[w].get("creation_id") is None]
