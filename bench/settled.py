"""Which verdicts hold at every budget (or scale): the same claims from several pareto.json runs,
point by point, and whether each point's verdict is the same in all of them.

A verdict that changes between two budgets (64 and 128 epochs, 128 and 256) is not settled,
whichever way it points at the larger one; one that is the same at both is what docs/results.md
calls settled. A point is a fixed L0 of the grid ("L0 16") or one of A's SAEs by name
("batchtopk_k16"), the rows bench/verdicts.py writes into a pareto.json's "comparisons". Only real
verdicts count (agrees, disagrees, tie): an untested or untestable row, or a point missing from a
run, is "not comparable", never settled. A row that exists only through the L0 slack (a series' end
value held past its range in some seed, bench/verdicts.py) is marked "held end".

    python bench/settled.py docs/results-pareto-tuned-64.json docs/results-pareto-tuned.json \\
        --labels 64,128                        # a line per point, then the counts
    python bench/settled.py A.json B.json --markdown   # the rows as a docs/results.md table
    python bench/settled.py A.json B.json --claims "batchtopk vs topk"   # one claim's points only
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from verdicts import held_seeds

REAL = ("agrees", "disagrees", "tie")


@dataclass(frozen=True)
class Point:
    claim: str
    where: str                       # "L0 16" or an SAE's name
    rows: tuple[dict | None, ...]    # one per run; None: the point is not in that run

    @property
    def status(self) -> str:
        if any(r is None or r["verdict"] not in REAL for r in self.rows):
            return "not comparable"
        # the outcome too: a "~" claim disagrees both when A is lower and when it is higher
        return "settled" if len({(r["verdict"], outcome(r)) for r in self.rows}) == 1 else "moved"


def outcome(row: dict) -> str:
    """lower / higher / tie, from the row (bench/verdicts.py writes it) or its interval."""
    if row.get("outcome"):
        return row["outcome"]
    lo, hi = row["interval"]
    return "tie" if lo <= 1 <= hi else ("lower" if hi < 1 else "higher")


def where_of(row: dict) -> str:
    return row["at"] if "at" in row else f"L0 {row['l0']:g}"


def points(docs: list[dict]) -> list[Point]:
    """Every (claim, point) found in any run, in the first run's order, then the others' new ones."""
    keys, seen = [], set()
    for doc in docs:
        for claim, rows in doc.get("comparisons", {}).items():
            for r in rows:
                if (claim, where_of(r)) not in seen:
                    seen.add((claim, where_of(r)))
                    keys.append((claim, where_of(r)))
    out = []
    for claim, where in keys:
        per_run = tuple(next((r for r in doc.get("comparisons", {}).get(claim, []) if where_of(r) == where), None)
                        for doc in docs)
        out.append(Point(claim, where, per_run))
    return out


def problem(doc) -> str | None:
    """Why a loaded JSON is not a pareto.json this reads (None: it is)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("comparisons", {}), dict):
        return "not a pareto.json (an object with \"comparisons\")"
    for claim, rows in doc.get("comparisons", {}).items():
        for r in rows if isinstance(rows, list) else [None]:
            if not isinstance(r, dict) or "verdict" not in r or ("at" not in r and "l0" not in r):
                return f"claim {claim!r} has a row without a verdict or a point"
            if r["verdict"] not in REAL:
                continue
            interval = r.get("interval")
            if not (isinstance(interval, list) and len(interval) == 2
                    and all(isinstance(x, (int, float)) for x in interval)) or \
                    r.get("outcome") not in (None, "lower", "higher", "tie") or not isinstance(r.get("ratio"), (int, float)):
                return f"claim {claim!r} has a verdict without a ratio, an interval [low, high] or a known outcome"
    return None


def mark_held_ends(doc: dict) -> None:
    """Each row's held_end (bench/verdicts.py: in how many seeds it uses a series' end value held
    past its L0 range, i.e. exists only through the L0 slack), from the run's own series where the
    JSON predates the field."""
    per_seed = doc.get("series_per_seed")
    for claim, rows in doc.get("comparisons", {}).items():
        for r in rows:
            if "held_end" not in r and per_seed and " vs " in claim:
                r["held_end"] = held_seeds(per_seed, claim, r)


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if not row.get("interval"):
        return row["verdict"]
    lo, hi = row["interval"]
    held = f" (held end, {row['held_end']} seeds)" if row.get("held_end") else ""
    return f"{row['verdict']} {row['ratio']:.2f} [{lo:.2f}, {hi:.2f}]{held}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="pareto.json files, smallest budget first")
    p.add_argument("--labels", default=None, help="a name per run, comma-separated (default: run 1, run 2, ...)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--claims", default=None,
                   help="only the claims starting with one of these, comma-separated (e.g. \"batchtopk vs topk\"): "
                        "a run that trained one claim's folders (bench/pareto.py --folders) against whole runs")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [f"run {i + 1}" for i in range(len(args.runs))]
    if len(labels) != len(args.runs):
        p.error(f"--labels: {len(labels)} names for {len(args.runs)} runs")
    if len(args.runs) < 2:
        p.error("at least two runs to compare")
    docs = []
    for path in args.runs:
        try:
            with open(path) as f:
                docs.append(json.load(f))
        except (OSError, ValueError) as e:
            p.error(f"{path}: {e}")
        bad = problem(docs[-1])
        if bad:
            p.error(f"{path}: {bad}")
        try:
            mark_held_ends(docs[-1])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            p.error(f"{path}: its series_per_seed do not read ({type(e).__name__}: {e})")
    for path, d in zip(args.runs, docs):
        if not d.get("rule"):
            p.error(f"{path} records no verdict rule (written before the one rule): its verdicts do not compare")
    # one rule and one L0 slack (bench/verdicts.py L0_SLACK; absent = 0), or the comparison says nothing
    rules = {(d["rule"], d.get("l0_slack") or 0.0) for d in docs}
    if len(rules) > 1:
        p.error("the runs use different verdict rules or L0 slacks: " +
                "; ".join(f"{r} (slack {s:g})" for r, s in sorted(rules)))
    pts = points(docs)
    if args.claims is not None:
        wanted = [c.strip() for c in args.claims.split(",") if c.strip()]
        claims = {c for d in docs for c in d.get("comparisons", {})}
        unmatched = [c for c in wanted if not any(name.startswith(c) for name in claims)]
        if not wanted or unmatched:
            p.error(f"--claims: no claim starts with {', '.join(unmatched) or 'nothing'}")
        empty = [c for c in wanted if not any(q.claim.startswith(c) for q in pts)]
        if empty:
            p.error(f"--claims: {', '.join(empty)}: no rows in any run (nothing to compare)")
        pts = [q for q in pts if any(q.claim.startswith(c) for c in wanted)]
    if args.markdown:
        print("| claim | point | " + " | ".join(labels) + " | same at all? |")
        print("|---|---|" + "---|" * len(labels) + "---|")
    for q in pts:
        if args.markdown:
            print(f"| {q.claim} | {q.where} | " + " | ".join(cell(r) for r in q.rows) + f" | {q.status} |")
        else:
            print(f"{q.claim} @ {q.where}: {q.status}")
            for label, r in zip(labels, q.rows):
                print(f"    {label}: {cell(r)}")
    counts = {s: sum(q.status == s for q in pts) for s in ("settled", "moved", "not comparable")}
    print(f"{len(pts)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items()) +
          f" (rule: {next(iter(rules))[0]})", file=sys.stderr if args.markdown else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
