"""Pareto fronts of every architecture at one site of the offline default model, over several seeds.

One harvested store at SITE (every --eval-every-th sequence held out: no trainer reads it, every
evaluation reads only it). Per seed, each sweep folder is trained to its own plateau (bench/plateau.py:
--until-plateau P doubles that folder's epochs until every SAE in it moves its held-out training
loss and L0 by < P%, or, with --early-stop, until its held-out loss turns up (every L0 steady, none
better by P%, one worse by P%: the budget before is evaluated; off by default, as one seed's turn
proved to be noise); training only, superseded budgets deleted, every budget's record kept), then the
seed's final SAEs are evaluated together, once, on all the held-out tokens (g-SAEs under both
gradient modes). Each paper claim is a ratio metric(A) / metric(B) at equal L0 per seed; the
verdict rule (bench/verdicts.py, and docs/results.md) is a paired 95% t-interval of the per-seed log ratio
over >= 5 seeds: a tie when it contains 1, else agrees or disagrees with the claim.

Fairness (issue 18): every architecture trains with the same Adam betas (--betas, default 0,0.999,
the Gated and JumpReLU papers' for baseline and method alike); e2e and local train from scratch on
the same tokens at each one's default lr (--e2e scratch), each to its own plateau, or e2e
fine-tunes the local relu SAEs (at relu's plateau) and local gets the same continuation with its
own loss (--e2e continuation; each continuation doubles from one pass to its own plateau); a
second store with the label-free gradient (--grad-target model-top1) trains "gtopk_lf", so the
g-SAE is compared under the paper's protocol and the matched label-free one side by side; JumpReLU
thresholds and Gated gates are compared with their starts. Writes pareto.json (every budget's
steps, tokens and held-out loss per SAE, seconds per stage; with --until-plateau, whether each
folder plateaued judged across every seed's journal, bench/plateau_seeds.py) and prints verdicts; progress lines
with timings go to stdout as it runs. Re-running the same command resumes (seed{N}/plateau.json).

    python bench/pareto.py --out bench-out/pareto --seeds 5 --until-plateau 2     # a real plateau: ~17 h of CPU
    python bench/pareto.py --out bench-out/pareto --seeds 5 --until-plateau 2 --max-epochs 8 \
        --e2e-max-epochs 2 --plateau-seeds 1                                      # capped: ~34 min of one core
    python bench/pareto.py --out /tmp/p --seeds 2 --tokens 12000 --d-sae 64 --until-plateau 2 --max-epochs 2  # smoke
    python bench/pareto.py --out bench-out/pareto --report-only                   # verdicts from pareto.json
    # one claim at a budget the whole run cannot afford: only its folders, every seed at one budget
    python bench/pareto.py --out bench-out/p512 --lrs bench-out/lr-tune --local-only --folders topk,batchtopk \
        --fixed-epochs 512 --seeds 5
    # the plateau judged on every seed at once (bench/plateau_seeds.py): all seeds train each budget;
    # a second process may train some seeds at a budget of it (--only-seeds 4,3 --train-only
    # --fixed-epochs B): the first finds those journalled records and does not train them again
    python bench/pareto.py --out bench-out/pareto --seeds 5 --until-plateau 2 --plateau-across-seeds
    # each folder at its tuned lr (bench/lr_tune.py, seed 0, 32 epochs), the search from 32 epochs to 64,
    # seeds 2-4 trained by a second process into the same --out (the first one finds their records);
    # --follow-searched: at each folder's budget the first process's seed 0 evaluates, so start it
    # once the first has written pareto.json after seed 0 (before, it stops with one line)
    python bench/lr_tune.py --store S --label-free-store LF --out bench-out/lr-tune --epochs 32
    A="--out bench-out/pareto-tuned --store S --label-free-store LF --lrs bench-out/lr-tune --local-only \
        --epochs 32 --until-plateau 2 --max-epochs 64 --plateau-seeds 1 --seeds 5"
    python bench/pareto.py $A &      # then, after seed 0:
    python bench/pareto.py $A --only-seeds 2,3,4 --train-only --follow-searched   # or --fixed-epochs 64
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

from lr_tune import TunedLrError, adopt_records, load_lrs
import plateau_seeds
from plateau import JournalError, SeedTrainer, say, seed_lock
from seed_budgets import across_seeds as seed_across_seeds
from seed_budgets import fixed_budgets, searched_budgets
from seed_eval import check_same_held_out, evaluate_seed, harvest_store, store_content
from sae_harvest.evaluate.demo import SITE, SWEEPS as DEMO_SWEEPS
from sae_harvest.stores.urls import scrub_tree
from verdicts import L0_SLACK, MIN_SEEDS, at_grid, at_points, print_budget, print_rows

# the demo's local SAE sweeps at SITE (not its transcoder: no claim reads it, and it needs two more sites)
LOCAL_SWEEPS = [row for row in DEMO_SWEEPS if row[2].get("loss", "local") == "local" and "target" not in row[2]]
LOCAL = {"batch_size": 1024, "epochs": 1}
E2E_LR = 1e-3          # docs/e2e.md's default for e2e relu; local SAEs keep their architecture's
E2E_L1 = (0.3, 1.0, 3.0)   # on KL's scale (docs/e2e.md)
# (A, B, metric, expected): the papers' claims as ratios metric(A) / metric(B) at equal L0.
# "<": A is lower; ">": A is higher; "~": no difference detectable (the interval contains 1).
CLAIMS = (("e2e", "relu", "ce_increase", "<"), ("e2e_ds", "relu", "ce_increase", "<"),
          ("e2e", "relu", "downstream_mse", ">"), ("e2e_ds", "relu", "downstream_mse", "~"),
          ("gated", "relu", "ce_increase", "<"), ("jumprelu", "gated", "ce_increase", "<"),
          ("batchtopk", "topk", "ce_increase", "<"),
          ("gtopk+paper", "topk", "ce_increase", "<"),       # the paper's protocol (labels, matched)
          ("gtopk_lf+causal", "topk", "ce_increase", "<"),   # label-free, trained and evaluated alike
          ("gtopk+causal", "topk", "ce_increase", "<"),      # mismatched: trained on labels (old headline)
          ("matryoshka", "batchtopk", "ce_increase", "~"))
L0_GRID = (8, 16, 32, 64)


def claims(e2e: str) -> tuple:
    """CLAIMS for an --e2e mode: under continuation the e2e rows' baseline is relu_cont, the local
    SAEs given the same continuation with their own loss (against the un-continued relu, e2e's
    extra training would be the difference issue 18 found)."""
    if e2e != "continuation":
        return CLAIMS
    return tuple((a, "relu_cont" if a in ("e2e", "e2e_ds") and b == "relu" else b, m, x) for a, b, m, x in CLAIMS)


def sweeps(e2e: str, lf_store: str | None, e2e_ds_l1: tuple = E2E_L1) -> list:
    """The sweep rows: the local ones, the label-free g-SAE, and e2e / e2e+ds from scratch or as a
    continuation; e2e_ds_l1: e2e+ds's λ grid (its L0 falls slowly with λ: a wider grid reaches the
    local ReLUs' L0s, without which its claims have no point to compare at)."""
    rows = list(LOCAL_SWEEPS)
    if lf_store:
        rows.append(("gtopk_lf", "gtopk", {"k": (8, 16, 32), "store": lf_store}))
    if e2e == "scratch":      # the same tokens, batch and epochs as local (the feed's LOCAL), own lr
        rows += [("e2e", "relu", {"loss": "e2e", "l1": E2E_L1, "lr": E2E_LR}),
                 ("e2e_ds", "relu", {"loss": "e2e+ds", "l1": tuple(e2e_ds_l1), "lr": E2E_LR})]
    else:                     # one identical extra pass from each local relu SAE, e2e and local alike
        cont = {"batch_size": 2048, "lr": E2E_LR, "epochs": 1}
        rows += [(f"relu_cont{l1:g}", "relu", {"l1": (l1,), "init": f"relu/relu_l1-{l1:g}", **cont})
                 for l1 in DEMO_SWEEPS[0][2]["l1"]]
        rows += [("e2e", "relu", {"loss": "e2e", "l1": E2E_L1, "init": "relu/relu_l1-300", **cont}),
                 ("e2e_ds", "relu", {"loss": "e2e+ds", "l1": tuple(e2e_ds_l1), "init": "relu/relu_l1-300", **cont})]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/pareto")
    p.add_argument("--tokens", type=int, default=80_000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--d-sae", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=10, help="the store holds every N-th sequence out")
    p.add_argument("--epochs", type=int, default=1, help="local and e2e-from-scratch epochs (the first budget)")
    p.add_argument("--until-plateau", type=float, default=0.0,
                   help="double the epochs until every SAE's held-out loss and L0 move < this %% (0: one budget)")
    p.add_argument("--max-epochs", type=int, default=64)
    p.add_argument("--e2e-max-epochs", type=int, default=None,
                   help="a lower --max-epochs for the e2e and e2e+ds sweeps (~20x a local sweep's cost per step) "
                        "and, under --e2e continuation, relu_cont's")
    p.add_argument("--e2e-only", action="store_true",
                   help="only relu, the e2e sweeps and (continuation) relu_cont: the e2e claims alone")
    p.add_argument("--plateau-seeds", type=int, default=None,
                   help="search the plateau on the first N seeds only; later seeds train each folder once at the "
                        "largest budget those seeds reached (default: every seed searches)")
    p.add_argument("--plateau-across-seeds", action="store_true",
                   help="search the plateau on every seed at once: all seeds train each budget, and a folder "
                        "stops where the 95%% interval over the seeds settles (bench/plateau_seeds.py)")
    p.add_argument("--betas", default="0,0.999", help="Adam betas for every architecture, or 'arch' for each "
                                                      "architecture's own default")
    p.add_argument("--e2e", choices=("scratch", "continuation"), default="scratch")
    p.add_argument("--e2e-ds-l1", default=",".join(f"{x:g}" for x in E2E_L1),
                   help="e2e+ds's λ grid, comma-separated (default the e2e grid; on KL's scale, docs/e2e.md)")
    p.add_argument("--no-label-free", action="store_true", help="skip the label-free gradient store and gtopk_lf")
    p.add_argument("--store", default=None, help="the store (default --out/store.zarr; another bench's, to share "
                                                 "one harvest: it is harvested there if missing, else checked)")
    p.add_argument("--label-free-store", default=None,
                   help="the label-free store (default --out/store-label-free.zarr)")
    p.add_argument("--report-only", action="store_true", help="recompute the verdicts from --out/pareto.json")
    p.add_argument("--ends", choices=("hold", "extend"), default="hold",
                   help="with --report-only: within the L0 slack a series' end value is held (the rule) or its end "
                        "segment continued log-linearly (the check of what holding decides)")
    p.add_argument("--lrs", default=None, help="tuned learning rates (bench/lr_tune.py's --out folder, or a JSON "
                                               "{folder: lr}) for the local sweeps; default: each architecture's")
    p.add_argument("--local-only", action="store_true", help="skip the e2e sweeps (their claims stay untested)")
    p.add_argument("--folders", default=None,
                   help="train only these sweep folders, e.g. topk,batchtopk: one claim at a budget the whole run "
                        "cannot afford (the other claims have no rows)")
    p.add_argument("--only-seeds", default=None, help="train (and evaluate) only these seeds, e.g. 2,3,4: to train "
                                                      "seeds in parallel processes sharing --out")
    p.add_argument("--train-only", action="store_true", help="train, do not evaluate or report (with --only-seeds "
                                                             "and --fixed-epochs: a second process's share)")
    p.add_argument("--fixed-epochs", type=int, default=None,
                   help="train every folder once at this budget, no search (the budget the searched seed reaches)")
    p.add_argument("--early-stop", action="store_true",
                   help="stop a folder whose held-out loss turned (bench/plateau.py past_optimum) and evaluate "
                        "the budget before; off by default: judged on one searched seed it reads noise")
    p.add_argument("--follow-searched", action="store_true",
                   help="with --only-seeds: train each folder once at the budget the searched seeds evaluate "
                        "(read from --out/pareto.json; a folder stopped early keeps its earlier budget)")
    args = p.parse_args()
    try:
        args.betas = None if args.betas == "arch" else tuple(float(b) for b in args.betas.split(","))
        only = [int(s) for s in args.only_seeds.split(",")] if args.only_seeds else None
        args.e2e_ds_l1 = tuple(float(x) for x in args.e2e_ds_l1.split(","))
    except ValueError as e:
        p.error(f"--betas / --only-seeds / --e2e-ds-l1: {e}")
    if any(not (math.isfinite(x) and x > 0) for x in args.e2e_ds_l1):
        p.error("--e2e-ds-l1: every λ finite and > 0")
    if len({f"{x:g}" for x in args.e2e_ds_l1}) != len(args.e2e_ds_l1):   # the SAEs' names are relu_l1-{λ:g}
        p.error("--e2e-ds-l1: every λ once")
    if only is not None:
        if not args.train_only or not (args.fixed_epochs or args.follow_searched):
            p.error("--only-seeds needs --train-only and --fixed-epochs or --follow-searched (the verdicts are "
                    "computed over all --seeds by one process, at the budget its searched seeds reach)")
        if any(not 0 <= s < args.seeds for s in only):
            p.error(f"--only-seeds: every seed in 0..{args.seeds - 1} (--seeds {args.seeds})")
    if args.fixed_epochs is not None and args.fixed_epochs < 1:
        p.error("--fixed-epochs: at least 1")
    if args.follow_searched and (only is None or args.fixed_epochs):
        p.error("--follow-searched goes with --only-seeds, instead of --fixed-epochs")
    if not (math.isfinite(args.until_plateau) and args.until_plateau >= 0):
        p.error("--until-plateau: a percentage >= 0")
    if args.ends != "hold" and not args.report_only:
        p.error("--ends extend is a check of a finished run (--report-only); a run is judged by the rule (hold)")
    try:
        args.folders = None if args.report_only else check_folders(args.folders, args)
    except ValueError as e:
        p.error(f"--folders: {e}")
    if args.max_epochs < args.epochs:
        p.error(f"--max-epochs ({args.max_epochs}) below --epochs ({args.epochs})")
    if args.plateau_across_seeds and args.seeds < MIN_SEEDS:
        p.error(f"--plateau-across-seeds needs --seeds >= {MIN_SEEDS} (fewer cannot judge a plateau)")
    if args.plateau_across_seeds and (not args.until_plateau or only is not None or args.fixed_epochs
                                      or args.follow_searched or args.plateau_seeds or args.early_stop
                                      or args.e2e == "continuation"):
        p.error("--plateau-across-seeds needs --until-plateau, and not --only-seeds, --fixed-epochs, "
                "--follow-searched, --plateau-seeds, --early-stop or --e2e continuation (one process searches "
                "every seed)")
    args.followed = None
    if args.follow_searched:
        try:
            args.followed = searched_budgets(os.path.join(args.out, "pareto.json"), args)
        except (OSError, ValueError) as e:
            p.error(f"--follow-searched: {e}")
        # a row the searched seeds did not train would be searched here, by a process that never reports
        missing = [r[0] for r in run_rows(args, None if args.no_label_free else "label-free")
                   if r[0] not in args.followed]
        if missing:
            p.error(f"--follow-searched: the searched seeds have no budget for {', '.join(missing)}")
    t0 = time.perf_counter()
    if args.report_only:
        with open(os.path.join(args.out, "pareto.json")) as f:
            doc = json.load(f)
        # prints only: pareto.json keeps the run's own args and timings; the claims are its run's
        args.e2e = doc.get("args", {}).get("e2e", "scratch")
        args.until_plateau = args.until_plateau or doc.get("args", {}).get("until_plateau", 0)
        args.seeds = doc.get("args", {}).get("seeds", args.seeds)   # judge the run's seeds, not the default
        args.l0_slack = doc.get("l0_slack") or 0.0   # the run's own: absent = written before the slack
        report(args, doc["series_per_seed"], doc.get("budgets", []), doc.get("eval_tokens"), t0, write=False)
        return
    local = {**LOCAL, "adam_betas": args.betas}
    lrs = {}
    if args.lrs:   # before the harvests: a bad --lrs is one line now, not after them
        try:
            # the training rows need an lr each; a file may name any folder of the whole run (a
            # tuning of the whole run serves one folder of it)
            lrs = load_lrs(args.lrs, rows=run_rows(args, None if args.no_label_free else "label-free"),
                           known_rows=list(every_row(args).values()),
                           d_sae=args.d_sae, local=local)
        except TunedLrError as e:
            p.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    store = harvest_store(args.store or os.path.join(args.out, "store.zarr"), args.tokens, args.eval_every)
    lf_store = None
    if not args.no_label_free and not args.e2e_only:
        lf_store = harvest_store(args.label_free_store or os.path.join(args.out, "store-label-free.zarr"),
                                 args.tokens, args.eval_every,
                                 "model-top1")
        check_same_held_out(store, lf_store)
    args.tuned_lrs = lrs   # into pareto.json's args
    try:
        train_and_evaluate(args, only, store, lf_store, local, lrs, t0)
    except JournalError as e:   # one line, and nothing of the journal rewritten or deleted
        raise e.exit("pareto") from None


def train_and_evaluate(args, only, store, lf_store, local, lrs, t0) -> None:
    per_seed, budgets, eval_tokens = [], [], None
    if args.plateau_across_seeds:   # then each seed trains nothing more and evaluates those budgets
        args.lockstep = across_seeds(args, store, lf_store, local, lrs)
        args.followed = {f: r["epochs"] for f, r in args.lockstep.items()}
    for seed in only if only is not None else range(args.seeds):
        with seed_lock(os.path.join(args.out, f"seed{seed}"), f"seed {seed}"):
            eval_tokens = run_seed(args, seed, store, lf_store, local, lrs, per_seed, budgets, t0) or eval_tokens


def run_rows(args, lf_store) -> list:
    """The sweep rows this run trains (--local-only, --e2e-only), before the tuned lrs."""
    rows = sweeps(args.e2e, lf_store, args.e2e_ds_l1)
    if args.local_only:
        rows = [r for r in rows if r[0] not in ("e2e", "e2e_ds") and not r[0].startswith("relu_cont")]
    if args.e2e_only:
        rows = [r for r in rows if r[0] in ("relu", "e2e", "e2e_ds") or r[0].startswith("relu_cont")]
    if getattr(args, "folders", None):
        rows = [r for r in rows if r[0] in args.folders]
    return rows


def every_row(args) -> dict:
    """{folder: row} of the whole run, before --folders picks some."""
    whole = argparse.Namespace(**{**vars(args), "folders": None})
    return {r[0]: r for r in run_rows(whole, None if args.no_label_free else "label-free")}


def check_folders(text: str | None, args) -> list | None:
    """--folders as a list, each a folder this run would train (ValueError otherwise); a row that
    starts from another folder's SAEs needs that folder too."""
    if text is None:
        return None
    folders = [f for f in text.split(",") if f]
    if not folders or len(set(folders)) != len(folders):
        raise ValueError("one or more folder names, each once")
    rows = every_row(args)
    unknown = [f for f in folders if f not in rows]
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a folder of this run (it has {', '.join(rows)})")
    for f in folders:
        parent = rows[f][2].get("init", "").split("/")[0]
        if parent and parent not in folders:
            raise ValueError(f"{f} starts from {parent}'s SAEs: add {parent}")
    # folders one series merges (relu_cont100, relu_cont300 ... are "relu_cont"): all or none, else
    # a claim would interpolate a baseline across the missing points
    for group in ("relu_cont",):
        members = [r for r in rows if r.startswith(group)]
        chosen = [r for r in members if r in folders]
        if chosen and len(chosen) != len(members):
            raise ValueError(f"{', '.join(sorted(set(members) - set(chosen)))} missing: the {group} series is "
                             f"{', '.join(members)} together")
    return [r for r in rows if r in folders]   # the run's order: the same set is the same run


def across_seeds(args, store, lf_store, local, lrs) -> dict:
    """--plateau-across-seeds: seed_budgets.across_seeds over every seed, on this run's rows."""
    rows = with_lrs(run_rows(args, lf_store), lrs)
    return seed_across_seeds(args.out, list(range(args.seeds)), rows,
                             lambda seed: seed_trainer(args, seed, store, local), first=args.epochs,
                             max_epochs=args.max_epochs, pct=args.until_plateau,
                             caps=e2e_caps(rows, args.e2e_max_epochs))


def seed_trainer(args, seed, store, local) -> SeedTrainer:
    """A seed's SeedTrainer (its journal read now: call it under the seed's lock)."""
    trainer = SeedTrainer(os.path.join(args.out, f"seed{seed}"), store=store, site=SITE, seed=seed,
                          d_sae=args.d_sae, local=local, tag=f"seed {seed}")
    if args.lrs:
        adopt_records(trainer, args.lrs)   # the tuning's runs at the chosen lr are this seed's, if it was tuned on it
    return trainer


def run_seed(args, seed, store, lf_store, local, lrs, per_seed, budgets, t0):
    """Train (and unless --train-only evaluate and report) one seed, under its lock: the journal is
    read only now, so another process's records for this seed are seen."""
    wall, cpu, tag = time.perf_counter(), time.process_time(), f"seed {seed}"
    root = os.path.join(args.out, f"seed{seed}")
    trainer = seed_trainer(args, seed, store, local)
    rows = with_lrs(run_rows(args, lf_store), lrs)
    caps = e2e_caps(rows, args.e2e_max_epochs)
    fixed = ({r[0]: args.fixed_epochs for r in rows} if args.fixed_epochs else
             args.followed if args.followed else fixed_budgets(budgets, args.plateau_seeds))
    lockstep = getattr(args, "lockstep", None) or {}
    paths, sweeps_done = trainer.run(rows, first=args.epochs, pct=args.until_plateau, max_epochs=args.max_epochs,
                                     fixed=fixed, caps=caps, early_stop=args.early_stop,
                                     **({"fixed_stop": "the budget judged across seeds"} if lockstep else {}))
    for folder, judged in lockstep.items():
        if folder in sweeps_done:   # not "fixed": the search was across seeds, each pair's verdict kept
            sweeps_done[folder].update(stop=judged["stop"], plateaued=judged["stop"] == "plateau across seeds",
                                       verdicts=judged["verdicts"])
    if args.train_only:
        say(f"[{tag}] trained (--train-only): {time.perf_counter() - wall:.0f} s (CPU {time.process_time() - cpu:.0f} s)")
        return None
    series, eval_tokens = evaluate_seed(paths, store, root, tag)
    per_seed.append(series)
    budgets.append({"seed": seed, "sweeps": sweeps_done, "seconds": time.perf_counter() - wall,
                    "cpu_seconds": time.process_time() - cpu})
    say(f"[{tag}] done: {time.perf_counter() - wall:.0f} s (CPU {time.process_time() - cpu:.0f} s)")
    report(args, per_seed, budgets, eval_tokens, t0)   # after every seed: a cut-off run keeps its data
    return eval_tokens


def with_lrs(rows: list, lrs: dict) -> list:
    """The sweep rows with each tuned folder's lr (bench/lr_tune.py); e2e and continuation rows keep
    theirs (they were not tuned)."""
    out = []
    for folder, arch, extra in rows:
        if folder in lrs and extra.get("loss", "local") == "local" and "init" not in extra:
            extra = {**extra, "lr": lrs[folder]}
        out.append((folder, arch, extra))
    return out


def e2e_caps(rows, cap: int | None) -> dict | None:
    """{folder: cap} for the e2e sweeps and, under continuation, relu_cont: the same continuation
    budget for e2e and local (issue 18)."""
    if not cap:
        return None
    return {r[0]: cap for r in rows if r[0] in ("e2e", "e2e_ds") or r[0].startswith("relu_cont")}


def store_content_of(args) -> dict | None:
    """seed_eval.store_content of the run's stores (None under --report-only: the run's own, if any,
    is in its pareto.json; a store gone since is not an error)."""
    from sae_harvest.stores import StoreError

    if getattr(args, "report_only", False):
        return None
    paths = {"store": getattr(args, "store", None) or os.path.join(args.out, "store.zarr")}
    if not getattr(args, "no_label_free", True) and not getattr(args, "e2e_only", False):
        paths["label_free_store"] = args.label_free_store or os.path.join(args.out, "store-label-free.zarr")
    out = {}
    for name, path in paths.items():
        try:
            out[name] = store_content(path)
        except (StoreError, OSError):   # unknown, said as such: never a digest of something else
            out[name] = None
    return out


def report(args, per_seed, budgets, eval_tokens, t0, write: bool = True) -> dict:
    """Every claim's rows (verdicts) from the per-seed series: at the L0 grid, and at A's own sweep
    points; writes pareto.json (unless not `write`) and prints them with each seed's budgets."""
    slack, ends = getattr(args, "l0_slack", L0_SLACK), getattr(args, "ends", "hold")
    comparisons = {f"{a} vs {b}: {metric} {expected}": at_grid(per_seed, a, b, metric, expected, L0_GRID, slack, ends)
                   + at_points(per_seed, a, b, metric, expected, slack, ends)
                   for a, b, metric, expected in claims(args.e2e)}
    out = {"seeds_done": len(per_seed), "args": {k: v for k, v in vars(args).items()}, "local": LOCAL,
           "rule": "paired 95% t-interval of the per-seed log ratio, >= 5 seeds; tie when it contains 1",
           "l0_slack": slack,
           "eval_tokens": eval_tokens, "store_content": store_content_of(args),
           "budgets": budgets, "series_per_seed": per_seed,
           "comparisons": comparisons, "seconds": time.perf_counter() - t0,
           # claims a --folders run left out: no rows because nothing was trained, not a tie
           "untrained_claims": sorted(f"{a} vs {b}: {metric} {expected}" for a, b, metric, expected in claims(args.e2e)
                                      if getattr(args, "folders", None)
                                      and not all(a in series and b in series for series in per_seed))}
    pct = getattr(args, "until_plateau", 0)
    if pct:   # one seed's search reads noise at ±4-10%; the plateau judged over every seed's journal
        try:
            seeds = list(range(args.seeds)) if getattr(args, "seeds", None) else None
            out["plateau_across_seeds"] = {"pct": pct, "folders": plateau_seeds.summary(args.out, pct, seeds)}
        except ValueError as e:   # an unreadable journal must not cost the verdicts
            out["plateau_across_seeds"] = {"pct": pct, "error": str(e)}
    if write:
        with open(os.path.join(args.out, "pareto.json"), "w") as f:
            json.dump(scrub_tree(out), f, indent=2)   # --store may be a URL with credentials
    origin = eval_tokens if isinstance(eval_tokens, dict) else {"tokens": eval_tokens}   # an int before issue 18
    print(f"--- {len(per_seed)} seed(s), {time.perf_counter() - t0:.0f} s; evaluated on "
          f"{origin.get('tokens')} held-out tokens ({origin.get('sequences')} sequences)")
    for b in budgets:
        print_budget(b)
    if "plateau_across_seeds" in out:
        print(f"plateau judged across seeds (±{pct:g}%, bench/plateau_seeds.py):",
              out["plateau_across_seeds"].get("error", ""))
        for folder, pairs in out["plateau_across_seeds"].get("folders", {}).items():
            print(f"  {folder}: " + ", ".join(f"{pair} {v}" for pair, v in pairs.items()))
    if getattr(args, "folders", None):
        print(f"--folders {','.join(args.folders)}: only these folders were trained")
    if ends != "hold":
        print(f"ends: {ends} (within the L0 slack the end segment is continued: a check, not the rule)")
    for claim, rows in comparisons.items():
        if claim in out["untrained_claims"]:
            print(f"{claim}\n  no rows: {claim.split(':')[0]} not both trained (--folders)")
        else:
            print_rows(claim, rows, ends)
    return out


if __name__ == "__main__":
    main()
