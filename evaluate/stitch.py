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
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sae_harvest.evaluate.config import ALLOW_SHARED_INIT_HELP, TOKENS_HELP, LiveOptions
from sae_harvest.evaluate.results import SaeRef, StitchResult, StitchSummary
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


def classify(max_cos: torch.Tensor, threshold: float) -> tuple[list[int], list[int]]:
    """(novel, reconstruction) indices of the large SAE by eq. 6."""
    novel = (max_cos < threshold).nonzero().flatten().tolist()
    recon = (max_cos >= threshold).nonzero().flatten().tolist()
    return novel, recon


def swap_groups(edges: torch.Tensor, n_small: int) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Connected components of the bipartite graph: ([(small latents, large latents)], orphans),
    groups ordered by their first large latent, orphans = small latents with no edge."""
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
    return groups, [j for j in range(n_small) if j not in linked]


# --- the path ----------------------------------------------------------------------------------
class Columns:
    """The latents of an SAE on tokens x, stored per latent (CSR): the tokens it fires on and its
    values, so adding or removing one latent touches only those tokens."""

    def __init__(self, sae, x: torch.Tensor):
        chunk = max(256, (1 << 22) // sae.cfg.d_sae)   # dense latents of one chunk: ~16 MB
        toks, lats, vals = [], [], []
        with torch.no_grad():
            for lo in range(0, len(x), chunk):
                f = sae.encode(x[lo:lo + chunk].to(sae.W_dec.dtype))
                nz = f.nonzero()
                toks.append(nz[:, 0] + lo), lats.append(nz[:, 1]), vals.append(f[nz[:, 0], nz[:, 1]])
        lat = torch.cat(lats)
        order = torch.sort(lat, stable=True).indices
        self.tok = torch.cat(toks)[order]
        self.val = torch.cat(vals)[order].double()
        counts = torch.bincount(lat, minlength=sae.cfg.d_sae)
        self.fires = counts.cpu()
        self.ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
        self.dec = sae.W_dec.detach().double()
        self.b_dec = sae.b_dec.detach().double()

    def delta(self, i: int):
        """(tokens, contribution [n, d]) of latent i."""
        lo, hi = self.ptr[i], self.ptr[i + 1]
        return self.tok[lo:hi], self.val[lo:hi, None] * self.dec[i]


class Residual:
    """x - x_hat without the bias term (r) and its running sums, so that the squared error for any
    bias c, sum_t ||r_t - c||^2 = q - 2 c.s + n ||c||^2, costs O(d) and a latent O(its tokens x d)."""

    def __init__(self, x: torch.Tensor, decoded: torch.Tensor):
        self.r = x.double() - decoded.double()
        self.q = self.r.pow(2).sum()
        self.s = self.r.sum(0)
        self.n = len(x)

    def error(self, c: torch.Tensor, dq=0.0, ds=0.0) -> float:
        q, s = self.q + dq, self.s + ds
        return float(q - 2 * (c @ s) + self.n * (c @ c))

    def change(self, tok, contribution, sign: float):
        """(dq, ds, new rows) if `sign` * contribution is added to x_hat on tokens `tok`."""
        old = self.r[tok]
        new = old - sign * contribution
        return new.pow(2).sum() - old.pow(2).sum(), -sign * contribution.sum(0), new

    def apply(self, tok, contribution, sign: float) -> None:
        dq, ds, new = self.change(tok, contribution, sign)
        self.q, self.s = self.q + dq, self.s + ds
        self.r[tok] = new


@dataclass
class Snapshot:
    """Which latents of each SAE a point of the path uses; reconstruct() is eq. 5."""
    small: torch.Tensor   # bool [F0]
    large: torch.Tensor   # bool [F1]

    def reconstruct(self, small_sae, large_sae, x: torch.Tensor) -> torch.Tensor:
        n0, n1 = int(self.small.sum()), int(self.large.sum())
        alpha = n0 / (n0 + n1)
        x = x.to(small_sae.W_dec.dtype)
        f0 = small_sae.encode(x) * self.small.to(x.device)
        f1 = large_sae.encode(x) * self.large.to(x.device)
        return f0 @ small_sae.W_dec + f1 @ large_sae.W_dec + alpha * small_sae.b_dec + (1 - alpha) * large_sae.b_dec


def stitch_path(small, large, x: torch.Tensor, novel, groups, orphans, snapshot_steps=()):
    """Walk the path on tokens x [n, d]; ([one dict per step], {step: Snapshot}, independent dMSE).

    "mse" is the squared error summed over d, mean over tokens (the training loss's term); the
    independent dMSE of a large latent is the MSE change when it alone is added to the small SAE
    (the paper's fig. 4)."""
    c0, c1 = Columns(small, x), Columns(large, x)
    n, f0, f1 = len(x), small.cfg.d_sae, large.cfg.d_sae
    with torch.no_grad():
        decoded = torch.cat([small.decode(small.encode(p.to(small.W_dec.dtype))) - small.b_dec
                             for p in x.split(4096)])
    res = Residual(x, decoded)
    norm2 = float(x.double().pow(2).sum())
    in0, in1 = torch.ones(f0, dtype=torch.bool), torch.zeros(f1, dtype=torch.bool)
    fires0, fires1 = c0.fires.double(), c1.fires.double()

    def bias(k0, k1):
        a = k0 / (k0 + k1)
        return a * c0.b_dec + (1 - a) * c1.b_dec

    start_err = res.error(bias(f0, 0))
    independent = []
    for i in range(f1):
        tok, contrib = c1.delta(i)
        dq, ds, _ = res.change(tok, contrib, +1)
        independent.append((res.error(bias(f0, 1), dq, ds) - start_err) / n)

    steps, snaps = [], {}
    snapshot_steps = set(snapshot_steps)

    def record(phase, added, removed):
        k0, k1 = int(in0.sum()), int(in1.sum())
        err = res.error(bias(k0, k1))
        steps.append({"step": len(steps), "phase": phase, "added": added, "removed": removed,
                      "n_small": k0, "n_large": k1, "latents": k0 + k1,
                      "l0": float(fires0[in0].sum() + fires1[in1].sum()) / n,
                      "mse": err / n, "nmse": err / norm2 if norm2 else None,
                      "ce_increase": None, "kl": None})
        if steps[-1]["step"] in snapshot_steps:
            snaps[steps[-1]["step"]] = Snapshot(in0.clone(), in1.clone())

    def add(i):
        res.apply(*c1.delta(i), +1)
        in1[i] = True

    def remove(j):
        res.apply(*c0.delta(j), -1)
        in0[j] = False

    record("start", [], [])
    for i in novel:
        add(i)
        record("novel", [i], [])
    for small_ids, large_ids in groups:
        for j in small_ids:
            remove(j)
        for i in large_ids:
            add(i)
        record("swap", large_ids, small_ids)
    for j in orphans:
        remove(j)
        record("drop", [], [j])
    return steps, snaps, independent


def path_length(novel, groups, orphans) -> int:
    return 1 + len(novel) + len(groups) + len(orphans)


def ce_steps(novel, groups, orphans, points: int) -> list[int]:
    """`points` evenly spaced steps, always with both ends and the end of the novel phase."""
    last = path_length(novel, groups, orphans) - 1
    if points <= 0:
        return []
    picked = {0, last, len(novel)}
    if points > 1:
        picked |= {round(k * last / (points - 1)) for k in range(points)}
    return sorted(picked)


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

    max_cos, best, edges = match_latents(large.W_dec, small.W_dec, cfg.threshold)
    novel, recon = classify(max_cos, cfg.threshold)
    groups, orphans = swap_groups(edges, small.cfg.d_sae)
    at = ce_steps(novel, groups, orphans, cfg.ce_points)
    steps, snaps, independent = stitch_path(small, large, x, novel, groups, orphans, snapshot_steps=at)
    own = {name: _own_mse(sae, x) for name, sae in (("small", small), ("large", large))}

    if at:
        bar = token_progress(console=console or Console(stderr=True), disable=not progress)
        with torch.no_grad(), bar:
            ce = _path_ce(live, site, small, large, [snaps[k] for k in at], cfg.batch_size, bar)
        for k, (ce_inc, kl) in zip(at, ce["points"]):
            steps[k]["ce_increase"], steps[k]["kl"] = ce_inc, kl
    summary = summarise(steps, independent, novel, recon, own["small"], own["large"])
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
        max_cosine=[round(v, 6) for v in max_cos.tolist()], best_small=best.tolist(),
        alone_delta_mse=independent,
        summary=summary, path=steps,
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
