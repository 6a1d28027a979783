"""Check a format-2 store against its window records: `harvest verify STORE [--quick]`.

Every problem is one line. Quick mode checks that every recorded shard exists with its recorded
size; the full check also checksums every shard (crc32c of the stored bytes, or the sha256 of
early format-2 records). Both check that the
window records cover the store without gaps and that no shard lies beyond the records.
"""
from __future__ import annotations


from . import fs, layout, shards
from .errors import StoreError
from .reader import read_root
from .split import store_split
from .writer import StoreWriter, complete_prefix, load_final, load_records


def verify_store(path: str, quick: bool = False) -> list[str]:
    """Problems found (empty for a sound store). Raises StoreError when path holds no store."""
    path = str(path)
    group, attrs = read_root(path)
    version = attrs.get("format_version")
    if version != layout.FORMAT_VERSION:
        return [f"store has format_version {version!r}: only format {layout.FORMAT_VERSION} stores carry "
                f"the window records verify checks"]
    problems = []
    try:
        store_split(attrs, path)
    except StoreError as e:
        problems.append(str(e))
    records = load_records(path)
    final = load_final(path)
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
    names = StoreWriter.array_names(attrs)
    recorded: dict[str, set[str]] = {name: set() for name in names}
    for w in sorted(records):
        for name in names:
            entries = records[w]["shards"].get(name)
            if entries is None:
                problems.append(f"array {name} window {w}: not in the window record")
                continue
            for key, size, digest in entries:
                recorded[name].add(key)
                problems += _check_shard(path, name, w, key, size, digest, quick)
    for name in names:
        try:
            arr = group[name]
        except KeyError:
            problems.append(f"array {name}: missing (no zarr.json)")
            continue
        want = seqs if name == layout.TOKENS else seqs * ctx
        if final is not None and arr.shape[0] != want:
            problems.append(f"array {name}: {arr.shape[0]} rows, the records hold {want}")
        for key in fs.list_keys(path, name + "/c"):
            if key not in recorded[name]:
                problems.append(f"array {name}: shard {key} lies beyond the window records")
    return problems


def _check_shard(path, name, window, key, size, digest, quick) -> list[str]:
    where = f"array {name} window {window}: shard {key}"
    if quick:
        got = fs.size(path, key)
        if got is None:
            return [f"{where} missing"]
        if got == 0:
            return [f"{where} empty"]
        return [] if got == size else [f"{where} truncated or resized ({got} bytes, record says {size})"]
    data = fs.read_bytes(path, key)
    if data is None:
        return [f"{where} missing"]
    if len(data) == 0:
        return [f"{where} empty"]
    if len(data) != size:
        return [f"{where} truncated or resized ({len(data)} bytes, record says {size})"]
    if not shards.checksum_matches(data, digest):
        return [f"{where} checksum mismatch"]
    return []


def held_out_line(path: str) -> str:
    """The store's held-out split in one line, for `harvest verify` (stores/split.py)."""
    _, attrs = read_root(str(path))
    final = load_final(str(path))
    seqs = int(final["seqs"]) if final is not None else int(attrs["n_seqs"])
    return store_split(attrs, str(path)).describe(seqs, int(attrs["ctx_len"]))
