"""Hardening (issue 8): no credential in any file or output line, no pickle, hostile files and odd
inputs refused with one `error:` line (exit 2) that leaves what is on disk unchanged."""
import hashlib
import json
import os
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from sae_harvest.stores.urls import scrub, scrub_text
from sae_harvest.train.cli import main as train_cli
from tests.test_train_loop import make_store
from tests.tiny_models import make_tiny_model, write_corpus

SECRETS = ("S3CRET", "hf_SECRET", "AMZSIG", "AKIAID", "SASSIG", "GOOGSIG", "PW0RD")


# ---- helpers ----------------------------------------------------------------------------------
def tree_hash(root) -> dict:
    """{relative path: sha256} of every file under root (or of root itself)."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root) if p != root else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def one_error_line(result, *needles, code=2) -> str:
    text = result.output
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert result.exit_code == code, (result.exit_code, text, result.exception)
    assert "Traceback" not in text
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    for needle in needles:
        assert needle.lower() in lines[0].lower(), text
    return lines[0]


def no_secret_in(text: str):
    for s in SECRETS:
        assert s not in text, f"{s} leaked: {text[:2000]}"


def fit_cli(*args):
    return CliRunner().invoke(train_cli, ["fit", *map(str, args)])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("sec") / "s.zarr"
    make_store(path)
    return path


FIT = ("--site", "blocks.0.resid_pre", "--d-sae", "64", "--k", "4", "--batch-size", "256", "--device", "cpu")


# ---- 1. credentials ---------------------------------------------------------------------------
@pytest.mark.parametrize("url, expected", [
    # user:password in the netloc goes, wherever the URL points
    ("s3://AKIAID:S3CRET@bucket/run.zarr", "s3://bucket/run.zarr"),
    ("gs://user:S3CRET@bucket/a/b.zarr", "gs://bucket/a/b.zarr"),
    ("memory://alice:S3CRET@bucket/run.zarr", "memory://bucket/run.zarr"),
    ("https://hf_SECRET@huggingface.co/org/model", "https://huggingface.co/org/model"),
    ("http://alice:PW0RD@host:8080/x?y=1", "http://host:8080/x?y=1"),
    # Azure: container@account names a place and stays; a key after a colon goes
    ("abfs://container@account.dfs.core.windows.net/p/x.zarr", "abfs://container@account.dfs.core.windows.net/p/x.zarr"),
    ("az://data@acct.blob.core.windows.net/x", "az://data@acct.blob.core.windows.net/x"),
    ("abfss://container:S3CRET@account.dfs.core.windows.net/x", "abfss://container@account.dfs.core.windows.net/x"),
    # signed queries: secret values masked, keys and harmless values kept
    ("https://b.s3.amazonaws.com/k.zarr?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIAID%2F2024&X-Amz-Date=2024"
     "&X-Amz-Signature=AMZSIG&X-Amz-Security-Token=S3CRET",
     "https://b.s3.amazonaws.com/k.zarr?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Date=2024"
     "&X-Amz-Signature=***&X-Amz-Security-Token=***"),
    ("https://storage.googleapis.com/b/o?X-Goog-Signature=GOOGSIG&X-Goog-Credential=AKIAID&alt=media",
     "https://storage.googleapis.com/b/o?X-Goog-Signature=***&X-Goog-Credential=***&alt=media"),
    ("https://acct.blob.core.windows.net/c/x?sv=2022-11-02&se=2030&sp=rl&sig=SASSIG%3D",
     "https://acct.blob.core.windows.net/c/x?sv=***&se=***&sp=***&sig=***"),
    ("https://huggingface.co/api/x?token=hf_SECRET&revision=main", "https://huggingface.co/api/x?token=***&revision=main"),
    ("https://h/x?access_token=S3CRET&key=S3CRET&password=PW0RD&signature=S3CRET",
     "https://h/x?access_token=***&key=***&password=***&signature=***"),
    # nothing to scrub: unchanged
    ("s3://bucket/run.zarr", "s3://bucket/run.zarr"),
    ("file:///tmp/run.zarr", "file:///tmp/run.zarr"),
    ("/home/me/runs/a@b:c/run.zarr", "/home/me/runs/a@b:c/run.zarr"),
    ("relative/run.zarr", "relative/run.zarr"),
    ("gpt2", "gpt2"),
])
def test_scrub_url_shapes(url, expected):
    assert scrub(url) == expected
    assert scrub(expected) == expected    # idempotent
    no_secret_in(scrub_text(f"error: no store at '{url}'."))


def test_no_credential_in_any_file_or_output_line(store, tmp_path, monkeypatch):
    """train fit from a store whose URL carries a password and a token: cfg.json, state.json,
    metrics, summary, wandb config, stdout/stderr and error lines never hold them."""
    import fsspec

    url = "memory://alice:S3CRET@bucket/run.zarr?token=hf_SECRET"
    make_store(url)
    logged = {}
    fake_wandb = types.SimpleNamespace(init=lambda **kw: logged.update(kw) or types.SimpleNamespace(
        log=lambda *a, **k: None, finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    out = tmp_path / "o"
    r = fit_cli("--store", url, *FIT, "--tokens", 2560, "--checkpoint-every", 3, "--wandb", "proj",
                "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    no_secret_in(r.output)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {"cfg.json", "state.json", "metrics.jsonl", "summary.json"} <= {p.name for p in written}
    for p in written:
        no_secret_in(p.read_bytes().decode("latin-1"))
    assert json.loads((out / "topk_k4" / "cfg.json").read_text())["sae_harvest"]["store"] == \
        "memory://bucket/run.zarr?token=***"
    no_secret_in(json.dumps(logged["config"]))
    # an error line naming the URL
    one_error_line(fit_cli("--store", url.replace("bucket", "nobucket"), *FIT, "--out", tmp_path / "e"),
                   "no store at memory://nobucket/run.zarr?token=***")
    fsspec.filesystem("memory").rm("/", recursive=True)


def test_harvest_summary_and_store_attrs_hold_no_credential(tmp_path):
    import fsspec

    from sae_harvest.harvest.cli import main as harvest_cli

    model = make_tiny_model("gpt2", tmp_path / "gpt2")
    corpus = write_corpus(tmp_path / "docs.jsonl", n_docs=60, max_words=40)
    url = "memory://alice:S3CRET@hb/s.zarr"
    r = CliRunner().invoke(harvest_cli, ["run", "--model", model, "--dataset", corpus, "--tokens", 512,
                                         "--ctx-len", 32, "--sites", "blocks.0.resid_pre", "--device", "cpu",
                                         "--out", url, "--quiet"])
    assert r.exit_code == 0, r.output
    no_secret_in(r.output)
    assert json.loads(r.output.strip().splitlines()[-1])["store"] == "memory://hb/s.zarr"
    mem = fsspec.filesystem("memory")
    meta = [p for p in mem.find("/") if p.endswith("zarr.json")]
    assert meta
    for p in meta:
        no_secret_in(mem.cat(p).decode())
    r = CliRunner().invoke(harvest_cli, ["run", "--model", model, "--dataset", corpus, "--out", url])
    one_error_line(r, "already exists", "memory://hb/s.zarr")
    mem.rm("/", recursive=True)


# ---- 2. no pickle through model loading -------------------------------------------------------
@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny GPT-2, a .bin-only copy of it, a corpus and a small harvested store."""
    import shutil

    import torch

    from sae_harvest.harvest.run import HarvestConfig, harvest

    root = tmp_path_factory.mktemp("lm")
    model = make_tiny_model("gpt2", root / "gpt2")
    pickled = root / "gpt2-bin"
    shutil.copytree(model, pickled)
    from safetensors.torch import load_file
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    corpus = write_corpus(root / "docs.jsonl", n_docs=60, max_words=40)
    store = root / "s.zarr"
    harvest(HarvestConfig(out=str(store), model=model, dataset=corpus, sites="blocks.0.resid_pre", tokens=512,
                          ctx_len=32, batch_size=8, shuffle_window=256, device="cpu"), progress=False)
    return {"model": model, "pickled": str(pickled), "corpus": corpus, "store": store, "root": root}


