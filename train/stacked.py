"""A TopK sweep as one batched step: the sweep's SAEs (one shape, any k) stacked along a leading
SAE dimension, so the encoder and decoder of all of them are one `bmm` each instead of a Python
loop of small matmuls, and Adam, the decoder constraint and the dead-latent counts are one call.

Each SAE keeps exactly its own objective and update (tests/test_stacked.py trains a sweep both
ways and compares the weights):
    pre_s  = ReLU((x - b_dec_s) @ W_enc_s + b_enc_s)         [S, n, d_sae]  (one bmm)
    f_s    = top-k_s of pre_s per token (top max(k) sorted, entries past k_s dropped)
    x_hat_s = f_s @ W_dec_s + b_dec_s                         (one bmm)
    loss   = sum_s (mse_s + aux_coeff * AuxK_s)               (the SAEs share no parameter, so
                                                               each gets its own gradient)
AuxK per SAE with its own dead latents and k_aux_s = min(aux_k, d_sae/2, n_dead_s), as
train/topk.py. The optimizer step mirrors train/runs.py's optimizer_step per SAE: the
parallel part of each decoder row's gradient removed, gradient-norm clipping per SAE (not over
the stack), Adam (elementwise, so one Adam over the stack is S Adams), unit-norm decoder rows.
The SAEs are built (and initialised, each from its own seed stream) one by one first, then
stacked: `StackedTopK(saes)`; `unstack()` writes the trained weights back into them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sae_harvest.train.topk import TopKSAE


class StackedTopK(nn.Module):
    def __init__(self, saes: list[TopKSAE]):
        super().__init__()
        first = saes[0].cfg
        for sae in saes:
            c = sae.cfg
            if type(sae) is not TopKSAE or (c.d_in, c.d_sae, c.aux_k, c.aux_coeff) != \
                    (first.d_in, first.d_sae, first.aux_k, first.aux_coeff):
                raise ValueError("stacking needs plain topk SAEs of one shape (d_in, d_sae, aux_k, aux_coeff)")
        self.saes = list(saes)
        self.W_enc = nn.Parameter(torch.stack([s.W_enc.detach() for s in saes]))   # [S, d_in, d_sae]
        self.b_enc = nn.Parameter(torch.stack([s.b_enc.detach() for s in saes]))   # [S, d_sae]
        self.W_dec = nn.Parameter(torch.stack([s.W_dec.detach() for s in saes]))   # [S, d_sae, d_in]
        self.b_dec = nn.Parameter(torch.stack([s.b_dec.detach() for s in saes]))   # [S, d_in]
        self.register_buffer("ks", torch.tensor([s.cfg.k for s in saes], device=self.W_enc.device))
        self.k_max, self.d_sae = max(s.cfg.k for s in saes), first.d_sae
        self.aux_k, self.aux_coeff = first.aux_k, first.aux_coeff

    def __len__(self) -> int:
        return len(self.saes)

    def _gather_decode(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """sum_j vals[s, n, j] * W_dec[s, idx[s, n, j]] as one embedding-bag over the stacked rows."""
        S, n, j = idx.shape
        flat = (idx + (torch.arange(S, device=idx.device) * self.d_sae)[:, None, None]).reshape(S * n, j)
        rows = F.embedding_bag(flat, self.W_dec.reshape(S * self.d_sae, -1),
                               per_sample_weights=vals.reshape(S * n, j).to(self.W_dec.dtype), mode="sum")
        return rows.view(S, n, -1)

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None):
        """(summed loss, per-SAE terms {mse, aux, l0: [S]}, fired [S, d_sae] bool, x_hat [S, n, d_in]).
        dead: [S, d_sae] bool (an SAE with no dead latent has an all-False row) or None: no AuxK."""
        S = len(self)
        xc = x.unsqueeze(0) - self.b_dec[:, None]
        pre = F.relu(torch.baddbmm(self.b_enc[:, None], xc, self.W_enc))
        vals, idx = pre.topk(self.k_max, dim=-1, sorted=True)
        vals = vals * (torch.arange(self.k_max, device=x.device) < self.ks[:, None, None])
        feats = torch.zeros_like(pre).scatter(-1, idx, vals)
        x_hat = torch.baddbmm(self.b_dec[:, None], feats, self.W_dec)
        mse = (x_hat - x).pow(2).sum(-1).mean(-1)
        aux = self._auxk(pre, (x - x_hat).detach(), dead) if dead is not None else mse.new_zeros(S)
        aux = self.aux_coeff * aux
        terms = {"mse": mse.detach(), "aux": aux.detach(), "l0": (feats > 0).float().sum(-1).mean(-1)}
        return (mse + aux).sum(), terms, (feats > 0).any(1), x_hat

    def _auxk(self, pre, resid, dead):
        n_dead = dead.sum(-1)
        k_aux = n_dead.clamp(max=min(self.aux_k, self.d_sae // 2))   # per SAE
        k_top = int(k_aux.max())    # host read, as train/topk.py's auxk_loss
        if k_top == 0:
            return pre.new_zeros(len(self))
        masked = torch.where(dead[:, None, :], pre, torch.full_like(pre, -torch.inf))
        vals, idx = masked.topk(k_top, dim=-1, sorted=True)
        keep = torch.arange(k_top, device=pre.device) < k_aux[:, None, None]
        vals = torch.where(keep, vals, torch.zeros_like(vals))
        e_hat = self._gather_decode(idx, vals)
        var = (resid - resid.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
        return (e_hat - resid).pow(2).sum((1, 2)) / var * (k_aux > 0)

    @torch.no_grad()
    def prepare_update(self, grad_clip: float) -> None:
        """Before Adam, per SAE: the decoder rows' radial gradient removed, gradient-norm clipping."""
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self.W_dec.grad -= (self.W_dec.grad * unit).sum(-1, keepdim=True) * unit
        grads = [p.grad for p in self.parameters()]
        # the norm clip_grad_norm_ takes over one SAE's parameters: the norm of the per-tensor norms
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1).norm(dim=1)   # [S]
        coef = (grad_clip / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def unstack(self) -> list[TopKSAE]:
        """Copy the trained weights back into the SAEs they were stacked from; returns them."""
        for s, sae in enumerate(self.saes):
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(getattr(self, name)[s])
        return self.saes


def stacked_step(stack: StackedTopK, opt: torch.optim.Optimizer, x: torch.Tensor, since_fired: torch.Tensor,
                 dead_after: int, idle_bound: int, lr: float, grad_clip: float) -> dict:
    """One training step of the whole sweep, the batched form of train/local.py's _step +
    train/runs.py's optimizer_step. since_fired [S, d_sae] is updated in place; idle_bound is the
    host's upper bound on it (AuxK is skipped while no latent can be dead). Returns the terms."""
    dead = since_fired >= dead_after if idle_bound >= dead_after else None
    loss, terms, fired, _ = stack.loss(x, dead)
    loss.backward()
    for group in opt.param_groups:
        group["lr"] = lr
    stack.prepare_update(grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    stack.set_decoder_norm_to_unit_norm()
    since_fired += len(x)
    since_fired.masked_fill_(fired, 0)
    return terms
