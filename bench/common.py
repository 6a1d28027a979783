"""Helpers shared by the bench scripts (run as `python bench/<name>.py`, so bench/ is on sys.path)."""
from __future__ import annotations

import os

import torch

from sae_harvest.harvest.default_model import OFFLINE_MODEL, resolve_model


def gpt2_small_random(root: str) -> str:
    """GPT-2 small's shape with random weights (the real one cannot be downloaded here)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = os.path.join(root, "gpt2-small-random")
    if not os.path.exists(path):
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
        AutoTokenizer.from_pretrained(resolve_model(OFFLINE_MODEL)).save_pretrained(path)
    return path
