"""Checks that need only the model's config, made before anything slow (building the offline
default model, downloading or loading weights): the layer count, the default site, --sites."""
from __future__ import annotations

import dataclasses
import os

from .default_model import N_LAYER, OFFLINE_MODEL
from .errors import HarvestError
from .sites import parse_sites


def default_site(n_layers: int) -> str:
    """The default --sites: the residual stream entering the middle block of whichever model."""
    return f"blocks.{n_layers // 2}.resid_pre"


def model_layers(model: str, revision: str | None = None, trust_remote_code: bool = False) -> int:
    """The model's number of transformer blocks, from its config alone (the offline default's is a
    constant of its recipe: nothing is built)."""
    if model == OFFLINE_MODEL:
        return N_LAYER
    from transformers import AutoConfig

    name = os.path.expanduser(str(model))
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(text.num_hidden_layers)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HarvestError(f"model '{model}' not found: {first}") from None


def resolve_sites(cfg):
    """`cfg` (a HarvestConfig) with its sites checked against the model's config, and the default
    site filled in when none was given."""
    n_layers = model_layers(cfg.model, cfg.revision, cfg.trust_remote_code)
    sites = cfg.sites if cfg.sites else default_site(n_layers)
    parse_sites(sites, n_layers)   # raises HarvestError: a layer out of range, a pattern matching nothing
    return dataclasses.replace(cfg, sites=sites)
