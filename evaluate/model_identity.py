"""Which model an evaluation reads through, against the model that made its store and the models its
SAEs were trained on (harvest/fingerprint.py's fingerprints: config and sampled weights).

A store records its model by the name typed at harvest time, so `gpt2` may be a folder relative to
where the harvest ran, or a hub name whose files have changed since: loaded from elsewhere, it is
another model, and the store's tokens and rows would be read through it. A model the store names
is therefore checked against the store's recorded fingerprint and refused when it differs; one the
user names with --model is theirs to choose (an SAE carried to a fine-tune), with a warning, and the
results say which. The same goes for an SAE trained on another model's activations.
"""
from __future__ import annotations

import sys

from sae_harvest.stores.urls import scrub

from .eval_tokens import EvaluateError, trained_model_digest


def model_identity(store_obj, name: str, revision: str | None, *, named_by_user: bool, store: str | None,
                   what: str) -> dict:
    """{"model_digest", "store_model_digest", "model_matches_store"} (the last two None without a
    store, or for a store that predates provenance)."""
    from sae_harvest.harvest.default_model import resolve_model
    from sae_harvest.harvest.errors import HarvestError
    from sae_harvest.harvest.fingerprint import model_against_store, model_fingerprint

    try:
        if store_obj is None:
            return {"model_digest": model_fingerprint(resolve_model(name), revision)["digest"],
                    "store_model_digest": None, "model_matches_store": None}
        return model_against_store(store_obj.attrs, name, revision, named_by_user=named_by_user, store=store,
                                   what=what)
    except HarvestError as e:
        raise EvaluateError(str(e)) from None


def check_trained_models(entries, model_digest: str, *, named_by_user: bool) -> None:
    """Sets each entry's `trained_model` ({"digest", "matches"}); an SAE trained on another model's
    activations is refused unless the user named the model (--model): then a warning."""
    seen = {}
    for e in entries:
        digest = trained_model_digest(e.cfg, seen)
        e.trained_model = {"digest": digest, "matches": None if digest is None else digest == model_digest}
        if e.trained_model["matches"] is False:
            clause = (f"{scrub(e.path)} was trained on another model's activations (fingerprint {digest[:12]}) "
                      f"than the one loaded ({model_digest[:12]})")
            if not named_by_user:
                raise EvaluateError(f"{clause}; to evaluate it in this model on purpose, name it with --model")
            print(f"warning: {clause}: evaluated in the model you named", file=sys.stderr, flush=True)
