"""SAE stitching (`evaluate stitch`): Leask, Bussmann et al. 2024, "Sparse autoencoders do not find
canonical units of analysis", sec. 4.

The criterion, paper eq. 6: a latent i of the larger SAE is *novel* if

    max_j  W1_i . W0_j / (||W1_i|| ||W0_j||)  <  theta

over every decoder row W0_j of the smaller SAE; "if the maximum cosine similarity is larger than the
threshold, it is assigned to the reconstruction group". "In our experiments we set the cosine
threshold to 0.7 for the GPT-2 SAEs, and 0.4 for the Gemmascope SAEs": default theta = 0.7.

Stitching, paper eq. 5, with S0 the small SAE's latents kept and S1 the large SAE's latents added:

    x_hat = a b0_dec + (1 - a) b1_dec + sum_{l in S0} W0_l f0_l(x) + sum_{l in S1} W1_l f1_l(x),
    a = |S0| / (|S0| + |S1|),

each SAE encoding x with its own encoder (so the two ends are exactly the two SAEs).

The path (sec. 4.2, fig. 5): start at the small SAE; add the novel latents one by one (L0 rises);
then swap each group of reconstruction latents, a connected component of the bipartite graph that
joins a small and a large latent when their decoder cosine is >= theta: the group's small latents
are removed and its large ones inserted (L0 falls on average). Small latents with no edge at all
are then dropped one by one (the paper does not say what it does with them; without this step the
path would not end at the large SAE). Every step is scored by MSE and L0 on the same tokens; the
CE increase (spliced into the live model) at `ce_points` evenly spaced steps.

Dead latents (`--live-only`): a latent that fires on none of the evaluation tokens has a decoder row
no other latent needs to resemble, so eq. 6 calls it novel although adding it changes nothing but
the bias weight a. With live_only, such latents are left out of both SAEs: each SAE's output on these
tokens is unchanged (the path keeps its ends), and the novel set, the groups, the orphans and a count
live latents only. The dead latents are reported either way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sae_harvest.evaluate.config import ALLOW_SHARED_INIT_HELP, TOKENS_HELP, LiveOptions
from sae_harvest.evaluate.results import SaeRef, StitchResult, StitchSummary
from sae_harvest.evaluate.stitch_path import Columns, Snapshot, ce_steps, path_length, stitch_path  # noqa: F401
from sae_harvest.stores.cli import opt
from sae_harvest.train.sae import unit_rows

THRESHOLD = 0.7   # the paper's value for its GPT-2 SAEs


@dataclass(frozen=True)
class _StitchPair:
    small: str = opt(dataclasses.MISSING, "The smaller SAE's checkpoint folder.")
    large: str = opt(dataclasses.MISSING, "The larger SAE's checkpoint folder (same site).")
    threshold: float = opt(THRESHOLD, "Decoder-cosine threshold theta: novel below it (paper: 0.7 GPT-2, "
                                      "0.4 Gemma Scope).")


@dataclass(frozen=True)
class StitchConfig(LiveOptions, _StitchPair):   # the pair's fields first (see evaluate/config.py)
    tokens: int | None = opt(None, "Evaluation tokens (rounded up to whole sequences). Default: 16384, or all the "
                                   "store's held-out tokens when fewer; more than it holds is refused.")
    ce_points: int = opt(17, "Steps of the path at which the CE increase is measured (spliced forwards; "
                             "always incl. both ends); 0: MSE and L0 only.")
    allow_shared_init: bool = opt(False, ALLOW_SHARED_INIT_HELP)
    live_only: bool = opt(False, "Leave out the latents that fire on none of the evaluation tokens (dead), in both "
                                 "SAEs: the path's ends stay; novel set, groups and bias weight count live ones.")


# --- matching ----------------------------------------------------------------------------------
def match_latents(large_dec: torch.Tensor, small_dec: torch.Tensor, threshold: float, chunk: int = 2048):
    """(max cosine [F1], best small latent [F1], edges [n, 2] of (large, small) with cosine >= theta)."""
    a, b = unit_rows(large_dec), unit_rows(small_dec)
    best, arg, edges = [], [], []
    for lo in range(0, len(a), chunk):
        cos = a[lo:lo + chunk] @ b.T
        m, i = cos.max(1)
        best.append(m), arg.append(i)
        e = (cos >= threshold).nonzero()
        e[:, 0] += lo
        edges.append(e)
    return torch.cat(best).cpu(), torch.cat(arg).cpu(), torch.cat(edges).cpu()


def classify(max_cos: torch.Tensor, threshold: float, keep: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """(novel, reconstruction) indices of the large SAE by eq. 6; `keep` (bool [F1]): only those."""
    keep = torch.ones_like(max_cos, dtype=torch.bool) if keep is None else keep
    novel = ((max_cos < threshold) & keep).nonzero().flatten().tolist()
    recon = ((max_cos >= threshold) & keep).nonzero().flatten().tolist()
    return novel, recon


def swap_groups(edges: torch.Tensor, n_small: int,
                keep: torch.Tensor | None = None) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Connected components of the bipartite graph: ([(small latents, large latents)], orphans),
    groups ordered by their first large latent, orphans = small latents with no edge (of those in
    `keep`, bool [F0], when given)."""
    parent: dict = {}

    def root(v):
        while parent.setdefault(v, v) != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for i, j in edges.tolist():
        ri, rj = root(("L", i)), root(("S", j))
        if ri != rj:
            parent[ri] = rj
    members: dict = {}
    for v in list(parent):
        members.setdefault(root(v), []).append(v)
    groups = [(sorted(i for s, i in vs if s == "S"), sorted(i for s, i in vs if s == "L"))
              for vs in members.values()]
    groups.sort(key=lambda g: g[1][0])
    linked = {j for small, _ in groups for j in small}
    return groups, [j for j in range(n_small) if j not in linked and (keep is None or bool(keep[j]))]


