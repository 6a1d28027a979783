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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae_harvest.train.distributed import LOCAL, Reducer
from sae_harvest.train.sae import SAE, LossOutput, recon_loss
from sae_harvest.train.sae_config import SAEConfigBase, hyper


@dataclass(frozen=True)
class ReLUConfig(SAEConfigBase):
    # measured: default model, blocks.2.resid_pre, 256 latents, 80k tokens: --l1 100 / 300 / 1000 gave
    # L0 ~96 / 49 / 10 after one epoch at the default lr (docs/results-pareto.json; 17 / 7 / 1.6 after
    # 256 epochs at the tuned lr, docs/results-pareto-tuned-256.json)
    l1_coeff: float = hyper(0.0, "lambda: phi = lambda / d_in on the latents' L1, on normalised inputs (the e2e "
                                 "paper's and SAELens's scales: docs/e2e.md).", sweep=True, option="l1",
                            option_default=(), train_default=300.0)


def init_encoder_scale(cfg) -> float:
    """d_in / d_sae: with half of F unit-norm random directions active, x_hat ~ x / 2 at init."""
    return cfg.d_in / cfg.d_sae


def l1_from_e2e_paper(lam: float, d_in: int, scale: float, loss: str = "local") -> float:
    """Our --l1 for the e2e paper's lambda (docs/e2e.md, "Sparsity coefficients"). `scale` is the
    trainer's input scale s = E||a|| / sqrt(d_in) (summary.json's input_scale).
    local: the paper's MSE is a mean over d on raw activations (e2e_sae's F.mse_loss):
           (1/d) sum err_raw^2 + (lam/d) ||f_raw||_1 = (s^2/d) [sum err^2 + (lam/s) ||f||_1] -> lam d / s.
    e2e / e2e+ds: KL is scale-free: KL + (lam/d) s ||f||_1 -> lam * s."""
    return lam * d_in / scale if loss == "local" else lam * scale


def l1_from_saelens(l1_coefficient: float, d_in: int, scale: float | None = None) -> float:
    """Our --l1 for SAELens's standard-SAE l1_coefficient. SAELens sums the squared error over d and
    weights |f_i| by ||W_dec_i|| (1 here). With normalize_activations="expected_average_only_in" it
    trains on x / s exactly as we do (scale=None): l1 = l1_coefficient * d_in; on raw activations
    (normalize "none") give s: l1 = l1_coefficient * d_in / s."""
    return l1_coefficient * d_in / (scale or 1.0)


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

    def loss(self, x, grad=None, dead_mask=None, reducer: Reducer = LOCAL) -> LossOutput:
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
