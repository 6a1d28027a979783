"""The arrays a Store hands out (`store.tokens`, `store.rows_seq`, `store.rows_pos`): zarr arrays
whose every read first checks the shards it touches (stores/reader.py, Store._check_shards).

zarr reads a missing shard, or one a partial store has not written yet, as zeros. So no read path
of the zarr array is passed through unchecked: `[]`, `.oindex[]`, `.vindex[]`,
`get_basic_selection`, `get_orthogonal_selection`, `get_coordinate_selection`,
`get_mask_selection` and `numpy.asarray()` normalise the row part of the selection (negative
indices count from the end of the rows the store holds; anything past them is an IndexError),
check the shards of exactly those rows, then read. Every other zarr attribute that reads or writes
(`.blocks`, `get_block_selection`, `set_*`, `resize`, `store`, ...) raises AttributeError naming
the checked ways; metadata (`dtype`, `chunks`, `shards`, `attrs`, ...) is passed through. The
array's `shape` and `len()` are the rows the store holds (an incomplete store opened with
allow_partial=True: its recorded rows, not the planned size).
"""
from __future__ import annotations

import numpy as np

# zarr attributes that only describe the array (no data is read through them)
_METADATA = {"attrs", "basename", "chunks", "compressor", "compressors", "dtype", "fill_value", "filters",
             "metadata", "name", "ndim", "order", "path", "read_only", "serializer", "shards"}
_CHECKED_WAYS = ("[...], .oindex[...], .vindex[...], get_basic_selection, get_orthogonal_selection, "
                 "get_coordinate_selection, get_mask_selection or numpy.asarray()")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_array(x) -> bool:
    return isinstance(x, (list, np.ndarray)) and not (isinstance(x, np.ndarray) and x.ndim == 0)


def _is_int_array(x) -> bool:
    return _is_array(x) and (np.asarray(x).dtype.kind in "iu" or np.asarray(x).size == 0)


def _is_bool_array(x) -> bool:
    return _is_array(x) and np.asarray(x).dtype == bool


def _parts(sel, ndim: int) -> tuple:
    """The selection as a tuple with one entry per leading axis (an Ellipsis expanded)."""
    parts = sel if isinstance(sel, tuple) else (sel,)
    for i, p in enumerate(parts):
        if p is Ellipsis:
            return parts[:i] + (slice(None),) * max(ndim - len(parts) + 1, 0) + parts[i + 1:]
    return parts or (slice(None),)


