"""Shared SAE base class, config and registry. One architecture per file (relu, gated, topk, ...).

Conventions (all architectures, SAELens names and shapes):
    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
    feats = encoder(x) [n, d_sae];  x_hat = feats @ W_dec + b_dec
Reconstruction loss ("mse" term) is the per-token squared error summed over d_in, averaged over the
batch: mean_n ||x - x_hat||^2. That is the ||.||^2 of the papers, averaged over tokens.
LossOutput.loss == sum of the terms "mse", "sparsity", "aux" that are present; "l0"/"l1" are diagnostics.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

ARCH_NAMES = ("relu", "gated", "topk", "batchtopk", "gtopk")
TOPK_FAMILY = ("topk", "batchtopk", "gtopk")


@dataclass(frozen=True)
class SAEConfig:
    arch: str
    d_in: int
    d_sae: int
    l1_coeff: float = 0.0      # relu: phi = l1_coeff / d_in (e2e paper); gated: lambda on ||ReLU(pi_gate)||_1
    k: int = 0                 # topk family: active latents per token (batchtopk: on average)
    beta: float = 0.0          # gtopk gradient weight (see train/gtopk.py DEFAULT_BETA)
    aux_k: int = 512           # AuxK: top aux_k dead latents, capped at d_sae // 2
    aux_coeff: float = 1 / 32
    threshold_ema: float = 0.99  # batchtopk: EMA decay of the per-batch min kept activation

    def __post_init__(self):
        if self.arch not in ARCH_NAMES:
            raise ValueError(f"unknown SAE arch {self.arch!r}; expected one of {ARCH_NAMES}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if self.arch in TOPK_FAMILY and not 0 < self.k <= self.d_sae:
            raise ValueError(f"{self.arch} needs 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}")
        if not 0.0 <= self.threshold_ema < 1.0:
            raise ValueError(f"threshold_ema must be in [0, 1), got {self.threshold_ema}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown SAEConfig keys {unknown}")
        return cls(**d)


class LossOutput(NamedTuple):
    loss: torch.Tensor               # scalar to backprop
    terms: dict[str, torch.Tensor]   # detached scalars for logging, always incl. "mse" and "l0"
    feats: torch.Tensor              # [n, d_sae] latents used for the reconstruction
    x_hat: torch.Tensor              # [n, d_in]


def recon_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).pow(2).sum(-1).mean()


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld iterations; robust to the huge-norm outlier tokens (BOS) that drag the mean."""
    guess = points.mean(0)
    for _ in range(max_iter):
        prev = guess
        w = 1.0 / (points - guess).norm(dim=-1).clamp_min(1e-8)
        guess = (w[:, None] * points).sum(0) / w.sum()
        if (guess - prev).norm() < tol * (1.0 + prev.norm()):
            break
    return guess


class SAE(nn.Module):
    """Base: standard parameters, decoder, decoder-norm constraint, b_dec init, scale folding."""

    arch: str = ""
    apply_b_dec_to_input: bool = True   # encoder sees x - b_dec (SAELens flag, exported to cfg.json)

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Kaiming-uniform decoder, rows renormalised to 1; tied encoder W_enc = W_dec^T at init.
        nn.init.kaiming_uniform_(self.W_dec, a=math.sqrt(5))
        self.set_decoder_norm_to_unit_norm()
        self.W_enc.copy_(self.W_dec.T)

    # ---- forward pieces (subclasses implement encode / loss) ----
    def encode(self, x: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, grad))

    def loss(self, x, grad=None, dead_mask=None) -> LossOutput:
        raise NotImplementedError

    def saelens_architecture(self) -> str:
        raise NotImplementedError

    def _center(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.apply_b_dec_to_input else x

    # ---- decoder-norm constraint (call around every optimiser step) ----
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        # Only the tangential part of the gradient moves a unit-norm row along the sphere; the radial
        # part would be undone by the renormalisation anyway, but would still pollute Adam's moments.
        if self.W_dec.grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self.W_dec.grad -= (self.W_dec.grad * unit).sum(-1, keepdim=True) * unit

    # ---- initialisation from data ----
    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor, method: str = "geometric_median") -> None:
        sample = sample.to(self.b_dec.device, torch.float32)
        if method == "geometric_median":
            center = geometric_median(sample)
        elif method == "mean":
            center = sample.mean(0)
        else:
            raise ValueError(f"unknown b_dec init method {method!r}")
        self.b_dec.copy_(center.to(self.b_dec.dtype))

    # ---- fold the training-time input normalisation into the weights ----
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """The SAE was trained on x/scale; afterwards it takes raw x and returns raw x_hat, same latents.

        pre = (x/s - b_dec) @ W_enc = (x - s b_dec) @ (W_enc / s): so W_enc /= s, b_dec *= s;
        x_hat = s (f @ W_dec + b_dec) = f @ (s W_dec) + s b_dec. Decoder rows then have norm s: do not
        renormalise after folding. Latents (and so thresholds) are unchanged.
        """
        self.W_enc /= scale
        self.W_dec *= scale
        self.b_dec *= scale

    def extra_repr(self) -> str:
        return f"arch={self.arch}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}"


ARCHITECTURES: dict[str, type[SAE]] = {}


def register(name: str):
    def deco(cls):
        cls.arch = name
        ARCHITECTURES[name] = cls
        return cls
    return deco


def make_sae(cfg: SAEConfig) -> SAE:
    return ARCHITECTURES[cfg.arch](cfg)


# Import the architecture files last so their @register calls fill ARCHITECTURES (they import this module).
import train.relu  # noqa: E402,F401
import train.gated  # noqa: E402,F401
import train.topk  # noqa: E402,F401
import train.batchtopk  # noqa: E402,F401
import train.gtopk  # noqa: E402,F401