def live_edges(edges: torch.Tensor, live_small: torch.Tensor, live_large: torch.Tensor) -> torch.Tensor:
    """The edges whose two latents are both live."""
    return edges[live_large[edges[:, 0]] & live_small[edges[:, 1]]]


@dataclass
class PairClasses:
    """What eq. 6 makes of a pair on tokens x: the latent classes, groups and orphans, and which
    latents fire on none of the tokens (dead)."""
    columns: tuple            # (Columns(small, x), Columns(large, x))
    dead_small: list[int]
    dead_large: list[int]
    live_small: torch.Tensor  # bool [F0]: the small latents the path starts with
    max_cos: torch.Tensor     # [F1], against the small latents the path uses
    best: torch.Tensor        # [F1] small latent index
    novel: list[int]
    reconstruction: list[int]
    groups: list
    orphans: list[int]


def classify_pair(small, large, x: torch.Tensor, threshold: float, live_only: bool) -> PairClasses:
    """Eq. 6 over all latents, or (live_only) over those that fire on x: a dead small row can make
    no large latent a reconstruction one, a dead large latent is neither novel nor reconstruction."""
    from sae_harvest.evaluate.splice import EvaluateError

    columns = Columns(small, x), Columns(large, x)
    dead_small, dead_large = ((c.fires == 0).nonzero().flatten().tolist() for c in columns)
    live0, live1 = ((c.fires > 0) if live_only else torch.ones_like(c.fires, dtype=torch.bool) for c in columns)
    if not live0.any() or not live1.any():
        raise EvaluateError(f"--live-only: the {'small' if not live0.any() else 'large'} SAE fires on none of "
                            f"the {len(x):,} evaluation tokens")
    ids = live0.nonzero().flatten()
    max_cos, best, edges = match_latents(large.W_dec, small.W_dec[ids], threshold)
    best, edges = ids[best], live_edges(torch.stack([edges[:, 0], ids[edges[:, 1]]], 1), live0, live1)
    novel, recon = classify(max_cos, threshold, live1)
    groups, orphans = swap_groups(edges, small.cfg.d_sae, live0)
    return PairClasses(columns, dead_small, dead_large, live0, max_cos, best, novel, recon, groups, orphans)


