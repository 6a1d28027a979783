"""What is at --out, and what a harvest may do to it.

Only this tool's own stores are ever removed or cleared, and only when proven so: a sae_store at
--out under --overwrite; a build beside it whose name no user would pick and whose root
attributes (or lease) carry this tool's creation id; the old store moved aside at a swap, whose
name carries the creation id of the new store that replaced it. Anything else is refused with one
line and left alone, as is any location that is empty, the root, the current directory (or one
holding it), the home directory or a whole bucket (checked again by fs.remove itself).

The lease is taken before anything is created (a fresh --out too, and the build beside it): of two
writers, whatever the timing, one is refused with one line naming the holder. With --overwrite on
local disk the new store is built beside the old one (`<out>.sae-harvest-build`) and swapped in
by two renames once complete, the lease still held; `--resume` finishes a swap it finds half
done. Object storage has no rename: there the old store's objects are removed only after the new
run has passed every input check and computed its first window, just before that window is written.
"""
from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field

from sae_harvest.stores import fs, layout
from sae_harvest.stores import lease as leases
from sae_harvest.stores.check import check_arrays, check_root_attrs
from sae_harvest.stores.errors import StoreError
from sae_harvest.stores.writer import load_final

from .errors import HarvestError

BUILD_SUFFIX = ".sae-harvest-build"    # <out><this>: where --overwrite builds on local disk
OLD_INFIX = ".sae-harvest-old-"        # <out><this><creation id of the new store>: the old one at the swap
# what a store (or an interrupted creation of one) holds at its top level
_STORE_ENTRIES = {"zarr.json", layout.TOKENS, "rows", "acts", "grads", layout.WINDOWS_PREFIX,
                  layout.FINAL_KEY, layout.LEASE_KEY}
_GROUPS = {"rows", "acts", "grads"}     # groups of arrays: <group>/zarr.json, <group>/<array>/...
_TMP = re.compile(r"\.tmp-[0-9-]+$")    # fs.write_atomic's temporary beside a key (a killed write)
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")   # zarr's LocalStore: zarr.json -> zarr.<uuid>.partial


def _own_key(parts: list[str]) -> bool:
    """A key (split at '/') is one a store holds (or a prefix of one): its metadata and records,
    an array's zarr.json and chunks under c/. Anything else was put there by someone else."""
    name = _TMP.sub("", parts[-1])
    if _ZARR_PARTIAL.search(name):
        name = _ZARR_PARTIAL.sub("", name) + (".json" if name.startswith("zarr.") else "")
    parts = parts[:-1] + [name]
    top, rest = parts[0], parts[1:]
    if top not in _STORE_ENTRIES:
        return False
    if not rest:
        return True
    if top == layout.WINDOWS_PREFIX:
        return len(rest) == 1 and re.fullmatch(r"[0-9]+\.json", rest[0]) is not None
    if top == layout.TOKENS:   # an array
        return rest[0] == "c" or rest == ["zarr.json"]
    if top in _GROUPS:
        return len(rest) == 1 or rest[1] == "c" or rest[1:] == ["zarr.json"]
    return False               # zarr.json, final.json, lease.json are objects, not folders


def foreign_entries(path: str, limit: int = 4) -> list[str]:
    """Up to `limit` entries under the store at path that are not the store's own (_own_key): the
    user's files, an SAE trained with --out inside it. Removing or clearing the store would lose them."""
    found: list[str] = []
    if fs.is_url(path):
        for key in fs.list_keys(path, ""):
            parts = key.split("/")
            # report the outermost foreign prefix once (saes/, not each of its files)
            cut = next((i for i in range(1, len(parts) + 1) if not _own_key(parts[:i])), None)
            if cut is not None and "/".join(parts[:cut]) not in found:
                found.append("/".join(parts[:cut]))
            if len(found) >= limit:
                break
        return found
    root = fs._local(path)
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = [] if rel == "." else rel.split(os.sep)
        for name in sorted(dirs) + sorted(files):
            if not _own_key(prefix + [name]):
                found.append("/".join(prefix + [name]))
                if name in dirs:
                    dirs.remove(name)      # named once, not walked
                if len(found) >= limit:
                    return found
        if prefix:
            dirs[:] = [d for d in dirs if d != "c"]   # an array's chunks: all the store's
    return found


