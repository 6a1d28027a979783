"""What made a store: fingerprints of the model, the tokenizer and the corpus, recorded in the root
attributes (`provenance`), so `--resume` refuses a change, and the ranks of a torchrun harvest
refuse to build one store from different harvests (docs/store-format.md, "Provenance").

- model: sha256 of its config.json (canonical JSON, without `_name_or_path` and
  `transformers_version`) and of its safetensors weights: each file's header (names, dtypes,
  shapes, offsets) plus, per tensor, its whole data when small, else 8 evenly spaced 4 KiB pieces;
  and the hub commit the files were resolved to. Any retrained or replaced tensor changes it; an
  edit of a few values inside one large tensor may not (hashing every byte of a 9B model would cost
  a minute at each start).
- tokenizer: sha256 of the fast tokenizer's full serialisation (normaliser, pre-tokeniser, vocab,
  merges, added tokens) and its special tokens.
- corpus: for a local corpus, the names and sizes of the files read; always the stream fingerprint
  (sha256 of the first documents' text). A hub corpus is known only by name, split and that
  fingerprint (plus the per-window document hashes a resume checks).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys

from sae_harvest.stores.urls import scrub

from .errors import HarvestError

SAMPLES_PER_TENSOR = 8
SAMPLE_BYTES = 4096
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def model_folder(name: str, revision: str | None) -> tuple[str, str | None]:
    """(local folder holding the model's files, hub commit or None) of a model load_model loaded."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded, None
    from transformers.utils import cached_file

    try:
        config = cached_file(name, "config.json", revision=revision)
    except Exception as e:   # loaded a moment ago, so this is rare: say so rather than guess
        raise HarvestError(f"cannot locate the files of model {name!r} to fingerprint them: "
                           f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    folder = os.path.dirname(config)
    commit = os.path.basename(folder)
    is_commit = os.path.basename(os.path.dirname(folder)) == "snapshots" and len(commit) == 40
    return folder, commit if is_commit else None


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return ["model.safetensors"]
    return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))


