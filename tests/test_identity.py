"""Identity (issue 16 items 6, 7, 8): a store records what made it (model, tokenizer, corpus
fingerprints) and `harvest run --resume` refuses a change; the ranks of a distributed harvest
agree on one harvest before anything is created; `train fit --resume` refuses a replaced store."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_harvest.harvest import run as harvest_run
from sae_harvest.harvest.errors import HarvestError
from sae_harvest.harvest.fingerprint import model_fingerprint, tokenizer_fingerprint
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.stores import open_store
from tests.test_security import tree_hash
from tests.tiny_models import make_tiny_model, write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    corpus = write_corpus(root / "docs.jsonl", n_docs=200, max_words=60)
    gpt2 = make_tiny_model("gpt2", root / "gpt2")
    return {"root": root, "corpus": corpus, "gpt2": gpt2}


def _copy_model(src, dst, *, reseed=None):
    """A copy of a tiny model; with reseed, every weight replaced by another random init of the
    same shapes (same config, same tokenizer, same safetensors header)."""
    shutil.copytree(src, dst)
    if reseed is not None:
        from safetensors.torch import load_file, save_file
        path = Path(dst) / "model.safetensors"
        tensors = load_file(str(path))
        g = torch.Generator().manual_seed(reseed)
        tensors = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.1 for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"format": "pt"})
    return str(dst)


def _cfg(out, model, corpus, **kw):
    base = dict(out=str(out), model=model, dataset=str(corpus), sites="blocks.1.resid_pre", tokens=2048, ctx_len=32,
                batch_size=8, shuffle_window=256, device="cpu")
    return HarvestConfig(**{**base, **kw})


def _interrupted(out, model, corpus, monkeypatch, windows=3):
    """A harvest stopped (as by Ctrl-C) while computing window `windows` (of 8): the windows the
    writer thread finished by then are recorded, the store is incomplete."""
    real, calls = harvest_run.compute_window, []

    def compute_window(*a, **k):
        calls.append(1)
        if len(calls) > windows:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(harvest_run, "compute_window", compute_window)
    with pytest.raises(KeyboardInterrupt):
        harvest(_cfg(out, model, corpus), progress=False)
    monkeypatch.setattr(harvest_run, "compute_window", real)
    assert 1 <= len(list((Path(out) / "windows").glob("*.json"))) < 8 and not (Path(out) / "final.json").exists()


def _killed(out, model, corpus):
    """A `harvest run` process SIGKILLed once it recorded 2 windows (of 8)."""
    import signal
    import time
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "sae_harvest.harvest", "run", *_args(out, model, corpus)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (Path(out) / "windows").exists() and len(list((Path(out) / "windows").glob("*.json"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "harvest finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Path(out) / "final.json").exists()


def _args(out, model, corpus):
    return ["--out", str(out), "--model", str(model), "--dataset", str(corpus), "--sites", "blocks.1.resid_pre",
            "--tokens", "2048", "--ctx-len", "32", "--batch-size", "8", "--shuffle-window", "256", "--device", "cpu",
            "--quiet"]


# ---- item 6: the fingerprints and the resume refusal ------------------------------------------
def test_model_fingerprint_follows_the_weights_not_the_path(assets, tmp_path):
    same = _copy_model(assets["gpt2"], tmp_path / "same")
    other = _copy_model(assets["gpt2"], tmp_path / "other", reseed=1)
    a, b, c = (model_fingerprint(m, None) for m in (assets["gpt2"], same, other))
    assert a == b                                   # a copy elsewhere is the same model
    assert c["config_sha256"] == a["config_sha256"] and c["weights_sha256"] != a["weights_sha256"]
    # one small tensor changed (hashed whole): the fingerprint changes
    from safetensors.torch import load_file, save_file
    one = _copy_model(assets["gpt2"], tmp_path / "one")
    tensors = load_file(f"{one}/model.safetensors")
    tensors["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"] + 1e-3
    save_file(tensors, f"{one}/model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(one, None)["weights_sha256"] != a["weights_sha256"]
    # config.json: what it says counts, not its formatting or the path transformers wrote into it
    cfg = json.loads(Path(one, "config.json").read_text())
    Path(one, "config.json").write_text(json.dumps({**cfg, "_name_or_path": "/elsewhere"}, indent=7))
    assert model_fingerprint(one, None)["config_sha256"] == a["config_sha256"]
    Path(one, "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": 1e-3}))
    assert model_fingerprint(one, None)["config_sha256"] != a["config_sha256"]


def test_tokenizer_fingerprint(assets):
    from transformers import AutoTokenizer
    t1, t2 = AutoTokenizer.from_pretrained(assets["gpt2"]), AutoTokenizer.from_pretrained(assets["gpt2"])
    assert tokenizer_fingerprint(t1) == tokenizer_fingerprint(t2)
    t2.add_tokens(["zzzq"])
    assert tokenizer_fingerprint(t1)["digest"] != tokenizer_fingerprint(t2)["digest"]


def test_store_records_provenance(assets, tmp_path):
    out = tmp_path / "s.zarr"
    harvest(_cfg(out, assets["gpt2"], assets["corpus"], tokens=512), progress=False)
    prov = open_store(str(out)).attrs["provenance"]
    assert prov["model"] == model_fingerprint(assets["gpt2"], None)
    assert prov["corpus"]["local"] and prov["corpus"]["bytes"] == os.path.getsize(assets["corpus"])
    assert set(prov) == {"model", "tokenizer", "corpus"}


def _replace_weights(model_dir):
    _copy_model(model_dir, str(model_dir) + ".tmp", reseed=7)
    shutil.copyfile(str(model_dir) + ".tmp/model.safetensors", f"{model_dir}/model.safetensors")
    shutil.rmtree(str(model_dir) + ".tmp")


def _add_token(model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_tokens(["zzzq"])
    tok.save_pretrained(model_dir)


def _append_document(corpus):
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": "a late document appended between the kill and the resume"}) + "\n")


@pytest.mark.parametrize("change, needle, kill", [
    (_replace_weights, "model's weights differ", False), (_add_token, "tokenizer differs", False),
    (_append_document, "corpus files changed", False),
    pytest.param(_replace_weights, "model's weights differ", True, marks=pytest.mark.slow)])   # SIGKILL: ~30 s
def test_resume_refuses_a_changed_model_tokenizer_or_corpus(assets, tmp_path, monkeypatch, change, needle, kill):
    from click.testing import CliRunner

    from sae_harvest.harvest.cli import main as harvest_cli
    from tests.test_security import one_error_line
    model = _copy_model(assets["gpt2"], tmp_path / "m")
    corpus = shutil.copyfile(assets["corpus"], tmp_path / "docs.jsonl")
    out = tmp_path / "s.zarr"
    if kill:   # the case as it happens: a harvest process SIGKILLed, new weights, --resume
        _killed(out, model, corpus)
    else:
        _interrupted(out, model, corpus, monkeypatch)
    before = tree_hash(out)
    change(model if change is not _append_document else corpus)
    line = one_error_line(CliRunner().invoke(harvest_cli, ["run", *_args(out, model, corpus), "--resume"]),
                          "cannot resume", needle)
    assert "would mix two harvests" in line
    assert tree_hash(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "m", "s.zarr"]


def test_resume_with_the_same_model_completes_as_uninterrupted(assets, tmp_path, monkeypatch):
    import numpy as np
    full, out = tmp_path / "full.zarr", tmp_path / "s.zarr"
    harvest(_cfg(full, assets["gpt2"], assets["corpus"]), progress=False)
    _interrupted(out, assets["gpt2"], assets["corpus"], monkeypatch)
    harvest(_cfg(out, assets["gpt2"], assets["corpus"]), resume=True, progress=False)
    a, b = open_store(str(full)), open_store(str(out))
    np.testing.assert_array_equal(a.acts("blocks.1.resid_pre", slice(None)), b.acts("blocks.1.resid_pre", slice(None)))
    assert a.attrs["provenance"] == b.attrs["provenance"]


# ---- item 7: the ranks agree before anything is created ----------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(out, per_rank, cwds=(None, None), timeout=240):
    """Two gloo processes of one harvest, each launched with its own arguments (as two nodes'
    torchrun launchers would be); returns [(exit code, output)] per rank."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "2",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}
    procs = []
    for rank, (args, cwd) in enumerate(zip(per_rank, cwds)):
        cmd = [sys.executable, "-m", "sae_harvest.harvest", "run", "--sites", "blocks.1.resid_pre", "--tokens", "1024",
               "--ctx-len", "32", "--batch-size", "8", "--shuffle-window", "256", "--device", "cpu", "--quiet",
               "--out", str(out), *args]
        procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(rank)}, cwd=cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]
    except subprocess.TimeoutExpired:   # a rank waiting for a peer that gave up: the defect itself
        for p in procs:
            p.kill()
            p.wait()
        raise AssertionError(f"a rank still waited after {timeout} s") from None


