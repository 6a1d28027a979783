"""The Pareto benches' pure logic (bench/plateau.py, bench/pareto.py, bench/jumprelu_gated.py):
the per-folder plateau search, the deletion of superseded budgets, the verdict rule on ratios whose
interval is computed here by hand, and --report-only reproducing the verdicts from pareto.json."""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import jumprelu_gated  # noqa: E402
import pareto  # noqa: E402
import verdicts  # noqa: E402
import plateau  # noqa: E402
import settled  # noqa: E402


def fake_train(losses: dict, calls: list):
    """train(epochs) for a folder whose SAEs have held-out loss losses[name][epochs]."""
    def train(epochs):
        calls.append(epochs)
        return {name: {"held_out_loss": by_epochs[epochs], "steps": 10 * epochs} for name, by_epochs in losses.items()}
    return train


def test_plateaued_is_every_sae_and_both_directions():
    before = {"a": {"held_out_loss": 1.0}, "b": {"held_out_loss": 2.0}}
    assert plateau.plateaued(before, {"a": {"held_out_loss": 0.99}, "b": {"held_out_loss": 2.03}}, 2)
    # one SAE still moving (down 3%) is enough to go on
    assert not plateau.plateaued(before, {"a": {"held_out_loss": 0.97}, "b": {"held_out_loss": 2.0}}, 2)
    # a rise is movement too (an L1 SAE's NMSE rises while its L0 still falls)
    assert not plateau.plateaued(before, {"a": {"held_out_loss": 1.05}, "b": {"held_out_loss": 2.0}}, 2)
    # an SAE with no record before, or no loss, is not a plateau
    assert not plateau.plateaued({"a": before["a"]}, {"a": {"held_out_loss": 1.0}, "b": {"held_out_loss": 2.0}}, 2)
    assert not plateau.plateaued(before, {"a": {"held_out_loss": None}, "b": {"held_out_loss": 2.0}}, 2)
    # a diverged SAE (NaN loss or L0) is not flat: NaN compares False with any bound
    nan = float("nan")
    assert not plateau.plateaued(before, {"a": {"held_out_loss": nan}, "b": {"held_out_loss": 2.0}}, 2)
    assert not plateau.plateaued({"a": {"held_out_loss": nan}}, {"a": {"held_out_loss": 1.0}}, 2)
    assert not plateau.plateaued({"a": {"held_out_loss": 1.0, "held_out_l0": 5.0}},
                                 {"a": {"held_out_loss": 1.0, "held_out_l0": nan}}, 2)
    assert not plateau.past_optimum({"a": {"held_out_loss": 1.0, "held_out_l0": 5.0}},
                                    {"a": {"held_out_loss": float("inf"), "held_out_l0": 5.0}}, 2)


def test_plateau_needs_the_l0_still_too():
    # seed 0's tuned ReLU at 64 -> 128 epochs (the journal's numbers): NMSE moved 1.1-1.6%, L0 fell 7-11%
    before = {"l1-100": {"held_out_loss": 0.03125, "held_out_l0": 20.0}, "l1-300": {"held_out_loss": 0.08095, "held_out_l0": 8.3}}
    after = {"l1-100": {"held_out_loss": 0.03076, "held_out_l0": 18.5}, "l1-300": {"held_out_loss": 0.07989, "held_out_l0": 7.4}}
    assert not plateau.plateaued(before, after, 2)
    assert plateau.plateaued(before, after, 12)   # both move < 12%
    flat_l0 = {k: {**v, "held_out_l0": before[k]["held_out_l0"] * 1.01} for k, v in after.items()}
    assert plateau.plateaued(before, flat_l0, 2)
    # a journal from before L0 was kept: the loss alone decides, as it did then
    no_l0 = {k: {"held_out_loss": v["held_out_loss"]} for k, v in after.items()}
    assert plateau.plateaued({k: {"held_out_loss": v["held_out_loss"]} for k, v in before.items()}, no_l0, 2)
    # an L0 of 0 before (every latent dead) cannot be a plateau of a ratio
    assert not plateau.plateaued({"x": {"held_out_loss": 1.0, "held_out_l0": 0.0}},
                                 {"x": {"held_out_loss": 1.0, "held_out_l0": 0.0}}, 2)


def test_each_folder_stops_at_its_own_plateau():
    # a cheap folder settles between 2 and 4 epochs, a slow one between 16 and 32
    fast = {"x1": {1: 1.0, 2: 0.8, 4: 0.795, 8: 0.79}, "x2": {1: 2.0, 2: 1.5, 4: 1.49, 8: 1.48}}
    slow = {"y": {1: 1.0, 2: 0.8, 4: 0.6, 8: 0.5, 16: 0.45, 32: 0.445, 64: 0.44}}
    calls_fast, calls_slow, discarded = [], [], []
    a = plateau.search(fake_train(fast, calls_fast), 1, 2.0, 64, discard=discarded.append)
    b = plateau.search(fake_train(slow, calls_slow), 1, 2.0, 64)
    assert (a["epochs"], a["stop"], a["plateaued"]) == (4, "plateau", True)
    assert (b["epochs"], b["stop"], b["plateaued"]) == (32, "plateau", True)
    assert calls_fast == [1, 2, 4] and calls_slow == [1, 2, 4, 8, 16, 32]
    # each budget is deleted once the next one is trained; the evaluated (last) one is kept
    assert discarded == [1, 2]
    # every budget's record is kept, with its epochs, steps and timings
    assert [h["epochs"] for h in a["history"]] == [1, 2, 4]
    assert a["history"][-1]["training"]["x1"]["steps"] == 40
    assert all(h["seconds"] >= 0 and h["cpu_seconds"] >= 0 for h in a["history"])


