"""`train fit` on synthetic stores: sweeps, folding, held-out split, resume, meta-SAEs, bad input."""
import json
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sae_harvest import train
from sae_harvest.stores import StoreWriter, open_store
from sae_harvest.train.cli import main as train_cli
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.errors import TrainError
from sae_harvest.train.driver import TrainInterrupted
from sae_harvest.train.fit import fit

D = 16


def make_store(path, *, n_seqs=64, ctx=32, window_seqs=16, grads=True, complete=True, seed=0):
    """Rows are sparse combinations of a planted dictionary, scaled far from unit norm, with a huge
    position-0 row (like GPT-2's BOS) that training must skip."""
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(48, D))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    w = StoreWriter.create(str(path), meta={"model": {"name": "synthetic"}},
                           sites={"blocks.0.resid_pre": {"d": D, "encoding": "float32"},
                                  "blocks.1.resid_pre": {"d": D, "encoding": "float16"}},
                           grads={"encoding": "bfloat16", "definition": "synthetic"} if grads else None,
                           ctx_len=ctx, n_seqs=n_seqs, window_seqs=window_seqs)
    windows = n_seqs // window_seqs
    for win in range(windows if complete else windows - 1):
        n = window_seqs * ctx
        codes = (rng.random((n, 48)) < 0.06) * rng.uniform(1, 3, (n, 48))
        acts = (codes @ dictionary * 20.0).astype(np.float32)
        seqs = np.repeat(np.arange(win * window_seqs, (win + 1) * window_seqs), ctx)
        pos = np.tile(np.arange(ctx), window_seqs)
        acts[pos == 0] = 3000.0
        perm = rng.permutation(n)
        g = (rng.normal(size=(n, D)) * 1e-6).astype(np.float32)
        w.write_window(win, rng.integers(0, 50, (window_seqs, ctx)), seqs[perm], pos[perm],
                       {"blocks.0.resid_pre": acts[perm], "blocks.1.resid_pre": acts[perm] * 0.5},
                       {"blocks.0.resid_pre": g[perm], "blocks.1.resid_pre": g[perm]} if grads else None)
    if complete:
        w.finish(n_seqs)
    return dictionary


def _cfg(store, out, **kw):
    base = dict(store=str(store), out=str(out), site="blocks.0.resid_pre", arch="topk", k=(4,), d_sae=64,
                batch_size=256, device="cpu", log_every=5, checkpoint_every=1000)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "s.zarr"
    make_store(path)
    return path


def test_sweep_saves_saelens_checkpoints_and_metrics(store, tmp_path):
    out = tmp_path / "run"
    summaries = fit(_cfg(store, out, k=(2, 4, 8), tokens=256 * 100, log_every=20), progress=False)
    assert list(summaries) == ["topk_k2", "topk_k4", "topk_k8"]
    for name, k in (("topk_k2", 2), ("topk_k4", 4), ("topk_k8", 8)):
        cfg = json.loads((out / name / "cfg.json").read_text())
        assert cfg["architecture"] == "topk" and cfg["k"] == k and cfg["d_in"] == D and cfg["d_sae"] == 64
        assert cfg["hook_name"] == "blocks.0.hook_resid_pre" and cfg["sae_harvest"]["store"] == str(store)
        assert cfg["sae_harvest"]["hook_name"] == "blocks.0.resid_pre"   # TransformerLens name on top, ours kept
        assert cfg["sae_harvest"]["training"]["batch_size"] == 256
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [20, 40, 60, 80, 100]
        assert {"loss", "mse", "l0", "nmse", "dead_fraction", "lr"} <= set(records[-1])
        assert records[-1]["l0"] == pytest.approx(k)
        sae = train.load_sae(out / name)
        assert sae.cfg.k == k
        assert summaries[name]["held_out"]["l0"] == pytest.approx(k)
    # bigger k reconstructs better on held-out data
    nmse = [summaries[n]["held_out"]["nmse"] for n in ("topk_k2", "topk_k4", "topk_k8")]
    assert nmse[0] > nmse[1] > nmse[2]


def test_saved_sae_takes_raw_activations(store, tmp_path):
    """Normalisation is folded in: the saved SAE on raw held-out rows reproduces the reported NMSE."""
    out = tmp_path / "run"
    summary = fit(_cfg(store, out, arch="relu", l1=(1.0,), lr=3e-3, tokens=256 * 150),
                  progress=False)["relu_l1-1"]
    assert summary["input_scale"] > 5          # the synthetic data is far from E||x|| = sqrt(d)
    s = open_store(str(store))
    idx = np.flatnonzero(s.split.is_held_out(s.rows_seq[:]) & (s.rows_pos[:] != 0))
    x = torch.from_numpy(s.acts("blocks.0.resid_pre", idx))
    sae = train.load_sae(out / "relu_l1-1")
    with torch.no_grad():
        x_hat = sae(x)
    nmse = float((x_hat - x).pow(2).sum() / x.pow(2).sum())
    assert nmse == pytest.approx(summary["held_out"]["nmse"], rel=1e-3)
    assert nmse < 0.5


