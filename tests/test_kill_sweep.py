"""A seeded sweep of kill points over harvests (issue 16): a fresh harvest, an --overwrite of an
old store, and two processes racing for one --out. Killed just before its k-th change to storage
(any write, create, rename or remove), then recovered with --resume or --overwrite, every outcome
is either the uninterrupted store bit for bit or a refusal (one line, exit 2, every byte unchanged),
and no file outside the store and this tool's own siblings ever changes.

In process, a "kill" raises at the k-th change and fails every change after it (nothing a dying
process's handlers do reaches storage), then its lease is aged past STALE_S as time would. The two-
process sweep uses real processes and SIGKILL (tests/kill_launcher.py). CI runs a few seeded points;
`-m slow` runs many."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from sae_harvest.harvest.cli import main as harvest_cli
from sae_harvest.harvest.run import harvest
from sae_harvest.stores import fs
from tests.kill_launcher import count_mutations
from tests.test_store_safety import SITE, _args, _cfg, _user_files, snapshot
from tests.test_store_v2 import REPO, _arrays


@pytest.fixture(scope="module")
def assets(safety_assets):
    return safety_assets


@pytest.fixture(scope="module")
def stores(safety_stores):
    return safety_stores


@pytest.fixture(scope="module")
def bucket(safety_bucket):
    return safety_bucket

ARRAYS = ("tokens", "seq", "pos", "acts/" + SITE, "grads/" + SITE)


class _Killed(Exception):
    pass


def _cli(*args):
    result = CliRunner().invoke(harvest_cli, list(args))
    return result.exit_code, result.output


def _same_arrays(a, b) -> bool:
    x, y = _arrays(a), _arrays(b)
    return all(x[k].shape == y[k].shape and np.array_equal(x[k], y[k]) for k in ARRAYS)


def _shard_files(path) -> dict:
    """Every shard file's bytes hash: the arrays bit for bit as stored."""
    return {k: v for k, v in snapshot(path).items() if "/c/" in k}


def _age_leases(root):
    """What time does to the lease of a process that died: its heartbeat grows old."""
    for dirpath, _, files in os.walk(root):
        if "lease.json" in files:
            p = os.path.join(dirpath, "lease.json")
            data = json.loads(open(p).read())
            data["heartbeat"] = 0.0
            open(p, "w").write(json.dumps(data))


def _outside(case) -> dict:
    """Everything in the case folder but the store and this tool's siblings of it."""
    return {k: v for k, v in snapshot(case).items()
            if not k.startswith("x.zarr/") and not k.startswith("x.zarr.sae-harvest-")}


def _setup(case, stores, scenario):
    _user_files(case / "notes")
    _user_files(case / "x.zarr.old")          # the user's own backup, beside the store
    if scenario == "overwrite":
        shutil.copytree(stores["other"], case / "x.zarr")


def _count(assets, case, monkeypatch, overwrite) -> int:
    counter = count_mutations(lambda n: None, monkeypatch.setattr)
    harvest(_cfg(assets, case / "x.zarr"), overwrite=overwrite, progress=False)
    monkeypatch.undo()
    return counter["n"]


def _kill_at(assets, case, monkeypatch, k, overwrite):
    def die(n):
        if n >= k:
            raise _Killed(f"killed at change {k}")
    count_mutations(die, monkeypatch.setattr)
    try:
        harvest(_cfg(assets, case / "x.zarr"), overwrite=overwrite, progress=False)
        killed = False
    except Exception:
        killed = True
    monkeypatch.undo()
    return killed


def _check_outcome(stores, case, code, text, before, allowed) -> bool:
    """True when the store is complete and bitwise one of `allowed`; else the run was a refusal."""
    if code == 2:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), text
        assert snapshot(case) == before, text
        return False
    assert code == 0, text
    assert any(_same_arrays(stores[name], case / "x.zarr") for name in allowed), text
    return True


def _sweep(assets, stores, tmp_path, monkeypatch, scenario, points, seed):
    overwrite = scenario == "overwrite"
    calibrate = tmp_path / "calibrate"
    _setup(calibrate, stores, scenario)
    total = _count(assets, calibrate, monkeypatch, overwrite)
    ks = sorted(np.random.default_rng(seed).choice(np.arange(1, total + 1), size=min(points, total), replace=False))
    for k in ks:
        case = tmp_path / f"k{k}"
        _setup(case, stores, scenario)
        outside = _outside(case)
        assert _kill_at(assets, case, monkeypatch, int(k), overwrite)
        _age_leases(case)
        assert _outside(case) == outside, k
        # right after the kill, --out holds the old store or the new one, complete, or nothing
        # (fresh; or inside the swap, the new store complete beside it)
        if (case / "x.zarr" / "final.json").exists():
            assert _same_arrays(stores["other" if overwrite else "ref"], case / "x.zarr") or \
                _same_arrays(stores["ref"], case / "x.zarr"), k
        # recovery: --resume, then the command again; each is the store bit for bit or a refusal
        allowed = ("ref", "other") if overwrite else ("ref",)
        before = snapshot(case)
        code, text = _cli(*_args(assets, case / "x.zarr", "--resume"))
        done = _check_outcome(stores, case, code, text, before, allowed)
        if not done or not _same_arrays(stores["ref"], case / "x.zarr"):
            code, text = _cli(*_args(assets, case / "x.zarr", "--overwrite"))
            assert code == 0, (k, text)
        assert _same_arrays(stores["ref"], case / "x.zarr"), k
        assert _shard_files(case / "x.zarr") == _shard_files(stores["ref"]), k
        assert sorted(os.listdir(case)) == ["notes", "x.zarr", "x.zarr.old"], (k, os.listdir(case))
        assert _outside(case) == outside, k
        shutil.rmtree(case)


