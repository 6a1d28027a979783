"""Store format 2: kills at many moments and resume (1 process and 2 torchrun processes), verify
and the reader against each kind of damage, and every refusal (one line, exit 2, nothing changed)."""
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sae_harvest.harvest.cli import main as harvest_cli
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.stores import StoreError, fs, open_store
from sae_harvest.stores.verify import verify_store
from tests.test_stores import _write_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(harvest_assets):   # tests/conftest.py
    return harvest_assets


def _cfg(assets, out, **kw):
    base = dict(out=str(out), model=assets["gpt2"], dataset=assets["corpus"], sites="blocks.0.resid_pre",
                grads=True, tokens=4000, ctx_len=32, batch_size=8, shuffle_window=512, device="cpu")
    base.update(kw)
    return HarvestConfig(**base)


def _arrays(path):
    store = open_store(str(path))
    out = {"tokens": store.tokens[:], "seq": store.rows_seq[:], "pos": store.rows_pos[:]}
    for s in store.sites:
        out["acts/" + s] = store.acts(s, slice(None))
        out["grads/" + s] = store.grads(s, slice(None))
    return out


def _assert_same(a, b):
    x, y = _arrays(a), _arrays(b)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].shape == y[k].shape, k
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _tree_hash(path) -> dict:
    out = {}
    if os.path.isfile(path):
        return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    for dirpath, _, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _expire_lease(path):
    lease = os.path.join(str(path), "lease.json")
    if os.path.exists(lease):
        data = json.load(open(lease))
        data["heartbeat"] = 0.0
        json.dump(data, open(lease, "w"))


class _Killed(BaseException):
    pass


def _harvest_killed_at_record(monkeypatch, n: int, cfg, *, before_kill=lambda: None, **kw) -> None:
    """Run a harvest that dies (like a SIGKILL, no cleanup) as it writes its n-th window record."""
    real = fs.write_atomic
    count = {"n": 0}

    def write(path, key, data):
        if key.startswith("windows/"):
            count["n"] += 1
            if count["n"] == n:
                before_kill()
                raise _Killed()
        return real(path, key, data)

    monkeypatch.setattr(fs, "write_atomic", write)
    with pytest.raises(_Killed):
        harvest(cfg, progress=False, **kw)
    monkeypatch.setattr(fs, "write_atomic", real)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """Uninterrupted single-process stores: full, and one whose corpus runs out."""
    root = tmp_path_factory.mktemp("v2_ref")
    harvest(_cfg(assets, root / "full.zarr"), progress=False)
    harvest(_cfg(assets, root / "short.zarr", dataset=assets["small"], tokens=100000), progress=False)
    return root


@pytest.mark.parametrize("dataset, kill_at", [("corpus", 1), ("corpus", 3), ("corpus", 8), ("corpus", "final"),
                                              ("small", 2), ("small", "resize"), ("small", "final")])
def test_killed_anywhere_then_resumed_is_bitwise_equal(assets, reference, tmp_path, monkeypatch, kill_at, dataset):
    """Stop the harvest at the k-th atomic write (window records, the final record) or inside
    finish's resize, resume, and compare with the uninterrupted store: no extra zero rows."""
    import zarr
    out = tmp_path / "k.zarr"
    kw = {} if dataset == "corpus" else {"dataset": assets["small"], "tokens": 100000}
    ref = reference / ("full.zarr" if dataset == "corpus" else "short.zarr")
    real_write, real_resize = fs.write_atomic, zarr.Array.resize
    count = {"n": 0}

    def write(path, key, data):
        if key.startswith("windows/") or key == "final.json":
            count["n"] += 1
            if kill_at == "final" and key == "final.json" or count["n"] == kill_at:
                raise _Killed()
        return real_write(path, key, data)

    def resize(self, shape):
        real_resize(self, shape)
        if kill_at == "resize":
            raise _Killed()

    monkeypatch.setattr(fs, "write_atomic", write)
    monkeypatch.setattr(zarr.Array, "resize", resize)
    with pytest.raises(_Killed):
        harvest(_cfg(assets, out, **kw), progress=False)
    monkeypatch.setattr(fs, "write_atomic", real_write)
    monkeypatch.setattr(zarr.Array, "resize", real_resize)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(str(out))
    _expire_lease(out)       # the "killed" writer is this very process, so its pid is alive
    harvest(_cfg(assets, out, **kw), resume=True, progress=False)
    _assert_same(ref, out)
    assert verify_store(str(out)) == []
    assert not os.path.exists(out / "lease.json")