def test_held_out_rows_never_trained_on(store, tmp_path):
    seen = []
    cfg = _cfg(store, tmp_path / "r", tokens=256 * 200)    # several epochs over the training rows
    fit(cfg, progress=False, on_step=lambda event: seen.append(event.inputs[0].clone()))
    s = open_store(str(store))
    held = np.flatnonzero(s.split.is_held_out(s.rows_seq[:]))   # an older store: the derived split
    assert s.split.origin == "derived" and len(held) == len(s.split.held_out_seqs(s.n_seqs)) * s.ctx_len
    held_x = s.acts("blocks.0.resid_pre", held)
    scale = json.loads((tmp_path / "r" / "topk_k4" / "summary.json").read_text())["input_scale"]
    trained = torch.cat(seen)
    # the loop feeds acts / scale: recompute that exactly for the held-out rows and look for them
    norms = np.linalg.norm(held_x, axis=1)
    held_norm = torch.from_numpy(held_x[(norms < 1e4) & (norms > 1e-3)]) / scale
    held_set = {tuple(r) for r in held_norm.numpy().tolist()}
    assert len(held_set) > 100
    assert not any(tuple(r) in held_set for r in trained.numpy().tolist())
    # and no position-0 row (norm 3000 * sqrt(16) before scaling)
    assert (trained * scale).norm(dim=-1).max() < 3000


