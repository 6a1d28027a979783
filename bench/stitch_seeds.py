"""SAE stitching (Leask et al. 2024, sec. 4) over several seeds and size pairs on the offline default model.

Per seed, SAEs of each size are trained on the same store, each size with its own seed (seed x 1000
+ d_sae: no two SAEs of a pair share initial rows), then `evaluate stitch` runs for each adjacent pair
(small -> 2x larger) at each cosine threshold on the store's held-out sequences; the summaries are
collected and reported as mean ± standard deviation over seeds, with the overlap of each pair: the
share of the large SAE's latents that match a small latent (reconstruction latents) and of the small
SAE's latents that some large latent matches. The paper's claim (adding the novel latents lowers
MSE, swapping groups interpolates smoothly) presupposes that the pair overlaps: a large SAE that
mostly re-learns the small one's latents plus a few new ones.

    python bench/stitch_seeds.py --store STORE.zarr --out bench-out/stitch   # ~10 min on 2 CPU cores

The defaults reproduce the first run (docs/results-withdrawn.md), where the larger SAEs came out
worse; the fair rerun (a 600k-token store, one lr for all sizes, 3 epochs, 64 -> 128 -> 256) is

    python bench/stitch_seeds.py --store STORE600K.zarr --out bench-out/stitch-fair --sizes 64,128,256 \
        --lr 8e-3 --epochs 3

The paper's regime (Leask et al.: L1-ReLU GPT-2 SAEs of 768 to 98,304 latents at d = 768, doubling):
ReLU/L1 SAEs at least 8x overcomplete, at doubling sizes (d = 128 here: 1024 -> 2048 -> 4096):

    python bench/stitch_seeds.py --store STORE.zarr --out bench-out/stitch-paper --paper-regime --seeds 5

Each size at its own tuned lr (--lr-tune 1,3,10,30: multiples of the architecture's default lr, each
size trained on seed 0 at each, the lowest training objective over the last 10% of the logged steps
wins, bench/lr_tune.py's rule; held-out tokens decide nothing; the winner is seed 0's run):

    python bench/stitch_seeds.py --store STORE.zarr --out bench-out/stitch-tuned --paper-regime --seeds 5 \
        --epochs 4 --lr-tune 1,3,10,30

On the live latents only (`--live-only`, evaluate stitch's flag: latents that fire on none of the
evaluation tokens are left out of both SAEs; the SAEs of the run are reused, the record goes to
stitch_seeds-live.json beside the all-latents one): the same command plus --live-only.

Verdicts (bench/verdicts.py's rule: the 95% t-interval over the seeds of the per-seed log ratio, a
tie when it contains 1) for the premise and each of the paper's claims, per pair and threshold, are
printed and written to stitch_seeds.json. A rerun resumes: a trained SAE whose config matches is
kept; one trained with another config stops the run (use another --out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from common import Refused, trained_with, write_json
from lr_tune import choose, default_lr, score, tail_objective
from sae_harvest.evaluate.demo import SITE
from sae_harvest.evaluate.stitch import StitchConfig, run_stitch
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit
from sae_harvest.stores.urls import scrub_text, scrub_tree
from verdicts import fraction_verdict, ratio, verdict

KEYS = ("large_matched", "small_matched", "dead_small", "dead_large", "n_novel", "n_reconstruction", "n_groups",
        "n_orphans", "mse_small", "mse_after_novel", "mse_after_swaps", "mse_large", "l0_small", "l0_after_novel", "novel_steps_lowering_mse", "swap_steps_lowering_mse",
        "largest_step_mse_increase_rel", "novel_alone_lowering_mse", "reconstruction_alone_raising_mse",
        "ce_increase_small", "ce_increase_after_novel", "ce_increase_large")


# (claim, numerator, denominator): the paper's claims as per-seed ratios, each expected below 1
CLAIMS = (("premise: the larger SAE reconstructs better", "mse_large", "mse_small"),
          ("adding the novel latents lowers MSE", "mse_after_novel", "mse_small"),
          ("adding the novel latents lowers the CE increase", "ce_increase_after_novel", "ce_increase_small"),
          ("swapping the groups lowers MSE further", "mse_after_swaps", "mse_after_novel"))
# (claim, key, expected): the claims about a fraction of latents, per seed, against one half
FRACTION_CLAIMS = (("most reconstruction latents added alone raise MSE (fig. 4)", "reconstruction_alone_raising_mse", ">"),
                   ("most of the larger SAE's latents match a smaller one's (the overlap's premise)", "large_matched", ">"))


def stitch_verdicts(runs: list[dict], sizes: list[int], thresholds: list[float]) -> list[dict]:
    """Per pair, threshold and claim: the per-seed ratios and bench/verdicts.py's verdict ("<")."""
    out = []
    for small, large in zip(sizes, sizes[1:]):
        for theta in thresholds:
            rows = [r for r in runs if r["pair"] == f"{small}->{large}" and r["threshold"] == theta]
            for claim, num, den in CLAIMS:
                measured = [r.get(num) is not None and r.get(den) is not None for r in rows]
                if not any(measured):   # not measured in this run (--ce-points 0): no verdict
                    continue
                if not all(measured):
                    raise ValueError(f"{small}->{large} theta {theta}: {num} or {den} missing in a seed's summary")
                ratios = [ratio(r[num], r[den]) for r in rows]   # a zero or negative one: "untestable"
                if ratios:
                    out.append({"pair": f"{small}->{large}", "threshold": theta, "claim": claim,
                                "ratio_of": f"{num} / {den}", "ratios": ratios, **verdict(ratios, "<")})
            for claim, key, expected in FRACTION_CLAIMS:
                fractions = [r.get(key) for r in rows]
                if rows and all(f is not None for f in fractions):
                    out.append({"pair": f"{small}->{large}", "threshold": theta, "claim": claim, "fraction_of": key,
                                "fractions": fractions, **fraction_verdict(fractions, expected)})
    return out


