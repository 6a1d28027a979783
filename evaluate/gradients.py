"""The site gradients a g-SAE's gradient-aware selection uses at evaluation, in two modes.

paper:  grad[t] = d(sum_s CE_s) / d a[t], CE_s = -log p(token_{s+1} | tokens <= s): the gradient
        paper's protocol and what the store holds for training. It uses the answer: CE_t scores
        token t+1, and every s > t reads tokens t+1..s. A model spliced with selections chosen this
        way is no longer causal, so its CE / KL are not comparable with other SAEs'.
causal: grad[t] = d L_t / d a[t] with L_t = -log p_t(argmax_v p_t(v)), the cross-entropy of
        position t against the model's own most likely prediction. L_t depends only on tokens
        <= t and no other position's loss enters, so the selection at t uses no token at or after
        t+1: the spliced model stays causal. It costs one backward through the blocks per position
        (batched with vmap when the model allows it, else a loop) per batch.
"""
from __future__ import annotations

import torch

GRAD_MODES = ("causal", "paper")
POSITIONS_PER_BACKWARD = 16


def own_prediction_loss(logits: torch.Tensor) -> torch.Tensor:
    """[B, T]: -log p_t(argmax p_t), the CE of each position against the model's own prediction."""
    logp = torch.log_softmax(logits.float(), -1)
    return -logp.gather(-1, logp.argmax(-1, keepdim=True)).squeeze(-1)


def causal_site_grads(model, ids: torch.Tensor, site) -> torch.Tensor:
    """[B, T, d]: d L_t / d a[t] per position t (see the module docstring), float32.

    Two stages, so the vocabulary-sized part runs once: the unembedding is position-wise, so one
    backward gives v_t = d L_t / d h[t] for the final hidden states h; then d L_t / d a[t] =
    (d h[t] / d a[t])^T v_t, one vector-Jacobian product per position through the blocks only."""
    from sae_harvest.harvest.sites import splice

    held = {}

    def tap(a):
        held["a"] = a.detach().requires_grad_(True)
        return held["a"]

    def cut(_mod, args):   # the unembedding's input: keep the graph up to it, restart from a leaf
        held["h"] = args[0]
        held["h_leaf"] = args[0].detach().requires_grad_(True)
        return (held["h_leaf"], *args[1:])

    head = model.get_output_embeddings().register_forward_pre_hook(cut)
    try:
        with torch.enable_grad(), splice(model, site, tap):
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        head.remove()
    a, h, h_leaf = held["a"], held["h"], held["h_leaf"]
    with torch.enable_grad():
        (v,) = torch.autograd.grad(own_prediction_loss(logits).sum(), h_leaf)   # [B, T, d_model]
        T = ids.shape[1]
        out = torch.empty(a.shape, dtype=torch.float32, device=a.device)
        # Sequences are independent, so each product covers the whole batch at once; positions are
        # batched (vmap over the backward) in chunks to bound memory.
        batched = True
        for lo in range(0, T, POSITIONS_PER_BACKWARD):
            ts = torch.arange(lo, min(T, lo + POSITIONS_PER_BACKWARD), device=a.device)
            cot = torch.zeros(len(ts), *v.shape, dtype=v.dtype, device=v.device)   # [t, B, T, d]
            cot[torch.arange(len(ts)), :, ts] = v[:, ts].transpose(0, 1)
            if batched:
                try:
                    (g,) = torch.autograd.grad(h, a, grad_outputs=cot.to(h.dtype), is_grads_batched=True,
                                               retain_graph=True)
                    out[:, ts] = g[torch.arange(len(ts)), :, ts].transpose(0, 1).float()
                    continue
                except RuntimeError:   # an op without a batching rule: one product per position
                    batched = False
            for j, t in enumerate(ts.tolist()):
                (g,) = torch.autograd.grad(h, a, grad_outputs=cot[j].to(h.dtype), retain_graph=True)
                out[:, t] = g[:, t].float()
    return out


def paper_site_grads(model, ids: torch.Tensor, sites) -> dict:
    """{site name: d(sum_s CE_s) / d a[t]} as the store holds them (harvest.sites.capture)."""
    from sae_harvest.harvest.sites import capture

    with torch.enable_grad():
        return capture(model, ids, sites, grads=True).grads
