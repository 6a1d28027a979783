"""The replacement model of a cross-layer transcoder (train/clt.py): every MLP output it covers is
replaced, layer by layer, by the CLT's prediction from the live model's own MLP inputs in that same
forward (so errors compound, as in attribution-graph work). Reported: CE, CE increase, KL, loss
recovered against zeroing those MLP outputs, and per layer the NMSE of the prediction against what
the MLP itself outputs from the same live input (positions >= 1); position 0 keeps its clean value
unless --splice-bos."""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch

from sae_harvest.evaluate.splice import Live
from sae_harvest.evaluate.metrics import ce_from_log_probs, kl_per_token, kl_reference, log_probs
from sae_harvest.evaluate.splice import EvaluateError
from sae_harvest.stores.urls import scrub


class Tally:
    """A replacement's running NMSE / L0 / alive-latent sums over positions >= 1."""

    def __init__(self):
        self.err = self.norm2 = self.l0 = 0.0
        self.tokens = 0
        self.fired = None

    def add(self, y_hat, y, feats) -> None:
        self.err += float((y_hat.float() - y.float()).pow(2).sum())
        self.norm2 += float(y.float().pow(2).sum())
        self.l0 += float((feats != 0).sum())
        self.tokens += feats.shape[0] * feats.shape[1]
        fired = (feats != 0).flatten(0, 1).any(0)
        self.fired = fired if self.fired is None else self.fired | fired

    def metrics(self) -> dict:
        nmse = self.err / self.norm2 if self.norm2 else None
        return {"nmse": nmse, "nmse_nobos": nmse,   # over positions >= 1 either way
                "l0": self.l0 / self.tokens if self.tokens else None,
                "alive": int(self.fired.sum()) if self.fired is not None else 0}


def _keep_pos0(new: torch.Tensor, a: torch.Tensor, splice_bos: bool) -> torch.Tensor:
    return new if splice_bos else torch.cat([a[:, :1], new[:, 1:]], 1)


def _sites(path: str, clt, adapter):
    from sae_harvest.harvest.errors import HarvestError
    from sae_harvest.harvest.sites import Site

    d = Path(path)
    d = d.parent if d.is_file() else d
    try:
        ours = json.loads((d / "cfg.json").read_text())["sae_harvest"]
        ins, outs = [Site.parse(str(s)) for s in ours["sites"]], [Site.parse(str(s)) for s in ours["targets"]]
    except (HarvestError, KeyError, TypeError, ValueError) as e:
        raise EvaluateError(f"{path}: CLT sites unreadable ({e})") from None
    for site in ins + outs:
        if not 0 <= site.layer < adapter.n_layers or adapter.site_width(site.kind) != clt.d:
            raise EvaluateError(f"{path}: CLT site {site.name} does not fit this model "
                                f"({adapter.n_layers} layers, width {clt.d})")
    return d, ins, outs


def clt_row(live: Live, path: str, batch_size: int, splice_bos: bool) -> dict:
    from sae_harvest.harvest.sites import record, splice
    from sae_harvest.train.sae_io import load_sae

    clt = load_sae(path, device=live.device)
    folder, ins, outs = _sites(path, clt, live.adapter)
    model, tallies = live.model, [Tally() for _ in outs]
    sums, n_pred = {"clean": 0.0, "ce": 0.0, "kl": 0.0, "zero": 0.0}, 0

    def writer(t: int, live_in: dict, feats: dict, zero: bool):
        def write(a):
            if zero:
                return _keep_pos0(torch.zeros_like(a), a, splice_bos)
            for layer in range(t + 1):   # each layer's latents once per forward, from its live input
                if layer not in feats:
                    x = live_in[ins[layer].name]
                    feats[layer] = clt.encode_layer(x.reshape(-1, x.shape[-1]).to(clt.W_enc.dtype), layer)
            y_hat = clt.write_layer(feats, t).view_as(a).to(a.dtype)
            tallies[t].add(y_hat[:, 1:], a[:, 1:], feats[t].view(*a.shape[:-1], -1)[:, 1:])
            return _keep_pos0(y_hat, a, splice_bos)
        return write

    with torch.no_grad():
        for ids in live.ids.split(batch_size):
            ids = ids.to(live.device)
            clean = log_probs(model(input_ids=ids, use_cache=False).logits)
            for key in ("ce", "zero"):
                feats: dict = {}
                with ExitStack() as stack:
                    live_in = stack.enter_context(record(model, ins))
                    for t, site in enumerate(outs):
                        stack.enter_context(splice(model, site, writer(t, live_in, feats, key == "zero")))
                    logp = log_probs(model(input_ids=ids, use_cache=False).logits)
                add_scores(sums, key, logp, ids, clean)
            sums["clean"] += float(ce_from_log_probs(clean, ids).double().sum())
            n_pred += ids.shape[0] * (ids.shape[1] - 1)
    clean, ce, kl, zero = (sums[k] / n_pred for k in ("clean", "ce", "kl", "zero"))
    per = {s.name: t.metrics() for s, t in zip(outs, tallies)}
    return {"name": folder.name, "sae": scrub(path), "arch": f"clt ({clt.cfg.arch})",
            "site": f"{ins[0].name}..{ins[-1].name} -> {outs[0].name}..{outs[-1].name}", "loss": "local",
            "grad_mode": None, "model": scrub(live.model_name), "tokens": int(live.ids.numel()),
            "splice_bos": splice_bos, "ce_clean": clean, "ce_clean_nobos": None, "ce_spliced": ce,
            "ce_increase": ce - clean, "kl": kl, "ce_zero_ablation": zero,
            "loss_recovered_zero": None if zero == clean else 1 - (ce - clean) / (zero - clean),
            "d_sae": clt.cfg.d_sae, "l0": sum(p["l0"] or 0 for p in per.values()),
            "alive": sum(p["alive"] for p in per.values()),
            "nmse": sum(t.err for t in tallies) / max(sum(t.norm2 for t in tallies), 1e-30), "per_layer": per}


def add_scores(sums: dict, key: str, logp, ids, clean) -> None:
    """Add one spliced forward's summed CE to sums[key] ("ce" or "zero"), and for "ce" its summed
    KL(clean || spliced), over the positions that predict tokens 1..T-1 (crosscoder and CLT rows)."""
    sums[key] += float(ce_from_log_probs(logp, ids).double().sum())
    if key == "ce":
        sums["kl"] += float(kl_per_token(None, logp[:, :-1], ref=kl_reference(clean[:, :-1])).double().sum())
