"""What a loaded SAE knows about where it comes from: its site (our name and the TransformerLens
hook name), the model, the store and the checkpoint folder; read from cfg.json by load_sae()."""
from __future__ import annotations

from dataclasses import dataclass

from sae_harvest.train.saelens_format import hook_name_of, tl_hook_name


@dataclass(frozen=True)
class Provenance:
    path: str                     # the checkpoint folder it was loaded from
    site: str | None              # our site name, blocks.6.resid_pre (meta-SAEs: "meta:<parent path>")
    hook_name: str | None         # the TransformerLens hook name, blocks.6.hook_resid_pre (SAELens's)
    model: str | None             # the model it was trained on (HF id or local path)
    store: str | None             # the store it was trained from (None: SAELens checkpoints, meta-SAEs)
    sweep_name: str | None        # its folder name within the sweep, e.g. topk_k32
    decoder_of: str | None        # meta-SAEs: the SAE whose decoder rows it was trained on


def provenance_of(cfg_json: dict, path) -> Provenance:
    ours = cfg_json.get("sae_harvest") if isinstance(cfg_json.get("sae_harvest"), dict) else {}
    meta = cfg_json.get("metadata") if isinstance(cfg_json.get("metadata"), dict) else {}
    site = hook_name_of(cfg_json)
    return Provenance(
        path=str(path), site=site,
        hook_name=tl_hook_name(site) if site and not site.startswith("meta:") else site,
        model=cfg_json.get("model_name") or meta.get("model_name") or ours.get("model_name"),
        store=ours.get("store"), sweep_name=ours.get("sweep_name"), decoder_of=ours.get("decoder_of"))
