"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope; SAELens `jumprelu`).

    z = (x - b_dec) @ W_enc + b_enc                       (pre-activations)
    f = JumpReLU_theta(z) = z * H(z - theta)              theta = exp(log_threshold) > 0, per latent
    loss = mean_n ||x - x_hat||^2 + lambda * mean_n sum_i H(z_i - theta_i)      (l0_penalty "step")
H has no gradient, so theta learns through straight-through pseudo-derivatives with the rectangle
kernel K(u) = 1[|u| < 1/2] of bandwidth eps (cfg.bandwidth):
    d/dtheta JumpReLU_theta(z) := -(theta / eps) K((z - theta) / eps)
    d/dtheta H(z - theta)      := -(1 / eps) K((z - theta) / eps)
and z gets the exact gradient H(z - theta) from the reconstruction only (none from the L0 term).
`l0_penalty="tanh"` (SAELens's alternative) replaces H(z - theta) in the penalty by
tanh(c * f_i * ||W_dec,i||), c = cfg.tanh_scale, which is differentiable in f.
lambda is cfg.l1_coeff (the sweep field, `--l1`): one active latent costs lambda; the reconstruction
is summed over d_in on inputs normalised to E||x|| = sqrt(d_in).
theta is trained in log space (log_threshold, as the paper and SAELens do) and saved as SAELens's
`threshold` tensor; loading takes log(threshold).

Where theta starts (calibrate()): at the fixed point of its own pseudo-gradient, theta_0 = sqrt(lambda).
Why: Adam moves log theta by at most ~lr per step whatever the gradient's size, so over T steps theta
can only change by a factor ~exp(lr * T). The paper (lr 7e-5 over 10^5+ steps) has tens of log-units
of travel; a short run here has ~0.04 (lr 5e-4, ~80 steps), so theta stayed where it started and
lambda only chose the sign of an update too small to matter: every lambda gave the same L0
(docs/results-withdrawn.md). The expected-loss derivative the estimators target is
    d/dtheta_i E[loss] = p_i(theta_i) * (E[gain_i | z_i = theta_i] - lambda),
gain_i = the squared error saved by keeping activation z_i = theta_i (raising theta past z_i gives
that up and saves lambda, so descent raises theta while gain < lambda); for a latent whose decoder row
(unit norm here) alone explains its direction, gain = theta^2, so theta* = sqrt(lambda) in the space
the SAE trains in (inputs with E||x|| = sqrt(d_in), reconstruction summed over d_in). Measured: run
long enough to get there from theta_0 = 0.01 (2000 steps at lr 5e-3, tests' store), the median
learned theta is 1.1-1.3 sqrt(lambda) for lambda = 0.1, 0.3, 1 (docs/results-withdrawn.md). `threshold_init`
stays a floor (theta_0 = max(threshold_init, sqrt(lambda))); a theta loaded with --init is kept; the
tanh penalty (gradient through f, not theta alone) starts at threshold_init as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sae_harvest.train.distributed import LOCAL, Reducer
from sae_harvest.train.sae import SAE, LossOutput, recon_loss
from sae_harvest.train.sae_config import SAEConfigBase, hyper

L0_PENALTIES = ("step", "tanh")


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z * H(z - theta); gradients: z -> H(z - theta), theta -> -(theta/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth: float):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = (z > theta).to(grad_out.dtype) * grad_out
        # summed over every dimension theta was broadcast along: the rows ([n, F] -> [F]), and a
        # stack's rows too ([S, n, F] -> [S, 1, F], train/stacked_losses.py)
        grad_theta = (-(theta / eps) * rectangle((z - theta) / eps) * grad_out).sum_to_size(theta.shape)
        return grad_z, grad_theta.to(theta.dtype), None


class StepFunction(torch.autograd.Function):
    """H(z - theta); gradients: z -> none, theta -> -(1/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth: float):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * rectangle((z - theta) / eps) * grad_out).sum_to_size(theta.shape)
        return None, grad_theta.to(theta.dtype), None


@dataclass(frozen=True)
class JumpReLUConfig(SAEConfigBase):
    # lambda per active latent; theta starts at sqrt(lambda) (see calibrate), so 1 is a usable default
    l1_coeff: float = hyper(0.0, "lambda per active latent (the L0 penalty).", sweep=True, option="l1",
                            option_default=(), train_default=1.0)
    bandwidth: float = hyper(0.05, "Bandwidth eps of the threshold's straight-through estimators.", sweep=True)
    threshold_init: float = hyper(0.01, "Floor of the initial threshold; theta starts at max(this, sqrt(lambda)).",
                                  sweep=True)
    l0_penalty: str = hyper("step", "L0 penalty: step (straight-through) or tanh (SAELens).", choices=L0_PENALTIES)
    tanh_scale: float = hyper(4.0, "c in the tanh L0 penalty tanh(c * f * ||W_dec row||).", sweep=True)

    def check(self):
        if not (self.bandwidth > 0 and self.threshold_init > 0 and self.tanh_scale > 0) or not all(
                math.isfinite(v) for v in (self.bandwidth, self.threshold_init, self.tanh_scale)):
            raise ValueError(f"jumprelu needs bandwidth > 0, threshold_init > 0 and tanh_scale > 0, all finite, got "
                             f"{self.bandwidth}, {self.threshold_init}, {self.tanh_scale}")
        if self.l0_penalty not in L0_PENALTIES:
            raise ValueError(f"unknown l0_penalty {self.l0_penalty!r}; expected one of {L0_PENALTIES}")


class JumpReLUSAE(SAE):
    arch = "jumprelu"
    saelens_architecture = "jumprelu"
    apply_b_dec_to_input = True
    adam_betas = (0.0, 0.999)   # the paper's (and Gemma Scope's) beta1 = 0

    # where theta started (calibrate), kept with the weights; SAELens has no such tensor, so it
    # travels in the safetensors header. Saved before it did: cfg.json's threshold_init held it.
    metadata_buffers = ("threshold_start",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.threshold_init)).log())
        self.register_buffer("threshold_start", torch.tensor(float(cfg.threshold_init)))

    @torch.no_grad()
    def calibrate(self, x, grad=None):
        """Start theta at sqrt(lambda), the L0 penalty's fixed point (module docstring), unless theta
        was loaded (--init) or threshold_init is larger. The start is state (threshold_start,
        saved with the weights); the config keeps the threshold_init it was given."""
        # the very expression __init__ used (float32 log of the float32 value): a float64 log cast
        # down differs by one ulp for some values (0.123) and skipped the start at sqrt(lambda)
        fresh = torch.equal(self.log_threshold,
                            torch.full_like(self.log_threshold, float(self.cfg.threshold_init)).log())
        if not fresh or self.cfg.l0_penalty != "step" or self.cfg.l1_coeff <= 0:
            return
        theta0 = max(self.cfg.threshold_init, math.sqrt(self.cfg.l1_coeff))
        self.log_threshold.fill_(math.log(theta0))
        self.threshold_start.fill_(theta0)

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return self._center(x) @ self.W_enc + self.b_enc

    def _jumprelu(self, pre: torch.Tensor) -> torch.Tensor:
        return JumpReLUFunction.apply(pre, self.threshold.to(pre.dtype), self.cfg.bandwidth)

    def encode(self, x, grad=None):
        return self._jumprelu(self.pre_acts(x))

    def l0_penalty(self, pre: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """lambda * mean_n of the differentiable stand-in for ||f||_0 (see the module docstring)."""
        if self.cfg.l0_penalty == "tanh":
            count = torch.tanh(self.cfg.tanh_scale * feats * self.W_dec.norm(dim=-1)).sum(-1)
        else:
            count = StepFunction.apply(pre, self.threshold.to(pre.dtype), self.cfg.bandwidth).sum(-1)
        return self.cfg.l1_coeff * count.mean()

    def loss(self, x, grad=None, dead_mask=None, reducer: Reducer = LOCAL) -> LossOutput:
        pre = self.pre_acts(x)
        feats = self._jumprelu(pre)
        x_hat = self.decode(feats)
        mse = recon_loss(x, x_hat)
        sparsity = self.l0_penalty(pre, feats)
        terms = {"mse": mse, "sparsity": sparsity, "l0": (feats > 0).float().sum(-1).mean()}
        return LossOutput(mse + sparsity, {n: t.detach() for n, t in terms.items()}, feats, x_hat)

    def sparsity_penalty(self, feats, x=None):
        # The step penalty needs the pre-activations just below theta too, which feats has zeroed:
        # recompute them from the SAE's input (no gradient reaches z through H anyway).
        if self.cfg.l0_penalty == "step":
            if x is None:
                raise ValueError("the jumprelu step L0 penalty needs the SAE input x")
            with torch.no_grad():
                pre = self.pre_acts(x.to(self.W_enc.dtype))
            return self.l0_penalty(pre, feats)
        return self.l0_penalty(None, feats)

    def saelens_fields(self):
        return {"jumprelu_bandwidth": self.cfg.bandwidth, "jumprelu_sparsity_loss_mode": self.cfg.l0_penalty}

    # SAELens stores theta itself; we train log theta.
    def saelens_state_dict(self) -> dict[str, torch.Tensor]:
        tensors = super().saelens_state_dict()
        tensors["threshold"] = tensors.pop("log_threshold").exp()
        return tensors

    def load_saelens_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        tensors["log_threshold"] = tensors.pop("threshold").log()
        self.load_state_dict(tensors)