def test_search_stops_at_max_epochs_and_without_a_target():
    moving = {"z": {e: 1.0 / e for e in (1, 2, 4, 8, 16)}}
    calls = []
    r = plateau.search(fake_train(moving, calls), 1, 2.0, 10)
    assert (r["epochs"], r["stop"], r["plateaued"]) == (8, "max-epochs", False) and calls == [1, 2, 4, 8]
    calls = []
    r = plateau.search(fake_train(moving, calls), 2, 0.0, 64)
    assert (r["epochs"], r["stop"], r["plateaued"]) == (2, "one budget", False) and calls == [2]
    with pytest.raises(ValueError):
        plateau.search(fake_train(moving, []), 4, 2.0, 2)


class FakeTrainer(plateau.SeedTrainer):
    """SeedTrainer whose train() writes empty SAE folders instead of training."""

    def __init__(self, root, losses):
        super().__init__(str(root), store="s.zarr", site="blocks.2.resid_pre", seed=0, d_sae=64, local={}, tag="t")
        self.losses, self.inits = losses, {}

    def train(self, folder, arch, extra, epochs, force=False):
        cfg = self.config(folder, arch, extra, epochs)
        self.inits[(folder, epochs)] = cfg.get("init")
        self.trained = getattr(self, "trained", []) + [(folder, epochs)]
        recs = {}
        for name, by_epochs in self.losses[folder].items():
            (Path(cfg["out"]) / name).mkdir(parents=True, exist_ok=True)
            (Path(cfg["out"]) / name / "cfg.json").write_text("{}")
            recs[name] = {"held_out_loss": by_epochs[epochs], "steps": epochs}
        return recs


def test_seed_trainer_keeps_only_the_evaluated_budgets_and_starts_continuations_from_them(tmp_path):
    losses = {"relu": {"relu_l1-300": {1: 1.0, 2: 0.5, 4: 0.499}},
              "e2e": {"relu_l1-1": {1: 0.3, 2: 0.2, 4: 0.1, 8: 0.0999}}}
    rows = [("relu", "relu", {"l1": (300.0,)}),
            ("e2e", "relu", {"loss": "e2e", "l1": (1.0,), "init": "relu/relu_l1-300", "epochs": 1})]
    t = FakeTrainer(tmp_path, losses)
    paths, budgets = t.run(rows, first=1, pct=2.0, max_epochs=64)
    assert {f: b["epochs"] for f, b in budgets.items()} == {"relu": 4, "e2e": 8}
    assert paths == [str(tmp_path / "epochs4" / "relu" / "relu_l1-300"),
                     str(tmp_path / "epochs8" / "e2e" / "relu_l1-1")]
    # on disk: only the evaluated budgets (the superseded ones and their emptied epochs{E} folders are gone)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("epochs*/*")) == ["epochs4/relu", "epochs8/e2e"]
    # the continuation starts from relu's evaluated budget, at every one of its own budgets
    assert {e: i for (f, e), i in t.inits.items() if f == "e2e"} == \
        {e: str(tmp_path / "epochs4" / "relu" / "relu_l1-300") for e in (1, 2, 4, 8)}


def test_past_optimum_is_a_rise_at_a_steady_l0():
    # seed 0's tuned TopK at 128 -> 256 epochs (the journal's numbers): +2.5 / +3.2 / +7.1% at L0 8 / 16 / 32
    before = {"k8": {"held_out_loss": 0.0431, "held_out_l0": 8.0}, "k16": {"held_out_loss": 0.01779, "held_out_l0": 16.0},
              "k32": {"held_out_loss": 0.00531, "held_out_l0": 32.0}}
    after = {"k8": {"held_out_loss": 0.0442, "held_out_l0": 8.0}, "k16": {"held_out_loss": 0.01835, "held_out_l0": 16.0},
             "k32": {"held_out_loss": 0.00568, "held_out_l0": 31.97}}
    assert plateau.past_optimum(before, after, 2) and not plateau.plateaued(before, after, 2)
    # one SAE still improving by >= 2% (Matryoshka k = 8: -3.8%): not past the optimum
    improving = {**after, "k8": {"held_out_loss": 0.0431 * 0.962, "held_out_l0": 8.0}}
    assert not plateau.past_optimum(before, improving, 2)
    # a rise while the L0 falls is an L1 SAE's trade, not a turn
    trading = {k: {**v, "held_out_l0": before[k]["held_out_l0"] * 0.94} for k, v in after.items()}
    assert not plateau.past_optimum(before, trading, 2)
    # all within 2%: a plateau, not a turn; no L0 recorded: never a turn
    flat = {k: {**v, "held_out_loss": before[k]["held_out_loss"] * 1.01} for k, v in after.items()}
    assert not plateau.past_optimum(before, flat, 2) and plateau.plateaued(before, flat, 2)
    no_l0 = {k: {"held_out_loss": v["held_out_loss"]} for k, v in after.items()}
    assert not plateau.past_optimum({k: {"held_out_loss": v["held_out_loss"]} for k, v in before.items()}, no_l0, 2)


def test_search_evaluates_the_budget_before_a_turn_and_deletes_the_worse_one():
    losses = {"k16": {1: 1.0, 2: 0.8, 4: 0.7, 8: 0.74}}
    calls, discarded = [], []

    def train(epochs):
        calls.append(epochs)
        return {n: {"held_out_loss": by[epochs], "held_out_l0": 16.0} for n, by in losses.items()}
    r = plateau.search(train, 1, 2.0, 64, discard=discarded.append, early_stop=True)
    assert (r["epochs"], r["stop"], r["plateaued"]) == (4, "turned", True)
    assert calls == [1, 2, 4, 8] and discarded == [1, 2, 8]   # 4 (the better) is kept, 8 deleted
    assert [h["epochs"] for h in r["history"]] == [1, 2, 4, 8]   # every budget's record stays


