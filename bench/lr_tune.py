"""Each sweep folder's learning rate, tuned on its training objective (never on held-out tokens),
for the Pareto benches (bench/pareto.py --lrs, bench/jumprelu_gated.py --lrs).

Issue 18 asked for equal budgets and "each one's tuned lr". The architectures' default lrs come from
papers at other scales (5e-4 for the L1 SAEs; Gao et al.'s 2e-4 / sqrt(d_sae / 2^14) for TopK, from
"Scaling and evaluating sparse autoencoders"), and at d_sae 256 on this store they differ in how
far from their best they are: at 557 steps TopK at 10x its default lr ends with 36% less held-out
NMSE at k = 32 and ReLU at 4x with 26% less at lambda = 100. Comparing architectures at their
defaults would measure the defaults.

The rule: for each folder, train the sweep at every multiplier of its architecture's default lr for
`epochs` on one seed; a candidate's score is the mean over the sweep's SAEs of log(its training
objective), the objective averaged over the last 10% of the logged steps (metrics.jsonl "loss": the
loss that SAE minimises, on training batches). The lowest score wins. The objective, not NMSE,
because an L1 or L0 SAE at one lambda trades NMSE against sparsity: the lr that minimises the
objective it is asked to minimise is the better-optimised SAE, and its L0 follows. Held-out rows
decide nothing here: they stay the evaluation's (docs/results.md).

    python bench/lr_tune.py --store bench-out/pareto/store.zarr --out bench-out/lr-tune \
        --multipliers 1,3,10,30 --epochs 16 [--folders relu,gated]
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from plateau import SeedTrainer, say
from sae_harvest.train.errors import Diverged
from sae_harvest.stores.urls import scrub_tree

TAIL = 0.1   # the share of the logged steps whose objective is averaged


def tail_objective(sae_dir: str | os.PathLike, tail: float = TAIL) -> dict:
    """The training objective, NMSE, L0 and dead fraction averaged over the last `tail` of the logged
    steps of one trained SAE (its metrics.jsonl; at least 3 records). Raises if there are fewer."""
    lines = Path(sae_dir, "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    records = [r for r in records if "loss" in r and "step" in r]
    if len(records) < 3:
        raise ValueError(f"{sae_dir}: {len(records)} logged steps; the tail needs at least 3")
    last = records[-1]["step"]
    cut = last - tail * last
    window = [r for r in records if r["step"] >= cut]
    if len(window) < 3:
        window = records[-3:]
    mean = lambda key: (sum(r[key] for r in window) / len(window)) if all(key in r for r in window) else None
    return {"objective": mean("loss"), "nmse": mean("nmse"), "l0": mean("l0"), "dead_fraction": mean("dead_fraction"),
            "steps": last, "records": len(window)}


def score(tails: dict) -> float:
    """A candidate's score: the mean log training objective over its sweep's SAEs (lower is better);
    +inf when a run diverged (a NaN or infinite objective: that lr loses, and the tuning goes on)."""
    values = [t["objective"] for t in tails.values()]
    if any(v is not None and not math.isfinite(v) for v in values):
        return math.inf
    if not values or any(v is None or not v > 0 for v in values):
        raise ValueError(f"a non-positive or missing objective among {sorted(tails)}")
    return sum(math.log(v) for v in values) / len(values)


def choose(candidates: list[dict]) -> dict:
    """The candidate with the lowest score (ties: the smaller lr, the default's side)."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    return min(candidates, key=lambda c: (c["score"], c["lr"]))


def default_lr(arch: str, d_sae: int) -> float:
    from sae_harvest.train.registry import ARCHITECTURES

    return float(ARCHITECTURES[arch].default_lr(d_sae))


def tune_folder(row: tuple, *, root: str, store: str, site: str, seed: int, d_sae: int, local: dict,
                multipliers: list[float], epochs: int) -> dict:
    """One sweep folder's record: every candidate's lr, score and per-SAE tails, and the choice. Each
    candidate trains under root/x{m}/ (a SeedTrainer journal: a rerun resumes); its SAEs are deleted
    once their tails are read, the tails are kept in root/{folder}.json."""
    folder, arch, extra = row
    path = Path(root, f"{folder}.json")
    key = {"arch": arch, "extra": {k: v for k, v in extra.items() if k != "lr"}, "seed": seed, "d_sae": d_sae,
           "local": local, "epochs": epochs, "store": store, "site": site}
    key = json.loads(json.dumps(scrub_tree(key), default=str))
    done = json.loads(path.read_text()) if path.exists() else {}
    if done.get("key") != key:
        done = {"key": key, "candidates": {}}
    base = default_lr(arch, d_sae)
    for m in multipliers:
        lr = base * m
        if f"{m:g}" in done["candidates"]:
            continue
        trainer = SeedTrainer(os.path.join(root, f"x{m:g}"), store=store, site=site, seed=seed, d_sae=d_sae,
                              local=local, tag=f"lr x{m:g}")
        out = trainer.budget_dir(folder, epochs)
        # force: a journal record whose SAEs are gone (this file deleted to redo the folder, or a
        # kill between the deletion and the write below) has no metrics left to read
        try:
            records = trainer.train(folder, arch, {**extra, "lr": lr}, epochs, force=not out.is_dir())
        except Diverged as e:   # the trainer stops a run whose loss or weights went non-finite: that lr loses
            done["candidates"][f"{m:g}"] = {"multiplier": m, "lr": lr, "tails": {}, "score": math.inf,
                                            "diverged": str(e)}
            _write(path, done)
            trainer.discard(folder, epochs)
            say(f"[lr] {folder} x{m:g} (lr {lr:.3g}): diverged ({e})")
            continue
        tails = {name: tail_objective(out / name) for name in sorted(records)}
        done["candidates"][f"{m:g}"] = {"multiplier": m, "lr": lr, "tails": tails, "score": score(tails)}
        _write(path, done)
        trainer.discard(folder, epochs)   # the SAEs are not needed again; their record is
        say(f"[lr] {folder} x{m:g} (lr {lr:.3g}): mean log objective {done['candidates'][f'{m:g}']['score']:.4f}, "
            + ", ".join(f"{n} L0 {t['l0']:.1f} nmse {t['nmse']:.4f}" for n, t in tails.items()))
    best = choose([c for c in done["candidates"].values() if c["multiplier"] in multipliers])
    if not math.isfinite(best["score"]):
        raise TunedLrError(f"{folder}: every candidate lr diverged (x{', x'.join(f'{m:g}' for m in multipliers)})")
    done.update(folder=folder, arch=arch, default_lr=base, lr=best["lr"], multiplier=best["multiplier"],
                epochs=epochs, seed=seed,
                rule="lowest mean log training objective over the sweep, last 10% of the logged steps")
    done["at_grid_edge"] = bool(len(multipliers) > 1 and best["multiplier"] in (min(multipliers), max(multipliers)))
    _write(path, done)
    say(f"[lr] {folder}: x{best['multiplier']:g} (lr {best['lr']:.3g})"
        + ("  (at the grid's edge: widen --multipliers)" if done["at_grid_edge"] else ""))
    return done


class TunedLrError(ValueError):
    """--lrs cannot be used for this run (the benches print it as one line and exit 2)."""


def load_lrs(path: str, *, rows: list | None = None, d_sae: int | None = None, local: dict | None = None,
             known_rows: list | None = None) -> dict:
    """{folder: lr} from a tuning folder (every {folder}.json with a choice in it) or one JSON file
    {folder: lr}. With `rows`, every local sweep folder of the run (no e2e, no continuation) must have
    one (a folder left out would silently train at its default lr), and a {folder: lr} file may name
    no other folder (`known_rows`, when given: the folders a file may name, e.g. the whole run's where
    `rows` is the --folders subset that trains). With
    d_sae / local, a tuning folder's records must have been tuned at the same d_sae, batch size and
    Adam betas (an lr is not portable across them: TopK's default scales with 1/sqrt(d_sae))."""
    p = Path(path)
    if not p.exists():
        raise TunedLrError(f"--lrs {path}: no such file or folder")
    files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    out = {}
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise TunedLrError(f"--lrs {f}: not readable JSON ({e})") from None
        if not isinstance(doc, dict):
            raise TunedLrError(f"--lrs {f}: not a JSON object")
        if "folder" in doc and "lr" in doc:
            key = doc.get("key") or {}
            if d_sae is not None and key.get("d_sae") != d_sae:
                raise TunedLrError(f"--lrs {f}: tuned at d_sae {key.get('d_sae')}, this run trains {d_sae}")
            if local is not None:
                want = json.loads(json.dumps(local, default=str))
                got = key.get("local") or {}
                for field in ("batch_size", "adam_betas"):
                    if got.get(field) != want.get(field):
                        raise TunedLrError(f"--lrs {f}: tuned at {field} {got.get(field)}, this run uses "
                                           f"{want.get(field)}")
            out[doc["folder"]] = float(doc["lr"])
        elif "candidates" in doc:   # a folder still tuning (or cut off): it would train at its default lr
            raise TunedLrError(f"--lrs {f}: this folder's tuning has not finished; rerun bench/lr_tune.py first")
        elif p.is_file():
            for k, v in doc.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    raise TunedLrError(f"--lrs {f}: {k}: {v!r} is not a positive learning rate")
                out[k] = float(v)
    if not out:
        raise TunedLrError(f"--lrs {path}: no tuned learning rates in it")
    if rows is not None:
        tunable = [f for f, _, e in rows if e.get("loss", "local") == "local" and "init" not in e]
        missing = [f for f in tunable if f not in out]
        # a typo in a hand-written {folder: lr} file; a tuning folder may hold more than this bench's
        known = {f for f, _, _ in (rows if known_rows is None else known_rows)}
        unknown = sorted(set(out) - known) if p.is_file() else []
        if missing:
            raise TunedLrError(f"--lrs {path}: no tuned lr for {', '.join(missing)} (they would train at their "
                               f"default lr); tune them with bench/lr_tune.py --folders")
        if unknown:
            raise TunedLrError(f"--lrs {path}: {', '.join(unknown)} is not a sweep folder of this run")
    return out


def adopt_records(trainer: SeedTrainer, tuning: str) -> int:
    """Copy each tuned folder's chosen-candidate training record (its SeedTrainer journal entry) into
    `trainer`'s journal: the tuning trained that folder at that lr, seed and budget already, so a
    plateau search of the same config reuses the record instead of training it again (SeedTrainer.train
    compares the whole config before it reuses anything). Returns how many records it adopted."""
    root = Path(tuning)
    if not root.is_dir():
        return 0
    adopted = 0
    for f in sorted(root.glob("*.json")):
        doc = json.loads(f.read_text())
        if "folder" not in doc or "multiplier" not in doc:
            continue
        journal = root / f"x{doc['multiplier']:g}" / "plateau.json"
        entry = (json.loads(journal.read_text()) if journal.exists() else {}).get(doc["folder"], {}).get(str(doc["epochs"]))
        mine = trainer.journal.setdefault(doc["folder"], {})
        if entry and str(doc["epochs"]) not in mine:
            mine[str(doc["epochs"])] = {**entry, "superseded": True}   # its SAEs were deleted after tuning
            adopted += 1
    if adopted:
        trainer._save()
    return adopted


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(scrub_tree(doc), indent=1))
    os.replace(tmp, path)


