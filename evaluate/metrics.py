"""Per-token metric pieces and the running sums they are accumulated into.

Every metric is a ratio of sums over tokens, so each batch only adds per-token quantities to a
`Sums`; `Sums` keeps two views at once: all positions, and positions >= 1 ("nobos"), because
position 0 (BOS) has a huge norm in GPT-2 and would dominate reconstruction errors.
Sums stay tensors on the compute device (float64) so a GPU run never syncs per batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Log-probabilities are floored here before differences are taken: exp(-1e4) is 0 in float32,
# so the floor never changes a finite KL, but it turns -inf - -inf (NaN) into 0.
_LOGP_FLOOR = -1e4


def log_probs(logits: Tensor) -> Tensor:
    """float32 log-softmax over the vocabulary (bf16/fp16 logits are upcast first)."""
    return F.log_softmax(logits.float(), dim=-1)


def kl_reference(logp_ref: Tensor) -> tuple[Tensor, Tensor]:
    """The clean side of KL(ref || new), computed once per batch and shared by every SAE."""
    return logp_ref.exp(), logp_ref.clamp_min(_LOGP_FLOOR)


def kl_per_token(logp_ref: Tensor, logp_new: Tensor, ref: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """KL(ref || new) = sum_v p_ref (log p_ref - log p_new) for each position, never NaN/inf.

    Both arguments are log-probabilities [..., V]; `ref` = kl_reference(logp_ref) when it is
    already at hand. Where p_ref is exactly 0 the term is 0 whatever log p_new is; the floor keeps
    0 * (-inf) from appearing.
    """
    p_ref, logp_ref_floored = ref if ref is not None else kl_reference(logp_ref)
    diff = logp_ref_floored - logp_new.clamp_min(_LOGP_FLOOR)
    # Rounding can make an exactly-zero KL come out as -1e-9; KL is never negative.
    return (p_ref * diff).sum(-1).clamp_min(0.0)


def ce_from_log_probs(logp: Tensor, ids: Tensor) -> Tensor:
    """Next-token CE in nats [B, T-1] from log_probs(logits) [B, T, V]: position t predicts token t+1."""
    return -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)


class Sums:
    """Running sums of per-token quantities q [B, T'] and their token counts, in two views."""

    def __init__(self):
        self.sum: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}
        self.fired: dict[str, Tensor] = {}   # "" / "_nobos" -> bool [d_sae]: latent ever active

    def add(self, name: str, per_token: Tensor, nobos: Tensor | None = None) -> None:
        """Add q [B, T'] to both views; `nobos`, if given, is used instead of q for the nobos
        view (explained variance there is measured around the mean over positions >= 1)."""
        q = per_token.double()
        q_nobos = q if nobos is None else nobos.double()
        for key, part in ((name, q), (name + "_nobos", q_nobos[:, 1:])):
            self.sum[key] = self.sum.get(key, 0) + part.sum()
            self.count[key] = self.count.get(key, 0) + part.numel()

    def add_fired(self, feats: Tensor) -> None:
        """feats [B, T, d_sae]: remember which latents were nonzero on some token."""
        active = feats != 0
        for key, part in (("", active), ("_nobos", active[:, 1:])):
            now = part.flatten(0, 1).any(0)
            self.fired[key] = now if key not in self.fired else self.fired[key] | now

    def mean(self, name: str) -> float | None:
        """Mean of a quantity over the tokens it was added for; None if there were none."""
        if not self.count.get(name):
            return None
        return float(self.sum[name]) / self.count[name]

    def total(self, name: str) -> float:
        return float(self.sum[name])


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None (JSON null) when undefined: e.g. 0/0 for an all-zero reconstruction."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def reconstruction_terms(x: Tensor, x_hat: Tensor, mean: Tensor, mean_nobos: Tensor) -> dict[str, Tensor]:
    """Per-token pieces of the reconstruction metrics, float32, each [B, T].

    x, x_hat [B, T, d]. `mean` is the site's mean activation over the evaluated tokens, used for
    explained variance; the nobos view measures variance around the mean over positions >= 1
    instead ("var_nobos", to be passed as Sums.add(..., nobos=)).
    """
    x, x_hat = x.float(), x_hat.float()
    x_norm = x.norm(dim=-1)
    return {
        "err": (x - x_hat).pow(2).sum(-1),
        "norm2": x.pow(2).sum(-1),
        "var": (x - mean.float()).pow(2).sum(-1),
        "var_nobos": (x - mean_nobos.float()).pow(2).sum(-1),
        "cos": F.cosine_similarity(x, x_hat, dim=-1, eps=1e-8),
        "l2_ratio": x_hat.norm(dim=-1) / x_norm.clamp_min(1e-12),
        "hat_norm2": x_hat.pow(2).sum(-1),
        "hat_dot_x": (x_hat * x).sum(-1),
    }


