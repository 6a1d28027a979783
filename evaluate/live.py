"""What the analyses (`evaluate stitch`) take from the live model, in the context `evaluate splice`
opens (splice.open_live: the SAEs, the model and the evaluation tokens, checked the same way)."""
from __future__ import annotations

import torch

from sae_harvest.evaluate.splice import Live


def site_activations(live: Live, site, batch_size: int) -> torch.Tensor:
    """The clean activations at `site` for every evaluation token at positions >= 1, [n, width]
    float32: SAEs are trained without position 0 (GPT-2's attention sink, norm in the thousands)."""
    from sae_harvest.harvest.sites import capture

    out = []
    with torch.no_grad():
        for ids in live.ids.split(batch_size):
            a = capture(live.model, ids.to(live.device), [site], stop_early=True).acts[site.name]
            out.append(a[:, 1:].reshape(-1, a.shape[-1]).float())
    return torch.cat(out)


def reconstruct_after_position0(reconstruct):
    """A splice function replacing positions >= 1 by reconstruct(rows) of their [n, d] rows and
    keeping the clean activation at position 0, as SAELens's evals do and as the SAEs were trained."""
    from sae_harvest.harvest.sites import keep_clean_positions

    def replace(a):
        rest = a[:, 1:]
        return keep_clean_positions(a, reconstruct(rest.reshape(-1, a.shape[-1])).view(rest.shape))
    return replace
