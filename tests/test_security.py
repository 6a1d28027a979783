"""Hardening (issue 8): no credential in any file or output line, no pickle, hostile files and odd
inputs refused with one `error:` line (exit 2) that leaves what is on disk unchanged."""
import hashlib
import json
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
    if code != 2:   # a run stopped after it started may have printed its `warning:` lines (issue 22 item 6)
        lines = [line for line in lines if not line.startswith("warning:")]
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
    corpus = write_corpus(root / "docs.jsonl", n_docs=300, max_words=60)
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
    r = CliRunner().invoke(evaluate_cli, ["splice", "--sae", str(sae_dir), "--store", str(store), "--tokens", "32",
                                          "--device", "cpu", "--quiet"])
    # (a hand-saved SAE records no held-out split: its one warning line is not what this test is about)
    lines = [line for line in r.output.strip().splitlines() if not line.startswith("warning:")]
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

    good = _small_checkpoint(tmp_path / "good")
    ckpt = _small_checkpoint(tmp_path / "evil")
    _claim(ckpt, d_sae=4_000_000)     # 2 x 4e6 x 16 float32 = 512 MB if allocated
    # load a good checkpoint first so that lazy imports (meta-device kernels) are not counted
    code = ("import resource, sys\n"
            "from sae_harvest.train.sae_io import load_sae, CheckpointError\n"
            "load_sae(sys.argv[1])\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    load_sae(sys.argv[2])\nexcept CheckpointError as e:\n    print('refused', e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    r = subprocess.run([sys.executable, "-c", code, str(good), str(ckpt)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    refused, grew_kb = r.stdout.strip().splitlines()
    assert refused.startswith("refused") and "shapes disagree" in refused
    assert int(grew_kb) < 16 * 1024, f"peak RSS grew {int(grew_kb) / 1024:.0f} MB"


# ---- 4. one line, exit 2, nothing already written lost ----------------------------------------
HARVEST = ("--tokens", "4096", "--ctx-len", "32", "--batch-size", "8", "--shuffle-window", "1024",
           "--sites", "blocks.0.resid_pre", "--device", "cpu")


def harvest_cli(*args):
    from sae_harvest.harvest.cli import main
    return CliRunner().invoke(main, [*map(str, args)])


def test_non_string_text_partway_through_corpus(lm, tmp_path):
    from sae_harvest.stores import open_store

    (tmp_path / "c").mkdir()
    corpus = Path(write_corpus(tmp_path / "c" / "docs.jsonl", n_docs=120, max_words=40))   # ~2.5k tokens
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": 12345}) + "\n" + json.dumps({"text": "more words here"}) + "\n")
        f.writelines(json.dumps({"text": "the model reads every token " * 5}) + "\n" for _ in range(200))
    before = tree_hash(corpus.parent)
    out = tmp_path / "o.zarr"
    one_error_line(harvest_cli("run", "--model", lm["model"], "--dataset", corpus, *HARVEST, "--out", out,
                               "--quiet"), "document 120", "holds a int")
    assert tree_hash(corpus.parent) == before
    assert not open_store(str(out), allow_partial=True).complete    # kept, incomplete, resumable


def test_write_failure_is_one_line_and_resumable(lm, tmp_path):
    """A file-size limit (what a full disk looks like to the writer: EFBIG/ENOSPC) mid-harvest."""
    import resource
    import signal
    import subprocess

    from sae_harvest.stores import open_store

    out = tmp_path / "o.zarr"
    args = [sys.executable, "-m", "sae_harvest.harvest", "run", "--model", lm["model"], "--dataset", lm["corpus"],
            *HARVEST, "--out", str(out), "--quiet"]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG from write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))   # one window's acts is 128 KiB

    before = {**tree_hash(lm["model"]), **tree_hash(lm["corpus"])}
    r = subprocess.run(args, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    lines = [line for line in (r.stdout + r.stderr).strip().splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stdout + r.stderr
    assert lines[0].startswith("error: cannot write store") and "--resume" in lines[0], lines
    assert {**tree_hash(lm["model"]), **tree_hash(lm["corpus"])} == before
    r = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    store = open_store(str(out))
    assert store.complete and store.n_rows == 4096


def test_train_out_naming_a_file(store, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    one_error_line(fit_cli("--store", store, *FIT, "--out", target), "is a file")
    assert target.read_text() == "precious"


def test_truncated_zarr_json_on_resume(lm, tmp_path):
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(lm["store"], store)
    meta = store / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    before = tree_hash(store)
    one_error_line(harvest_cli("run", "--model", lm["model"], "--dataset", lm["corpus"], *HARVEST,
                               "--out", store, "--resume"), "metadata is unreadable")
    one_error_line(fit_cli("--store", store, *FIT, "--out", tmp_path / "t"), "cannot open store")
    assert tree_hash(store) == before


def test_truncated_training_state_on_resume(store, tmp_path):
    out = tmp_path / "o"
    assert fit_cli("--store", store, *FIT, "--tokens", 2560, "--out", out).exit_code == 0
    state = out / "checkpoint" / "state.json"
    state.write_text(state.read_text()[:50])
    before = tree_hash(out)
    one_error_line(fit_cli("--store", store, *FIT, "--tokens", 5120, "--out", out, "--resume"),
                   "unreadable training state")
    assert tree_hash(out) == before


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.update(format_version="1"), "format_version = '1' must be a positive integer"),
    (lambda a: a.update(format_version=1.5), "format_version = 1.5 must be a positive integer"),
    (lambda a: a.pop("n_rows"), "root attributes lack 'n_rows'"),
    (lambda a: a.pop("sites"), "root attributes lack 'sites'"),
    (lambda a: a.update(ctx_len=True), "ctx_len = True must be a positive integer"),
    (lambda a: a["sites"]["blocks.0.resid_pre"].update(d="16"), "needs a positive integer d"),
])
def test_damaged_root_attributes(store, tmp_path, edit, message):
    import shutil

    damaged = tmp_path / "d.zarr"
    shutil.copytree(store, damaged)
    edit_root_attrs(damaged, edit)
    before = tree_hash(damaged)
    one_error_line(fit_cli("--store", damaged, *FIT, "--out", tmp_path / "o"), message)
    one_error_line(harvest_cli("info", damaged), message)
    assert tree_hash(damaged) == before and not (tmp_path / "o" / "topk_k4").exists()


