"""The evaluation configs: frozen dataclasses, written into results.json and the analyses' JSON;
each command's options are generated from their fields. LiveOptions is the block every command
that runs the live model shares (`evaluate splice`, `evaluate stitch`): the model, the evaluation
tokens and how to run them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sae_harvest.stores.cli import opt
from sae_harvest.stores.urls import scrub_tree

TOKENS_HELP = "Evaluation tokens (rounded up to whole sequences)."
# --allow-shared-init of the analyses that compare dictionaries (stitch, meta, geometry)
ALLOW_SHARED_INIT_HELP = ("Compare SAEs even when their cfg.json says they started from the same initial rows "
                          "(same seed stream): their latents then pair up by index.")


@dataclass(frozen=True)
class LiveOptions:
    model: str | None = opt(None, "HF model id or local directory; 'stdlib-gpt2' = the offline default. "
                                  "Default with --store: the store's model.")
    revision: str | None = opt(None, "Model revision (branch, tag or commit).")
    store: str | None = opt(None, "Evaluate on this store's held-out sequences (every N-th, never trained on; "
                                  "docs/store-format.md).")
    dataset: str | None = opt(None, "Or evaluate on text: local jsonl/txt/parquet file or folder, or a hub id.")
    split: str = opt("train", "Dataset split.")
    text_column: str = opt("text", "Column holding the text.")
    tokens: int | None = opt(None, "Evaluation tokens (rounded up to whole sequences). Default: all the store's "
                                   "held-out tokens (more is refused), or 65536 of --dataset.")
    skip_docs: int = opt(0, "--dataset: start past its first N documents (e.g. those a store was harvested from).")
    ctx_len: int | None = opt(None, "Tokens per sequence for --dataset (default 128; with --store: the store's).")
    batch_size: int = opt(8, "Sequences per forward pass.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    dtype: str = opt("float32", "Model compute dtype.", choices=("float32", "bfloat16", "float16"))

    def to_dict(self) -> dict:
        """As written into JSON: paths and URLs scrubbed of credentials."""
        return scrub_tree(dataclasses.asdict(self))


# A dataclass takes its base classes' fields first, in reverse MRO order, so a config lists its
# leading fields in a base after LiveOptions (`class C(LiveOptions, Leading)`): the options then
# keep their order in --help and the keys theirs in the JSON.
@dataclass(frozen=True)
class _EvalSAEs:
    saes: tuple[str, ...] = opt((), "SAE checkpoint folder (from `train fit`); repeat for several.", cli=False)


@dataclass(frozen=True)
class EvalConfig(LiveOptions, _EvalSAEs):
    grad_select: bool = opt(True, "gtopk SAEs: gradient-aware selection (--no-grad-select: plain TopK).")
    grad_modes: tuple[str, ...] = opt(("causal", "paper"),
                                      "gtopk SAEs: the gradient modes to evaluate, one result row each. "
                                      "causal: label-free, d CE(own argmax prediction)_t / d a[t] "
                                      "(the spliced model stays causal; the headline); paper: "
                                      "d(sum_s CE_s)/d a[t], uses the tokens being scored.")
    all_at_once: bool = opt(False, "Also splice every --sae together in one forward (one more result row, "
                                   "\"all at once\", with each dictionary's NMSE inside it).")
    splice_bos: bool = opt(False, "Splice position 0 too (default: it keeps its clean activation, as "
                                  "SAEs are trained without it; ablations likewise).")
