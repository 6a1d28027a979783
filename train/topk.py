"""TopK SAE (Gao et al. 2024) and the AuxK dead-latent loss shared by the TopK family.

    pre = ReLU((x - b_dec) @ W_enc + b_enc)
    f   = keep the k largest entries of pre per token, zero elsewhere  (L0 == k unless < k are positive)
    loss = mean_n ||x - x_hat||^2 + aux_coeff * AuxK
AuxK: e = x - x_hat (detached); among the latents marked dead, keep the top min(aux_k, d_sae//2, n_dead)
of pre per token and decode them without bias: e_hat. AuxK = sum ||e - e_hat||^2 / sum ||e - mean(e)||^2,
the normalisation of OpenAI/sparsify, so the term is ~1 at worst whatever the activation scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae_harvest.train.distributed import LOCAL, Reducer
from sae_harvest.train.sae import SAE, LossOutput, recon_loss
from sae_harvest.train.sae_config import SAEConfigBase, hyper
from sae_harvest.train.sparse_topk import SparsePre


@dataclass(frozen=True)
class TopKConfig(SAEConfigBase):
    k: int = hyper(0, "Active latents per token (batchtopk, matryoshka_batchtopk: on average over the batch).",
                   sweep=True, option_default=(32,))
    aux_k: int = hyper(512, "AuxK: the top aux_k dead latents per token (capped at d_sae / 2) predict the "
                            "residual.", sweep=True)
    aux_coeff: float = hyper(1 / 32, "Weight of the AuxK dead-latent loss.", sweep=True)

    def check(self):
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"{self.arch} needs 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}")
        if self.aux_k < 0 or not (math.isfinite(self.aux_coeff) and self.aux_coeff >= 0):
            raise ValueError(f"{self.arch} needs aux_k >= 0 and a finite aux_coeff >= 0, got "
                             f"{self.aux_k}, {self.aux_coeff}")


def auxk_loss(sae: SAE, pre: torch.Tensor, resid: torch.Tensor, dead_mask: torch.Tensor | None,
              values_at=None, reducer: Reducer = LOCAL) -> torch.Tensor:
    """pre: [n, d_sae] post-ReLU pre-activations; resid: x - x_hat (detached); values_at(idx): the
    differentiable values of pre at idx [n, j] when pre carries no graph (the sparse backward).

    Reads the dead count on the host (a GPU sync): padding to a fixed aux_k instead would gather
    aux_k decoder rows per token every step, which costs more than the SAE step itself on a GPU
    (measured in docs/benchmarks.md). The trainer passes dead_mask=None while no latent can be
    dead, so this runs (and syncs) only once some may be."""
    zero = pre.new_zeros(())
    if dead_mask is None:
        return zero
    dead_mask = dead_mask.to(pre.device, torch.bool)
    n_dead = int(dead_mask.sum())
    k_aux = min(sae.cfg.aux_k, sae.cfg.d_sae // 2, n_dead)
    if k_aux == 0:
        return zero
    masked = torch.where(dead_mask, pre, torch.full_like(pre, -torch.inf))
    vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
    if values_at is not None:
        vals = values_at(idx)
    e_hat = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals.to(sae.W_dec.dtype), mode="sum")
    var = reducer.residual_variance(resid).clamp_min(1e-12)
    # data parallel: the ratio of global sums; x ranks because the ranks' gradients are averaged
    return (e_hat - resid).pow(2).sum() / var * reducer.ranks()


class TopKSAE(SAE):
    arch = "topk"
    saelens_architecture = "topk"
    apply_b_dec_to_input = True
    sweep_field = "k"
    use_sparse_decode = False   # enable_sparse_decode() (GPU, k << d_sae): decode by gathering the k rows
    use_sparse_backward = False  # enable_sparse_backward(): encoder gradients at the chosen latents only

    @classmethod
    def default_lr(cls, d_sae):
        return 2e-4 / math.sqrt(d_sae / 2**14)   # Gao et al.'s scaling law for the learning rate

    def enable_sparse_decode(self):
        # the gather beats the dense matmul once k is a small fraction of the dictionary
        self.use_sparse_decode = self.cfg.k * 16 <= self.cfg.d_sae
        return self.use_sparse_decode

    def enable_sparse_backward(self):
        self.use_sparse_backward = True
        return True

    def saelens_fields(self):
        return {"k": self.cfg.k}

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self._center(x) @ self.W_enc + self.b_enc)

    def select(self, pre: torch.Tensor, grad: torch.Tensor | None = None):
        """(values [n,k], indices [n,k]) of the active latents; gtopk overrides the ranking."""
        return pre.topk(self.cfg.k, dim=-1, sorted=False)

    def encode_sparse(self, x, grad=None):
        return self.select(self.pre_acts(x), grad)

    def encode(self, x, grad=None):
        pre = self.pre_acts(x)
        vals, idx = self.select(pre, grad)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def forward(self, x, grad=None):
        if self.use_sparse_decode:
            vals, idx = self.encode_sparse(x, grad)
            return self.sparse_decode(idx, vals)
        return self.decode(self.encode(x, grad))

    def sparse_decode(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Decode from (indices [n,k], values [n,k]) by gathering only the k rows (embedding-bag):
        O(n k d_in) instead of O(n d_sae d_in); differentiable in values and W_dec."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype),
                               mode="sum") + self.b_dec

    def loss(self, x, grad=None, dead_mask=None, reducer: Reducer = LOCAL) -> LossOutput:
        if self.use_sparse_backward:   # pre without a graph; the k chosen values carry the gradient
            enc = SparsePre(self, x)
            pre, values_at = enc.pre, enc.gather
            _, idx = self.select(pre, grad)
            vals = values_at(idx)
        else:
            pre, values_at = self.pre_acts(x), None
            vals, idx = self.select(pre, grad)
        feats = torch.zeros_like(pre).scatter(-1, idx, vals)
        x_hat = self.sparse_decode(idx, vals) if self.use_sparse_decode else self.decode(feats)
        return self._loss_terms(x, pre, feats, x_hat, dead_mask, values_at, reducer)

    def _loss_terms(self, x, pre, feats, x_hat, dead_mask, values_at=None, reducer: Reducer = LOCAL) -> LossOutput:
        mse = recon_loss(x, x_hat)
        aux = self.cfg.aux_coeff * auxk_loss(self, pre, (x - x_hat).detach(), dead_mask, values_at, reducer)
        terms = {"mse": mse, "aux": aux, "l0": (feats > 0).float().sum(-1).mean()}
        return LossOutput(mse + aux, {n: t.detach() for n, t in terms.items()}, feats, x_hat)
