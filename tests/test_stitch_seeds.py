"""bench/stitch_seeds.py: the stitching bench's verdicts, lr tuning and resume (issue 18's stitching
rerun). The verdicts are checked against docs/results.md's table (computed by hand from the same
JSON before the bench computed them), the tuning against its SAEs' own training logs, the resume
against a run trained with another config (refused, not mixed in)."""
import argparse
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import lr_tune  # noqa: E402
import stitch_seeds  # noqa: E402

ROOT = Path(__file__).parent.parent
SITE = "blocks.0.resid_pre"   # conftest's planted-dictionary store


def test_the_verdicts_reproduce_the_documented_table():
    doc = json.loads((ROOT / "docs" / "results-stitch-paper.json").read_text())
    rows = [r for r in stitch_seeds.stitch_verdicts(doc["runs"], [1024, 2048, 4096], [0.7, 0.4]) if "ratio_of" in r]
    got = {(r["pair"], r["threshold"], r["ratio_of"]): r for r in rows}
    assert len(rows) == 2 * 2 * len(stitch_seeds.CLAIMS)
    # (pair, theta, ratio): centre [low, high] and verdict, as docs/results.md prints them (strings:
    # each number is checked to the digits printed)
    table = {("1024->2048", 0.7, "mse_after_novel / mse_small"): ("0.68", "0.67", "0.70", "agrees"),
             ("2048->4096", 0.7, "mse_after_novel / mse_small"): ("0.72", "0.71", "0.73", "agrees"),
             ("1024->2048", 0.4, "mse_after_novel / mse_small"): ("1.0006", "0.999", "1.002", "tie"),
             ("1024->2048", 0.7, "ce_increase_after_novel / ce_increase_small"): ("0.77", "0.74", "0.81", "agrees"),
             ("2048->4096", 0.4, "ce_increase_after_novel / ce_increase_small"): ("0.99", "0.98", "1.01", "tie"),
             ("1024->2048", 0.7, "mse_after_swaps / mse_after_novel"): ("1.02", "1.002", "1.05", "disagrees"),
             ("2048->4096", 0.7, "mse_after_swaps / mse_after_novel"): ("1.00", "0.99", "1.02", "tie"),
             ("1024->2048", 0.4, "mse_after_swaps / mse_after_novel"): ("0.92", "0.91", "0.94", "agrees")}

    def printed(x: float, like: str) -> str:
        return f"{x:.{len(like.split('.')[1])}f}"
    for key, (centre, lo, hi, verdict) in table.items():
        r = got[key]
        assert (printed(r["ratio"], centre), printed(r["interval"][0], lo), printed(r["interval"][1], hi)) == \
            (centre, lo, hi), key
        assert r["verdict"] == verdict and len(r["ratios"]) == 5
    premise = [r for r in rows if r["claim"].startswith("premise")]
    assert premise and all(r["verdict"] == "agrees" for r in premise)


def _run(**kw):
    return {"pair": "8->16", "threshold": 0.7, "mse_small": 2.0, "mse_large": 1.0, "mse_after_novel": 1.5,
            "mse_after_swaps": 1.4, "ce_increase_small": 0.2, "ce_increase_after_novel": 0.1, **kw}


def test_fewer_than_five_seeds_is_untested():
    rows = stitch_seeds.stitch_verdicts([_run()] * 4, [8, 16], [0.7])
    assert rows and all(r["verdict"].startswith("untested") for r in rows)


def test_a_zero_or_negative_ce_increase_is_untestable_and_a_missing_one_raises():
    runs = [_run()] * 4 + [_run(ce_increase_small=0.0)]
    rows = {r["ratio_of"]: r for r in stitch_seeds.stitch_verdicts(runs, [8, 16], [0.7])}
    assert rows["ce_increase_after_novel / ce_increase_small"]["verdict"].startswith("untestable")
    assert rows["mse_after_novel / mse_small"]["verdict"] == "agrees"   # the other claims still judged
    runs = [_run()] * 4 + [_run(ce_increase_small=-0.01)]
    rows = {r["ratio_of"]: r for r in stitch_seeds.stitch_verdicts(runs, [8, 16], [0.7])}
    assert rows["ce_increase_after_novel / ce_increase_small"]["verdict"].startswith("untestable")
    with pytest.raises(ValueError, match="missing"):
        stitch_seeds.stitch_verdicts([_run()] * 4 + [_run(ce_increase_small=None)], [8, 16], [0.7])
    # not measured in any seed (--ce-points 0): that claim has no verdict, the others do
    rows = stitch_seeds.stitch_verdicts([_run(ce_increase_small=None, ce_increase_after_novel=None)] * 5, [8, 16], [0.7])
    assert {r["ratio_of"] for r in rows} == {"mse_large / mse_small", "mse_after_novel / mse_small",
                                             "mse_after_swaps / mse_after_novel"}


