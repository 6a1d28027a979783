"""bench/lr_tune.py: the learning-rate rule of the Pareto benches (issue 18: "each one's tuned lr").
The tail objective is checked against a hand average of a written metrics.jsonl, the choice
against a crafted set of candidates, and a real two-candidate tuning of a tiny store against the
objectives its own SAEs logged; held-out rows never enter the choice."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import lr_tune  # noqa: E402
import pareto  # noqa: E402


def write_metrics(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_tail_objective_averages_the_last_tenth_of_the_logged_steps(tmp_path):
    recs = [{"step": s, "loss": float(s), "nmse": 1.0 / s, "l0": 2.0 * s, "dead_fraction": 0.0}
            for s in range(10, 1010, 10)]
    t = lr_tune.tail_objective(write_metrics(tmp_path / "a", recs))
    window = [r for r in recs if r["step"] >= 900]          # 1000 - 0.1 * 1000
    assert t["records"] == len(window) == 11
    assert t["objective"] == pytest.approx(sum(r["loss"] for r in window) / 11)
    assert t["l0"] == pytest.approx(2 * t["objective"]) and t["steps"] == 1000


def test_tail_objective_needs_three_records_and_takes_the_last_three_when_the_tail_is_short(tmp_path):
    with pytest.raises(ValueError, match="at least 3"):
        lr_tune.tail_objective(write_metrics(tmp_path / "short", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]))
    recs = [{"step": s, "loss": float(s)} for s in (5, 10, 50, 100)]   # the tail [90, 100] holds one record
    assert lr_tune.tail_objective(write_metrics(tmp_path / "few", recs))["objective"] == pytest.approx(160 / 3)


def test_choose_takes_the_lowest_mean_log_objective():
    def cand(m, objectives):
        tails = {f"s{i}": {"objective": o} for i, o in enumerate(objectives)}
        return {"multiplier": m, "lr": m * 1e-3, "score": lr_tune.score(tails)}
    # x3 is worse on one SAE but better in the geometric mean: 2*0.5*1 < 1*1*1.2
    a, b = cand(1, [1.0, 1.0, 1.2]), cand(3, [2.0, 0.5, 1.0])
    assert b["score"] == pytest.approx(math.log(1.0) / 3) and lr_tune.choose([a, b]) is b
    # a tie goes to the smaller lr
    c = cand(10, [2.0, 0.5, 1.0])
    assert lr_tune.choose([c, b]) is b
    with pytest.raises(ValueError):
        lr_tune.score({"s": {"objective": 0.0}})
    with pytest.raises(ValueError):
        lr_tune.choose([])


def test_with_lrs_sets_only_the_tuned_local_rows():
    rows = pareto.sweeps("continuation", None)
    lrs = {"relu": 2e-3, "topk": 1e-2, "e2e": 9.0, "relu_cont100": 9.0}
    out = {f: e for f, _, e in pareto.with_lrs(rows, lrs)}
    assert out["relu"]["lr"] == 2e-3 and out["topk"]["lr"] == 1e-2
    assert "lr" not in out["gated"]                         # not tuned: the architecture's default
    assert out["e2e"]["lr"] == pareto.E2E_LR                # e2e and continuations keep theirs
    assert out["relu_cont100"]["lr"] == pareto.E2E_LR


def test_load_lrs_reads_a_tuning_folder_or_a_json_and_refuses_an_empty_one(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "relu.json").write_text(json.dumps({"folder": "relu", "lr": 0.002, "candidates": {}}))
    assert lr_tune.load_lrs(str(tmp_path / "t")) == {"relu": 0.002}
    (tmp_path / "t" / "half.json").write_text(json.dumps({"key": {}, "candidates": {}}))   # still tuning
    with pytest.raises(SystemExit, match="half.json: this folder's tuning has not finished"):
        lr_tune.load_lrs(str(tmp_path / "t"))   # not silently at its default lr
    (tmp_path / "t" / "half.json").unlink()
    (tmp_path / "lrs.json").write_text(json.dumps({"topk": 0.01}))
    assert lr_tune.load_lrs(str(tmp_path / "lrs.json")) == {"topk": 0.01}
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no tuned learning rates"):
        lr_tune.load_lrs(str(tmp_path / "empty"))


def test_a_real_tuning_chooses_by_the_logged_training_objective(tmp_path, store):
    site = "blocks.0.resid_pre"   # conftest's planted-dictionary store
    row = ("topk", "topk", {"k": (4, 8)})
    local = {"batch_size": 64, "epochs": 1, "adam_betas": (0.0, 0.999)}
    rec = lr_tune.tune_folder(row, root=str(tmp_path / "tune"), store=str(store), site=site, seed=0,
                              d_sae=32, local=local, multipliers=[0.1, 10.0], epochs=2)
    cands = rec["candidates"]
    assert set(cands) == {"0.1", "10"} and rec["default_lr"] == pytest.approx(2e-4 / math.sqrt(32 / 2**14))
    for c in cands.values():   # each score is the mean log of its SAEs' own tail objectives
        assert c["score"] == pytest.approx(sum(math.log(t["objective"]) for t in c["tails"].values()) / 2)
    best = min(cands.values(), key=lambda c: c["score"])
    assert rec["lr"] == pytest.approx(best["lr"]) and rec["multiplier"] == best["multiplier"]
    # the candidates' SAEs are gone, their records stay; a rerun trains nothing
    assert not list((tmp_path / "tune").glob("x*/epochs*/topk/*/sae_weights.safetensors"))
    again = lr_tune.tune_folder(row, root=str(tmp_path / "tune"), store=str(store), site=site, seed=0,
                                d_sae=32, local=local, multipliers=[0.1, 10.0], epochs=2)
    assert again["candidates"] == cands
    assert lr_tune.load_lrs(str(tmp_path / "tune")) == {"topk": rec["lr"]}


def test_a_search_reuses_the_tuning_run_of_its_exact_config_and_nothing_else(tmp_path, store, monkeypatch):
    import plateau
    site, row = "blocks.0.resid_pre", ("topk", "topk", {"k": (4,)})
    local = {"batch_size": 64, "epochs": 1, "adam_betas": (0.0, 0.999)}
    rec = lr_tune.tune_folder(row, root=str(tmp_path / "tune"), store=str(store), site=site, seed=0, d_sae=32,
                              local=local, multipliers=[1.0, 3.0], epochs=2)
    calls = []
    monkeypatch.setattr("sae_harvest.train.fit.fit", lambda cfg, **kw: calls.append(cfg) or (_ for _ in ()).throw(
        RuntimeError("trained")))

    def trainer(seed, root):
        return plateau.SeedTrainer(str(tmp_path / root), store=str(store), site=site, seed=seed, d_sae=32,
                                   local=local, tag="t")
    same = trainer(0, "same")
    assert lr_tune.adopt_records(same, str(tmp_path / "tune")) == 1
    got = same.train("topk", "topk", {"k": (4,), "lr": lr_tune.load_lrs(str(tmp_path / "tune"))["topk"]}, 2)
    chosen = rec["candidates"][f"{rec['multiplier']:g}"]
    assert not calls and set(got) == set(chosen["tails"])   # the record, not a new run
    # another seed, another lr or another budget is trained, never served the tuning's record
    for seed, lr, epochs in ((1, rec["lr"], 2), (0, rec["lr"] * 7, 2), (0, rec["lr"], 4)):
        t = trainer(seed, f"other{seed}-{epochs}-{lr}")
        lr_tune.adopt_records(t, str(tmp_path / "tune"))
        with pytest.raises(RuntimeError, match="trained"):
            t.train("topk", "topk", {"k": (4,), "lr": lr}, epochs)


def test_only_seeds_without_train_only_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    # a partial set of seeds would overwrite pareto.json's verdicts with fewer seeds than --seeds
    monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(tmp_path / "o"), "--only-seeds", "2,3"])
    with pytest.raises(SystemExit) as e:
        pareto.main()
    assert e.value.code == 2 and "--only-seeds needs --train-only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
