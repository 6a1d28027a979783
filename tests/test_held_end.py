"""bench/verdicts.py's held_end: a verdict row that exists only through the L0 slack (a series' end
value held past its L0 range in some seed) says so, counted per seed by hand on crafted series; and
bench/settled.py marks such rows in JSONs written before the field, from their own series."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import settled  # noqa: E402
import verdicts  # noqa: E402


def _series(topk_top_l0: float, batchtopk_top_l0: float = 32.2):
    """One seed: TopK fires slightly under k at k = 32 (a selected pre-activation <= 0 is zeroed)."""
    return {"topk": [{"name": "topk_k16", "l0": 15.8, "ce_increase": 0.20},
                     {"name": "topk_k32", "l0": topk_top_l0, "ce_increase": 0.10}],
            "batchtopk": [{"name": "batchtopk_k16", "l0": 15.9, "ce_increase": 0.15},
                          {"name": "batchtopk_k32", "l0": batchtopk_top_l0, "ce_increase": 0.08}]}


def test_rows_count_the_seeds_that_use_a_held_end():
    # seeds 0-2: TopK tops out at 31.9 (BatchTopK's 32.2 and the grid's 32 lie past it: held);
    # seeds 3-4: TopK reaches 32.5, so every value is inside both ranges
    per_seed = [_series(31.9)] * 3 + [_series(32.5)] * 2
    grid = {r["l0"]: r for r in verdicts.at_grid(per_seed, "batchtopk", "topk", "ce_increase", "<", (16, 32))}
    assert grid[32]["held_end"] == 3 and grid[16]["held_end"] == 0
    points = {r["at"]: r for r in verdicts.at_points(per_seed, "batchtopk", "topk", "ce_increase", "<")}
    assert points["batchtopk_k32"]["held_end"] == 3 and points["batchtopk_k16"]["held_end"] == 0
    # the row exists only through the slack: without it, TopK has no value at 32 in those seeds
    assert verdicts.interp_ce([(16.0, 0.2), (31.9, 0.1)], 32, slack=0.0) is None
    assert verdicts.held([(16.0, 0), (31.9, 0)], 32) and not verdicts.held([(16.0, 0), (31.9, 0)], 31.9)


def test_printed_rows_say_held_end(capsys):
    per_seed = [_series(31.9)] * 5
    verdicts.print_rows("claim", verdicts.at_points(per_seed, "batchtopk", "topk", "ce_increase", "<"))
    out = capsys.readouterr().out.splitlines()
    assert any("batchtopk_k32" in line and "held end in 5 seed(s)" in line for line in out)
    assert not any("batchtopk_k16" in line and "held end" in line for line in out)


def test_settled_marks_held_ends_from_the_series_of_a_json_without_the_field(tmp_path, capsys):
    per_seed = [_series(31.9)] * 5
    docs = []
    for name in ("64", "128"):
        comparisons = {"batchtopk vs topk: ce_increase <":
                       verdicts.at_points(per_seed, "batchtopk", "topk", "ce_increase", "<")}
        for r in comparisons["batchtopk vs topk: ce_increase <"]:
            del r["held_end"]   # as written before the field
        doc = {"rule": "paired", "l0_slack": 0.02, "comparisons": comparisons, "series_per_seed": per_seed}
        docs.append(str(tmp_path / f"{name}.json"))
        Path(docs[-1]).write_text(json.dumps(doc))
    assert settled.main([*docs, "--labels", "64,128", "--markdown"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| batchtopk")]
    k32 = next(r for r in rows if "| batchtopk_k32 |" in r)
    k16 = next(r for r in rows if "| batchtopk_k16 |" in r)
    assert k32.count("(held end, 5 seeds)") == 2 and "held end" not in k16


def test_report_only_uses_the_runs_own_slack(tmp_path, capsys, monkeypatch):
    """A pareto.json written before the slack (none recorded: 0) is re-judged without it, so
    --report-only reproduces its rows instead of adding held-end ones."""
    import pareto

    per_seed = [_series(31.9)] * 5
    assert verdicts.at_grid(per_seed, "batchtopk", "topk", "ce_increase", "<", (32,), slack=0.0) == []
    doc = {"series_per_seed": per_seed, "comparisons": {}, "budgets": [], "args": {"seeds": 5, "e2e": "scratch"}}
    for slack, present in ((None, False), (0.02, True)):
        (tmp_path / "pareto.json").write_text(json.dumps({**doc, **({"l0_slack": slack} if slack else {})}))
        monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(tmp_path), "--report-only"])
        pareto.main()
        out = capsys.readouterr().out
        assert ("batchtopk_k32 (L0 32.2)" in out) == present and ("held end in 5 seed(s)" in out) == present


def test_settled_claims_keeps_one_claims_points_and_refuses_an_unknown_one(tmp_path, capsys):
    """A --folders run (one claim's folders at a larger budget) against whole runs: --claims keeps
    that claim's points, so the others do not read as "not comparable" noise; a prefix that matches
    no claim is one line and exit 2."""
    import pytest
    per_seed = [_series(32.5)] * 5
    rows = verdicts.at_points(per_seed, "batchtopk", "topk", "ce_increase", "<")
    whole = {"batchtopk vs topk: ce_increase <": rows, "gated vs relu: ce_increase <": [
        {**rows[0], "at": "gated_l1-3"}]}
    docs = []
    for name, comparisons in (("256", whole), ("512", {"batchtopk vs topk: ce_increase <": rows})):
        docs.append(str(tmp_path / f"{name}.json"))
        Path(docs[-1]).write_text(json.dumps({"rule": "paired", "l0_slack": 0.02, "comparisons": comparisons}))
    assert settled.main([*docs, "--claims", "batchtopk vs topk"]) == 0
    out = capsys.readouterr().out
    assert "batchtopk_k16: settled" in out and "gated" not in out and "2 points: 2 settled" in out
    with pytest.raises(SystemExit) as e:
        settled.main([*docs, "--claims", "matryoshka vs"])
    assert e.value.code == 2 and "no claim starts with matryoshka vs" in capsys.readouterr().err


def test_extend_continues_the_end_segment_where_hold_keeps_the_end_value():
    """ends="extend": within the slack, the end segment continued log-linearly (by hand: the segment
    (16, 0.2) -> (31.9, 0.1) at 32.2 is 0.1 - 0.1 * log(32.2/31.9) / log(31.9/16)); inside the range
    and past the slack the two agree (interpolated; None)."""
    import math
    pts = [(16.0, 0.2), (31.9, 0.1)]
    by_hand = 0.1 - 0.1 * math.log(32.2 / 31.9) / math.log(31.9 / 16)
    assert verdicts.interp_ce(pts, 32.2) == 0.1
    assert abs(verdicts.interp_ce(pts, 32.2, ends="extend") - by_hand) < 1e-12
    below = 0.2 + 0.1 * math.log(16 / 15.8) / math.log(31.9 / 16)
    assert abs(verdicts.interp_ce(pts, 15.8, ends="extend") - below) < 1e-12
    assert verdicts.interp_ce(pts, 20.0, ends="extend") == verdicts.interp_ce(pts, 20.0)
    assert verdicts.interp_ce(pts, 33.0, ends="extend") is None
    assert verdicts.interp_ce([(31.9, 0.1)], 32.2, ends="extend") == 0.1   # one point: nothing to continue
    # three points: the segment at the end the L0 lies past, not the first one
    three = [(8.0, 0.3), (16.0, 0.2), (31.9, 0.1)]
    assert abs(verdicts.interp_ce(three, 32.2, ends="extend") - by_hand) < 1e-12
    low = 0.3 + 0.1 * math.log(8 / 7.9) / math.log(16 / 8)
    assert abs(verdicts.interp_ce(three, 7.9, ends="extend") - low) < 1e-12
    # a repeated end L0 is no segment: the last one between distinct L0s, from its own end points
    twice = [(16.0, 0.2), (31.9, 0.1), (31.9, 0.1)]
    assert abs(verdicts.interp_ce(twice, 32.2, ends="extend") - by_hand) < 1e-12
    # the rows: TopK's CE at BatchTopK's 32.2 is lower when continued, so the ratio rises
    per_seed = [_series(31.9)] * 5
    held_rows = {r["at"]: r for r in verdicts.at_points(per_seed, "batchtopk", "topk", "ce_increase", "<")}
    ext_rows = {r["at"]: r for r in verdicts.at_points(per_seed, "batchtopk", "topk", "ce_increase", "<",
                                                        ends="extend")}
    assert ext_rows["batchtopk_k32"]["ratio"] > held_rows["batchtopk_k32"]["ratio"]
    assert ext_rows["batchtopk_k16"]["ratio"] == held_rows["batchtopk_k16"]["ratio"]
