"""bench/pareto.py's verdict rule (issue 18 item 5) on crafted ratios: a paired 95% t-interval of the
per-seed log ratio over >= 5 seeds, a tie when it contains 1; checked against scipy's t-interval."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))   # pareto.py imports its neighbour plateau.py
_spec = importlib.util.spec_from_file_location("bench_pareto", Path(__file__).parent.parent / "bench" / "pareto.py")
pareto = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pareto)


@pytest.mark.parametrize("ratios", [[0.9, 1.1, 0.95, 1.05, 1.0], [0.5, 0.55, 0.6, 0.52, 0.58, 0.61, 0.49]])
def test_interval_is_the_t_interval_of_the_log_ratio(ratios):
    logs = np.log(ratios)
    lo, hi = stats.t.interval(0.95, len(logs) - 1, loc=logs.mean(), scale=stats.sem(logs))
    centre, a, b = pareto.ratio_interval(ratios)
    assert (a, b) == pytest.approx((np.exp(lo), np.exp(hi)), rel=1e-3)
    assert centre == pytest.approx(np.exp(logs.mean()))


def test_tie_win_loss_and_too_few_seeds():
    tie = [0.9, 1.1, 0.95, 1.05, 1.0]
    win = [0.5, 0.55, 0.6, 0.52, 0.58]
    loss = [1.5, 1.6, 1.4, 1.55, 1.45]
    assert pareto.verdict(tie, "<")["verdict"] == "tie"
    assert pareto.verdict(win, "<")["verdict"] == "agrees" and pareto.verdict(win, "<")["outcome"] == "lower"
    assert pareto.verdict(loss, "<")["verdict"] == "disagrees"
    assert pareto.verdict(loss, ">")["verdict"] == "agrees"
    # three seeds all below 1 were "agrees" under the old sign rule; now untested
    assert pareto.verdict([0.5, 0.6, 0.7], "<")["verdict"].startswith("untested")
    # one seed the other way and a wide spread: the interval contains 1, so a tie, not a win
    assert pareto.verdict([0.3, 0.5, 0.4, 1.6, 0.45], "<")["verdict"] == "tie"


def test_near_claim_has_no_band():
    # ratios near 1.5 were "agrees" inside the old [0.5, 2] band; a consistent 1.5x is a difference
    assert pareto.verdict([1.5, 1.52, 1.48, 1.51, 1.49], "~")["verdict"] == "disagrees"
    assert pareto.verdict([0.9, 1.1, 0.95, 1.05, 1.0], "~")["verdict"] == "agrees"