def test_without_early_stop_a_rise_is_trained_through_to_the_cap():
    """The default: a held-out rise at a steady L0 does not stop the search (one seed's change between
    budgets is mostly noise, docs/results.md), so every folder gets the same budget unless it plateaus."""
    losses = {"k16": {1: 1.0, 2: 0.8, 4: 0.7, 8: 0.74, 16: 0.72}}
    calls, discarded = [], []

    def train(epochs):
        calls.append(epochs)
        return {n: {"held_out_loss": by[epochs], "held_out_l0": 16.0} for n, by in losses.items()}
    r = plateau.search(train, 1, 2.0, 16, discard=discarded.append)
    assert (r["epochs"], r["stop"], r["plateaued"]) == (16, "max-epochs", False)
    assert calls == [1, 2, 4, 8, 16] and discarded == [1, 2, 4, 8]


def test_the_printed_budget_after_a_turn_is_the_evaluated_one(capsys):
    losses = {"k16": {1: 1.0, 2: 0.8, 4: 0.85}}
    rec = plateau.search(lambda e: {n: {"held_out_loss": by[e], "held_out_l0": 16.0, "steps": 10 * e, "tokens": 100 * e}
                                    for n, by in losses.items()}, 1, 2.0, 64, early_stop=True)
    verdicts.print_budget({"seed": 0, "seconds": 1.0, "sweeps": {"topk": rec}})
    out = capsys.readouterr().out
    assert "topk: 2 epoch(s) (turned), 20 steps, 200 tokens" in out


def test_seed_trainer_evaluates_the_kept_budget_after_a_turn_and_retrains_it_if_deleted(tmp_path):
    losses = {"topk": {"topk_k16": {1: 1.0, 2: 0.8, 4: 0.85}}}

    class WithL0(FakeTrainer):
        def train(self, folder, arch, extra, epochs, force=False):
            recs = super().train(folder, arch, extra, epochs, force)
            return {n: {**r, "held_out_l0": 16.0} for n, r in recs.items()}
    t = WithL0(tmp_path, losses)
    paths, budgets = t.run([("topk", "topk", {"k": (16,)})], first=1, pct=2.0, max_epochs=64, early_stop=True)
    assert budgets["topk"]["epochs"] == 2 and budgets["topk"]["stop"] == "turned"
    assert paths == [str(tmp_path / "epochs2" / "topk" / "topk_k16")]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("epochs*/*")) == ["epochs2/topk"]
    # a journal whose evaluated budget was deleted (an older run went on past it, as stop 13's did):
    # replayed from the records, then only that budget is retrained, and its own record replaced

    class Journaled(WithL0):
        def train(self, folder, arch, extra, epochs, force=False):
            if not force:   # recorded earlier: no training, no files
                return {"topk_k16": {"held_out_loss": losses[folder]["topk_k16"][epochs], "held_out_l0": 16.0,
                                     "steps": epochs}}
            return super().train(folder, arch, extra, epochs, force)
    import shutil
    shutil.rmtree(tmp_path / "epochs2")
    t2 = Journaled(tmp_path, losses)
    paths, budgets = t2.run([("topk", "topk", {"k": (16,)})], first=1, pct=2.0, max_epochs=64, early_stop=True)
    assert t2.trained == [("topk", 2)] and paths == [str(tmp_path / "epochs2" / "topk" / "topk_k16")]
    assert (tmp_path / "epochs2" / "topk" / "topk_k16" / "cfg.json").exists()
    assert [(h["epochs"], h["training"]["topk_k16"]["held_out_loss"]) for h in budgets["topk"]["history"]] == \
        [(1, 1.0), (2, 0.8), (4, 0.85)]


def _hand_interval(logs):
    n = len(logs)
    t = {4: 2.776, 5: 2.571}[n - 1]
    half = t * np.std(logs, ddof=1) / np.sqrt(n)
    return np.exp(np.mean(logs) - half), np.exp(np.mean(logs) + half)


@pytest.mark.parametrize("shift,expected,verdict,outcome", [
    (-0.25, "<", "agrees", "lower"),      # half-width 0.196 (5 seeds): the interval is below 1
    (-0.15, "<", "tie", "tie"),           # contains 1
    (0.25, "<", "disagrees", "higher"),
    (0.25, ">", "agrees", "higher"),
    (-0.15, "~", "agrees", "tie"),        # "no worse": a tie agrees
    (-0.25, "~", "disagrees", "lower"),   # and a difference either way disagrees
])
def test_interval_rule_on_crafted_ratios(shift, expected, verdict, outcome):
    logs = np.array([-0.2, -0.1, 0.0, 0.1, 0.2]) + shift
    v = verdicts.verdict(list(np.exp(logs)), expected)
    assert (v["verdict"], v["outcome"]) == (verdict, outcome)
    assert v["interval"] == pytest.approx(list(_hand_interval(logs)), rel=1e-3)
    assert v["ratio"] == pytest.approx(np.exp(shift))


def test_fewer_than_five_seeds_is_untested():
    v = verdicts.verdict([0.5, 0.5, 0.5, 0.5], "<")
    assert v["verdict"].startswith("untested") and v["interval"] is None
    # six seeds use t(5) = 2.571
    logs = np.array([-0.2, -0.1, 0.0, 0.1, 0.2, 0.0]) - 0.2
    assert verdicts.verdict(list(np.exp(logs)), "<")["interval"] == pytest.approx(list(_hand_interval(logs)), rel=1e-3)


