"""Where an SAE's initial weights come from, and whether two checkpoints started alike.

Every SAE used to be seeded with the bare --seed. Kaiming-uniform fills W_dec [d_sae, d_in] row by
row with a bound set by d_in alone, so the leading rows were the same for every d_sae: a 256- and a
512-latent SAE, or an SAE and its meta-SAE, started from the same first rows, and after a short run
their latents still paired up by index (decoder cosine 0.96-0.99), which stitching and meta-SAE
analyses then read as learned structure.

Now each SAE draws from its own stream, a hash of the seed and the SAE's identity (architecture,
site, widths, swept value): the same command still gives the same weights, and two SAEs that differ
in any of these start independent. cfg.json records the stream under sae_harvest.init:
    {"scheme": "seed+identity", "seed": 0, "identity": {...}, "stream": "v1:<16 hex>"}
    {"scheme": "checkpoint", "from": PATH, "stream": <the --init checkpoint's stream or null>}
Checkpoints written before this (no sae_harvest.init) were seeded with torch.manual_seed(seed)
followed by the W_dec draw: their stream is "legacy-seed:<seed>", and two of them with the same
seed and d_in share their first min(d_sae) rows. Checkpoints with no recorded seed (SAELens's, or
ours from an --init run of that era) have an unknown stream and are never reported as shared.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

INIT_SCHEME = "seed+identity"


def init_identity(cfg, site: str | None, swept: tuple[str, ...] = ()) -> dict:
    """What makes one SAE of a run itself: architecture, site, widths and swept values (`cfg` is an
    SAE config). k and l1_coeff are always listed (an architecture without one lists the single
    config's old default), so identities, and so initial weights, are those of earlier versions;
    any other field `swept` names is added, so SAEs of a sweep over it start apart too."""
    d = cfg.to_dict()
    return {"arch": cfg.arch, "site": site, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": d["k"],
            "l1_coeff": d["l1_coeff"], **{f: d[f] for f in swept if f not in ("k", "l1_coeff")}}


def init_stream(seed: int, identity: dict) -> str:
    """The initialisation stream of an SAE: a hash of (seed, identity)."""
    text = json.dumps([int(seed), identity], sort_keys=True)
    return "v1:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def stream_seed(stream: str) -> int:
    """The torch seed of a stream from init_stream()."""
    return int(stream.split(":", 1)[1], 16) & ((1 << 63) - 1)


def _cfg_json(path) -> dict | None:
    p = Path(path)
    p = p.parent / "cfg.json" if p.is_file() else p / "cfg.json"
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def stream_of(cfg_json: dict | None) -> str | None:
    """A checkpoint's initialisation stream from its cfg.json; None: unknown."""
    ours = (cfg_json or {}).get("sae_harvest")
    if not isinstance(ours, dict):
        return None
    init = ours.get("init")
    if isinstance(init, dict):
        stream = init.get("stream")
        return stream if isinstance(stream, str) else None
    training = ours.get("training")
    if isinstance(training, dict) and not training.get("init"):
        seed = training.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            return f"legacy-seed:{seed}"
    return None


def checkpoint_stream(path) -> str | None:
    """The initialisation stream of the checkpoint at `path` (None: unknown)."""
    return stream_of(_cfg_json(path))


def shared_init(path_a, path_b) -> str | None:
    """One line saying how two checkpoints share their initialisation, or None when they do not
    (or when either stream is unknown)."""
    a, b = _cfg_json(path_a), _cfg_json(path_b)
    stream = stream_of(a)
    if stream is None or stream != stream_of(b):
        return None
    if a.get("d_in") != b.get("d_in"):
        return None   # rows of different widths are different draws
    try:
        rows = min(int(a["d_sae"]), int(b["d_sae"]))
    except (KeyError, TypeError, ValueError):
        return None
    return (f"{path_a} and {path_b} share their initialisation (stream {stream}: their first {rows} decoder "
            f"rows started equal), so their latents pair up by index, not by what they learned; retrain one "
            f"with another --seed (or with this version, which derives each SAE's stream from its identity), "
            f"or pass --allow-shared-init")


def first_shared(paths) -> str | None:
    """shared_init() of the first pair of `paths` that shares its initialisation; None if none does."""
    paths = list(paths)
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            reason = shared_init(a, b)
            if reason:
                return reason
    return None
