"""Dictionary geometry (`evaluate geometry`): the e2e paper (Braun et al. 2024, "Identifying
Functionally Important Features with End-to-End Sparse Dictionary Learning") sec. 3.3 (fig. 3) and
the g-SAE paper (Olmo et al. 2024, "Features that Make a Difference: Leveraging Gradients for
Improved Dictionary Learning") sec. 4.3-4.4 (fig. 8).

  - within one SAE, each latent's nearest-neighbour decoder cosine, max_{j != i} cos(W_i, W_j): the
    e2e paper's proxy for feature splitting (local SAEs' mean is 0.04 above e2e+ds's, 0.166 above
    e2e's); the g-SAE paper finds g-SAEs' histogram has a higher mean than TopK's;
  - between two SAEs, each latent's max cosine to the other dictionary (e2e fig. 3b/3c: across seeds
    and across training methods at the same site), in both directions;
  - with --store, the CDF of latent activation frequency on the rows of the store's held-out
    sequences (stores/split.py; never trained on) at each SAE's
    site (g-SAE fig. 8: median frequency 0.24% g-SAE, 0.43% TopK, 1.10% e2e at L0 32).
Cosines are signed (the papers' max cosine); dead latents are kept, they make the left spike.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_harvest.evaluate.config import ALLOW_SHARED_INIT_HELP
from sae_harvest.evaluate.results import CrossCosines, GeometryResult, SaeGeometry
from sae_harvest.stores.cli import opt
from sae_harvest.stores.urls import scrub, scrub_tree
from sae_harvest.train.sae import unit_rows
from sae_harvest.train.saelens_format import hook_name_of


@dataclass(frozen=True)
class GeometryConfig:
    saes: tuple[str, ...] = opt((), "SAE checkpoint folder; repeat for several.", cli=False)
    store: str | None = opt(None, "Store whose held-out rows give the latent activation frequencies "
                                  "(at each SAE's site).")
    tokens: int = opt(65536, "Held-out rows read per site for the frequencies (position 0 excluded).")
    bins: int = opt(50, "Histogram bins.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    allow_shared_init: bool = opt(False, ALLOW_SHARED_INIT_HELP)

    def to_dict(self) -> dict:
        return scrub_tree(dataclasses.asdict(self))


def nearest_neighbour_cosines(dec: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """[F] max_{j != i} cos(W_i, W_j), in chunks so a large dictionary never needs F x F memory."""
    u = unit_rows(dec)
    out = []
    for lo in range(0, len(u), chunk):
        cos = u[lo:lo + chunk] @ u.T
        idx = torch.arange(lo, min(lo + chunk, len(u)), device=u.device)
        cos[idx - lo, idx] = -float("inf")
        out.append(cos.max(1).values)
    return torch.cat(out).cpu()


def max_cosines(dec_a: torch.Tensor, dec_b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """[F_a] max_j cos(A_i, B_j)."""
    a, b = unit_rows(dec_a), unit_rows(dec_b)
    return torch.cat([(a[lo:lo + chunk] @ b.T).max(1).values for lo in range(0, len(a), chunk)]).cpu()


def value_range(groups) -> tuple[float, float]:
    """One histogram range for several series of cosines: their min to max, a little padded, within
    [-1, 1]. A fixed [-1, 1] put all the mass of a typical dictionary in 1-3 bins."""
    lo = min(float(v.min()) for v in groups)
    hi = max(float(v.max()) for v in groups)
    pad = 0.02 * (hi - lo) or 0.01
    return max(-1.0, lo - pad), min(1.0, hi + pad)


def distribution(values: torch.Tensor, bins: int, lo: float | None = None, hi: float | None = None) -> dict:
    """Summary and histogram of `values`; the histogram over [lo, hi] (default: value_range)."""
    v = values.double()
    if lo is None or hi is None:
        lo, hi = value_range([v])
    counts, edges = np.histogram(v.numpy(), bins=bins, range=(lo, hi))
    return {"mean": float(v.mean()), "median": float(v.median()), "p10": float(v.quantile(0.1)),
            "p90": float(v.quantile(0.9)), "hist": {"edges": edges.tolist(), "counts": counts.tolist()}}


def activation_frequencies(sae, store, site: str, tokens: int, chunk: int = 16384):
    """(fires [F] / tokens, tokens, selection) on the rows of the store's held-out sequences at the
    site (stores/split.py), position 0 excluded (as in training); gtopk selects with the store's
    gradients when it has them."""
    lo, hi = 0, store.n_rows
    use_grads = sae.uses_grads and store.has_grads
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n, dev = 0, sae.W_dec.device
    for start in range(lo, hi, chunk):
        if n >= tokens:
            break
        sl = slice(start, min(start + chunk, hi))
        keep = (np.asarray(store.rows_pos[sl]) != 0) & store.split.is_held_out(np.asarray(store.rows_seq[sl]))
        rows = (start + np.flatnonzero(keep))[:tokens - n]   # read only the held-out rows' values
        if not len(rows):
            continue
        x = torch.from_numpy(store.acts(site, rows)).to(dev, sae.W_dec.dtype)
        g = torch.from_numpy(store.grads(site, rows)).to(dev, sae.W_dec.dtype) if use_grads else None
        with torch.no_grad():
            fires += (sae.encode(x, g) != 0).sum(0).double().cpu()
        n += len(x)
    selection = ("store gradients" if use_grads else "plain TopK (store has no gradients)") if sae.uses_grads \
        else None
    return fires / max(n, 1), n, selection


def frequency_summary(freq: torch.Tensor, tokens: int) -> dict:
    alive = freq[freq > 0]
    return {"tokens": tokens, "dead": int((freq == 0).sum()),
            "median": float(freq.median()), "median_alive": float(alive.median()) if len(alive) else None,
            "above_1pct": float((freq > 0.01).double().mean()), "above_10pct": float((freq > 0.1).double().mean()),
            "values": [float(f) for f in freq.tolist()]}


def run_geometry(cfg: GeometryConfig, *, progress: bool = False, console=None) -> GeometryResult:
    """`evaluate geometry`'s report (to_dict() is the JSON document); `progress`: a bar over the SAEs."""
    from sae_harvest.evaluate.splice import EvaluateError
    from sae_harvest.stores import open_store
    from sae_harvest.stores.cli import pick_device
    from sae_harvest.stores.progress import token_progress
    from sae_harvest.train.init_streams import first_shared

    if not cfg.saes:
        raise EvaluateError("no SAE given (--sae PATH)")
    if cfg.bins <= 0 or cfg.tokens <= 0:
        raise EvaluateError("--bins and --tokens must be positive")
    shared = None if cfg.allow_shared_init else first_shared(cfg.saes)
    if shared:
        raise EvaluateError(shared)
    dev = pick_device(cfg.device)
    store = open_store(cfg.store) if cfg.store else None
    saes, entries, nn, seen = [], [], [], {}
    with token_progress(console, disable=not progress, unit="SAE", transient=True) as bar:
        task = bar.add_task("geometry", total=len(cfg.saes), info="")
        for path in cfg.saes:
            sae, entry = _one_sae(cfg, path, dev, store, {e["name"] for e in entries}, seen)
            saes.append(sae), entries.append(entry), nn.append(nearest_neighbour_cosines(sae.W_dec))
            bar.advance(task)
    # one histogram range per figure, so that the series of a plot share their bins
    lo, hi = value_range(nn)
    out = [SaeGeometry(**e, nn_cosine=distribution(c, cfg.bins, lo, hi)) for e, c in zip(entries, nn)]
    pairs = [(i, j, max_cosines(a.W_dec, b.W_dec)) for i, a in enumerate(saes) for j, b in enumerate(saes)
             if i != j and a.cfg.d_in == b.cfg.d_in]
    lo, hi = value_range([c for _, _, c in pairs]) if pairs else (-1.0, 1.0)
    cross = [CrossCosines(a=out[i].name, b=out[j].name, **distribution(c, cfg.bins, lo, hi)) for i, j, c in pairs]
    return GeometryResult(config=cfg.to_dict(), saes=out, cross=cross)


