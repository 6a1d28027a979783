"""`train fit` under torchrun (gloo, 2 processes on 127.0.0.1): the same SAE as one process, rank-0
writes, exact resume, and a killed rank that ends the job instead of hanging it."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_harvest import train
from sae_harvest.stores import open_store
from sae_harvest.train.fit import fit
from tests.test_e2e import _cfg as _e2e_cfg
from tests.test_train_loop import _cfg

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
ARCHS = {"relu": dict(arch="relu", l1=(1.0,)), "gated": dict(arch="gated", l1=(1.0,)),
         "topk": dict(arch="topk"), "gtopk": dict(arch="gtopk"), "batchtopk": dict(arch="batchtopk")}


def torchrun(*args, timeout=240):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _weights(folder):
    return train.load_sae(folder).state_dict()


def _assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


def test_store_shares_cover_the_global_batch(store):
    """Each rank reads only its contiguous share; together they are the one-process batches."""
    s = open_store(str(store))
    kw = dict(rows=(0, 1800), block_rows=200, seed=1, exclude_pos0=True, epochs=2)
    whole = [b["rows"] for b in s.batches("blocks.1.resid_pre", 256, **kw)]
    parts = [[b["rows"] for b in s.batches("blocks.1.resid_pre", 256, part=(r, 2), **kw)] for r in (0, 1)]
    assert len(whole) == len(parts[0]) == len(parts[1]) > 10
    for w, a, b in zip(whole, *parts):
        assert len(a) == len(b) == 128
        np.testing.assert_array_equal(np.concatenate([a, b]), w)
    it = s.batches("blocks.1.resid_pre", 256, part=(1, 2), decode=False, **kw)
    batches = iter(it)
    batch = next(batches)
    batches.close()   # stop the read-ahead threads now, not at interpreter exit
    assert batch["acts"]["blocks.1.resid_pre"].dtype == np.float16   # shipped as stored
    np.testing.assert_array_equal(batch["acts"]["blocks.1.resid_pre"].astype(np.float32),
                                  s.acts("blocks.1.resid_pre", batch["rows"]))


def test_two_ranks_train_the_same_sae_as_one_process(store, tmp_path):
    configs = []
    for name, kw in ARCHS.items():
        fit(_cfg(store, tmp_path / "one" / name, tokens=256 * 12, log_every=4, **kw), progress=False)
        configs.append(_cfg(store, tmp_path / "two" / name, tokens=256 * 12, log_every=4, **kw).to_dict())
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    r = torchrun(WORKER, str(tmp_path / "configs.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ARCHS:
        (sub,) = [p.name for p in (tmp_path / "one" / name).iterdir() if p.name != "checkpoint"]
        one, two = tmp_path / "one" / name / sub, tmp_path / "two" / name / sub
        # the same up to float reduction order (a missing reduction shows up at 1e-2 and above)
        _assert_same(_weights(one), _weights(two), rtol=1e-5, atol=1e-6)
        cfg = json.loads((two / "cfg.json").read_text())["sae_harvest"]
        assert cfg["world_size"] == 2 and json.loads((two / "summary.json").read_text())["world_size"] == 2
        assert json.loads((one / "summary.json").read_text())["world_size"] == 1
        m1 = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
        m2 = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in m2] == [4, 8, 12]    # rank 0 alone writes
        for a, b in zip(m1, m2):
            assert a.keys() == b.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (name, k)


# stacked sweeps (train/stacked.py) under data parallel: AuxK's variance, BatchTopK's global top-k and
# threshold, the gradients and the dead masks reduce over the ranks for the whole stack at once
STACKED = {"topk": dict(arch="topk", k=(2, 4, 8), d_sae=256, dead_tokens=256 * 3),
           "batchtopk": dict(arch="batchtopk", k=(2, 4), d_sae=256, dead_tokens=256 * 3),
           "topk_sparse": dict(arch="topk", k=(2, 4, 8), d_sae=256, dead_tokens=256 * 3, sparse_backward="on",
                               sparse_decode="on"),   # the stacked sparse backward and gather decode
           "relu": dict(arch="relu", l1=(0.3, 3.0)),
           "sites": dict(arch="topk", k=(4,), site="blocks.*.resid_pre"),   # one SAE per site, [S, n, d]
           # --sweep-parallel: 2 SAEs on rank 0 (stacked), 1 on rank 1 (alone: `on` must not refuse it there)
           "sweep_parallel": dict(arch="topk", k=(2, 4, 8), d_sae=256, dead_tokens=256 * 3)}
TWO_RANKS_ONLY = {"sweep_parallel": dict(sweep_parallel=True)}


@pytest.mark.slow   # one torchrun job of two processes
def test_two_ranks_train_the_same_stacked_sweeps_as_one_process(store, tmp_path):
    configs, names = [], {}
    for name, kw in STACKED.items():
        kw = dict(tokens=256 * 12, log_every=4, stack_sweep="on", **kw)   # on: refused if it could not stack
        names[name] = sorted(fit(_cfg(store, tmp_path / "one" / name, **kw), progress=False))
        configs.append(_cfg(store, tmp_path / "two" / name, **kw, **TWO_RANKS_ONLY.get(name, {})).to_dict())
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    r = torchrun(WORKER, str(tmp_path / "configs.json"), "--results", str(tmp_path / "results.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for (name, saes), result in zip(names.items(), results):
        assert sorted(result.get("summaries", {})) == saes, result   # trained, stacked, on two ranks
        for sae in saes:
            one, two = tmp_path / "one" / name / sae, tmp_path / "two" / name / sae
            _assert_same(_weights(one), _weights(two), rtol=1e-5, atol=1e-6)
            m1 = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
            m2 = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
            assert [m["step"] for m in m2] == [4, 8, 12]
            for a, b in zip(m1, m2):
                assert a.keys() == b.keys()
                for k in a:
                    assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (name, sae, k)
            if name in ("topk", "topk_sparse", "batchtopk", "sweep_parallel"):
                assert any(m["aux"] > 0 for m in m1), (name, sae)   # AuxK ran: its global variance is compared


@pytest.mark.slow   # two torchrun jobs: ~35 s on the 2-core box
def test_killed_rank_ends_the_job_and_resume_continues_exactly(store, tmp_path):
    kw = dict(arch="batchtopk", tokens=256 * 12, log_every=4, checkpoint_every=4)
    fit(_cfg(store, tmp_path / "one", **kw), progress=False)
    cfg = _cfg(store, tmp_path / "two", **kw)
    (tmp_path / "configs.json").write_text(json.dumps([cfg.to_dict()]))
    r = torchrun(WORKER, str(tmp_path / "configs.json"), "--kill-rank", "1", "--kill-step", "6", timeout=120)
    assert r.returncode != 0
    state = json.loads((tmp_path / "two" / "checkpoint" / "state.json").read_text())
    # rank 0 meets the dead peer in its next collective and, like any fault in the loop (issue 8),
    # saves the last completed step (6) before exiting; without that it would be the periodic one (4)
    assert state["step"] == 6
    assert not (tmp_path / "two" / "batchtopk_k4" / "sae_weights.safetensors").exists()
    # the rerun through the command line, under torchrun, continues from step 4
    args = ["-m", "sae_harvest.train", "fit", "--resume", "--quiet", "--store", str(store), "--out",
            str(tmp_path / "two"), "--site", "blocks.0.resid_pre", "--arch", "batchtopk", "--k", "4",
            "--d-sae", "64", "--batch-size", "256", "--device", "cpu",
            "--tokens", str(256 * 12), "--log-every", "4", "--checkpoint-every", "4"]
    r = torchrun(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(_weights(tmp_path / "one" / "batchtopk_k4"), _weights(tmp_path / "two" / "batchtopk_k4"),
                 rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "two" / "batchtopk_k4" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12]


def test_e2e_two_ranks_split_the_sequences(e2e_assets, tmp_path):
    """e2e and e2e+ds: each rank splices its half of every step's sequences; same SAE as one process
    (batchtopk too: a step here is one micro-batch, so the top-k is over the same tokens)."""
    runs = {"e2e-relu": dict(arch="relu", l1=(0.1,)), "e2e+ds-topk": dict(loss="e2e+ds", arch="topk", k=(8,)),
            "e2e-batchtopk": dict(arch="batchtopk", k=(8,))}
    configs = []
    for name, kw in runs.items():
        fit(_e2e_cfg(e2e_assets, tmp_path / "one" / name, tokens=8 * 32 * 6, **kw), progress=False)
        configs.append(_e2e_cfg(e2e_assets, tmp_path / "two" / name, tokens=8 * 32 * 6, **kw).to_dict())
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    r = torchrun(WORKER, str(tmp_path / "configs.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in runs:
        (sub,) = [p.name for p in (tmp_path / "one" / name).iterdir() if p.name != "checkpoint"]
        _assert_same(_weights(tmp_path / "one" / name / sub), _weights(tmp_path / "two" / name / sub),
                     rtol=1e-5, atol=1e-6)
        m1, m2 = ((tmp_path / side / name / sub / "metrics.jsonl").read_text().splitlines() for side in ("one", "two"))
        last1, last2 = json.loads(m1[-1]), json.loads(m2[-1])
        assert last2["kl"] == pytest.approx(last1["kl"], rel=1e-4)


def test_background_feed_keeps_order_and_raises():
    """The CUDA feed pins batches in a thread: items arrive in order, errors reach the trainer."""
    from sae_harvest.train.feeds import _background

    assert list(_background(iter(range(50)))) == list(range(50))

    def broken():
        yield 1
        raise OSError("shard unreadable")

    it = _background(broken())
    assert next(it) == 1
    with pytest.raises(OSError, match="unreadable"):
        next(it)
