"""Stores on object storage (a real S3-compatible server, moto, on loopback): the lease with a
conditional PUT, --overwrite that keeps the old store until it must go and leaves nothing of it,
refusals that change no object, and a killed harvest resumed bitwise."""
import hashlib
import json
import os
import socket
import time

import numpy as np
import pytest
from click.testing import CliRunner

from sae_harvest.harvest.cli import main as harvest_cli
from sae_harvest.harvest.run import harvest
from sae_harvest.stores import StoreError, fs, open_store
from sae_harvest.stores.lease import Lease
from tests.test_store_v2 import _assert_same, _cfg, _harvest_killed_at_record, _one_error_line

pytest.importorskip("moto.server")

# small harvests: 47 to 94 sequences of 32 tokens in windows of 16 sequences
SMALL = dict(tokens=1500, shuffle_window=512)


@pytest.fixture(scope="module")
def bucket():
    from tests.s3server import s3_server
    with s3_server("obj-bucket") as url:
        yield url


def _objects(bucket_url) -> dict:
    """{key: (etag, sha256 of the bytes)} of every object in the bucket."""
    import boto3
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    name = bucket_url.split("://", 1)[1]
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=name, Key=obj["Key"])["Body"].read()
            out[obj["Key"]] = (obj["ETag"], hashlib.sha256(body).hexdigest())
    return out


def _under(objects: dict, bucket_url: str, url: str) -> dict:
    prefix = url[len(bucket_url) + 1:] + "/"
    return {k[len(prefix):]: v for k, v in objects.items() if k.startswith(prefix)}


def _cli(*args):
    result = CliRunner().invoke(harvest_cli, list(args))
    return result.exit_code, result.output


def _run_args(harvest_assets, out, *extra, **kw):
    conf = dict(tokens=SMALL["tokens"], shuffle_window=SMALL["shuffle_window"], **kw)
    args = ["run", "--model", harvest_assets["gpt2"], "--dataset", conf.pop("dataset", harvest_assets["corpus"]),
            "--sites", "blocks.0.resid_pre", "--grads", "--ctx-len", "32", "--batch-size", "8",
            "--device", "cpu", "--out", out, "--quiet"]
    for k, v in conf.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return [*args, *extra]


def _lease_record(owner, host, heartbeat):
    return json.dumps({"owner": owner, "host": host, "pid": 4242, "heartbeat": heartbeat}).encode()


# ---- the lease: one conditional PUT -------------------------------------------------------
def test_create_exclusive_is_a_conditional_put(bucket, monkeypatch):
    url = f"{bucket}/excl"
    assert fs.create_exclusive(url, "lease.json", b"first")
    assert not fs.create_exclusive(url, "lease.json", b"second")
    assert fs.read_bytes(url, "lease.json") == b"first"
    # two writers that both looked before either wrote: check-then-put would let both through;
    # the conditional PUT refuses the second
    monkeypatch.setattr(fs, "read_bytes", lambda path, key: None)
    assert not fs.create_exclusive(url, "lease.json", b"racer")
    monkeypatch.undo()
    assert fs.read_bytes(url, "lease.json") == b"first"


def test_create_exclusive_falls_back_where_the_server_rejects_the_condition(bucket, monkeypatch):
    """A server without conditional writes answers NotImplemented: check-then-put instead."""
    from moto.s3.exceptions import S3ClientError
    from moto.s3.responses import S3Response

    class NoConditionalWrites(S3ClientError):
        code = "NotImplemented"

    seen = []
    real = S3Response.put_object

    def put_object(self):
        if self.headers.get("If-None-Match"):
            seen.append(self.headers["If-None-Match"])
            raise NoConditionalWrites("A header you provided implies functionality that is not implemented")
        return real(self)

    monkeypatch.setattr(S3Response, "put_object", put_object)
    url = f"{bucket}/fallback"
    assert fs.create_exclusive(url, "lease.json", b"first")
    assert seen == ["*"]
    assert not fs.create_exclusive(url, "lease.json", b"second")
    assert fs.read_bytes(url, "lease.json") == b"first"
    # the lease works the same on such a server
    lease = Lease(f"{bucket}/fallback-lease").acquire(takeover=False)
    with pytest.raises(StoreError, match=f"being written by {lease.owner}"):
        Lease(f"{bucket}/fallback-lease").acquire(takeover=False)
    lease.release()
    assert fs.read_bytes(f"{bucket}/fallback-lease", "lease.json") is None


