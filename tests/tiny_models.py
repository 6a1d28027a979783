"""Tiny random-init models of each supported family, saved like a hub checkpoint.

Tests import make_tiny_model(); no network is needed. Everything is seeded, so a given family
always produces the same weights and tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FAMILIES = ("gpt2", "gemma", "gemma2", "gemma3", "gemma3_mm")

D_MODEL, N_LAYERS, N_HEADS, VOCAB, MAX_POS = 64, 3, 4, 512, 128
EOS = "<|endoftext|>"

_WORDS = """
the quick brown fox jumps over the lazy dog while a sparse autoencoder reads the residual stream
of a small transformer and every layer adds attention and feed forward outputs to that stream
tokens flow through blocks heads attend to earlier positions and the model predicts the next word
gradients tell us which directions matter for the loss so gated and topk dictionaries can learn
features that are both sparse and faithful to the network we harvest activations into shards and
train many dictionaries in one pass over the data evaluation splices reconstructions back into the
model and measures the increase in cross entropy along with kl divergence and downstream error
""".split()


def _corpus() -> list[str]:
    # A few hundred words of fixed text, reshuffled deterministically into sentences.
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(60):
        idx = torch.randint(len(_WORDS), (12,), generator=g).tolist()
        lines.append(" ".join(_WORDS[i] for i in idx) + ".")
    return lines + [" ".join(_WORDS)]


def make_tokenizer():
    """Byte-level BPE, vocab 512, "<|endoftext|>" (id 0) as bos/eos/unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=EOS)


def _gemma_common(eos_id: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=2 * D_MODEL,
                num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=2,
                head_dim=D_MODEL // N_HEADS, max_position_embeddings=MAX_POS,
                hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None,
                initializer_range=0.1, tie_word_embeddings=True)


def make_config(family: str, eos_id: int = 0):
    from transformers import (Gemma2Config, Gemma3Config, Gemma3TextConfig, GemmaConfig,
                              GPT2Config, SiglipVisionConfig)

    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS,
                          n_positions=MAX_POS, bos_token_id=eos_id, eos_token_id=eos_id,
                          initializer_range=0.1)
    if family == "gemma":
        return GemmaConfig(**_gemma_common(eos_id))
    # Small sliding window so that local attention actually differs from global in tests.
    if family == "gemma2":
        return Gemma2Config(**_gemma_common(eos_id), sliding_window=8)
    text = Gemma3TextConfig(**_gemma_common(eos_id), sliding_window=8,
                            layer_types=["sliding_attention", "full_attention",
                                         "sliding_attention"])
    if family == "gemma3":
        return text
    if family == "gemma3_mm":
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, image_size=28, patch_size=14)
        return Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                            mm_tokens_per_image=4, image_token_id=VOCAB - 1,
                            boi_token_id=VOCAB - 2, eoi_token_id=VOCAB - 3)
    raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES}")


def build_model(family: str, eos_id: int = 0):
    """A seeded random-init float32 model (not saved)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(family, eos_id), dtype=torch.float32)
    # Norm weights start at a constant (1 for LayerNorm, 0 for Gemma's 1+w RMSNorm). Perturb them
    # so that tests can tell norms apart (e.g. Gemma 1's pre-MLP norm vs Gemma 2's post norm).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def make_tiny_model(family: str, path) -> str:
    """Write a tiny model + tokenizer of `family` to `path` (skipped if already there)."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return str(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = make_tokenizer()
    model = build_model(family, eos_id=tokenizer.convert_tokens_to_ids(EOS))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


CORPUS_WORDS = "the a model reads every token and layer of sparse features in stores".split()


def write_corpus(path, n_docs: int, max_words: int, words=CORPUS_WORDS, seed: int = 0) -> str:
    """A seeded local JSONL corpus ({"text": ...} per line) of 5..max_words-word documents."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(5, max_words))))}) + "\n")
    return str(path)
