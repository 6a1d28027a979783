"""`train fit` never trains over what it did not write, never deletes what it cannot prove it wrote,
never resumes a meta-SAE on another parent, and never saves a diverged run as finished (safety
review, stop 16: items 2, 3, 6, 9). Each test fails on the code before its fix."""
import hashlib
import json
import signal

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from sae_harvest.train.cli import main as train_cli
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.driver import TrainInterrupted
from sae_harvest.train.errors import Diverged, TrainError
from sae_harvest.train.fit import fit
from sae_harvest.train.runs import made_by_train
from sae_harvest.train.sae_io import CheckpointError
from tests.test_train_loop import _cfg, make_store

FIT = ("--site", "blocks.0.resid_pre", "--arch", "topk", "--k", "4", "--d-sae", "32", "--batch-size", "256",
       "--device", "cpu", "--tokens", str(256 * 4), "--quiet")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("outsafety") / "s.zarr"
    make_store(path, grads=False)
    return path


def _tree(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _cli(*args):
    r = CliRunner().invoke(train_cli, ["fit", *map(str, args)])
    return r.exit_code, [line for line in r.output.splitlines() if line.strip()], r.output


def _refused(args, *, contains: str):
    code, lines, output = _cli(*args)
    assert code == 2 and len(lines) == 1 and "Traceback" not in output, output
    assert contains in lines[0], lines[0]


def _saelens_folder(root):
    """What a SAELens download looks like: cfg.json, weights and a README, no checkpoint."""
    sae = root / "topk_k4"
    sae.mkdir(parents=True)
    (sae / "cfg.json").write_text(json.dumps({"d_in": 16, "d_sae": 32, "architecture": "topk"}))
    save_file({"W_enc": torch.ones(16, 32)}, str(sae / "sae_weights.safetensors"))
    (sae / "README.md").write_text("downloaded from the hub\n")
    return root


# ---- 2. --resume with no checkpoint --------------------------------------------------------------
def test_resume_without_a_checkpoint_never_trains_over_a_foreign_folder(store, tmp_path):
    foreign = _saelens_folder(tmp_path / "foreign")
    before = _tree(foreign)
    _refused(["--store", store, "--out", foreign, *FIT, "--resume"], contains="no `train fit` checkpoint")
    assert _tree(foreign) == before


def test_resume_without_a_checkpoint_keeps_a_finished_run(store, tmp_path):
    """A finished run whose checkpoint was deleted to save space: --resume must not retrain it over."""
    out = tmp_path / "done"
    fit(_cfg(store, out, d_sae=32, tokens=256 * 4), progress=False)
    import shutil
    shutil.rmtree(out / "checkpoint")
    before = _tree(out)
    _refused(["--store", store, "--out", out, *FIT, "--resume"], contains="no `train fit` checkpoint")
    assert _tree(out) == before


def test_a_run_killed_before_its_first_checkpoint_restarts_with_resume_or_overwrite(store, tmp_path):
    """SIGKILL (OOM, a Slurm hard kill) before the first checkpoint leaves only the SAE folders'
    metrics logs: --resume starts the run again and --overwrite replaces it; a user's look-alike
    folder (another log) is still refused."""
    for flag in ("--resume", "--overwrite"):
        out = tmp_path / flag.strip("-")
        (out / "topk_k4").mkdir(parents=True)
        (out / "topk_k4" / "metrics.jsonl").write_text('{"step": 5, "tokens": 1280, "loss": 1.0}\n')
        code, _, output = _cli("--store", store, "--out", out, *FIT, flag)
        assert code == 0, output
        assert (out / "topk_k4" / "cfg.json").exists()
    other = tmp_path / "users"
    (other / "run").mkdir(parents=True)
    (other / "run" / "metrics.jsonl").write_text('{"epoch": 1, "acc": 0.9}\n')
    _refused(["--store", store, "--out", other, *FIT, "--resume"], contains="no `train fit` checkpoint")


def test_overwrite_accepts_a_save_killed_midway(tmp_path):
    """A kill inside the first save leaves .checkpoint.tmp with a half-written state.json and a
    safetensors file cut inside its header: still ours; a whole header that is not ours is not."""
    out = tmp_path / "cut"
    tmp = out / ".checkpoint.tmp"
    tmp.mkdir(parents=True)
    (tmp / "state.json").write_text('{\n  "step": 3,\n  "conf')
    (tmp / "topk_k4.safetensors").write_bytes((1000).to_bytes(8, "little") + b'{"sae.W_enc": {"dtype"')
    assert made_by_train(out)
    header = json.dumps({"model.embed": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp / "topk_k4.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    assert not made_by_train(out)


def test_out_in_a_store_is_refused_with_or_without_resume(store, tmp_path):
    before = _tree(store)
    _refused(["--store", store, "--out", store, *FIT, "--resume"], contains="inside the store")
    _refused(["--store", store, "--out", store / "saes", *FIT], contains="inside the store")
    _refused(["--store", store, "--out", store / "saes", *FIT, "--resume"], contains="inside the store")
    assert _tree(store) == before and not (store / "saes").exists()


def test_resume_into_an_empty_or_absent_out_starts_the_run(store, tmp_path):
    """Nothing there, nothing to lose: a job always launched with --resume (Slurm requeue) starts."""
    code, _, output = _cli("--store", store, "--out", tmp_path / "new", *FIT, "--resume")
    assert code == 0, output
    assert (tmp_path / "new" / "topk_k4" / "cfg.json").exists()


def test_resume_refuses_a_checkpoint_of_another_store_or_config(store, tmp_path):
    """Already so before this fix; kept here beside the no-checkpoint cases it completes."""
    other = tmp_path / "s2.zarr"
    make_store(other, grads=False, seed=1)
    out = tmp_path / "run"
    fit(_cfg(store, out, d_sae=32, tokens=256 * 4), progress=False)
    before = _tree(out)
    _refused(["--store", other, "--out", out, *FIT, "--resume"], contains="options differ from the saved run: store")
    _refused(["--store", store, "--out", out, *FIT[:5], "8", *FIT[6:], "--resume"], contains="options differ")
    assert _tree(out) == before


# ---- 3. --overwrite and someone else's checkpoint/*.safetensors ----------------------------------
def test_overwrite_never_deletes_a_users_checkpoint_safetensors(store, tmp_path):
    user = tmp_path / "userdir" / "checkpoint"
    user.mkdir(parents=True)
    for i in (1, 2):
        save_file({"w": torch.full((4,), float(i))}, str(user / f"model-0000{i}-of-00002.safetensors"))
    before = _tree(tmp_path / "userdir")
    assert not made_by_train(tmp_path / "userdir")
    _refused(["--store", store, "--out", tmp_path / "userdir", *FIT, "--overwrite"], contains="did not write")
    assert _tree(tmp_path / "userdir") == before
    # a state.json that is not this tool's does not make the folder ours either
    (user / "state.json").write_text(json.dumps({"epoch": 3}))
    assert not made_by_train(tmp_path / "userdir")


def test_overwrite_still_replaces_this_tools_interrupted_run(store, tmp_path):
    out = tmp_path / "ours"

    def stop(event):
        if event.step == 2:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainInterrupted):
        fit(_cfg(store, out, d_sae=32, tokens=256 * 6), progress=False, on_step=stop)
    assert made_by_train(out)
    # a save killed before its state.json: the files in .checkpoint.tmp are ours by their tensors
    tmp = out / ".checkpoint.tmp"
    tmp.mkdir()
    (tmp / "topk_k4.safetensors").write_bytes((out / "checkpoint" / "topk_k4.safetensors").read_bytes())
    assert made_by_train(out)
    save_file({"w": torch.ones(2)}, str(tmp / "model.safetensors"))
    assert not made_by_train(out)


# ---- 6. a meta-SAE resumed after its parent changed ----------------------------------------------
def test_meta_sae_resume_refuses_a_retrained_parent(store, tmp_path):
    parent = tmp_path / "base"
    fit(_cfg(store, parent, d_sae=32, tokens=256 * 4), progress=False)
    meta_cfg = TrainConfig(out=str(tmp_path / "meta"), decoder_of=str(parent / "topk_k4"), arch="batchtopk",
                           k=(2,), d_sae=8, batch_size=16, epochs=4, device="cpu", log_every=1)

    def stop(event):
        if event.step == 3:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainInterrupted):
        fit(meta_cfg, progress=False, on_step=stop)

    def stop_again(event):
        if event.step == 5:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainInterrupted):   # the same parent resumes
        fit(meta_cfg, resume=True, progress=False, on_step=stop_again)
    fit(_cfg(store, parent, d_sae=32, tokens=256 * 4, seed=1), overwrite=True, progress=False)   # refit
    before = _tree(tmp_path / "meta")
    with pytest.raises(CheckpointError, match="decoder's sha256 differs"):
        fit(meta_cfg, resume=True, progress=False)
    assert _tree(tmp_path / "meta") == before

    # the parent's fingerprint is in the finished meta-SAE's cfg.json and matches it
    fit(meta_cfg, overwrite=True, progress=False)
    record = json.loads((tmp_path / "meta" / "batchtopk_k2" / "cfg.json").read_text())["sae_harvest"]
    from sae_harvest.train.local import decoder_identity
    from sae_harvest.train.sae_io import load_sae
    assert record["decoder_of_identity"] == decoder_identity(load_sae(parent / "topk_k4").W_dec)