def _refuse_foreign(path: str, action: str, advice: str) -> None:
    """One line, nothing touched, when the store at path holds what is not its own."""
    foreign = foreign_entries(path) if fs.anything_at(path) else []
    if foreign:
        raise HarvestError(f"{path} holds what is not part of the store ({', '.join(foreign)}); {action} would "
                           f"delete it: {advice}")


def store_attrs(path: str) -> dict | None:
    """The root attributes of the sae_store at path, or None when path holds no sae_store."""
    if not fs.exists(path):
        return None
    try:
        attrs = fs.open_group(path, mode="r").attrs[layout.ROOT_ATTR]
    except Exception:
        return None
    return dict(attrs) if isinstance(attrs, dict) else None


def normalize_out(out: str) -> str:
    """--out as this tool uses it, or one HarvestError line: `file://` forms become local paths;
    empty, root and current-directory paths, a whole bucket and a link's dangerous target are refused
    before anything is touched; a symlink is resolved (the store is built at its target)."""
    raw = str(out)
    shown = raw if raw.strip() else repr(raw)
    if raw.startswith("file://"):
        raw = raw[len("file://"):]
    if fs.is_url(raw):
        raw = raw.rstrip("/")
        if fs.is_bucket_root(raw):
            raise HarvestError(f"--out {shown} is a whole bucket; give a path inside it (e.g. {raw}/run.zarr)")
        return raw
    why = fs.dangerous_location(raw)
    if why is None and os.path.islink(raw.rstrip("/")):
        raw = os.path.realpath(raw.rstrip("/"))
        why = fs.dangerous_location(raw)
    if why is not None:
        raise HarvestError(f"--out {shown} is {why}; give the path of a store to write (e.g. ./run.zarr)")
    return raw.rstrip("/")


@dataclass
class Target:
    final: str                      # where the store ends up (--out)
    build: str                      # where this run writes
    resume_attrs: dict | None = None
    complete: bool = False          # the build is complete: only a swap (if beside) is left
    replace: bool = False           # an old store at `final` is replaced
    leftover: bool = False          # the build holds this tool's proven leftover: take its stale lease, clear it
    creation_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def take_lease(self) -> leases.Lease:
        """The build's lease, taken before anything there is created or cleared: exclusively for a
        fresh location, by takeover of a stale lease for a proven leftover (a live one: refused)."""
        return leases.Lease(self.build, creation_id=self.creation_id).acquire(takeover=self.leftover)

    def clear_for_build(self) -> None:
        """Clear what planning proved to be this tool's in the way of the build (rank 0, lease held):
        a leftover build, or on object storage the old store being replaced. The lease stays."""
        if self.build != self.final:
            if self.leftover:
                fs.clear_except(self.build, layout.LEASE_KEY)
        elif self.replace or self.leftover:
            fs.clear_except(self.final, layout.LEASE_KEY)

    def swap(self, lease: leases.Lease | None = None) -> None:
        """Put a complete store built beside --out in its place (local disk only), the build's lease
        still held so no other run takes the build for a leftover; the old store goes aside under
        a name carrying the new store's creation id, then is removed."""
        _remove_old_sides(self.final, (store_attrs(self.final) or {}).get("creation_id"))
        if self.build == self.final:
            return
        attrs = store_attrs(self.build) or {}
        new_id = attrs.get("creation_id")
        # something put into the old store while this run built the new one (an SAE trained with
        # --out inside it) stops the swap; the new store stays complete beside it
        _refuse_foreign(self.final, "replacing it", f"move it out, then run the same command with --resume "
                                                    f"to finish (the new store is complete at {self.build})")
        if lease is not None:
            lease.stop_heartbeat()
        old = self.final + OLD_INFIX + str(new_id)
        if fs.anything_at(self.final):
            if fs.anything_at(old):
                raise StoreError(f"cannot swap: {old} is in the way; nothing was moved")
            fs.rename(self.final, old)
        fs.rename(self.build, self.final)
        if lease is not None:
            lease.path = self.final
            lease.release()
        _remove_old_sides(self.final, new_id)