def _assert_refused(results, needle, folder, before):
    for code, text in results:
        lines = [line for line in text.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: the ranks disagree"), text
        assert needle in lines[0], text
    assert sorted(p.name for p in folder.iterdir()) == before      # no store, no .new, nothing


@pytest.mark.parametrize("field, rank1", [     # ~15-40 s each on the 2-core box: one in the quick suite
    ("dtype", ["--dtype", "bfloat16"]),
    pytest.param("model", "other-model", marks=pytest.mark.slow),
    pytest.param("dataset", "other-corpus", marks=pytest.mark.slow)])
def test_ranks_launched_with_different_arguments_create_nothing(assets, tmp_path, field, rank1):
    other_model = _copy_model(assets["gpt2"], tmp_path / "m2", reseed=3)
    other_corpus = write_corpus(tmp_path / "other.jsonl", n_docs=200, max_words=60, seed=5)
    common = ["--model", assets["gpt2"], "--dataset", assets["corpus"]]
    if rank1 == "other-model":
        rank1 = ["--model", other_model, "--dataset", assets["corpus"]]
    elif rank1 == "other-corpus":
        rank1 = ["--model", assets["gpt2"], "--dataset", other_corpus]
    else:
        rank1 = common + rank1
    before = sorted(p.name for p in tmp_path.iterdir())
    results = _two_ranks(tmp_path / "s.zarr", [common, rank1])
    _assert_refused(results, f"{field} (rank 0:", tmp_path, before)


@pytest.mark.slow   # ~20 s on the 2-core box
def test_a_bad_option_on_one_rank_stops_both(assets, tmp_path):
    """Checked before the ranks compare arguments: rank 1 alone refuses --tokens 0, and rank 0,
    which would otherwise wait for it, stops with one line too."""
    common = ["--model", assets["gpt2"], "--dataset", assets["corpus"]]
    before = sorted(p.name for p in tmp_path.iterdir())
    (c0, t0), (c1, t1) = _two_ranks(tmp_path / "s.zarr", [common, common + ["--tokens", "0"]])
    assert c0 == c1 == 2, (t0, t1)
    assert t1.strip() == "error: --tokens must be positive (got 0)", t1
    assert t0.strip() == "error: rank 1 stopped: --tokens must be positive (got 0)", t0
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.slow   # ~40 s on the 2-core box
def test_same_arguments_naming_other_files_on_each_node_create_nothing(assets, tmp_path):
    """`--model ./m --dataset ./docs.jsonl` on two nodes whose ./m hold different weights."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for i, node in enumerate(nodes):
        node.mkdir()
        _copy_model(assets["gpt2"], node / "m", reseed=None if i == 0 else 11)
        shutil.copyfile(assets["corpus"], node / "docs.jsonl")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["--model", "./m", "--dataset", "./docs.jsonl"]
    results = _two_ranks(tmp_path / "s.zarr", [args, args], cwds=nodes)
    _assert_refused(results, "model (rank 0:", tmp_path, before)


# ---- item 8: train fit --resume refuses a replaced store ---------------------------------------
def _store(path, seed=0, n_seqs=64, creation_id="a" * 32, model="m" * 32):
    from tests.test_security import edit_root_attrs
    from tests.test_train_loop import make_store
    make_store(path, seed=seed, n_seqs=n_seqs)
    edit_root_attrs(path, lambda a: a.update(creation_id=creation_id, provenance={"model": {"digest": model}}))
    return path


def test_store_identity_tells_stores_apart(tmp_path):
    from sae_harvest.stores.identity import StoreIdentity, store_identity
    a = store_identity(str(_store(tmp_path / "a.zarr")))
    assert a.creation_id == "a" * 32 and a.model == "m" * 32 and len(a.records_digest) == 64
    assert a.final_digest == hashlib.sha256((tmp_path / "a.zarr" / "final.json").read_bytes()).hexdigest()
    shutil.copytree(tmp_path / "a.zarr", tmp_path / "copy.zarr")
    assert store_identity(str(tmp_path / "copy.zarr")) == a          # a copy is the same store
    assert StoreIdentity.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    other = store_identity(str(_store(tmp_path / "b.zarr", seed=1)))  # same size, other rows
    assert "sample_digest" in a.differences(other)
    record = tmp_path / "copy.zarr" / "windows" / "00000003.json"       # a record rewritten, rows the same
    record.write_text(json.dumps({**json.loads(record.read_text()), "written": "1999-01-01T00:00:00+00:00"}))
    assert a.differences(store_identity(str(tmp_path / "copy.zarr"))) == ["records_digest"]


def _replace(path, **kw):
    shutil.rmtree(path)
    _store(path, **kw)


@pytest.mark.parametrize("replacement, field", [
    (dict(seed=1), "sample_digest"),                         # another harvest of the same size
    (dict(n_seqs=32), "final_digest"),                       # another corpus at half the size
    (dict(model="n" * 32), "model"),                         # the same rows said to come from another model
    (dict(creation_id="b" * 32), "creation_id"),             # recreated, otherwise identical
])
def test_train_resume_refuses_a_replaced_store(tmp_path, replacement, field):
    import signal

    from sae_harvest.train.driver import TrainInterrupted
    from sae_harvest.train.fit import fit
    from tests.test_security import fit_cli
    from tests.test_train_loop import _cfg as train_cfg

    store, out = tmp_path / "s.zarr", tmp_path / "out"
    _store(store)
    cfg = train_cfg(store, out, tokens=256 * 12)

    def interrupt(event):
        if event.step == 4:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainInterrupted):
        fit(cfg, progress=False, on_step=interrupt)
    if field == "model":   # the rows stay bitwise the same: only the recorded model changes
        from tests.test_security import edit_root_attrs
        edit_root_attrs(store, lambda a: a["provenance"]["model"].update(digest="n" * 32))
    elif field == "creation_id":
        from tests.test_security import edit_root_attrs
        edit_root_attrs(store, lambda a: a.update(creation_id="b" * 32))
    else:
        _replace(store, **replacement)
    before = tree_hash(out)
    r = fit_cli("--store", store, "--out", out, "--site", "blocks.0.resid_pre", "--arch", "topk", "--k", "4",
                "--d-sae", "64", "--batch-size", "256", "--device", "cpu",
                "--log-every", "5", "--checkpoint-every", "1000", "--tokens", str(256 * 12), "--resume")
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert "cannot resume" in lines[0] and "not the store its checkpoint was trained on" in lines[0], lines[0]
    assert field in lines[0], lines[0]
    assert tree_hash(out) == before


def test_train_resume_on_the_same_store_still_works(tmp_path):
    import signal

    from sae_harvest.train.driver import TrainInterrupted
    from sae_harvest.train.fit import fit
    from tests.test_train_loop import _cfg as train_cfg

    store, out = _store(tmp_path / "s.zarr"), tmp_path / "out"
    cfg = train_cfg(store, out, tokens=256 * 12)

    def interrupt(event):
        if event.step == 4:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainInterrupted):
        fit(cfg, progress=False, on_step=interrupt)
    saved = json.loads((out / "checkpoint" / "state.json").read_text())["store_identity"]
    assert saved["creation_id"] == "a" * 32 and saved["model"] == "m" * 32
    shutil.copytree(store, tmp_path / "moved.zarr")          # the same store, moved: still the same
    shutil.rmtree(store)
    shutil.move(tmp_path / "moved.zarr", store)
    summary = fit(cfg, resume=True, progress=False)
    assert summary["topk_k4"]["steps"] == 12


def test_content_digest_is_the_data_not_the_harvest(tmp_path):
    """Same rows, another creation id and write time: the same content digest; other rows: another;
    a record whose checksums say nothing of the data (the crc32c residue): no digest at all."""
    from sae_harvest.stores.identity import content_digest, store_identity
    from sae_harvest.stores.shards import CRC32C_RESIDUE
    a = open_store(str(_store(tmp_path / "a.zarr")))
    b = open_store(str(_store(tmp_path / "b.zarr", creation_id="b" * 32)))
    assert store_identity(a.path) != store_identity(b.path)
    assert content_digest(a) == content_digest(b) and len(content_digest(a)) == 64
    assert content_digest(open_store(str(_store(tmp_path / "c.zarr", seed=1)))) != content_digest(a)
    # the same shards held out otherwise are other training rows: another digest
    from tests.test_security import edit_root_attrs
    shutil.copytree(tmp_path / "a.zarr", tmp_path / "d.zarr")
    edit_root_attrs(tmp_path / "d.zarr", lambda r: r.update(split={"rule": "seq % every == 0", "every": 2,
                                                                    "origin": "harvest"}))
    assert content_digest(open_store(str(tmp_path / "d.zarr"))) != content_digest(a)
    record = tmp_path / "b.zarr" / "windows" / "00000003.json"
    doc = json.loads(record.read_text())
    name = sorted(doc["shards"])[0]
    doc["shards"][name] = [[k, size, CRC32C_RESIDUE] for k, size, _ in doc["shards"][name]]
    record.write_text(json.dumps(doc))
    assert content_digest(open_store(str(tmp_path / "b.zarr"))) is None


def test_two_harvests_of_the_same_inputs_hold_the_same_bytes(assets, tmp_path):
    """What lets a bench's rerun on another machine tell "same data" from "other data": the harvest
    is deterministic (model, corpus, seed, options fixed), and the digest sees it."""
    from sae_harvest.stores.identity import content_digest
    for name in ("a.zarr", "b.zarr"):
        harvest(_cfg(tmp_path / name, assets["gpt2"], assets["corpus"], grads=True, eval_every=4), progress=False)
    a, b = open_store(str(tmp_path / "a.zarr")), open_store(str(tmp_path / "b.zarr"))
    assert a.creation_id != b.creation_id
    assert content_digest(a) == content_digest(b) is not None
    harvest(_cfg(tmp_path / "c.zarr", assets["gpt2"], assets["corpus"], grads=True, eval_every=4, seed=1),
            progress=False)
    assert content_digest(open_store(str(tmp_path / "c.zarr"))) != content_digest(a)