def _series(ratio_ce: float, seed: int) -> dict:
    """One seed's series: relu's CE at L0 8..64, gated's at the same L0 times ratio_ce."""
    relu = [{"name": f"relu_{l0}", "l0": float(l0), "ce_increase": 1.0 / l0 * (1 + 0.01 * seed),
             "downstream_mse": 1.0} for l0 in (8, 16, 32, 64)]
    gated = [{**q, "name": q["name"].replace("relu", "gated"), "ce_increase": q["ce_increase"] * ratio_ce}
             for q in relu]
    return {"relu": relu, "gated": gated}


def test_report_only_reproduces_the_verdicts(tmp_path, monkeypatch, capsys):
    per_seed = [_series(r, s) for s, r in enumerate((0.5, 0.55, 0.6, 0.52, 0.58))]
    args = pareto.argparse.Namespace(out=str(tmp_path), report_only=False, e2e="scratch")
    budgets = [{"seed": 0, "sweeps": {"relu": {"epochs": 4, "stop": "plateau", "history": [
        {"epochs": 4, "training": {"relu_l1-300": {"steps": 40, "tokens": 40960}}}]}}, "seconds": 1.0}]
    written = pareto.report(args, per_seed, budgets, {"tokens": 1024}, 0.0)
    doc = json.loads((tmp_path / "pareto.json").read_text())
    assert doc["comparisons"] == json.loads(json.dumps(written["comparisons"]))
    rows = doc["comparisons"]["gated vs relu: ce_increase <"]
    assert rows and all(r["verdict"] == "agrees" for r in rows)
    assert rows[0]["ratios"] == pytest.approx([0.5, 0.55, 0.6, 0.52, 0.58])
    first = capsys.readouterr().out
    assert "relu: 4 epoch(s) (plateau), 40 steps, 40,960 tokens" in first
    monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(tmp_path), "--report-only"])
    real, seen = pareto.report, []
    monkeypatch.setattr(pareto, "report", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    pareto.main()
    assert json.loads(json.dumps(seen[0]["comparisons"])) == doc["comparisons"]
    assert [ln for ln in capsys.readouterr().out.splitlines() if "agrees" in ln or "tie" in ln] == \
        [ln for ln in first.splitlines() if "agrees" in ln or "tie" in ln]
    # and it leaves pareto.json as the run wrote it (its args and timings)
    assert json.loads((tmp_path / "pareto.json").read_text()) == doc


def test_jumprelu_gated_compare_uses_the_same_rule():
    per_seed = []
    for s, r in enumerate((0.5, 0.55, 0.6, 0.52, 0.58)):
        base = _series(r, s)
        per_seed.append({"jumprelu": [{**q, "nmse_nobos": q["ce_increase"]} for q in base["gated"]],
                         "gated": [{**q, "nmse_nobos": q["ce_increase"]} for q in base["relu"]],
                         "relu": [{**q, "nmse_nobos": 2 * q["ce_increase"]} for q in base["relu"]]})
    out = jumprelu_gated.compare(per_seed)
    assert all(r["verdict"] == "agrees" for r in out["jumprelu vs gated: ce_increase <"])
    assert all(r["verdict"] == "agrees" for r in out["gated vs jumprelu: ce_increase >"])
    # gated equals relu's CE at every point, every seed: log ratio 0 with zero spread is a tie
    assert all(r["verdict"] == "tie" for r in out["gated vs relu: ce_increase <"])


def test_a_second_process_follows_the_budgets_the_searched_seeds_evaluate(tmp_path):
    """--follow-searched: a folder the search stopped early (its held-out loss turned) is trained
    at the budget before the turn, not at the cap; another rule or cap, or an unfinished search, is refused."""
    ran = {"until_plateau": 2.0, "max_epochs": 256, "epochs": 32, "plateau_seeds": 1}
    doc = {"args": ran, "budgets": [{"seed": 0, "sweeps": {"relu": {"epochs": 256, "stop": "max-epochs"},
                                                           "topk": {"epochs": 128, "stop": "turned"}}}]}
    path = tmp_path / "pareto.json"
    path.write_text(json.dumps(doc))
    args = argparse.Namespace(**ran)
    assert pareto.searched_budgets(str(path), args) == {"relu": 256, "topk": 128}
    with pytest.raises(ValueError, match="--max-epochs 256, this run has 128"):
        pareto.searched_budgets(str(path), argparse.Namespace(**{**ran, "max_epochs": 128}))
    # anything the seeds train on, not only the search's own arguments; the process's own ones are free
    with pytest.raises(ValueError, match="--e2e-ds-l1 \\[3.0, 10.0\\], this run has \\[0.3, 1.0, 3.0\\]"):
        path.write_text(json.dumps({**doc, "args": {**ran, "e2e_ds_l1": [3.0, 10.0]}}))
        pareto.searched_budgets(str(path), argparse.Namespace(**ran, e2e_ds_l1=(0.3, 1.0, 3.0)))
    path.write_text(json.dumps({**doc, "args": {**ran, "only_seeds": None, "train_only": False}}))
    assert pareto.searched_budgets(str(path), argparse.Namespace(**ran, only_seeds="3,4", train_only=True))
    path.write_text(json.dumps({**doc, "args": {**ran, "plateau_seeds": 2}}))
    with pytest.raises(ValueError, match="not finished"):
        pareto.searched_budgets(str(path), argparse.Namespace(**{**ran, "plateau_seeds": 2}))
    path.write_text(json.dumps({**doc, "args": {**ran, "plateau_seeds": None}}))
    with pytest.raises(ValueError, match="no --plateau-seeds"):
        pareto.searched_budgets(str(path), argparse.Namespace(**{**ran, "plateau_seeds": None}))


def _searching_args(tmp_path, monkeypatch, argv) -> dict:
    """The args a searching process records in pareto.json (main(), stopped before any training)."""
    seen = {}

    def grab(args, *a, **k):
        seen.update(json.loads(json.dumps(vars(args))))
        raise SystemExit(0)

    monkeypatch.setattr(pareto, "harvest_store", lambda *a, **k: "store")
    monkeypatch.setattr(pareto, "check_same_held_out", lambda *a: None)
    monkeypatch.setattr(pareto, "run_seed", grab)
    monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(tmp_path / "first"), *argv])
    with pytest.raises(SystemExit):
        pareto.main()
    monkeypatch.undo()
    return seen


