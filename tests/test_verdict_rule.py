"""bench/verdicts.py's verdict rule (issue 18 item 5) on crafted ratios: a paired 95% t-interval of the
per-seed log ratio over >= 5 seeds, a tie when it contains 1; checked against scipy's t-interval."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

_spec = importlib.util.spec_from_file_location("bench_verdicts", Path(__file__).parent.parent / "bench" / "verdicts.py")
verdicts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(verdicts)


@pytest.mark.parametrize("ratios", [[0.9, 1.1, 0.95, 1.05, 1.0], [0.5, 0.55, 0.6, 0.52, 0.58, 0.61, 0.49]])
def test_interval_is_the_t_interval_of_the_log_ratio(ratios):
    logs = np.log(ratios)
    lo, hi = stats.t.interval(0.95, len(logs) - 1, loc=logs.mean(), scale=stats.sem(logs))
    centre, a, b = verdicts.ratio_interval(ratios)
    assert (a, b) == pytest.approx((np.exp(lo), np.exp(hi)), rel=1e-3)
    assert centre == pytest.approx(np.exp(logs.mean()))


def test_tie_win_loss_and_too_few_seeds():
    tie = [0.9, 1.1, 0.95, 1.05, 1.0]
    win = [0.5, 0.55, 0.6, 0.52, 0.58]
    loss = [1.5, 1.6, 1.4, 1.55, 1.45]
    assert verdicts.verdict(tie, "<")["verdict"] == "tie"
    assert verdicts.verdict(win, "<")["verdict"] == "agrees" and verdicts.verdict(win, "<")["outcome"] == "lower"
    assert verdicts.verdict(loss, "<")["verdict"] == "disagrees"
    assert verdicts.verdict(loss, ">")["verdict"] == "agrees"
    # three seeds all below 1 were "agrees" under the old sign rule; now untested
    assert verdicts.verdict([0.5, 0.6, 0.7], "<")["verdict"].startswith("untested")
    # one seed the other way and a wide spread: the interval contains 1, so a tie, not a win
    assert verdicts.verdict([0.3, 0.5, 0.4, 1.6, 0.45], "<")["verdict"] == "tie"


def test_near_claim_has_no_band():
    # ratios near 1.5 were "agrees" inside the old [0.5, 2] band; a consistent 1.5x is a difference
    assert verdicts.verdict([1.5, 1.52, 1.48, 1.51, 1.49], "~")["verdict"] == "disagrees"
    assert verdicts.verdict([0.9, 1.1, 0.95, 1.05, 1.0], "~")["verdict"] == "agrees"


@pytest.mark.parametrize("bad", [-0.1, 0.0, float("inf"), float("nan")])
def test_a_ratio_the_log_rule_cannot_judge_is_untestable_not_a_verdict(bad):
    # a negative CE increase (an SAE that lowers the loss) or a zero denominator has no log ratio:
    # before, [nan, nan] came out as "higher", a "disagrees"
    v = verdicts.verdict([0.5, 0.6, bad, 0.55, 0.5], "<")
    assert v["verdict"].startswith("untestable") and v["outcome"] is None and v["interval"] is None


def test_the_rows_keep_a_seed_whose_ratio_is_not_positive_and_raise_on_a_missing_metric():
    def seed(a, b):
        return {"A": [{"name": "a1", "l0": 10.0, "m": a}, {"name": "a2", "l0": 20.0, "m": a / 2}],
                "B": [{"name": "b1", "l0": 5.0, "m": b}, {"name": "b2", "l0": 40.0, "m": b / 4}]}
    per_seed = [seed(1.0, 2.0) for _ in range(4)] + [seed(1.0, -2.0)]
    for rows in (verdicts.at_grid(per_seed, "A", "B", "m", "<", (16,)), verdicts.at_points(per_seed, "A", "B", "m", "<")):
        assert rows and all(r["verdict"].startswith("untestable") and len(r["ratios"]) == 5 for r in rows)
    per_seed[2]["A"][0]["m"] = None
    with pytest.raises(ValueError, match="missing"):
        verdicts.at_points(per_seed, "A", "B", "m", "<")