def edit_root_attrs(store, fn):
    """Rewrite a store's root attributes in place (what a hostile or careless colleague could do)."""
    from sae_harvest.stores import layout

    meta_path = Path(store) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    fn(meta["attributes"][layout.ROOT_ATTR])
    meta_path.write_text(json.dumps(meta))


def test_pickled_model_refused_with_how_to_convert(lm, tmp_path, monkeypatch):
    import torch

    from sae_harvest.harvest.cli import main as harvest_cli

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (unpickling) used"))
    before = tree_hash(lm["pickled"])
    out = tmp_path / "o.zarr"
    args = ["run", "--dataset", lm["corpus"], "--tokens", "256", "--ctx-len", "32", "--device", "cpu",
            "--sites", "blocks.0.resid_pre", "--out", str(out)]
    one_error_line(CliRunner().invoke(harvest_cli, [*args, "--model", lm["pickled"]]),
                   "pickled", "save_pretrained(", "safe_serialization=True")
    assert not out.exists() and tree_hash(lm["pickled"]) == before
    # a stray safetensors file beside the .bin: transformers itself is asked for safetensors only
    import shutil
    mixed = tmp_path / "mixed"
    shutil.copytree(lm["pickled"], mixed)
    (mixed / "unrelated.safetensors").write_bytes(b"")
    one_error_line(CliRunner().invoke(harvest_cli, [*args, "--model", str(mixed)]),
                   "no safetensors weights", "safe_serialization=True")
    assert not out.exists()