def main():
    from pareto import LOCAL, SITE, sweeps

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--label-free-store", default=None, help="tune gtopk_lf on this store too")
    p.add_argument("--out", required=True, help="folder for the records ({folder}.json) and the candidates' runs")
    p.add_argument("--multipliers", default="1,3,10,30", help="multiples of each architecture's default lr")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-sae", type=int, default=256)
    p.add_argument("--betas", default="0,0.999", help="Adam betas for every architecture ('arch': each its own)")
    p.add_argument("--folders", default=None, help="only these sweep folders (comma list; default: every local one)")
    args = p.parse_args()
    try:
        mults = [float(m) for m in args.multipliers.split(",")]
        betas = None if args.betas == "arch" else tuple(float(b) for b in args.betas.split(","))
    except ValueError as e:
        p.error(f"--multipliers / --betas: {e}")
    if not mults or any(not (m > 0 and math.isfinite(m)) for m in mults):
        p.error("--multipliers: positive numbers, e.g. 1,3,10,30")
    if args.epochs < 1:
        p.error("--epochs: at least 1")
    local = {**LOCAL, "adam_betas": betas}
    rows = [r for r in sweeps("scratch", args.label_free_store) if r[0] not in ("e2e", "e2e_ds")]
    if args.folders:
        wanted = args.folders.split(",")
        unknown = sorted(set(wanted) - {r[0] for r in rows})
        if unknown:
            p.error(f"--folders: no such sweep folder {', '.join(unknown)} (have {', '.join(r[0] for r in rows)})")
        rows = [r for r in rows if r[0] in wanted]
    for row in rows:
        tune_folder(row, root=args.out, store=args.store, site=SITE, seed=args.seed, d_sae=args.d_sae, local=local,
                    multipliers=mults, epochs=args.epochs)


if __name__ == "__main__":
    from plateau import JournalError
    try:
        main()
    except JournalError as e:   # one line; the journal is neither trained on nor rewritten
        raise e.exit("lr_tune") from None
