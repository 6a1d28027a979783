"""Training to a plateau, one sweep folder at a time, for the Pareto benches (bench/pareto.py,
bench/jumprelu_gated.py); the splice evaluation is not part of it.

A sweep folder (one architecture's sweep: relu at lambda 100 / 300 / 1000, topk at k 8 / 16 / 32,
...) is trained at `first`, 2x, 4x, ... epochs until every SAE of the folder moves its held-out
training loss (summary.json: NMSE for local SAEs, KL for e2e ones) and its held-out L0 by less
than P% between two budgets, or the next budget would pass --max-epochs. Each folder stops on its own: a cheap
architecture that settles at 4 epochs does not wait for one that needs 32, and each Pareto row
reports its own epochs, steps and tokens. Every budget is trained from scratch (`train fit
--epochs E`): the warmup and the cosine decay span the whole run, so continuing a shorter run would
not give the SAE that E epochs give. A budget's SAEs are deleted as soon as the next budget of the
folder is trained (only the last one is evaluated); every budget's training record stays in
`plateau.json` (a journal, so an interrupted run resumes without retraining what it recorded) and
in the bench's JSON.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from sae_harvest.stores.urls import scrub_text, scrub_tree


def plateaued(before: dict, after: dict, pct: float) -> bool:
    """Every SAE's held-out training loss and held-out L0 moved less than pct percent between two
    budgets (a rise counts as movement: an L1 SAE's NMSE rises while its L0 is still falling). L0
    counts because an L1/L0 SAE trades one for the other: at 64 -> 128 epochs the tuned ReLU moved
    its NMSE < 2% while its L0 fell 7-11%, not a plateau of what it minimises. A record without an
    L0 (a journal from before it was kept) is judged on its loss alone."""
    for key, rec in after.items():
        prev = before.get(key) or {}
        a, b = prev.get("held_out_loss"), rec.get("held_out_loss")
        # `not (< pct)`: a NaN (a diverged SAE) compares False both ways and must not read as flat
        if not positive(a) or not finite(b) or not abs(b / a - 1) * 100 < pct:
            return False
        l0a, l0b = prev.get("held_out_l0"), rec.get("held_out_l0")
        if l0a is not None and l0b is not None and (
                not positive(l0a) or not finite(l0b) or not abs(l0b / l0a - 1) * 100 < pct):
            return False
    return True


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def positive(x) -> bool:
    return finite(x) and x > 0


def past_optimum(before: dict, after: dict, pct: float) -> bool:
    """The held-out loss turned up: every SAE's L0 moved less than pct percent (so a rise is not an
    L1 SAE trading NMSE for L0), none improved its held-out loss by pct percent or more, and at
    least one got worse by pct percent or more. Seed 0's tuned TopK at 128 -> 256 epochs: +2.5,
    +3.2, +7.1% at a steady L0; the budget before is the better one (early stopping)."""
    worse = False
    for key, rec in after.items():
        prev = before.get(key) or {}
        a, b = prev.get("held_out_loss"), rec.get("held_out_loss")
        l0a, l0b = prev.get("held_out_l0"), rec.get("held_out_l0")
        if not (positive(a) and finite(b) and positive(l0a) and finite(l0b)):
            return False
        if abs(l0b / l0a - 1) * 100 >= pct or (b / a - 1) * 100 <= -pct:
            return False
        worse = worse or (b / a - 1) * 100 >= pct
    return worse


def search(train, first: int, pct: float, max_epochs: int, discard=lambda epochs: None, say=lambda *a: None,
           early_stop: bool = False) -> dict:
    """Double the epochs from `first` until plateaued(pct), with early_stop past_optimum(pct) (then
    the budget before is the one to evaluate), or until the next budget would pass max_epochs (pct 0:
    `first` only). Early stopping is off by default: on the tuned runs one seed's change between two
    budgets varied by ±4-10% across seeds (bench/overfit.py, docs/results.md), so a turn judged on one
    searched seed is mostly noise, and it would hand that folder a smaller budget than the others.
    `train(epochs) -> {name: record}` trains one budget; `discard(epochs)` deletes the SAEs of a
    budget that is not evaluated, once the comparison is made; `say(epochs, records, history, stop)`
    reports each budget. Returns {"epochs": the budget to evaluate, "plateaued", "stop": why it
    stopped, "history": [{"epochs", "training", "seconds", "cpu_seconds"}], every budget trained}."""
    if first < 1 or max_epochs < first:
        raise ValueError(f"need 1 <= first ({first}) <= max_epochs ({max_epochs})")
    history, epochs = [], first
    while True:
        wall, cpu = time.perf_counter(), time.process_time()
        records = train(epochs)
        history.append({"epochs": epochs, "training": records, "seconds": time.perf_counter() - wall,
                        "cpu_seconds": time.process_time() - cpu})
        turned = early_stop and bool(pct) and len(history) > 1 and past_optimum(history[-2]["training"], records, pct)
        flat = not turned and len(history) > 1 and plateaued(history[-2]["training"], records, pct)
        if len(history) > 1:
            discard(epochs if turned else history[-2]["epochs"])
        stop = "one budget" if not pct else "turned" if turned else "plateau" if flat else \
            "max-epochs" if epochs * 2 > max_epochs else None
        say(epochs, records, history, stop)
        if stop:
            return {"epochs": history[-2]["epochs"] if turned else epochs, "plateaued": flat or turned,
                    "stop": stop, "history": history}
        epochs *= 2


def training_record(path: str) -> dict:
    """Steps, tokens, the held-out training loss (local: NMSE; e2e: KL) and L0 of a saved SAE, and
    how far JumpReLU's thresholds / Gated's gates moved from their starts (theta_0 =
    max(init, sqrt(lambda)); b_gate_0 = -lambda/2; folding the input scale leaves both unchanged)."""
    from sae_harvest.train.sae_io import load_sae

    folder = Path(path)
    summary = json.loads((folder / "summary.json").read_text())
    cfg = json.loads((folder / "cfg.json").read_text())["sae_harvest"]
    held = summary.get("held_out", {})
    e2e = (cfg.get("training") or {}).get("loss", "local") != "local"
    out = {"steps": summary.get("steps"), "tokens": summary.get("tokens"),
           "held_out_loss": held.get("kl") if e2e else held.get("nmse"), "loss_name": "kl" if e2e else "nmse",
           "held_out_l0": held.get("l0")}
    sae = load_sae(folder)
    lam = getattr(sae.cfg, "l1_coeff", 0.0)   # each architecture's config holds only its own fields
    if sae.cfg.arch == "jumprelu" and lam > 0:
        start = max(getattr(sae.cfg, "threshold_init", 0.0) or 0.0, math.sqrt(lam))
        out["moved"] = _moved(sae.threshold.detach().double().numpy() / start, "theta / theta_0")
    elif sae.cfg.arch == "gated" and lam > 0:
        out["moved"] = _moved(sae.b_gate.detach().double().numpy() / (-lam / 2), "b_gate / b_gate_0")
    return out


def _moved(ratio: np.ndarray, what: str) -> dict:
    q = np.quantile(ratio, [0.05, 0.5, 0.95])
    return {"what": what, "q05": float(q[0]), "median": float(q[1]), "q95": float(q[2]),
            "moved_over_5pct": float(np.mean(np.abs(ratio - 1) > 0.05))}


# A budget killed mid-fit (a session's end) resumes from its last checkpoint instead of being refused
# (a folder with metrics but no cfg.json and no checkpoint is not provably train fit's).
CHECKPOINT_EVERY = 500
UNRECORDED = ("checkpoint_every",)   # config fields that do not change the trained SAEs


def same_config(recorded: str, key: str) -> bool:
    """A journal record's config is this run's, up to fields that do not change the SAEs (a record
    from before CHECKPOINT_EVERY, written with checkpoint_every 10**9, still counts)."""
    a, b = json.loads(recorded), json.loads(key)
    for field in UNRECORDED:
        a.pop(field, None), b.pop(field, None)
    return a == b


def say(*parts) -> None:
    """A progress line, unbuffered: a background run's log shows where it is."""
    print(*parts, flush=True)