def _safetensors_digest(path: str) -> str:
    """sha256 of the header and of sampled bytes of every tensor (whole tensors when small)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header_bytes = f.read(n)
        if len(header_bytes) != n:
            raise HarvestError(f"{path}: truncated safetensors header")
        h.update(header_bytes)
        header = json.loads(header_bytes)
        base = 8 + n
        for name in sorted(k for k in header if k != "__metadata__"):
            begin, end = header[name]["data_offsets"]
            size = end - begin
            if size <= SAMPLES_PER_TENSOR * SAMPLE_BYTES:
                spans = [(begin, size)]
            else:
                step = (size - SAMPLE_BYTES) // (SAMPLES_PER_TENSOR - 1)
                spans = [(begin + i * step, SAMPLE_BYTES) for i in range(SAMPLES_PER_TENSOR)]
            for offset, length in spans:
                f.seek(base + offset)
                piece = f.read(length)
                if len(piece) != length:
                    raise HarvestError(f"{path}: truncated tensor {name}")
                h.update(piece)
    return h.hexdigest()


def model_fingerprint(name: str, revision: str | None) -> dict:
    folder, commit = model_folder(name, revision)
    with open(os.path.join(folder, "config.json"), "rb") as f:
        config = json.loads(f.read())
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    config_sha = _sha(_canonical(config))
    files = _weight_files(folder)
    weights = hashlib.sha256()
    for name_ in files:
        weights.update(f"{name_}\0{_safetensors_digest(os.path.join(folder, name_))}\0".encode())
    weights_sha = weights.hexdigest()
    return {"digest": _sha(f"{config_sha}:{weights_sha}".encode())[:32], "config_sha256": config_sha,
            "weights_sha256": weights_sha, "weight_files": len(files), "commit": commit}


def tokenizer_fingerprint(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = json.loads(backend.to_str())
        body.pop("truncation", None)   # runtime settings, not the tokenizer
        body.pop("padding", None)
    else:   # a slow tokenizer: its vocabulary (merges are not reachable generically)
        body = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return {"digest": _sha(_canonical({"tokenizer": body, "special": special}))[:32], "vocab_size": len(tokenizer)}


def corpus_fingerprint(path: str, stream_fingerprint: str) -> dict:
    """path: the resolved --dataset. Local files: names (relative) and sizes of the files read."""
    from .data import _local_files

    files = None
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in ("dataset_info.json",
                                                                                    "dataset_dict.json")):
        files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
    elif os.path.exists(path):
        files = _local_files(path)[1]
    out = {"stream": stream_fingerprint, "local": files is not None}
    if files is not None:
        root = path if os.path.isdir(path) else os.path.dirname(path)
        listing = [[os.path.relpath(f, root), os.path.getsize(f)] for f in files]
        out.update(files=len(listing), bytes=sum(n for _, n in listing), files_sha256=_sha(_canonical(listing)))
    out["digest"] = _sha(_canonical(out))[:32]
    return out


def provenance(model_name: str, revision: str | None, tokenizer, corpus_path: str, stream_fp: str) -> dict:
    """The `provenance` root attribute of a new store."""
    return {"model": model_fingerprint(model_name, revision), "tokenizer": tokenizer_fingerprint(tokenizer),
            "corpus": corpus_fingerprint(corpus_path, stream_fp)}


def provenance_changes(stored: dict | None, now: dict) -> list[str]:
    """What differs between a store's recorded provenance and this run's, as clauses; [] when the
    same, or when the store predates provenance (nothing to compare against)."""
    if not isinstance(stored, dict):
        return []
    changes = []
    model_was, model_now = stored.get("model") or {}, now["model"]
    if model_was.get("digest") != model_now["digest"]:
        parts = [p for p, k in (("config", "config_sha256"), ("weights", "weights_sha256"))
                 if model_was.get(k) != model_now[k]]
        changes.append(f"the model's {' and '.join(parts) or 'fingerprint'} differ "
                       f"(store {str(model_was.get('digest'))[:12]}, now {model_now['digest'][:12]})")
    for what, clause in (("tokenizer", "the tokenizer differs"),
                         ("corpus", "the data stream differs: the corpus files changed")):
        was = (stored.get(what) or {}).get("digest")
        if was != now[what]["digest"]:
            changes.append(f"{clause} (store {str(was)[:12]}, now {now[what]['digest'][:12]})")
    return changes


def model_against_store(attrs: dict, name: str, revision: str | None, *, named_by_user: bool,
                        store: str, what: str) -> dict:
    """The model `name` as it resolves here against the fingerprint the store's harvest recorded:
    {"model_digest", "store_model_digest", "model_matches_store": True | False | None (the store
    predates provenance: nothing to compare)}. A model the store named (a relative folder resolved
    against this folder, a hub name whose files changed) that is not the harvest's is refused: the
    store's tokens and rows would be read through another model. One the user named with --model is
    theirs to choose (an SAE carried to a fine-tune, say): a warning, and the record says so."""
    from .default_model import resolve_model

    recorded = ((attrs.get("provenance") or {}).get("model") or {}).get("digest")
    now = model_fingerprint(resolve_model(name), revision)["digest"]
    out = {"model_digest": now, "store_model_digest": recorded,
           "model_matches_store": None if recorded is None else recorded == now}
    if out["model_matches_store"] is False:
        where = f" (found as {os.path.abspath(os.path.expanduser(name))})" if os.path.isdir(os.path.expanduser(name)) \
            else ""
        clause = (f"model {scrub(name)!r}{scrub(where)} is not the model that harvested store {scrub(store)} "
                  f"(fingerprint {now[:12]}, the store's {recorded[:12]})")
        if not named_by_user:
            raise HarvestError(f"{clause}: {what} would read the store through another model; run where the "
                               f"harvest ran or give --model with the harvest's model")
        print(f"warning: {clause}: {what} uses the model you named", file=sys.stderr, flush=True)
    return out


def agree_across_ranks(dist, what: str, mine: dict) -> None:
    """Every rank compares its `mine` with every other rank's; on any difference every rank raises
    the same one-line HarvestError (each sees the same gathered list, so no rank waits for another)."""
    views = dist.all_gather(mine)
    for rank, view in enumerate(views[1:], start=1):
        differ = [k for k in sorted(set(view) | set(views[0])) if view.get(k) != views[0].get(k)]
        if differ:
            shown = ", ".join(f"{k} (rank 0: {views[0].get(k)!r}, rank {rank}: {view.get(k)!r})" for k in differ[:4])
            raise HarvestError(f"the ranks disagree on the {what}: {shown}"
                               f"{f' and {len(differ) - 4} more' if len(differ) > 4 else ''}; launch every rank "
                               f"with the same harvest; nothing was written")


def check_resumable(out: str, attrs: dict, args_now: dict, world: int, stream_fp: str, made_by: dict) -> None:
    """Everything that shapes the rows must match the store being resumed: the arguments that
    determine them (`args_now`, as run.py stores them), the world size, and the model, tokenizer and
    corpus themselves (their fingerprints; a store older than them has none to compare)."""
    stored = attrs.get("harvest", {})
    differ = [k for k, v in args_now.items() if stored.get(k) != v]
    if differ:
        shown = ", ".join(f"{k} (store: {stored.get(k)!r}, now: {args_now[k]!r})" for k in differ)
        raise HarvestError(f"cannot resume {out}: arguments differ from the harvest that made it: {shown}")
    if attrs.get("world_size", 1) != world:
        raise HarvestError(f"cannot resume {out} with {world} process(es): it was written by "
                           f"{attrs.get('world_size', 1)}, and the row order depends on the world size; "
                           f"resume with the same torchrun --nnodes x --nproc-per-node")
    if attrs.get("stream", {}).get("fingerprint") != stream_fp:
        raise HarvestError(f"cannot resume {out}: the data stream differs from the one that made the store "
                           f"(its first documents changed)")
    changes = provenance_changes(attrs.get("provenance"), made_by)
    if changes:
        raise HarvestError(f"cannot resume {out}: {'; '.join(changes)}; the store's windows would mix two "
                           f"harvests: resume with the same model, tokenizer and corpus, or start a new store")
