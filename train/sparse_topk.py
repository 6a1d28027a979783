"""A sparse backward for the TopK family's encoder (topk, batchtopk, gtopk, matryoshka_batchtopk).

The forward stays dense: every latent's pre-activation is needed to choose the k largest,

    pre = ReLU((x - b_dec) @ W_enc + b_enc)        [n, d_sae], computed here without an autograd graph

but the loss depends on pre only at the chosen (row, latent) pairs: the top-k (or the batch's top
n*k) and AuxK's dead latents. Dense autograd still multiplies the whole [n, d_sae] gradient of pre
by x (2 n d_in d_sae FLOPs for W_enc's gradient, as many again for the input's). Here the values
at the chosen pairs carry the gradient, and the backward touches only those m ~ n*k pairs:

    g        = dL/dvalue, zero where the value is 0 (ReLU)                              [m]
    dL/db_enc[j]    = sum of g over the pairs with latent j                             (index_add_)
    dL/dW_enc[:, j] = sum of g * (x_i - b_dec) over the pairs (i, j)                    (sparse [d_sae, n] @ [n, d_in])
    dL/db_dec       = -W_enc @ dL/db_enc       (b_dec enters every row's input alike: -sum_i dL/d(x_i - b_dec))
    dL/dx           = sparse [n, d_sae] @ W_enc^T   (only if x itself needs a gradient)

2 m d_in FLOPs for W_enc instead of 2 n d_sae d_in: at k=32 of 24,576 latents, 768x fewer. This is
what OpenAI's TopK kernels ("Scaling and evaluating sparse autoencoders") and EleutherAI's
sparsify do with a custom kernel; here it is torch.sparse.mm on a COO matrix, on CPU and CUDA.
The dense backward (`--sparse-backward off`) stays as the reference; tests/test_sparse_backward.py
checks every architecture of the family against it, AuxK and two ranks' global top-k included.
"""
from __future__ import annotations

import torch


class _ValuesAt(torch.autograd.Function):
    """pre[rows, cols], differentiable in x, W_enc, b_enc and b_dec through the sparse backward."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, pre, rows, cols, center: bool):
        values = pre[rows, cols]
        ctx.center = center
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols, values)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        x, W_enc, b_dec, rows, cols, values = ctx.saved_tensors
        n, (d_in, d_sae) = x.shape[0], W_enc.shape
        # ReLU's gradient; computed in float32 whatever the forward's autocast dtype was
        g = (grad_values.float() * (values > 0)).contiguous()
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[:4]
        if need_b_enc or (need_b_dec and ctx.center):
            grad_b_enc = torch.zeros(d_sae, device=g.device, dtype=torch.float32).index_add_(0, cols, g)
        if need_W:
            xc = x.float() - b_dec.float() if ctx.center else x.float()
            by_latent = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (d_sae, n), check_invariants=False)
            grad_W = torch.sparse.mm(by_latent, xc).T.to(W_enc.dtype)
        if need_x:
            by_row = torch.sparse_coo_tensor(torch.stack([rows, cols]), g, (n, d_sae), check_invariants=False)
            grad_x = torch.sparse.mm(by_row, W_enc.detach().float().T).to(x.dtype)
        if need_b_dec and ctx.center:
            grad_b_dec = -(W_enc.detach().float() @ grad_b_enc).to(b_dec.dtype)
        if grad_b_enc is not None:
            grad_b_enc = grad_b_enc.to(W_enc.dtype) if need_b_enc else None
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None, None, None


class SparsePre:
    """An SAE's pre-activations for inputs x, with the sparse backward: `pre` has no graph;
    gather(idx) / at(rows, cols) give the chosen values, which do."""

    def __init__(self, sae, x: torch.Tensor):
        self.sae, self.x = sae, x
        with torch.no_grad():
            self.pre = sae.pre_acts(x)

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        sae = self.sae
        return _ValuesAt.apply(self.x, sae.W_enc, sae.b_enc, sae.b_dec, self.pre, rows, cols,
                               sae.apply_b_dec_to_input)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """pre.gather(-1, idx) for idx [n, j], with the sparse backward."""
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
        return self.at(rows.reshape(-1), idx.reshape(-1)).view(idx.shape)


def wants_sparse_backward(setting: str, device: torch.device) -> bool:
    """`--sparse-backward auto|on|off`: auto is on for CUDA, where the dense backward's two
    [n, d_sae] x d_in matmuls dominate the step; the CPU figure is in docs/benchmarks.md."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")
