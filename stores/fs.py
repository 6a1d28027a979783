"""Local paths and fsspec URLs behind one interface.

S3 is configured the standard way (AWS_* environment variables, including
AWS_ENDPOINT_URL for S3-compatible servers); nothing about credentials is ever
written into a store.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import threading

import zarr
from zarr.storage import FsspecStore, LocalStore


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _local(path: str) -> str:
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


def _fs(url: str):
    _refuse_url_credentials(url)
    from fsspec import url_to_fs
    # no listings cache: other processes (ranks, a running harvest) add objects to a prefix this
    # process listed before, and s3fs answers size/cat_file from a stale listing with "not found"
    return url_to_fs(url, use_listings_cache=False)


def zarr_store(path: str, read_only: bool = False):
    if is_url(path):
        _refuse_url_credentials(path)
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


def dangerous_location(path: str) -> str | None:
    """Why removing or clearing `path` could destroy what is not a store, or None: empty, the
    root, the current directory or one above it, the home directory (local disk); a whole bucket
    (object storage). Checked by every remove here, whatever the caller proved before."""
    if is_url(path):
        rest = str(path).split("://", 1)[1].strip("/")
        return "a whole bucket" if not rest or "/" not in rest else None
    local = _local(path)
    if not local.strip() or not local.strip("/") or local.strip("/") in (".", ".."):
        return "empty, the root or the current directory"
    real, cwd = os.path.realpath(local), os.path.realpath(os.getcwd())
    if real == os.path.dirname(real):
        return "the root directory"
    if os.path.commonpath([real, cwd]) == real:
        return "the current directory or a folder holding it"
    if real == os.path.realpath(os.path.expanduser("~")):
        return "the home directory"
    return None


def remove(path: str) -> None:
    """Remove what is at path. Callers prove first that it is this tool's own store (or leftover);
    this refuses a dangerous location (dangerous_location) whatever they proved."""
    why = dangerous_location(path)
    if why is not None:
        from .errors import StoreError
        raise StoreError(f"refusing to remove {path}: it is {why}")
    if is_url(path):
        fs, root = _fs(path)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    elif os.path.isdir(_local(path)):
        shutil.rmtree(_local(path))
    elif os.path.exists(_local(path)):
        os.remove(_local(path))


def clear_except(path: str, keep: str) -> None:
    """Remove every object under path but path/keep (the caller's lease), path itself kept. Only
    for a location the caller proved to be its own store or leftover, lease held."""
    why = dangerous_location(path)
    if why is not None:
        from .errors import StoreError
        raise StoreError(f"refusing to clear {path}: it is {why}")
    if is_url(path):
        for key in list_keys(path, ""):
            if key != keep:
                remove_key(path, key)
        return
    root = _local(path)
    for name in os.listdir(root):
        if name == keep:
            continue
        target = os.path.join(root, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        else:
            os.remove(target)


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


# ---- single objects inside a store (records, lease, shards), addressed by key -----------------
def _key_path(path: str, key: str) -> str:
    return str(path).rstrip("/") + "/" + key


def read_bytes(path: str, key: str) -> bytes | None:
    """The object at path/key, or None when there is none."""
    target = _key_path(path, key)
    if is_url(path):
        fs, root = _fs(target)
        try:
            return fs.cat_file(root)
        except FileNotFoundError:
            return None
    try:
        with open(_local(target), "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_range(path: str, key: str, start: int, stop: int, into: memoryview | None = None) -> memoryview:
    """Bytes [start, stop) of the object path/key (start < 0: its last -start bytes), read into
    `into` when given and the object is a local file (object storage returns its own buffer).
    Fewer bytes than asked means the object is shorter: the caller decides what that is."""
    target = _key_path(path, key)
    if is_url(path):
        fsys, root = _fs(target)
        if start < 0:
            size = fsys.size(root)
            start, stop = max(0, size + start), size
        return memoryview(fsys.cat_file(root, start=start, end=stop))
    with open(_local(target), "rb", buffering=0) as f:
        f.seek(start, os.SEEK_END if start < 0 else os.SEEK_SET)
        view = into if into is not None else memoryview(bytearray(stop - start if start >= 0 else -start))
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        return view[:got]


def write_pieces(path: str, key: str, pieces: list) -> None:
    """Write the concatenation of `pieces` (bytes-like) as the object path/key. Not atomic on
    local disk, like zarr's own chunk writes: what marks data done is the record written after."""
    target = _key_path(path, key)
    if is_url(path):
        fs, root = _fs(target)
        fs.pipe_file(root, b"".join(pieces))
        return
    target = _local(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
        for piece in pieces:
            f.write(piece)


def write_atomic(path: str, key: str, data: bytes) -> None:
    """Readers see the old object or the whole new one, never a part: a local file is written
    beside its target and renamed over it; an object store PUT is atomic by itself."""
    target = _key_path(path, key)
    if is_url(path):
        fs, root = _fs(target)
        fs.pipe_file(root, data)
        return
    target = _local(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def create_exclusive(path: str, key: str, data: bytes) -> bool:
    """Create path/key only if absent; False when something is already there.

    Local disk: O_EXCL. Object storage: a look, then a conditional PUT (`If-None-Match: *`, which
    AWS S3 and moto honour: of two writers racing, exactly one PUT succeeds). The look first keeps
    an existing object safe on a server that ignores the header; a server (or fsspec filesystem)
    that rejects the condition gets a plain PUT after the look: check-then-put, where two writers
    starting in the same instant could both pass (the lease's read-back catches all but that)."""
    target = _key_path(path, key)
    if is_url(path):
        if read_bytes(path, key) is not None:
            return False
        fs, root = _fs(target)
        return _put_if_absent(fs, root, data)
    target = _local(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


# S3 error codes of a server that does not do conditional writes (rather than of a failed condition)
_NO_CONDITIONAL_PUT = {"NotImplemented", "InvalidArgument", "InvalidRequest", "NotSupported"}


def _put_if_absent(fs, root: str, data: bytes) -> bool:
    """One conditional PUT; falls back to a plain PUT where the condition is not supported."""
    try:
        fs.pipe_file(root, data, mode="create")
        return True
    except FileExistsError:     # 412 PreconditionFailed: the object appeared since our look
        return False
    except (TypeError, NotImplementedError, ValueError):   # a filesystem without mode="create"
        pass
    except OSError as e:
        code = (getattr(e.__cause__, "response", None) or {}).get("Error", {}).get("Code")
        if code == "ConditionalRequestConflict":      # 409: another conditional PUT of it is in flight
            return False
        if code not in _NO_CONDITIONAL_PUT and e.errno != errno.ENOSYS:
            raise
    fs.pipe_file(root, data)
    return True


def size(path: str, key: str) -> int | None:
    """Bytes of the object at path/key, None when missing."""
    target = _key_path(path, key)
    if is_url(path):
        fs, root = _fs(target)
        try:
            return int(fs.size(root))
        except FileNotFoundError:
            return None
    try:
        return os.stat(_local(target)).st_size
    except (FileNotFoundError, NotADirectoryError):
        return None


def list_keys(path: str, prefix: str) -> list[str]:
    """Keys (relative to path) of every object under path/prefix."""
    base = str(path).rstrip("/")
    if is_url(path):
        fs, root = _fs(base)
        try:
            found = fs.find(root + "/" + prefix)
        except FileNotFoundError:
            return []
        return sorted(f[len(root) + 1:] for f in found)
    base = _local(base)
    out = []
    for dirpath, _, files in os.walk(os.path.join(base, prefix)):
        for name in files:
            out.append(os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/"))
    return sorted(out)


def remove_key(path: str, key: str) -> None:
    target = _key_path(path, key)
    if is_url(path):
        fs, root = _fs(target)
        try:
            fs.rm_file(root)
        except FileNotFoundError:
            pass
    else:
        try:
            os.remove(_local(target))
        except FileNotFoundError:
            pass


def confined_key(key) -> bool:
    """A record's key names an object inside the store: relative, no `..`, no empty parts."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\0" in key:
        return False
    return all(part not in ("", ".", "..") for part in key.split("/"))


def local_escape(path: str, key: str) -> str | None:
    """Local disk: why path/key is not a regular file inside the store (a link that leaves it,
    a device, a fifo), or None. Object storage has no links: None."""
    if is_url(path):
        return None
    root = os.path.realpath(_local(path))
    target = os.path.realpath(_local(_key_path(path, key)))
    if os.path.commonpath([root, target]) != root:
        return "a link that leaves the store"
    try:
        mode = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    import stat
    return None if stat.S_ISREG(mode) else "not a regular file"


def read_pieces(path: str, key: str, piece: int = 16 << 20):
    """The object at path/key in pieces of at most `piece` bytes (bounded memory)."""
    target = _key_path(path, key)
    if is_url(path):
        fsys, root = _fs(target)
        opened = fsys.open(root, "rb", block_size=piece)
    else:
        opened = open(_local(target), "rb")
    with opened as f:
        while data := f.read(piece):
            yield data


def is_bucket_root(path: str) -> bool:
    """s3://bucket (or gs://bucket/): a whole bucket, which this tool never removes."""
    return is_url(path) and "/" not in str(path).split("://", 1)[1].strip("/")


def rename(src: str, dst: str) -> None:
    """Local paths only: object storage has no rename."""
    os.replace(_local(src), _local(dst))


# s3fs and gcsfs read a netloc's user:password@ as part of the bucket name: the request fails
# with the secret quoted in the error, so such a URL is refused before any request is made
_AWS, _GCS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS"
_NO_URL_CREDENTIALS = {"s3": _AWS, "s3a": _AWS, "gs": _GCS, "gcs": _GCS}


def _refuse_url_credentials(url: str) -> None:
    scheme, _, rest = str(url).partition("://")
    netloc = rest.split("/", 1)[0]
    # a bucket name holds no ':', so a ':' before the first '/' with an '@' after it is a
    # user:password whose password holds a '/' (AWS secret keys may)
    place = re.split(r"[?#]", rest, maxsplit=1)[0]
    if scheme.lower() in _NO_URL_CREDENTIALS and ("@" in netloc or ":" in netloc and "@" in place):
        from .errors import StoreError
        from .urls import scrub
        raise StoreError(f"{scrub(url)}: credentials inside an {scheme}:// URL are not used (and never stored); "
                         f"give them in the environment ({_NO_URL_CREDENTIALS[scheme.lower()]}) or a profile")