def test_lease_on_s3_refuses_a_live_holder_and_takes_over_a_stale_one(bucket):
    url = f"{bucket}/lease"
    first = Lease(url).acquire(takeover=False)
    for takeover in (False, True):      # a live lease is never taken over, not even by --resume
        with pytest.raises(StoreError, match=f"being written by {first.owner} \\(host {socket.gethostname()}"):
            Lease(url).acquire(takeover=takeover)
    assert json.loads(fs.read_bytes(url, "lease.json"))["owner"] == first.owner
    # a writer on another host that stopped beating 10 minutes ago: stale
    fs.write_atomic(url, "lease.json", _lease_record("job-gone", "node-17", time.time() - 600))
    with pytest.raises(StoreError, match="stale lease of job-gone"):
        Lease(url).acquire(takeover=False)
    second = Lease(url).acquire(takeover=True)
    assert json.loads(fs.read_bytes(url, "lease.json"))["owner"] == second.owner
    with pytest.raises(StoreError, match="lost the lease"):
        first.check()
    second.release()
    first.release()           # not its lease any more: leaves nothing to remove, raises nothing
    assert fs.read_bytes(url, "lease.json") is None


def test_objects_written_by_another_process_are_seen(bucket):
    """A process that listed a prefix (s3fs caches listings) still reads objects another process
    (here: boto3 directly) adds later: a reader opened on a running harvest, rank 0 finishing a
    store whose last windows another rank wrote."""
    import boto3
    url = f"{bucket}/listed"
    fs.write_atomic(url, "windows/00000000.json", b"{}")
    assert fs.list_keys(url, "windows") == ["windows/00000000.json"]
    assert fs.size(url, "windows/00000000.json") == 2
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(
        Bucket=bucket.split("://")[1], Key="listed/windows/00000001.json", Body=b'{"x": 1}')
    assert fs.list_keys(url, "windows") == ["windows/00000000.json", "windows/00000001.json"]
    assert fs.read_bytes(url, "windows/00000001.json") == b'{"x": 1}'
    assert fs.size(url, "windows/00000001.json") == 8
    assert fs.exists(url) is False and fs.anything_at(url)


# ---- killed, resumed, verified ------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_reference(harvest_assets, bucket):
    """An uninterrupted S3 harvest; --resume where nothing is yet starts a new store (so a job
    script may always pass --resume: docs/slurm-harvest.md)."""
    url = f"{bucket}/ref.zarr"
    harvest(_cfg(harvest_assets, url, **SMALL), resume=True, progress=False)
    assert open_store(url).complete
    return url


def test_s3_killed_then_resumed_is_bitwise_equal_and_verifies(harvest_assets, bucket, s3_reference, monkeypatch):
    url = f"{bucket}/killed.zarr"
    _harvest_killed_at_record(monkeypatch, 2, _cfg(harvest_assets, url, **SMALL))
    with pytest.raises(StoreError, match="incomplete"):
        open_store(url)
    # the killed job's lease, fresh, from another node: a second writer is refused, nothing changes
    fs.write_atomic(url, "lease.json", _lease_record("job-7f3a", "node-17", time.time()))
    before = _objects(bucket)
    for extra in (["--resume"], ["--overwrite"]):
        code, text = _cli(*_run_args(harvest_assets, url, *extra))
        _one_error_line(code, text, "being written by job-7f3a (host node-17, pid 4242")
    assert _objects(bucket) == before
    # its heartbeat 10 minutes old: --resume takes the lease over and completes the store
    fs.write_atomic(url, "lease.json", _lease_record("job-7f3a", "node-17", time.time() - 600))
    code, text = _cli(*_run_args(harvest_assets, url, "--resume"))
    assert code == 0, text
    _assert_same(s3_reference, url)
    assert fs.read_bytes(url, "lease.json") is None
    code, text = _cli("verify", url)
    assert code == 0, text
    # a damaged shard on S3 is caught by verify
    shard = sorted(k for k in _under(_objects(bucket), bucket, url) if k.startswith("acts/"))[0]
    fs.write_atomic(url, shard, fs.read_bytes(url, shard)[:-7])
    code, text = _cli("verify", url)
    assert code == 1 and "acts/blocks.0.resid_pre" in text, text


