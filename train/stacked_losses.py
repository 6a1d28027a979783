"""The losses of stacked SAEs (train/stacked.py): each architecture's `loss()` in batched form over a
leading SAE dimension S, term for term what the architecture's own file computes per SAE.

Every function takes the stack `st` (parameters [S, ...], per-SAE hyperparameters as [S] buffers),
the inputs `x` [S, n, d_in] (each SAE its own rows: a site each), the dead mask [S, d_sae] or
None and the step's `reducer` (train/distributed.py's Reducer; LOCAL: one process), and returns
(per-SAE loss [S], per-SAE detached terms {name: [S]} in the order the architecture's loss() logs
them, feats [S, n, d_sae], x_hat [S, n, d_in]).
The SAEs share no parameter, so the gradient of sum_s loss_s is each SAE's own.
Under torchrun data parallel the batch-wide parts (AuxK's residual variance, BatchTopK's top-k and
its threshold) reduce over the ranks through that reducer, as the per-SAE code does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_harvest.train.distributed import LOCAL, Reducer
from sae_harvest.train.jumprelu import JumpReLUFunction, StepFunction


def _mse(x, x_hat):
    return (x_hat - x).pow(2).sum(-1).mean(-1)


def _decode(st, feats):
    return torch.baddbmm(st.b_dec[:, None], feats, st.W_dec)


def _center(st, x):
    return x - st.b_dec[:, None] if st.apply_b_dec_to_input else x


def _detached(terms: dict) -> dict:
    return {n: t.detach() for n, t in terms.items()}


def gather_decode(st, idx, vals):
    """sum_j vals[s, n, j] * W_dec[s, idx[s, n, j]]: one embedding-bag over the stacked rows (no bias)."""
    S, n, j = idx.shape
    flat = (idx + (torch.arange(S, device=idx.device) * st.d_sae)[:, None, None]).reshape(S * n, j)
    return F.embedding_bag(flat, st.W_dec.reshape(S * st.d_sae, -1),
                           per_sample_weights=vals.reshape(S * n, j).to(st.W_dec.dtype), mode="sum").view(S, n, -1)


def auxk(st, pre, resid, dead, values_at=None, reducer: Reducer = LOCAL):
    """train/topk.py's auxk_loss per SAE, k_aux_s = min(aux_k, d_sae/2, n_dead_s); values_at(idx):
    the differentiable values of pre at idx when pre carries no graph (the sparse backward)."""
    S, n = pre.shape[:2]
    if dead is None:
        return pre.new_zeros(S)
    k_aux = dead.sum(-1).clamp(max=min(st.aux_k, st.d_sae // 2))
    k_top = int(k_aux.max())    # host read, as auxk_loss
    if k_top == 0:
        return pre.new_zeros(S)
    masked = torch.where(dead[:, None, :], pre, torch.full_like(pre, -torch.inf))
    vals, idx = masked.topk(k_top, dim=-1, sorted=True)
    if values_at is not None:
        vals = values_at(idx)
    keep = torch.arange(k_top, device=pre.device) < k_aux[:, None, None]
    vals = torch.where(keep, vals, torch.zeros_like(vals))
    e_hat = gather_decode(st, idx, vals)
    # Reducer.residual_variance per SAE: the global batch's
    mean = reducer.all_sum(resid.sum(1)) / (n * reducer.ranks())
    var = reducer.all_sum((resid - mean[:, None]).pow(2).sum((1, 2))).clamp_min(1e-12)
    return (e_hat - resid).pow(2).sum((1, 2)) / var * reducer.ranks() * (k_aux > 0)


class _ValuesAt(torch.autograd.Function):
    """pre[s, i, idx[s, i, j]], differentiable in W_enc, b_enc and b_dec through the sparse backward
    of train/sparse_topk.py (its _ValuesAt per SAE), as one sparse matmul over the stack: row
    s*d_sae + j of a [S*d_sae, S*n] COO matrix holds SAE s's latent j."""

    @staticmethod
    def forward(ctx, W_enc, b_enc, b_dec, x, pre, idx, center: bool):
        values = pre.gather(-1, idx)
        ctx.center = center
        ctx.save_for_backward(x, W_enc, b_dec, idx, values)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        x, W_enc, b_dec, idx, values = ctx.saved_tensors
        (S, n, j), (d_in, d_sae) = idx.shape, W_enc.shape[1:]
        g = (grad_values.float() * (values > 0)).reshape(-1)   # ReLU's gradient, in float32
        latent = (idx + (torch.arange(S, device=idx.device) * d_sae)[:, None, None]).reshape(-1)
        row = torch.arange(S * n, device=idx.device).view(S, n, 1).expand(S, n, j).reshape(-1)
        need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[:3]
        grad_W = grad_b_enc = grad_b_dec = None
        g_b = torch.zeros(S * d_sae, device=g.device, dtype=torch.float32).index_add_(0, latent, g).view(S, d_sae)
        if need_W:
            xc = x.float() - b_dec.float()[:, None] if ctx.center else x.float()
            by_latent = torch.sparse_coo_tensor(torch.stack([latent, row]), g, (S * d_sae, S * n),
                                                check_invariants=False)
            grad_W = torch.sparse.mm(by_latent, xc.reshape(S * n, d_in)).view(S, d_sae, d_in).transpose(1, 2)
            grad_W = grad_W.to(W_enc.dtype)
        if need_b_dec and ctx.center:
            grad_b_dec = -torch.bmm(W_enc.detach().float(), g_b[:, :, None]).squeeze(-1).to(b_dec.dtype)
        if need_b_enc:
            grad_b_enc = g_b.to(W_enc.dtype)
        return grad_W, grad_b_enc, grad_b_dec, None, None, None, None


