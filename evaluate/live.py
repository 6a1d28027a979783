"""The live-model side the analyses share (`evaluate stitch`): load SAEs, the model and the
evaluation tokens exactly as `evaluate splice` does, using splice.py's own input helpers, and
splice a reconstruction while keeping position 0 clean."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_harvest.evaluate.splice import (Entry, EvaluateError, attach_site, dataset_tokens, load_entry,
                                         store_tokens)


@dataclass
class Live:
    model: torch.nn.Module
    adapter: object
    ids: torch.Tensor          # [n_seqs, ctx_len] evaluation tokens (held-out store rows or text)
    model_name: str
    entries: list[Entry]       # the SAEs, each attached to its site in this model
    device: torch.device
    origin: dict | None = None  # how many evaluation tokens and where from (splice.store_tokens)


def open_live(paths, *, model=None, revision=None, store=None, dataset=None, split="train",
              text_column="text", tokens=None, ctx_len=None, device="auto", dtype="float32",
              skip_docs: int = 0, default_tokens: int | None = None) -> Live:
    """The SAEs at `paths`, the model (default: the store's) and the evaluation tokens: `tokens` of
    the store's held-out sequences (more is refused) or of the dataset; with tokens None, all the
    held-out ones up to default_tokens (or 65536 of text). Raises a UserError for any input problem,
    with the same messages as `evaluate splice`."""
    from sae_harvest.harvest.default_model import resolve_model
    from sae_harvest.harvest.models import get_adapter, load_model, quiet_transformers
    from sae_harvest.stores.cli import pick_device

    if (store is None) == (dataset is None):
        raise EvaluateError("give exactly one of --store (its held-out sequences) or --dataset")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise EvaluateError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    if tokens is not None and tokens <= 0:
        raise EvaluateError("--tokens must be positive")
    dev = pick_device(device)
    entries = [load_entry(p, dev) for p in paths]
    ids, store_obj, origin = (None, None, None) if store is None else store_tokens(store, tokens, ctx_len, default_tokens)
    if store_obj is not None and model is None:
        stored = store_obj.attrs.get("model", {})
        model, revision = stored.get("name"), revision or stored.get("revision")
    if not model:
        raise EvaluateError("no model given (--model)")
    quiet_transformers()
    net, tokenizer = load_model(resolve_model(model), revision=revision, device=dev, dtype=getattr(torch, dtype))
    adapter = get_adapter(net)
    for e in entries:
        attach_site(e, adapter)
    if ids is None:
        ids, origin = dataset_tokens(dataset, tokenizer, tokens, ctx_len, split, text_column, skip_docs,
                                     default_tokens or 65536)
    if ids.shape[1] < 3:
        raise EvaluateError(f"sequences of {ids.shape[1]} tokens are too short to evaluate")
    if ids.shape[1] > adapter.max_positions:
        raise EvaluateError(f"ctx_len {ids.shape[1]} exceeds the model's {adapter.max_positions} positions")
    return Live(net, adapter, ids, model, entries, dev, origin)


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


def keep_position0(reconstruct):
    """A splice function replacing positions >= 1 by reconstruct(a[:, 1:]) and keeping the clean
    activation at position 0, as SAELens's evals do and as the SAEs were trained."""
    def replace(a):
        out = a.clone()
        rest = a[:, 1:]
        out[:, 1:] = reconstruct(rest.reshape(-1, a.shape[-1])).view(rest.shape).to(a.dtype)
        return out
    return replace
