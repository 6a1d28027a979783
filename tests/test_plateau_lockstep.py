"""bench/pareto.py --plateau-across-seeds: every seed trains each budget, and a folder stops where
bench/plateau_seeds.py's interval over the seeds settles. The real SeedTrainer (journal, discard,
resume) with only fit() faked: it writes an SAE folder and the crafted held-out loss, no training."""
import json
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import pareto  # noqa: E402
import plateau  # noqa: E402
import seed_budgets  # noqa: E402

# per folder, the held-out loss at each budget (seed s adds s/1000): "flat" settles between 32 and 64
# epochs in every seed; "moving" falls 10% per doubling; "noisy" is flat on average but its seeds
# scatter ±6% around it at every budget, the case one seed's 2% rule misreads (seed 0 has no noise)
LOSS = {"flat": {32: 1.0, 64: 0.995, 128: 0.994, 256: 0.993},
        "moving": {32: 1.0, 64: 0.9, 128: 0.81, 256: 0.73},
        "noisy": {32: 1.0, 64: 1.0, 128: 1.0, 256: 1.0}}
NOISE = [0.0, 0.06, -0.06, 0.05, -0.05]


def loss(folder, seed, epochs):
    noise = NOISE[seed] * {32: 0, 64: 1, 128: -1, 256: 1}[epochs] if folder == "noisy" else 0.0
    return LOSS[folder][epochs] * (1 + seed / 1000) * (1 + noise)


class Killed(Exception):
    pass


@pytest.fixture
def run(tmp_path, monkeypatch):
    """(args, fit calls, kill_after: a list whose first item, if set, makes the n+1-th fit raise)."""
    calls, kill_after = [], [None]

    def fit(cfg, resume=False, overwrite=False, progress=False):
        if kill_after[0] is not None and len(calls) >= kill_after[0]:
            raise Killed
        calls.append((cfg.seed, Path(cfg.out).name, cfg.epochs))
        d = Path(cfg.out) / f"{Path(cfg.out).name}_k8"
        d.mkdir(parents=True, exist_ok=True)
        (d / "cfg.json").write_text("{}")
        (d / "m.json").write_text(json.dumps(loss(Path(cfg.out).name, cfg.seed, cfg.epochs)))
        return {d.name: {}}

    monkeypatch.setattr("sae_harvest.train.fit.fit", fit)
    monkeypatch.setattr("sae_harvest.train.config.TrainConfig", lambda **k: types.SimpleNamespace(**k))
    monkeypatch.setattr(plateau, "training_record", lambda p: {
        "held_out_loss": json.loads((Path(p) / "m.json").read_text()), "held_out_l0": 8.0, "loss_name": "nmse"})
    monkeypatch.setattr(pareto, "run_rows", lambda a, lf: [(f, "topk", {"k": (8,)}) for f in LOSS])
    args = pareto.argparse.Namespace(out=str(tmp_path), seeds=5, d_sae=64, lrs=None, epochs=32, max_epochs=256,
                                     until_plateau=2.0, e2e_max_epochs=None)
    return args, calls, kill_after


EXPECTED = {"flat": (64, "plateau across seeds"), "moving": (256, "max-epochs"), "noisy": (256, "max-epochs")}


def _budgets(got):
    return {f: (r["epochs"], r["stop"]) for f, r in got.items()}


def test_each_folder_stops_where_the_interval_over_the_seeds_settles(run, tmp_path):
    args, calls, _ = run
    got = pareto.across_seeds(args, "s.zarr", None, {}, {})
    assert _budgets(got) == EXPECTED   # noisy: its interval stays wider than ±2%
    assert got["flat"]["verdicts"] == {"32->64": "plateaued"}
    assert got["moving"]["verdicts"] == {"32->64": "not plateaued", "64->128": "not plateaued",
                                         "128->256": "not plateaued"}
    # every seed trained every open folder at each budget, once, and nothing past a folder's stop
    assert len(calls) == len(set(calls)) == 5 * (2 + 4 + 4)
    assert {(s, e) for s, f, e in calls if f == "flat"} == {(s, e) for s in range(5) for e in (32, 64)}
    # only the budget each folder evaluates is left on disk; every budget's record stays in the journal
    assert sorted(str(p.relative_to(tmp_path / "seed3")) for p in (tmp_path / "seed3").glob("epochs*/*")) == \
        ["epochs256/moving", "epochs256/noisy", "epochs64/flat"]
    journal = json.loads((tmp_path / "seed3" / "plateau.json").read_text())
    assert journal["flat"]["32"]["superseded"] and not journal["flat"]["64"]["superseded"]
    # run again (the documented resume): nothing is trained again, the same budgets come back
    calls.clear()
    assert pareto.across_seeds(args, "s.zarr", None, {}, {}) == got and calls == []