def _one_sae(cfg, path, dev, store, taken: set, seen: dict) -> tuple:
    """(the SAE, its SaeGeometry fields but the nearest-neighbour cosines); `taken`: names in use;
    `seen`: the training stores whose split was compared with this one (trained_outside_split)."""
    from sae_harvest.evaluate.eval_tokens import EvaluateError, check_fits_store, trained_outside_split
    from sae_harvest.train.feeds import held_out_origin
    from sae_harvest.train.sae_io import CFG_NAME, load_sae

    sae = load_sae(path, device=dev)
    if sae.cfg.d_sae < 2:
        raise EvaluateError(f"{path}: a dictionary of {sae.cfg.d_sae} latent has no nearest neighbour")
    folder = Path(path).parent if Path(path).is_file() else Path(path)
    saved = json.loads((folder / CFG_NAME).read_text())
    ours = saved.get("sae_harvest") or {}
    name = ours.get("sweep_name") or folder.name
    if name in taken:
        name = str(path)
    entry = {"path": str(path), "name": name, "site": hook_name_of(saved), "arch": sae.cfg.arch,
             "loss": (ours.get("training") or {}).get("loss", "local"), "d_in": sae.cfg.d_in,
             "d_sae": sae.cfg.d_sae}
    if store is not None:
        site = entry["site"]
        check_fits_store(path, sae, site, store, cfg.store, saved)
        freq, n, selection = activation_frequencies(sae, store, site, cfg.tokens)
        if n == 0:
            raise EvaluateError(f"store {cfg.store} has no held-out rows after position 0 at {site}")
        origin = held_out_origin(store, tokens=n)
        # another harvest's held-out sequences are not this one's unless its tokens prove them the same
        # (a sibling store): otherwise this store's held-out rows may be the SAE's training rows
        same_split = bool(trained_outside_split(saved, origin, store, seen))
        if not same_split:
            print(f"warning: {scrub(str(path))} is not proved trained outside the held-out split of {scrub(cfg.store)} "
                  f"(trained on {scrub(str(ours.get('store')))}, creation id "
                  f"{(ours.get('held_out') or {}).get('creation_id')}; this store's is {origin.get('creation_id')}): "
                  f"its frequencies may count its training rows", file=sys.stderr, flush=True)
        entry["frequency"] = {**frequency_summary(freq, n), "selection": selection, "eval_tokens": origin,
                              "trained_outside_split": same_split}
    return sae, entry
