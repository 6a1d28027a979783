"""The one artifact JSON writer (stores/artifacts.py) and the analyses' JSON (`evaluate stitch`,
`evaluate geometry`, `evaluate meta`): no credential from a store URL reaches a file (issue 17)."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

from sae_harvest.evaluate.cli import main as evaluate_cli
from sae_harvest.stores.artifacts import artifact_json, write_artifact
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_io import save_sae
from tests.test_security import no_secret_in
from tests.tiny_models import D_MODEL, make_tiny_model, write_corpus

URL = "memory://alice:S3CRET@bucket/a.zarr?token=hf_SECRET"
SCRUBBED = "memory://bucket/a.zarr?token=***"
SITE = "blocks.0.resid_pre"


def test_writer_scrubs_every_string_and_refuses_nan(tmp_path):
    doc = {"config": {"store": URL, "saes": ("s3://k:S3CRET@b/x", "local/path")}, "rows": [{"sae": URL}],
           "text": f"loaded from {URL} at step 3", "n": 3, "ok": None}
    path = tmp_path / "sub" / "d.json"
    write_artifact(path, doc)
    text = path.read_text()
    no_secret_in(text)
    back = json.loads(text)
    assert back["config"] == {"store": SCRUBBED, "saes": ["s3://b/x", "local/path"]}
    assert back["rows"] == [{"sae": SCRUBBED}] and back["text"] == f"loaded from {SCRUBBED} at step 3"
    assert (back["n"], back["ok"]) == (3, None)
    assert [p.name for p in path.parent.iterdir()] == ["d.json"]   # no temporary left behind
    with pytest.raises(ValueError):
        write_artifact(path, {"x": math.nan})
    assert json.loads(path.read_text()) == back                      # the old file is untouched
    assert json.loads(artifact_json({"x": math.nan}, allow_nan=True, indent=None).replace("NaN", "null")) == {"x": None}


@pytest.fixture(scope="module")
def url_store(tmp_path_factory):
    """A tiny harvest written to a memory:// URL that carries a password and a token."""
    import fsspec

    from sae_harvest.harvest.run import HarvestConfig, harvest

    root = tmp_path_factory.mktemp("artifacts")
    model = make_tiny_model("gpt2", root / "gpt2")
    corpus = write_corpus(root / "docs.jsonl", n_docs=80, max_words=40)
    harvest(HarvestConfig(out=URL, model=model, dataset=str(corpus), sites=SITE, tokens=1024, ctx_len=16,
                          batch_size=8, shuffle_window=256, device="cpu"), progress=False)
    torch.manual_seed(0)
    paths = []
    for name, d_sae in (("small", 32), ("large", 64)):
        save_sae(make_sae(SAEConfig("topk", D_MODEL, d_sae, k=4)), root / name, extra_cfg={"hook_name": SITE})
        paths.append(str(root / name))
    yield {"model": model, "saes": paths, "root": root}
    fsspec.filesystem("memory").rm("/", recursive=True)


def _invoke(*args):
    r = CliRunner().invoke(evaluate_cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    no_secret_in(r.output)


def test_stitch_and_geometry_json_hold_no_credential(url_store, tmp_path):
    small, large = url_store["saes"]
    _invoke("stitch", "--small", small, "--large", large, "--store", URL, "--model", url_store["model"],
            "--tokens", 64, "--ce-points", 2, "--device", "cpu", "--quiet", "--json", tmp_path / "s.json")
    _invoke("geometry", "--sae", small, "--sae", large, "--store", URL, "--device", "cpu",
            "--json", tmp_path / "g.json")
    for name in ("s.json", "g.json"):
        text = (tmp_path / name).read_text()
        no_secret_in(text)
        assert json.loads(text)["config"]["store"] == SCRUBBED


def test_meta_json_goes_through_the_writer(url_store, tmp_path):
    """A meta-SAE whose cfg.json names a credentialed source (a hand-edited or foreign file):
    the report's JSON still holds none."""
    from sae_harvest.train.sae_io import CFG_NAME

    small = url_store["saes"][0]
    meta = make_sae(SAEConfig("batchtopk", D_MODEL, 8, k=2))
    save_sae(meta, tmp_path / "meta", extra_cfg={"hook_name": f"meta:{small}", "decoder_of": small})
    cfg_path = tmp_path / "meta" / CFG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("sae_harvest", {})["decoder_of"] = URL   # save_sae scrubs; a foreign file need not
    cfg_path.write_text(json.dumps(cfg))
    _invoke("meta", "--sae", small, "--meta", tmp_path / "meta", "--samples", 2, "--device", "cpu",
            "--json", tmp_path / "m.json")
    no_secret_in((tmp_path / "m.json").read_text())
