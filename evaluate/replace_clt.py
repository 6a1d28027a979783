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

from sae_harvest.evaluate.replace_scores import Tally, forward_log_probs, keep_pos0, replacement_row, score_replacements
from sae_harvest.evaluate.splice import EvaluateError, Live
from sae_harvest.stores.urls import scrub


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

    def writer(t: int, live_in: dict, feats: dict, zero: bool):
        def write(a):
            if zero:
                return keep_pos0(torch.zeros_like(a), a, splice_bos)
            for layer in range(t + 1):   # each layer's latents once per forward, from its live input
                if layer not in feats:
                    x = live_in[ins[layer].name]
                    feats[layer] = clt.encode_layer(x.reshape(-1, x.shape[-1]).to(clt.W_enc.dtype), layer)
            y_hat = clt.write_layer(feats, t).view_as(a).to(a.dtype)
            tallies[t].add(y_hat[:, 1:], a[:, 1:], feats[t].view(*a.shape[:-1], -1)[:, 1:])
            return keep_pos0(y_hat, a, splice_bos)
        return write

    def forwards(ids):
        def spliced(zero: bool):
            feats: dict = {}
            with ExitStack() as stack:
                live_in = stack.enter_context(record(model, ins))
                for t, site in enumerate(outs):
                    stack.enter_context(splice(model, site, writer(t, live_in, feats, zero)))
                return forward_log_probs(model, ids)
        return forward_log_probs(model, ids), [spliced]

    (scores,) = score_replacements(live, batch_size, forwards)
    per = {s.name: t.metrics() for s, t in zip(outs, tallies)}
    return {**replacement_row(live, folder.name, scrub(path), f"clt ({clt.cfg.arch})",
                              f"{ins[0].name}..{ins[-1].name} -> {outs[0].name}..{outs[-1].name}", splice_bos, scores),
            "d_sae": clt.cfg.d_sae, "l0": sum(p["l0"] or 0 for p in per.values()),
            "alive": sum(p["alive"] for p in per.values()),
            "nmse": sum(t.err for t in tallies) / max(sum(t.norm2 for t in tallies), 1e-30), "per_layer": per}
