"""Where an evaluation's tokens come from (a store's held-out sequences, or a dataset) and whether
the SAEs evaluated on them could have trained on them; the checks an SAE read against a store's
rows needs. Shared by `evaluate splice` and the analyses that read a store (features, geometry)."""
from __future__ import annotations

import math
from itertools import islice

import numpy as np
import torch

from sae_harvest.stores.errors import UserError
from sae_harvest.stores.urls import scrub


class EvaluateError(UserError):
    """A bad evaluation input (SAE that does not fit the model, unknown site, nothing to evaluate)."""


def store_tokens(store_path: str, tokens: int | None, ctx_len: int | None, default_cap: int | None = None):
    """(ids [n, ctx_len], store, origin): the store's held-out sequences (stores/split.py), which no
    trainer of this tool trains on; the first ceil(tokens / ctx_len) of them; with tokens None all of
    them, or up to default_cap tokens. More tokens than the held-out set holds is refused, not clamped."""
    from sae_harvest.stores import open_store
    from sae_harvest.train.feeds import held_out_origin

    store = open_store(store_path)
    if ctx_len is not None and ctx_len != store.ctx_len:
        raise EvaluateError(f"--ctx-len {ctx_len} differs from the store's ctx_len {store.ctx_len}")
    if store.n_seqs == 0:
        raise EvaluateError(f"store {scrub(store_path)} holds 0 sequences: nothing to evaluate on")
    held = store.split.held_out_seqs(store.n_seqs)
    n = max(1, math.ceil(tokens / store.ctx_len)) if tokens is not None else \
        len(held) if default_cap is None else min(len(held), max(1, math.ceil(default_cap / store.ctx_len)))
    if n > len(held):
        raise EvaluateError(f"--tokens {tokens:,} is more than the store's held-out set: "
                            f"{store.split.describe(store.n_seqs, store.ctx_len)}; ask for at most "
                            f"{len(held) * store.ctx_len:,}")
    ids = np.asarray(store.tokens.get_orthogonal_selection((held[:n], slice(None))))
    origin = held_out_origin(store, tokens=int(ids.size), sequences=n)
    return torch.from_numpy(ids.astype(np.int64)), store, {**origin, "store": scrub(store_path)}


def dataset_tokens(dataset: str, tokenizer, tokens: int | None, ctx_len: int | None, split, text_column,
                   skip_docs: int = 0, default_tokens: int = 65536):
    """(ids, origin): the first ceil(tokens / ctx_len) packed sequences of a dataset, after skip_docs
    documents."""
    from sae_harvest.harvest.data import open_dataset, positioned_sequences
    from sae_harvest.harvest.default_model import resolve_dataset

    ctx_len = ctx_len or 128
    tokens = default_tokens if tokens is None else tokens
    n = max(1, math.ceil(tokens / ctx_len))
    ds = open_dataset(resolve_dataset(dataset), split, text_column)
    # a start position skips documents without tokenizing them (the harvest's resume mechanism)
    start = {"doc": skip_docs, "offset": 0, "doc_sha": None} if skip_docs else None
    seqs = [seq for seq, _ in islice(positioned_sequences(ds, tokenizer, ctx_len, text_column, start=start), n)]
    if not seqs:
        raise EvaluateError(f"dataset {dataset!r} holds less than one sequence of {ctx_len} tokens"
                            f"{f' after {skip_docs:,} documents' if skip_docs else ''}")
    ids = torch.from_numpy(np.stack(seqs).astype(np.int64))
    origin = {"source": "dataset", "dataset": scrub(dataset), "split": split, "skip_docs": skip_docs,
              "held_out": None, "sequences": len(seqs), "tokens": int(ids.numel())}
    return ids, origin


def warn_dataset_overlap(dataset: str, saes: list, skip_docs: int) -> str | None:
    """A warning when --dataset is the corpus an SAE's store was harvested from (its texts were
    trained on), unless --skip-docs starts past them; None otherwise."""
    from sae_harvest.harvest.default_model import resolve_dataset

    if skip_docs:
        return None
    wanted = {dataset, str(resolve_dataset(dataset))}
    for e in saes:
        used = e.cfg.get("dataset_path") or (e.cfg.get("sae_harvest") or {}).get("dataset_path")
        if used and (used in wanted or str(resolve_dataset(used)) in wanted):
            return (f"warning: --dataset {scrub(dataset)} is the corpus {e.path} was trained from: the texts "
                    f"overlap its training tokens; --skip-docs N starts past the first N documents")
    return None


