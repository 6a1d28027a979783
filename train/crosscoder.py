"""Crosscoders: one latent space over several sites of equal width (e.g. blocks.[2-6].resid_post).

    f     = sparse(sum_s x_s @ W_enc,s + b_enc)          one encoder per site, summed before the activation
    x_s^  = f @ W_dec,s + b_dec,s                         one decoder per site
    loss  = sum_s mean_n ||x_s - x_s^||^2 + sparsity

Anthropic's crosscoder note ("Sparse Crosscoders for Cross-Layer Features and Model Diffing",
2024) for the architecture. Stored as an SAE on the sites' concatenation x = [x_1 ... x_S]:
W_enc [S*d, F] stacks the per-site encoders, so x @ W_enc is exactly the sum of the per-site
contributions; W_dec [F, S*d] and b_dec [S*d] hold the per-site decoders side by side.
Sparsity (CROSSCODER_ARCHS):
  relu:       (lambda / d_in) * mean_n sum_i f_i * sum_s ||W_dec,s,i||  (the note's decoder-norm-weighted
              L1; decoders are not renormalised, the penalty carries their norms)
  topk, batchtopk: on the summed pre-activation, AuxK as for SAEs; the joint decoder row has unit norm.
Each site keeps its own input scale (E||x_s / s_s|| = sqrt(d)); fold_site_scales folds them back at
save, so the saved crosscoder takes the raw concatenation.
"""
from __future__ import annotations

import torch

from sae_harvest.train.batchtopk import BatchTopKSAE
from sae_harvest.train.relu import ReLUSAE
from sae_harvest.train.topk import TopKSAE

BASES = {cls.arch: cls for cls in (ReLUSAE, TopKSAE, BatchTopKSAE)}
CROSSCODER_ARCHS = tuple(BASES)


class CrosscoderMixin:
    """Put in front of an SAE architecture (crosscoder_class); cfg.n_sites sites of d_in / n_sites each."""

    trains_e2e = False
    is_crosscoder = True

    def site_decoder_norms(self) -> torch.Tensor:
        """[d_sae, n_sites]: ||W_dec,s,i|| per latent and site."""
        return self.W_dec.view(self.cfg.d_sae, self.cfg.n_sites, -1).norm(dim=-1)

    def sparsity_penalty(self, feats, x=None):
        if not isinstance(self, ReLUSAE):
            return super().sparsity_penalty(feats, x)
        weights = self.site_decoder_norms().sum(-1)
        return (self.cfg.l1_coeff / self.cfg.d_in) * (feats * weights).sum(-1).mean()

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        if not isinstance(self, ReLUSAE):   # relu: the penalty holds the norms in check
            super().set_decoder_norm_to_unit_norm()

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        if not isinstance(self, ReLUSAE):
            super().remove_gradient_parallel_to_decoder_directions()

    @torch.no_grad()
    def fold_site_scales(self, scales: list[float]) -> None:
        """Trained on [x_s / s_s]; afterwards takes the raw concatenation, same latents."""
        s = torch.tensor(scales, dtype=self.W_enc.dtype, device=self.W_enc.device)
        per_col = s.repeat_interleave(self.cfg.d_in // self.cfg.n_sites)
        self.W_enc /= per_col[:, None]
        self.W_dec *= per_col[None, :]
        self.b_dec *= per_col
        # centred architectures encode (x - b_dec) @ W_enc: both sides scaled alike, latents unchanged

    def fold_input_scale(self, scale: float) -> None:
        self.fold_site_scales([scale] * self.cfg.n_sites)


_CLASSES: dict[str, type] = {}


def crosscoder_class(arch: str) -> type:
    if arch not in BASES:
        raise ValueError(f"no crosscoder for arch {arch!r}; crosscoders take {', '.join(CROSSCODER_ARCHS)}")
    if arch not in _CLASSES:
        base = BASES[arch]
        _CLASSES[arch] = type(f"{base.__name__.removesuffix('SAE')}Crosscoder", (CrosscoderMixin, base),
                              {"saelens_architecture": f"{arch}_crosscoder"})   # ours: SAELens has none
    return _CLASSES[arch]