def _remove_old_sides(final: str, new_id) -> None:
    """Remove an old store moved aside by the swap that put the store with creation id new_id at
    `final`: the only old sibling proven to be this tool's leftover."""
    if new_id is None or (store_attrs(final) or {}).get("creation_id") != new_id:
        return
    old = final + OLD_INFIX + str(new_id)
    if fs.anything_at(old) and not foreign_entries(old, limit=1):   # with more than the store: left as it is
        fs.remove(old)


def _refuse_live_lease(path: str) -> None:
    held = leases.read(path)
    if held is not None and not leases.is_stale(held):
        raise StoreError(f"store {path} is being written by {leases.describe(held)}; one writer at a time")


def _interrupted_creation(path: str) -> bool:
    """path holds this tool's stale lease from a creation killed before the root attributes were
    written, and nothing but store entries: a leftover only this tool can have made."""
    held = leases.read(path)
    if held is None or not held.get("creation_id") or not leases.is_stale(held) or store_attrs(path) is not None:
        return False
    return not foreign_entries(path, limit=1)


def _own_build(side: str) -> bool:
    """`side` (named <out>.sae-harvest-build) holds a build this tool made and no live writer."""
    attrs = store_attrs(side)
    if attrs is not None:
        return bool(attrs.get("creation_id"))
    return _interrupted_creation(side)


def plan_target(out: str, *, resume: bool, overwrite: bool) -> Target:
    out = normalize_out(out)
    local = not fs.is_url(out)
    side = out + BUILD_SUFFIX
    if local and fs.anything_at(side):
        _refuse_live_lease(side)         # a build in progress is leased like a store
    if fs.anything_at(out):
        _refuse_live_lease(out)          # a second writer, even of a store still being created
    if not fs.anything_at(out):
        if resume and local and store_attrs(side) is not None:
            return _resume(out, side)    # killed inside a swap: the old store is aside, the new one beside
        return Target(final=out, build=out)
    attrs = store_attrs(out)
    if attrs is None and _interrupted_creation(out) and (resume or overwrite):
        return Target(final=out, build=out, leftover=True)
    if attrs is None and fs.exists(out) and resume:   # zarr.json there but unreadable (truncated, edited)
        raise StoreError(f"cannot resume {out}: its metadata is unreadable (a truncated or edited zarr.json); "
                         f"the store is left as it is")
    if attrs is None:
        raise HarvestError(f"{out} exists and is not a sae_store; refusing to touch it (choose another --out)")
    if resume:
        if local and store_attrs(side) is not None:
            return _resume(out, side)    # an interrupted --overwrite: finish the new store, or its swap
        return _resume(out, out)
    if not overwrite:
        raise HarvestError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")
    _refuse_foreign(out, "--overwrite", "move it out of the store first, or choose another --out")
    if not local:     # a stale lease of the store being replaced (its writer died) is taken over
        return Target(final=out, build=out, replace=True, leftover=leases.read(out) is not None)
    if fs.anything_at(side) and not _own_build(side):
        raise HarvestError(f"{side} exists and is not a build of this tool; refusing to touch it (it is where "
                           f"--overwrite builds the new store)")
    _refuse_foreign(side, "clearing this leftover build", "move it out first")
    return Target(final=out, build=side, replace=True, leftover=fs.anything_at(side))


def _resume(final: str, build: str) -> Target:
    attrs = store_attrs(build)
    version = attrs.get("format_version")
    if type(version) is not int or version != layout.FORMAT_VERSION:
        raise StoreError(f"store {build} has format_version {version!r}; this tool resumes only format "
                         f"{layout.FORMAT_VERSION} stores and never changes another version")
    check_root_attrs(attrs, build)
    problems = check_arrays(fs.open_group(build, mode="r"), attrs, build)
    if problems:
        raise StoreError(f"cannot resume {build}: {problems[0]}; the store is left as it is")
    complete = load_final(build) is not None
    _refuse_live_lease(build)
    return Target(final=final, build=build, resume_attrs=attrs, complete=complete, replace=build != final,
                  creation_id=attrs.get("creation_id") or uuid.uuid4().hex)
