"""Which store this is: what a consumer (a training checkpoint, an evaluation) records so it can tell
later that the store at a path is still the one it used, and not another harvest put there since.

- `creation_id`: a uuid4 hex written into the root attributes when the store is created (None for
  stores made before it existed).
- `final_digest`: sha256 of `final.json` (windows, sequences, rows, the time `finish` ran).
- `records_digest`: sha256 over every window record (each shard's key, size and checksum, the
  stream position, the time it was written): another harvest of the same size differs here.
- `sample_digest`: sha256 of the first 64 KiB of every array's first shard: the values themselves,
  since the checksums in records written before data-dependent checksums are a constant.
- `model`: the model fingerprint of the root attribute `provenance` (None before it existed).
- format 1 (no records, no final.json): `attrs_digest`, sha256 of the root attributes.

Any change of any field means another store (or the same store rewritten). It costs one small read per
window record (an opened Store already holds them) and 64 KiB per array.

`content_digest` answers another question, not part of the identity: do two stores hold the same
data? Two harvests with the same inputs get different creation ids and times, and the same content
digest only if every shard is byte-identical under the same split and layout; a bench records it so
a rerun can tell whether it trained on the same data as the run it is compared with.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from . import fs, layout, shards
from .reader import Store, open_store


@dataclass(frozen=True)
class StoreIdentity:
    creation_id: str | None
    final_digest: str | None
    records_digest: str | None
    sample_digest: str | None
    model: str | None
    attrs_digest: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StoreIdentity":
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

    def differences(self, other: "StoreIdentity") -> list[str]:
        """Names of the fields that differ (empty: the same store)."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def identity_of(store: Store) -> StoreIdentity:
    """The identity of an opened store (its records are already loaded)."""
    raw = store.group.attrs.get(layout.ROOT_ATTR)   # as stored (store.attrs holds the counts of the records)
    raw = dict(raw) if isinstance(raw, dict) else {}
    model = (raw.get("provenance") or {}).get("model") or {}
    if store.records is None:   # format 1: the root attributes are all there is
        return StoreIdentity(raw.get("creation_id"), None, None, None, model.get("digest"), _digest(raw))
    final = fs.read_bytes(store.path, layout.FINAL_KEY)
    records = [store.records[w] for w in sorted(store.records)]
    return StoreIdentity(creation_id=raw.get("creation_id"),
                         final_digest=None if final is None else hashlib.sha256(final).hexdigest(),
                         records_digest=_digest(records), sample_digest=_sample_digest(store, records),
                         model=model.get("digest"))


SAMPLE_BYTES = 64 << 10


def _sample_digest(store: Store, records: list[dict]) -> str | None:
    if not records:
        return None
    h = hashlib.sha256()
    for name, shards in sorted((records[0].get("shards") or {}).items()):
        if shards:
            key = shards[0][0]
            h.update(f"{name}\0{key}\0".encode())
            h.update(bytes(fs.read_range(store.path, key, 0, SAMPLE_BYTES)))
    return h.hexdigest()


def store_identity(path: str) -> StoreIdentity:
    """The identity of the (complete) store at path; StoreError when there is none."""
    return identity_of(open_store(path))


def content_digest(store: Store) -> str | None:
    """sha256 over every window's shape and shard checksums and the root attributes that say what the
    bytes are (split, layout, encodings, gradient definition, tokenizer ids), without the ids, names
    and times that differ between two harvests of the same data; None where a checksum says nothing of the data (a
    format-1 store has none, the first format-2 stores' crc32c records hold one constant)."""
    if store.records is None:
        return None
    for r in store.records.values():
        for entries in (r.get("shards") or {}).values():
            if any(shards.checksum_rule(e[2]) not in ("xxh3", "sha256") for e in entries):
                return None
    windows = [{"seqs": r.get("seqs"), "rows": r.get("rows"), "first_seq": r.get("first_seq"),
                "first_row": r.get("first_row"), "shards": r.get("shards")}
               for _, r in sorted(store.records.items())]
    # what the bytes mean: the same shards under another split are other training and held-out rows
    raw = store.group.attrs.get(layout.ROOT_ATTR)
    raw = dict(raw) if isinstance(raw, dict) else {}
    meaning = {k: raw.get(k) for k in CONTENT_ATTRS}
    meaning["tokenizer"] = {k: v for k, v in (raw.get("tokenizer") or {}).items() if k != "name"}
    return _digest({"attrs": meaning, "windows": windows})


# root attributes that say what the shards' bytes are (not names or paths, which differ between
# two harvests of the same data on two machines)
CONTENT_ATTRS = ("format_version", "split", "ctx_len", "window_seqs", "shuffle_window_tokens", "sites", "grads",
                 "n_rows", "n_seqs")
