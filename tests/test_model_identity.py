"""The model an evaluation or e2e run reads a store through is the one that harvested it: a store
names its model as typed (`gpt2`: a folder relative to where the harvest ran), so from another
folder the same name is another model. Such a model is refused unless the user named it (--model),
and an SAE trained on another model's activations is refused where nobody chose to carry it over."""
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

from sae_harvest.evaluate.cli import main as evaluate_cli
from sae_harvest.harvest.models import load_model
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.stores import open_store
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.errors import TrainError
from sae_harvest.train.fit import fit
from tests.tiny_models import make_tiny_model, write_corpus

SITE = "blocks.1.resid_pre"


def _harvest(out, model, corpus):
    harvest(HarvestConfig(out=str(out), model=model, dataset=str(corpus), sites=SITE, tokens=2048, ctx_len=32,
                          batch_size=16, shuffle_window=512, device="cpu"), progress=False)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """here/gpt2 harvested as the relative name "gpt2" into store.zarr; there/gpt2, the same
    architecture with other weights, harvested into other.zarr; an SAE trained on each store."""
    root = tmp_path_factory.mktemp("model_identity")
    corpus = write_corpus(root / "docs.jsonl", n_docs=200, max_words=60)
    make_tiny_model("gpt2", root / "here" / "gpt2")
    shutil.copytree(root / "here" / "gpt2", root / "there" / "gpt2")
    model, _ = load_model(str(root / "there" / "gpt2"))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "there" / "gpt2")
    cwd = os.getcwd()
    try:
        os.chdir(root / "here")
        _harvest(root / "store.zarr", "gpt2", corpus)       # recorded as "gpt2", relative
    finally:
        os.chdir(cwd)
    _harvest(root / "other.zarr", str(root / "there" / "gpt2"), corpus)
    for store, out in (("store.zarr", "sae_here"), ("other.zarr", "sae_there")):
        fit(TrainConfig(store=str(root / store), out=str(root / out), site=SITE, arch="topk", k=(4,), d_sae=64,
                        batch_size=256, device="cpu", checkpoint_every=10**6), progress=False)
    return root


def _splice(root, sae, *extra):
    return CliRunner().invoke(evaluate_cli, ["splice", "--sae", str(root / sae / "topk_k4"), "--store",
                                             str(root / "store.zarr"), "--tokens", "64", "--device", "cpu", "--quiet",
                                             "--json", str(root / f"r-{len(extra)}-{sae}.json"), *extra])


def test_a_store_named_model_found_elsewhere_is_refused(two_models, monkeypatch):
    monkeypatch.chdir(two_models / "here")      # where the harvest ran: the same model
    ok = _splice(two_models, "sae_here")
    assert ok.exit_code == 0, ok.output
    row = json.loads((two_models / "r-0-sae_here.json").read_text())["results"][0]
    assert row["model_matches_store"] is True and row["trained_model"]["matches"] is True
    monkeypatch.chdir(two_models / "there")     # "gpt2" is now another model
    bad = _splice(two_models, "sae_here")
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "is not the model that harvested store" in bad.output and "--model" in bad.output


def test_a_model_the_user_names_is_used_with_a_warning_and_recorded(two_models, monkeypatch):
    monkeypatch.chdir(two_models / "here")
    res = _splice(two_models, "sae_here", "--model", str(two_models / "there" / "gpt2"))
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "is not the model that harvested store" in res.output
    row = json.loads((two_models / "r-2-sae_here.json").read_text())["results"][0]
    assert row["model_matches_store"] is False and row["trained_model"]["matches"] is False


def test_an_sae_of_another_model_is_refused_by_splice_and_flagged_by_geometry(two_models, monkeypatch):
    monkeypatch.chdir(two_models / "here")
    res = _splice(two_models, "sae_there")
    assert res.exit_code == 2 and "was trained on another model's activations" in res.output
    # geometry reads the store's own rows, named by the user with the SAE: it says so, and goes on
    geo = CliRunner().invoke(evaluate_cli, ["geometry", "--sae", str(two_models / "sae_there" / "topk_k4"),
                                            "--store", str(two_models / "store.zarr"), "--device", "cpu",
                                            "--json", str(two_models / "geo.json")])
    assert geo.exit_code == 0 and "warning:" in geo.output and "was trained on another model's activations" in geo.output


def test_e2e_refuses_a_store_named_model_found_elsewhere(two_models, monkeypatch):
    monkeypatch.chdir(two_models / "there")
    cfg = TrainConfig(store=str(two_models / "store.zarr"), out=str(two_models / "e2e"), site=SITE, arch="relu",
                      l1=(1.0,), d_sae=32, batch_size=64, tokens=256, device="cpu", loss="e2e")
    with pytest.raises(TrainError, match="is not the model that harvested store"):
        fit(cfg, progress=False)
    monkeypatch.chdir(two_models / "here")
    fit(cfg, progress=False)
    saved = json.loads((two_models / "e2e" / "relu_l1-1" / "cfg.json").read_text())["sae_harvest"]
    assert saved["model_matches_store"] is True and len(saved["model_digest"]) == 32


def test_an_sae_records_its_models_fingerprint_so_the_check_needs_no_training_store(two_models, tmp_path):
    saved = json.loads((two_models / "sae_there" / "topk_k4" / "cfg.json").read_text())
    other = open_store(str(two_models / "other.zarr")).attrs
    assert saved["sae_harvest"]["model_digest"] == other["provenance"]["model"]["digest"]
    moved = tmp_path / "moved" / "topk_k4"          # its training store no longer readable
    shutil.copytree(two_models / "sae_there" / "topk_k4", moved)
    saved["sae_harvest"]["store"] = str(tmp_path / "gone.zarr")
    (moved / "cfg.json").write_text(json.dumps(saved))
    geo = CliRunner().invoke(evaluate_cli, ["geometry", "--sae", str(moved), "--store", str(two_models / "store.zarr"),
                                            "--device", "cpu", "--json", str(tmp_path / "geo.json")])
    assert geo.exit_code == 0 and "was trained on another model's activations" in geo.output