def _args(tmp_path, store, **kw):
    base = dict(store=str(store), arch="topk", batch_size=64, epochs=1, out=str(tmp_path / "out"))
    return argparse.Namespace(**{**base, **kw})


def test_a_resumed_run_keeps_a_matching_sae_and_refuses_one_trained_with_another_config(tmp_path, store,
                                                                                        monkeypatch):
    monkeypatch.setattr(stitch_seeds, "SITE", SITE)
    args, sweep, name = _args(tmp_path, store), {"k": (4,)}, "topk_k4"
    out = str(tmp_path / "out" / "seed0" / "topk-32")
    stitch_seeds.train_one(args, out, 32, sweep, name, 1e-3, seed=0)
    weights = Path(out, name, "sae_weights.safetensors")
    before = weights.read_bytes()

    def no_training(*a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(stitch_seeds, "fit", no_training)
    stitch_seeds.train_one(args, out, 32, sweep, name, 1e-3, seed=0)        # same config: kept
    cfg_path = Path(out, name, "cfg.json")   # an SAE logged at another interval (an older run): same weights, kept
    cfg = json.loads(cfg_path.read_text())
    cfg["sae_harvest"]["training"]["log_every"] = 5
    cfg_path.write_text(json.dumps(cfg))
    stitch_seeds.train_one(args, out, 32, sweep, name, 1e-3, seed=0)
    for lr, epochs, seed in ((2e-3, 1, 0), (1e-3, 2, 0), (1e-3, 1, 1)):    # another lr, budget or seed
        with pytest.raises(SystemExit, match="another config"):
            stitch_seeds.train_one(_args(tmp_path, store, epochs=epochs), out, 32, sweep, name, lr, seed=seed)
    assert weights.read_bytes() == before


def test_tuning_picks_each_sizes_lowest_training_objective_and_hands_the_winner_to_seed_0(tmp_path, store,
                                                                                        monkeypatch):
    monkeypatch.setattr(stitch_seeds, "SITE", SITE)
    args, sweep, name = _args(tmp_path, store, epochs=2, batch_size=16), {"k": (4,)}, "topk_k4"
    lrs = stitch_seeds.tune_lrs(args, [16, 32], sweep, name, [0.1, 10.0])
    doc = json.loads((tmp_path / "out" / "lr_tune.json").read_text())
    for d_sae in (16, 32):
        cands = doc["sizes"][str(d_sae)]
        assert set(cands) == {"0.1", "10"}
        base = 2e-4 / math.sqrt(d_sae / 2**14)   # TopK's default (Gao et al.)
        for m, c in cands.items():
            assert c["lr"] == pytest.approx(base * float(m))
            assert c["score"] == pytest.approx(math.log(c["tail"]["objective"]))
        best = min(cands.values(), key=lambda c: (c["score"], c["lr"]))
        assert lrs[d_sae] == pytest.approx(best["lr"])
        # the winner is seed 0's run: its own log, moved, and a final train_one keeps it
        final = tmp_path / "out" / "seed0" / f"topk-{d_sae}" / name
        assert lr_tune.tail_objective(final)["objective"] == pytest.approx(best["tail"]["objective"])
        assert best["dir"] == str(final.parent) and doc["moved"][str(d_sae)] == f"{best['multiplier']:g}"
        assert not (tmp_path / "out" / "lr-tune" / f"x{best['multiplier']:g}" / f"topk-{d_sae}").exists()

    def no_training(*a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(stitch_seeds, "fit", no_training)
    for d_sae in (16, 32):
        stitch_seeds.train_one(args, str(tmp_path / "out" / "seed0" / f"topk-{d_sae}"), d_sae, sweep, name,
                               lrs[d_sae], seed=0)
    assert stitch_seeds.tune_lrs(args, [16, 32], sweep, name, [0.1, 10.0]) == lrs   # resumed: nothing trained
    with pytest.raises(SystemExit, match="another run"):
        stitch_seeds.tune_lrs(_args(tmp_path, store, epochs=3, batch_size=16), [16, 32], sweep, name, [0.1, 10.0])
    # a narrower grid whose winner is not the run already in seed0: refused, seed0 unchanged
    loser = {d: next(m for m, c in doc["sizes"][str(d)].items() if c["lr"] != pytest.approx(lrs[d])) for d in (16, 32)}
    weights = tmp_path / "out" / "seed0" / "topk-16" / name / "sae_weights.safetensors"
    before = weights.read_bytes()
    with pytest.raises(SystemExit, match="the tuning picks"):
        stitch_seeds.tune_lrs(args, [16, 32], sweep, name, [float(loser[16])])
    assert weights.read_bytes() == before


def test_an_out_with_untuned_saes_is_refused_before_any_tuning(tmp_path, store, monkeypatch):
    monkeypatch.setattr(stitch_seeds, "SITE", SITE)
    args, sweep, name = _args(tmp_path, store), {"k": (4,)}, "topk_k4"
    stitch_seeds.train_one(args, str(tmp_path / "out" / "seed0" / "topk-16"), 16, sweep, name, None, seed=0)
    with pytest.raises(SystemExit, match="without --lr-tune"):
        stitch_seeds.tune_lrs(args, [16], sweep, name, [1.0, 3.0])
    assert not (tmp_path / "out" / "lr_tune.json").exists() and not (tmp_path / "out" / "lr-tune").exists()


@pytest.mark.parametrize("argv", [["--lr-tune", "1,x"], ["--lr-tune", "0,3"], ["--lr-tune", "1,inf"],
                                  ["--sizes", "64,abc"], ["--paper-regime"], []])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv):
    out = tmp_path / "out"   # the store does not exist: refused before anything is written
    monkeypatch.setattr(sys, "argv", ["stitch_seeds.py", "--store", str(tmp_path / "none.zarr"), "--out", str(out),
                                      *argv])
    with pytest.raises(SystemExit) as e:
        stitch_seeds.main()
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err and not out.exists()


def test_a_refused_run_is_one_line_and_exit_2_with_nothing_changed(tmp_path, store, monkeypatch, capsys):
    monkeypatch.setattr(stitch_seeds, "SITE", SITE)
    args = _args(tmp_path, store)
    stitch_seeds.train_one(args, str(tmp_path / "out" / "seed0" / "topk-16"), 16, {"k": (4,)}, "topk_k4", None, seed=0)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
    monkeypatch.setattr(sys, "argv", ["stitch_seeds.py", "--store", str(store), "--out", str(tmp_path / "out"),
                                      "--sizes", "16", "--k", "4", "--batch-size", "64", "--epochs", "1",
                                      "--lr-tune", "1,3"])
    with pytest.raises(SystemExit) as e:
        stitch_seeds.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "without --lr-tune" in err[0]
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == before


def test_overlap_counts_live_latents_only_with_live_only():
    summary = {"n_reconstruction": 30, "n_orphans": 4, "n_dead_large": 40, "n_dead_small": 8}
    every = stitch_seeds.pair_overlap(summary, 32, 100, live_only=False)
    live = stitch_seeds.pair_overlap(summary, 32, 100, live_only=True)
    assert every == {"large_matched": 0.3, "small_matched": 1 - 4 / 32, "dead_large": 0.4, "dead_small": 0.25}
    assert live == {"large_matched": 0.5, "small_matched": 1 - 4 / 24, "dead_large": 0.4, "dead_small": 0.25}


def test_live_only_writes_its_own_record_beside_the_all_latents_one(e2e_assets, tmp_path, monkeypatch, capsys):
    """One seed, 16 -> 32 latents on a tiny GPT-2's store: --live-only reuses the trained SAEs and
    writes stitch_seeds-live.json, leaving stitch_seeds.json as it was."""
    monkeypatch.setattr(stitch_seeds, "SITE", "blocks.1.resid_pre")
    out = tmp_path / "out"
    argv = ["stitch_seeds.py", "--store", e2e_assets["store"], "--out", str(out), "--sizes", "16,32", "--k", "4",
            "--seeds", "1", "--epochs", "1", "--batch-size", "64", "--thresholds", "0.7", "--ce-points", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    stitch_seeds.main()
    record = (out / "stitch_seeds.json").read_bytes()
    assert not (out / "stitch_seeds-live.json").exists()

    def no_training(*a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(stitch_seeds, "fit", no_training)
    monkeypatch.setattr(sys, "argv", argv + ["--live-only"])
    stitch_seeds.main()
    assert (out / "stitch_seeds.json").read_bytes() == record
    every, live = (json.loads((out / f).read_text())["runs"][0] for f in ("stitch_seeds.json", "stitch_seeds-live.json"))
    assert live["n_dead_large"] == every["n_dead_large"] and live["n_dead_small"] == every["n_dead_small"]
    assert live["n_novel"] + live["n_reconstruction"] == 32 - live["n_dead_large"]
    assert every["n_novel"] + every["n_reconstruction"] == 32
    assert live["mse_small"] == every["mse_small"] and live["mse_large"] == every["mse_large"]
    assert live["large_matched"] == pytest.approx(live["n_reconstruction"] / (32 - live["n_dead_large"]))


def test_an_evaluate_error_mid_run_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from sae_harvest.evaluate.splice import EvaluateError

    def fails(*a, **k):
        raise EvaluateError("--live-only: the small SAE fires on none of the 48 evaluation tokens")
    monkeypatch.setattr(stitch_seeds, "run", fails)
    monkeypatch.setattr(sys, "argv", ["stitch_seeds.py", "--store", str(tmp_path / "s.zarr"), "--live-only"])
    with pytest.raises(SystemExit) as e:
        stitch_seeds.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["error: --live-only: the small SAE fires on none of the 48 evaluation tokens"]


def test_fraction_claims_use_the_t_interval_of_the_per_seed_fraction_against_one_half():
    import verdicts
    zeros = [0.0, 0.0, 0.0, 0.0, 0.0]          # a log ratio cannot judge these; the fraction rule can
    v = verdicts.fraction_verdict(zeros, ">")
    assert v["verdict"] == "disagrees" and v["interval"] == [0.0, 0.0]
    f = [0.40, 0.55, 0.60, 0.45, 0.52]
    half = 2.776 * float(__import__("numpy").std(f, ddof=1)) / math.sqrt(5)
    v = verdicts.fraction_verdict(f, ">")
    assert v["interval"] == pytest.approx([0.504 - half, 0.504 + half]) and v["verdict"] == "tie"
    assert verdicts.fraction_verdict([0.97, 0.98, 0.96, 0.99, 0.97], ">")["verdict"] == "agrees"
    assert verdicts.fraction_verdict([0.9] * 4, ">")["verdict"].startswith("untested")
    runs = [_run(reconstruction_alone_raising_mse=x, large_matched=0.98) for x in (0.0, 0.05, 0.07, 0.0, 0.02)]
    rows = {r.get("fraction_of"): r for r in stitch_seeds.stitch_verdicts(runs, [8, 16], [0.7])}
    assert rows["reconstruction_alone_raising_mse"]["verdict"] == "disagrees"
    assert rows["large_matched"]["verdict"] == "agrees"


def test_report_only_rejudges_a_stored_run_and_a_bad_file_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["stitch_seeds.py", "--report-only", str(ROOT / "docs" / "results-stitch-tuned-live.json")])
    stitch_seeds.main()
    out = capsys.readouterr().out
    assert "2048->4096 theta 0.4: most reconstruction latents added alone raise MSE (fig. 4)" in out
    (tmp_path / "bad.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["stitch_seeds.py", "--report-only", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit) as e:
        stitch_seeds.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "KeyError" in err[0]