SEARCH = ["--local-only", "--seeds", "5", "--epochs", "32", "--until-plateau", "2", "--max-epochs", "256",
          "--plateau-seeds", "1"]
BUDGETS = {f: {"epochs": 256} for f in ("relu", "gated", "jumprelu", "topk", "batchtopk", "gtopk", "matryoshka",
                                         "gtopk_lf")}


def _follow(tmp_path, monkeypatch, capsys, ran: dict, budgets: dict, argv) -> tuple[int, str]:
    out = tmp_path / "o"
    out.mkdir(exist_ok=True)
    (out / "pareto.json").write_text(json.dumps({"args": ran, "budgets": [{"seed": 0, "sweeps": budgets}]}))
    monkeypatch.setattr(pareto, "harvest_store", lambda *a, **k: "store")   # reached: the checks passed
    monkeypatch.setattr(pareto, "check_same_held_out", lambda *a: None)
    monkeypatch.setattr(pareto, "run_seed", lambda args, *a, **k: print(f"followed {args.followed}"))
    monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(out), *argv, "--only-seeds", "3", "--train-only",
                                      "--follow-searched"])
    try:
        pareto.main()
        code = 0
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_follow_searched_refuses_rows_the_searched_seeds_never_trained(tmp_path, monkeypatch, capsys):
    """A folder missing from the searched budgets (e.g. the searching run had --no-label-free) would be
    searched by the second process, which never reports: one line, exit 2, before any harvest."""
    ran = _searching_args(tmp_path, monkeypatch, SEARCH)
    code, said = _follow(tmp_path, monkeypatch, capsys, ran, BUDGETS, SEARCH)
    assert code == 0 and "'topk': 256" in said                      # the same arguments: followed
    code, said = _follow(tmp_path, monkeypatch, capsys, ran, {k: v for k, v in BUDGETS.items() if k != "gtopk_lf"},
                         SEARCH)
    assert code == 2 and "no budget for gtopk_lf" in said and "Traceback" not in said


def test_follow_searched_compares_scrubbed_and_every_argument(tmp_path, monkeypatch, capsys):
    """pareto.json records store URLs scrubbed: the same URL with credentials is the same store, and
    a refusal never prints them. An argument the JSON lacks is refused unless it came later with the
    value older runs had (ADDED_LATER), so another e2e+ds grid cannot follow an older run."""
    url = ["--store", "s3://AKIA:secret@bucket/x.zarr"]
    ran = _searching_args(tmp_path, monkeypatch, SEARCH + url)
    assert ran["store"] == "s3://AKIA:secret@bucket/x.zarr"   # vars(args); report() writes it scrubbed
    ran["store"] = "s3://bucket/x.zarr"
    code, said = _follow(tmp_path, monkeypatch, capsys, ran, BUDGETS, SEARCH + url)
    assert code == 0, said
    code, said = _follow(tmp_path, monkeypatch, capsys, ran, BUDGETS, SEARCH + ["--store", "s3://K:secret@b/y.zarr"])
    assert code == 2 and "s3://b/y.zarr" in said and "secret" not in said
    older = {k: v for k, v in ran.items() if k != "e2e_ds_l1"}
    assert _follow(tmp_path, monkeypatch, capsys, older, BUDGETS, SEARCH + url)[0] == 0
    code, said = _follow(tmp_path, monkeypatch, capsys, older, BUDGETS, SEARCH + url + ["--e2e-ds-l1", "3,10"])
    assert code == 2 and "--e2e-ds-l1 [0.3, 1.0, 3.0], this run has [3.0, 10.0]" in said
    code, said = _follow(tmp_path, monkeypatch, capsys, {k: v for k, v in ran.items() if k != "d_sae"}, BUDGETS,
                         SEARCH + url)
    assert code == 2 and "records no --d-sae" in said


def test_later_seeds_train_once_at_the_searched_seeds_largest_budget(tmp_path):
    searched = [{"sweeps": {"relu": {"epochs": 8}, "e2e": {"epochs": 2}}},
                {"sweeps": {"relu": {"epochs": 16}, "e2e": {"epochs": 2}}}]
    assert pareto.fixed_budgets(searched[:1], 2) is None          # still searching
    assert pareto.fixed_budgets(searched, None) is None           # default: every seed searches
    assert pareto.fixed_budgets(searched, 2) == {"relu": 16, "e2e": 2}
    losses = {"relu": {"relu_l1-300": {16: 0.5}}, "e2e": {"relu_l1-1": {2: 0.2}}}
    rows = [("relu", "relu", {"l1": (300.0,)}),
            ("e2e", "relu", {"loss": "e2e", "l1": (1.0,), "init": "relu/relu_l1-300", "epochs": 1})]
    t = FakeTrainer(tmp_path, losses)
    _, budgets = t.run(rows, first=1, pct=2.0, max_epochs=8, fixed={"relu": 16, "e2e": 2})
    assert sorted(t.inits) == [("e2e", 2), ("relu", 16)]          # one budget each, no search
    assert {f: (b["epochs"], b["stop"]) for f, b in budgets.items()} == \
        {"relu": (16, "fixed (the searched seeds' budget)"), "e2e": (2, "fixed (the searched seeds' budget)")}