def normalize_without_affine(norm, x: Tensor) -> Tensor:
    """The model's final norm without its learned affine part, as the e2e paper normalises downstream
    activations (its fig. 12): LayerNorm -> (x - mean) / sqrt(var + eps); RMSNorm (Gemma, whose
    weight enters as 1 + w) -> x / sqrt(mean(x^2) + eps). eps is the module's own."""
    x32 = x.float()
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = getattr(norm, "variance_epsilon", 1e-6)
    if isinstance(norm, nn.LayerNorm) or hasattr(norm, "bias") and getattr(norm, "bias") is not None:
        return F.layer_norm(x32, x32.shape[-1:], eps=eps)
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def mse_per_token(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the width of the squared difference, float32, [B, T]."""
    return (a.float() - b.float()).pow(2).mean(-1)


def result_metrics(sae: Sums, site: Sums, clean: Sums, downstream: list[str]) -> dict:
    """Every metric of one SAE from its sums, its site's ablation sums and the clean-run sums.
    Keys without a suffix use all positions; keys ending in _nobos exclude position 0."""
    out: dict = {}
    for v in ("", "_nobos"):
        ce_clean, ce_spliced = clean.mean("ce" + v), sae.mean("ce" + v)
        ce_zero, ce_mean = site.mean("ce_zero" + v), site.mean("ce_mean" + v)
        increase = ce_spliced - ce_clean
        out.update({
            "ce_clean" + v: ce_clean, "ce_spliced" + v: ce_spliced, "ce_increase" + v: increase,
            "ce_zero_ablation" + v: ce_zero, "ce_mean_ablation" + v: ce_mean,
            "loss_recovered_zero" + v: _recovered(increase, ce_zero - ce_clean),
            "loss_recovered_mean" + v: _recovered(increase, ce_mean - ce_clean),
            "kl" + v: sae.mean("kl" + v), "kl_zero_ablation" + v: site.mean("kl_zero" + v),
            "kl_mean_ablation" + v: site.mean("kl_mean" + v),
            "predicted_tokens" + v: clean.count["ce" + v],
        })
        for key, tag in (("downstream_mse", "ds:"), ("downstream_mse_ln", "dsln:")):
            by_layer = {name: sae.mean(tag + name + v) for name in downstream}
            out[key + v] = sum(by_layer.values()) / len(by_layer) if by_layer else None
            out[key + "_by_layer" + v] = by_layer
        err = sae.total("err" + v)
        out.update({
            "l0" + v: sae.mean("l0" + v),
            "alive" + v: int(sae.fired[v].sum()),
            "alive_tokens" + v: sae.count["l0" + v],
            "nmse" + v: ratio(err, sae.total("norm2" + v)),
            "explained_variance" + v: _one_minus(ratio(err, sae.total("var" + v))),
            "cosine" + v: sae.mean("cos" + v),
            "l2_ratio" + v: sae.mean("l2_ratio" + v),
            "relative_reconstruction_bias" + v: ratio(sae.total("hat_norm2" + v),
                                                      sae.total("hat_dot_x" + v)),
        })
    return out


def _recovered(increase: float, ablation_increase: float) -> float | None:
    # 1 - (ce_spliced - ce_clean) / (ce_ablated - ce_clean); undefined if ablation costs nothing.
    return _one_minus(ratio(increase, ablation_increase))


def _one_minus(value: float | None) -> float | None:
    return None if value is None else 1.0 - value
