"""The verdict rule the result benches share (bench/pareto.py, bench/jumprelu_gated.py; docs/results.md).

A claim is a ratio metric(A) / metric(B) at equal L0, one per seed, B interpolated log-linearly in
L0. Over >= MIN_SEEDS seeds the 95% Student t-interval of the mean per-seed log ratio,
exponentiated, decides: a tie when it contains 1, else A is lower or higher, and the claim agrees or
disagrees. Pure functions of the per-seed series ({series: [{"name", "l0", metric...}]}): no model,
no store, so tests check them against hand computations.
"""
from __future__ import annotations

import numpy as np

L0_SLACK = 0.02   # how far (relative) past a series' L0 range its end point still stands for it
MIN_SEEDS = 5
# two-sided 95% Student t quantiles t(0.975, df); beyond the table the df-30 value is conservative
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}


def interp_ce(points, l0, slack: float = L0_SLACK, ends: str = "hold"):
    """A metric (CE increase, downstream MSE) of a series at a given L0, by log-linear interpolation;
    within `slack` past either end of the series' L0 range, that end's value (a TopK SAE at k = 32
    fires 31.9 latents on average when a selected pre-activation is <= 0, and would otherwise drop
    out of every comparison at L0 32); None further out. ends="extend": within the slack, the end
    segment continued log-linearly instead (the check of what holding an end decides)."""
    pts = sorted(p for p in points if p[0] > 0)
    if not pts:
        return None
    xs, ys = np.log([p[0] for p in pts]), [p[1] for p in pts]
    x = np.log(l0)
    if not (xs[0] + np.log1p(-slack) <= x <= xs[-1] + np.log1p(slack)):
        return None
    if ends == "extend" and not xs[0] <= x <= xs[-1]:
        # the end segment between distinct L0s (a repeated end L0 does not make a segment)
        pairs = [(i, i + 1) for i in range(len(xs) - 1) if xs[i + 1] > xs[i]]
        if pairs:
            i, j = pairs[0] if x < xs[0] else pairs[-1]
            return float(ys[i] + (ys[j] - ys[i]) * (x - xs[i]) / (xs[j] - xs[i]))
    return float(np.interp(x, xs, ys))   # np.interp holds the end values past the ends


def held(points, l0) -> bool:
    """Whether the series' value at l0 is an end value held past its L0 range (interp_ce's slack):
    such a point exists only through the slack, and a held end overstates a metric that falls with
    L0 (the series' own, in its favour or against it), so rows built on one say so (held_end)."""
    l0s = [p[0] for p in points if p[0] > 0]
    return bool(l0s) and not (min(l0s) <= l0 <= max(l0s))


def held_seeds(per_seed: list[dict], claim: str, row: dict) -> int:
    """In how many seeds a row of claim "A vs B: metric expected" uses a held end value: at a grid
    L0 either series', at one of A's SAEs B's (at that SAE's own L0 in the seed)."""
    a, b = claim.split(":")[0].split(" vs ")
    count = 0
    for series in per_seed:
        lb = [(q["l0"], 0) for q in series.get(b, [])]
        if "at" in row:
            qa = next((q for q in series.get(a, []) if q["name"] == row["at"]), None)
            count += qa is not None and held(lb, qa["l0"])
        else:
            count += held([(q["l0"], 0) for q in series.get(a, [])], row["l0"]) or held(lb, row["l0"])
    return count


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high): the 95% Student t-interval of the mean per-seed log ratio,
    exponentiated. Paired: each seed's A and B share the store, the evaluation tokens and the seed."""
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    n = len(logs)
    mean = float(logs.mean())
    half = T975[max(d for d in T975 if d <= n - 1)] * float(logs.std(ddof=1)) / np.sqrt(n)
    return float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half))