def topk(st, x, dead, reducer: Reducer = LOCAL):
    """train/topk.py: top-k_s of ReLU((x - b_dec) W_enc + b_enc) (top max(k) taken, entries past k_s dropped)."""
    values_at = None
    if st.sparse_backward:   # the SAEs' --sparse-backward: pre without a graph, the chosen values carry it
        with torch.no_grad():
            pre = F.relu(torch.baddbmm(st.b_enc[:, None], _center(st, x), st.W_enc))

        def values_at(at):
            return _ValuesAt.apply(st.W_enc, st.b_enc, st.b_dec, x, pre, at, st.apply_b_dec_to_input)
    else:
        pre = F.relu(torch.baddbmm(st.b_enc[:, None], _center(st, x), st.W_enc))
    if st.one_k:   # every SAE the same k (the sites' SAEs of one sweep value): no ranking, no mask
        vals, idx = pre.topk(st.k_max, dim=-1, sorted=False)
    else:
        vals, idx = pre.topk(st.k_max, dim=-1, sorted=True)
    if values_at is not None:
        vals = values_at(idx)
    if not st.one_k:
        vals = vals * (torch.arange(st.k_max, device=x.device) < st.ks[:, None, None])
    feats = torch.zeros_like(pre).scatter(-1, idx, vals)
    # the SAEs' sparse decode (TopKSAE.enable_sparse_decode: on CUDA when k <= d_sae/16): gather the k rows
    x_hat = gather_decode(st, idx, vals) + st.b_dec[:, None] if st.sparse_decode else _decode(st, feats)
    return _topk_terms(st, x, pre, feats, x_hat, dead, reducer, values_at)


def _topk_terms(st, x, pre, feats, x_hat, dead, reducer, values_at=None):
    mse = _mse(x, x_hat)
    aux = st.aux_coeff * auxk(st, pre, (x - x_hat).detach(), dead, values_at, reducer)
    terms = {"mse": mse, "aux": aux, "l0": (feats > 0).float().sum(-1).mean(-1)}
    return mse + aux, _detached(terms), feats, x_hat


def batch_thresholds(pre: torch.Tensor, ks: torch.Tensor, k_max: int, reducer: Reducer = LOCAL) -> torch.Tensor:
    """Reducer.batch_topk's cutoff per SAE: the (n_global k_s)-th largest entry of pre[s]. Each
    rank offers its top n_global max(k) values per SAE (a superset of its top n_global k_s, so the
    cutoff is the same value), gathered in one all_gather for the whole stack."""
    S, n, d = pre.shape
    flat = pre.detach().reshape(S, -1)
    ranks = reducer.ranks()
    offer = flat.topk(min(n * ranks * k_max, flat.shape[1]), dim=1, sorted=True).values
    if ranks > 1:
        # the global batch holds n ranks d entries: when n ranks k_max > n d a rank's offer (capped at
        # its n d) is shorter than the cutoff's rank, so keep that many of the gathered offers, not one offer's
        offers = reducer.all_gather(offer.contiguous(), dim=1)
        offer = offers.topk(min(n * ranks * k_max, offers.shape[1]), dim=1, sorted=True).values
    want = n * ranks * ks
    return offer.gather(1, (want - 1)[:, None]).squeeze(1)