def test_continuation_claims_compare_e2e_with_the_continued_local_saes(tmp_path, monkeypatch):
    assert pareto.claims("scratch") == pareto.CLAIMS
    cont = dict(((a, m, x), b) for a, b, m, x in pareto.claims("continuation"))
    assert cont[("e2e", "ce_increase", "<")] == "relu_cont" and cont[("e2e_ds", "downstream_mse", "~")] == "relu_cont"
    assert cont[("gated", "ce_increase", "<")] == "relu"
    # e2e beats the un-continued relu by 2x but only matches relu_cont: a continuation run's
    # verdict is the tie, and --report-only reads the mode from pareto.json
    per_seed = []
    for s in range(5):
        relu = [{"name": f"r{l0}", "l0": float(l0), "ce_increase": 1.0 / l0, "downstream_mse": 1.0} for l0 in (8, 64)]
        cont_pts = [{**q, "ce_increase": q["ce_increase"] * 0.5 * (1 + 0.01 * (s - 2))} for q in relu]
        # on relu_cont's front without the seed's wobble (interp_ce: linear in log L0)
        ce = float(np.interp(np.log(20), np.log([8, 64]), [0.5 / 8, 0.5 / 64]))
        e2e = [{"name": "e", "l0": 20.0, "ce_increase": ce, "downstream_mse": 1.0}]
        per_seed.append({"relu": relu, "relu_cont": cont_pts, "e2e": e2e})
    args = pareto.argparse.Namespace(out=str(tmp_path), report_only=False, e2e="continuation")
    out = pareto.report(args, per_seed, [], None, 0.0)
    assert out["comparisons"]["e2e vs relu_cont: ce_increase <"][0]["verdict"] == "tie"
    assert "e2e vs relu: ce_increase <" not in out["comparisons"]   # not a claim of this mode
    monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(tmp_path), "--report-only"])
    real, seen = pareto.report, []
    monkeypatch.setattr(pareto, "report", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    pareto.main()
    assert "e2e vs relu_cont: ce_increase <" in seen[0]["comparisons"]


def test_a_capped_folder_stops_at_its_own_max_epochs(tmp_path):
    losses = {"relu": {"relu_l1-300": {1: 1.0, 2: 0.5, 4: 0.3, 8: 0.299}},
              "e2e": {"relu_l1-1": {1: 0.3, 2: 0.2, 4: 0.1, 8: 0.05}}}
    rows = [("relu", "relu", {"l1": (300.0,)}), ("e2e", "relu", {"loss": "e2e", "l1": (1.0,)})]
    _, budgets = FakeTrainer(tmp_path, losses).run(rows, first=1, pct=2.0, max_epochs=64, caps={"e2e": 2})
    assert {f: (b["epochs"], b["stop"]) for f, b in budgets.items()} == \
        {"relu": (8, "plateau"), "e2e": (2, "max-epochs")}


def test_the_e2e_cap_covers_relu_cont_under_continuation():
    folders = {r[0] for r in pareto.sweeps("continuation", None)}
    assert pareto.e2e_caps(pareto.sweeps("continuation", None), 2) == \
        {f: 2 for f in folders if f in ("e2e", "e2e_ds") or f.startswith("relu_cont")}
    assert {"relu_cont100", "relu_cont300", "relu_cont1000", "e2e", "e2e_ds"} <= set(
        pareto.e2e_caps(pareto.sweeps("continuation", None), 2))
    assert set(pareto.e2e_caps(pareto.sweeps("scratch", None), 2)) == {"e2e", "e2e_ds"}
    assert pareto.e2e_caps(pareto.sweeps("scratch", None), None) is None


@pytest.mark.parametrize("arch,extra", [("topk", {"k": (4,)}), ("jumprelu", {"l1": (0.01,)}), ("gated", {"l1": (0.3,)})])
def test_training_record_reads_every_architectures_own_config(tmp_path, arch, extra):
    """Per-architecture configs hold only their own fields: the record read `sae.cfg.l1_coeff` of a
    TopK SAE and crashed the Pareto rerun at its first TopK row."""
    from sae_harvest.train.config import TrainConfig
    from sae_harvest.train.fit import fit
    from tests.test_train_loop import make_store

    make_store(tmp_path / "s.zarr", grads=False)
    cfg = TrainConfig(store=str(tmp_path / "s.zarr"), out=str(tmp_path / "o"), site="blocks.0.resid_pre", arch=arch,
                      d_sae=32, batch_size=256, device="cpu", tokens=256 * 3, checkpoint_every=1000, **extra)
    fit(cfg, progress=False)
    (folder,) = [p for p in (tmp_path / "o").iterdir() if p.name != "checkpoint"]
    record = plateau.training_record(str(folder))
    assert record["steps"] == 3 and record["loss_name"] == "nmse" and record["held_out_loss"] > 0
    assert ("moved" in record) == (arch != "topk")


def test_journal_and_pareto_json_never_hold_a_store_urls_credentials(tmp_path):
    trainer = plateau.SeedTrainer.__new__(plateau.SeedTrainer)
    trainer.root, trainer.journal_path = tmp_path, tmp_path / "plateau.json"
    trainer.journal = {"relu": {"1": {"config": '{"store": "s3://AKIAKEY:SeCrEt@bucket/s.zarr"}'}}}
    trainer._save()
    assert "SeCrEt" not in trainer.journal_path.read_text() and "AKIAKEY" not in trainer.journal_path.read_text()


def _run_doc(verdicts_at: dict, rule: str = "paired 95% t-interval", slack=0.02):
    """A pareto.json holding one claim's rows: {point: verdict} (a point "k16" is an SAE, 16 an L0)."""
    rows = []
    for where, v in verdicts_at.items():
        real = v in settled.REAL
        row = {"l0": 16.0, "verdict": v, "ratio": 0.9 if real else None, "interval": [0.8, 1.1] if real else None}
        rows.append({**row, "at": where} if isinstance(where, str) else {**row, "l0": where})
    return {"rule": rule, "l0_slack": slack, "comparisons": {"a vs b: ce_increase <": rows}}


def test_settled_marks_a_point_settled_only_when_every_run_gives_the_same_real_verdict(tmp_path, capsys):
    small = _run_doc({8: "agrees", 16: "tie", 32: "tie", "a_k8": "untested (fewer than 5 seeds)", "a_k16": "agrees"})
    large = _run_doc({8: "agrees", 16: "disagrees", 32: "tie", "a_k8": "untested (fewer than 5 seeds)"})
    got = {q.where: q.status for q in settled.points([small, large])}
    assert got == {"L0 8": "settled", "L0 16": "moved", "L0 32": "settled",
                   "a_k8": "not comparable",     # untested at both: the same word, still no verdict
                   "a_k16": "not comparable"}    # missing from the larger run
    paths = []
    for name, doc in (("64", small), ("128", large)):
        paths.append(str(tmp_path / f"{name}.json"))
        Path(paths[-1]).write_text(json.dumps(doc))
    assert settled.main([*paths, "--labels", "64,128"]) == 0
    out = capsys.readouterr().out
    assert "a vs b: ce_increase < @ L0 16: moved" in out and "5 points: 2 settled, 1 moved, 2 not comparable" in out
    # a "~" claim disagrees when A is better and when it is worse: a flip between the two is not settled
    better, worse = ({"rule": "paired", "comparisons": {"a vs b: ce_increase ~": [
        {"l0": 16, "verdict": "disagrees", "ratio": r, "interval": [r - 0.1, r + 0.1]}]}} for r in (0.7, 1.4))
    assert [q.status for q in settled.points([better, worse])] == ["moved"]
    assert [q.status for q in settled.points([worse, worse])] == ["settled"]


@pytest.mark.parametrize("change,message", [
    ({"l0_slack": 0.0}, "different verdict rules or L0 slacks"),
    ({"rule": "sign test"}, "different verdict rules"),
    ({"rule": None}, "records no verdict rule"),
    ({"comparisons": {"a vs b": [{"l0": 8}]}}, "has a row without a verdict"),
    ({"comparisons": {"a vs b": [{"l0": 8, "verdict": "agrees"}]}}, "a verdict without a ratio, an interval"),
    ({"comparisons": {"a vs b": [{"l0": 8, "verdict": "tie", "ratio": 1.0, "interval": [0.9]}]}}, "an interval"),
    ({"comparisons": {"a vs b": [{"l0": 8, "verdict": "tie", "ratio": 1.0, "interval": [0.9, 1.1],
                                  "outcome": "sideways"}]}}, "a known outcome"),
    ({"comparisons": []}, "not a pareto.json"),
])
def test_settled_refuses_runs_judged_by_different_rules(tmp_path, capsys, change, message):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_run_doc({8: "agrees"})))
    b.write_text(json.dumps({**_run_doc({8: "agrees"}), **change}))
    assert settled.problem(["a list"]) is not None
    with pytest.raises(SystemExit) as e:
        settled.main([str(a), str(b)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_e2e_ds_grid_reaches_both_regimes_and_leaves_e2e_alone():
    for regime in ("scratch", "continuation"):
        rows = {r[0]: r[2] for r in pareto.sweeps(regime, None, (3.0, 10.0, 30.0))}
        assert rows["e2e_ds"]["l1"] == (3.0, 10.0, 30.0) and rows["e2e_ds"]["loss"] == "e2e+ds"
        assert rows["e2e"]["l1"] == pareto.E2E_L1
        assert {r[0]: r[2] for r in pareto.sweeps(regime, None)}["e2e_ds"]["l1"] == pareto.E2E_L1


def test_added_later_records_the_value_older_runs_had():
    import seed_budgets
    assert seed_budgets.ADDED_LATER["e2e_ds_l1"] == list(pareto.E2E_L1)   # the grid before --e2e-ds-l1 existed


def test_pareto_json_says_whether_each_folder_plateaued_across_seeds(tmp_path, monkeypatch, capsys):
    from tests.test_plateau_seeds import _write
    for seed in range(5):   # relu still falls ~10% per doubling in every seed; topk is flat
        _write(tmp_path, seed, {64: {"relu_l1-300": (1.0, 8.0)}, 128: {"relu_l1-300": (0.9 - seed / 1000, 8.0)}},
               folder="relu")
        journal = json.loads((tmp_path / f"seed{seed}" / "plateau.json").read_text())
        _write(tmp_path, seed, {64: {"topk_k8": (1.0, 8.0)}, 128: {"topk_k8": (1.0 + seed / 1000, 8.0)}}, folder="topk")
        journal.update(json.loads((tmp_path / f"seed{seed}" / "plateau.json").read_text()))
        (tmp_path / f"seed{seed}" / "plateau.json").write_text(json.dumps(journal))
    per_seed = [_series(r, s) for s, r in enumerate((0.5, 0.55, 0.6, 0.52, 0.58))]
    args = pareto.argparse.Namespace(out=str(tmp_path), report_only=False, e2e="scratch", until_plateau=2.0)
    out = pareto.report(args, per_seed, [], {"tokens": 1024}, 0.0)
    assert out["plateau_across_seeds"] == {"pct": 2.0, "folders": {"relu": {"64->128": "not plateaued"},
                                                                   "topk": {"64->128": "plateaued"}}}
    assert "  relu: 64->128 not plateaued" in capsys.readouterr().out
    # --report-only reads the run's --until-plateau from pareto.json and judges the journals again
    monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(tmp_path), "--report-only"])
    pareto.main()
    assert "  topk: 64->128 plateaued" in capsys.readouterr().out


