"""`train fit --sweep-parallel` under torchrun (gloo, 2 processes on 127.0.0.1): the sweep's SAEs
dealt over the ranks, each trained on every whole batch exactly as one process trains it."""
import json
from pathlib import Path

import pytest
import torch

from sae_harvest import train
from sae_harvest.stores.errors import UserError
from sae_harvest.train.fit import fit
from tests.test_distributed import WORKER, torchrun
from tests.test_e2e import _cfg as _e2e_cfg
from tests.test_train_loop import _cfg

# uneven on purpose: batchtopk's 3 SAEs give rank 0 two of them (k4, k16) and rank 1 one (k8)
SWEEPS = {"batchtopk": dict(arch="batchtopk", k=(4, 8, 16)), "relu": dict(arch="relu", l1=(0.5, 2.0))}
KW = dict(tokens=256 * 12, log_every=4, checkpoint_every=4)


def _bitwise_same(one: Path, two: Path):
    a, b = train.load_sae(one).state_dict(), train.load_sae(two).state_dict()
    assert a.keys() == b.keys()
    for name in a:   # no reduction anywhere: the very same floating-point operations
        assert torch.equal(a[name], b[name]), (one.name, name, (a[name] - b[name]).abs().max())


def _records(folder: Path):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_each_rank_trains_its_share_of_the_sweep_like_one_process(store, e2e_assets, tmp_path):
    configs = []
    for name, kw in SWEEPS.items():
        fit(_cfg(store, tmp_path / "one" / name, **KW, **kw), progress=False)
        configs.append(_cfg(store, tmp_path / "two" / name, sweep_parallel=True, **KW, **kw).to_dict())
    e2e = dict(arch="topk", k=(4, 8), tokens=8 * 32 * 6)
    fit(_e2e_cfg(e2e_assets, tmp_path / "one" / "e2e", **e2e), progress=False)
    configs.append(_e2e_cfg(e2e_assets, tmp_path / "two" / "e2e", sweep_parallel=True, **e2e).to_dict())
    # one SAE for two ranks: refused on every rank before anything is written
    configs.append(_cfg(store, tmp_path / "two" / "lonely", sweep_parallel=True, **KW).to_dict())
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    r = torchrun(WORKER, str(tmp_path / "configs.json"), "--results", str(tmp_path / "results.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())

    for (sweep, owners, steps), result in zip(
            [("batchtopk", {"batchtopk_k4": 0, "batchtopk_k8": 1, "batchtopk_k16": 0}, 12),
             ("relu", {"relu_l1-0.5": 0, "relu_l1-2": 1}, 12), ("e2e", {"topk_k4": 0, "topk_k8": 1}, 6)], results):
        one, two = tmp_path / "one" / sweep, tmp_path / "two" / sweep
        # rank 0 returns every SAE's summary, in sweep order, gathered from both ranks
        assert list(result["summaries"]) == list(owners)
        for name, rank in owners.items():
            _bitwise_same(one / name, two / name)
            assert _records(one / name) == _records(two / name)   # each rank logs its own, exactly
            cfg = json.loads((two / name / "cfg.json").read_text())["sae_harvest"]
            summary = json.loads((two / name / "summary.json").read_text())
            for record in (cfg, summary, result["summaries"][name]):
                assert (record["world_size"], record["sweep_parallel"], record["rank"]) == (2, True, rank)
            assert cfg["training"]["sweep_parallel"] is True
            single = json.loads((one / name / "summary.json").read_text())
            assert (single["sweep_parallel"], single["rank"]) == (False, None)
            assert summary["held_out"] == single["held_out"]
        # each rank checkpoints its own SAEs in its own folder: no file is written by two ranks
        for rank in (0, 1):
            state = json.loads((two / "checkpoint" / f"rank{rank}" / "state.json").read_text())
            mine = [name for name, r in owners.items() if r == rank]
            assert state["runs"] == mine and state["world_size"] == 2 and state["step"] == steps
            assert sorted(p.name for p in (two / "checkpoint" / f"rank{rank}").iterdir()) == \
                sorted([f"{name}.safetensors" for name in mine] + ["state.json"])
        assert not (two / "checkpoint" / "state.json").exists()

    assert results[3] == {"error": "--sweep-parallel deals the sweep's 1 SAE over 2 ranks, so some rank would "
                                   "idle: launch at most 1 rank, or train data parallel (without --sweep-parallel)"}
    assert not (tmp_path / "two" / "lonely").exists()

    # a sweep-parallel checkpoint resumes only the way it was saved: one process is refused, nothing changes
    before = (tmp_path / "two" / "relu" / "relu_l1-2" / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="saved with --sweep-parallel on 2 ranks: resume the same way"):
        fit(_cfg(store, tmp_path / "two" / "relu", sweep_parallel=True, **KW, **SWEEPS["relu"]), resume=True,
            progress=False)
    assert (tmp_path / "two" / "relu" / "relu_l1-2" / "metrics.jsonl").read_text() == before


def test_sweep_parallel_without_torchrun_changes_nothing(store, tmp_path):
    kw = dict(tokens=256 * 4, log_every=2, arch="topk", k=(4, 8))
    a = fit(_cfg(store, tmp_path / "a", **kw), progress=False)
    b = fit(_cfg(store, tmp_path / "b", sweep_parallel=True, **kw), progress=False)
    assert list(a) == list(b) == ["topk_k4", "topk_k8"]
    for name in a:
        _bitwise_same(tmp_path / "a" / name, tmp_path / "b" / name)
        assert b[name]["sweep_parallel"] is False and b[name]["world_size"] == 1
    assert (tmp_path / "b" / "checkpoint" / "state.json").exists()


@pytest.mark.slow   # two torchrun jobs
def test_killed_rank_ends_the_job_and_each_rank_resumes_its_own_sae(store, tmp_path):
    kw = dict(arch="batchtopk", k=(4, 8), **KW)
    fit(_cfg(store, tmp_path / "one", **kw), progress=False)
    cfg = _cfg(store, tmp_path / "two", sweep_parallel=True, **kw)
    (tmp_path / "configs.json").write_text(json.dumps([cfg.to_dict()]))
    r = torchrun(WORKER, str(tmp_path / "configs.json"), "--kill-rank", "1", "--kill-step", "6", timeout=120)
    assert r.returncode != 0
    # rank 1 died without saving: its periodic checkpoint (step 4) is what is left of it
    state = json.loads((tmp_path / "two" / "checkpoint" / "rank1" / "state.json").read_text())
    assert state["step"] == 4 and state["runs"] == ["batchtopk_k8"]
    assert not (tmp_path / "two" / "batchtopk_k8" / "sae_weights.safetensors").exists()
    # rank 0 went on alone (nothing ties its steps to rank 1's) until torchrun stopped it
    assert json.loads((tmp_path / "two" / "checkpoint" / "rank0" / "state.json").read_text())["step"] >= 4
    args = ["-m", "sae_harvest.train", "fit", "--resume", "--quiet", "--sweep-parallel", "--store", str(store),
            "--out", str(tmp_path / "two"), "--site", "blocks.0.resid_pre", "--arch", "batchtopk", "--k", "4,8",
            "--d-sae", "64", "--batch-size", "256", "--device", "cpu",
            "--tokens", str(256 * 12), "--log-every", "4", "--checkpoint-every", "4"]
    r = torchrun(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert sorted(map(list, printed)) == [[], ["batchtopk_k4", "batchtopk_k8"]]   # rank 0 prints the sweep
    for name in ("batchtopk_k4", "batchtopk_k8"):
        _bitwise_same(tmp_path / "one" / name, tmp_path / "two" / name)
        assert [m["step"] for m in _records(tmp_path / "two" / name)] == [4, 8, 12]
