"""Local paths and fsspec URLs behind one interface.

S3 is configured the standard way (AWS_* environment variables, including
AWS_ENDPOINT_URL for S3-compatible servers); nothing about credentials is ever
written into a store.
"""
from __future__ import annotations

import os
import shutil

import zarr
from zarr.storage import FsspecStore, LocalStore


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _local(path: str) -> str:
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


def _fs(url: str):
    from fsspec import url_to_fs
    return url_to_fs(url)


def zarr_store(path: str, read_only: bool = False):
    if is_url(path):
        return FsspecStore.from_url(str(path), read_only=read_only)
    return LocalStore(_local(path), read_only=read_only)


def exists(path: str) -> bool:
    """True when a zarr group or array lives at path."""
    if is_url(path):
        fs, root = _fs(path)
        return fs.exists(root.rstrip("/") + "/zarr.json")
    return os.path.exists(os.path.join(_local(path), "zarr.json"))


def anything_at(path: str) -> bool:
    if is_url(path):
        fs, root = _fs(path)
        return fs.exists(root)
    return os.path.exists(_local(path))


def remove(path: str) -> None:
    if is_url(path):
        fs, root = _fs(path)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    elif os.path.isdir(_local(path)):
        shutil.rmtree(_local(path))
    elif os.path.exists(_local(path)):
        os.remove(_local(path))


def open_group(path: str, mode: str = "r"):
    return zarr.open_group(store=zarr_store(path, read_only=(mode == "r")), mode=mode, zarr_format=3)


def du(path: str) -> int:
    """Bytes on disk / in the bucket under path."""
    if is_url(path):
        fs, root = _fs(path)
        return int(fs.du(root))
    total = 0
    for dirpath, _, files in os.walk(_local(path)):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total
