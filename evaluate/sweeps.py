"""Sweeps as first-class inputs of `evaluate`: `--sae` takes an SAE folder, a sweep folder (the
--out of `train fit`: every SAE in it) or a glob the command expands itself (quoted, so that it
works the same in every shell; a path that exists is taken as it is, whatever its name holds); result
rows name the run and the swept value."""
from __future__ import annotations

import glob
import os
from pathlib import Path

from sae_harvest.stores.errors import UserError

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"


def _is_sae(path: Path) -> bool:
    return (path / CFG_NAME).is_file() or (path.is_file() and path.name == WEIGHTS_NAME)


def _saes_in(folder: Path) -> list[str]:
    """The SAE folders directly inside a sweep folder, in name order (checkpoint/ is not one)."""
    return [str(p) for p in sorted(folder.iterdir()) if p.is_dir() and p.name != "checkpoint" and _is_sae(p)]


def expand_saes(specs) -> tuple[str, ...]:
    """Every SAE that `specs` name, in order, each once. Raises a UserError (one line) for a spec
    that names none, before anything is loaded."""
    out: list[str] = []
    for spec in specs:
        spec = str(spec)
        # a path that exists is that path, even when its name holds [ * ? (a folder `sae[1]` is not
        # the pattern matching sae1); only a path that does not exist is expanded as a pattern
        pattern = any(ch in spec for ch in "*?[") and not os.path.lexists(spec)
        paths = sorted(glob.glob(spec)) if pattern else [spec]
        if not paths:
            raise UserError(f"--sae {spec}: the pattern matches nothing")
        found = []
        for p in map(Path, paths):
            if _is_sae(p) or not p.exists():
                found.append(str(p))   # a missing path is reported by the loader, with its own words
            elif p.is_dir():
                found += _saes_in(p)
        if not found:
            raise UserError(f"--sae {spec}: no SAE there (an SAE folder holds {CFG_NAME}; a sweep folder, "
                            f"SAE folders)")
        out += [p for p in found if p not in out]
    return tuple(out)


def run_name(sae_path: str) -> str:
    """The run an SAE belongs to: its sweep folder's name (the --out of `train fit`)."""
    p = Path(sae_path)
    folder = p.parent if p.name == WEIGHTS_NAME else p
    return folder.parent.name or str(folder.parent)


def swept_value(r: dict) -> str | None:
    """The value a result row's sweep varied: k=16, l1=300 (None for neither)."""
    if r.get("k") is not None:
        return f"k={r['k']}"
    if r.get("l1") is not None:
        return f"l1={r['l1']:g}"
    return None


def name_rows(results: list[dict]) -> list[dict]:
    """Each row gains "run" and "swept"; when the rows come from several runs, "name" becomes
    run/name, so two topk_k16 of different sweeps are told apart (and a clash that remains gets the path)."""
    for r in results:
        r["run"] = run_name(r["sae"]) if r.get("sweep_name") else None
        r["swept"] = swept_value(r)
    if len({r["run"] for r in results if r["run"]}) > 1:   # rows of two or more sweeps
        for r in results:
            if r["run"]:
                r["name"] = f"{r['run']}/{r['name']}"
    seen: dict[tuple, int] = {}   # a gtopk SAE has one row per gradient mode: those are not a clash
    for r in results:
        seen[r["name"], r.get("grad_mode")] = seen.get((r["name"], r.get("grad_mode")), 0) + 1
    for r in results:
        if seen[r["name"], r.get("grad_mode")] > 1:
            r["name"] = r["sae"]
    return results
