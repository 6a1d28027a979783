"""Names and checkpoints shared with SAELens / TransformerLens / SAEBench.

Our site names (blocks.L.resid_pre, ...) are not TransformerLens hook names; cfg.json's top-level
`hook_name` carries the TransformerLens name SAELens's HookedSAETransformer and SAEBench attach by,
and our own name stays in the "sae_harvest" section. The other direction: a checkpoint SAELens
wrote (no "sae_harvest" section; architecture standard, gated, topk or jumprelu; v6 keeps hook_name
under "metadata", older files at the top level) loads into the equivalent SAE of ours:
    standard -> relu       gated -> gated       topk -> topk       jumprelu -> batchtopk (inference)
exactly (same latents, same reconstruction): an apply_b_dec_to_input that differs from ours is
folded into the encoder bias, since (x - b_dec) @ W_enc + b = x @ W_enc + (b - b_dec @ W_enc).
"""
from __future__ import annotations

import re

import torch

from sae_harvest.harvest.models import KINDS
from sae_harvest.stores.errors import UserError

# our site kind (harvest/models.py SITE_KINDS) -> TransformerLens hook suffix (after "blocks.L."). attn_in
# is TransformerLens's hook_attn_in only with use_attn_in (per-head copies); mlp_in is hook_mlp_in after
# ln2, i.e. ln2.hook_normalized: we name the normalised input, as circuit-tracer's GPT-2 transcoders do.
TL_HOOKS = {"resid_pre": "hook_resid_pre", "attn_in": "ln1.hook_normalized", "attn_z": "attn.hook_z",
            "attn_out": "hook_attn_out", "resid_mid": "hook_resid_mid", "mlp_in": "ln2.hook_normalized",
            "mlp_act": "mlp.hook_post", "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post"}
assert set(TL_HOOKS) == set(KINDS), "every site kind needs a TransformerLens name"
# ln1/ln2.hook_normalized are before the norm's affine weights (which TransformerLens folds into the
# next layer by default), ours after: a foreign SAE hooked there is not read as attn_in / mlp_in
_FROM_TL = {v: k for k, v in TL_HOOKS.items() if k not in ("attn_in", "mlp_in")}
_OURS = re.compile(r"^blocks\.(\d+)\.([a-z_]+)$")
_TL = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(h) for h in TL_HOOKS.values()) + r")$")
# SAELens's HF wrapper (HookedProxyLM) names modules; a decoder block's output is resid_post
_HF_BLOCK = re.compile(r"^(?:transformer\.h|model\.layers|model\.language_model\.layers|gpt_neox\.layers)\.(\d+)$")

SAELENS_TO_OURS = {"standard": "relu", "gated": "gated", "topk": "topk", "jumprelu": "batchtopk"}


class ForeignCheckpointError(UserError, ValueError):
    """A SAELens-format checkpoint this tool cannot represent exactly."""


def tl_hook_name(site: str | None) -> str | None:
    """blocks.6.resid_pre -> blocks.6.hook_resid_pre; names that are not sites pass through."""
    m = _OURS.match(site or "")
    if not m or m.group(2) not in TL_HOOKS:
        return site
    return f"blocks.{m.group(1)}.{TL_HOOKS[m.group(2)]}"


def site_from_hook_name(hook: str) -> str:
    """Our site name from ours, a TransformerLens hook name or an HF block path; ValueError if none."""
    hook = str(hook).strip()
    m = _OURS.match(hook)
    if m and m.group(2) in TL_HOOKS:
        return hook
    m = _TL.match(hook)
    if m and m.group(2) in _FROM_TL:
        return f"blocks.{m.group(1)}.{_FROM_TL[m.group(2)]}"
    m = _HF_BLOCK.match(hook)
    if m:
        return f"blocks.{m.group(1)}.resid_post"
    raise ValueError(f"hook_name {hook!r} is neither a site (blocks.L.resid_pre), a TransformerLens hook "
                     f"({', '.join(sorted(_FROM_TL))} under blocks.L) nor an HF block path (transformer.h.L)")


def hook_name_of(cfg_json: dict) -> str | None:
    """The site an SAE's cfg.json names, in our spelling when it is a site (meta-SAEs: 'meta:...')."""
    ours = (cfg_json.get("sae_harvest") or {}).get("hook_name")
    if ours:
        return ours
    hook = cfg_json.get("hook_name") or (cfg_json.get("metadata") or {}).get("hook_name")
    if not hook:
        return None
    try:
        return site_from_hook_name(hook)
    except ValueError:
        return str(hook)


def is_saelens_checkpoint(cfg_json: dict) -> bool:
    return "sae_harvest" not in cfg_json and "architecture" in cfg_json


def convert_saelens(cfg_json: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(SAEConfig fields, our state dict) equivalent to a SAELens checkpoint; ForeignCheckpointError
    for what cannot be represented exactly."""
    arch = cfg_json.get("architecture")
    if arch not in SAELENS_TO_OURS:
        raise ForeignCheckpointError(f"SAELens architecture {arch!r} is not supported; "
                                     f"supported: {', '.join(SAELENS_TO_OURS)}")
    norm = cfg_json.get("normalize_activations") or "none"
    if norm != "none":
        raise ForeignCheckpointError(f"normalize_activations {norm!r} is not supported (only 'none': "
                                     f"weights that take raw activations)")
    if cfg_json.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise ForeignCheckpointError(f"reshape_activations {cfg_json['reshape_activations']!r} is not supported")
    for flag in ("rescale_acts_by_decoder_norm", "finetuning_scaling_factor"):
        if cfg_json.get(flag):
            raise ForeignCheckpointError(f"{flag} is not supported")
    t = {n: v.clone() for n, v in tensors.items()}
    if "log_threshold" in t:   # older SAELens jumprelu checkpoints
        t["threshold"] = t.pop("log_threshold").exp()
    expected = {"standard": {"W_enc", "b_enc", "W_dec", "b_dec"}, "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
                "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
                "gated": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}}[arch]
    if set(t) != expected:
        raise ForeignCheckpointError(f"SAELens {arch} tensors {sorted(t)} != expected {sorted(expected)}")
    ours = SAELENS_TO_OURS[arch]
    fields = {"arch": ours, "d_in": int(cfg_json["d_in"]), "d_sae": int(cfg_json["d_sae"])}
    if arch == "topk":
        fields["k"] = int(cfg_json["k"])
    if arch == "jumprelu":
        fields["k"] = 1   # only used by BatchTopK training; inference is the stored threshold
    # our relu encodes x directly, every other architecture x - b_dec: fold a differing flag
    applies = bool(cfg_json.get("apply_b_dec_to_input", True))
    wants = ours != "relu"
    if applies != wants:
        shift = t["b_dec"].float() @ t["W_enc"].float()    # b_dec @ W_enc, [d_sae]
        sign = -1.0 if applies else 1.0                    # remove it (relu) or add it (the others)
        if arch == "gated":
            t["b_gate"] = (t["b_gate"].float() + sign * shift).to(t["b_gate"].dtype)
            t["b_mag"] = (t["b_mag"].float() + sign * shift * t["r_mag"].float().exp()).to(t["b_mag"].dtype)
        else:
            t["b_enc"] = (t["b_enc"].float() + sign * shift).to(t["b_enc"].dtype)
    if arch == "jumprelu" and t["threshold"].dim() == 0:
        t["threshold"] = t["threshold"].expand(fields["d_sae"]).clone()
    return fields, t