RECORD = {False: "stitch_seeds.json", True: "stitch_seeds-live.json"}   # by --live-only


def pair_overlap(summary: dict, small: int, large: int, live_only: bool) -> dict:
    """The shares of the large SAE's latents that match a small one (reconstruction latents) and of
    the small SAE's latents that some large one matches; over live latents with --live-only."""
    n_large = large - (summary["n_dead_large"] if live_only else 0)
    n_small = small - (summary["n_dead_small"] if live_only else 0)
    return {"large_matched": summary["n_reconstruction"] / n_large, "small_matched": 1 - summary["n_orphans"] / n_small,
            "dead_large": summary["n_dead_large"] / large, "dead_small": summary["n_dead_small"] / small}


def train_one(args, out: str, d_sae: int, sweep: dict, name: str, lr: float | None, seed: int) -> None:
    """One SAE into out/name; kept if already there with the same config (a resumed run), refused if
    there with another (its numbers would be mixed into this run's)."""
    cfg = TrainConfig(out=out, store=args.store, site=SITE, arch=args.arch, d_sae=d_sae, **sweep,
                      batch_size=args.batch_size, epochs=args.epochs, lr=lr,
                      seed=seed * 1000 + d_sae, device="cpu",   # independent initialisations
                      checkpoint_every=10**9, log_every=10)   # the tuning reads the log's tail
    if trained_with(os.path.join(out, name, "cfg.json"), cfg):   # another config: Refused
        return
    wall, cpu = time.perf_counter(), time.process_time()
    fit(cfg, overwrite=True, progress=False)
    print(f"seed {seed}: trained {args.arch} d_sae {d_sae} (lr {'default' if lr is None else f'{lr:.3g}'}): "
          f"{time.perf_counter() - wall:.1f} s (CPU {time.process_time() - cpu:.1f} s)", flush=True)


