"""bench/pareto.py --plateau-across-seeds: every seed trains each budget, and a folder stops where
bench/plateau_seeds.py's interval over the seeds settles; seed_budgets.lockstep_budgets on a fake
trainer that writes real journals (no SAE is trained)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import pareto  # noqa: E402
import plateau  # noqa: E402
import seed_budgets  # noqa: E402

# per folder, the held-out loss at each budget (seed s adds s/1000 of noise): "flat" settles between
# 32 and 64 epochs in every seed; "moving" falls 10% per doubling; "noisy" settles on average but
# its seeds scatter ±6% around it at every budget, the case one seed's 2% rule misreads
LOSS = {"flat": {32: 1.0, 64: 0.995, 128: 0.994, 256: 0.993},
        "moving": {32: 1.0, 64: 0.9, 128: 0.81, 256: 0.73},
        "noisy": {32: 1.0, 64: 1.0, 128: 1.0, 256: 1.0}}
NOISE = {"noisy": [0.0, 0.06, -0.06, 0.05, -0.05]}


class JournalingFake(plateau.SeedTrainer):
    """SeedTrainer whose train() journals a crafted record and an empty SAE folder instead of training."""
    trained: list = []

    def train(self, folder, arch, extra, epochs, force=False):
        kwargs = self.config(folder, arch, extra, epochs)
        key = json.dumps({k: v for k, v in kwargs.items() if k != "out"}, sort_keys=True, default=str)
        done = self.journal.get(folder, {}).get(str(epochs))
        if done and plateau.same_config(done["config"], key):
            return done["training"]
        JournalingFake.trained.append((self.seed, folder, epochs))
        noise = NOISE.get(folder, [0] * 5)[self.seed] * {32: 0, 64: 1, 128: -1, 256: 1}[epochs]
        loss = LOSS[folder][epochs] * (1 + self.seed / 1000) * (1 + noise)
        name = f"{folder}_k8"
        (Path(kwargs["out"]) / name).mkdir(parents=True, exist_ok=True)
        (Path(kwargs["out"]) / name / "cfg.json").write_text("{}")
        records = {name: {"held_out_loss": loss, "held_out_l0": 8.0, "steps": epochs, "loss_name": "nmse"}}
        self.journal.setdefault(folder, {})[str(epochs)] = {"config": key, "training": records, "superseded": False}
        self._save()
        return records


@pytest.fixture
def args(tmp_path, monkeypatch):
    monkeypatch.setattr(pareto, "SeedTrainer", JournalingFake)
    monkeypatch.setattr(pareto, "run_rows", lambda a, lf: [(f, "topk", {"k": (8,)}) for f in LOSS])
    JournalingFake.trained = []
    return pareto.argparse.Namespace(out=str(tmp_path), seeds=5, d_sae=64, lrs=None, epochs=32, max_epochs=256,
                                     until_plateau=2.0, e2e_max_epochs=None)


def test_each_folder_stops_where_the_interval_over_the_seeds_settles(args, tmp_path):
    got = pareto.across_seeds(args, "s.zarr", None, {}, {})
    assert got == {"flat": {"epochs": 64, "stop": "plateau across seeds"},
                   "moving": {"epochs": 256, "stop": "max-epochs"},
                   "noisy": {"epochs": 256, "stop": "max-epochs"}}   # its interval is wider than ±2%
    # every seed trained every open folder at each budget, and nothing past a folder's stop
    for folder, last in (("flat", 64), ("moving", 256)):
        assert sorted({e for s, f, e in JournalingFake.trained if f == folder}) == [b for b in (32, 64, 128, 256)
                                                                                    if b <= last]
        assert {s for s, f, e in JournalingFake.trained if f == folder and e == last} == {0, 1, 2, 3, 4}
    # only the budget each folder evaluates is left on disk; every budget's record stays in the journal
    assert sorted(str(p.relative_to(tmp_path / "seed3")) for p in (tmp_path / "seed3").glob("epochs*/*")) == \
        ["epochs256/moving", "epochs256/noisy", "epochs64/flat"]
    journal = json.loads((tmp_path / "seed3" / "plateau.json").read_text())
    assert journal["flat"]["32"]["superseded"] and not journal["flat"]["64"]["superseded"]
    # resumed: nothing is trained again, the same budgets come back
    JournalingFake.trained = []
    assert pareto.across_seeds(args, "s.zarr", None, {}, {}) == got and JournalingFake.trained == []


def test_every_seed_then_evaluates_the_judged_budgets_without_training_again(args, monkeypatch):
    args.lockstep = pareto.across_seeds(args, "s.zarr", None, {}, {})
    args.followed = {f: r["epochs"] for f, r in args.lockstep.items()}
    for k, v in dict(fixed_epochs=None, plateau_seeds=None, early_stop=False, train_only=False, e2e="scratch").items():
        setattr(args, k, v)
    JournalingFake.trained, evaluated = [], []
    monkeypatch.setattr(pareto, "evaluate_seed", lambda paths, *a: evaluated.append(paths) or ({}, {"tokens": 1}))
    monkeypatch.setattr(pareto, "report", lambda *a, **k: None)
    budgets = []
    pareto.run_seed(args, 2, "s.zarr", None, {}, {}, [], budgets, 0.0)
    assert JournalingFake.trained == []
    assert evaluated == [[str(Path(args.out) / "seed2" / f"epochs{e}" / f / f"{f}_k8")
                          for f, e in (("flat", 64), ("moving", 256), ("noisy", 256))]]
    assert {f: (b["epochs"], b["stop"]) for f, b in budgets[0]["sweeps"].items()} == \
        {"flat": (64, "plateau across seeds"), "moving": (256, "max-epochs"), "noisy": (256, "max-epochs")}


def test_one_searched_seed_would_have_stopped_the_noisy_folder(args):
    """The contrast: seed 0 alone (noise 0) reads "noisy" as flat at 64 epochs, as plateau.search does."""
    history = [{k: {"held_out_loss": LOSS["noisy"][e], "held_out_l0": 8.0}} for e, k in ((32, "a"), (64, "a"))]
    assert plateau.plateaued(history[0], history[1], 2.0)


def test_lockstep_needs_the_search_rule_and_one_process(tmp_path, monkeypatch, capsys):
    for extra in (["--plateau-seeds", "1"], ["--only-seeds", "3", "--train-only", "--fixed-epochs", "8"], []):
        argv = ["pareto.py", "--out", str(tmp_path / "o"), "--plateau-across-seeds", *extra]
        if extra:
            argv += ["--until-plateau", "2"]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as e:
            pareto.main()
        assert e.value.code == 2 and "--plateau-across-seeds needs --until-plateau" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_lockstep_budgets_refuses_an_empty_range():
    with pytest.raises(ValueError):
        seed_budgets.lockstep_budgets(lambda s, b: None, lambda: {}, [0], ["a"], 64, 32)
