"""What a harvest's stored gradient is the gradient of (`harvest run --grad-target`).

labels:     grad[t] = d(sum_s CE_s) / d a[t], CE_s = -log p(token_{s+1} | tokens <= s): the gradient
            paper's protocol (g-SAE paper); it uses the tokens being scored, so a g-SAE that selects
            with it at evaluation makes the spliced model non-causal.
model-top1: grad[t] = d L_t / d a[t], L_t = -log p_t(argmax_v p_t(v)): the cross-entropy of position
            t against the model's own most likely prediction, its own position only. Label-free and
            causal: it reads no token after t. `evaluate splice`'s "causal" gradient mode is this
            definition, so a g-SAE harvested and trained with it is evaluated on what it trained on.
            It costs one backward through the blocks per position (batched with vmap when the model
            allows it), several times a labels harvest.
"""
from __future__ import annotations

import torch

POSITIONS_PER_BACKWARD = 16
GRAD_TARGETS = {
    "labels": ("grad[t] = d(sum_{s=0}^{T-2} CE_s)/d(act[t]) per sequence, CE_s = -log p(token[s+1] | "
               "tokens[:s+1]) in nats; summed (not averaged) over the sequence's positions, taken w.r.t. the "
               "raw site activation in the harvest dtype; zero at the last position (it predicts nothing)"),
    "model-top1": ("grad[t] = d L_t/d(act[t]), L_t = -log p_t(argmax_v p_t(v)) in nats: the cross-entropy of "
                   "position t against the model's own top prediction, that position only (label-free, "
                   "causal); taken w.r.t. the raw site activation in the harvest dtype"),
}
LOSS_OF = {"labels": "next-token cross-entropy", "model-top1": "cross-entropy against the model's own top-1"}


def target_of(grads_attrs: dict | None) -> str | None:
    """The gradient target of a store's `grads` attributes (a store from before the option: labels)."""
    return None if not grads_attrs else grads_attrs.get("target", "labels")


def site_grads(model, ids: torch.Tensor, sites, target: str) -> dict:
    """{site name: [B, T, d] float32 gradient} of the given target (labels: see harvest.sites.capture)."""
    if target == "labels":
        from .sites import capture
        with torch.enable_grad():
            return capture(model, ids, sites, grads=True).grads
    return {s.name: causal_site_grads(model, ids, s) for s in sites}


def own_prediction_loss(logits: torch.Tensor) -> torch.Tensor:
    """[B, T]: -log p_t(argmax p_t), the CE of each position against the model's own prediction."""
    logp = torch.log_softmax(logits.float(), -1)
    return -logp.gather(-1, logp.argmax(-1, keepdim=True)).squeeze(-1)


def causal_site_grads(model, ids: torch.Tensor, site) -> torch.Tensor:
    """[B, T, d]: d L_t / d a[t] per position t (see the module docstring), float32.

    Two stages, so the vocabulary-sized part runs once: the unembedding is position-wise, so one
    backward gives v_t = d L_t / d h[t] for the final hidden states h; then d L_t / d a[t] =
    (d h[t] / d a[t])^T v_t, one vector-Jacobian product per position through the blocks only."""
    from .sites import splice

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
