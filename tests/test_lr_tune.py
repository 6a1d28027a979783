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
import verdicts  # noqa: E402


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
    with pytest.raises(lr_tune.TunedLrError, match="half.json: this folder.s tuning has not finished"):
        lr_tune.load_lrs(str(tmp_path / "t"))   # not silently at its default lr
    (tmp_path / "t" / "half.json").unlink()
    (tmp_path / "lrs.json").write_text(json.dumps({"topk": 0.01}))
    assert lr_tune.load_lrs(str(tmp_path / "lrs.json")) == {"topk": 0.01}
    (tmp_path / "empty").mkdir()
    with pytest.raises(lr_tune.TunedLrError, match="no tuned learning rates"):
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
    assert rec["at_grid_edge"]   # two candidates: the winner is always at an edge, x1 or not
    # the candidates' SAEs are gone, their records stay; a rerun trains nothing
    assert not list((tmp_path / "tune").glob("x*/epochs*/topk/*/sae_weights.safetensors"))
    again = lr_tune.tune_folder(row, root=str(tmp_path / "tune"), store=str(store), site=site, seed=0,
                                d_sae=32, local=local, multipliers=[0.1, 10.0], epochs=2)
    assert again["candidates"] == cands
    assert lr_tune.load_lrs(str(tmp_path / "tune")) == {"topk": rec["lr"]}
    # the record deleted to redo the folder: the candidates train again (their SAEs were deleted)
    (tmp_path / "tune" / "topk.json").unlink()
    redo = lr_tune.tune_folder(row, root=str(tmp_path / "tune"), store=str(store), site=site, seed=0,
                               d_sae=32, local=local, multipliers=[0.1, 10.0], epochs=2)
    assert redo["candidates"] == cands   # seeded: the same runs, the same objectives


def test_the_tails_are_each_saes_own_training_log(tmp_path, store, monkeypatch):
    import plateau
    monkeypatch.setattr(plateau.SeedTrainer, "discard", lambda self, folder, epochs: None)   # keep the SAEs
    local = {"batch_size": 64, "epochs": 1, "adam_betas": (0.0, 0.999)}
    rec = lr_tune.tune_folder(("topk", "topk", {"k": (4, 8)}), root=str(tmp_path / "tune"), store=str(store),
                              site="blocks.0.resid_pre", seed=0, d_sae=32, local=local, multipliers=[1.0], epochs=3)
    for name, tail in rec["candidates"]["1"]["tails"].items():
        lines = (tmp_path / "tune" / "x1" / "epochs3" / "topk" / name / "metrics.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
        last = recs[-1]["step"]
        window = [r["loss"] for r in recs if r["step"] >= 0.9 * last]
        if len(window) < 3:
            window = [r["loss"] for r in recs[-3:]]
        assert tail["objective"] == pytest.approx(sum(window) / len(window))
        assert tail["steps"] == last
    assert rec["candidates"]["1"]["tails"]["topk_k4"]["objective"] != rec["candidates"]["1"]["tails"]["topk_k8"]["objective"]


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


@pytest.mark.parametrize("argv,message", [
    # a partial set of seeds would overwrite pareto.json's verdicts with fewer seeds than --seeds
    (["--only-seeds", "2,3"], "--only-seeds needs --train-only and --fixed-epochs or --follow-searched"),
    # without a fixed budget the second process would search its own, which the first would not reuse
    (["--only-seeds", "2,3", "--train-only"], "--only-seeds needs --train-only and --fixed-epochs or --follow"),
    (["--follow-searched"], "--follow-searched goes with --only-seeds"),
    (["--only-seeds", "2", "--train-only", "--follow-searched", "--fixed-epochs", "4"],
     "--follow-searched goes with --only-seeds, instead of --fixed-epochs"),
    # no searching process has written its budgets yet
    (["--only-seeds", "2", "--train-only", "--follow-searched"], "--follow-searched: [Errno 2]"),
    (["--only-seeds", "2,9", "--train-only", "--fixed-epochs", "4"], "--only-seeds: every seed in 0..4"),
    (["--only-seeds", "2,x", "--train-only", "--fixed-epochs", "4"], "--betas / --only-seeds"),
    (["--fixed-epochs", "0"], "--fixed-epochs: at least 1"),
    (["--e2e-ds-l1", "3,x"], "--e2e-ds-l1: could not convert"),
    (["--e2e-ds-l1", "3,0"], "--e2e-ds-l1: every λ finite and > 0"),
    (["--e2e-ds-l1", "3,inf"], "--e2e-ds-l1: every λ finite and > 0"),
    (["--e2e-ds-l1", "10,1e1"], "--e2e-ds-l1: every λ once"),
    (["--lrs", "/nonexistent/lr-tune"], "no such file or folder"),   # before any harvest
])
def test_bad_bench_flags_are_one_line_and_exit_2_before_anything_is_written(tmp_path, monkeypatch, capsys, argv,
                                                                          message):
    monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(tmp_path / "o"), *argv])
    with pytest.raises(SystemExit) as e:
        pareto.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def rows_of(*folders):
    return [(f, f, {"k": (8,)}) for f in folders] + [("e2e", "relu", {"loss": "e2e"})]