@pytest.mark.parametrize("scenario", ["fresh", "overwrite"])
def test_kill_sweep(assets, stores, tmp_path, monkeypatch, scenario):
    _sweep(assets, stores, tmp_path, monkeypatch, scenario, points=3, seed=16)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["fresh", "overwrite"])
def test_kill_sweep_long(assets, stores, tmp_path, monkeypatch, scenario):
    _sweep(assets, stores, tmp_path, monkeypatch, scenario, points=40, seed=1616)


# ---- two processes -----------------------------------------------------------------------------
def _launch(assets, out, *extra, at=None):
    launcher = os.path.join(REPO, "tests", "kill_launcher.py")
    kill = ["--at-mutation", str(at)] if at else []
    args = [sys.executable, launcher, *kill, "--", *_args(assets, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _race(assets, stores, case, overwrite, at=None):
    extra = ("--overwrite",) if overwrite else ()
    procs = [_launch(assets, case / "x.zarr", *extra, at=at), _launch(assets, case / "x.zarr", *extra)]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    for code, text in results:
        assert code in (0, 2, -9), text
        if code == 2:
            lines = [line for line in text.strip().splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error:"), text
    return results


def _two_processes(assets, stores, tmp_path, points, seed):
    rng = np.random.default_rng(seed)
    for i in range(points):
        overwrite = bool(i % 2)
        case = tmp_path / f"race{i}"
        _setup(case, stores, "overwrite" if overwrite else "fresh")
        outside = _outside(case)
        at = None if i < 2 else int(rng.integers(1, 60))
        results = _race(assets, stores, case, overwrite, at)
        codes = [c for c, _ in results]
        if not overwrite and at is None:      # both fresh: exactly one writes the store
            assert sorted(codes) == [0, 2], results
        assert _outside(case) == outside
        _age_leases(case)
        if 0 not in codes or not _same_arrays(stores["ref"], case / "x.zarr"):
            code, text = _cli(*_args(assets, case / "x.zarr", "--overwrite"))
            assert code == 0, (results, text)
        assert _same_arrays(stores["ref"], case / "x.zarr")
        assert sorted(os.listdir(case)) == ["notes", "x.zarr", "x.zarr.old"], os.listdir(case)
        assert _outside(case) == outside
        shutil.rmtree(case)


def test_two_processes_race_for_one_out(assets, stores, tmp_path):
    _two_processes(assets, stores, tmp_path, points=1, seed=16)


@pytest.mark.slow
def test_two_processes_race_and_one_is_killed(assets, stores, tmp_path):
    _two_processes(assets, stores, tmp_path, points=8, seed=1616)


# ---- object storage: --overwrite replaces the store in place (no rename) ------------------------
@pytest.mark.parametrize("points", [1, pytest.param(6, marks=pytest.mark.slow)])
def test_kill_sweep_s3_overwrite(assets, stores, bucket, monkeypatch, points):
    """On the loopback S3 server: an old store replaced with --overwrite, killed before its k-th
    change (object writes and deletes through stores/fs.py; zarr's own metadata PUTs are not kill
    points here), then --resume (the new store, the old one, or a refusal changing no object) and
    --overwrite (the new store). No object outside the store's prefix ever changes."""
    from tests.test_object_storage import _objects
    outside = lambda objs: {k: v for k, v in objs.items() if not k.startswith("ow.zarr/")}  # noqa: E731
    url = f"{bucket}/ow.zarr"
    fs.write_atomic(bucket, "ow.zarr.old/notes.txt", b"the user's")
    fs.write_atomic(bucket, "ow.zarr-notes.txt", b"the user's too")

    def setup():
        if fs.anything_at(url):
            fs.remove(url)
        harvest(_cfg(assets, url, seed=5), progress=False)

    setup()
    counter = count_mutations(lambda n: None, monkeypatch.setattr)
    harvest(_cfg(assets, url), overwrite=True, progress=False)
    monkeypatch.undo()
    total = counter["n"]
    for k in sorted(np.random.default_rng(16).choice(np.arange(1, total + 1), size=min(points, total), replace=False)):
        setup()
        before_all = outside(_objects(bucket))

        def die(n, k=int(k)):
            if n >= k:
                raise _Killed(f"killed at change {k}")
        count_mutations(die, monkeypatch.setattr)
        with pytest.raises(Exception):
            harvest(_cfg(assets, url), overwrite=True, progress=False)
        monkeypatch.undo()
        held = fs.read_bytes(url, "lease.json")
        if held is not None:        # the dead writer's lease grows old
            fs.write_atomic(url, "lease.json", json.dumps({**json.loads(held), "heartbeat": 0.0}).encode())
        objects = _objects(bucket)
        code, text = _cli(*_args(assets, url, "--resume"))
        if code == 2:
            assert len(text.strip().splitlines()) == 1 and text.startswith("error:"), text
            assert _objects(bucket) == objects, k
        else:
            assert code == 0, text
            assert _same_arrays(stores["ref"], url) or _same_arrays(stores["other"], url), k
        code, text = _cli(*_args(assets, url, "--overwrite"))
        assert code == 0, (k, text)
        assert _same_arrays(stores["ref"], url), k
        assert outside(_objects(bucket)) == before_all, k