class JournalError(ValueError):
    """A plateau.json this bench cannot read (the message names the file)."""

    def exit(self, bench: str) -> SystemExit:
        """What a bench's main raises: the one line on stderr, exit 2 (bad input, as argparse's)."""
        print(f"{bench}: error: {self}", file=sys.stderr)
        return SystemExit(2)


def check_journal(journal) -> None:
    """The shape SeedTrainer writes: {folder: {epochs: {"config": JSON text, "superseded",
    "training": {name: record}}}} (ValueError otherwise; a journal is read back, never trusted)."""
    if not isinstance(journal, dict):
        raise ValueError("not a bench/plateau.py journal (an object of sweep folders)")
    for folder, budgets in journal.items():
        if not isinstance(budgets, dict) or not all(b.isdigit() for b in budgets):
            raise ValueError(f"folder {folder!r}: not an object of epoch budgets")
        for b, entry in budgets.items():
            ok = isinstance(entry, dict) and isinstance(entry.get("config"), str) and \
                isinstance(entry.get("training"), dict) and all(isinstance(r, dict) for r in entry["training"].values())
            if ok:
                try:
                    ok = isinstance(json.loads(entry["config"]), dict)
                except ValueError:
                    ok = False
            if not ok:
                raise ValueError(f"folder {folder!r}, {b} epochs: not a record with a config and training records")