def summarise(steps, independent, novel, recon, small_mse, large_mse) -> StitchSummary:
    """The paper's claims, as numbers: do novel latents lower MSE, is the swap phase smooth."""
    by_phase = {p: [s for s in steps if s["phase"] == p] for p in ("novel", "swap", "drop")}

    def lowered(rows):
        prev = {s["step"]: s["mse"] for s in steps}
        return sum(prev[s["step"]] < prev[s["step"] - 1] for s in rows) / len(rows) if rows else None

    end_novel = steps[len(by_phase["novel"])]["mse"]
    end_swap = steps[len(by_phase["novel"]) + len(by_phase["swap"])]["mse"]
    jumps = [(b["mse"] - a["mse"]) for a, b in zip(steps, steps[1:])]
    worst = max(jumps) if jumps else 0.0
    return StitchSummary(
        n_novel=len(novel), n_reconstruction=len(recon),
        n_groups=len(by_phase["swap"]), n_orphans=len(by_phase["drop"]),
        mse_small=small_mse, mse_after_novel=end_novel, mse_after_swaps=end_swap,
        mse_large=large_mse,
        l0_small=steps[0]["l0"], l0_after_novel=steps[len(by_phase["novel"])]["l0"],
        l0_large=steps[-1]["l0"],
        novel_steps_lowering_mse=lowered(by_phase["novel"]),
        swap_steps_lowering_mse=lowered(by_phase["swap"]),
        largest_step_mse_increase=worst,
        largest_step_mse_increase_rel=worst / small_mse if small_mse else None,
        novel_alone_lowering_mse=_frac([independent[i] < 0 for i in novel]),
        reconstruction_alone_raising_mse=_frac([independent[i] > 0 for i in recon]),
    )


def _frac(flags):
    return sum(flags) / len(flags) if flags else None