# ---- --overwrite on object storage --------------------------------------------------------
def test_s3_overwrite_keeps_old_store_until_first_window_and_leaves_nothing_of_it(
        harvest_assets, bucket, s3_reference, monkeypatch):
    import sae_harvest.harvest.outpath as outpath
    import sae_harvest.harvest.run as run
    url = f"{bucket}/ow.zarr"
    # the old store: more windows than the new one, another seed
    harvest(_cfg(harvest_assets, url, tokens=3000, seed=5), progress=False)
    old_acts = open_store(url).acts("blocks.0.resid_pre", slice(None))
    # neighbours sharing the prefix's first characters are not part of the store
    for key in ("ow.zarr-notes/readme.txt", "ow.zarr.bak", "ow.zarr2/zarr.json"):
        fs.write_atomic(bucket, key, b"not the store")
    # refused overwrites change no object: bad input, a prefix that is not a store, the bucket
    tmp = f"{bucket}/papers"
    fs.write_atomic(tmp, "thesis.txt", b"years of work")
    fs.write_atomic(tmp, "data/results.csv", b"1,2,3")
    before = _objects(bucket)
    for out, extra, message in ((url, ["--text-column", "body"], "no column"),
                                (url, ["--sites", "blocks.9.resid_pre"], "layer"),
                                (tmp, [], "not a sae_store"), (bucket, [], "whole bucket"),
                                (bucket + "/", [], "whole bucket")):
        code, text = _cli(*_run_args(harvest_assets, out, "--overwrite", *extra))
        _one_error_line(code, text, message)
        assert _objects(bucket) == before, out
    # the old store is removed only after every check passed and the first window is computed
    events = []
    real_compute, real_clear = run.compute_window, outpath.Target.clear_for_build

    def compute(*a, **k):
        job = real_compute(*a, **k)
        events.append("computed")
        if events.count("computed") == 2:   # the new run holds the lease: a second writer is refused
            owner = json.loads(fs.read_bytes(url, "lease.json"))["owner"]
            code, text = _cli(*_run_args(harvest_assets, url, "--resume"))
            _one_error_line(code, text, f"being written by {owner} (host {socket.gethostname()}")
        return job

    def clear(self):
        events.append("clear")
        np.testing.assert_array_equal(open_store(url).acts("blocks.0.resid_pre", slice(None)), old_acts)
        return real_clear(self)

    monkeypatch.setattr(run, "compute_window", compute)
    monkeypatch.setattr(outpath.Target, "clear_for_build", clear)
    code, text = _cli(*_run_args(harvest_assets, url, "--overwrite"))
    assert code == 0, text
    assert events[:2] == ["computed", "clear"] and events.count("clear") == 1 and events.count("computed") == 3
    monkeypatch.undo()
    # the new store equals a fresh one, object for object (only timestamps in the JSON differ)
    _assert_same(s3_reference, url)
    code, text = _cli("verify", url)
    assert code == 0, text
    after = _objects(bucket)
    new, fresh = _under(after, bucket, url), _under(after, bucket, s3_reference)
    assert sorted(new) == sorted(fresh)
    assert {k: v for k, v in new.items() if not k.endswith(".json")} == \
           {k: v for k, v in fresh.items() if not k.endswith(".json")}
    # everything outside the store is as it was
    outside = lambda objs: {k: v for k, v in objs.items() if not k.startswith("ow.zarr/")}  # noqa: E731
    assert outside(after) == outside(before)


@pytest.mark.slow
def test_s3_two_torchrun_processes_killed_and_resumed(harvest_assets, bucket):
    """torchrun (c10d rendezvous) on S3: rank 1 SIGKILLed after its 2nd record, the same launch
    with --resume completes it bitwise equal to an uninterrupted launch; verify passes."""
    from tests.test_store_v2 import _torchrun
    full, killed = f"{bucket}/tr-full.zarr", f"{bucket}/tr-killed.zarr"
    r = _torchrun(harvest_assets, full, rdzv_id="s3-full")
    assert r.returncode == 0, r.stdout[-3000:]
    r = _torchrun(harvest_assets, killed, rdzv_id="s3-kill",
                  kill=(2, 1))
    assert r.returncode != 0
    with pytest.raises(StoreError, match="incomplete"):
        open_store(killed)
    r = _torchrun(harvest_assets, killed, extra=["--resume"], rdzv_id="s3-resume")
    assert r.returncode == 0, r.stdout[-3000:]
    _assert_same(full, killed)
    assert open_store(killed).attrs["world_size"] == 2
    code, text = _cli("verify", killed)
    assert code == 0, text