def test_folders_trains_only_those_rows_and_keeps_the_whole_runs_tuned_lrs(tmp_path, monkeypatch, capsys):
    """--folders topk,batchtopk: only those rows reach the trainer, each at its tuned lr, from an lr
    file tuned for the whole run (its other folders are not "unknown"); a name that is no folder, a
    repeat, or a continuation without the folder it starts from: one line, exit 2, nothing harvested."""
    lrs = tmp_path / "lrs.json"   # the two trained folders' lrs and one of another folder of the run
    lrs.write_text(json.dumps({"relu": 0.001, "topk": 0.004, "batchtopk": 0.005}))
    rows_seen = []

    def grab(args, seed, store, lf_store, local, lr, *a, **k):
        rows_seen.extend(pareto.with_lrs(pareto.run_rows(args, lf_store), lr))
        raise SystemExit(0)

    harvested = []
    monkeypatch.setattr(pareto, "harvest_store", lambda *a, **k: harvested.append(a) or "store")
    monkeypatch.setattr(pareto, "check_same_held_out", lambda *a: None)
    monkeypatch.setattr(pareto, "run_seed", grab)
    base = ["pareto.py", "--out", str(tmp_path / "o"), "--local-only", "--lrs", str(lrs), "--fixed-epochs", "8"]
    monkeypatch.setattr(sys, "argv", base + ["--folders", "batchtopk,topk"])   # kept in the run's order
    with pytest.raises(SystemExit):
        pareto.main()
    assert [(r[0], r[2]["lr"]) for r in rows_seen] == [("topk", 0.004), ("batchtopk", 0.005)]
    lrs.write_text(json.dumps({"topk": 0.004, "batchtopk": 0.005, "nope": 1.0}))   # a typo is still one
    monkeypatch.setattr(sys, "argv", base + ["--folders", "topk,batchtopk"])
    with pytest.raises(SystemExit) as e:
        pareto.main()
    assert e.value.code == 2 and "nope is not a sweep folder" in capsys.readouterr().err
    lrs.write_text(json.dumps({"topk": 0.004}))                                    # a trained folder without one
    with pytest.raises(SystemExit) as e:
        pareto.main()
    assert e.value.code == 2 and "no tuned lr for batchtopk" in capsys.readouterr().err
    harvested.clear()
    for bad, said in (("topk,nope", "nope: not a folder of this run"), ("topk,topk", "each once"),
                      ("e2e", "not a folder of this run")):
        monkeypatch.setattr(sys, "argv", base + ["--folders", bad])
        with pytest.raises(SystemExit) as e:
            pareto.main()
        out = capsys.readouterr().err
        assert e.value.code == 2 and said in out and "Traceback" not in out
    monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(tmp_path / "o"), "--e2e", "continuation",
                                      "--folders", "relu_cont100,e2e"])
    with pytest.raises(SystemExit) as e:
        pareto.main()
    assert e.value.code == 2 and "relu_cont100 starts from relu's SAEs: add relu" in capsys.readouterr().err
    # one series merges the relu_cont folders: a subset would interpolate local's front across a gap
    monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(tmp_path / "o"), "--e2e", "continuation",
                                      "--folders", "relu,relu_cont100,relu_cont1000,e2e"])
    with pytest.raises(SystemExit) as e:
        pareto.main()
    assert e.value.code == 2 and "relu_cont300 missing" in capsys.readouterr().err
    assert harvested == []


