"""--clt --shard-decoders under torchrun (gloo, 2 processes on 127.0.0.1): each rank holds a slice of
the CLT's source layers, and the run saves the same CLT as one process trained on the same batches."""
import itertools
import json
import random

import pytest
import torch
from click.testing import CliRunner

from sae_harvest import train
from sae_harvest.train.clt_shard import CLTShard, layer_costs, split_layers
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.cli import main as train_cli
from sae_harvest.train.errors import TrainError
from sae_harvest.train.fit import fit
from tests.test_clt import N_LAYERS, _cfg, planted_clt_store
from tests.test_distributed import WORKER, _assert_same, torchrun


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The planted CLT store of tests/test_clt.py, built for this module."""
    return planted_clt_store(tmp_path_factory.mktemp("clt") / "s.zarr")


ARCHS = {"topk": dict(arch="topk", k=(4,)), "jumprelu": dict(arch="jumprelu", k=(32,), l1=(0.01,))}


def _run_cfg(path, out, **kw):
    return _cfg(path, out, tokens=256 * 12, log_every=4, checkpoint_every=4, lr=1e-3, **kw)


def test_split_layers_is_the_best_contiguous_split():
    """Against brute force over every set of cut points."""
    rng = random.Random(3)
    for _ in range(40):
        n, parts = rng.randint(1, 8), rng.randint(1, 4)
        costs = [rng.randint(1, 50) for _ in range(n)]
        if parts > n:
            with pytest.raises(TrainError, match="cannot be split over"):
                split_layers(costs, parts)
            continue
        got = split_layers(costs, parts)
        assert [layer for sl in got for layer in sl] == list(range(n)) and all(len(sl) for sl in got)
        best = min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
                   for cuts in itertools.combinations(range(1, n), parts - 1))
        assert max(sum(costs[sl.start:sl.stop]) for sl in got) == best
    # GPT-2 small, F = 8192 on 2 ranks: layers 0-3 (the longest decoders) against 4-11
    assert [(sl.start, sl.stop) for sl in split_layers(layer_costs(12, 768, 8192, False), 2)] == [(0, 4), (4, 12)]


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_slices_parts_sum_to_the_whole_clts_error_and_gradients(arch):
    """Without torch.distributed: the parts of two slices add up to y^ - y of the whole CLT, and a
    one-slice shard's loss and gradients are the CLT's own (autograd on the unsharded module)."""
    torch.manual_seed(0)
    n, d, f = 3, 8, 16
    clt = make_sae(SAEConfig(arch=arch, d_in=n * d, d_sae=n * f, k=4, clt_layers=n, l1_coeff=0.01))
    x, y = torch.randn(32, n * d), torch.randn(32, n * d)
    halves = [CLTShard(clt, range(0, 1), 0, 2), CLTShard(clt, range(1, n), 1, 2)]
    parts = [h.part(x[:, h.layers.start * d:h.layers.stop * d], y[:, h.layers.start * d:h.layers.stop * d])[0]
             for h in halves]
    torch.testing.assert_close((parts[0] + parts[1]).flatten(1), clt(x) - y, rtol=1e-5, atol=1e-5)
    whole = CLTShard(clt, range(n), 0, 1)
    a, b = clt.loss(x, target=y), whole.loss(x, y)
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    for name, p in whole.named_parameters():
        torch.testing.assert_close(p.grad, getattr(clt, name).grad, msg=name)


def test_sharded_two_ranks_train_the_same_clt_as_one_process(store, tmp_path):  # noqa: F811
    path, _ = store
    configs = []
    for name, kw in ARCHS.items():
        fit(_run_cfg(path, tmp_path / "one" / name, **kw), progress=False)
        configs.append(_run_cfg(path, tmp_path / "two" / name, shard_decoders=True, **kw).to_dict())
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    r = torchrun(WORKER, str(tmp_path / "configs.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ARCHS:
        (sub,) = [p.name for p in (tmp_path / "one" / name).iterdir() if p.name != "checkpoint"]
        one, two = tmp_path / "one" / name / sub, tmp_path / "two" / name / sub
        # one file, loaded by load_sae, the same weights up to float summation order (a missing
        # or doubled term of the all-reduce shows up at 1e-2 and above)
        _assert_same(train.load_sae(one).state_dict(), train.load_sae(two).state_dict(), rtol=1e-5, atol=1e-6)
        assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
        c1, c2 = (json.loads((f / "cfg.json").read_text()) for f in (one, two))
        assert {k: v for k, v in c1.items() if k != "sae_harvest"} == {k: v for k, v in c2.items() if k != "sae_harvest"}
        assert all(c1["sae_harvest"][k] == c2["sae_harvest"][k] for k in ("sites", "targets", "init", "sweep_name"))
        s1, s2 = (json.loads((f / "summary.json").read_text()) for f in (one, two))
        assert s2["world_size"] == 2 and s2["shard_decoders"] and not s1["shard_decoders"]
        assert s2["held_out"]["held_out_tokens"] == s1["held_out"]["held_out_tokens"]
        for k in ("nmse", "explained_variance", "l0", "dead_fraction"):
            assert s2["held_out"][k] == pytest.approx(s1["held_out"][k], rel=1e-4, abs=1e-6), k
        for t, v in s1["held_out"]["per_layer"].items():
            assert s2["held_out"]["per_layer"][t]["nmse"] == pytest.approx(v["nmse"], rel=1e-4)
        # what each rank held: a slice of the layers, about half the parameters, Adam's two moments of them
        ranks = s2["shards"]
        assert [r["layers"] for r in ranks] == [[0, 1], [1, N_LAYERS]]
        assert sum(r["parameters"] for r in ranks) == s1["parameters"] == s2["parameters"]
        assert max(r["parameters"] for r in ranks) < 0.6 * s1["parameters"]
        assert all(r["adam_state"] == 2 * r["parameters"] for r in ranks)
        m1, m2 = ([json.loads(x) for x in (f / "metrics.jsonl").read_text().splitlines()] for f in (one, two))
        assert [m["step"] for m in m2] == [4, 8, 12]
        for a, b in zip(m1, m2):
            assert a.keys() == b.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (name, k)
        # every rank checkpoints its own slice; one process cannot resume it
        assert (tmp_path / "two" / name / "checkpoint" / "rank1" / "state.json").exists()
        with pytest.raises(TrainError, match="--shard-decoders on 2 ranks"):
            fit(_run_cfg(path, tmp_path / "two" / name, shard_decoders=True, **ARCHS[name]), resume=True, progress=False)
        # ranks' checkpoints at two steps (a rank died while saving) make no CLT: refused
        meta = tmp_path / "two" / name / "checkpoint" / "rank1" / "state.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "step": 8}))
        with pytest.raises(TrainError, match="steps 8, 12"):
            fit(_run_cfg(path, tmp_path / "two" / name, shard_decoders=True, **ARCHS[name]), resume=True, progress=False)


def test_shard_decoders_needs_clt(store, tmp_path):  # noqa: F811
    path, _ = store
    out = tmp_path / "o"
    r = CliRunner().invoke(train_cli, ["fit", "--store", str(path), "--site", "blocks.0.mlp_in", "--out", str(out),
                                       "--shard-decoders", "--device", "cpu"])
    assert r.exit_code == 2 and "--shard-decoders" in r.output and "--clt" in r.output, r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1 and "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.slow   # two torchrun jobs: ~40 s on the 2-core box
def test_sharded_run_killed_and_resumed_equals_one_process(store, tmp_path):  # noqa: F811
    """A rank killed at step 6 ends the job; both ranks' step-4 checkpoints resume it, sharded, to
    the one-process CLT."""
    path, _ = store
    fit(_run_cfg(path, tmp_path / "one", **ARCHS["topk"]), progress=False)
    cfg = _run_cfg(path, tmp_path / "two", shard_decoders=True, **ARCHS["topk"])
    (tmp_path / "configs.json").write_text(json.dumps([cfg.to_dict()]))
    r = torchrun(WORKER, str(tmp_path / "configs.json"), "--kill-rank", "1", "--kill-step", "6", timeout=120)
    assert r.returncode != 0
    steps = {json.loads((tmp_path / "two" / "checkpoint" / f"rank{k}" / "state.json").read_text())["step"]
             for k in (0, 1)}
    assert steps == {4}
    r = torchrun("-m", "sae_harvest.train", "fit", "--store", str(path), "--out", str(tmp_path / "two"),
                 "--site", cfg.site, "--target", cfg.target, "--clt", "--arch", "topk", "--k", "4", "--d-sae", "32",
                 "--batch-size", "256", "--tokens", str(256 * 12), "--lr", "1e-3", "--log-every", "4",
                 "--checkpoint-every", "4", "--device", "cpu", "--shard-decoders", "--resume", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    (sub,) = [p.name for p in (tmp_path / "one").iterdir() if p.name != "checkpoint"]
    _assert_same(train.load_sae(tmp_path / "one" / sub).state_dict(),
                 train.load_sae(tmp_path / "two" / sub).state_dict(), rtol=1e-5, atol=1e-6)
