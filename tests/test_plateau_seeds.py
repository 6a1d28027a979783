"""bench/plateau_seeds.py: the plateau judged across seeds, against hand-computed t-intervals on
crafted plateau.json journals (no training)."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import plateau_seeds  # noqa: E402


def _cfg(seed, epochs, lr=0.001):
    return json.dumps({"arch": "topk", "epochs": epochs, "lr": lr, "seed": seed, "checkpoint_every": epochs})


def _write(root, seed, budgets, folder="topk"):
    """budgets: {epochs: {sae: (loss, l0)}} or {epochs: (config, {sae: (loss, l0)})}."""
    journal = {folder: {}}
    for epochs, recs in budgets.items():
        cfg, recs = recs if isinstance(recs, tuple) else (_cfg(seed, epochs), recs)
        journal[folder][str(epochs)] = {"config": cfg, "superseded": epochs != max(budgets), "training": {
            sae: {"held_out_loss": loss, "held_out_l0": l0, "loss_name": "nmse"} for sae, (loss, l0) in recs.items()}}
    (root / f"seed{seed}").mkdir(parents=True, exist_ok=True)
    (root / f"seed{seed}" / "plateau.json").write_text(json.dumps(journal))


def _hand_interval(ratios):
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = sum(logs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = {4: 2.776, 5: 2.571}[n - 1] * sd / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def test_intervals_and_statuses_match_hand_computation(tmp_path):
    falls = [0.90, 0.92, 0.88, 0.91, 0.89]         # loss falls ~10%
    flat = [1.001, 0.999, 1.002, 0.998, 1.000]    # inside ±2%
    noisy = [0.95, 1.06, 0.97, 1.04, 1.00]        # contains 1, wider than ±2%
    rises = [1.05, 1.07, 1.06, 1.08, 1.05]
    for seed in range(5):
        _write(tmp_path, seed, {
            64: {"a": (1.0, 10.0), "b": (1.0, 10.0), "c": (1.0, 10.0), "d": (1.0, 10.0)},
            128: {"a": (falls[seed], 10.0), "b": (flat[seed], 10.0 * flat[seed]),
                  "c": (noisy[seed], 10.0), "d": (rises[seed], 10.0)}})
    rep = plateau_seeds.report(plateau_seeds.journals(str(tmp_path)), pct=2)
    saes = rep["folders"]["topk"]["pairs"]["64->128"]["saes"]
    for name, ratios in (("a", falls), ("b", flat), ("c", noisy), ("d", rises)):
        assert saes[name]["loss"]["ratio"] == pytest.approx(_hand_interval(ratios), rel=1e-9)
        assert saes[name]["seeds"] == [0, 1, 2, 3, 4]
    assert saes["a"]["status"] == "loss falls"
    assert saes["b"]["status"] == "settled"
    assert saes["c"]["status"] == "loss undecided"
    assert saes["d"]["status"] == "loss rises"
    assert rep["folders"]["topk"]["pairs"]["64->128"]["plateau"] is False


def test_a_folder_plateaus_only_when_loss_and_l0_of_every_sae_settle(tmp_path):
    l0_falls = [0.9, 0.91, 0.89, 0.9, 0.92]
    for seed in range(5):
        _write(tmp_path, seed, {64: {"a": (1.0, 10.0), "b": (1.0, 10.0)},
                                128: {"a": (1.0 + seed * 1e-3, 10.0), "b": (1.0, 10.0 * l0_falls[seed])}})
    rep = plateau_seeds.report(plateau_seeds.journals(str(tmp_path)), pct=2)
    pair = rep["folders"]["topk"]["pairs"]["64->128"]
    assert pair["saes"]["a"]["status"] == "settled"
    assert pair["saes"]["b"]["status"] == "loss settled, L0 falls"   # an L1 SAE still trading NMSE for L0
    assert pair["plateau"] is False
    rep = plateau_seeds.report(plateau_seeds.journals(str(tmp_path)), pct=20)
    assert rep["folders"]["topk"]["pairs"]["64->128"]["plateau"] is True


def test_records_of_another_seed_do_not_count(tmp_path):
    for seed in range(5):
        budgets = {64: {"a": (1.0, 10.0)}, 128: {"a": (0.9, 10.0)}}
        if seed in (1, 2):   # lr_tune.py copies seed 0's tuning record into every journal
            budgets[64] = (_cfg(0, 64), {"a": (1.0, 10.0)})
        _write(tmp_path, seed, budgets)
    rep = plateau_seeds.report(plateau_seeds.journals(str(tmp_path)), pct=2)
    pair = rep["folders"]["topk"]["pairs"]["64->128"]
    assert pair["saes"]["a"]["seeds"] == [0, 3, 4]
    assert pair["saes"]["a"]["status"] == "untested" and pair["plateau"] is None


def test_a_seed_whose_two_budgets_differ_in_config_is_untestable_not_dropped(tmp_path):
    for seed in range(6):   # six seeds: dropping seed 5 would leave five to judge "plateaued" on
        lr = 0.01 if seed == 5 else 0.001
        _write(tmp_path, seed, {64: (_cfg(seed, 64, lr), {"a": (1.0, 10.0)}),
                                128: (_cfg(seed, 128), {"a": (1.0, 10.0)})})
    pair = plateau_seeds.report(plateau_seeds.journals(str(tmp_path)), pct=2)["folders"]["topk"]["pairs"]["64->128"]
    assert pair["saes"]["a"]["status"] == "untestable" and "seed 5: its two budgets had different configs" in \
        pair["saes"]["a"]["why"]
    assert pair["plateau"] is False


def test_a_seed_trained_at_another_config_makes_the_sae_untestable(tmp_path):
    for seed in range(5):
        lr = 0.01 if seed == 4 else 0.001
        _write(tmp_path, seed, {64: (_cfg(seed, 64, lr), {"a": (1.0, 10.0)}),
                                128: (_cfg(seed, 128, lr), {"a": (1.0, 10.0)})})
    pair = plateau_seeds.report(plateau_seeds.journals(str(tmp_path)), pct=2)["folders"]["topk"]["pairs"]["64->128"]
    assert pair["saes"]["a"]["status"] == "untestable" and "different configs" in pair["saes"]["a"]["why"]
    assert pair["plateau"] is False


@pytest.mark.parametrize("broken, why", [
    ({"loss": float("nan")}, "not finite"),      # a diverged SAE
    ({"drop": True}, "missing at 128 epochs"),
    ({"l0": 0.0}, "L0 is 0"),                    # a dead SAE
])
def test_a_broken_sae_in_one_seed_is_untestable_and_the_folder_not_plateaued(tmp_path, broken, why):
    for seed in range(6):
        after = {"a": (1.0, 10.0), "b": (1.0, 10.0)}
        if seed == 5:
            if broken.get("drop"):
                del after["b"]
            else:
                after["b"] = (broken.get("loss", 1.0), broken.get("l0", 10.0))
        _write(tmp_path, seed, {64: {"a": (1.0, 10.0), "b": (1.0, 10.0)}, 128: after})
    pair = plateau_seeds.report(plateau_seeds.journals(str(tmp_path)), pct=2)["folders"]["topk"]["pairs"]["64->128"]
    assert pair["saes"]["a"]["status"] == "settled"
    assert pair["saes"]["b"]["status"] == "untestable" and why in pair["saes"]["b"]["why"]
    assert "seed 5" in pair["saes"]["b"]["why"]
    assert pair["plateau"] is False   # never judged on the five seeds that remain


def test_one_untested_sae_does_not_hide_a_tested_one_that_still_moves(tmp_path):
    for seed in range(5):
        after = {"a": (0.8, 10.0)}
        if seed < 3:
            after["b"] = (1.0, 10.0)
        _write(tmp_path, seed, {64: {"a": (1.0, 10.0), **({"b": (1.0, 10.0)} if seed < 3 else {})}, 128: after})
    pair = plateau_seeds.report(plateau_seeds.journals(str(tmp_path)), pct=2)["folders"]["topk"]["pairs"]["64->128"]
    assert pair["saes"]["a"]["status"] == "loss falls" and pair["saes"]["b"]["status"] == "untested"
    assert pair["plateau"] is False


def test_a_journal_without_l0_records_is_judged_on_its_loss_as_plateau_py_does(tmp_path):
    for seed in range(5):
        _write(tmp_path, seed, {64: {"a": (1.0, None)}, 128: {"a": (1.0 + seed * 1e-3, None)}})
    pair = plateau_seeds.report(plateau_seeds.journals(str(tmp_path)), pct=2)["folders"]["topk"]["pairs"]["64->128"]
    assert pair["saes"]["a"]["l0"]["status"] == "not recorded" and pair["plateau"] is True


@pytest.mark.parametrize("content", ["[]", "{", '{"topk": []}', '{"topk": {"64": {"config": "[]", "training": {}}}}',
                                     '{"topk": {"64": {"config": "{}", "training": {"a": 3}}}}'])
def test_a_malformed_journal_is_one_error_line_naming_the_file(tmp_path, capsys, content):
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "plateau.json").write_text(content)
    assert plateau_seeds.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed0/plateau.json" in err[0] and "Traceback" not in err[0]


def test_markdown_has_a_verdict_row_per_folder_and_pair(tmp_path):
    for seed in range(5):
        _write(tmp_path, seed, {64: {"a": (1.0, 10.0)}, 128: {"a": (0.9, 10.0)}}, folder="gtopk_lf")
    rows = plateau_seeds.lines(plateau_seeds.report(plateau_seeds.journals(str(tmp_path)), pct=2), markdown=True)
    assert "| gtopk_lf | (all) | 64->128 | 5 | | | **not plateaued** |" in rows
    assert any(r.startswith("| gtopk_lf | a | 64->128 | 5 | -10.0% [-10.0, -10.0] |") for r in rows)


def test_cli_writes_json_and_refuses_a_folder_without_journals(tmp_path, capsys):
    for seed in range(5):
        _write(tmp_path / "run", seed, {64: {"a": (1.0, 10.0)}, 128: {"a": (0.9 + seed / 100, 10.0)}})
    assert plateau_seeds.main([str(tmp_path / "run"), "--json", str(tmp_path / "r.json")]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["seeds"] == [0, 1, 2, 3, 4] and "1 ± 2%" in doc["rule"]
    assert "topk 64->128 epochs, seeds 0,1,2,3,4: not plateaued" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert plateau_seeds.main([str(tmp_path / "empty")]) == 2
    assert "no seed<N>/plateau.json" in capsys.readouterr().err


def test_wide_table_puts_every_judged_pair_of_an_sae_on_one_row(tmp_path, capsys):
    for seed in range(5):   # 32 -> 64 only in seed 0 (too few seeds: no column); 64 -> 128 -> 256 in all
        budgets = {64: {"a": (1.0, 10.0)}, 128: {"a": (0.9, 10.0)}, 256: {"a": (0.9, 10.0)}}
        _write(tmp_path, seed, ({32: {"a": (1.2, 10.0)}} if seed == 0 else {}) | budgets)
    assert plateau_seeds.main([str(tmp_path), "--wide"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("|")]
    assert "32 → 64" not in rows[0] and "held-out loss, 128 → 256 | L0, 128 → 256 | at 256 |" in rows[0]
    assert "| topk/a | -10.0% [-10.0, -10.0] | +0.0% [+0.0, +0.0] | +0.0% [+0.0, +0.0] | +0.0% [+0.0, +0.0] | settled |" in rows
    assert "| **topk** | **not plateaued** |  | **plateaued** |  | |" in rows
    assert len({r.count("|") for r in rows}) == 1   # every row as many cells as the header
