"""Read a store: metadata, random access by row, and the training batch iterator.

Format 2: the rows a reader returns are those of the window records; before the first read of a
shard the reader checks that the shard exists with the size its record gives, so a missing,
empty or truncated shard raises a StoreError naming the array and window instead of reading as
zeros. Flipped bits inside a chunk are caught by the chunks' crc32c codec. Format 1 (no records):
a shard a read touches must exist and not be empty. Every read path of the arrays a Store hands
out goes through these checks (stores/checked.py).
"""
from __future__ import annotations

import json

import numpy as np

from . import fs, layout, shards
from .check import check_arrays, check_root_attrs, foreign_records
from .checked import CheckedArray
from .errors import StoreError
from .urls import redact, scrub, secrets_in
from .writer import complete_prefix, load_final, load_records


class Store:
    """An opened store. Arrays are read lazily; values come back as float32 numpy."""

    def __init__(self, path: str, group, attrs: dict, records: dict[int, dict] | None = None):
        self.path = str(path)
        self.group = group
        self.attrs = attrs
        self.records = records          # None for a format-1 store (no per-window records)
        self._cache: dict[str, object] = {}
        self._checked: set[str] = set()
        self._readers: dict[str, object] = {}
        self._kept_cache = None
        # the store this object opened; None for stores made before creation ids (not re-checked)
        self.creation_id = attrs.get("creation_id")
        self._digests = {key: digest for rec in (records or {}).values()
                         for entries in rec["shards"].values() for key, _, digest in entries}

    def confirm_same_store(self) -> None:
        """Raise StoreError when the store at self.path is no longer the one opened (replaced by
        `--overwrite`, or deleted). Called after every read, so the rows a read returned came from
        the store opened: a swap is a rename (on object storage the old objects go first), and
        this look comes after the read's. Costs one small read of zarr.json per read."""
        if self.creation_id is None:
            return
        raw = fs.read_bytes(self.path, "zarr.json")
        try:
            now = json.loads(raw)["attributes"][layout.ROOT_ATTR]["creation_id"]
        except (TypeError, ValueError, KeyError):
            now = None
        if now != self.creation_id:
            raise StoreError(f"store {scrub(self.path)} was replaced or removed while this reader had it open "
                             f"(creation id {self.creation_id}, now {now}); its rows would mix two stores: "
                             f"open it again")

    def _array(self, name: str):
        if name not in self._cache:
            self._cache[name] = CheckedArray(self, name, self.group[name])
        return self._cache[name]

    def _shard_reader(self, name: str):
        """The direct reader of a format-2 array in the plain layout (stores/shards.py), else None."""
        if name not in self._readers:
            layout_ = shards.plain(name, self.group[name]) if self.records is not None else None
            self._readers[name] = None if layout_ is None else shards.ShardReader(self.path, layout_, self._digests)
        return self._readers[name]

    def _limit(self, name: str) -> int:
        # rows past the records (a partial store, a store not yet shrunk) are not data
        return self.n_seqs if name == layout.TOKENS else self.n_rows

    def read_rows(self, name: str, a: int, b: int, keep: np.ndarray | None = None,
                  out: np.ndarray | None = None, confirm: bool = True) -> np.ndarray:
        """Values as stored of rows [a, b) of array `name`, or of the sorted absolute rows `keep`
        within them, into `out` when given: the training feed's read. confirm=False skips the
        same-store check after a direct read, for a caller whose every use of these values is
        followed by a read that checks (the feed's row filter: each block's values are read, and
        checked, after its rows/pos and rows/seq)."""
        if not 0 <= a <= b <= self._limit(name):
            raise IndexError(f"rows [{a}, {b}) outside [0, {self._limit(name)}) of {name}")
        arr = self._array(name)
        reader = self._shard_reader(name)
        if reader is None:
            values = arr[a:b]
            values = values if keep is None else values[np.asarray(keep) - a]
            if out is None:
                return values
            out[...] = values
            return out
        self._check_rows(name, arr._arr, a, b)
        values = self._guard(name, lambda: reader.read(a, b, out=out, keep=keep))
        if confirm:
            self.confirm_same_store()
        return values

    def _check_rows(self, name: str, arr, first: int, stop: int) -> None:
        self._check_shards(name, arr, range(first, stop))

    def _check_shards(self, name: str, arr, rows) -> None:
        """Raise unless every shard holding `rows` (a range, or an array of row indices) of `name`
        is there, and in a format-2 store as its window record says."""
        shard = (arr.shards or arr.chunks)[0]
        if isinstance(rows, range):
            indices = layout.shard_span(rows[0], rows[-1] - rows[0] + 1, shard) if len(rows) else range(0)
        else:
            indices = np.unique(np.asarray(rows, dtype=np.int64) // shard).tolist()
        for i in indices:
            key = layout.shard_key(name, i, arr.ndim)
            if key not in self._checked:
                self._check_shard(name, key, i * shard)
                self._checked.add(key)

    def _check_shard(self, name: str, key: str, first_row: int) -> None:
        size = fs.size(self.path, key)
        if self.records is None:
            # format 1 lists no shards: a shard of rows the store holds must exist (zarr reads a
            # missing one as zeros); its chunks carry no crc32c, so damage inside is not seen
            if size is None or size == 0:
                self.confirm_same_store()
                raise StoreError(f"store {self.path}: array {name}: shard {key} is "
                                 f"{'missing' if size is None else 'empty'} (a format-1 store: re-harvest "
                                 f"it for window records and checksums)")
            return
        per_window = self.attrs["window_seqs"] * (1 if name == layout.TOKENS else self.attrs["ctx_len"])
        window = first_row // per_window
        record = self.records.get(window)
        expected = None if record is None else {k: n for k, n, _ in record["shards"].get(name, [])}.get(key)
        if expected is None:
            raise StoreError(f"store {self.path}: array {name} window {window}: no record for shard {key}")
        if size != expected:
            self.confirm_same_store()     # replaced rather than damaged: say so
        if size is None:
            raise StoreError(f"store {self.path}: array {name} window {window}: shard {key} is missing")
        if size != expected:
            what = "empty" if size == 0 else f"{size} bytes, its record says {expected}"
            raise StoreError(f"store {self.path}: array {name} window {window}: shard {key} is {what}")

    def _guard(self, name: str, read):
        try:
            return read()
        except (StoreError, IndexError):   # IndexError: zarr refusing a selection (rows are checked before)
            self.confirm_same_store()
            raise
        except Exception as e:     # crc32c mismatch or undecodable shard
            self.confirm_same_store()
            raise StoreError(f"store {self.path}: array {name}: corrupt data "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None

    # metadata
    @property
    def sites(self) -> list[str]:
        return list(self.attrs["sites"])

    @property
    def n_rows(self) -> int:
        return int(self.attrs["n_rows"])

    @property
    def n_seqs(self) -> int:
        return int(self.attrs["n_seqs"])

    @property
    def ctx_len(self) -> int:
        return int(self.attrs["ctx_len"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs["complete"])

    @property
    def split(self):
        """The held-out split (stores/split.py): recorded by the harvest, or derived for an older store."""
        from .split import store_split
        return store_split(self.attrs, self.path)

    @property
    def kept_cache(self):
        """The rows each training/evaluation feed keeps per block, remembered for this open
        (stores.batches.KeptCache): later epochs skip the rows/pos and rows/seq reads."""
        if self._kept_cache is None:
            from .batches import KeptCache
            self._kept_cache = KeptCache()
        return self._kept_cache

    @property
    def has_grads(self) -> bool:
        return bool(self.attrs.get("grads"))

    def width(self, site: str) -> int:
        return int(self.attrs["sites"][self._site(site)]["d"])

    @property
    def tokens(self):
        """int32 [n_seqs, ctx_len] (a zarr array: slice it to get numpy)."""
        return self._array(layout.TOKENS)

    @property
    def rows_seq(self):
        return self._array(layout.ROWS_SEQ)

    @property
    def rows_pos(self):
        return self._array(layout.ROWS_POS)

    @property
    def block_rows(self) -> int:
        """Rows per contiguous read unit: the largest chunk of the row arrays."""
        chunks = [self._array(layout.acts_path(s)).chunks[0] for s in self.sites]
        return int(max(chunks))

    def _site(self, site: str) -> str:
        if site not in self.attrs["sites"]:
            raise StoreError(f"site {site!r} is not in store {self.path}; it has: {', '.join(self.sites)}")
        return site

    def _read(self, name: str, encoding: str, rows, decode: bool = True) -> np.ndarray:
        arr = self._array(name)
        if isinstance(rows, slice):
            a, b, step = rows.indices(min(arr.shape[0], self._limit(name)))
            values = self.read_rows(name, a, max(a, b)) if step == 1 else arr[rows]
            return layout.decode(values, encoding) if decode else values
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError("rows must be a slice or a 1-d index array")
        # zarr reads sorted unique indices chunk by chunk; restore the caller's order after
        uniq, inverse = np.unique(rows, return_inverse=True)
        if len(uniq) and (uniq[0] < 0 or uniq[-1] >= self.n_rows):
            raise IndexError(f"row index out of range [0, {self.n_rows})")
        values = arr.get_orthogonal_selection((uniq, slice(None)))
        return (layout.decode(values, encoding) if decode else values)[inverse]

    def encoding(self, site: str, grads: bool = False) -> str:
        """How the values are stored: float16, float32 or bfloat16 (as uint16 bits)."""
        return self.attrs["grads"]["encoding"] if grads else self.attrs["sites"][self._site(site)]["encoding"]

    def acts(self, site: str, rows, decode: bool = True) -> np.ndarray:
        """float32 values, or as stored with decode=False (see encoding())."""
        site = self._site(site)
        return self._read(layout.acts_path(site), self.encoding(site), rows, decode)

    def grads(self, site: str, rows, decode: bool = True) -> np.ndarray:
        site = self._site(site)
        if not self.has_grads:
            raise StoreError(f"store {self.path} has no gradients (harvest with --grads)")
        return self._read(layout.grads_path(site), self.encoding(site, grads=True), rows, decode)

    def batches(self, sites, batch_size: int, **kwargs):
        """A BlockBatches: an iterable of batches (`for batch in store.batches(...)`; `next()` needs
        `iter()` first), see stores.batches.BlockBatches and docs/python-api.md."""
        from .batches import BlockBatches
        return BlockBatches(self, sites, batch_size, **kwargs)

    def __repr__(self) -> str:
        return (f"Store({self.path!r}, n_rows={self.n_rows}, n_seqs={self.n_seqs}, ctx_len={self.ctx_len}, "
                f"sites={self.sites}, grads={self.has_grads}, complete={self.complete})")


def read_root(path: str) -> tuple[object, dict]:
    """(zarr group, root attributes) of the store at path; StoreError when there is none or its
    metadata cannot be read."""
    if not fs.exists(path):
        raise StoreError(f"no store at {path}")
    try:
        group = fs.open_group(path, mode="r")
        attrs = group.attrs[layout.ROOT_ATTR]
    except KeyError:
        raise StoreError(f"{path} is a zarr group but not a sae_store (no attrs['{layout.ROOT_ATTR}'])") from None
    except Exception as e:  # corrupt metadata, or a library refusing the URL
        # a library may quote the URL's netloc without its scheme, where scrub_text cannot see it
        why = redact(str(e).splitlines()[0][:200], secrets_in(path)) if str(e) else type(e).__name__
        raise StoreError(f"cannot open store {path}: {why}") from None
    if not isinstance(attrs, dict):
        raise StoreError(f"{path}: attrs['{layout.ROOT_ATTR}'] is a {type(attrs).__name__}, not an object")
    return group, dict(attrs)


def open_store(path: str, allow_partial: bool = False) -> Store:
    """Open a store at a local path or fsspec URL.

    An incomplete store (a harvest still running or killed) is refused unless
    allow_partial=True; then only the leading windows that have records are exposed.
    """
    path = str(path)
    group, attrs = read_root(path)
    check_root_attrs(attrs, path)   # every key below is there, of the right type, in a readable format
    if attrs["format_version"] >= 2:
        return _open_v2(path, group, attrs, allow_partial)
    if not attrs.get("complete"):
        if not allow_partial:
            raise StoreError(f"store {path} is incomplete (harvest still running or interrupted; "
                             f"finish it with `harvest run --resume`)")
        # expose only the rows that are known to be written
        rows = attrs["windows_done"] * attrs["window_seqs"] * attrs["ctx_len"]
        attrs = {**attrs, "n_rows": min(rows, attrs["n_rows"]),
                 "n_seqs": min(attrs["windows_done"] * attrs["window_seqs"], attrs["n_seqs"])}
    _refuse_problems(path, check_arrays(group, attrs, path, rows=attrs["n_rows"], seqs=attrs["n_seqs"]))
    return Store(path, group, attrs)


def _refuse_problems(path: str, problems: list[str]) -> None:
    if problems:
        raise StoreError(f"store {path} is damaged: {problems[0]}" + (f" (and {len(problems) - 1} more; "
                         f"`harvest verify` lists them)" if len(problems) > 1 else ""))


def _open_v2(path: str, group, attrs: dict, allow_partial: bool) -> Store:
    records = load_records(path)
    final = load_final(path)
    if final is not None:
        missing = [w for w in range(final["windows"]) if w not in records]
        if missing:
            raise StoreError(f"store {path} is damaged: window record(s) {missing[:5]} missing "
                             f"(run `harvest verify {path}`)")
        n_seqs = int(final["seqs"])
    else:
        if not allow_partial:
            raise StoreError(f"store {path} is incomplete (harvest still running or interrupted; "
                             f"finish it with `harvest run --resume`)")
        _, n_seqs, _ = complete_prefix(records, attrs["window_seqs"], attrs["n_seqs"])
    _refuse_problems(path, foreign_records(records, attrs, strict=False)
                     + check_arrays(group, attrs, path, rows=n_seqs * attrs["ctx_len"], seqs=n_seqs))
    attrs = {**attrs, "n_seqs": n_seqs, "n_rows": n_seqs * attrs["ctx_len"], "complete": final is not None}
    return Store(path, group, attrs, records)