# --- live model --------------------------------------------------------------------------------
def run_stitch(cfg: StitchConfig, *, progress=True, console=None) -> StitchResult:
    """Classify the large SAE's latents and walk the stitching path; to_dict() is the JSON document."""
    from rich.console import Console

    from sae_harvest.evaluate.live import site_activations
    from sae_harvest.evaluate.splice import EvaluateError, open_live
    from sae_harvest.stores.progress import token_progress
    from sae_harvest.train.init_streams import first_shared

    if not 0 < cfg.threshold <= 1:
        raise EvaluateError(f"--threshold must be in (0, 1], got {cfg.threshold}")
    if cfg.batch_size <= 0 or cfg.ce_points < 0:
        raise EvaluateError("--batch-size must be positive and --ce-points not negative")
    shared = None if cfg.allow_shared_init else first_shared((cfg.small, cfg.large))
    if shared:
        raise EvaluateError(shared)
    live = open_live((cfg.small, cfg.large), cfg, default_tokens=16384)
    small_e, large_e = live.entries
    small, large = small_e.sae, large_e.sae
    if small_e.site != large_e.site:
        raise EvaluateError(f"the SAEs sit at different sites: {small_e.site.name} ({cfg.small}) and "
                            f"{large_e.site.name} ({cfg.large})")
    if small.cfg.d_sae > large.cfg.d_sae:
        raise EvaluateError(f"--small has more latents ({small.cfg.d_sae}) than --large ({large.cfg.d_sae}): "
                            f"swap them")
    site = small_e.site
    x = site_activations(live, site, cfg.batch_size)

    pair = classify_pair(small, large, x, cfg.threshold, cfg.live_only)
    novel, recon, groups, orphans = pair.novel, pair.reconstruction, pair.groups, pair.orphans
    at = ce_steps(novel, groups, orphans, cfg.ce_points)
    steps, snaps, independent = stitch_path(small, large, x, novel, groups, orphans, snapshot_steps=at,
                                            live_small=pair.live_small, columns=pair.columns)
    own = {name: _own_mse(sae, x) for name, sae in (("small", small), ("large", large))}

    if at:
        bar = token_progress(console=console or Console(stderr=True), disable=not progress)
        with torch.no_grad(), bar:
            ce = _path_ce(live, site, small, large, [snaps[k] for k in at], cfg.batch_size, bar)
        for k, (ce_inc, kl) in zip(at, ce["points"]):
            steps[k]["ce_increase"], steps[k]["kl"] = ce_inc, kl
    summary = dataclasses.replace(summarise(steps, independent, novel, recon, own["small"], own["large"]),
                                  n_dead_small=len(pair.dead_small), n_dead_large=len(pair.dead_large))
    if at:
        summary = dataclasses.replace(summary, ce_clean=ce["clean"], ce_increase_small=steps[0]["ce_increase"],
                                      ce_increase_after_novel=steps[len(novel)]["ce_increase"],
                                      ce_increase_large=steps[-1]["ce_increase"])
    return StitchResult(
        config=cfg.to_dict(), model=live.model_name, site=site.name,
        small=SaeRef(path=cfg.small, arch=small.cfg.arch, d_sae=small.cfg.d_sae),
        large=SaeRef(path=cfg.large, arch=large.cfg.arch, d_sae=large.cfg.d_sae),
        tokens=len(x), positions="1 and later (position 0 stays clean)", eval_tokens=live.origin,
        threshold=cfg.threshold,
        novel=novel, reconstruction=recon,
        groups=[{"small": s, "large": l} for s, l in groups], orphans=orphans,
        max_cosine=[round(v, 6) for v in pair.max_cos.tolist()], best_small=pair.best.tolist(),
        alone_delta_mse=independent,
        summary=summary, path=steps, live_only=cfg.live_only, dead_small=pair.dead_small,
        dead_large=pair.dead_large,
    )


def _own_mse(sae, x) -> float:
    """The SAE's own MSE on x, computed directly: the path's ends must equal these."""
    with torch.no_grad():
        err = sum(float((p.double() - sae(p.to(sae.W_dec.dtype)).double()).pow(2).sum()) for p in x.split(4096))
    return err / len(x)


def _path_ce(live, site, small, large, snaps, batch_size, bar) -> dict:
    """CE increase and KL(clean || stitched) of each snapshot spliced at `site`, position 0 clean."""
    from sae_harvest.evaluate.live import reconstruct_after_position0
    from sae_harvest.evaluate.metrics import ce_from_log_probs, kl_per_token, kl_reference, log_probs
    from sae_harvest.harvest.sites import splice

    clean, n = 0.0, 0
    ce, kl = [0.0] * len(snaps), [0.0] * len(snaps)
    task = bar.add_task("stitched CE", total=live.ids.numel(), info=f"{len(snaps)} points")
    for ids in live.ids.split(batch_size):
        ids = ids.to(live.device)
        logp = log_probs(live.model(input_ids=ids, use_cache=False).logits)
        ref = kl_reference(logp[:, :-1])
        clean += float(ce_from_log_probs(logp, ids).double().sum())
        n += ids.shape[0] * (ids.shape[1] - 1)
        for k, snap in enumerate(snaps):
            fn = reconstruct_after_position0(lambda a, s=snap: s.reconstruct(small, large, a))
            with splice(live.model, site, fn):
                logp_s = log_probs(live.model(input_ids=ids, use_cache=False).logits)
            ce[k] += float(ce_from_log_probs(logp_s, ids).double().sum())
            kl[k] += float(kl_per_token(None, logp_s[:, :-1], ref=ref).double().sum())
        bar.update(task, advance=ids.numel())
    return {"clean": clean / n, "points": [(c / n - clean / n, k / n) for c, k in zip(ce, kl)]}