def test_a_folders_run_says_which_claims_it_did_not_train(tmp_path, capsys):
    """Claims whose folders a --folders run left out have no rows: said as not trained (in the JSON and
    the printout), never as a tie or an empty verdict."""
    per_seed = [{k: _series(r, s)[k] for k in ("relu", "gated")} for s, r in enumerate((0.5, 0.55, 0.6, 0.52, 0.58))]
    args = pareto.argparse.Namespace(out=str(tmp_path), report_only=False, e2e="scratch", folders=["relu", "gated"])
    out = pareto.report(args, per_seed, [], {"tokens": 1024}, 0.0)
    assert "gated vs relu: ce_increase <" not in out["untrained_claims"]
    assert "batchtopk vs topk: ce_increase <" in out["untrained_claims"]
    said = capsys.readouterr().out
    assert "batchtopk vs topk: ce_increase <\n  no rows: batchtopk vs topk not both trained (--folders)" in said
    assert "--folders relu,gated: only these folders were trained" in said
    assert json.loads((tmp_path / "pareto.json").read_text())["untrained_claims"] == out["untrained_claims"]


def test_ends_extend_is_refused_outside_report_only(tmp_path, monkeypatch, capsys):
    """A run is judged by the rule (held ends); extending them is a check of a finished run: one line,
    exit 2, nothing harvested or written."""
    harvested = []
    monkeypatch.setattr(pareto, "harvest_store", lambda *a, **k: harvested.append(a) or "store")
    monkeypatch.setattr(sys, "argv", ["pareto.py", "--out", str(tmp_path / "o"), "--ends", "extend"])
    with pytest.raises(SystemExit) as e:
        pareto.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--ends extend is a check of a finished run" in err and "Traceback" not in err
    assert harvested == [] and not (tmp_path / "o").exists()
