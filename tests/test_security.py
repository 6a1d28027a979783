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
