"""Issue 22 item 3: --sites is checked against the model's config before anything slow (building
the offline default model, loading weights), and the default site is the given model's middle layer."""
import json

import pytest
from click.testing import CliRunner

from sae_harvest.harvest import run as harvest_run
from sae_harvest.harvest.cli import main as harvest_cli
from sae_harvest.harvest.default_model import N_LAYER, default_model_dir
from sae_harvest.harvest.preflight import default_site, model_layers, resolve_sites
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.stores import open_store
from tests.tiny_models import N_LAYERS, make_tiny_model, write_corpus


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    return {"gpt2": make_tiny_model("gpt2", root / "gpt2"), "gemma3": make_tiny_model("gemma3", root / "gemma3"),
            "corpus": write_corpus(root / "docs.jsonl", n_docs=60, max_words=40)}


@pytest.fixture
def nothing_slow(monkeypatch):
    """Building the offline default or loading any weights fails the test."""
    def slow(*a, **k):
        raise AssertionError("a model was built or loaded before the sites were checked")
    monkeypatch.setattr(harvest_run, "resolve_model", slow)
    monkeypatch.setattr(harvest_run, "load_model", slow)


def test_layer_counts_from_the_config_alone(assets, nothing_slow):
    assert model_layers(assets["gpt2"]) == N_LAYERS
    assert model_layers(assets["gemma3"]) == N_LAYERS          # multimodal config: its text config's layers
    assert model_layers("stdlib-gpt2") == N_LAYER
    assert default_site(12) == "blocks.6.resid_pre" and default_site(N_LAYER) == "blocks.2.resid_pre"
    cfg = resolve_sites(HarvestConfig(out="unused", model="stdlib-gpt2"))
    assert cfg.sites == f"blocks.{N_LAYER // 2}.resid_pre"


def test_the_offline_default_recipe_has_the_layers_preflight_assumes():
    config = default_model_dir() / "config.json"
    if not config.exists():
        pytest.skip("the offline default model is not built on this machine")
    assert json.loads(config.read_text())["n_layer"] == N_LAYER


def test_out_of_range_site_refused_before_any_model_is_built(assets, tmp_path, nothing_slow):
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(harvest_cli, ["run", "--model", "stdlib-gpt2", "--dataset", assets["corpus"],
                                         "--sites", "blocks.6.resid_pre", "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [r.output.strip()] and "layer 6 out of range" in r.output
    assert "4 layers" in r.output and not out.exists()


def test_default_site_harvests_the_middle_layer(assets, tmp_path):
    out = tmp_path / "s.zarr"
    harvest(HarvestConfig(out=str(out), model=assets["gpt2"], dataset=assets["corpus"], tokens=256, ctx_len=16,
                          batch_size=4, shuffle_window=128, device="cpu"), progress=False)
    store = open_store(str(out))
    assert store.sites == [f"blocks.{N_LAYERS // 2}.resid_pre"]
    assert store.attrs["harvest"]["sites"] == f"blocks.{N_LAYERS // 2}.resid_pre"   # what a resume compares


def test_help_says_what_the_default_site_is():
    r = CliRunner().invoke(harvest_cli, ["run", "--help"])
    assert "n_layers//2" in " ".join(r.output.split()).replace("// ", "//")