def batchtopk(st, x, dead, reducer: Reducer = LOCAL):
    """train/batchtopk.py: the n k_s largest pre-activations of each SAE over the (global) batch;
    in training mode each SAE's threshold EMA is updated as update_threshold does."""
    pre = F.relu(torch.baddbmm(st.b_enc[:, None], _center(st, x), st.W_enc))
    cut = batch_thresholds(pre, st.ks, st.k_max, reducer)
    feats = pre * (pre >= cut[:, None, None])
    if st.training:
        _update_thresholds(st, feats, reducer)
    return _topk_terms(st, x, pre, feats, _decode(st, feats), dead, reducer)


@torch.no_grad()
def _update_thresholds(st, feats, reducer):
    """BatchTopKSAE.update_threshold per SAE: the EMA of the (global) batch's least kept activation."""
    least = torch.where(feats > 0, feats, torch.full_like(feats, torch.inf)).amin((1, 2))
    least = reducer.global_min(least.float()).to(st.threshold.dtype)[:, None]
    d = st.threshold_ema
    ema = st.threshold.mul(d).add((1 - d) * least)
    fresh = st.threshold[:, :1] < 0
    st.threshold.copy_(torch.where(torch.isinf(least), st.threshold, torch.where(fresh, least.expand_as(ema), ema)))


def relu(st, x, dead, reducer: Reducer = LOCAL):   # nothing batch-wide: reducer unused
    """train/relu.py: ReLU(x W_enc + b_enc) (no centring), L1 weighted l1_s / d_in."""
    feats = F.relu(torch.baddbmm(st.b_enc[:, None], x, st.W_enc))
    x_hat = _decode(st, feats)
    mse = _mse(x, x_hat)
    l1 = feats.abs().sum(-1).mean(-1)
    sparsity = st.l1_over_d * l1
    terms = {"mse": mse, "sparsity": sparsity, "l1": l1, "l0": (feats > 0).float().sum(-1).mean(-1)}
    return mse + sparsity, _detached(terms), feats, x_hat


def jumprelu(st, x, dead, reducer: Reducer = LOCAL):   # nothing batch-wide: reducer unused
    """train/jumprelu.py: JumpReLU with theta_s = exp(log_threshold_s); lambda_s times the L0 stand-in."""
    pre = torch.baddbmm(st.b_enc[:, None], _center(st, x), st.W_enc)
    theta = st.log_threshold.exp()[:, None].to(pre.dtype)
    feats = JumpReLUFunction.apply(pre, theta, st.bandwidth)
    x_hat = _decode(st, feats)
    mse = _mse(x, x_hat)
    if st.l0_penalty == "tanh":
        count = torch.tanh(st.tanh_scale * feats * st.W_dec.norm(dim=-1)[:, None]).sum(-1)
    else:
        count = StepFunction.apply(pre, theta, st.bandwidth).sum(-1)
    sparsity = st.l1 * count.mean(-1)
    terms = {"mse": mse, "sparsity": sparsity, "l0": (feats > 0).float().sum(-1).mean(-1)}
    return mse + sparsity, _detached(terms), feats, x_hat


def gated(st, x, dead, reducer: Reducer = LOCAL):   # nothing batch-wide: reducer unused
    """train/gated.py: gate and magnitude paths tied through W_enc, L1 on ReLU(pi_gate), and the
    gate's reconstruction through the frozen decoder."""
    xw = torch.bmm(_center(st, x), st.W_enc)
    pi_gate = xw + st.b_gate[:, None]
    pi_mag = xw * torch.exp(st.r_mag)[:, None] + st.b_mag[:, None]
    feats = (pi_gate > 0).to(pi_mag.dtype) * F.relu(pi_mag)
    x_hat = _decode(st, feats)
    mse = _mse(x, x_hat)
    gate_acts = F.relu(pi_gate)
    l1 = gate_acts.sum(-1).mean(-1)
    sparsity = st.l1 * l1
    aux = _mse(x, torch.baddbmm(st.b_dec.detach()[:, None], gate_acts, st.W_dec.detach()))
    terms = {"mse": mse, "sparsity": sparsity, "aux": aux, "l1": l1, "l0": (feats > 0).float().sum(-1).mean(-1)}
    return mse + sparsity + aux, _detached(terms), feats, x_hat
