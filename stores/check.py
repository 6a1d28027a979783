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
        if not isinstance(site, dict) or not _ok(site.get("d"), _INT) or site["d"] < 1 \
                or site.get("encoding") not in layout.ENCODINGS:
            raise StoreError(f"{where}: site {name!r} needs a positive integer d and an encoding in "
                             f"{', '.join(layout.ENCODINGS)}; it has {site!r}")
    grads = attrs.get("grads")
    if grads is not None and (not isinstance(grads, dict) or grads.get("encoding") not in layout.ENCODINGS):
        raise StoreError(f"{where}: root attribute grads = {grads!r} must be null or name an encoding")