def trained_lr(sae_dir: str) -> float | None:
    """The lr an SAE folder was trained at (its cfg.json's resolved lr), None if unreadable."""
    try:
        with open(os.path.join(sae_dir, "cfg.json")) as f:
            return float(json.load(f)["sae_harvest"]["lr"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def tune_lrs(args, sizes: list[int], sweep: dict, name: str, multipliers: list[float]) -> dict:
    """{d_sae: lr}: each size at each multiple of its default lr on seed 0, the lowest tail training
    objective wins (bench/lr_tune.py's rule); records every candidate in --out/lr_tune.json. The
    winner's run is seed 0's (the same config): it is moved there, not retrained."""
    path = os.path.join(args.out, "lr_tune.json")
    doc = {}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    key = scrub_tree({"store": args.store, "arch": args.arch, **sweep, "epochs": args.epochs,
                      "batch_size": args.batch_size})
    key = json.loads(json.dumps(key))
    if doc.get("key") not in (None, key):
        raise Refused(f"{path} was tuned for another run ({doc['key']}): use another --out")
    if not doc and os.path.exists(os.path.join(args.out, "seed0")):
        raise Refused(f"{args.out} holds SAEs trained without --lr-tune: use another --out")
    doc.update(key=key, rule="lowest log training objective, last 10% of the logged steps, seed 0")
    sizes_doc = doc.setdefault("sizes", {})
    lrs = {}
    for d_sae in sizes:
        cands = sizes_doc.setdefault(str(d_sae), {})
        base = default_lr(args.arch, d_sae)
        for m in multipliers:
            if f"{m:g}" in cands:
                continue
            out = os.path.join(args.out, "lr-tune", f"x{m:g}", f"{args.arch}-{d_sae}")
            train_one(args, out, d_sae, sweep, name, base * m, seed=0)
            tail = tail_objective(os.path.join(out, name))
            cands[f"{m:g}"] = {"multiplier": m, "lr": base * m, "tail": tail, "score": score({name: tail}),
                               "dir": out}
            write_json(path, doc)
        best = choose([c for c in cands.values() if c["multiplier"] in multipliers])
        lrs[d_sae] = best["lr"]
        edge = len(multipliers) > 1 and best["multiplier"] in (min(multipliers), max(multipliers))
        print(f"[lr] d_sae {d_sae}: x{best['multiplier']:g} (lr {best['lr']:.3g})"
              + ("  (at the grid's edge: widen --lr-tune)" if edge else ""), flush=True)
        final = os.path.join(args.out, "seed0", f"{args.arch}-{d_sae}")
        if os.path.exists(final):   # moved there by an earlier pass of this tuning: still the winner?
            trained = trained_lr(os.path.join(final, name))
            if trained is None or not math.isclose(trained, best["lr"], rel_tol=1e-9):
                raise Refused(f"{final} was trained at lr {trained}, the tuning picks {best['lr']:.3g} "
                                 "(the grid changed?): use another --out")
        else:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(best["dir"], final)
            doc.setdefault("moved", {})[str(d_sae)] = f"{best['multiplier']:g}"
            best["dir"] = final
            write_json(path, doc)
    doc["lrs"] = {str(d): lr for d, lr in lrs.items()}
    write_json(path, doc)
    return lrs


def report_only(path: str) -> None:
    """The report and verdicts of a stored stitch_seeds JSON, by the current rules (nothing run)."""
    try:
        with open(path) as f:
            runs = json.load(f)["runs"]
        pairs = list(dict.fromkeys(r["pair"] for r in runs))
        sizes = [int(pairs[0].split("->")[0])] + [int(q.split("->")[1]) for q in pairs]
        thresholds = list(dict.fromkeys(r["threshold"] for r in runs))
        seeds = len({r["seed"] for r in runs})
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise Refused(f"--report-only {path}: {type(e).__name__}: {e}") from None
    report(runs, sizes, thresholds, seeds, 0.0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if "--report-only" in sys.argv[1:]:   # no --store needed to re-read a record
        p.add_argument("--report-only", required=True, metavar="JSON")
        try:
            report_only(p.parse_args().report_only)
        except Refused as e:
            print(scrub_text(f"error: {e}"), file=sys.stderr)
            sys.exit(2)
        return
    p.add_argument("--report-only", metavar="JSON", help="the report and verdicts of a stored stitch_seeds JSON "
                                                         "by the current rules (nothing trained or stitched)")
    p.add_argument("--store", required=True, help="a store of the offline default model at " + SITE)
    p.add_argument("--out", default="bench-out/stitch")
    p.add_argument("--sizes", default="128,256,512")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every size (default: the "
                                                           "architecture's; TopK's 2e-4/sqrt(d_sae/2^14) falls with size)")
    p.add_argument("--lr-tune", default=None, help="tune each size's lr on seed 0 over these multiples of its "
                                                    "default (e.g. 1,3,10,30); overrides --lr")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--thresholds", default="0.7,0.4")
    p.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: up to 16384 of the "
                                                               "store's held-out ones)")
    p.add_argument("--arch", default="topk", choices=("topk", "relu"))
    p.add_argument("--l1", type=float, default=300.0, help="--arch relu: the L1 coefficient (every size)")
    p.add_argument("--paper-regime", action="store_true",
                   help="ReLU/L1 SAEs at 8x, 16x, 32x the site's width (overrides --arch and --sizes)")
    p.add_argument("--ce-points", type=int, default=3)
    p.add_argument("--live-only", action="store_true",
                   help="stitch the live latents only (evaluate stitch --live-only): latents that fire on none of "
                        "the evaluation tokens are left out of both SAEs; writes stitch_seeds-live.json (the "
                        "all-latents record stays)")
    args = p.parse_args()
    from sae_harvest.evaluate.splice import EvaluateError

    try:
        run(p, args)
    except (Refused, EvaluateError) as e:   # e.g. --live-only on an SAE that fires on no evaluation token
        print(scrub_text(f"error: {e}"), file=sys.stderr)
        sys.exit(2)


def run(p, args) -> None:
    try:
        multipliers = [float(m) for m in args.lr_tune.split(",")] if args.lr_tune else None
        thresholds = [float(t) for t in args.thresholds.split(",")]
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError as e:
        p.error(f"--lr-tune / --thresholds / --sizes: {e}")
    if multipliers is not None and not all(0 < m < float("inf") for m in multipliers):
        p.error("--lr-tune: positive, finite multiples")
    from sae_harvest.stores import open_store
    try:   # before anything is written: a bad --store is one line
        d = open_store(args.store).width(SITE)
    except Exception as e:
        p.error(scrub_text(f"--store {args.store}: {type(e).__name__}: {e}"))
    if args.paper_regime:
        args.arch, args.sizes = "relu", f"{8 * d},{16 * d},{32 * d}"
        sizes = [8 * d, 16 * d, 32 * d]
    name = f"topk_k{args.k}" if args.arch == "topk" else f"relu_l1-{args.l1:g}"
    sweep = {"k": (args.k,)} if args.arch == "topk" else {"l1": (args.l1,)}
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    lrs = tune_lrs(args, sizes, sweep, name, multipliers) if multipliers else {d: args.lr for d in sizes}
    args.tuned_lrs = {str(d): lr for d, lr in lrs.items()} if multipliers else None
    runs = []
    for seed in range(args.seeds):
        for d_sae in sizes:
            train_one(args, os.path.join(args.out, f"seed{seed}", f"{args.arch}-{d_sae}"), d_sae, sweep, name,
                      lrs[d_sae], seed)
        for small, large in zip(sizes, sizes[1:]):
            for theta in thresholds:
                wall, cpu = time.perf_counter(), time.process_time()
                doc = run_stitch(StitchConfig(
                    small=os.path.join(args.out, f"seed{seed}", f"{args.arch}-{small}", name),
                    large=os.path.join(args.out, f"seed{seed}", f"{args.arch}-{large}", name),
                    store=args.store, tokens=args.tokens, ce_points=args.ce_points, threshold=theta,
                    device="cpu", live_only=args.live_only), progress=False).to_dict()
                summary = doc["summary"]
                overlap = pair_overlap(summary, small, large, args.live_only)
                runs.append({"seed": seed, "pair": f"{small}->{large}", "threshold": theta, **summary, **overlap,
                             "eval_tokens": doc.get("eval_tokens")})
                print(f"seed {seed} {small}->{large} theta {theta}: " +
                      ", ".join(f"{k} {doc['summary'].get(k)}" for k in ("n_novel", "mse_small", "mse_after_novel",
                                                                          "mse_large")) +
                      f"; {time.perf_counter() - wall:.1f} s (CPU {time.process_time() - cpu:.1f} s)", flush=True)
        write_json(os.path.join(args.out, RECORD[args.live_only]),   # after every seed: a cut-off run keeps it
                   {"args": vars(args), "runs": runs, "verdicts": stitch_verdicts(runs, sizes, thresholds),
                    "seconds": time.perf_counter() - t0})
    report(runs, sizes, thresholds, args.seeds, time.perf_counter() - t0)


def report(runs: list[dict], sizes: list[int], thresholds: list[float], seeds: int, seconds: float) -> None:
    print(f"--- {seeds} seed(s), {seconds:.0f} s; mean ± sd over seeds")
    for small, large in zip(sizes, sizes[1:]):
        for theta in thresholds:
            rows = [r for r in runs if r["pair"] == f"{small}->{large}" and r["threshold"] == theta]
            print(f"{small}->{large}, theta {theta}:")
            for key in KEYS:
                vals = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
                if len(vals):
                    print(f"  {key:>34}: {vals.mean():.4g} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.2g}  "
                          f"[{vals.min():.4g}, {vals.max():.4g}]")
    print("verdicts (95% t-interval of the per-seed log ratio; a tie when it contains 1):")
    for v in stitch_verdicts(runs, sizes, thresholds):
        values = v.get("ratios") or v.get("fractions")
        centre = v.get("ratio", v.get("mean"))
        ci = f"{centre:.4f} [{v['interval'][0]:.4f}, {v['interval'][1]:.4f}]" if v["interval"] else \
            f"seeds {min(values):.4f}-{max(values):.4f}"
        what = v.get("ratio_of") or f"mean {v['fraction_of']} against 0.5"
        print(f"  {v['pair']} theta {v['threshold']:g}: {v['claim']} ({what}): {ci}  {v['verdict']}")


if __name__ == "__main__":
    main()