def verdict(ratios: list[float], expected: str = "<") -> dict:
    """The one verdict rule (docs/results.md): over >= MIN_SEEDS seeds, the 95% t-interval of the
    per-seed log ratio metric(A) / metric(B); "tie" when it contains 1, else A is "lower" or
    "higher". The claim "<" (A lower) or ">" (A higher) agrees or disagrees with a non-tie; a tie
    is a tie. The claim "~" (A no worse than B within noise) agrees with a tie and disagrees with
    either side. Fewer seeds: "untested"."""
    if len(ratios) < MIN_SEEDS:
        return {"verdict": f"untested (fewer than {MIN_SEEDS} seeds)", "outcome": None, "interval": None}
    if not all(np.isfinite(r) and r > 0 for r in ratios):   # e.g. a negative CE increase: no log ratio
        return {"verdict": "untestable (a ratio <= 0 or not finite: the log-ratio rule cannot judge it)",
                "outcome": None, "interval": None}
    centre, lo, hi = ratio_interval(ratios)
    outcome = "tie" if lo <= 1 <= hi else ("lower" if hi < 1 else "higher")
    if expected == "~":
        result = "agrees" if outcome == "tie" else "disagrees"
    elif outcome == "tie":
        result = "tie"
    else:
        result = "agrees" if (outcome == "lower") == (expected == "<") else "disagrees"
    return {"verdict": result, "outcome": outcome, "ratio": centre, "interval": [lo, hi]}


def fraction_verdict(fractions: list[float], expected: str = ">", half: float = 0.5) -> dict:
    """The same rule for a claim about a fraction ("most latents ..."), where a log ratio cannot be
    taken (a seed's fraction may be 0): over >= MIN_SEEDS seeds, the 95% t-interval of the mean
    per-seed fraction; a tie when it contains `half`, else above or below, agreeing with ">" (most)
    or "<" (few)."""
    if len(fractions) < MIN_SEEDS:
        return {"verdict": f"untested (fewer than {MIN_SEEDS} seeds)", "outcome": None, "interval": None}
    f = np.asarray(fractions, dtype=np.float64)
    if not np.all(np.isfinite(f)):
        return {"verdict": "untestable (a fraction not finite)", "outcome": None, "interval": None}
    mean = float(f.mean())
    half_width = T975[max(d for d in T975 if d <= len(f) - 1)] * float(f.std(ddof=1)) / np.sqrt(len(f))
    lo, hi = mean - half_width, mean + half_width
    outcome = "tie" if lo <= half <= hi else ("higher" if lo > half else "lower")
    result = "tie" if outcome == "tie" else "agrees" if (outcome == "higher") == (expected == ">") else "disagrees"
    return {"verdict": result, "outcome": outcome, "mean": mean, "interval": [lo, hi]}


def _row(ratios: list[float], expected: str, **where) -> dict:
    return {**where, "ratios": ratios, "min": min(ratios), "max": max(ratios), **verdict(ratios, expected)}


def ratio(a: float, b: float) -> float:
    """a / b, inf for b = 0: verdict() calls such a seed untestable instead of the row vanishing."""
    return a / b if b != 0 else float("inf")


def _points(series: dict, key: str, metric: str) -> list[tuple[float, float]]:
    """(L0, metric) of a series; raises if an evaluated SAE lacks the metric (missing data is not a
    seed to skip)."""
    pts = [(q["l0"], q.get(metric)) for q in series.get(key, [])]
    if any(v is None for _, v in pts):
        raise ValueError(f"{key}: {metric} missing for an evaluated SAE")
    return pts


def at_grid(per_seed: list[dict], a: str, b: str, metric: str, expected: str, grid,
            slack: float = L0_SLACK, ends: str = "hold") -> list[dict]:
    """One row per L0 of `grid` where both series reach it in every seed (both interpolated);
    `slack`: the run's own (a JSON records it; one written before the slack was 0)."""
    rows = []
    for l0 in grid:
        ratios = []
        for series in per_seed:
            ca = interp_ce(_points(series, a, metric), l0, slack, ends)
            cb = interp_ce(_points(series, b, metric), l0, slack, ends)
            if ca is not None and cb is not None:   # both reach this L0 in this seed
                ratios.append(ratio(ca, cb))
        if ratios and len(ratios) == len(per_seed):
            rows.append(_row(ratios, expected, l0=l0))
    return _with_held(per_seed, a, b, metric, expected, rows)


