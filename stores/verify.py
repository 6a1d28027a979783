"""Check a format-2 store against its window records: `harvest verify STORE [--quick]`.

Every problem is one line. Both modes check the root attributes against every array's metadata
(width, storage dtype, encoding, rows, and codecs and chunk layout against what this tool writes),
that every window record was written for this store (its creation_id, where it has one), that the
window records cover the store without gaps,
that no shard lies beyond the records, and that every recorded key names an object inside the
store (no `..`, no link leaving it, no device). Quick mode then checks each shard's size; the
full check also recomputes each shard's checksum, reading it in bounded pieces only after its
size matched the record: xxh3-128 of the whole shard (records of this version), sha256 (early
format-2 records), or for the first crc32c records, whose recorded value is the same CRC residue
for every shard and so says nothing, every chunk's and the index's own crc32c inside the shard;
and it reads each shard's index as the array's metadata describes it.
"""
from __future__ import annotations

import hashlib

import xxhash

from . import fs, layout, shards
from .check import check_arrays, foreign_records, unbound_windows
from .errors import StoreError
from .reader import read_root
from .split import store_split
from .writer import StoreWriter, complete_prefix, load_final, load_records


def verify_store(path: str, quick: bool = False) -> list[str]:
    """Problems found (empty for a sound store). Raises StoreError when path holds no store."""
    path = str(path)
    group, attrs = read_root(path)
    from .check import check_root_attrs
    check_root_attrs(attrs, path)
    version = attrs.get("format_version")
    if version != layout.FORMAT_VERSION:
        return [f"store has format_version {version!r}: only format {layout.FORMAT_VERSION} stores carry "
                f"the window records verify checks"]
    problems = []
    try:
        store_split(attrs, path)
    except StoreError as e:
        problems.append(str(e))
    try:
        records = load_records(path)
        final = load_final(path)
    except StoreError as e:
        return problems + [str(e)]
    window_seqs, ctx = attrs["window_seqs"], attrs["ctx_len"]
    if final is None:
        n_windows, seqs, _ = complete_prefix(records, window_seqs, attrs["n_seqs"])
        planned = -(-attrs["n_seqs"] // window_seqs)
        problems.append(f"incomplete: no final record ({len(records)} of {planned} window records)")
    else:
        n_windows, seqs = int(final["windows"]), int(final["seqs"])
        for w in range(n_windows):
            if w not in records:
                problems.append(f"window {w}: record missing")
        if sum(int(records[w]["seqs"]) for w in range(n_windows) if w in records) != seqs:
            problems.append(f"final record says {seqs} sequences; the window records disagree")
    for w in sorted(records):
        if w >= n_windows and final is not None:
            problems.append(f"window {w}: record beyond the final record's {n_windows} windows")
    problems += foreign_records(records, attrs)
    array_problems = check_arrays(group, attrs, path)
    problems += array_problems
    if array_problems:
        return problems     # the records cannot be checked against arrays that disagree with the store
    names = StoreWriter.array_names(attrs)
    writer = StoreWriter(path, group)
    recorded: dict[str, set[str]] = {name: set() for name in names}
    for w in sorted(records):
        for name in names:
            entries = records[w]["shards"].get(name)
            if entries is None:
                problems.append(f"array {name} window {w}: not in the window record")
                continue
            expected = set(writer.shard_keys(name, w, int(records[w]["seqs"])))
            plain = shards.plain(name, group[name])
            for key, size, digest in entries:
                if key not in expected:
                    problems.append(f"array {name} window {w}: recorded key {key!r} is not one of the "
                                    f"window's shards (not read)")
                    continue
                recorded[name].add(key)
                problems += _check_shard(path, name, w, key, size, digest, quick, plain)
    for name in names:
        want = seqs if name == layout.TOKENS else seqs * ctx
        if final is not None and group[name].shape[0] != want:
            problems.append(f"array {name}: {group[name].shape[0]} rows, the records hold {want}")
        for key in fs.list_keys(path, name + "/c"):
            if key not in recorded[name]:
                problems.append(f"array {name}: shard {key} lies beyond the window records")
    return problems


def _check_shard(path, name, window, key, size, digest, quick, plain) -> list[str]:
    where = f"array {name} window {window}: shard {key}"
    escape = fs.local_escape(path, key)
    if escape is not None:
        return [f"{where} is {escape} (not read)"]
    got = fs.size(path, key)
    if got is None:
        return [f"{where} missing"]
    if got == 0:
        return [f"{where} empty"]
    if got != size:     # compared before reading: a huge or endless object is never read
        return [f"{where} truncated or resized ({got} bytes, record says {size})"]
    if quick:
        return []
    rule = shards.checksum_rule(digest)
    if rule == "unknown":
        return [f"{where}: the record's checksum {digest[:40]!r} is of no known kind"]
    if rule == "legacy-crc32c" and plain is None:
        return []    # only its size can be checked (docs/store-format.md)
    h = xxhash.xxh3_128() if rule == "xxh3" else hashlib.sha256() if rule == "sha256" else None
    data, n = [], 0
    for piece in fs.read_pieces(path, key):
        n += len(piece)
        if n > size:
            return [f"{where} grew while it was read (more than the record's {size} bytes)"]
        if h is not None:
            h.update(piece)
        else:
            data.append(piece)     # legacy: the whole shard (its size already matched) for its own crcs
    if n != size:
        return [f"{where} truncated or resized ({n} bytes, record says {size})"]
    if rule == "xxh3":
        ok = f"{shards.XXH3}:{h.hexdigest()}" == digest
    elif rule == "sha256":
        ok = h.hexdigest() == digest
    else:
        ok = shards.internal_crcs_ok(plain, b"".join(data))
    if not ok:
        return [f"{where} checksum mismatch"]
    if plain is not None:
        # the intact shard's index read as the array's metadata says: an edited chunk shape makes
        # the index's crc32c or its chunk lengths disagree
        try:
            shards.ShardReader(path, plain).index(int(key[len(name) + 3:].split("/")[0]))
        except StoreError:
            return [f"{where}: its index does not read as the array's metadata says (chunk shape edited?)"]
    return []


def unbound(path: str) -> list[int]:
    """Windows whose record names no store (made before records carried the creation_id): for
    those verify cannot tell a window copied in from another store (shards and record) from the
    store's own, and `harvest verify` says so."""
    try:
        return unbound_windows(load_records(path), read_root(path)[1])
    except StoreError:
        return []


def legacy_shards(path: str) -> int:
    """How many recorded shards carry the first format-2 crc32c record (the CRC residue): for
    those, verify checks every chunk's own crc32c but cannot tell a shard from another's."""
    try:
        records = load_records(path)
    except StoreError:
        return 0
    return sum(shards.checksum_rule(e[2]) == "legacy-crc32c" for rec in records.values()
               for entries in rec["shards"].values() for e in entries)


def held_out_line(path: str) -> str:
    """The store's held-out split in one line, for `harvest verify` (stores/split.py)."""
    _, attrs = read_root(str(path))
    final = load_final(str(path))
    seqs = int(final["seqs"]) if final is not None else int(attrs["n_seqs"])
    return store_split(attrs, str(path)).describe(seqs, int(attrs["ctx_len"]))
