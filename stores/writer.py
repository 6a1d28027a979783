"""Write a format-2 store one shuffle window at a time, from one process or many.

A window is `window_seqs` whole sequences whose rows the caller already permuted; it covers
whole shards of every array, so the process writing a window is the only one touching those
shards. After a window's arrays are written, its *record* (`windows/<w>.json`: the checksum and
size of every shard it wrote, its row and sequence counts, the data-stream position after it) is
written atomically. There is no counter shared between writers: a window is done when its record
exists, and the store is complete when `final.json` exists (written by `finish`, after the arrays
are sized to the windows recorded). Killed at any moment, a store is completed by rewriting the
windows that have no record.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zarr

from . import chunk_codecs, fs, layout, shards
from .check import foreign_records
from .errors import StoreError
from .urls import scrub

_INTS = ("window", "seqs", "rows", "first_seq", "first_row")


@dataclass(frozen=True, eq=False)   # arrays: identity, not an elementwise ==
class WindowJob:
    """One window's rows as a writer takes them (`StoreWriter.write_job`): what a harvester hands
    its writer thread, in numpy arrays only, so the store never learns where the rows came from."""
    window: int
    tokens: np.ndarray                      # int [seqs, ctx_len]
    rows_seq: np.ndarray                    # int [rows]: each row's sequence, in harvest order
    rows_pos: np.ndarray                    # int [rows]: each row's position in its sequence
    acts: dict[str, np.ndarray]             # site -> [rows, d], as stored (bfloat16 as its uint16 bits)
    grads: dict[str, np.ndarray] | None = None
    position: dict | None = None            # the data-stream position after the window (for --resume)
    order: np.ndarray | None = None         # stored row i is row order[i] (the shuffle); None: as given


def _is_count(v) -> bool:
    return type(v) is int and v >= 0


def _check_record(path: str, key: str, record) -> dict:
    """A window record as a reader may use it, or a StoreError naming what is wrong. Records are
    written atomically, so a malformed one is damage (or a hand edit), never a torn write."""
    where = f"store {scrub(path)}: window record {key}"
    if not isinstance(record, dict):
        raise StoreError(f"{where} is not a JSON object")
    for name in _INTS:
        if not _is_count(record.get(name)):
            raise StoreError(f"{where}: {name} = {record.get(name)!r} must be a non-negative integer")
    if key != layout.window_key(record["window"]):
        raise StoreError(f"{where} names window {record['window']}")
    shard_lists = record.get("shards")
    if not isinstance(shard_lists, dict):
        raise StoreError(f"{where}: shards must be an object")
    for name, entries in shard_lists.items():
        if not isinstance(entries, list) or not all(
                isinstance(e, list) and len(e) == 3 and fs.confined_key(e[0]) and e[0].startswith(name + "/c/")
                and _is_count(e[1]) and isinstance(e[2], str) for e in entries):
            raise StoreError(f"{where}: the shard list of {name!r} must hold [key inside {name}/c/, bytes, "
                             f"checksum] entries")
    return record


def load_records(path: str) -> dict[int, dict]:
    """{window: record} for every window record in the store; StoreError for a malformed one."""
    out = {}
    for key in fs.list_keys(path, layout.WINDOWS_PREFIX):
        if not key.endswith(".json") or ".tmp-" in key:
            continue
        raw = fs.read_bytes(path, key)
        try:
            record = json.loads(raw)
        except (TypeError, ValueError):
            raise StoreError(f"store {scrub(path)}: window record {key} is not valid JSON (damaged or "
                             f"hand-edited; `harvest verify` lists every problem)") from None
        record = _check_record(path, key, record)
        out[record["window"]] = record
    return out


def load_final(path: str) -> dict | None:
    """final.json ({windows, seqs, rows}), None when absent, StoreError when malformed."""
    raw = fs.read_bytes(path, layout.FINAL_KEY)
    if raw is None:
        return None
    try:
        final = json.loads(raw)
    except (TypeError, ValueError):
        final = None
    if not isinstance(final, dict) or not all(_is_count(final.get(k)) for k in ("windows", "seqs", "rows")):
        raise StoreError(f"store {scrub(path)}: {layout.FINAL_KEY} is damaged (truncated, empty or lacking "
                         f"integer windows, seqs and rows); the store is left as it is")
    return final


def complete_prefix(records: dict[int, dict], window_seqs: int, n_seqs: int) -> tuple[int, int, bool]:
    """(windows, seqs, ended) of the leading run of recorded windows, stopping after the first
    short one (a stream that ran out): the rows a reader may use and `finish` keeps. `ended` is
    true when nothing is missing before the end (planned or short window)."""
    n_windows = -(-n_seqs // window_seqs)
    seqs = 0
    for w in range(n_windows):
        rec = records.get(w)
        if rec is None:
            return w, seqs, False
        seqs += int(rec["seqs"])
        if int(rec["seqs"]) < min(window_seqs, n_seqs - w * window_seqs):
            return w + 1, seqs, True
    return n_windows, seqs, True


class StoreWriter:
    """Writes windows of a store; `rank`/`world` say which windows this process owns
    (window w belongs to rank w % world), so several processes fill one store together."""

    def __init__(self, path: str, group: zarr.Group, *, rank: int = 0, world: int = 1, lease=None):
        self.path = str(path)
        self.group = group
        self.attrs = dict(group.attrs[layout.ROOT_ATTR])
        self.window_seqs = self.attrs["window_seqs"]
        self.ctx_len = self.attrs["ctx_len"]
        self.window_rows = self.window_seqs * self.ctx_len
        self.rank, self.world = rank, world
        self.lease = lease
        # every chunk is written, all-zero ones included (zarr skips chunks equal to the fill value by
        # default): a window's record lists every one of its shards, and a missing shard is damage
        self._arrays = {}
        for name in self.array_names(self.attrs):
            try:
                self._arrays[name] = group[name].with_config({"write_empty_chunks": True})
            except KeyError:
                raise StoreError(f"store {scrub(path)}: array {name} is missing (no zarr.json); the store "
                                 f"is damaged and left as it is") from None
        self._plain = {name: shards.plain(name, arr) for name, arr in self._arrays.items()}
        self._executor = None
        self.records = load_records(self.path)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            # half the cores at most: on a CPU-only harvest the other half computes the model
            workers = min(8, max(1, (os.cpu_count() or 2) // 2))
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="shard-writer")
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def _step(self, name: str) -> int:
        """Rows per write job: one shard of the plain layout, the whole window through zarr."""
        plain = self._plain[name]
        return plain.shard_rows if plain is not None else self.window_rows

    def _write_array(self, name: str, first: int, values: np.ndarray, rows: slice | np.ndarray) -> list[list]:
        """[[key, bytes, checksum], ...] of the shards holding values[rows] (a view for a slice, a
        gather, on this writing thread, for indices) from row `first` on."""
        values = values[rows]
        plain = self._plain[name]
        if plain is not None:
            return shards.write_shards(self.path, plain, first, values)
        # a codec pipeline the direct writer does not handle: zarr writes it, and the checksums are of
        # the bytes read back
        arr = self._arrays[name]
        arr[first:first + len(values)] = values
        out = []
        for i in layout.shard_span(first, len(values), arr.shards[0]):
            key = layout.shard_key(name, i, arr.ndim)
            data = fs.read_bytes(self.path, key)
            if not data:
                raise StoreError(f"store {self.path}: shard {key} did not reach storage")
            out.append([key, len(data), shards.checksum([data])])
        return out

    @staticmethod
    def array_names(attrs: dict) -> list[str]:
        names = [layout.TOKENS, layout.ROWS_SEQ, layout.ROWS_POS]
        names += [layout.acts_path(s) for s in attrs["sites"]]
        if attrs.get("grads"):
            names += [layout.grads_path(s) for s in attrs["sites"]]
        return names

    @property
    def n_windows(self) -> int:
        return -(-self.attrs["n_seqs"] // self.window_seqs)

    @property
    def complete(self) -> bool:
        return load_final(self.path) is not None

    @classmethod
    def create(cls, path: str, *, meta: dict, sites: dict[str, dict], grads: dict | None,
               ctx_len: int, n_seqs: int, window_seqs: int, compressor: str | None = None,
               lease=None, creation_id: str | None = None) -> "StoreWriter":
        """Create an empty store sized for `n_seqs` sequences, at a location that is empty or holds
        only this writer's lease (taken first, stores/lease.py). Nothing is ever cleared here.

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
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            # which store this is: a reader re-checks it, so a store replaced underneath it fails
            # that reader instead of mixing two stores (stores/reader.py)
            "creation_id": creation_id or uuid.uuid4().hex,
        }
        # crc32c on every chunk (and every shard index): any Zarr v3 reader detects a flipped bit
        try:
            codecs = chunk_codecs.zarr_codecs(compressor)
        except ValueError as e:
            raise StoreError(str(e)) from None
        others = [k for k in fs.list_keys(path, "") if k != layout.LEASE_KEY] if fs.anything_at(path) else []
        if others:
            raise StoreError(f"cannot create a store at {scrub(path)}: it already holds {others[0]}"
                             f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}; nothing was changed")
        # mode "a": create, never clear (mode "w" empties the location first)
        group = zarr.open_group(store=fs.zarr_store(path), mode="a", zarr_format=3)

        def rows_array(name, dtype, d=None, attributes=None, chunk_rows=None):
            """A [n_rows] or [n_rows, d] array whose chunks and shards both divide the window."""
            width = (d,) if d else ()
            chunk, shard = layout.row_geometry(window_rows, np.dtype(dtype).itemsize * (d or 1), chunk_rows)
            group.create_array(name, shape=(n_rows, *width), dtype=dtype, chunks=(chunk, *width),
                               shards=(shard, *width), compressors=codecs, fill_value=0,
                               attributes=attributes, dimension_names=("row", "dim")[:1 + len(width)])

        seq_bytes = 4 * ctx_len
        tok_chunk = max(1, min(window_seqs, -(-layout.CHUNK_MIN_BYTES // seq_bytes)))
        while window_seqs % tok_chunk:
            tok_chunk += 1
        group.create_array(layout.TOKENS, shape=(n_seqs, ctx_len), dtype=np.int32,
                           chunks=(tok_chunk, ctx_len), shards=(window_seqs, ctx_len),
                           compressors=codecs, fill_value=0, dimension_names=("seq", "pos"))
        site_chunk = min(layout.row_geometry(window_rows, layout.storage_dtype(s["encoding"]).itemsize * int(s["d"]))[0]
                         for s in sites.values())
        rows_array(layout.ROWS_SEQ, np.int32, chunk_rows=site_chunk)
        rows_array(layout.ROWS_POS, np.int32, chunk_rows=site_chunk)
        for name, s in sites.items():
            rows_array(layout.acts_path(name), layout.storage_dtype(s["encoding"]), int(s["d"]),
                       {"encoding": s["encoding"]})
            if grads:
                rows_array(layout.grads_path(name), layout.storage_dtype(grads["encoding"]), int(s["d"]),
                           {"encoding": grads["encoding"]})
        # written last: a store whose root attrs exist has all its arrays
        group.attrs[layout.ROOT_ATTR] = attrs
        return cls(path, group, lease=lease)

    @classmethod
    def open(cls, path: str, *, rank: int = 0, world: int = 1, lease=None) -> "StoreWriter":
        """Open a format-2 store to add windows; any other version is refused, never written."""
        try:
            group = fs.open_group(path, mode="r+")
            attrs = group.attrs[layout.ROOT_ATTR]
        except (KeyError, FileNotFoundError) as e:
            raise StoreError(f"{path} is not a sae_store (missing {e})") from None
        except Exception as e:
            raise StoreError(f"cannot open store {path}: {str(e).splitlines()[0][:200]}") from None
        version = attrs.get("format_version") if isinstance(attrs, dict) else None
        if type(version) is not int or version != layout.FORMAT_VERSION:
            raise StoreError(f"store {path} has format_version {version!r}; this tool writes only format "
                             f"{layout.FORMAT_VERSION} and never changes a store of another version")
        writer = cls(path, group, rank=rank, world=world, lease=lease)
        foreign = foreign_records(writer.records, writer.attrs, strict=False)
        if foreign:     # never add to, or complete, a store holding another store's window
            raise StoreError(f"store {scrub(path)}: {foreign[0]}; the store is left as it is "
                             f"(`harvest verify` lists every problem)")
        return writer

    def owns(self, window: int) -> bool:
        return window % self.world == self.rank

    def shard_keys(self, name: str, window: int, n_seqs: int) -> list[str]:
        """Keys of the shards of array `name` that window `window` (holding n_seqs) writes."""
        arr = self._arrays[name]
        if name == layout.TOKENS:
            first, count = window * self.window_seqs, n_seqs
        else:
            first, count = window * self.window_rows, n_seqs * self.ctx_len
        return [layout.shard_key(name, i, arr.ndim) for i in layout.shard_span(first, count, arr.shards[0])]

    def write_job(self, job: WindowJob) -> dict:
        """write_window for a WindowJob."""
        return self.write_window(job.window, job.tokens, job.rows_seq, job.rows_pos, job.acts, job.grads,
                                 position=job.position, order=job.order)

    def write_window(self, window: int, tokens: np.ndarray, rows_seq: np.ndarray, rows_pos: np.ndarray,
                     acts: dict[str, np.ndarray], grads: dict[str, np.ndarray] | None = None,
                     position: dict | None = None, order: np.ndarray | None = None) -> dict:
        """Write window `window`, then its record. A process writes its own windows in order; the
        record is what marks the window done. Rows are stored as given, or with `order` the stored
        row i is row order[i] of rows_seq, rows_pos, acts and grads (the shuffle, gathered shard by
        shard on the writing threads, so the caller never permutes a whole window)."""
        if not self.owns(window):
            raise StoreError(f"window {window} belongs to rank {window % self.world}, not rank {self.rank}")
        prev = window - self.world
        if prev >= 0 and prev not in self.records:
            raise StoreError(f"window {window} written out of order (window {prev} of this writer is not "
                             f"written yet)")
        s0 = window * self.window_seqs
        r0 = window * self.window_rows
        if order is not None:
            rows_seq, rows_pos = rows_seq[order], rows_pos[order]
        n = len(rows_seq)
        values = {layout.TOKENS: (s0, tokens.astype(np.int32, copy=False)),
                  layout.ROWS_SEQ: (r0, rows_seq.astype(np.int32, copy=False)),
                  layout.ROWS_POS: (r0, rows_pos.astype(np.int32, copy=False))}
        for site, v in acts.items():
            values[layout.acts_path(site)] = (r0, layout.encode(v, self.attrs["sites"][site]["encoding"]))
        for site, v in (grads or {}).items():
            values[layout.grads_path(site)] = (r0, layout.encode(v, self.attrs["grads"]["encoding"]))
        if order is None and any(len(v) != n for name, (_, v) in values.items() if name != layout.TOKENS):
            raise StoreError(f"window {window}: arrays of unequal row counts")
        missing = [name for name in self._arrays if name not in values]
        if missing:
            raise StoreError(f"window {window} has no values for {', '.join(missing)}")
        gathered = set(values) - {layout.TOKENS, layout.ROWS_SEQ, layout.ROWS_POS} if order is not None else set()
        # shards are gathered, encoded, hashed and written in parallel: one thread cannot keep up with a GPU
        jobs = {name: [self._pool().submit(self._write_array, name, first + i, v,
                                           order[i:i + step] if name in gathered else slice(i, i + step))
                       for i in range(0, len(v) if name == layout.TOKENS else n, step)]
                for name, (first, v) in values.items() for step in [self._step(name)]}
        written = {name: [s for job in jobs[name] for s in job.result()] for name in self._arrays}
        # creation_id: which store the window belongs to, so one copied into a sibling store is seen
        record = {"window": window, "rank": self.rank, "creation_id": self.attrs.get("creation_id"),
                  "seqs": int(len(tokens)), "rows": int(n),
                  "first_seq": s0, "first_row": r0, "position": position, "shards": written,
                  "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if self.lease is not None:
            self.lease.check()
        fs.write_atomic(self.path, layout.window_key(window), json.dumps(record).encode())
        self.records[window] = record
        return record

    def finish(self, n_seqs: int | None = None, **extra) -> dict:
        """Size the arrays to the recorded windows and write the final record (one process only).

        The sequence count comes from the window records, never from a counter: the leading run
        of recorded windows up to the first short one (a stream that ran out). Records and shards
        past it are removed. Idempotent, so a process killed inside it is simply run again.
        """
        self.records = load_records(self.path)
        final = load_final(self.path)
        if final is not None:   # killed after the final record: only the root attributes may lag
            n_windows, seqs, ended = final["windows"], final["seqs"], True
        else:
            n_windows, seqs, ended = complete_prefix(self.records, self.window_seqs, self.attrs["n_seqs"])
        if not ended:
            raise StoreError(f"store {self.path}: window {n_windows} has no record; cannot finish "
                             f"(run again with --resume)")
        if n_seqs is not None and n_seqs != seqs:
            raise StoreError(f"store {self.path}: records hold {seqs} sequences, not {n_seqs}")
        n_rows = seqs * self.ctx_len
        for name, arr in self._arrays.items():
            want = (seqs, self.ctx_len) if name == layout.TOKENS else (n_rows,) + arr.shape[1:]
            if arr.shape != want:
                arr.resize(want)
        for w in [w for w in self.records if w >= n_windows]:
            fs.remove_key(self.path, layout.window_key(w))
            del self.records[w]
        if final is None:
            final = {"windows": n_windows, "seqs": seqs, "rows": n_rows, **extra,
                     "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            fs.write_atomic(self.path, layout.FINAL_KEY, json.dumps(final).encode())
        # the root attributes follow for readers that look only there; final.json is authoritative
        self.attrs.update(n_seqs=seqs, n_rows=n_rows, complete=True)
        self.group.attrs[layout.ROOT_ATTR] = self.attrs
        return self.attrs