def test_evaluate_on_a_store_with_zero_rows(lm, tmp_path):
    import torch

    from sae_harvest.evaluate.cli import main as evaluate_cli
    from sae_harvest.stores import StoreWriter
    from sae_harvest.train.registry import SAEConfig, make_sae
    from sae_harvest.train.sae_io import save_sae

    empty = tmp_path / "e.zarr"
    w = StoreWriter.create(str(empty), meta={"model": {"name": lm["model"]}},
                           sites={"blocks.0.resid_pre": {"d": 64, "encoding": "float32"}}, grads=None,
                           ctx_len=32, n_seqs=8, window_seqs=8)
    # format 2 never completes a store without a window (harvest refuses a corpus shorter than one
    # sequence); a format-1 store, which is still read, can say it holds 0 rows
    import zarr
    group = zarr.open_group(str(empty), mode="r+")
    group.attrs["sae_store"] = {**dict(group.attrs["sae_store"]), "format_version": 1, "windows_done": 0,
                                "complete": True, "n_rows": 0, "n_seqs": 0}
    del w
    sae_dir = tmp_path / "sae"
    torch.manual_seed(0)
    save_sae(make_sae(SAEConfig(arch="topk", d_in=64, d_sae=128, k=4)), sae_dir,
             extra_cfg={"hook_name": "blocks.0.resid_pre"})
    before = {**tree_hash(empty), **tree_hash(sae_dir)}
    json_out = tmp_path / "r.json"
    r = CliRunner().invoke(evaluate_cli, ["splice", "--sae", str(sae_dir), "--store", str(empty), "--model",
                                          lm["model"], "--device", "cpu", "--quiet", "--json", str(json_out)])
    one_error_line(r, "0 sequences")
    assert {**tree_hash(empty), **tree_hash(sae_dir)} == before and not json_out.exists()