def trained_outside_split(sae_cfg: dict, origin: dict, store=None, seen: dict | None = None) -> bool | None:
    """Whether the SAE was trained outside the evaluated held-out sequences; None when the evaluation
    is not on a store. True when its cfg.json records this store's split (the same creation id), or,
    given the open evaluation `store`, when the store it trained on (recorded in cfg.json, still
    readable, the same creation id) holds out the same sequences token by token (stores/split.py
    same_held_out: a sibling harvest of one corpus, e.g. the label-free gradient store). False when
    nothing recorded proves it (an older version, another split, a store with no creation id, a
    training store not readable here; a relative recorded path is read from the current folder, and
    the creation id check makes another store found there count as not proved).
    `seen`: one comparison per training store within one evaluation (the caller's dict, not a
    process-wide cache: a store can be moved or replaced between two evaluations)."""
    if origin.get("source") != "store":
        return None
    ours = sae_cfg.get("sae_harvest") or {}
    recorded = ours.get("held_out")
    if not isinstance(recorded, dict) or recorded.get("every") != origin.get("every"):
        return False
    if not recorded.get("creation_id"):   # a store from before creation ids: which store it was is unknown
        return False
    if recorded["creation_id"] == origin.get("creation_id"):
        return True
    if store is None or not ours.get("store"):
        return False
    seen = {} if seen is None else seen
    key = (ours["store"], recorded["creation_id"])
    if key not in seen:
        seen[key] = _sibling_holds_out_same(ours["store"], recorded["creation_id"], store, origin.get("sequences"))
    return seen[key]


def _sibling_holds_out_same(train_path: str, creation_id: str, store, sequences: int | None) -> bool:
    from sae_harvest.stores import open_store
    from sae_harvest.stores.split import same_held_out

    # a proof that cannot be made is no proof, never a failed evaluation: moved or deleted, another
    # harvest in its place, credentials or a filesystem package not at hand here (botocore's and
    # fsspec's errors are not OSErrors), a chunk that no longer reads
    try:
        trained_on = open_store(train_path)
        # the creation id proves the store at that path is the one the SAE trained on, not a new harvest there
        return trained_on.attrs.get("creation_id") == creation_id and same_held_out(trained_on, store, sequences)
    except Exception:   # noqa: BLE001
        return False


def check_fits_store(path, sae, site: str, store, store_label: str, sae_cfg: dict | None = None) -> None:
    """An SAE read against a store's rows (features, geometry): its site is in the store, at its width;
    given its cfg.json, a warning when it was trained on another model's activations than the store's."""
    if site not in store.sites:
        raise EvaluateError(f"{path}: its site {site!r} is not in store {store_label} "
                            f"(it has: {', '.join(store.sites)})")
    if store.width(site) != sae.cfg.d_in:
        raise EvaluateError(f"{path}: SAE d_in {sae.cfg.d_in} != width {store.width(site)} of {site} "
                            f"in store {store_label}")
    trained = trained_model_digest(sae_cfg) if sae_cfg is not None else None
    made_by = ((store.attrs.get("provenance") or {}).get("model") or {}).get("digest")
    if trained and made_by and trained != made_by:   # an SAE carried to a fine-tune: the user's call, said aloud
        import sys
        print(f"warning: {scrub(str(path))} was trained on another model's activations (fingerprint "
              f"{trained[:12]}) than store {scrub(store_label)} holds ({made_by[:12]}): its numbers here "
              f"describe it on that model's rows", file=sys.stderr, flush=True)


def trained_model_digest(sae_cfg: dict, seen: dict | None = None) -> str | None:
    """The fingerprint of the model an SAE was trained on: its cfg.json's `model_digest`, else the
    provenance of the store it trained on, if that store still reads at its recorded path and is the
    same harvest (creation id); None when nothing says."""
    ours = sae_cfg.get("sae_harvest") or {}
    if ours.get("model_digest"):
        return ours["model_digest"]
    path, creation_id = ours.get("store"), (ours.get("held_out") or {}).get("creation_id")
    if not path or not creation_id:
        return None
    if seen is not None:   # one open per training store within one evaluation (a sweep shares it)
        if (path, creation_id) not in seen:
            seen[(path, creation_id)] = trained_model_digest(sae_cfg)
        return seen[(path, creation_id)]
    from sae_harvest.stores import open_store

    try:   # moved, deleted, credentials not at hand: nothing proved either way
        trained_on = open_store(path)
    except Exception:   # noqa: BLE001
        return None
    if trained_on.attrs.get("creation_id") != creation_id:
        return None
    return ((trained_on.attrs.get("provenance") or {}).get("model") or {}).get("digest")