# ---- 9. non-finite options and divergence --------------------------------------------------------
@pytest.mark.parametrize("flag, value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"), ("--grad-clip", "nan"), ("--lr-final-fraction", "nan"),
    ("--warmup-fraction", "nan"), ("--warmup-fraction", "2"), ("--l1", "nan"),
    ("--log-every", "0"),
])
def test_non_finite_or_out_of_range_options_are_one_line(store, tmp_path, flag, value):
    args = [a for a in FIT if a != "topk"] if flag == "--l1" else list(FIT)
    if flag == "--l1":
        args[args.index("--arch") + 1:args.index("--arch") + 1] = ["relu"]
        del args[args.index("--k"):args.index("--k") + 2]
    _refused(["--store", store, "--out", tmp_path / "o", *args, flag, value], contains=flag)
    assert not (tmp_path / "o").exists()


def test_a_diverged_run_is_not_saved_as_finished(store, tmp_path):
    code, lines, output = _cli("--store", store, "--out", tmp_path / "o", *FIT, "--lr", "1e30", "--log-every", "1")
    lines = [line for line in lines if not line.startswith("warning:")]   # the short-run warning
    assert code == 2 and len(lines) == 1 and "diverged" in lines[0] and "Traceback" not in output, output
    assert not (tmp_path / "o" / "topk_k4" / "cfg.json").exists()
    assert not (tmp_path / "o" / "topk_k4" / "sae_weights.safetensors").exists()
    assert "--overwrite" in lines[0]   # what it says works: the logs left are this trainer's
    code, _, output = _cli("--store", store, "--out", tmp_path / "o", *FIT, "--overwrite")
    assert code == 0 and (tmp_path / "o" / "topk_k4" / "cfg.json").exists(), output