# ---- 5. no URL becomes a local folder ---------------------------------------------------------
def test_train_out_url_refused(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("s3://bucket/x", "gs://b/run", "file:///tmp/x"):
        one_error_line(fit_cli("--store", store, *FIT, "--out", url), "is a URL")
    assert list(tmp_path.iterdir()) == []


# ---- 6. degenerate inputs ---------------------------------------------------------------------
def test_degenerate_harvest_inputs(lm, tmp_path):
    short = Path(tmp_path / "short.jsonl")
    short.write_text(json.dumps({"text": "too short"}) + "\n")
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    write_corpus(corpus_dir / "docs.jsonl", n_docs=60, max_words=40)
    before = {**tree_hash(short), **tree_hash(corpus_dir)}
    base = ("--model", lm["model"], "--tokens", "256", "--sites", "blocks.0.resid_pre", "--device", "cpu")
    cases = [
        (("--dataset", lm["corpus"], "--ctx-len", "1", "--out", tmp_path / "a.zarr"), "at least 2 tokens"),
        (("--dataset", short, "--ctx-len", "32", "--out", tmp_path / "b.zarr"), "less than one sequence"),
        (("--dataset", corpus_dir, "--ctx-len", "32", "--out", corpus_dir / "sub" / "c.zarr"),
         "inside the corpus folder"),
    ]
    for args, message in cases:
        one_error_line(harvest_cli("run", *base, *args), message)
        assert not Path(args[-1]).exists()
    assert {**tree_hash(short), **tree_hash(corpus_dir)} == before


# ---- 7. training faults -----------------------------------------------------------------------
def _fit(store, out, **kw):
    from tests.test_train_loop import _cfg
    return _cfg(store, out, **{**dict(arch="batchtopk", k=(4,), tokens=256 * 24, log_every=5, checkpoint_every=5),
                               **kw})


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "batchtopk_k4" / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    import torch

    from sae_harvest import train
    sa, sb = train.load_sae(a / "batchtopk_k4").state_dict(), train.load_sae(b / "batchtopk_k4").state_dict()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    from sae_harvest.train.fit import fit
    out = tmp_path_factory.mktemp("full") / "run"
    fit(_fit(store, out), progress=False)
    return out


def test_sigterm_saves_and_exits_with_one_line(store, uninterrupted, tmp_path, monkeypatch):
    import signal

    from sae_harvest.train import fit as fit_module

    def sigterm_at_13(event):
        if event.step == 12:
            signal.raise_signal(signal.SIGTERM)   # what Slurm / Kubernetes send before a kill

    handler_before = signal.getsignal(signal.SIGTERM)
    real = fit_module.fit_local
    monkeypatch.setattr(fit_module, "fit_local", lambda *a, **kw: real(*a, **{**kw, "on_step": sigterm_at_13}))
    out = tmp_path / "run"
    args = ["--store", store, "--site", "blocks.0.resid_pre", "--arch", "batchtopk", "--k", "4", "--d-sae", "64",
            "--batch-size", "256", "--tokens", 256 * 24, "--log-every", "5",
            "--checkpoint-every", "5", "--device", "cpu", "--quiet", "--out", out]
    one_error_line(fit_cli(*args), "stopped by SIGTERM at step 13", "--resume", code=128 + signal.SIGTERM)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 13
    assert signal.getsignal(signal.SIGTERM) == handler_before    # the loop's handler is gone again
    monkeypatch.setattr(fit_module, "fit_local", real)
    assert fit_cli(*args, "--resume").exit_code == 0
    _same_weights(uninterrupted, out)
    assert _steps(out) == [5, 10, 15, 20, 24]


def test_exception_in_loop_saves_checkpoint_first(store, uninterrupted, tmp_path):
    """An S3-style read error at step 7: checkpoint at 7 with the feed before that batch, one line;
    --resume then ends exactly where an uninterrupted run does."""
    from sae_harvest.train.errors import TrainError
    from sae_harvest.train.fit import fit

    def s3_fails_at_7(event):
        if event.step == 7:
            raise OSError(5, "Input/output error reading s3://bucket/s.zarr/acts/c/3")

    out = tmp_path / "run"
    with pytest.raises(TrainError) as e:
        fit(_fit(store, out), progress=False, on_step=s3_fails_at_7)
    msg = str(e.value)
    assert "stopped at step 7" in msg and "OSError" in msg and "checkpoint saved" in msg and "\n" not in msg
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 7
    fit(_fit(store, out), resume=True, progress=False)
    _same_weights(uninterrupted, out)
    assert _steps(out) == [5, 10, 15, 20, 24]


def test_resume_after_kill_logs_each_step_once(store, uninterrupted, tmp_path):
    """Killed (no chance to save) after logging step 15 with the last checkpoint at 10: the resumed
    run logs 15 again, and metrics.jsonl must still hold it once (and drop a torn last line)."""
    from sae_harvest.train.fit import fit

    class Killed(BaseException):   # like SIGKILL: nothing in the loop gets to run
        pass

    def kill_at_17(event):
        if event.step == 17:
            raise Killed

    out = tmp_path / "run"
    with pytest.raises(Killed):
        fit(_fit(store, out, checkpoint_every=10), progress=False, on_step=kill_at_17)
    assert _steps(out) == [5, 10, 15]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 10
    with open(out / "batchtopk_k4" / "metrics.jsonl", "a") as f:
        f.write('{"step": 16, "tok')             # a record torn by the kill
    fit(_fit(store, out, checkpoint_every=10), resume=True, progress=False)
    assert _steps(out) == [5, 10, 15, 20, 24]