@pytest.mark.parametrize("kill_after", [12, 17, 33])   # mid-budget, after some seeds' discard, late
def test_a_killed_run_resumes_without_retraining_what_it_journalled(run, kill_after):
    args, calls, kill = run
    kill[0] = kill_after
    with pytest.raises(Killed):
        pareto.across_seeds(args, "s.zarr", None, {}, {})
    before = list(calls)
    kill[0] = None
    got = pareto.across_seeds(args, "s.zarr", None, {}, {})
    assert _budgets(got) == EXPECTED
    assert len(calls) == len(set(calls)) == 50   # the 50 of an uninterrupted run, none twice
    assert calls[:len(before)] == before


def test_another_runs_seed_left_in_the_folder_is_not_judged(run, tmp_path):
    args, calls, _ = run
    (tmp_path / "seed7").mkdir()
    (tmp_path / "seed7" / "plateau.json").write_text(json.dumps({"flat": {
        "32": {"config": json.dumps({"seed": 7, "lr": 9.0}), "superseded": True, "training": {}},
        "64": {"config": json.dumps({"seed": 7, "lr": 9.0}), "superseded": False, "training": {
            "flat_k8": {"held_out_loss": 5.0, "held_out_l0": 1.0}}}}}))
    assert _budgets(pareto.across_seeds(args, "s.zarr", None, {}, {})) == EXPECTED


def test_the_evaluation_records_the_judged_budgets_without_training_again(run, monkeypatch):
    args, calls, _ = run
    args.lockstep = pareto.across_seeds(args, "s.zarr", None, {}, {})
    args.followed = {f: r["epochs"] for f, r in args.lockstep.items()}
    for k, v in dict(fixed_epochs=None, plateau_seeds=None, early_stop=False, train_only=False, e2e="scratch").items():
        setattr(args, k, v)
    calls.clear()
    evaluated = []
    monkeypatch.setattr(pareto, "evaluate_seed", lambda paths, *a: evaluated.append(paths) or ({}, {"tokens": 1}))
    monkeypatch.setattr(pareto, "report", lambda *a, **k: None)
    budgets = []
    pareto.run_seed(args, 2, "s.zarr", None, {}, {}, [], budgets, 0.0)
    assert calls == []
    assert evaluated == [[str(Path(args.out) / "seed2" / f"epochs{e}" / f / f"{f}_k8") for f, (e, _) in EXPECTED.items()]]
    sweeps = budgets[0]["sweeps"]
    assert {f: (b["epochs"], b["stop"]) for f, b in sweeps.items()} == EXPECTED
    assert sweeps["flat"]["plateaued"] is True and sweeps["moving"]["plateaued"] is False
    assert sweeps["moving"]["verdicts"]["128->256"] == "not plateaued"


def test_one_searched_seed_stops_the_noisy_folder_where_all_seeds_do_not(run):
    """The contrast, on the same losses: bench/plateau.py's one-seed search on seed 0 calls "noisy"
    flat at 64 epochs; across the seeds it is not (above: it runs on to the cap)."""
    one = plateau.search(lambda e: {"noisy_k8": {"held_out_loss": loss("noisy", 0, e), "held_out_l0": 8.0}},
                         32, 2.0, 256)
    assert (one["epochs"], one["stop"]) == (64, "plateau")


def test_an_unreadable_journal_stops_the_search_with_one_line_and_keeps_the_verdicts(run, tmp_path, monkeypatch, capsys):
    args, calls, _ = run
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "plateau.json").write_text("[1]")
    with pytest.raises(plateau.JournalError, match="seed1/plateau.json: not a bench/plateau.py journal"):
        pareto.across_seeds(args, "s.zarr", None, {}, {})
    assert (tmp_path / "seed1" / "plateau.json").read_text() == "[1]"   # not rewritten
    # what bench/pareto.py prints: one line, no traceback
    monkeypatch.setattr(pareto, "harvest_store", lambda *a, **k: "s.zarr")
    monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(tmp_path), "--until-plateau", "2", "--epochs", "32",
                                      "--max-epochs", "256", "--plateau-across-seeds", "--no-label-free"])
    with pytest.raises(SystemExit) as e:
        pareto.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("pareto: error: ") and "seed1/plateau.json" in err[0]
    # the report of a normal run still writes pareto.json, the error in place of the judgement
    args.e2e, args.report_only = "scratch", False
    out = pareto.report(args, [], [], None, 0.0)
    assert "seed1/plateau.json" in out["plateau_across_seeds"]["error"]
    assert json.loads((tmp_path / "pareto.json").read_text())["plateau_across_seeds"]["error"]