def test_resume_continues_exactly(store, tmp_path):
    full = tmp_path / "full"
    fit(_cfg(store, full, arch="batchtopk", k=(4,), tokens=256 * 24), progress=False)
    part = tmp_path / "part"

    def interrupt_at_11(event):
        if event.step == 10:
            signal.raise_signal(signal.SIGINT)   # what Ctrl-C does: the loop saves and stops

    with pytest.raises(TrainInterrupted, match="--resume"):
        fit(_cfg(store, part, arch="batchtopk", k=(4,), tokens=256 * 24), progress=False, on_step=interrupt_at_11)
    with pytest.raises(TrainError, match="already exists"):
        fit(_cfg(store, part, arch="batchtopk", k=(4,), tokens=256 * 24), progress=False)
    fit(_cfg(store, part, arch="batchtopk", k=(4,), tokens=256 * 24), resume=True, progress=False)
    a = train.load_sae(full / "batchtopk_k4").state_dict()
    b = train.load_sae(part / "batchtopk_k4").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    steps = [json.loads(l)["step"] for l in (part / "batchtopk_k4" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 24


def test_resume_with_another_checkpoint_interval_continues_exactly(store, tmp_path):
    # how often state is saved does not change the weights, so it may change across a resume (the
    # Pareto benches moved from no checkpoints to one every 500 steps); any other option still may not
    full = tmp_path / "full"
    fit(_cfg(store, full, k=(4,), tokens=256 * 24), progress=False)
    part = tmp_path / "part"

    def interrupt_at_11(event):
        if event.step == 10:
            signal.raise_signal(signal.SIGINT)
    with pytest.raises(TrainInterrupted):
        fit(_cfg(store, part, k=(4,), tokens=256 * 24, checkpoint_every=10**9), progress=False,
            on_step=interrupt_at_11)
    with pytest.raises(TrainError, match="options differ from the saved run: lr"):
        fit(_cfg(store, part, k=(4,), tokens=256 * 24, checkpoint_every=7, lr=1e-2), resume=True, progress=False)
    fit(_cfg(store, part, k=(4,), tokens=256 * 24, checkpoint_every=7), resume=True, progress=False)
    a, b = train.load_sae(full / "topk_k4").state_dict(), train.load_sae(part / "topk_k4").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_gtopk_uses_store_gradients(store, tmp_path):
    out = tmp_path / "g"
    summary = fit(_cfg(store, out, arch="gtopk", k=(4,), tokens=256 * 10), progress=False)
    cfg = json.loads((out / "gtopk_k4" / "cfg.json").read_text())
    assert "without gradients" in cfg["inference"] and cfg["sae_harvest"]["sae"]["beta"] == 0   # as asked
    assert float(train.load_sae(out / "gtopk_k4").beta) > 0   # calibrated: state saved with the weights
    assert summary["gtopk_k4"]["held_out"]["l0"] == pytest.approx(4)


def test_meta_sae_on_decoder_rows(store, tmp_path):
    fit(_cfg(store, tmp_path / "base", tokens=256 * 10), progress=False)
    meta = fit(TrainConfig(out=str(tmp_path / "meta"), decoder_of=str(tmp_path / "base" / "topk_k4"),
                           arch="batchtopk", k=(2,), d_sae=8, batch_size=32, epochs=20, device="cpu"),
               progress=False)
    (name, summary), = meta.items()
    assert summary["steps"] == 20 * 2        # 64 rows / 32 per batch, 20 epochs
    assert train.load_sae(tmp_path / "meta" / name).cfg.d_in == D


def _cli(args):
    r = CliRunner().invoke(train_cli, ["fit", *args])
    return r.exit_code, r.output


@pytest.mark.parametrize("args, message", [
    (["--store", "/nonexistent.zarr"], "no store"),
    (["--site", "blocks.9.mlp_out"], "it has: blocks.0.resid_pre, blocks.1.resid_pre"),
    (["--arch", "sparse-magic"], "unknown --arch"),
    (["--site", None], "pick one with --site"),
    (["--k", "100"], "k <= d_sae"),
    (["--arch", "matryoshka_batchtopk", "--prefixes", "32,8"], "prefixes must be increasing"),
    (["--arch", "jumprelu", "--bandwidth", "0"], "bandwidth > 0"),
])
def test_bad_input_one_clear_line(store, tmp_path, args, message):
    base = {"--store": str(store), "--site": "blocks.0.resid_pre", "--d-sae": "64", "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        if value is None:
            base.pop(flag)
        else:
            base[flag] = value
    flat = [x for kv in base.items() for x in kv]
    code, text = _cli(flat)
    assert code != 0 and "Traceback" not in text
    assert text.startswith("error:") and message in text, text
    assert len(text.strip().splitlines()) == 1


def test_incomplete_store_and_width_mismatch(tmp_path, store):
    partial = tmp_path / "p.zarr"
    make_store(partial, complete=False)
    code, text = _cli(["--store", str(partial), "--site", "blocks.0.resid_pre", "--out", str(tmp_path / "o")])
    assert code != 0 and "incomplete" in text
    fit(_cfg(store, tmp_path / "small", d_sae=32, tokens=256 * 2), progress=False)
    code, text = _cli(["--store", str(store), "--site", "blocks.0.resid_pre", "--d-sae", "64",
                       "--init", str(tmp_path / "small" / "topk_k4"), "--out", str(tmp_path / "o2")])
    assert code != 0 and "16->32" in text and "Traceback" not in text


def test_overwrite_removes_only_what_train_fit_wrote(store, tmp_path):
    """--overwrite replaces a previous `train fit` folder, and refuses a folder holding anything else
    (one line, exit 2, every file left as it was)."""
    import hashlib

    ours = tmp_path / "ours"
    fit(_cfg(store, ours, tokens=256 * 4), progress=False)
    fit(_cfg(store, ours, tokens=256 * 4, seed=1), overwrite=True, progress=False)
    assert json.loads((ours / "topk_k4" / "cfg.json").read_text())["sae_harvest"]["training"]["seed"] == 1
    foreign = tmp_path / "foreign"
    (foreign / "topk_k4").mkdir(parents=True)
    (foreign / "notes.txt").write_text("my notes")
    (foreign / "topk_k4" / "analysis.ipynb").write_text("{}")

    def digest():
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in foreign.rglob("*") if p.is_file()}

    before = digest()
    with pytest.raises(TrainError, match="did not write"):
        fit(_cfg(store, foreign, tokens=256 * 4), overwrite=True, progress=False)
    r = CliRunner().invoke(train_cli, ["fit", "--store", str(store), "--site", "blocks.0.resid_pre",
                                       "--out", str(foreign), "--overwrite", "--device", "cpu"])
    assert r.exit_code == 2 and r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1
    assert digest() == before


def test_auxk_runs_exactly_when_latents_are_dead(store, tmp_path, monkeypatch):
    """The trainer skips AuxK (no GPU sync) only while the host's bound proves no latent dead: the
    bound never falls below the true longest gap, and AuxK gets a dead mask at every step that has
    a dead latent (a dictionary much wider than the data's 48 directions leaves some dead)."""
    from sae_harvest.train import topk

    masks, real = [], topk.auxk_loss

    def spy(sae, pre, resid, dead_mask, *rest):   # rest: the sparse backward's values_at
        masks.append(None if dead_mask is None else dead_mask.clone())
        return real(sae, pre, resid, dead_mask, *rest)

    monkeypatch.setattr(topk, "auxk_loss", spy)
    checked = []

    def check(event):
        run = next(iter(event.runs.values()))
        assert run.idle_bound >= int(run.since_fired.max())
        checked.append(int((run.since_fired >= 256 * 3).sum()))   # dead_tokens below

    out = tmp_path / "o"
    fit(_cfg(store, out, d_sae=256, k=(2,), tokens=256 * 40, dead_tokens=256 * 3), progress=False, on_step=check)
    assert len(masks) == len(checked) == 40
    for dead_count, mask in zip(checked, masks):
        if dead_count:
            assert mask is not None and int(mask.sum()) == dead_count
        elif mask is not None:
            assert not mask.any()
    assert any(checked), "no latent went dead: the test does not exercise AuxK"
    assert any(m is None for m in masks), "AuxK was never skipped"
    aux = [json.loads(line)["aux"] for line in (out / "topk_k2" / "metrics.jsonl").read_text().splitlines()]
    assert max(aux) > 0
