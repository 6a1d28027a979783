"""The harvest config: one frozen dataclass, serialised into every store's root attributes
(`harvest`); `harvest run`'s options are generated from its fields. Also what a config is checked
against before anything loads, and the plan (counts and encodings) it implies, computed once."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from sae_harvest.stores import fs, layout
from sae_harvest.stores.cli import opt
from sae_harvest.stores.split import split_attrs
from sae_harvest.stores.urls import scrub, scrub_tree

from .data import OPENWEBTEXT
from .default_model import resolve_dataset
from .errors import HarvestError
from .fingerprint import check_resumable
from .grad_targets import GRAD_TARGETS, target_of
from .models import KINDS


@dataclass(frozen=True)
class HarvestConfig:
    """Everything that shapes a harvest; `harvest run`'s options are generated from these fields."""
    out: str = opt(dataclasses.MISSING, "Store path or fsspec URL (s3://bucket/x.zarr, gs://..., file://...).")
    model: str = opt("gpt2", "HF model id or local directory (GPT-2, Gemma 1/2/3); 'stdlib-gpt2' = the "
                             "offline default.")
    revision: str | None = opt(None, "Model revision (branch, tag or commit).")
    dataset: str = opt(OPENWEBTEXT, "HF dataset id (streamed), a local jsonl/parquet/txt file or folder, or a "
                                    "saved dataset; 'stdlib-py' = the offline default corpus.")
    split: str = opt("train", "Dataset split.")
    text_column: str = opt("text", "Column holding the text.")
    sites: str | None = opt(None, "Comma list / globs of blocks.<L>.<kind>; kinds: "
                                  f"{', '.join(KINDS)} (docs/sites.md). Default: blocks.<n_layers//2>."
                                  "resid_pre of the given model (gpt2: blocks.6.resid_pre, stdlib-gpt2: "
                                  "blocks.2.resid_pre). Checked against the model's config before any weights load.")
    grads: bool = opt(False, "Also store d(summed next-token CE)/d(activation) per token.", flag="--grads/--no-grads")
    tokens: int = opt(1_000_000, "Tokens to harvest.")
    ctx_len: int = opt(128, "Tokens per sequence.")
    batch_size: int = opt(16, "Sequences per forward pass.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    dtype: str = opt("float32", "Model compute dtype.", choices=("float32", "bfloat16", "float16"))
    seed: int = opt(0, "Seeds the row shuffle.")
    shuffle_window: int = opt(1 << 20, "Tokens shuffled together (bounds host memory: ~2 windows of rows are held).")
    act_encoding: str = opt("auto", "auto: float16 for GPT-2, bfloat16 for Gemma (fp16 overflows there).",
                            choices=("auto", "float16", "bfloat16", "float32"))
    grad_encoding: str = opt("bfloat16", "Encoding of the stored gradients.", choices=("bfloat16", "float32"))
    compressor: str = opt("none", "Chunk compression (standard Zarr v3 codecs; zstd = level 3; blosc with byte "
                                  "shuffle; docs/store-format.md).",
                          choices=("none", "zstd", "zstd-1", "blosc-zstd", "blosc-lz4"))
    trust_remote_code: bool = opt(False, "Allow model code from the hub (off by default).")
    grad_target: str = opt("labels", "With --grads, the gradient of: labels = the summed next-token CE (gradient "
                                     "paper); model-top1 = each position's CE against the model's own top "
                                     "prediction (label-free, causal; several times slower).",
                           choices=tuple(GRAD_TARGETS))
    eval_every: int = opt(20, "Hold out every N-th sequence (seq % N == 0) for evaluation: trainers skip it, "
                              "evaluations use only it (recorded in the store; docs/store-format.md).")


# a resumed harvest must agree on everything that shapes the rows and their values
IDENTITY_KEYS = ("model", "revision", "dataset", "split", "text_column", "sites", "grads", "tokens", "ctx_len",
                 "batch_size", "dtype", "seed", "shuffle_window", "act_encoding", "grad_encoding", "compressor")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def identity(cfg: HarvestConfig) -> dict:
    """What a resume must agree on, as stored: paths and URLs scrubbed of credentials."""
    return scrub_tree({k: getattr(cfg, k) for k in IDENTITY_KEYS})


def _check_out_not_in_corpus(cfg: HarvestConfig) -> None:
    """A store inside a local corpus folder would be read back as corpus (its .json files) next time."""
    corpus = resolve_dataset(cfg.dataset)
    if fs.is_url(cfg.out) or not os.path.isdir(corpus):
        return
    out, corpus = os.path.realpath(fs._local(cfg.out)), os.path.realpath(corpus)
    if os.path.commonpath([out, corpus]) == corpus:
        raise HarvestError(f"--out {cfg.out} is inside the corpus folder {cfg.dataset}: its files would be read "
                           f"as text next time; write the store elsewhere")


def check_config(cfg: HarvestConfig) -> None:
    """The options alone, before anything is loaded: HarvestError naming the first bad one."""
    for name in ("tokens", "ctx_len", "batch_size", "shuffle_window"):
        if getattr(cfg, name) <= 0:
            raise HarvestError(f"--{name.replace('_', '-')} must be positive (got {getattr(cfg, name)})")
    if cfg.ctx_len < 2:   # one position is BOS alone: nothing predicted, every gradient zero
        raise HarvestError(f"--ctx-len {cfg.ctx_len} is too short: a sequence needs at least 2 tokens")
    _check_out_not_in_corpus(cfg)
    split_attrs(cfg.eval_every)   # a bad --eval-every is refused before anything is loaded
    if cfg.grad_target not in GRAD_TARGETS:
        raise HarvestError(f"unknown --grad-target {cfg.grad_target!r}; use one of {', '.join(GRAD_TARGETS)}")
    if cfg.dtype not in DTYPES:
        raise HarvestError(f"unknown --dtype {cfg.dtype!r}; use one of {', '.join(DTYPES)}")
    for flag, enc in (("act-encoding", cfg.act_encoding), ("grad-encoding", cfg.grad_encoding)):
        if enc not in ("auto", *layout.ENCODINGS):
            raise HarvestError(f"unknown --{flag} {enc!r}; use one of auto, {', '.join(layout.ENCODINGS)}")


def check_resume(cfg: HarvestConfig, attrs: dict, world: int, fingerprint: str, made_by: dict) -> None:
    """A --resume of the store whose root attributes are `attrs` continues the same harvest, or
    HarvestError saying what differs."""
    check_resumable(cfg.out, attrs, identity(cfg), world, fingerprint, made_by)
    stored_target = target_of(attrs.get("grads"))
    if cfg.grads and stored_target != cfg.grad_target:
        raise HarvestError(f"cannot resume {scrub(cfg.out)}: its gradients are of --grad-target "
                           f"{stored_target}, not {cfg.grad_target}")
    stored_split = (attrs.get("split") or {}).get("every")
    if stored_split is not None and stored_split != cfg.eval_every:
        raise HarvestError(f"cannot resume {scrub(cfg.out)}: it holds out every {stored_split}th sequence, "
                           f"not every {cfg.eval_every}th (--eval-every {stored_split} resumes it)")


@dataclass(frozen=True)
class HarvestPlan:
    """What a config implies once the model is known, computed once: the sequence and window
    counts every rank agrees on, the sites, and how their values are stored."""
    ctx_len: int
    n_seqs: int
    window_seqs: int            # sequences per shuffle window (the last may hold fewer)
    sites: tuple                # harvest.sites.Site, in the order given
    act_encoding: str
    grad_encoding: str | None   # None: no gradients

    @classmethod
    def of(cls, cfg: HarvestConfig, sites, family: str) -> "HarvestPlan":
        n_seqs = -(-cfg.tokens // cfg.ctx_len)
        act = cfg.act_encoding
        if act == "auto":   # fp16 overflows on Gemma's residual stream
            act = "float16" if family == "gpt2" else "bfloat16"
        grad = (cfg.grad_encoding if cfg.grad_encoding != "auto" else "bfloat16") if cfg.grads else None
        return cls(ctx_len=cfg.ctx_len, n_seqs=n_seqs,
                   window_seqs=min(layout.window_seqs_for(cfg.shuffle_window, cfg.ctx_len), n_seqs),
                   sites=tuple(sites), act_encoding=act, grad_encoding=grad)

    @property
    def n_windows(self) -> int:
        return -(-self.n_seqs // self.window_seqs)

    def window_size(self, window: int) -> int:
        """Sequences window `window` holds when the corpus does not run out first."""
        return min(self.window_seqs, self.n_seqs - window * self.window_seqs)

    @property
    def site_encodings(self) -> dict[str, str]:
        return {s.name: self.act_encoding for s in self.sites}
