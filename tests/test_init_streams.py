"""Issue 22 item 1: every SAE draws its initial weights from a stream of its own (seed + identity),
so SAEs of different sizes or swept values never start from the same rows; stitch / meta / geometry
refuse a pair whose cfg.json says it shares its initialisation."""
import json

import pytest
import torch
from click.testing import CliRunner

from sae_harvest.evaluate.cli import main as evaluate_cli
from sae_harvest.train.fit import fit
from sae_harvest.train.init_streams import checkpoint_stream, shared_init
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_io import load_sae, save_sae
from tests.test_train_loop import _cfg, make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "s.zarr"
    make_store(path, grads=False)
    return path


def _unit_rows(sae):
    w = sae.W_dec.detach().float()
    return w / w.norm(dim=-1, keepdim=True)


def _fit(store, out, **kw):
    # 2 steps: the "2-step SAE" (a short run keeps the initial rows almost as they were)
    fit(_cfg(store, out, tokens=512, **kw), progress=False)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("init_runs")
    _fit(store, root / "small", d_sae=64, k=(4,))
    _fit(store, root / "large", d_sae=128, k=(4,))
    _fit(store, root / "sweep", d_sae=64, k=(4, 8))
    _fit(store, root / "again", d_sae=64, k=(4,))
    return root


def test_saes_of_different_sizes_and_sweep_values_start_independent(trained):
    """The issue's symptom: with the bare seed, large row i kept decoder cosine 0.96-0.99 with
    small row i after a 2-step run (every pair of rows here did on the code before the fix)."""
    small = _unit_rows(load_sae(trained / "small" / "topk_k4"))
    large = _unit_rows(load_sae(trained / "large" / "topk_k4"))
    same_index = (small * large[:64]).sum(-1)
    assert same_index.abs().max() < 0.8, same_index.abs().max()
    assert same_index.abs().mean() < 0.4
    k4, k8 = (_unit_rows(load_sae(trained / "sweep" / n)) for n in ("topk_k4", "topk_k8"))
    assert (k4 * k8).sum(-1).abs().mean() < 0.4
    # no stitching by index: the large SAE's latents match small latents by index no more than chance
    best = (large[:64] @ small.T).argmax(-1)
    assert (best == torch.arange(64)).sum() < 8


def test_the_seed_still_makes_a_run_reproducible(trained, store, tmp_path):
    a, b = load_sae(trained / "small" / "topk_k4"), load_sae(trained / "again" / "topk_k4")
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)
    # the k4 SAE of a sweep is the same SAE as a run of k4 alone (same identity, same batches)
    assert torch.equal(load_sae(trained / "sweep" / "topk_k4").W_dec, a.W_dec)
    _fit(store, tmp_path / "seed1", d_sae=64, k=(4,), seed=1)
    other = _unit_rows(load_sae(tmp_path / "seed1" / "topk_k4"))
    assert (other * _unit_rows(a)).sum(-1).abs().mean() < 0.4
    rec = json.loads((trained / "small" / "topk_k4" / "cfg.json").read_text())["sae_harvest"]["init"]
    assert rec["scheme"] == "seed+identity" and rec["seed"] == 0
    assert rec["identity"] == {"arch": "topk", "site": "blocks.0.resid_pre", "d_in": 16, "d_sae": 64, "k": 4,
                               "l1_coeff": 0.0}
    assert checkpoint_stream(trained / "small" / "topk_k4") == rec["stream"]
    assert checkpoint_stream(trained / "again" / "topk_k4") == rec["stream"]
    assert checkpoint_stream(trained / "large" / "topk_k4") != rec["stream"]


def test_init_from_a_checkpoint_records_the_parents_stream(trained, store, tmp_path):
    parent = trained / "small" / "topk_k4"
    _fit(store, tmp_path / "child", d_sae=64, k=(4,), init=str(parent))
    rec = json.loads((tmp_path / "child" / "topk_k4" / "cfg.json").read_text())["sae_harvest"]["init"]
    assert rec["scheme"] == "checkpoint" and rec["stream"] == checkpoint_stream(parent)
    assert shared_init(parent, tmp_path / "child" / "topk_k4")


def _legacy(path, d_sae, seed=0, hook="blocks.1.resid_pre", **extra):
    """A checkpoint as the code before this fix wrote it: torch.manual_seed(seed), then the SAE."""
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig("topk", 64, d_sae, k=4))
    save_sae(sae, path, extra_cfg={"hook_name": hook, "training": {"seed": seed}, **extra})
    return str(path)


def test_legacy_checkpoints_with_one_seed_share_their_leading_rows(tmp_path):
    """Documents the old behaviour the detector relies on, and the detector's rules."""
    a, b = _legacy(tmp_path / "a", 32), _legacy(tmp_path / "b", 96)
    wa, wb = load_sae(a).W_dec, load_sae(b).W_dec
    assert torch.allclose(wa, wb[:32])                        # the same first 32 rows
    assert "first 32 decoder rows" in shared_init(a, b)
    assert shared_init(a, _legacy(tmp_path / "c", 96, seed=1)) is None
    foreign = tmp_path / "d"                                  # no recorded seed: unknown, not refused
    save_sae(make_sae(SAEConfig("topk", 64, 96, k=4)), foreign, extra_cfg={"hook_name": "blocks.1.resid_pre"})
    assert shared_init(a, foreign) is None


def _one_line_refusal(r, *unwritten):
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("error:") and "share their initialisation" in r.output, r.output
    assert "--allow-shared-init" in r.output and "Traceback" not in r.output
    for path in unwritten:
        assert not path.exists()


def test_stitch_meta_geometry_refuse_a_shared_init_pair(tmp_path):
    small, large = _legacy(tmp_path / "small", 32), _legacy(tmp_path / "large", 96)
    meta = _legacy(tmp_path / "meta", 8, hook=f"meta:{small}", decoder_of=small)
    out = tmp_path / "out.json"
    runs = {
        "stitch": ["stitch", "--small", small, "--large", large, "--model", "nonexistent-model", "--tokens", "8"],
        "meta": ["meta", "--sae", small, "--meta", meta, "--device", "cpu"],
        "geometry": ["geometry", "--sae", small, "--sae", large, "--device", "cpu"],
    }
    for name, args in runs.items():
        r = CliRunner().invoke(evaluate_cli, args + ["--json", str(out)])
        _one_line_refusal(r, out)
    # --allow-shared-init lets the pair through (meta and geometry need nothing else)
    for name in ("meta", "geometry"):
        r = CliRunner().invoke(evaluate_cli, runs[name] + ["--allow-shared-init", "--json", str(out)])
        assert r.exit_code == 0, r.output
        assert json.loads(out.read_text())["config"]["allow_shared_init"] is True
        out.unlink()
    # stitch gets past the check to the model (which does not exist here)
    r = CliRunner().invoke(evaluate_cli, runs["stitch"] + ["--allow-shared-init"])
    assert r.exit_code == 2 and "share their initialisation" not in r.output


def test_trained_pairs_of_different_sizes_pass_and_reruns_are_refused(trained, tmp_path):
    small, large = str(trained / "small" / "topk_k4"), str(trained / "large" / "topk_k4")
    r = CliRunner().invoke(evaluate_cli, ["geometry", "--sae", small, "--sae", large, "--device", "cpu"])
    assert r.exit_code == 0, r.output
    again = str(trained / "again" / "topk_k4")
    r = CliRunner().invoke(evaluate_cli, ["geometry", "--sae", small, "--sae", again, "--device", "cpu"])
    _one_line_refusal(r)
