"""`harvest run` end to end on tiny models: values against independent references,
shuffling, determinism, resume after SIGKILL, bounded memory, S3, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sae_harvest.harvest.cli import main as harvest_cli
from sae_harvest.harvest.errors import HarvestError
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.stores import open_store
from tests.tiny_models import make_tiny_model, write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("harvest_assets")
    corpus = write_corpus(root / "docs.jsonl", n_docs=400, max_words=80)
    return {"gpt2": make_tiny_model("gpt2", root / "gpt2"), "gemma2": make_tiny_model("gemma2", root / "gemma2"),
            "corpus": str(corpus), "root": root}


def _cfg(assets, out, **kw):
    base = dict(out=str(out), model=assets["gpt2"], dataset=assets["corpus"], sites="blocks.1.resid_pre",
                tokens=4096, ctx_len=32, batch_size=8, shuffle_window=1024, device="cpu")
    base.update(kw)
    return HarvestConfig(**base)


def _arrays(path):
    store = open_store(str(path))
    out = {"tokens": store.tokens[:], "seq": store.rows_seq[:], "pos": store.rows_pos[:]}
    for s in store.sites:
        out["acts/" + s] = store.acts(s, slice(None))
        if store.has_grads:
            out["grads/" + s] = store.grads(s, slice(None))
    return out


def test_values_match_hf_hidden_states_and_autograd(assets, tmp_path):
    out = tmp_path / "s.zarr"
    harvest(_cfg(assets, out, sites="blocks.0.resid_pre,blocks.1.resid_pre,blocks.2.resid_post,blocks.1.mlp_out",
                 grads=True, act_encoding="float32", grad_encoding="float32"), progress=False)
    store = open_store(str(out))
    assert store.n_rows == 4096 and store.complete
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(assets["gpt2"]).eval()
    rows = np.random.default_rng(0).choice(store.n_rows, 40, replace=False)
    seqs, poss = store.rows_seq[:][rows], store.rows_pos[:][rows]
    for seq in np.unique(seqs):
        ids = torch.from_numpy(store.tokens[int(seq)][None].astype(np.int64))
        # independent reference: HF hidden states, and autograd through inputs_embeds
        emb = model.transformer.wte(ids).detach().requires_grad_(True)
        res = model(inputs_embeds=emb, output_hidden_states=True)
        logits = res.logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        grad0, = torch.autograd.grad(loss, emb)
        for row, pos in zip(rows[seqs == seq], poss[seqs == seq]):
            hs = res.hidden_states
            np.testing.assert_allclose(store.acts("blocks.0.resid_pre", [row])[0], hs[0][0, pos].detach(), atol=1e-5)
            np.testing.assert_allclose(store.acts("blocks.1.resid_pre", [row])[0], hs[1][0, pos].detach(), atol=1e-5)
            # resid_pre(2) + ... : the last block's output goes through ln_f in hidden_states[-1]
            np.testing.assert_allclose(store.grads("blocks.0.resid_pre", [row])[0], grad0[0, pos], rtol=1e-4,
                                       atol=1e-7)
    # the sum identity across the stored sites of block 1 and 2 is checked in test_sites; here the
    # grad of the last position must be exactly zero
    last = np.where(store.rows_pos[:] == store.ctx_len - 1)[0]
    assert np.all(store.grads("blocks.1.resid_pre", last) == 0)


def test_rows_are_shuffled_across_sequences(assets, tmp_path):
    out = tmp_path / "s.zarr"
    harvest(_cfg(assets, out, tokens=8192, shuffle_window=2048), progress=False)
    store = open_store(str(out))
    seq = store.rows_seq[:]
    window = store.attrs["window_seqs"] * store.ctx_len
    assert window >= 2048
    # within each 32-row run there are many sequences, never one sequence's rows together
    for start in range(0, len(seq), 32):
        assert len(np.unique(seq[start:start + 32])) > 10
    # rows stay within their window (what bounds memory), and each (seq, pos) appears once
    assert np.all(seq[:window] < store.attrs["window_seqs"])
    assert len(set(zip(seq.tolist(), store.rows_pos[:].tolist()))) == store.n_rows


def test_deterministic(assets, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    for out in (a, b):
        harvest(_cfg(assets, out, grads=True, sites="blocks.0.*"), progress=False)
    x, y = _arrays(a), _arrays(b)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    c = tmp_path / "c.zarr"
    harvest(_cfg(assets, c, grads=True, sites="blocks.0.*", seed=1), progress=False)
    assert not np.array_equal(_arrays(c)["seq"], x["seq"])


def _cli_args(assets, out, tokens=32768):
    return [sys.executable, "-m", "sae_harvest.harvest", "run", "--model", assets["gpt2"], "--dataset", assets["corpus"],
            "--sites", "blocks.0.resid_pre,blocks.2.mlp_out", "--grads", "--tokens", str(tokens), "--ctx-len", "32",
            "--batch-size", "4", "--shuffle-window", "1024", "--device", "cpu", "--out", str(out), "--quiet"]


def test_resume_after_sigkill_matches_uninterrupted_run(assets, tmp_path):
    full, killed = tmp_path / "full.zarr", tmp_path / "killed.zarr"
    # keep an inherited PYTHONPATH (a worktree's .shim) ahead of the repo root
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), REPO) if p)}
    subprocess.run(_cli_args(assets, full), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_cli_args(assets, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        records = killed / "windows"
        done = len(list(records.glob("*.json"))) if records.exists() else 0
        if done >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "harvest finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(Exception, match="incomplete"):
        open_store(str(killed))
    r = subprocess.run(_cli_args(assets, killed)[:-1], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "--resume" in r.stderr        # refuses without --resume
    subprocess.run(_cli_args(assets, killed) + ["--resume"], check=True, env=env, capture_output=True)
    x, y = _arrays(full), _arrays(killed)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert open_store(str(killed)).complete


# Runs one harvest in a fresh process and prints its host-memory peaks above the mark taken after
# imports and a first model load: tracemalloc (Python and numpy allocations) and the resident set
# (VmHWM, reset through /proc/self/clear_refs), which also holds torch's CPU tensors and pinned
# buffers, neither of which tracemalloc sees.
_PEAK_CHILD = r"""
import json, sys, tracemalloc
from sae_harvest.harvest.models import load_model
from sae_harvest.harvest.run import HarvestConfig, harvest
from tests.test_harvest import host_kb

