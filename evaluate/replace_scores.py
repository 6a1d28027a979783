"""What every replacement evaluation (evaluate/replace.py's transcoders, crosscoders and joint rows,
evaluate/replace_clt.py's CLTs) scores the same way: the CE / KL / zero-ablation loop over the
evaluation tokens, the running NMSE / L0 of each replacement, and the head of its result row."""
from __future__ import annotations

from typing import Callable

import torch

from sae_harvest.evaluate.metrics import ce_from_log_probs, kl_per_token, kl_reference, log_probs
from sae_harvest.evaluate.splice import Live
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


def keep_pos0(new: torch.Tensor, a: torch.Tensor, splice_bos: bool) -> torch.Tensor:
    return new if splice_bos else torch.cat([a[:, :1], new[:, 1:]], 1)


def forward_log_probs(model, ids) -> torch.Tensor:
    return log_probs(model(input_ids=ids, use_cache=False).logits)


Spliced = Callable[[bool], torch.Tensor]   # zero -> log-probs of one spliced (zero: zero-ablated) forward


def score_replacements(live: Live, batch_size: int,
                       forwards: Callable[[torch.Tensor], tuple[torch.Tensor, list[Spliced]]]) -> list[dict]:
    """Mean CE clean / spliced / zero-ablated, KL(clean || spliced) and loss recovered over the
    positions predicting tokens 1..T-1 of live.ids. forwards(ids) runs the clean forward and returns
    its log-probs and one function per replacement (the same number every batch): spliced(False) is
    the forward with it spliced in, spliced(True) the one with its written sites zeroed instead."""
    sums, ce_clean, n_pred = None, 0.0, 0
    with torch.no_grad():
        for ids in live.ids.split(batch_size):
            ids = ids.to(live.device)
            clean, spliced = forwards(ids)
            ref = kl_reference(clean[:, :-1])   # once per batch, shared by every replacement
            sums = sums or [{"ce": 0.0, "kl": 0.0, "zero": 0.0} for _ in spliced]
            for s, forward in zip(sums, spliced):
                logp = forward(False)
                s["ce"] += float(ce_from_log_probs(logp, ids).double().sum())
                s["kl"] += float(kl_per_token(None, logp[:, :-1], ref=ref).double().sum())
                s["zero"] += float(ce_from_log_probs(forward(True), ids).double().sum())
            ce_clean += float(ce_from_log_probs(clean, ids).double().sum())
            n_pred += ids.shape[0] * (ids.shape[1] - 1)
    clean = ce_clean / n_pred
    scores = []
    for s in sums:
        ce, kl, zero = (s[k] / n_pred for k in ("ce", "kl", "zero"))
        scores.append({"ce_clean": clean, "ce_clean_nobos": None, "ce_spliced": ce, "ce_increase": ce - clean,
                       "kl": kl, "ce_zero_ablation": zero,
                       "loss_recovered_zero": None if zero == clean else 1 - (ce - clean) / (zero - clean)})
    return scores


def replacement_row(live: Live, name: str, sae, arch: str, site: str, splice_bos: bool, scores: dict) -> dict:
    """A replacement's result row up to its own keys (d_sae, l0, alive, nmse, ...): `sae` its
    scrubbed path (a list for a joint row), `scores` from score_replacements."""
    return {"name": name, "sae": sae, "arch": arch, "site": site, "loss": "local", "grad_mode": None,
            "model": scrub(live.model_name), "tokens": int(live.ids.numel()), "splice_bos": splice_bos, **scores}
