"""Read a store: metadata, random access by row, and the training batch iterator."""
from __future__ import annotations

import numpy as np

from . import fs, layout
from .errors import StoreError


class Store:
    """An opened store. Arrays are read lazily; values come back as float32 numpy."""

    def __init__(self, path: str, group, attrs: dict):
        self.path = str(path)
        self.group = group
        self.attrs = attrs
        self._cache: dict[str, object] = {}

    def _array(self, name: str):
        if name not in self._cache:
            self._cache[name] = self.group[name]
        return self._cache[name]

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
            return layout.decode(arr[rows], encoding) if decode else arr[rows]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError("rows must be a slice or a 1-d index array")
        # zarr reads sorted unique indices chunk by chunk; restore the caller's order after
        uniq, inverse = np.unique(rows, return_inverse=True)
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
        """A BlockBatches iterator; see stores.batches.BlockBatches."""
        from .batches import BlockBatches
        return BlockBatches(self, sites, batch_size, **kwargs)

    def __repr__(self) -> str:
        return (f"Store({self.path!r}, n_rows={self.n_rows}, n_seqs={self.n_seqs}, ctx_len={self.ctx_len}, "
                f"sites={self.sites}, grads={self.has_grads}, complete={self.complete})")


def open_store(path: str, allow_partial: bool = False) -> Store:
    """Open a store at a local path or fsspec URL.

    A store whose `complete` flag is false (a harvest still running or killed) is
    refused unless allow_partial=True; then only `windows_done` windows are valid.
    """
    path = str(path)
    if not fs.exists(path):
        raise StoreError(f"no store at {path}")
    try:
        group = fs.open_group(path, mode="r")
        attrs = dict(group.attrs[layout.ROOT_ATTR])
    except KeyError:
        raise StoreError(f"{path} is a zarr group but not a sae_store (no attrs['{layout.ROOT_ATTR}'])") from None
    except Exception as e:  # corrupt metadata
        raise StoreError(f"cannot open store {path}: {e}") from None
    if attrs.get("format_version", 0) > layout.FORMAT_VERSION:
        raise StoreError(f"store {path} has format {attrs['format_version']}; this tool reads up to "
                         f"{layout.FORMAT_VERSION}: upgrade")
    if not attrs.get("complete"):
        if not allow_partial:
            raise StoreError(f"store {path} is incomplete (harvest still running or interrupted; "
                             f"finish it with `harvest run --resume`)")
        # expose only the rows that are known to be written
        rows = attrs["windows_done"] * attrs["window_seqs"] * attrs["ctx_len"]
        attrs = {**attrs, "n_rows": min(rows, attrs["n_rows"]),
                 "n_seqs": min(attrs["windows_done"] * attrs["window_seqs"], attrs["n_seqs"])}
    return Store(path, group, attrs)