cfg = HarvestConfig(**json.loads(sys.argv[1]))
load_model(cfg.model)
base = host_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
tracemalloc.start()
harvest(cfg, progress=False)
print(json.dumps({"traced": tracemalloc.get_traced_memory()[1], "resident": (host_kb("VmHWM") - base) * 1024}))
"""


def host_kb(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _harvest_peaks(cfg: HarvestConfig) -> dict:
    import dataclasses
    r = subprocess.run([sys.executable, "-c", _PEAK_CHILD, json.dumps(dataclasses.asdict(cfg))],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_host_memory_bounded_by_window(assets, tmp_path):
    """4x the tokens, same window: the peak grows by far less than the extra rows would take, both
    as tracemalloc counts it and as resident memory (torch tensors and pinned buffers included)."""
    from sae_harvest.stores import layout

    kw = dict(grads=True, sites="blocks.0.resid_pre,blocks.0.mlp_act,blocks.1.mlp_act,blocks.2.mlp_act",
              act_encoding="float32", grad_encoding="float32")   # wide rows: the extra data dwarfs noise
    p_small, p_large = (_harvest_peaks(_cfg(assets, tmp_path / f"m{n}.zarr", tokens=n, **kw)) for n in (4096, 16384))
    store = open_store(str(tmp_path / "m16384.zarr"))
    row_bytes = sum(store.attrs["sites"][s]["d"] * (layout.storage_dtype(store.encoding(s)).itemsize +
                    layout.storage_dtype(store.encoding(s, grads=True)).itemsize) for s in store.sites)
    extra = (16384 - 4096) * row_bytes   # the extra rows' acts and grads, as stored
    assert p_large["traced"] < 1.5 * p_small["traced"], (p_small, p_large)
    assert p_large["resident"] - p_small["resident"] < 0.5 * extra, (p_small, p_large, extra)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_resident_peak_sees_torch_allocations_that_tracemalloc_misses():
    """The meter above has teeth: a 64 MiB torch tensor is invisible to tracemalloc, not to VmHWM.
    In a fresh process: in this one, earlier tests leave freed but resident heap that torch may
    reuse, and then the peak does not move (seen once in CI)."""
    import subprocess
    import sys

    code = (
        "import tracemalloc, torch\n"
        "def kb(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key + ':'):\n"
        "            return int(line.split()[1])\n"
        "base = kb('VmRSS')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "tracemalloc.start()\n"
        "t = torch.ones(16 << 20)\n"
        "traced = tracemalloc.get_traced_memory()[1]\n"
        "tracemalloc.stop()\n"
        "print(traced, (kb('VmHWM') - base) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    traced, resident = map(int, out.stdout.split())
    assert traced < 1 << 20 and resident > 60 << 20, (traced, resident)


def test_gemma_defaults_to_bf16_activations(assets, tmp_path):
    out = tmp_path / "g.zarr"
    harvest(_cfg(assets, out, model=assets["gemma2"], sites="blocks.0.mlp_out", tokens=1024), progress=False)
    store = open_store(str(out))
    assert store.attrs["sites"]["blocks.0.mlp_out"]["encoding"] == "bfloat16"
    assert store.attrs["model"]["family"] == "gemma2"


def test_s3_harvest_round_trip(assets, tmp_path):
    pytest.importorskip("moto.server")
    from tests.s3server import s3_server
    local = tmp_path / "local.zarr"
    harvest(_cfg(assets, local, grads=True), progress=False)
    with s3_server() as bucket:
        url = f"{bucket}/lab/run1.zarr"
        harvest(_cfg(assets, url, grads=True), progress=False)
        remote = _arrays(url)
        with pytest.raises(HarvestError, match="already exists"):
            harvest(_cfg(assets, url), progress=False)
    for k, v in _arrays(local).items():
        np.testing.assert_array_equal(v, remote[k], err_msg=k)


def _run_cli(args):
    result = CliRunner().invoke(harvest_cli, ["run", *args])
    return result.exit_code, result.output   # click >= 8.2 mixes stderr into output


@pytest.mark.parametrize("extra, message", [
    (["--sites", "blocks.0.resid_sideways"], "unknown site kind"),
    (["--sites", "blocks.7.resid_pre"], "layer"),
    (["--model", "/nonexistent/model"], "not found"),
    (["--dataset", "/nonexistent/data.jsonl"], "not found"),
    (["--text-column", "body"], "no column 'body'"),
    (["--ctx-len", "4096"], "longer than the model's context"),
])
def test_bad_input_one_clear_line(assets, tmp_path, extra, message):
    out = tmp_path / "bad.zarr"
    args = ["--model", assets["gpt2"], "--dataset", assets["corpus"], "--tokens", "256", "--ctx-len", "32",
            "--sites", "blocks.0.resid_pre", "--device", "cpu", "--out", str(out), *extra]
    code, text = _run_cli(args)
    assert code != 0
    assert "Traceback" not in text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message.lower() in lines[0].lower(), text
    assert not out.exists()


def test_existing_store_untouched_without_resume_or_overwrite(assets, tmp_path):
    out = tmp_path / "s.zarr"
    harvest(_cfg(assets, out), progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, text = _run_cli(["--model", assets["gpt2"], "--dataset", assets["corpus"], "--tokens", "256",
                           "--ctx-len", "32", "--device", "cpu", "--out", str(out)])
    assert code != 0 and "already exists" in text and "Traceback" not in text
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    # a bad model with --overwrite must not delete the existing store either
    code, text = _run_cli(["--model", "/nonexistent", "--dataset", assets["corpus"], "--out", str(out),
                           "--overwrite", "--device", "cpu"])
    assert code != 0 and open_store(str(out)).complete


def test_fp16_overflow_is_a_clear_error(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    big = tmp_path / "big"
    model = AutoModelForCausalLM.from_pretrained(assets["gpt2"])
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e6)    # residual stream far beyond fp16's 65504
    model.save_pretrained(big)
    AutoTokenizer.from_pretrained(assets["gpt2"]).save_pretrained(big)
    code, text = _run_cli(["--model", str(big), "--dataset", assets["corpus"], "--tokens", "256", "--ctx-len", "32",
                           "--sites", "blocks.1.resid_pre", "--device", "cpu", "--out", str(tmp_path / "o.zarr"),
                           "--act-encoding", "float16"])
    assert code != 0 and "non-finite" in text and "Traceback" not in text


def test_overflow_in_a_later_window_is_refused_before_its_record(assets, tmp_path, monkeypatch):
    """Windows after the first are checked on the writer thread (while the device runs the next
    window): an overflow there must still stop the harvest with no record for that window."""
    from sae_harvest.harvest import window as window_mod
    from sae_harvest.stores.writer import load_records

    real_capture, calls = window_mod.capture, []

    def capture(*a, **k):
        got = real_capture(*a, **k)
        calls.append(1)
        if len(calls) == 5:   # window 2 (2 batches of 4 sequences per 256-row window)
            for name in got.acts:
                got.acts[name] = got.acts[name] * 1e6
        return got

    monkeypatch.setattr(window_mod, "capture", capture)
    out = tmp_path / "s.zarr"
    code, text = _run_cli(["--model", assets["gpt2"], "--dataset", assets["corpus"], "--sites", "blocks.1.resid_pre",
                           "--tokens", "2048", "--ctx-len", "32", "--batch-size", "4", "--shuffle-window", "256",
                           "--device", "cpu", "--act-encoding", "float16", "--out", str(out), "--quiet"])
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in text, text
    assert len(lines) == 1 and "non-finite activations at blocks.1.resid_pre" in lines[0], text
    records = load_records(str(out))
    assert 2 not in records and {0, 1} <= set(records)
    assert all(w < 2 for w in records)   # nothing after the refused window was written either
