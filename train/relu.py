"""ReLU ("local") SAE of the e2e paper (Braun et al. 2024, sec. 2.1-2.2).

    f = ReLU(x @ W_enc + b_enc)          (no pre-encoder bias: the paper's Enc takes a directly)
    x_hat = f @ W_dec + b_dec            (unit-norm dictionary rows)
    loss = mean_n ||x - x_hat||^2 + (lambda / d_in) * mean_n ||f||_1
"""
from __future__ import annotations

import torch.nn.functional as F

from sae_harvest.train.sae import SAE, LossOutput, recon_loss


class ReLUSAE(SAE):
    arch = "relu"
    saelens_architecture = "standard"
    apply_b_dec_to_input = False

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

    def sparsity_penalty(self, feats, x=None):
        return (self.cfg.l1_coeff / self.cfg.d_in) * feats.abs().sum(-1).mean()
