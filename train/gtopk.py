"""Gradient TopK SAE, g-SAE (Olmo et al. 2024, sec. 3).

    pre   = ReLU((x - b_dec) @ W_enc + b_enc)
    score = pre + beta * pre * |grad @ W_dec.T|       (elementwise; grad = dL/dx of the token, [n, d_in])
    K     = TopK(score, k);  f = pre on K, 0 elsewhere;  loss = reconstruction MSE (+ AuxK as TopK)
Only the *choice* of latents uses the gradient (no gradient flows through the score); the values are
the plain pre-activations. Without a gradient (grad=None) selection falls back to plain TopK; this is
what SAELens-style inference does with the exported checkpoint (cfg.json says so).

Gradient convention of our store: grad[t] = d(sum_s CE_s)/d a[t], the gradient of the sequence's
next-token cross-entropy *summed* (not averaged) over positions, w.r.t. the RAW site activation.
When the loop trains on x/s it must pass grad * s (the gradient w.r.t. the normalised input); after
fold_input_scale(s) the SAE takes the raw gradient: W_dec -> s W_dec, grad -> grad / s, so
grad @ W_dec.T, and the selection, are unchanged.

DEFAULT_BETA, derived from the paper's beta = 1e5 (GPT-2 small, layer 7):
* The paper trains with a modified smol-sae (Dooms & Wilhelm; acknowledgements), whose model loss is
  TransformerLens's mean next-token CE over the whole batch. Assuming smol-sae's defaults (32
  sequences of 256 tokens per model batch) that is a mean over N ~ 32*255 ~ 8.2e3 tokens, so our
  per-token gradient is N times theirs (sum vs. mean; the cross-position structure, losses at
  s >= t, is the same).
* Sanity check, their Table 2: mean |directional derivative| along unit decoder rows is 2.1-2.9e-5,
  so their beta * |W_dec^T grad| ~ 1e5 * 2.4e-5 ~ 2.4: the gradient factor is a few times 1 for a
  typical latent. That dimensionless operating point is what must carry over, not the number 1e5.
  (N * 2.4e-5 ~ 0.2 nats per unit of activation for our summed-CE gradient is a plausible size.)
* So beta_ours = 1e5 / 8.2e3 ~ 12 for an SAE whose unit-norm decoder lives in raw activation space,
  as the paper's did. If training runs on x/s with unit-norm rows in the normalised space, the
  training-space gradient is s times larger, so the paper-equivalent beta is 12 / s.
The token count N is an assumption about their run; calibrate_beta() sets beta from data so that
beta * mean|W_dec^T grad| over active latents equals the paper's ~2.4, whatever the reduction or scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_harvest.train.sae_config import hyper
from sae_harvest.train.topk import TopKConfig, TopKSAE

PAPER_BETA = 1e5
PAPER_TOKENS_PER_MEAN = 32 * 255          # smol-sae: 32 sequences x 256 tokens, mean next-token CE
DEFAULT_BETA = 12.0                       # ~ PAPER_BETA / PAPER_TOKENS_PER_MEAN = 12.25, rounded
PAPER_OPERATING_POINT = 2.4               # beta * E|d_i . grad| in the paper (1e5 x Table 2's ~2.4e-5)


GTOPK_INFERENCE = "topk without gradients; gradient-aware selection when a gradient is supplied"


@dataclass(frozen=True)
class GradTopKConfig(TopKConfig):
    beta: float = hyper(0.0, "Gradient weight of the selection score (0: calibrated on the data so that "
                             "beta*|W_dec^T grad| ~ 2.4, the paper's operating point).", sweep=True)


class GradTopKSAE(TopKSAE):
    """beta is cfg.beta when configured; with cfg.beta == 0 it is the value calibrate() measured on
    the data, which is state, not config: the `beta` buffer (0 until calibrated), saved with the
    weights. SAELens loads state dicts strictly and has no beta, so it travels in the safetensors
    header (metadata_buffers). A checkpoint saved before it did has the calibrated value in its
    cfg.json's beta instead, which then wins as a configured one."""
    arch = "gtopk"
    saelens_architecture = "topk"
    uses_grads = True
    trains_e2e = False   # selection needs the store's gradients, which a spliced forward has not got
    metadata_buffers = ("beta",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("beta", torch.tensor(0.0))
        self._beta = float(cfg.beta)   # the host copy select() multiplies by: no GPU read per step
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_beta())

    def _sync_beta(self) -> None:
        self._beta = self.cfg.beta or float(self.beta)

    def attribution(self, grad: torch.Tensor) -> torch.Tensor:
        """|grad @ W_dec.T| [n, d_sae]: first-order loss change per unit of each latent."""
        return (grad.to(self.W_dec.dtype) @ self.W_dec.detach().T).abs()

    def select(self, pre, grad=None):
        if grad is None:
            return super().select(pre)
        with torch.no_grad():   # indices only: the score is never differentiated
            p = pre.detach()
            score = p + self._beta * p * self.attribution(grad)
            idx = score.topk(self.cfg.k, dim=-1, sorted=False).indices
        return pre.gather(-1, idx), idx

    @torch.no_grad()
    def calibrate(self, x, grad):
        """With no beta configured, match the paper's operating point on the data (see above)."""
        if self.cfg.beta == 0.0 and grad is not None:
            beta = calibrate_beta(self, x, grad)
            self.beta.fill_(beta)
            self._beta = beta   # the exact value, as the config held it before beta was a buffer

    def saelens_fields(self):
        return {"k": self.cfg.k, "inference": GTOPK_INFERENCE}


@torch.no_grad()
def calibrate_beta(sae: GradTopKSAE, x: torch.Tensor, grad: torch.Tensor,
                   target: float = PAPER_OPERATING_POINT) -> float:
    """beta such that beta * mean |grad @ W_dec.T| over the latents plain TopK selects == target.
    x and grad must be in the space the SAE is trained in (normalised x, grad * s)."""
    pre = sae.pre_acts(x)
    _, idx = pre.topk(sae.cfg.k, dim=-1)
    mean_attr = sae.attribution(grad).gather(-1, idx).mean().item()
    return target / max(mean_attr, 1e-30)
