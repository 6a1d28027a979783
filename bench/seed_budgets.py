"""The budgets later seeds train at: the largest the searched seeds reached (one process), or those
a searching process recorded in its pareto.json (a second process, --follow-searched)."""
from __future__ import annotations

import json
import os
import time

import plateau_seeds
from plateau import say, seed_lock
from sae_harvest.stores.urls import scrub_tree


def fixed_budgets(budgets: list[dict], plateau_seeds: int | None) -> dict | None:
    """{folder: epochs} for a seed past the first plateau_seeds: the largest budget the searched
    seeds reached per folder (None: search this seed too)."""
    if plateau_seeds is None or len(budgets) < plateau_seeds:
        return None
    out = {}
    for b in budgets[:plateau_seeds]:
        for folder, rec in b["sweeps"].items():
            out[folder] = max(out.get(folder, 0), rec["epochs"])
    return out


# arguments that say what this process does, not what the seeds are trained on
PROCESS_LOCAL = ("out", "only_seeds", "train_only", "fixed_epochs", "follow_searched", "followed", "report_only",
                 "tuned_lrs", "lockstep")
# arguments added after a pareto.json may have been written: the value every older run had
ADDED_LATER = {"e2e_ds_l1": [0.3, 1.0, 3.0], "early_stop": True, "plateau_across_seeds": False,
               "folders": None, "ends": "hold"}   # bench/pareto.py's E2E_L1; stop 13's runs stopped early


def searched_budgets(pareto_json: str, args) -> dict:
    """{folder: epochs} the searching process's seeds evaluate, from its pareto.json: that process
    must have run with this run's arguments (the rule, the cap, the rows, the store, the lrs: all
    but PROCESS_LOCAL) and finished its --plateau-seeds. Compared and printed scrubbed: pareto.json
    holds store URLs without their credentials."""
    with open(pareto_json) as f:
        doc = json.load(f)
    ran = doc.get("args", {}) if isinstance(doc, dict) else {}
    for key in sorted(set(ran) | set(vars(args))):
        if key in PROCESS_LOCAL:
            continue
        if key not in ran and key not in ADDED_LATER:
            raise ValueError(f"{pareto_json} records no --{key.replace('_', '-')}: written by another version")
        theirs = ran.get(key, ADDED_LATER.get(key))
        ours = scrub_tree(json.loads(json.dumps(getattr(args, key, None))))   # tuples as the JSON's lists
        if theirs != ours:
            raise ValueError(f"{pareto_json} was searched with --{key.replace('_', '-')} {scrub_tree(theirs)}, "
                             f"this run has {ours}")
    if not ran.get("plateau_seeds"):
        raise ValueError(f"{pareto_json} searched every seed (no --plateau-seeds): there is no budget to follow")
    out = fixed_budgets(doc.get("budgets", []), ran["plateau_seeds"])
    if not out:
        raise ValueError(f"{pareto_json} has not finished its searched seeds yet")
    return out


def lockstep_budgets(train, judge, seeds: list[int], folders: list[str], first: int, max_epochs: int,
                     caps: dict | None = None, discard=lambda seed, folder, epochs: None,
                     say=lambda *a: None) -> dict[str, dict]:
    """The plateau searched on every seed at once (bench/pareto.py --plateau-across-seeds): every seed
    trains every open folder at budget B (`train(seed, {folder: B})`), then `judge()` ({folder: {"B/2->B":
    verdict}}, bench/plateau_seeds.py summary over all the seeds' journals) decides: a folder whose
    pair "plateaued" stops at B; the others double, until the next budget would pass max_epochs (or
    the folder's cap). One seed's search reads noise at ±4-10% (docs/results.md); this reads the
    95% interval over the seeds. A budget no longer needed is discarded once the next one is
    judged. Returns {folder: {"epochs", "stop": "plateau across seeds" | "max-epochs", "verdicts":
    {"B/2->B": verdict} for every pair judged}}."""
    if first < 1 or max_epochs < first:
        raise ValueError(f"need 1 <= first ({first}) <= max_epochs ({max_epochs})")
    open_, done, epochs = list(folders), {}, first
    history: dict[str, dict] = {f: {} for f in folders}
    while open_:
        for seed in seeds:
            train(seed, {f: epochs for f in open_})
        verdicts = judge() if epochs > first else {}
        for f in list(open_):
            pair = f"{epochs // 2}->{epochs}"
            verdict = verdicts.get(f, {}).get(pair, "untested")
            cap = min(max_epochs, (caps or {}).get(f, max_epochs))
            if epochs > first:
                history[f][pair] = verdict
                for seed in seeds:
                    discard(seed, f, epochs // 2)
            if verdict == "plateaued" or epochs * 2 > cap:
                done[f] = {"epochs": epochs, "stop": "plateau across seeds" if verdict == "plateaued" else "max-epochs",
                           "verdicts": history[f]}
                open_.remove(f)
        say(f"[all seeds] {epochs} epoch(s): " + ", ".join(
            f"{f} {history[f].get(f'{epochs // 2}->{epochs}', 'first budget')}" for f in folders
            if f in open_ or done[f]["epochs"] == epochs))
        epochs *= 2
    return done


def across_seeds(out: str, seeds: list[int], rows: list, trainer, *, first: int, max_epochs: int, pct: float,
                 caps: dict | None = None) -> dict[str, dict]:
    """lockstep_budgets with bench/plateau.py's SeedTrainer (`trainer(seed)` makes one for a seed)
    and bench/plateau_seeds.py as the judge, each seed's journal touched under its lock. `rows`
    are (folder, arch, extra) without "init" (a continuation starts from another folder's budget)."""
    by_folder = {r[0]: r for r in rows}

    def train(seed, folder_budgets):
        with seed_lock(os.path.join(out, f"seed{seed}"), f"seed {seed}"):
            t = trainer(seed)
            for folder, epochs in folder_budgets.items():
                _, arch, extra = by_folder[folder]
                wall = time.perf_counter()
                records = t.train(folder, arch, extra, epochs)   # a journalled budget, kept or discarded, is not retrained
                say(f"[seed {seed}] {folder} {epochs} epoch(s): {time.perf_counter() - wall:.1f} s; held-out "
                    + ", ".join(f"{r.get('held_out_loss', float('nan')):.4g}" for r in records.values()))

    def discard(seed, folder, epochs):
        with seed_lock(os.path.join(out, f"seed{seed}"), f"seed {seed}"):
            trainer(seed).discard(folder, epochs)

    return lockstep_budgets(train, lambda: plateau_seeds.summary(out, pct, seeds), seeds, list(by_folder), first, max_epochs, caps, discard, say)
