"""What is at --out, and what a harvest may do to it.

Only a sae_store is ever removed; anything else at --out is refused and left alone. With
--overwrite on local disk the new store is built beside the old one (`<out>.new`) and swapped in
by two renames once it is complete, so the old store stays readable the whole time. Object
storage has no rename: there the old store's objects are removed only after the new run has
passed every input check and computed its first window, just before that window is written.
A whole bucket is never a valid --out.
"""
from __future__ import annotations

from dataclasses import dataclass

from sae_harvest.stores import fs, layout
from sae_harvest.stores import lease as leases
from sae_harvest.stores.errors import StoreError
from sae_harvest.stores.writer import load_final

from .errors import HarvestError


def store_attrs(path: str) -> dict | None:
    """The root attributes of the sae_store at path, or None when path holds no sae_store."""
    if not fs.exists(path):
        return None
    try:
        attrs = fs.open_group(path, mode="r").attrs[layout.ROOT_ATTR]
    except Exception:
        return None
    return dict(attrs) if isinstance(attrs, dict) else None


@dataclass
class Target:
    final: str                      # where the store ends up (--out)
    build: str                      # where this run writes
    resume_attrs: dict | None = None
    complete: bool = False
    replace: bool = False           # an old store at `final` is replaced

    def clear_for_build(self) -> None:
        """Remove what planning found to be a sae_store in the way of the build (rank 0)."""
        if self.build != self.final:
            if fs.anything_at(self.build):
                fs.remove(self.build)
        elif self.replace and fs.anything_at(self.final):
            fs.remove(self.final)

    def swap(self) -> None:
        """Put a store built beside --out in its place (local disk only)."""
        if self.build == self.final:
            return
        old = self.final + ".old"
        if fs.anything_at(self.final):
            if fs.anything_at(old):
                fs.remove(old)
            fs.rename(self.final, old)
        fs.rename(self.build, self.final)
        if fs.anything_at(old):
            fs.remove(old)


def _refuse_live_lease(path: str) -> None:
    held = leases.read(path)
    if held is not None and not leases.is_stale(held):
        raise StoreError(f"store {path} is being written by {leases.describe(held)}; one writer at a time")


def plan_target(out: str, *, resume: bool, overwrite: bool) -> Target:
    out = str(out).rstrip("/")
    if fs.is_bucket_root(out):
        raise HarvestError(f"--out {out} is a whole bucket; give a path inside it (e.g. {out}/run.zarr)")
    side = out + ".new"
    if not fs.anything_at(out):
        if resume and not fs.is_url(out) and store_attrs(side) is not None:
            return _resume(out, side)
        return Target(final=out, build=out)
    attrs = store_attrs(out)
    if attrs is None and fs.exists(out) and resume:   # zarr.json there but unreadable (truncated, edited)
        raise StoreError(f"cannot resume {out}: its metadata is unreadable (a truncated or edited zarr.json); "
                         f"the store is left as it is")
    if attrs is None:
        raise HarvestError(f"{out} exists and is not a sae_store; refusing to touch it (choose another --out)")
    if resume:
        if not fs.is_url(out) and store_attrs(side) is not None and load_final(side) is None:
            return _resume(out, side)    # an interrupted --overwrite: finish the new store, then swap
        return _resume(out, out)
    if not overwrite:
        raise HarvestError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")
    _refuse_live_lease(out)
    if fs.is_url(out):
        return Target(final=out, build=out, replace=True)
    for aside, role in ((side, "builds the new store"), (out + ".old", "moves the old store at the swap")):
        if fs.anything_at(aside) and store_attrs(aside) is None:
            raise HarvestError(f"{aside} exists and is not a sae_store; refusing to touch it (it is where "
                               f"--overwrite {role})")
    return Target(final=out, build=side, replace=True)


def _resume(final: str, build: str) -> Target:
    attrs = store_attrs(build)
    version = attrs.get("format_version")
    if type(version) is not int or version != layout.FORMAT_VERSION:
        raise StoreError(f"store {build} has format_version {version!r}; this tool resumes only format "
                         f"{layout.FORMAT_VERSION} stores and never changes another version")
    complete = load_final(build) is not None
    if not complete:
        _refuse_live_lease(build)
    return Target(final=final, build=build, resume_attrs=attrs, complete=complete and build == final,
                  replace=build != final)
