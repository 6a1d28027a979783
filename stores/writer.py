"""Write a store one shuffle window at a time.

A window is `window_seqs` whole sequences; its rows are already permuted by the
caller. Each window covers whole shards of every array, and progress
(`windows_done`) is recorded only after all of a window's arrays are written, so a
writer killed at any moment leaves a store that `--resume` completes exactly.
"""
from __future__ import annotations

import datetime as _dt

import numpy as np
import zarr

from . import fs, layout
from .errors import StoreError


class StoreWriter:
    def __init__(self, path: str, group: zarr.Group):
        self.path = str(path)
        self.group = group
        self.attrs = dict(group.attrs[layout.ROOT_ATTR])
        self.window_seqs = self.attrs["window_seqs"]
        self.ctx_len = self.attrs["ctx_len"]
        self.window_rows = self.window_seqs * self.ctx_len
        self._arrays = {name: group[name] for name in self._array_names()}

    def _array_names(self) -> list[str]:
        names = [layout.TOKENS, layout.ROWS_SEQ, layout.ROWS_POS]
        names += [layout.acts_path(s) for s in self.attrs["sites"]]
        if self.attrs.get("grads"):
            names += [layout.grads_path(s) for s in self.attrs["sites"]]
        return names

    @property
    def windows_done(self) -> int:
        return int(self.attrs["windows_done"])

    @classmethod
    def create(cls, path: str, *, meta: dict, sites: dict[str, dict], grads: dict | None,
               ctx_len: int, n_seqs: int, window_seqs: int, compressor: str | None = None) -> "StoreWriter":
        """Create an empty store sized for `n_seqs` sequences.

        sites: {name: {"d": width, "encoding": "float16"|"bfloat16"|"float32"}}
        grads: None, or {"encoding": ..., "definition": ...} for grads of every site.
        """
        window_rows = window_seqs * ctx_len
        n_rows = n_seqs * ctx_len
        attrs = {
            "format_version": layout.FORMAT_VERSION,
            **meta,
            "ctx_len": ctx_len,
            "window_seqs": window_seqs,
            "shuffle_window_tokens": window_rows,
            "sites": {name: {"d": int(s["d"]), "encoding": s["encoding"]} for name, s in sites.items()},
            "grads": grads,
            "n_rows": n_rows,
            "n_seqs": n_seqs,
            "complete": False,
            "windows_done": 0,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        compressors = None
        if compressor == "zstd":
            compressors = zarr.codecs.ZstdCodec(level=3)
        elif compressor not in (None, "none"):
            raise StoreError(f"unknown compressor {compressor!r}; use none or zstd")
        group = zarr.open_group(store=fs.zarr_store(path), mode="w", zarr_format=3)

        def rows_array(name, dtype, d=None, attributes=None):
            """A [n_rows] or [n_rows, d] array whose chunks and shards both divide the window."""
            width = (d,) if d else ()
            chunk, shard = layout.row_geometry(window_rows, np.dtype(dtype).itemsize * (d or 1))
            group.create_array(name, shape=(n_rows, *width), dtype=dtype, chunks=(chunk, *width),
                               shards=(shard, *width), compressors=compressors, fill_value=0,
                               attributes=attributes, dimension_names=("row", "dim")[:1 + len(width)])

        seq_bytes = 4 * ctx_len
        tok_chunk = max(1, min(window_seqs, -(-layout.CHUNK_MIN_BYTES // seq_bytes)))
        while window_seqs % tok_chunk:
            tok_chunk += 1
        group.create_array(layout.TOKENS, shape=(n_seqs, ctx_len), dtype=np.int32,
                           chunks=(tok_chunk, ctx_len), shards=(window_seqs, ctx_len),
                           compressors=compressors, fill_value=0, dimension_names=("seq", "pos"))
        rows_array(layout.ROWS_SEQ, np.int32)
        rows_array(layout.ROWS_POS, np.int32)
        for name, s in sites.items():
            rows_array(layout.acts_path(name), layout.storage_dtype(s["encoding"]), int(s["d"]),
                       {"encoding": s["encoding"]})
            if grads:
                rows_array(layout.grads_path(name), layout.storage_dtype(grads["encoding"]), int(s["d"]),
                           {"encoding": grads["encoding"]})
        # written last: a store whose root attrs exist has all its arrays
        group.attrs[layout.ROOT_ATTR] = attrs
        return cls(path, group)

    @classmethod
    def open(cls, path: str) -> "StoreWriter":
        try:
            group = fs.open_group(path, mode="r+")
            return cls(path, group)
        except (KeyError, FileNotFoundError) as e:
            raise StoreError(f"{path} is not a sae_store (missing {e})") from None

    def write_window(self, window: int, tokens: np.ndarray, rows_seq: np.ndarray, rows_pos: np.ndarray,
                     acts: dict[str, np.ndarray], grads: dict[str, np.ndarray] | None = None) -> None:
        """Write window `window` (rows already shuffled). Windows must come in order."""
        if window != self.windows_done:
            raise StoreError(f"window {window} written out of order (next is {self.windows_done})")
        s0 = window * self.window_seqs
        r0 = window * self.window_rows
        n = len(rows_seq)
        self._arrays[layout.TOKENS][s0:s0 + len(tokens)] = tokens.astype(np.int32, copy=False)
        self._arrays[layout.ROWS_SEQ][r0:r0 + n] = rows_seq.astype(np.int32, copy=False)
        self._arrays[layout.ROWS_POS][r0:r0 + n] = rows_pos.astype(np.int32, copy=False)
        for site, values in acts.items():
            enc = self.attrs["sites"][site]["encoding"]
            self._arrays[layout.acts_path(site)][r0:r0 + n] = layout.encode(values, enc)
        for site, values in (grads or {}).items():
            enc = self.attrs["grads"]["encoding"]
            self._arrays[layout.grads_path(site)][r0:r0 + n] = layout.encode(values, enc)
        self._set(windows_done=window + 1)

    def _set(self, **updates) -> None:
        self.attrs.update(updates)
        self.group.attrs[layout.ROOT_ATTR] = self.attrs

    def finish(self, n_seqs: int, **extra) -> dict:
        """Shrink to the sequences actually written and mark the store complete."""
        n_rows = n_seqs * self.ctx_len
        if n_seqs != self.attrs["n_seqs"]:
            self._arrays[layout.TOKENS].resize((n_seqs, self.ctx_len))
            for name, arr in self._arrays.items():
                if name != layout.TOKENS:
                    arr.resize((n_rows,) + arr.shape[1:])
        self._set(n_seqs=n_seqs, n_rows=n_rows, complete=True, **extra)
        return self.attrs