@contextlib.contextmanager
def seed_lock(root: str, tag: str):
    """One process at a time on a seed folder: two processes sharing --out (--only-seeds) would
    otherwise rewrite each other's journal and train into the same folders. The lock file is the
    bench's own; it is left in place (an empty file), and the OS releases the lock if a process dies."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"[{tag}] another process is on this seed; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class SeedTrainer:
    """Trains the sweep rows of one seed to their plateaus under `root` (root/epochs{E}/{folder}/
    {name}: the folder name stays the SAE's parent, which the benches' series keys read)."""

    def __init__(self, root: str, *, store: str, site: str, seed: int, d_sae: int, local: dict, tag: str):
        self.root, self.store, self.site, self.seed = Path(root), store, site, seed
        self.d_sae, self.local = d_sae, local
        self.tag = tag
        self.journal_path = self.root / "plateau.json"
        self.journal = {}
        if self.journal_path.exists():
            try:
                self.journal = json.loads(self.journal_path.read_text())
                check_journal(self.journal)
            except ValueError as e:   # never train on, or rewrite, a journal this bench cannot read
                raise JournalError(f"{self.journal_path}: {e}") from None
        self.final: dict[str, Path] = {}   # folder -> its evaluated budget's folder

    def budget_dir(self, folder: str, epochs: int) -> Path:
        return self.root / f"epochs{epochs}" / folder

    def config(self, folder: str, arch: str, extra: dict, epochs: int) -> dict:
        extra = dict(extra)
        if "init" in extra:   # "relu/relu_l1-300": that folder's evaluated budget (trained before this row)
            parent, name = extra["init"].split("/")
            extra["init"] = str(self.final[parent] / name)
        return {"store": self.store, "site": self.site, "arch": arch, "d_sae": self.d_sae, "seed": self.seed,
                "out": str(self.budget_dir(folder, epochs)), "checkpoint_every": CHECKPOINT_EVERY, "log_every": 5,
                **self.local, **extra, "epochs": epochs}

    def train(self, folder: str, arch: str, extra: dict, epochs: int, force: bool = False) -> dict:
        from sae_harvest.train.config import TrainConfig
        from sae_harvest.train.fit import fit

        kwargs = self.config(folder, arch, extra, epochs)
        key = scrub_text(json.dumps({k: v for k, v in kwargs.items() if k != "out"}, sort_keys=True, default=str))
        done = self.journal.get(folder, {}).get(str(epochs))
        if done and not force and same_config(done["config"], key) and (
                done["superseded"] or self._complete(kwargs["out"], done["training"])):
            return done["training"]      # recorded by an earlier, interrupted run of the same config
        # an interrupted run of this budget resumes from its checkpoint (`--overwrite` refuses a folder
        # whose SAEs have metrics but no cfg.json yet: train/runs.py made_by_train)
        resume = (Path(kwargs["out"]) / "checkpoint" / "state.json").exists()
        summaries = fit(TrainConfig(**kwargs), resume=resume, overwrite=not resume, progress=False)
        records = {name: training_record(os.path.join(kwargs["out"], name)) for name in sorted(summaries)}
        self.journal.setdefault(folder, {})[str(epochs)] = {"config": key, "training": records, "superseded": False}
        self._save()
        return records

    def discard(self, folder: str, epochs: int) -> None:
        """Delete a superseded budget's SAEs (this bench created them), keep its record."""
        shutil.rmtree(self.budget_dir(folder, epochs), ignore_errors=True)
        try:
            self.budget_dir(folder, epochs).parent.rmdir()   # the epochs{E} folder, once no sweep is left in it
        except OSError:
            pass
        entry = self.journal.get(folder, {}).get(str(epochs))
        if entry:
            entry["superseded"] = True
            self._save()

    def run(self, rows, *, first: int, pct: float, max_epochs: int, fixed: dict | None = None,
            caps: dict | None = None, early_stop: bool = False,
            fixed_stop: str = "fixed (the searched seeds' budget)") -> tuple[list[str], dict]:
        """Every row to its plateau, in order (a row with "init" after the row it starts from):
        (the evaluated SAEs' paths, {folder: search record}). `fixed` {folder: epochs}: train those
        folders once at that budget (another seed's plateau), no search; `caps` {folder: epochs}:
        a lower --max-epochs for those folders."""
        paths, budgets = [], {}
        for folder, arch, extra in rows:
            t0 = time.perf_counter()
            start = extra.get("epochs") or first   # a continuation row starts at its own budget
            if fixed and folder in fixed:
                start, pct_here = fixed[folder], 0.0
            else:
                pct_here = pct
            cap = min(max_epochs, (caps or {}).get(folder, max_epochs))
            rec = search(lambda e: self.train(folder, arch, extra, e), start, pct_here, max(cap, start),
                         discard=lambda e: self.discard(folder, e),
                         say=self._reporter(folder, fixed_stop if fixed and folder in fixed else None),
                         early_stop=early_stop)
            if fixed and folder in fixed:
                rec["stop"] = fixed_stop
            final = self.budget_dir(folder, rec["epochs"])
            evaluated = next(h for h in rec["history"] if h["epochs"] == rec["epochs"])
            if not self._complete(str(final), evaluated["training"]):
                # resumed with another --max-epochs or rule: the budget to evaluate was deleted as superseded
                say(f"[{self.tag}] {folder}: retraining {rec['epochs']} epoch(s), the budget to evaluate")
                evaluated["training"] = self.train(folder, arch, extra, rec["epochs"], force=True)
            self.final[folder] = final
            budgets[folder] = {**rec, "seconds": time.perf_counter() - t0}
            paths += [str(final / name) for name in evaluated["training"]]
        return paths, budgets

    def _reporter(self, folder: str, fixed_stop: str | None):
        def report(epochs, records, history, stop):
            stop = fixed_stop or stop
            h = history[-1]
            before = history[-2]["training"] if len(history) > 1 else {}
            moves = []
            for name, r in records.items():
                a, b = (before.get(name) or {}).get("held_out_loss"), r.get("held_out_loss")
                moves.append(f"{b:.4g}" + (f" ({(b / a - 1) * 100:+.1f}%)" if a and b is not None else ""))
            any_rec = next(iter(records.values()), {})
            say(f"[{self.tag}] {folder} {epochs} epoch(s), {any_rec.get('steps')} steps: {h['seconds']:.1f} s "
                f"(CPU {h['cpu_seconds']:.1f} s); held-out {any_rec.get('loss_name')} " + ", ".join(moves) +
                (f" -> {stop}" if stop else ""))
        return report

    @staticmethod
    def _complete(out: str, records: dict) -> bool:
        return all((Path(out) / name / "cfg.json").exists() for name in records)

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.journal_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(scrub_tree(self.journal), indent=1))   # never a store URL's credentials
        os.replace(tmp, self.journal_path)
