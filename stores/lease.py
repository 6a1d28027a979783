"""One writer at a time: a lease object inside the store.

`lease.json` names the job writing the store (owner id, host, pid, heartbeat time). The writer
refreshes the heartbeat from a background thread; a second writer is refused while the heartbeat
is fresh. A lease whose heartbeat is older than STALE_S, or whose pid is gone on this very host
and in this very pid namespace (containers may share a host name, and their pids are not each
other's), is stale and `--resume` may take it over. Creation is exclusive: O_EXCL on local disk, a
conditional PUT (`If-None-Match: *`) on object storage, where a server that rejects the condition
gets check-then-put instead (fs.create_exclusive). Taking over a stale lease is a plain PUT followed
by a read-back: two jobs taking over the same stale lease in the same instant could both pass,
and the one overwritten stops at its next record (its check sees the other owner).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from . import fs, layout
from .errors import StoreError

HEARTBEAT_S = 5.0
STALE_S = 60.0


def _pid_namespace() -> str | None:
    """This process's pid namespace ("pid:[4026531836]" on Linux), None where there is none to read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read(path: str) -> dict | None:
    raw = fs.read_bytes(path, layout.LEASE_KEY)
    if raw is None:
        return None
    try:
        held = json.loads(raw)
        float(held.get("heartbeat", 0)), int(held.get("pid", -1))
        return held
    except (ValueError, TypeError, AttributeError):
        return {"owner": "?", "host": "?", "pid": -1, "heartbeat": 0.0}   # torn by hand: stale


def is_stale(lease: dict, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if now - float(lease.get("heartbeat", 0)) > STALE_S:
        return True
    # a pid is only ours to probe in our own namespace (a lease from before it was recorded: the host)
    same_pids = lease.get("host") == socket.gethostname() and lease.get("pid_ns", _pid_namespace()) == _pid_namespace()
    return same_pids and not _pid_alive(int(lease.get("pid", -1)))


def describe(lease: dict) -> str:
    age = time.time() - float(lease.get("heartbeat", 0))
    return (f"{lease.get('owner')} (host {lease.get('host')}, pid {lease.get('pid')}, "
            f"heartbeat {age:.0f} s ago)")


class Lease:
    """`creation_id` is the store's (or the build's) this lease is taken for: a lease left by a
    creation killed before the root attributes were written proves whose leftover that is."""

    def __init__(self, path: str, owner: str | None = None, creation_id: str | None = None):
        self.path = str(path)
        self.owner = owner or uuid.uuid4().hex[:12]
        self.creation_id = creation_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "pid_ns": _pid_namespace(),
                  "heartbeat": time.time()}
        if self.creation_id:
            record["creation_id"] = self.creation_id
        return json.dumps(record).encode()

    def acquire(self, takeover: bool) -> "Lease":
        """Take the lease; a live holder is refused, a stale one only with takeover=True."""
        if fs.create_exclusive(self.path, layout.LEASE_KEY, self._record()):
            return self._confirm()
        held = read(self.path)
        if held is None:      # released between our two looks
            return self.acquire(takeover)
        if not is_stale(held):
            raise StoreError(f"store {self.path} is being written by {describe(held)}; "
                             f"one writer at a time")
        if not takeover:
            raise StoreError(f"store {self.path} has a stale lease of {describe(held)}; "
                             f"pass --resume to take it over")
        fs.write_atomic(self.path, layout.LEASE_KEY, self._record())
        return self._confirm()

    def _confirm(self) -> "Lease":
        held = read(self.path)
        if held is None or held.get("owner") != self.owner:
            raise StoreError(f"store {self.path}: another writer took the lease at the same time: "
                             f"{describe(held or {})}")
        return self

    def refresh(self) -> None:
        held = read(self.path)
        if held is not None and held.get("owner") != self.owner:
            raise StoreError(f"store {self.path}: lease taken over by {describe(held)}")
        fs.write_atomic(self.path, layout.LEASE_KEY, self._record())

    def start_heartbeat(self) -> "Lease":
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self.refresh()
                except Exception:   # a lost lease shows up at the next check; never kill the run here
                    pass
        self._thread = threading.Thread(target=beat, daemon=True, name="store-lease")
        self._thread.start()
        return self

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self) -> None:
        """Raise if someone else holds the lease now (called before each window record)."""
        held = read(self.path)
        if held is None or held.get("owner") != self.owner:
            raise StoreError(f"store {self.path}: lost the lease to {describe(held or {})}")

    def release(self) -> None:
        self.stop_heartbeat()
        held = read(self.path)
        if held is not None and held.get("owner") == self.owner:
            fs.remove_key(self.path, layout.LEASE_KEY)