def test_store_named_model_is_shown_before_loading(lm, tmp_path):
    """evaluate without --model loads the model a store names: it says which, then refuses pickle."""
    import shutil

    import torch

    from sae_harvest.evaluate.cli import main as evaluate_cli
    from sae_harvest.train.registry import SAEConfig, make_sae
    from sae_harvest.train.sae_io import save_sae

    store = tmp_path / "named.zarr"
    shutil.copytree(lm["store"], store)
    edit_root_attrs(store, lambda a: a["model"].update(name=lm["pickled"]))
    sae_dir = tmp_path / "sae"
    torch.manual_seed(0)
    save_sae(make_sae(SAEConfig(arch="topk", d_in=64, d_sae=128, k=4)), sae_dir,
             extra_cfg={"hook_name": "blocks.0.resid_pre"})
    before = {**tree_hash(store), **tree_hash(sae_dir)}
    r = CliRunner().invoke(evaluate_cli, ["splice", "--sae", str(sae_dir), "--store", str(store), "--tokens", "64",
                                          "--device", "cpu", "--quiet"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 2 and "Traceback" not in r.output, r.output
    assert lines[0].startswith("loading model") and lm["pickled"] in lines[0] and "named by store" in lines[0]
    assert lines[1].startswith("error:") and "pickled" in lines[1]
    assert {**tree_hash(store), **tree_hash(sae_dir)} == before


# ---- 3. hostile cfg.json ----------------------------------------------------------------------
def _small_checkpoint(folder):
    import torch

    from sae_harvest.train.registry import SAEConfig, make_sae
    from sae_harvest.train.sae_io import save_sae

    torch.manual_seed(0)
    save_sae(make_sae(SAEConfig(arch="topk", d_in=16, d_sae=64, k=4)), folder,
             extra_cfg={"hook_name": "blocks.0.resid_pre"})
    return folder


def _claim(folder, **values):
    path = Path(folder) / "cfg.json"
    cfg = json.loads(path.read_text())
    for k, v in values.items():
        cfg[k] = v
        cfg["sae_harvest"]["sae"][k] = v
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("claim, message", [
    ({"d_sae": 4_000_000}, "shapes disagree with cfg.json"),
    ({"d_sae": 2**40}, "d_sae = 1099511627776 is out of range"),
    ({"d_sae": 256.0}, "d_sae must be an integer, got 256.0"),
    ({"d_in": "16"}, "d_in must be an integer"),
    ({"k": True}, "k must be an integer"),
    ({"d_sae": -5}, "out of range"),
    ({"arch": ["topk"]}, "arch must be a string"),
])
def test_hostile_cfg_refused_before_allocating(store, tmp_path, claim, message):
    ckpt = _claim(_small_checkpoint(tmp_path / "evil"), **claim) or tmp_path / "evil"
    before = tree_hash(ckpt)
    out = tmp_path / "o"
    line = one_error_line(fit_cli("--store", store, *FIT, "--init", ckpt, "--out", out), message)
    assert str(ckpt) in line
    assert tree_hash(ckpt) == before and not (out / "topk_k4").exists()


def test_hostile_cfg_peak_memory(tmp_path):
    """The issue's case: a small file claiming d_sae = 4e6 once took 2.2 GB; now the refusal costs
    no more memory than reading the small file (peak RSS measured in a fresh process)."""
    import subprocess

    ckpt = _small_checkpoint(tmp_path / "evil")
    _claim(ckpt, d_sae=4_000_000)     # 2 x 4e6 x 16 float32 = 512 MB if allocated
    code = ("import resource, sys\n"
            "from sae_harvest.train.sae_io import load_sae, CheckpointError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    load_sae(sys.argv[1])\nexcept CheckpointError as e:\n    print('refused', e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    r = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    refused, grew_kb = r.stdout.strip().splitlines()
    assert refused.startswith("refused") and "shapes disagree" in refused
    assert int(grew_kb) < 50 * 1024, f"peak RSS grew {int(grew_kb) / 1024:.0f} MB"