@pytest.mark.parametrize("extra, message", [
    (["--plateau-seeds", "1", "--until-plateau", "2"], "--plateau-across-seeds needs --until-plateau"),
    (["--only-seeds", "3", "--train-only", "--fixed-epochs", "8", "--until-plateau", "2"],
     "--plateau-across-seeds needs --until-plateau"),
    ([], "--plateau-across-seeds needs --until-plateau"),
    (["--until-plateau", "2", "--seeds", "3"], "needs --seeds >= 5"),
    (["--until-plateau", "nan"], "--until-plateau: a percentage >= 0"),
    (["--until-plateau", "2", "--epochs", "64", "--max-epochs", "32"], "--max-epochs (32) below --epochs (64)"),
])
def test_lockstep_flags_are_checked_before_anything_is_written(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(tmp_path / "o"), "--plateau-across-seeds", *extra])
    with pytest.raises(SystemExit) as e:
        pareto.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_lockstep_budgets_refuses_an_empty_range():
    with pytest.raises(ValueError):
        seed_budgets.lockstep_budgets(lambda s, b: None, lambda: {}, [0], ["a"], 64, 32)


def test_a_second_process_training_some_seeds_at_a_budget_is_not_trained_again(run):
    """The documented two-process run: `--only-seeds 4,3 --train-only --fixed-epochs 64` beside the
    lockstep search; the search finds those journalled records under each seed's lock."""
    args, calls, _ = run
    second = pareto.argparse.Namespace(**{**vars(args), "fixed_epochs": 64, "train_only": True, "followed": None,
                                          "plateau_seeds": None, "early_stop": False, "e2e": "scratch"})
    for seed in (4, 3):
        pareto.run_seed(second, seed, "s.zarr", None, {}, {}, [], [], 0.0)
    by_second = list(calls)
    assert sorted({(s, e) for s, f, e in by_second}) == [(3, 64), (4, 64)]
    calls.clear()
    assert _budgets(pareto.across_seeds(args, "s.zarr", None, {}, {})) == EXPECTED
    assert not set(by_second) & set(calls) and len(calls) == 50 - len(by_second)


def test_a_second_process_mid_training_on_a_seed_is_waited_for_not_overwritten(run, monkeypatch):
    """The second process holds seed 3's lock mid-fit when the search reaches seed 3: the search
    waits, then reads the journal the second process wrote (read under the lock), so nothing is
    trained twice and no record is overwritten with a stale journal."""
    import threading
    import time

    import sae_harvest.train.fit as fitmod
    args, calls, _ = run
    inner, in_fit, go = fitmod.fit, threading.Event(), threading.Event()

    def slow_fit(cfg, **k):
        if cfg.seed == 3 and cfg.epochs == 64 and threading.current_thread().name == "second":
            in_fit.set()
            go.wait(10)
        return inner(cfg, **k)

    monkeypatch.setattr("sae_harvest.train.fit.fit", slow_fit)
    second = pareto.argparse.Namespace(**{**vars(args), "fixed_epochs": 64, "train_only": True, "followed": None,
                                          "plateau_seeds": None, "early_stop": False, "e2e": "scratch"})

    def other_process():
        with pareto.seed_lock(str(Path(args.out) / "seed3"), "seed 3"):
            pareto.run_seed(second, 3, "s.zarr", None, {}, {}, [], [], 0.0)

    tb = threading.Thread(target=other_process, name="second")
    tb.start()
    assert in_fit.wait(10)
    got = {}
    ta = threading.Thread(target=lambda: got.update(pareto.across_seeds(args, "s.zarr", None, {}, {})))
    ta.start()
    time.sleep(1.0)
    go.set()
    tb.join()
    ta.join()
    assert _budgets(got) == EXPECTED
    assert len(calls) == len(set(calls)) == 50


def test_lr_tune_stops_with_one_line_on_an_unreadable_journal(tmp_path):
    """The other benches that keep SeedTrainer journals: one line, exit non-zero, the file untouched."""
    import subprocess
    (tmp_path / "x1").mkdir()
    (tmp_path / "x1" / "plateau.json").write_text("{")
    r = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "bench" / "lr_tune.py"), "--store",
                        str(tmp_path / "none.zarr"), "--out", str(tmp_path), "--folders", "topk", "--multipliers", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"lr_tune: error: {tmp_path / 'x1' / 'plateau.json'}: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)"]
    assert (tmp_path / "x1" / "plateau.json").read_text() == "{"
