"""The SAE interface every architecture implements. One architecture per file (relu.py, gated.py,
topk.py, ...), each with its own frozen config class (train/sae_config.py); train/registry.py lists
them, name -> (SAE class, config class).

Conventions (all architectures, SAELens names and shapes):
    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
    feats = encoder(x) [n, d_sae];  x_hat = feats @ W_dec + b_dec
Reconstruction loss ("mse" term) is the per-token squared error summed over d_in, averaged over the
batch: mean_n ||x - x_hat||^2. That is the ||.||^2 of the papers, averaged over tokens.
LossOutput.loss == sum of the terms "mse", "sparsity", "aux" that are present; "l0"/"l1" are diagnostics.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from sae_harvest.train.distributed import LOCAL, Reducer


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
    """Base: standard parameters, decoder, decoder-norm constraint, b_dec init, scale folding.

    A subclass sets the class attributes below and implements encode() and loss(); everything
    else the trainers, the checkpoint writer and the evaluator need is a hook with a default here,
    so a new architecture is one file plus a line in train/registry.py.
    """

    arch: str = ""                       # the registry key (--arch)
    saelens_architecture: str = ""       # cfg.json "architecture" for SAELens
    apply_b_dec_to_input: bool = True    # encoder sees x - b_dec (SAELens flag, exported to cfg.json)
    sweep_field: str = "l1_coeff"        # the config field a sweep's folder is named by first ("k": topk_k32)
    uses_grads: bool = False             # encode() takes the store's loss gradients (g-SAE)
    trains_e2e: bool = True              # can be trained through the live model (--loss e2e)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # buffers saved in the safetensors header rather than as tensors (SAELens loads tensors strictly)
    metadata_buffers: tuple[str, ...] = ()

    @classmethod
    def default_lr(cls, d_sae: int) -> float:
        return 5e-4

    def __init__(self, cfg):
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
        """The inference latents (independent of the other rows of the batch)."""
        raise NotImplementedError

    def encode_train(self, x: torch.Tensor, grad: torch.Tensor | None = None,
                     reducer: Reducer = LOCAL) -> torch.Tensor:
        """The latents a training forward uses (e2e splices them in); the same as encode() unless
        the training selection depends on the batch (batchtopk), reduced through `reducer`."""
        return self.encode(x, grad)

    def decode(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, grad))

    def loss(self, x, grad=None, dead_mask=None, reducer: Reducer = LOCAL) -> LossOutput:
        """The training objective on a batch; `reducer` combines what depends on the whole batch
        across data-parallel ranks (distributed.LOCAL: this process's batch is the batch)."""
        raise NotImplementedError

    # ---- hooks with no-op defaults ----
    def sparsity_penalty(self, feats: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor | None:
        """The sparsity term a non-local loss (e2e) adds for latents `feats` [n, d_sae] of the SAE
        inputs `x` [n, d_in] (training space); None: none."""
        return None

    def observe_training_latents(self, feats: torch.Tensor, reducer: Reducer = LOCAL) -> None:
        """Called with the latents of every training forward that does not go through loss()
        (e2e splices encode_train() into the model)."""

    def calibrate(self, x: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Set data-dependent hyperparameters before training, from a sample in the training space."""

    def enable_sparse_decode(self) -> bool:
        """Switch to a sparse decode if the architecture has one that pays off; return whether it did."""
        return False

    def enable_sparse_backward(self) -> bool:
        """Switch loss() to encoder gradients at the chosen latents only (TopK family); return whether it did."""
        return False

    @torch.no_grad()
    def finalize(self, batches) -> None:
        """After training, with the final weights: `batches` yields training-space inputs [n, d_in]."""

    def saelens_fields(self) -> dict:
        """Architecture-specific cfg.json keys besides architecture/d_in/d_sae (e.g. k)."""
        return {}

    def saelens_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of the saved SAELens checkpoint (e.g. jumprelu trains log theta, saves theta);
        metadata_buffers travel in the file's header instead (train/sae_io.py)."""
        return {n: t for n, t in self.state_dict().items() if n not in self.metadata_buffers}

    def load_saelens_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of saelens_state_dict()."""
        self.load_state_dict(tensors)

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

    # ---- where a loaded SAE comes from (load_sae sets `provenance`; None for one built in memory) ----
    provenance = None

    @property
    def site(self) -> str | None:
        """Our site name, e.g. blocks.6.resid_pre."""
        return self.provenance.site if self.provenance else None

    @property
    def hook_name(self) -> str | None:
        """The TransformerLens hook name, e.g. blocks.6.hook_resid_pre (as SAELens's cfg.hook_name)."""
        return self.provenance.hook_name if self.provenance else None

    def extra_repr(self) -> str:
        return f"arch={self.arch}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}"



def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """Each row of w divided by its norm, float32, detached (zero rows stay zero): decoder
    directions for meta-SAE training data, the meta report, stitching and geometry cosines."""
    w = w.detach().float()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)