def test_divergence_keeps_the_last_good_checkpoint(store, tmp_path):
    out = tmp_path / "o"

    def poison(event):   # weights blow up after the step-3 checkpoint
        if event.step == 4:
            with torch.no_grad():
                event.runs["topk_k4"].sae.W_enc.fill_(float("nan"))

    with pytest.raises(Diverged, match=r"step 5.*last good checkpoint \(step 3\)"):
        fit(_cfg(store, out, d_sae=32, tokens=256 * 8, checkpoint_every=3), progress=False, on_step=poison)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint" / "topk_k4.safetensors")).values())
    assert not (out / "topk_k4" / "cfg.json").exists()
    assert made_by_train(out)   # so the message's `--overwrite` works


def test_nan_weights_never_replace_a_checkpoint(store, tmp_path):
    """Weights gone non-finite between log steps: the periodic checkpoint is refused, not written."""
    out = tmp_path / "o"

    def poison(event):
        if event.step == 4:
            with torch.no_grad():
                event.runs["topk_k4"].sae.b_dec.fill_(float("inf"))

    with pytest.raises(Diverged):
        fit(_cfg(store, out, d_sae=32, tokens=256 * 8, checkpoint_every=3, log_every=100), progress=False,
            on_step=poison)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    assert not (out / "topk_k4" / "cfg.json").exists()


def test_train_error_is_the_refusal_type(store, tmp_path):
    """Library callers get a TrainError (a UserError), not a torch ValueError, for --lr nan."""
    with pytest.raises(TrainError, match="--lr must be a finite number"):
        fit(_cfg(store, tmp_path / "o", lr=float("nan")), progress=False)
