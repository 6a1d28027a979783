"""ReLU ("local") SAE of the e2e paper (Braun et al. 2024, sec. 2.1-2.2).

    f = ReLU(x @ W_enc + b_enc)          (no pre-encoder bias: the paper's Enc takes a directly)
    x_hat = f @ W_dec + b_dec            (unit-norm dictionary rows)
    loss = mean_n ||x - x_hat||^2 + (lambda / d_in) * mean_n ||f||_1

Initialisation: unit-norm Kaiming decoder rows, W_enc = (d_in / d_sae) W_dec^T, b_enc = 0. With the
plain tie W_enc = W_dec^T about half the F latents fire and x_hat ~ (F / 2 d) x: an 8x dictionary
starts 4x too large and a short run can end worse than predicting the mean. The d/F factor makes the
first reconstruction ~ x / 2 (the role of SAELens's small decoder-init norm and of Anthropic's
April-2024 update, here with the decoder kept at unit norm, so the encoder carries the factor).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_harvest.train.sae import SAE, LossOutput, recon_loss


def init_encoder_scale(cfg) -> float:
    """d_in / d_sae: with half of F unit-norm random directions active, x_hat ~ x / 2 at init."""
    return cfg.d_in / cfg.d_sae


class ReLUSAE(SAE):
    arch = "relu"
    saelens_architecture = "standard"
    apply_b_dec_to_input = False

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.W_enc.mul_(init_encoder_scale(self.cfg))

    def encode(self, x, grad=None):
        return F.relu(x @ self.W_enc + self.b_enc)

    def loss(self, x, grad=None, dead_mask=None) -> LossOutput:
        feats = self.encode(x)
        x_hat = self.decode(feats)
        mse = recon_loss(x, x_hat)
        # Unweighted L1 is right because rows are kept at unit norm (otherwise the SAE could shrink f
        # and grow W_dec to dodge the penalty).
        l1 = feats.abs().sum(-1).mean()
        sparsity = self.sparsity_penalty(feats)
        terms = {"mse": mse, "sparsity": sparsity, "l1": l1, "l0": (feats > 0).float().sum(-1).mean()}
        return LossOutput(mse + sparsity, {n: t.detach() for n, t in terms.items()}, feats, x_hat)

    def sparsity_penalty(self, feats):
        return (self.cfg.l1_coeff / self.cfg.d_in) * feats.abs().sum(-1).mean()
