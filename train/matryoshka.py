"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; SAELens and dictionary_learning).

The dictionary is cut into nested prefixes m_1 < m_2 < ... < m_P = d_sae (cfg.prefixes). Latents are
chosen once, by BatchTopK over the whole dictionary (train/batchtopk.py), and every prefix must
reconstruct the input on its own:
    x_hat_p = f[:, :m_p] @ W_dec[:m_p] + b_dec
    loss = sum_p mean_n ||x - x_hat_p||^2 + aux_coeff * AuxK(x - x_hat_P)
so the first latents learn the general features and later ones refine them. Terms: "mse" is the
full dictionary's reconstruction (comparable with the other architectures), "aux" holds the other
prefixes' reconstruction losses ("prefix_mse") plus the AuxK term ("auxk").
Inference is BatchTopK's: JumpReLU with the tracked threshold, saved as SAELens `jumprelu`.
`--loss e2e` trains the full dictionary through the model (the nested prefixes are a local objective:
each prefix would need its own spliced forward); start it from a local SAE with --init.
"""
from __future__ import annotations

from dataclasses import dataclass

from sae_harvest.train.batchtopk import BatchTopKConfig, BatchTopKSAE
from sae_harvest.train.distributed import LOCAL, Reducer
from sae_harvest.train.sae import LossOutput, recon_loss
from sae_harvest.train.sae_config import hyper
from sae_harvest.train.topk import auxk_loss

DEFAULT_PREFIX_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)   # then the full dictionary


def prefix_sizes(d_sae: int, prefixes: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The nested dictionary sizes, ascending, ending at d_sae (appended when missing);
    () means d_sae/16, /8, /4, /2, d_sae."""
    if prefixes:
        sizes = list(prefixes)
    else:
        sizes = sorted({int(d_sae * f) for f in DEFAULT_PREFIX_FRACTIONS} - {0})
    if not sizes or sizes[-1] != d_sae:
        sizes.append(d_sae)
    return tuple(sizes)


@dataclass(frozen=True)
class MatryoshkaConfig(BatchTopKConfig):
    prefixes: tuple[int, ...] = hyper((), "Nested dictionary sizes, e.g. 256,1024,4096 (default d_sae/16,/8,/4,/2; "
                                          "d_sae is always last).")

    def check(self):
        object.__setattr__(self, "prefixes", tuple(int(m) for m in self.prefixes))   # JSON gives a list
        super().check()
        p = self.prefixes
        if p and (any(m <= 0 or m > self.d_sae for m in p) or any(a >= b for a, b in zip(p, p[1:]))):
            raise ValueError(f"matryoshka prefixes must be increasing sizes in 1..d_sae={self.d_sae}, got {p}")


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    arch = "matryoshka_batchtopk"
    saelens_architecture = "jumprelu"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.prefix_sizes = prefix_sizes(cfg.d_sae, tuple(cfg.prefixes))

    def loss(self, x, grad=None, dead_mask=None, reducer: Reducer = LOCAL) -> LossOutput:
        pre, feats, values_at = self.training_latents(x, reducer)   # one selection over the whole dictionary
        if self.training:
            self.update_threshold(feats, reducer)
        x_hat, start, mses = self.b_dec, 0, []
        for end in self.prefix_sizes:   # each prefix adds its block of latents to the previous one
            x_hat = x_hat + feats[:, start:end] @ self.W_dec[start:end]
            mses.append(recon_loss(x, x_hat))
            start = end
        mse, prefix_mse = mses[-1], sum(mses[:-1], x.new_zeros(()))
        auxk = self.cfg.aux_coeff * auxk_loss(self, pre, (x - x_hat).detach(), dead_mask, values_at, reducer)
        terms = {"mse": mse, "aux": prefix_mse + auxk, "prefix_mse": prefix_mse, "auxk": auxk,
                 "l0": (feats > 0).float().sum(-1).mean()}
        return LossOutput(mse + prefix_mse + auxk, {n: t.detach() for n, t in terms.items()}, feats, x_hat)

    def saelens_fields(self):
        return {**super().saelens_fields(), "matryoshka_widths": list(self.prefix_sizes)}
