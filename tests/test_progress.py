"""Issue 22 item 4: progress that fits the terminal. The numbers (step/total, tokens/s, ETA) come
first whatever the width, per-SAE metrics get their own lines, nothing wraps, and the display leaves
nothing behind when training ends."""
import io
import re

import pytest
from rich.console import Console

from sae_harvest.stores.progress import StepProgress, token_progress
from sae_harvest.train.fit import fit
from tests.test_train_loop import _cfg, make_store

SWEEP = [{"sae": f"topk_k{k}", "loss": 0.1234, "l0": float(k), "nmse": 0.0983, "dead": 0.01} for k in (16, 32, 64)]


def _render(progress, width):
    console = Console(width=width, record=True, force_terminal=True, color_system=None)
    for renderable in progress.get_renderables():
        console.print(renderable)
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [60, 80, 120])
def test_step_line_keeps_step_rate_eta_and_each_sae_has_its_line(width):
    p = StepProgress(4096, console=Console(width=width))
    p.add_task("train", total=10_000, completed=1234)
    p.set_metrics(SWEEP)
    lines = _render(p, width)
    assert all(len(line) <= width for line in lines), lines
    step = lines[0]
    assert re.match(r"train step +1234/10000 +(- |[\d,]+ )tok/s eta \S+ ", step), step
    assert [line.split()[0] for line in lines[1:]] == ["topk_k16", "topk_k32", "topk_k64"]
    assert all("l0" in line and "nmse" in line for line in lines[1:])
    p.set_metrics(SWEEP * 4)                                    # 12 SAEs: 8 lines and a count
    lines = _render(p, width)
    assert len(lines) == 1 + 8 + 1 and "+4 more SAEs" in lines[-1]


def test_rate_is_tokens_per_second_from_steps():
    p = StepProgress(4096, console=Console(width=80))
    task = p.add_task("train", total=100)
    for t in (0.0, 1.0, 2.0):   # two steps a second
        p._tasks[task]._progress.append(type("S", (), {"timestamp": t, "completed": 2})())
    p._tasks[task].completed = 6
    line = _render(p, 80)[0]
    assert "8,192 tok/s" in line, line


def test_token_progress_long_info_is_cut_not_wrapped():
    p = token_progress(console=Console(width=80))
    p.add_task("splicing", total=1_000_000, completed=1000, info="a very long piece of info " * 5)
    (line,) = _render(p, 80)
    assert line.startswith("splicing") and "tok/s eta" in line and "…" in line and len(line) <= 80


def test_fit_leaves_no_progress_line_behind(tmp_path):
    """On a pipe or file the transient display prints nothing; one final line, then the table."""
    make_store(tmp_path / "s.zarr", grads=False)
    out = io.StringIO()
    console = Console(file=out, width=80)
    fit(_cfg(tmp_path / "s.zarr", tmp_path / "o", k=(4, 8, 16), tokens=256 * 6, log_every=2),
        progress=True, console=console)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert not any(re.search(r"step +\d+/\d+", line) for line in lines), lines
    final = next(i for i, line in enumerate(lines) if line.startswith("train: "))
    assert re.fullmatch(r"train: 6/6 steps, [\d,]+ tok/s, [\d.]+ s", lines[final]), lines[final]
    assert "held-out results" in lines[final + 1]
    assert all(len(line) <= 80 for line in lines if not line.startswith("warning:"))
