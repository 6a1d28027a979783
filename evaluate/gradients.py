"""The site gradients a g-SAE's gradient-aware selection uses at evaluation, in two modes.

paper:  grad[t] = d(sum_s CE_s) / d a[t], CE_s = -log p(token_{s+1} | tokens <= s): the gradient
        paper's protocol and what a `--grad-target labels` store (the default) holds for training. It uses the answer: CE_t scores
        token t+1, and every s > t reads tokens t+1..s. A model spliced with selections chosen this
        way is no longer causal, so its CE / KL are not comparable with other SAEs'.
causal: grad[t] = d L_t / d a[t] with L_t = -log p_t(argmax_v p_t(v)), the cross-entropy of
        position t against the model's own most likely prediction. L_t depends only on tokens
        <= t and no other position's loss enters, so the selection at t uses no token at or after
        t+1: the spliced model stays causal. It costs one backward through the blocks per position
        (batched with vmap when the model allows it, else a loop) per batch. A `--grad-target
        model-top1` store holds this gradient, so a g-SAE trained on it is evaluated on its own
        definition (harvest/grad_targets.py).
"""
from __future__ import annotations

import torch

from sae_harvest.harvest.grad_targets import causal_site_grads, own_prediction_loss  # noqa: F401 (re-exported)

GRAD_MODES = ("causal", "paper")
# the harvest's --grad-target each mode is the same definition as (harvest/grad_targets.py)
TARGET_OF_MODE = {"causal": "model-top1", "paper": "labels"}


def paper_site_grads(model, ids: torch.Tensor, sites) -> dict:
    """{site name: d(sum_s CE_s) / d a[t]} as the store holds them (harvest.sites.capture)."""
    from sae_harvest.harvest.sites import capture

    with torch.enable_grad():
        return capture(model, ids, sites, grads=True).grads
