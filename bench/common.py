"""Helpers shared by the bench scripts (run as `python bench/<name>.py`, so bench/ is on sys.path)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from sae_harvest.harvest.default_model import OFFLINE_MODEL, resolve_model
from sae_harvest.stores import StoreWriter
from sae_harvest.stores.urls import scrub_tree

# training-config keys that do not change the weights (log_every moves only the logged grid)
UNWEIGHTED = ("out", "checkpoint_every", "log_every")


class Refused(SystemExit):
    """A run a bench will not do (it would mix two runs' artifacts): its main prints it as one line
    and exits 2; str() is the message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def write_json(path: str, doc: dict) -> None:
    """Whole or not at all: a run killed mid-write keeps the previous record."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(scrub_tree(doc), f, indent=1)
    os.replace(tmp, path)


def trained_with(cfg_json: str, want) -> bool:
    """True if the SAE whose cfg.json is at `cfg_json` exists and was trained with TrainConfig `want`
    (up to UNWEIGHTED keys), False if absent; Refused if it was trained with another config."""
    if not os.path.exists(cfg_json):
        return False
    with open(cfg_json) as f:
        old = json.load(f).get("sae_harvest", {}).get("training", {})
    new = json.loads(json.dumps(scrub_tree(want.to_dict())))
    diff = sorted(k for k, v in new.items() if k not in UNWEIGHTED and old.get(k, v) != v)
    if diff or not old:
        raise Refused(f"{os.path.dirname(cfg_json)} was trained with another config "
                      f"({', '.join(diff) or 'unreadable'}): use another --out")
    return True


def gpt2_small_random(root: str) -> str:
    """GPT-2 small's shape with random weights (the real one cannot be downloaded here)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = os.path.join(root, "gpt2-small-random")
    if not os.path.exists(path):
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
        AutoTokenizer.from_pretrained(resolve_model(OFFLINE_MODEL)).save_pretrained(path)
    return path


def synthetic_store(path: str, d: int, rows: int, ctx: int = 128, compressor: str | None = None,
                    encoding: str = "float16") -> None:
    """Sparse combinations of a random dictionary (so the SAE's work is realistic), fp16 like GPT-2
    (or `encoding`), chunks compressed with `compressor` (harvest run --compressor)."""
    rng = np.random.default_rng(0)
    n_seqs = rows // ctx
    window_seqs = min(n_seqs, 2048)
    dictionary = rng.normal(size=(4 * d, d)).astype(np.float32) / math.sqrt(d)
    w = StoreWriter.create(path, meta={"model": {"name": "synthetic"}},
                           sites={"blocks.0.resid_pre": {"d": d, "encoding": encoding}}, grads=None,
                           ctx_len=ctx, n_seqs=n_seqs, window_seqs=window_seqs, compressor=compressor)
    for win in range(-(-n_seqs // window_seqs)):
        seqs = np.arange(win * window_seqs, min((win + 1) * window_seqs, n_seqs))
        n = len(seqs) * ctx
        codes = (rng.random((n, 4 * d), dtype=np.float32) < 0.02) * rng.random((n, 4 * d), dtype=np.float32)
        acts = codes @ dictionary * 10
        perm = rng.permutation(n)
        w.write_window(win, np.zeros((len(seqs), ctx)), np.repeat(seqs, ctx)[perm],
                       np.tile(np.arange(ctx), len(seqs))[perm], {"blocks.0.resid_pre": acts[perm]})
    w.finish(n_seqs)


def four_sites(n_layers: int) -> str:
    """The harvest benches' 4 sites: blocks.0 first, so the backward runs through every layer as
    the bare loop's does, then the middle block's attention and MLP outputs and the last residual."""
    mid = n_layers // 2
    return f"blocks.0.resid_pre,blocks.{mid}.attn_out,blocks.{mid}.mlp_out,blocks.{n_layers - 1}.resid_post"


def report(result: dict, json_path: str | None) -> None:
    """Print a bench's result as JSON, and write it to json_path when given (bench/gpu.sh reads it)."""
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
