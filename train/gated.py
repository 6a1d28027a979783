"""Gated SAE (Rajamanoharan et al. 2024, eq. 5-7 and the appendix J pseudo-code).

    pi_gate = (x - b_dec) @ W_enc + b_gate                  (W_enc is W_gate)
    pi_mag  = (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag    (magnitude path tied to the gate)
    f = 1[pi_gate > 0] * ReLU(pi_mag)
    loss = ||x - x_hat(f)||^2 + lambda ||ReLU(pi_gate)||_1 + ||x - x_hat_frozen(ReLU(pi_gate))||^2
The last term uses the decoder (W_dec, b_dec) with gradients stopped, so only the gate learns from it.
The L1 is *not* weighted by decoder row norms: rows are kept at unit norm, where both agree.
Initialisation: W_enc = W_dec^T (unit-norm rows) and r_mag = log(d_in / d_sae), so the magnitude
path starts like the ReLU SAE's scaled encoder (first x_hat ~ x / 2 rather than F / 2d times x,
see train/relu.py); the gate only needs the sign, which the scale does not change.
Where the gate starts (calibrate()): b_gate = -lambda/2. For a latent whose unit decoder row w
alone explains x's component c along it, the gate's own terms, (c - pi)^2 + lambda*pi for pi > 0,
are smallest at pi = c - lambda/2: the gate is a soft threshold at lambda/2, and with W_enc = W_dec^T
at init pi_gate = c + b_gate. Adam moves b_gate by ~lr per step whatever the gradient (0.04 over an
80-step CPU run), so a gate started at 0 never reaches that point on short runs and every lambda
gave the same L0 (docs/results-withdrawn.md); started there, lambda sets the L0 from the first step. A gate
loaded with --init is kept.
Parameters follow SAELens's gated naming: W_enc, b_gate, r_mag, b_mag, W_dec, b_dec (no b_enc).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sae_harvest.train.distributed import LOCAL, Reducer
from sae_harvest.train.relu import init_encoder_scale
from sae_harvest.train.sae import SAE, LossOutput, recon_loss
from sae_harvest.train.sae_config import SAEConfigBase, hyper


@dataclass(frozen=True)
class GatedConfig(SAEConfigBase):
    # 3: L0 ~23 at d_sae 256 on the default model after one epoch at the default lr (docs/results-pareto.json)
    l1_coeff: float = hyper(0.0, "lambda on ||ReLU(pi_gate)||_1, on normalised inputs.", sweep=True, option="l1",
                            option_default=(), train_default=3.0)


class GatedSAE(SAE):
    arch = "gated"
    saelens_architecture = "gated"
    apply_b_dec_to_input = True
    trains_e2e = False          # its aux term is a local reconstruction
    adam_betas = (0.0, 0.999)   # the paper's beta1 = 0

    def __init__(self, cfg):
        super().__init__(cfg)
        del self.b_enc  # gated has two encoder biases instead
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.full((cfg.d_sae,), math.log(init_encoder_scale(cfg))))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    @torch.no_grad()
    def calibrate(self, x, grad=None):
        """Start the gate at its soft threshold, b_gate = -lambda/2 (module docstring), unless
        b_gate was loaded (--init: not all zeros)."""
        if self.cfg.l1_coeff > 0 and not torch.count_nonzero(self.b_gate):
            self.b_gate.fill_(-self.cfg.l1_coeff / 2)

    def _pre(self, x):
        xc = self._center(x) @ self.W_enc
        return xc + self.b_gate, xc * torch.exp(self.r_mag) + self.b_mag   # pi_gate, pi_mag

    def encode(self, x, grad=None):
        pi_gate, pi_mag = self._pre(x)
        return (pi_gate > 0).to(pi_mag.dtype) * F.relu(pi_mag)

    def loss(self, x, grad=None, dead_mask=None, reducer: Reducer = LOCAL) -> LossOutput:
        pi_gate, pi_mag = self._pre(x)
        feats = (pi_gate > 0).to(pi_mag.dtype) * F.relu(pi_mag)   # no gradient reaches the gate here
        x_hat = self.decode(feats)
        mse = recon_loss(x, x_hat)
        gate_acts = F.relu(pi_gate)
        l1 = gate_acts.sum(-1).mean()
        sparsity = self.cfg.l1_coeff * l1
        x_hat_frozen = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        aux = recon_loss(x, x_hat_frozen)
        terms = {"mse": mse, "sparsity": sparsity, "aux": aux, "l1": l1,
                 "l0": (feats > 0).float().sum(-1).mean()}
        return LossOutput(mse + sparsity + aux, {n: t.detach() for n, t in terms.items()}, feats, x_hat)

    @torch.no_grad()
    def to_jumprelu(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_enc_mag, b_enc_mag, threshold) with identical latents under SAELens JumpReLU:
        pre = (x - b_dec) @ W_enc_mag + b_enc_mag;  f = ReLU(pre) * (pre > threshold).
        pi_gate > 0  <=>  exp(r_mag) * (x - b_dec) @ W_enc > -exp(r_mag) * b_gate
                     <=>  pi_mag > b_mag - exp(r_mag) * b_gate = threshold.
        """
        scale = torch.exp(self.r_mag)
        return self.W_enc * scale, self.b_mag.clone(), self.b_mag - scale * self.b_gate
