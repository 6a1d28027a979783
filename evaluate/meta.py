"""Meta-SAE report (`evaluate meta`): meta-SAE paper sec. 5 (Leask, Bussmann et al. 2024, "Sparse
autoencoders do not find canonical units of analysis").

A meta-SAE is a BatchTopK SAE trained on the decoder rows of another SAE (`train fit --decoder-of`),
each row divided by its norm (train/local.py: a saved SAE has its input scale folded into W_dec, and
meta-SAEs see directions only). The paper's meta-SAE has ~4 active meta-latents per SAE latent and
"explains 55.47% of the variance of the decoder directions". Reported here:
  - meta-L0: mean number of active meta-latents per SAE latent (the meta-SAE at inference: BatchTopK's
    threshold, independent of the batch);
  - explained variance of the unit rows U: 1 - sum ||U - U_hat||^2 / sum ||U - mean(U)||^2;
  - for sample latents, their decomposition (active meta-latents and values, largest first), for each
    meta-latent how many SAE latents use it and the ones using it most, and the latents sharing the
    most meta-latents with the sample.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_harvest.evaluate.config import ALLOW_SHARED_INIT_HELP
from sae_harvest.evaluate.results import LatentDecomposition, MetaResult, MetaSaeRef, SaeRef
from sae_harvest.stores.cli import opt
from sae_harvest.stores.urls import scrub_tree
from sae_harvest.train.sae import unit_rows   # the meta-SAE's training data (train/local.py)


@dataclass(frozen=True)
class MetaConfig:
    sae: str = opt(dataclasses.MISSING, "The SAE whose decoder rows the meta-SAE was trained on.")
    meta: str = opt(dataclasses.MISSING, "The meta-SAE checkpoint (from `train fit --decoder-of`).")
    latents: tuple[int, ...] | None = opt(None, "SAE latents to decompose (comma list); default: random ones.")
    samples: int = opt(8, "How many random latents to decompose when --latents is not given.")
    neighbours: int = opt(5, "Latents listed per meta-latent, and sharing latents per sample.")
    seed: int = opt(0, "Seed of the random sample of latents.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    allow_shared_init: bool = opt(False, ALLOW_SHARED_INIT_HELP)

    def to_dict(self) -> dict:
        return scrub_tree(dataclasses.asdict(self))


@dataclass(frozen=True)
class Decomposition:
    """Every SAE latent through the meta-SAE (decompose), what describe() reads, and the summary numbers."""
    rows: torch.Tensor     # [F, d] the SAE's unit decoder rows (the meta-SAE's training data)
    feats: torch.Tensor    # [F, M] meta-latent values of each row
    recon: torch.Tensor    # [F, d] the meta-SAE's reconstruction of each row
    active: torch.Tensor   # [F, M] bool, feats != 0
    meta_l0: float
    explained_variance: float | None
    mean_cosine: float
    latents_without_meta: int
    alive_meta_latents: int


def decompose(sae, meta) -> Decomposition:
    """Meta-latents of every SAE latent, and the summary numbers."""
    rows = unit_rows(sae.W_dec).to(meta.W_dec.dtype)
    with torch.no_grad():
        feats = torch.cat([meta.encode(p) for p in rows.split(4096)])
        recon = meta.decode(feats)
    err = (rows - recon).double().pow(2).sum()
    var = (rows - rows.mean(0)).double().pow(2).sum()
    active = feats != 0
    return Decomposition(
        rows=rows, feats=feats, recon=recon, active=active,
        meta_l0=float(active.sum(-1).double().mean()),
        explained_variance=float(1 - err / var) if var > 0 else None,
        mean_cosine=float(torch.nn.functional.cosine_similarity(rows, recon, dim=-1).mean()),
        latents_without_meta=int((active.sum(-1) == 0).sum()),
        alive_meta_latents=int(active.any(0).sum()),
    )


def describe(dec: Decomposition, latent: int, neighbours: int) -> LatentDecomposition:
    """One SAE latent: its meta-latents (largest first), each with its users, and the latents that
    share the most meta-latents with it (ties: higher decoder cosine first)."""
    feats, active, rows = dec.feats, dec.active, dec.rows
    vals = feats[latent]
    order = [int(m) for m in vals.nonzero().flatten().tolist()]
    order.sort(key=lambda m: -float(vals[m]))
    parts = []
    for m in order:
        users = feats[:, m].clone()
        users[latent] = 0
        top = users.topk(min(neighbours, int((users != 0).sum()))).indices.tolist()
        parts.append({"meta_latent": m, "value": float(vals[m]), "used_by": int(active[:, m].sum()),
                      "top_users": [{"latent": j, "value": float(feats[j, m])} for j in top]})
    shared = active.float() @ active[latent].float()
    shared[latent] = 0
    cos = rows @ rows[latent]
    candidates = (shared > 0).nonzero().flatten().tolist()
    candidates.sort(key=lambda j: (-float(shared[j]), -float(cos[j])))
    sharing = [{"latent": j, "shared": [m for m in order if active[j, m]], "cosine": float(cos[j])}
               for j in candidates[:neighbours]]
    cos_self = float(torch.nn.functional.cosine_similarity(rows[latent], dec.recon[latent], dim=0))
    return LatentDecomposition(latent=latent, meta_l0=len(order), reconstruction_cosine=cos_self,
                               decomposition=parts, sharing=sharing)


def run_meta(cfg: MetaConfig) -> MetaResult:
    """`evaluate meta`'s report; to_dict() is the JSON document."""
    from sae_harvest.evaluate.splice import EvaluateError
    from sae_harvest.stores.cli import pick_device
    from sae_harvest.train.init_streams import first_shared
    from sae_harvest.train.sae_io import CFG_NAME, load_sae

    if cfg.samples < 0 or cfg.neighbours < 0:
        raise EvaluateError("--samples and --neighbours must not be negative")
    shared = None if cfg.allow_shared_init else first_shared((cfg.sae, cfg.meta))
    if shared:
        raise EvaluateError(shared)
    dev = pick_device(cfg.device)
    sae, meta = load_sae(cfg.sae, device=dev), load_sae(cfg.meta, device=dev)
    meta_cfg = json.loads((_folder(cfg.meta) / CFG_NAME).read_text())
    trained_on = (meta_cfg.get("sae_harvest") or {}).get("decoder_of")
    if not str(meta_cfg.get("hook_name", "")).startswith("meta:"):
        raise EvaluateError(f"{cfg.meta} is not a meta-SAE (hook_name {meta_cfg.get('hook_name')!r}); "
                            f"train one with `train fit --decoder-of {cfg.sae}`")
    if meta.cfg.d_in != sae.cfg.d_in:
        raise EvaluateError(f"meta-SAE d_in {meta.cfg.d_in} != the SAE's d_in {sae.cfg.d_in}: "
                            f"{cfg.meta} was not trained on {cfg.sae}'s decoder")
    n = sae.cfg.d_sae
    if cfg.latents is not None:
        bad = [i for i in cfg.latents if not 0 <= i < n]
        if bad:
            raise EvaluateError(f"--latents {bad} out of range: the SAE has latents 0-{n - 1}")
        latents = list(cfg.latents)
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        latents = sorted(torch.randperm(n, generator=g)[:cfg.samples].tolist())
    dec = decompose(sae, meta)
    usage = dec.active.sum(0)
    return MetaResult(
        config=cfg.to_dict(),
        sae=SaeRef(path=cfg.sae, arch=sae.cfg.arch, d_sae=n, d_in=sae.cfg.d_in),
        meta=MetaSaeRef(path=cfg.meta, arch=meta.cfg.arch, d_sae=meta.cfg.d_sae, k=getattr(meta.cfg, "k", 0),
                        trained_on=trained_on, trained_on_this_sae=_same(trained_on, cfg.sae)),
        # no tokens: the meta-SAE decomposes decoder rows (and is scored on all of them, as it trained)
        eval_tokens={"source": "decoder rows", "held_out": None, "tokens": 0},
        meta_l0=dec.meta_l0, explained_variance=dec.explained_variance,
        mean_cosine=dec.mean_cosine, latents_without_meta=dec.latents_without_meta,
        alive_meta_latents=dec.alive_meta_latents,
        meta_latent_usage=usage.tolist(),
        samples=[describe(dec, i, cfg.neighbours) for i in latents],
    )


def _folder(path) -> Path:
    p = Path(path)
    return p.parent if p.is_file() else p


def _same(a, b) -> bool | None:
    if a is None:
        return None
    return _folder(a).resolve() == _folder(b).resolve()