def tuned(folder_dir: Path, folder: str, lr: float, d_sae=256, batch_size=1024, betas=(0.0, 0.999)):
    folder_dir.mkdir(parents=True, exist_ok=True)
    key = {"d_sae": d_sae, "local": {"batch_size": batch_size, "epochs": 1, "adam_betas": list(betas)}}
    (folder_dir / f"{folder}.json").write_text(json.dumps({"key": key, "folder": folder, "lr": lr, "candidates": {}}))


def test_load_lrs_refuses_a_folder_without_a_tuned_lr_or_tuned_for_another_run(tmp_path):
    local = {"batch_size": 1024, "epochs": 1, "adam_betas": (0.0, 0.999)}
    tuned(tmp_path / "t", "relu", 0.005)
    tuned(tmp_path / "t", "topk", 0.016)
    assert lr_tune.load_lrs(str(tmp_path / "t"), rows=rows_of("relu", "topk"), d_sae=256, local=local) == \
        {"relu": 0.005, "topk": 0.016}
    # gated has no record (never tuned, or killed in its first candidate): it would train at its default
    with pytest.raises(lr_tune.TunedLrError, match="no tuned lr for gated"):
        lr_tune.load_lrs(str(tmp_path / "t"), rows=rows_of("relu", "topk", "gated"))
    # tuned at another width, batch size or betas: the lr does not carry over
    with pytest.raises(lr_tune.TunedLrError, match="tuned at d_sae 256, this run trains 64"):
        lr_tune.load_lrs(str(tmp_path / "t"), d_sae=64, local=local)
    with pytest.raises(lr_tune.TunedLrError, match="tuned at adam_betas"):
        lr_tune.load_lrs(str(tmp_path / "t"), d_sae=256, local={**local, "adam_betas": None})
    with pytest.raises(lr_tune.TunedLrError, match="tuned at batch_size 1024, this run uses 512"):
        lr_tune.load_lrs(str(tmp_path / "t"), d_sae=256, local={**local, "batch_size": 512})
    # a hand-written file: a typo or a bad value is refused, not ignored
    (tmp_path / "typo.json").write_text(json.dumps({"relu": 0.005, "topk": 0.01, "topkk": 0.01}))
    with pytest.raises(lr_tune.TunedLrError, match="topkk is not a sweep folder"):
        lr_tune.load_lrs(str(tmp_path / "typo.json"), rows=rows_of("relu", "topk"))
    (tmp_path / "bad.json").write_text(json.dumps({"relu": "fast"}))
    with pytest.raises(lr_tune.TunedLrError, match="'fast' is not a positive learning rate"):
        lr_tune.load_lrs(str(tmp_path / "bad.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(lr_tune.TunedLrError, match="not readable JSON"):
        lr_tune.load_lrs(str(tmp_path / "broken.json"))


def test_a_diverged_candidate_loses_instead_of_stopping_the_tuning():
    assert lr_tune.score({"a": {"objective": float("nan")}, "b": {"objective": 1.0}}) == math.inf
    assert lr_tune.score({"a": {"objective": float("inf")}}) == math.inf
    ok = {"multiplier": 1, "lr": 1e-3, "score": lr_tune.score({"a": {"objective": 2.0}})}
    assert lr_tune.choose([{"multiplier": 30, "lr": 3e-2, "score": math.inf}, ok]) is ok


def test_seed_lock_makes_a_second_process_wait(tmp_path, capsys):
    import threading
    held, release, entered = threading.Event(), threading.Event(), threading.Event()

    def first():
        with pareto.seed_lock(str(tmp_path / "seed3"), "seed 3"):
            held.set()
            release.wait(10)

    def second():
        with pareto.seed_lock(str(tmp_path / "seed3"), "seed 3"):
            entered.set()
    a = threading.Thread(target=first)
    a.start()
    assert held.wait(10)
    b = threading.Thread(target=second)
    b.start()
    assert not entered.wait(0.5)          # blocked while the first holds the seed
    release.set()
    assert entered.wait(10)               # and in once it is released
    a.join(), b.join()
    assert "another process is on this seed; waiting for it" in capsys.readouterr().out


def test_interp_holds_a_series_end_within_two_percent_of_l0_and_no_further():
    topk = [(8.0, 0.30), (16.0, 0.20), (31.9, 0.10)]
    assert verdicts.interp_ce(topk, 32) == pytest.approx(0.10)            # 0.3% past the end: its end value
    assert verdicts.interp_ce(topk, 31.9 * 1.021) is None                 # 2.1% past: outside
    assert verdicts.interp_ce(topk, 8 * 0.985) == pytest.approx(0.30)
    assert verdicts.interp_ce(topk, 8 * 0.97) is None
    # inside the range: linear in log L0, as before
    assert verdicts.interp_ce(topk, (8 * 16) ** 0.5) == pytest.approx(0.25)
    assert verdicts.interp_ce(topk, 32, slack=0.0) is None


def test_a_record_differing_only_in_checkpoint_every_is_reused_and_nothing_else_is():
    import plateau
    base = {"arch": "topk", "k": [8], "lr": 0.016, "epochs": 64, "checkpoint_every": 10**9, "seed": 0}
    old = json.dumps(base, sort_keys=True)
    assert plateau.same_config(old, json.dumps({**base, "checkpoint_every": plateau.CHECKPOINT_EVERY}, sort_keys=True))
    for field, value in (("lr", 0.0161), ("epochs", 128), ("seed", 1), ("k", [16])):
        assert not plateau.same_config(old, json.dumps({**base, field: value}, sort_keys=True))


def test_a_diverging_candidate_loses_and_the_tuning_goes_on(tmp_path, store):
    """The trainer stops a run whose loss goes non-finite (train.errors.Diverged) instead of saving
    NaN weights: the tuning records that lr as diverged (score inf) and chooses among the others;
    if every one diverged there is nothing to choose: one error."""
    site, row = "blocks.0.resid_pre", ("topk", "topk", {"k": (4,)})
    local = {"batch_size": 64, "epochs": 1, "adam_betas": (0.0, 0.999)}
    rec = lr_tune.tune_folder(row, root=str(tmp_path / "tune"), store=str(store), site=site, seed=0, d_sae=32,
                              local=local, multipliers=[1.0, 1e30], epochs=2)
    bad = rec["candidates"]["1e+30"]
    assert bad["score"] == math.inf and "diverged" in bad["diverged"] and rec["multiplier"] == 1.0
    with pytest.raises(lr_tune.TunedLrError, match="every candidate lr diverged"):
        lr_tune.tune_folder(row, root=str(tmp_path / "tune2"), store=str(store), site=site, seed=0, d_sae=32,
                            local=local, multipliers=[1e30], epochs=2)
