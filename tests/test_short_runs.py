"""Issue 22 item 6: `train fit` says when a run is too short to mean anything; tokens_per_s after
--resume counts only the resumed part. (The held-out part no longer grows to whole blocks: it is the
store's split of whole sequences, stores/split.py.)"""
import json
import signal
import warnings

import pytest
from click.testing import CliRunner

from sae_harvest.stores import open_store
from sae_harvest.train.cli import main as train_cli
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.driver import TrainInterrupted
from sae_harvest.train.feeds import train_tokens
from sae_harvest.train.fit import fit
from tests.test_train_loop import _cfg, make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("short") / "s.zarr"
    make_store(path, grads=False)   # 64 sequences of 32 tokens, blocks of 16 sequences
    return path


def _warnings(output):
    return [line for line in output.splitlines() if line.startswith("warning:")]


def test_short_pass_warns_one_line_with_numbers(store, tmp_path):
    s = open_store(str(store))
    train_rows = train_tokens(s, exclude_pos0=True)   # the split's held-out sequences and position 0 excluded
    args = ["fit", "--store", str(store), "--site", "blocks.0.resid_pre", "--k", "4", "--d-sae", "32",
            "--batch-size", "256", "--device", "cpu", "--quiet", "--out", str(tmp_path / "a")]
    r = CliRunner().invoke(train_cli, args)
    assert r.exit_code == 0, r.output
    lines = _warnings(r.output)
    assert len(lines) == 1, r.output
    (short,) = lines
    assert f"one pass over the store is {train_rows // 256} steps of 256 rows (< 200" in short
    assert f"{train_rows:,} training rows" in short
    summary = json.loads(r.output.splitlines()[-1])   # stdout's JSON stays the last line
    assert "topk_k4" in summary


def test_no_warning_for_a_long_enough_run(store, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(_cfg(store, tmp_path / "b", batch_size=4, tokens=4 * 5), progress=False)


def test_library_callers_get_python_warnings(store, tmp_path):
    with pytest.warns(UserWarning, match=r"one pass over the store is \d+ steps"):
        fit(_cfg(store, tmp_path / "c", tokens=256 * 2), progress=False)


def _meta(out, base, epochs):
    return TrainConfig(out=str(out), decoder_of=base, arch="batchtopk", d_sae=8, k=(2,), batch_size=64,
                       epochs=epochs, device="cpu")


def test_meta_sae_warns_on_total_steps_not_per_pass(store, tmp_path):
    fit(_cfg(store, tmp_path / "base", tokens=256 * 2, d_sae=64), progress=False)
    base = str(tmp_path / "base" / "topk_k4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(_meta(tmp_path / "meta", base, epochs=200), progress=False)      # one step a pass, 200 passes
    with pytest.warns(UserWarning, match=r"the run is 3 steps \(< 200\): raise --epochs"):
        fit(_meta(tmp_path / "meta3", base, epochs=3), progress=False)


def test_tokens_per_s_after_resume_counts_only_the_resumed_steps(store, tmp_path):
    out = tmp_path / "r"

    def interrupt_at_4(event):
        if event.step == 3:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainInterrupted):
        fit(_cfg(store, out, tokens=256 * 6), progress=False, on_step=interrupt_at_4)
    (summary,) = fit(_cfg(store, out, tokens=256 * 6), resume=True, progress=False).values()
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 256 and summary["resumed_from_step"] == 4
    assert summary["tokens_per_s"] * summary["seconds"] == pytest.approx(2 * 256)
    (fresh,) = fit(_cfg(store, tmp_path / "f", tokens=256 * 6), progress=False).values()
    assert fresh["resumed_from_step"] == 0
    assert fresh["tokens_per_s"] * fresh["seconds"] == pytest.approx(6 * 256)