def test_resume_reads_from_recorded_position_not_from_the_start(assets, reference, tmp_path, monkeypatch):
    import sae_harvest.harvest.run as run
    out = tmp_path / "r.zarr"
    _harvest_killed_at_record(monkeypatch, 5, _cfg(assets, out))
    _expire_lease(out)
    tokenized = []
    real_packed = run.positioned_sequences

    def packed(ds, tokenizer, *a, **k):
        class Counting:
            def __call__(self, texts, **kw):
                tokenized.extend(texts)
                return tokenizer(texts, **kw)
            def __getattr__(self, name):
                return getattr(tokenizer, name)
        return real_packed(ds, Counting(), *a, **k)

    monkeypatch.setattr(run, "positioned_sequences", packed)
    harvest(_cfg(assets, out), resume=True, progress=False)
    _assert_same(reference / "full.zarr", out)
    first = json.loads(open(out / "windows" / "00000003.json").read())["position"]
    # the resumed run tokenized nothing before the document the 4th window stopped in
    all_texts = [json.loads(line)["text"] for line in open(assets["corpus"])]
    assert tokenized[0] == all_texts[first["doc"]]
    assert len(tokenized) < len(all_texts) - first["doc"] + 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(assets, out, *, nproc=2, extra=(), env=None, nnodes=None, node_rank=None, port=None, wait=True,
              rdzv_id=None, kill=None):
    """One torchrun launcher: --master-addr/--master-port (static), or with rdzv_id a c10d
    rendezvous on 127.0.0.1:port, where the rendezvous assigns the node ranks. kill=(K, R): rank R
    is SIGKILLed after its K-th window record (tests/kill_launcher.py)."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if rdzv_id:
        args += ["--nnodes", str(nnodes or 1), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                 f"127.0.0.1:{port or _free_port()}", "--rdzv-id", rdzv_id]
    else:
        args += ["--master-addr", "127.0.0.1", "--master-port", str(port or _free_port())]
    if nnodes and not rdzv_id:
        args += ["--nnodes", str(nnodes), "--node-rank", str(node_rank)]
    launcher = os.path.join(REPO, "tests", "kill_launcher.py")
    args += [launcher, "--after-records", str(kill[0]), "--rank", str(kill[1]), "--"] if kill else \
        ["-m", "sae_harvest.harvest"]
    args += ["run", "--model", assets["gpt2"], "--dataset", assets["corpus"],
             "--sites", "blocks.0.resid_pre,blocks.1.mlp_out", "--grads", "--tokens", "4000", "--ctx-len", "32",
             "--batch-size", "8", "--shuffle-window", "512", "--device", "cpu", "--act-encoding", "float32",
             "--grad-encoding", "float32", "--out", str(out), "--quiet", *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(args, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=300)


def _check_against_hf(assets, path):
    from transformers import AutoModelForCausalLM
    store = open_store(str(path))
    model = AutoModelForCausalLM.from_pretrained(assets["gpt2"]).eval()
    rows = np.random.default_rng(0).choice(store.n_rows, 12, replace=False)
    seqs, poss = store.rows_seq[:][rows], store.rows_pos[:][rows]
    for row, seq, pos in zip(rows, seqs, poss):
        ids = torch.from_numpy(store.tokens[int(seq)][None].astype(np.int64))
        emb = model.transformer.wte(ids).detach().requires_grad_(True)
        res = model(inputs_embeds=emb, output_hidden_states=True)
        loss = torch.nn.functional.cross_entropy(res.logits[0, :-1], ids[0, 1:], reduction="sum")
        grad0, = torch.autograd.grad(loss, emb)
        np.testing.assert_allclose(store.acts("blocks.0.resid_pre", [row])[0], res.hidden_states[0][0, pos].detach(),
                                   atol=1e-5)
        np.testing.assert_allclose(store.grads("blocks.0.resid_pre", [row])[0], grad0[0, pos], rtol=1e-4, atol=1e-7)


def test_two_torchrun_processes_match_hf_and_resume_bitwise(assets, tmp_path):
    full, killed = tmp_path / "d.zarr", tmp_path / "k.zarr"
    r = _torchrun(assets, full)
    assert r.returncode == 0, r.stdout[-3000:]
    store = open_store(str(full))
    assert store.n_seqs == 125 and store.attrs["world_size"] == 2 and store.attrs["nodes"] == 1
    records = [json.loads(open(p).read()) for p in sorted((full / "windows").glob("*.json"))]
    assert [rec["rank"] for rec in records] == [w % 2 for w in range(len(records))]
    assert len(set(zip(store.rows_seq[:].tolist(), store.rows_pos[:].tolist()))) == store.n_rows
    _check_against_hf(assets, full)
    assert verify_store(str(full)) == []
    # rank 1 dies after its second window record; the same launch with --resume completes it. These
    # two launches use a c10d rendezvous (the Slurm recipe's) instead of --master-addr: the store
    # they make equals the one above bitwise
    r = _torchrun(assets, killed, kill=(2, 1),
                  rdzv_id="kill")
    assert r.returncode != 0
    with pytest.raises(StoreError, match="incomplete"):
        open_store(str(killed))
    r = _torchrun(assets, killed, extra=["--resume"], rdzv_id="resume")
    assert r.returncode == 0, r.stdout[-3000:]
    _assert_same(full, killed)
    assert open_store(str(killed)).attrs["world_size"] == 2 and open_store(str(killed)).attrs["nodes"] == 1
    # another world size is refused with one line, nothing changed
    before = _tree_hash(killed)
    code, text = _run_cli(["--model", assets["gpt2"], "--dataset", assets["corpus"], "--sites",
                           "blocks.0.resid_pre,blocks.1.mlp_out", "--grads", "--tokens", "4000", "--ctx-len", "32",
                           "--batch-size", "8", "--shuffle-window", "512", "--device", "cpu", "--act-encoding",
                           "float32", "--grad-encoding", "float32", "--out", str(killed) + ".x", "--quiet"])
    assert code == 0
    os.remove(os.path.join(str(killed) + ".x", "final.json"))
    attrs_file = os.path.join(str(killed) + ".x", "zarr.json")
    meta = json.load(open(attrs_file))
    meta["attributes"]["sae_store"]["world_size"] = 2
    json.dump(meta, open(attrs_file, "w"))
    before = _tree_hash(str(killed) + ".x")
    code, text = _run_cli(["--model", assets["gpt2"], "--dataset", assets["corpus"], "--sites",
                           "blocks.0.resid_pre,blocks.1.mlp_out", "--grads", "--tokens", "4000", "--ctx-len", "32",
                           "--batch-size", "8", "--shuffle-window", "512", "--device", "cpu", "--act-encoding",
                           "float32", "--grad-encoding", "float32", "--out", str(killed) + ".x", "--resume"])
    _one_error_line(code, text, "world size")
    assert _tree_hash(str(killed) + ".x") == before


@pytest.mark.slow
def test_two_nodes_on_loopback_equal_one_node_same_world(assets, tmp_path):
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    assert _torchrun(assets, one).returncode == 0
    port = _free_port()
    procs = [_torchrun(assets, two, nproc=1, nnodes=2, node_rank=i, port=port, wait=False) for i in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    store = open_store(str(two))
    assert store.attrs["world_size"] == 2 and store.attrs["nodes"] == 2
    _assert_same(one, two)
    _check_against_hf(assets, two)
    # the same two nodes joined by a c10d rendezvous (node ranks assigned by it): bitwise equal
    c10d = tmp_path / "c10d.zarr"
    port = _free_port()
    procs = [_torchrun(assets, c10d, nproc=1, nnodes=2, port=port, rdzv_id="two-nodes", wait=False) for _ in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    store = open_store(str(c10d))
    assert store.attrs["world_size"] == 2 and store.attrs["nodes"] == 2
    _assert_same(one, c10d)
    assert verify_store(str(c10d)) == []


def test_node_count_comes_from_the_rendezvous():
    from sae_harvest.stores.dist import node_count as _node_count
    # torchrun's variables on rank 0 of 2 nodes running 2 + 1 processes (c10d rendezvous)
    assert _node_count({"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2"}, 3) == 2
    assert _node_count({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, 4) == 2     # no GROUP_WORLD_SIZE
    assert _node_count({"WORLD_SIZE": "2"}, 2) == 1


@pytest.mark.slow
def test_c10d_nodes_with_different_process_counts(assets, tmp_path):
    """2 + 1 processes on two c10d nodes: world 3, 2 nodes recorded (not world // LOCAL_WORLD_SIZE)."""
    out = tmp_path / "hetero.zarr"
    port = _free_port()
    procs = [_torchrun(assets, out, nproc=n, nnodes=2, port=port, rdzv_id="hetero", wait=False) for n in (2, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    store = open_store(str(out))
    assert store.attrs["world_size"] == 3 and store.attrs["nodes"] == 2
    records = [json.loads(open(p).read()) for p in sorted((out / "windows").glob("*.json"))]
    assert [rec["rank"] for rec in records] == [w % 3 for w in range(len(records))]
    assert len(set(zip(store.rows_seq[:].tolist(), store.rows_pos[:].tolist()))) == store.n_rows
    assert verify_store(str(out)) == []


# ---- damage: verify and the reader ---------------------------------------------------------
def _shards(path, name="acts/blocks.0.resid_pre"):
    return sorted(p for p in (path / name / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("damage", ["delete", "empty", "truncate", "flip", "extra"])
def test_damage_caught_by_verify_and_reader(tmp_path, damage):
    path = tmp_path / "s.zarr"
    _write_store(path)
    assert verify_store(str(path)) == []
    shard = _shards(path)[1]
    data = shard.read_bytes()
    if damage == "delete":
        shard.unlink()
    elif damage == "empty":
        shard.write_bytes(b"")
    elif damage == "truncate":
        shard.write_bytes(data[:len(data) // 2])
    elif damage == "flip":
        flipped = bytearray(data)
        flipped[10] ^= 0x04                     # inside the first chunk's data
        shard.write_bytes(bytes(flipped))
    elif damage == "extra":
        # a shard beyond the records (e.g. left by a writer of another run)
        target = path / "acts" / "blocks.0.resid_pre" / "c" / "99" / "0"
        target.parent.mkdir(parents=True)
        target.write_bytes(data)
    problems = verify_store(str(path))
    assert len(problems) == 1, problems
    quick = verify_store(str(path), quick=True)
    result = CliRunner().invoke(harvest_cli, ["verify", str(path)])
    assert result.exit_code == 1 and problems[0] in result.output
    if damage == "extra":
        assert "beyond" in problems[0] and quick == problems
        return
    assert "array acts/blocks.0.resid_pre window 1" in problems[0]
    assert (quick == []) == (damage == "flip")        # --quick sees sizes only
    store = open_store(str(path))
    with pytest.raises(StoreError, match="acts/blocks.0.resid_pre"):
        store.acts("blocks.0.resid_pre", slice(None))
    with pytest.raises(StoreError):
        list(store.batches("blocks.0.resid_pre", 32, block_rows=32, seed=0, epochs=1))
    # rows of the other windows still read
    store.acts("blocks.0.resid_pre", slice(0, 32))


def test_zarr_python_alone_detects_a_flipped_bit(tmp_path):
    import zarr
    path = tmp_path / "s.zarr"
    _write_store(path)
    shard = _shards(path)[0]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x01
    shard.write_bytes(bytes(data))
    arr = zarr.open_group(str(path), mode="r")["acts/blocks.0.resid_pre"]
    with pytest.raises(Exception):
        arr[:]


def test_sample_rows_memory_independent_of_row_count():
    import tracemalloc
    from sae_harvest.train.feeds import sample_rows

    from sae_harvest.stores.split import Split

    class Rows:
        def get_orthogonal_selection(self, sel):
            return sel[0] // 128    # sequence of each row

    class Huge:
        n_rows = 10 ** 10
        split = Split(20, "derived")
        rows_seq = Rows()

        def acts(self, site, idx):
            return np.zeros((len(idx), 4), np.float32)

    tracemalloc.start()
    acts, _ = sample_rows(Huge(), "a", 1000, seed=0, exclude_pos0=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 900 < len(acts) < 1000 and acts.shape[1] == 4 and peak < 10 << 20, peak   # held-out rows dropped


# ---- refusals: one line, exit 2, nothing changed ------------------------------------------
def _run_cli(args):
    result = CliRunner().invoke(harvest_cli, ["run", *args])
    return result.exit_code, result.output


def _one_error_line(code, text, message):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), text
    assert message.lower() in lines[0].lower(), text


def _args(assets, out, *extra):
    return ["--model", assets["gpt2"], "--dataset", assets["corpus"], "--tokens", "4000", "--ctx-len", "32",
            "--sites", "blocks.0.resid_pre", "--grads", "--batch-size", "8", "--shuffle-window", "512",
            "--device", "cpu", "--out", str(out), *extra]


def test_overwrite_refuses_what_is_not_a_store(assets, tmp_path):
    folder = tmp_path / "papers"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    single = tmp_path / "notes.txt"
    single.write_text("keep me")
    for target in (folder, single):
        before = _tree_hash(target)
        code, text = _run_cli(_args(assets, target, "--overwrite"))
        _one_error_line(code, text, "not a sae_store")
        assert _tree_hash(target) == before
    code, text = _run_cli(_args(assets, "s3://some-bucket", "--overwrite"))
    _one_error_line(code, text, "whole bucket")


def test_overwrite_keeps_old_store_until_new_one_is_complete(assets, reference, tmp_path, monkeypatch):
    out = tmp_path / "o.zarr"
    harvest(_cfg(assets, out, seed=5), progress=False)
    old = _arrays(out)
    # a failing run (dataset error) leaves the old store as it was
    before = _tree_hash(out)
    code, text = _run_cli(_args(assets, out, "--overwrite", "--text-column", "body"))
    _one_error_line(code, text, "no column")
    assert _tree_hash(out) == before
    # killed midway: the old store is still complete and readable at --out
    def old_store_still_complete():
        assert open_store(str(out)).complete

    _harvest_killed_at_record(monkeypatch, 3, _cfg(assets, out), before_kill=old_store_still_complete,
                              overwrite=True)
    np.testing.assert_array_equal(_arrays(out)["acts/blocks.0.resid_pre"], old["acts/blocks.0.resid_pre"])
    _expire_lease(str(out) + ".new")
    harvest(_cfg(assets, out), overwrite=True, progress=False)
    _assert_same(reference / "full.zarr", out)
    assert not os.path.exists(str(out) + ".new") and not os.path.exists(str(out) + ".old")


def test_resume_refuses_changed_stream_other_version_and_live_writer(assets, tmp_path, monkeypatch):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(open(assets["corpus"]).read())
    out = tmp_path / "s.zarr"
    _harvest_killed_at_record(monkeypatch, 3, _cfg(assets, out, dataset=str(corpus)))
    args = ["--model", assets["gpt2"], "--dataset", str(corpus), "--tokens", "4000", "--ctx-len", "32",
            "--sites", "blocks.0.resid_pre", "--grads", "--batch-size", "8", "--shuffle-window", "512",
            "--device", "cpu", "--out", str(out), "--resume"]
    # another writer (here: a live pid on this host) holds a fresh lease: a second writer is refused
    (out / "lease.json").write_text(json.dumps({"owner": "job-a", "host": socket.gethostname(),
                                                "pid": os.getpid(), "heartbeat": time.time()}))
    before = _tree_hash(out)
    code, text = _run_cli(args)
    _one_error_line(code, text, f"pid {os.getpid()}")
    code, text = _run_cli(args[:-1] + ["--overwrite"])
    _one_error_line(code, text, "being written by")
    assert _tree_hash(out) == before
    _expire_lease(out)
    before = _tree_hash(out)
    # the corpus edited at the resume point (documents before it unchanged)
    lines = open(corpus).read().splitlines()
    position = json.loads(open(out / "windows" / "00000001.json").read())["position"]
    edited = list(lines)
    edited[position["doc"]] = json.dumps({"text": "an edited document"})
    corpus.write_text("\n".join(edited) + "\n")
    code, text = _run_cli(args)
    _one_error_line(code, text, "data stream differs")
    # the first documents edited
    edited = list(lines)
    edited[0] = json.dumps({"text": "another first document"})
    corpus.write_text("\n".join(edited) + "\n")
    code, text = _run_cli(args)
    _one_error_line(code, text, "data stream differs")
    assert _tree_hash(out) == before
    corpus.write_text("\n".join(lines) + "\n")
    # another format version (or a version that is not an int) is never written to
    meta_file = out / "zarr.json"
    original = meta_file.read_text()
    for version in (1, 3, "2"):
        meta = json.loads(original)
        meta["attributes"]["sae_store"]["format_version"] = version
        meta_file.write_text(json.dumps(meta))
        before = _tree_hash(out)
        code, text = _run_cli(args)
        _one_error_line(code, text, "format_version")
        assert _tree_hash(out) == before
    meta_file.write_text(original)
    code, text = _run_cli(args)
    assert code == 0, text
    assert open_store(str(out)).complete and verify_store(str(out)) == []


def test_all_zero_chunks_are_written_and_verify(tmp_path):
    """zarr skips chunks equal to the fill value by default; a store must still hold every shard its
    records list (all-zero gradients at the last position, all-zero token ids in synthetic stores)."""
    import numpy as np

    from sae_harvest.stores import StoreWriter, open_store
    from sae_harvest.stores.verify import verify_store

    path = str(tmp_path / "zeros.zarr")
    w = StoreWriter.create(path, meta={"model": {"name": "synthetic"}},
                           sites={"blocks.0.resid_pre": {"d": 8, "encoding": "float16"}}, grads=None,
                           ctx_len=4, n_seqs=8, window_seqs=8)
    w.write_window(0, np.zeros((8, 4)), np.repeat(np.arange(8), 4), np.tile(np.arange(4), 8),
                   {"blocks.0.resid_pre": np.zeros((32, 8), np.float32)})
    w.finish(8)
    assert verify_store(path) == []
    assert open_store(path).acts("blocks.0.resid_pre", slice(0, 32)).sum() == 0


def _overflow_worker(assets, out, which):
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harvest_overflow_worker.py")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), worker, str(out), assets["gpt2"], assets["corpus"], which]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), REPO) if p)}
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    text = r.stdout + r.stderr
    assert r.returncode != 0
    assert "rank 1: HarvestError: non-finite activations at blocks.1.resid_pre" in text, text[-3000:]
    assert "rank 0: HarvestError: another rank stopped" in text, text[-3000:]


def test_overflow_in_a_ranks_last_window_stops_every_rank_cleanly(assets, tmp_path):
    """Rank 1's last window is checked on its writer thread after the last round: its refusal must
    reach rank 0 before the final barrier (one clear line on each rank, no record for the window)."""
    out = tmp_path / "s.zarr"
    _overflow_worker(assets, out, "last")
    records = {int(p.stem) for p in (out / "windows").glob("*.json")}
    assert 3 not in records and {0, 1, 2} <= records


def test_overflow_in_another_ranks_first_window_keeps_the_old_store(assets, tmp_path):
    """--overwrite under torchrun: rank 0 replaces the old store only once every rank's first window
    passed its checks."""
    out = tmp_path / "s.zarr"
    harvest(_cfg(assets, out, sites="blocks.1.resid_pre", tokens=1024, batch_size=4, shuffle_window=256,
                 grads=False), progress=False)
    before = _tree_hash(out)
    _overflow_worker(assets, out, "first")
    assert _tree_hash(out) == before
    assert open_store(str(out)).complete
    # not even the new store beside it was started (on object storage there is no "beside": the
    # old store itself would have been cleared)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
