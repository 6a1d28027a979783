"""Check a store's root attributes before anything uses them, so a hand-edited or damaged
zarr.json (a key missing, format_version "1", ctx_len -3) is one StoreError naming the key,
not a KeyError or TypeError deep inside a reader."""
from __future__ import annotations

from . import layout
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


def check_arrays(group, attrs: dict, path, rows: int | None = None, seqs: int | None = None) -> list[str]:
    """Problems (one line each) between the root attributes and the arrays' own metadata: every
    array the attributes imply exists, with the width `d`, the storage dtype of its encoding, the
    same `encoding` attribute, and at least the rows (`rows`, `seqs`) a reader will use. A hand
    edit of `d` or an encoding then stops a reader before it allocates or decodes anything."""
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