def at_points(per_seed: list[dict], a: str, b: str, metric: str, expected: str,
              slack: float = L0_SLACK, ends: str = "hold") -> list[dict]:
    """One row per SAE of A (by name) present in every seed, B interpolated at its L0: works when
    the two L0 ranges barely overlap."""
    rows = []
    for name in sorted({q["name"] for series in per_seed for q in series.get(a, [])}):
        ratios, l0s = [], []
        for series in per_seed:
            _points(series, a, metric)
            qa = next((q for q in series.get(a, []) if q["name"] == name), None)
            cb = None if qa is None else interp_ce(_points(series, b, metric), qa["l0"], slack, ends)
            if cb is not None:   # A has this SAE in this seed, and B reaches its L0
                ratios.append(ratio(qa[metric], cb))
                l0s.append(qa["l0"])
        if ratios and len(ratios) == len(per_seed):
            rows.append(_row(ratios, expected, at=name, l0=float(np.mean(l0s))))
    return _with_held(per_seed, a, b, metric, expected, rows)


def _with_held(per_seed, a, b, metric, expected, rows):
    for r in rows:
        r["held_end"] = held_seeds(per_seed, f"{a} vs {b}: {metric} {expected}", r)
    return rows


def print_rows(claim: str, rows: list[dict], ends: str = "hold") -> None:
    print(claim)
    what = "held end" if ends == "hold" else "extended end (--ends extend, a check, not the rule)"
    for r in rows:
        where = f"{r['at']} (L0 {r['l0']:.1f})" if "at" in r else f"L0 {r['l0']:>3}"
        ci = f"{r['ratio']:.2f}, 95% CI [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]" if r["interval"] \
            else f"seeds {r['min']:.2f}-{r['max']:.2f}"
        note = f"  ({what} in {r['held_end']} seed(s): exists through the L0 slack)" if r.get("held_end") else ""
        print(f"  {where}: ratio {ci}, {len(r['ratios'])} seeds  {r['verdict']}{note}")


def evaluated_budget(rec: dict) -> dict:
    """The history entry of the budget a search record evaluates (the one before a turn, else the
    last one trained)."""
    return next((h for h in rec["history"] if h["epochs"] == rec["epochs"]), rec["history"][-1])


def print_budget(b: dict) -> None:
    """One seed's training budgets: per sweep folder its epochs, steps and tokens (a pareto.json of
    before the per-folder plateau has one budget for the whole seed), and the thresholds' and gates'
    movement from their starts."""
    if "sweeps" in b:
        print(f"seed {b['seed']}: {b['seconds']:.0f} s (CPU {b.get('cpu_seconds', 0):.0f} s)")
        rows = [(folder, rec["epochs"], rec["stop"], evaluated_budget(rec)["training"])
                for folder, rec in b["sweeps"].items()]
    else:
        rows = [("all", b["epochs"], "plateau" if b.get("plateaued") else "", b["history"][-1]["training"])]
    for folder, epochs, stop, last in rows:
        first = next(iter(last.values()), {})
        print(f"  {folder}: {epochs} epoch(s) ({stop}), {first.get('steps')} steps, "
              f"{first.get('tokens') or 0:,} tokens")
        for k, v in last.items():
            if "moved" in v:
                m = v["moved"]
                print(f"    {k}: {m['what']} median {m['median']:.3f} [{m['q05']:.3f}, {m['q95']:.3f}], "
                      f"{m['moved_over_5pct']:.0%} moved > 5%")