class CheckedArray:
    """A store's zarr array; reads check their shards first (module docstring)."""

    def __init__(self, store, name: str, arr):
        self._store, self._name, self._arr = store, name, arr

    # ---- what the array is -----------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return (self._rows, *self._arr.shape[1:])

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def _rows(self) -> int:
        return min(self._arr.shape[0], self._store._limit(self._name))

    def __len__(self) -> int:
        return self._rows

    def __getattr__(self, attr):
        if attr.startswith("_"):     # numpy's and copy's probes; also no recursion before __init__ ran
            raise AttributeError(attr)
        if attr in _METADATA:
            return getattr(self._arr, attr)
        raise AttributeError(f"store array {self._name} has no {attr!r} here: that zarr path would read "
                             f"(or change) shards without checking them against the store's records, and "
                             f"a missing shard would read as zeros; read with {_CHECKED_WAYS}")

    def __repr__(self) -> str:
        return f"<store array {self._name} shape={self.shape} dtype={self._arr.dtype}>"

    # ---- reads -------------------------------------------------------------------------------
    def _ints(self, idx) -> np.ndarray:
        """Integer row indices, negative ones counted from the end of the rows held, all in range."""
        idx = np.asarray(idx).astype(np.int64)    # an empty list is float64 to numpy
        idx = np.where(idx < 0, idx + self._rows, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self._rows):
            raise IndexError(f"row index out of range [0, {self._rows}) of store array {self._name}")
        return idx

    def _axis0(self, first, orthogonal: bool):
        """(the row part of a selection, normalised for zarr; the rows it reads)."""
        if isinstance(first, slice):
            rows = range(*first.indices(self._rows))
            if rows.step < 1:
                raise IndexError(f"store array {self._name}: a slice needs a positive step")
            return slice(rows.start, max(rows.start, rows.stop), rows.step), rows
        if _is_int(first) or isinstance(first, np.ndarray) and first.ndim == 0 and first.dtype.kind in "iu":
            i = int(self._ints(int(first)))
            return i, range(i, i + 1)
        if orthogonal and _is_bool_array(first):
            mask = np.asarray(first)
            if mask.shape != (self._rows,):
                raise IndexError(f"a boolean index of shape {mask.shape} for the {self._rows} rows of store "
                                 f"array {self._name}")
            rows = np.flatnonzero(mask)     # the rows the mask selects, not the span of its length
            return rows, rows
        if orthogonal and _is_int_array(first):
            rows = self._ints(first)
            return rows, rows
        raise IndexError(f"store array {self._name}: unsupported row index {type(first).__name__}")

    def _read(self, read, rows):
        store = self._store
        store._check_shards(self._name, self._arr, rows)
        values = store._guard(self._name, read)
        store.confirm_same_store()
        return values

    def _orthogonal(self, sel, method: str, **kw):
        parts = _parts(sel, self.ndim)
        first, rows = self._axis0(parts[0], orthogonal=method != "get_basic_selection")
        sel = (first, *parts[1:])
        return self._read(lambda: getattr(self._arr, method)(sel, **kw), rows)

    def get_basic_selection(self, selection=Ellipsis, **kw):
        return self._orthogonal(selection, "get_basic_selection", **kw)

    def get_orthogonal_selection(self, selection, **kw):
        return self._orthogonal(selection, "get_orthogonal_selection", **kw)

    def get_coordinate_selection(self, selection, **kw):
        parts = selection if isinstance(selection, tuple) else (selection,)
        if not parts or not all(_is_int(p) or _is_int_array(p) for p in parts):
            raise IndexError(f"store array {self._name}: a coordinate selection takes integer arrays")
        rows = self._ints(parts[0])
        sel = (rows, *parts[1:])
        return self._read(lambda: self._arr.get_coordinate_selection(sel, **kw), np.unique(rows))

    def get_mask_selection(self, mask, **kw):
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != self.shape:
            raise IndexError(f"a mask selection of store array {self._name} is a boolean array of its shape "
                             f"{self.shape}, not {mask.dtype} {mask.shape}")
        rows = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
        # zarr wants a mask of the array's own shape (an incomplete store's is larger)
        full = np.zeros(self._arr.shape, dtype=bool)
        full[:len(mask)] = mask
        return self._read(lambda: self._arr.get_mask_selection(full, **kw), rows)

    def _vindex(self, selection):
        if _is_bool_array(selection) and np.ndim(selection) == self.ndim:
            return self.get_mask_selection(selection)
        return self.get_coordinate_selection(selection)

    def __getitem__(self, selection):
        # routed as zarr's own __getitem__ routes it: fancy (vindex), orthogonal or basic
        parts = selection if isinstance(selection, tuple) else (selection,)
        if len(parts) == 1 and _is_bool_array(parts[0]) and np.ndim(parts[0]) == self.ndim:
            return self.get_mask_selection(parts[0])
        if parts and len(parts) == self.ndim and all(_is_int_array(p) for p in parts):
            return self.get_coordinate_selection(selection)
        if any(_is_array(p) for p in parts):
            return self.get_orthogonal_selection(selection)
        first = _parts(selection, self.ndim)[0]
        reader = self._store._shard_reader(self._name)
        if isinstance(first, slice) and not isinstance(selection, tuple) and reader is not None:
            rows = range(*first.indices(self._rows))
            if rows.step == 1:     # the direct shard reader: checked as well (Store.read_rows)
                return self._store.read_rows(self._name, rows.start, max(rows.start, rows.stop))
        return self.get_basic_selection(selection)

    def __array__(self, dtype=None, copy=None):
        values = self[...]
        return values if dtype is None else values.astype(dtype)

    @property
    def oindex(self):
        return _Indexer(self.get_orthogonal_selection)

    @property
    def vindex(self):
        return _Indexer(self._vindex)


class _Indexer:
    """`array.oindex[...]` / `array.vindex[...]`: a checked selection method behind []."""

    def __init__(self, read):
        self._read = read

    def __getitem__(self, selection):
        return self._read(selection)
