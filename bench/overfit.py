"""Does a longer budget fit the training split? Each SAE's NMSE on every training row of its store
against every held-out row, at several budgets of one run.

A held-out loss that rises between two budgets (bench/plateau.py's "turned") has two readings: the
SAE fits the training split (its training NMSE still falls while the held-out one rises), or the
optimisation itself went worse (both rise). The NMSE is the one the trainer reports (train/held_out.py:
sum ||x - x_hat||^2 / sum ||x||^2, position 0 left out as in training, g-SAEs selecting with the
store's gradients), so the held-out column reproduces each SAE's summary.json. Each SAE is read
against the store it trained on (the label-free g-SAE against the label-free store).

    python bench/overfit.py --store bench-out/pareto/store.zarr \\
        --budgets bench-out/pareto-tuned/seed3/epochs128 bench-out/pareto-tuned/seed3/epochs256 \\
        --json bench-out/overfit-seed3.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common import write_json


def sae_names(root: Path) -> list[str]:
    """folder/name of every saved SAE under a budget's root (root/folder/name/cfg.json)."""
    return sorted(str(p.parent.relative_to(root)) for p in root.glob("*/*/cfg.json"))


def nmse_on(sae, store, site: str, seqs: str, exclude_pos0: bool, batch_size: int = 4096) -> dict:
    """held_out_report of a saved SAE (its input scale folded in) on every row of the store's
    training ("train") or held-out ("held_out") sequences."""
    from sae_harvest.train.held_out import held_out_reconstruction

    grads = bool(getattr(sae, "uses_grads", False))

    def rows():
        for b in store.batches(site, batch_size, seqs=seqs, grads=grads, exclude_pos0=exclude_pos0, epochs=1,
                               drop_last=False):
            yield torch.from_numpy(b["acts"][site]), torch.from_numpy(b["grads"][site]) if grads else None

    with torch.no_grad():
        return held_out_reconstruction(sae, rows(), 1.0, "cpu")


def measure(store_path: str | None, budgets: list[str]) -> dict:
    """{folder/name: {budget root: {"train": report, "held_out": report}}} for the SAEs every budget
    has, each read against the store it trained on (its cfg.json's; `store_path` instead must be that
    store: the same creation id), so a g-SAE selects with the gradients it trained with."""
    from sae_harvest.stores import open_store
    from sae_harvest.train.sae_io import load_sae

    roots = [Path(b) for b in budgets]
    names = sorted(set.intersection(*(set(sae_names(r)) for r in roots)))
    if not names:
        raise ValueError(f"no SAE (folder/name/cfg.json) is under every one of {', '.join(budgets)}")
    opened = {}
    out = {}
    for name in names:
        out[name] = {}
        for root in roots:
            cfg = json.loads((root / name / "cfg.json").read_text())
            ours = cfg.get("sae_harvest") or {}
            path = store_path or ours.get("store")
            if not path:
                raise ValueError(f"{root / name}: its cfg.json records no store; give --store")
            if path not in opened:
                opened[path] = open_store(path)
            store = opened[path]
            trained_on = (ours.get("held_out") or {}).get("creation_id")
            if trained_on != store.attrs.get("creation_id"):
                raise ValueError(f"{root / name} was trained on another store (creation id {trained_on}) than "
                                 f"{path} ({store.attrs.get('creation_id')})")
            site = ours.get("hook_name")
            exclude_pos0 = not (ours.get("training") or {}).get("include_bos", False)   # as train/local.py
            sae = load_sae(str(root / name), device="cpu")
            out[name][str(root)] = {seqs: nmse_on(sae, store, site, seqs, exclude_pos0)
                                    for seqs in ("train", "held_out")}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=None,
                   help="the store the SAEs were trained on (default: each SAE's own, from its cfg.json)")
    p.add_argument("--budgets", nargs="+", required=True,
                   help="budget folders of one run, smallest first (e.g. seed3/epochs128 seed3/epochs256)")
    p.add_argument("--json", default=None, help="write the reports here")
    args = p.parse_args(argv)
    try:
        result = measure(args.store, args.budgets)
    except Exception as e:   # noqa: BLE001  (a bad path or a store that does not read: one line)
        p.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    first = args.budgets[0]
    print(f"{'SAE':<28} {'budget':<12} {'NMSE train':>10} {'held-out':>10} {'gap':>7}  change from {Path(first).name}")
    for name, per in result.items():
        base = per[str(Path(first))]
        for root in args.budgets:
            r = per[str(Path(root))]
            tr, ho = r["train"]["nmse"], r["held_out"]["nmse"]
            change = "" if root == first else \
                f"  train {(tr / base['train']['nmse'] - 1) * 100:+.1f}%, held-out {(ho / base['held_out']['nmse'] - 1) * 100:+.1f}%"
            print(f"{name:<28} {Path(root).name:<12} {tr:>10.5f} {ho:>10.5f} {(ho / tr - 1) * 100:>+6.1f}%{change}")
    if args.json:
        write_json(args.json, {"store": args.store, "budgets": args.budgets, "saes": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
