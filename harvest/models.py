"""Loading models and the per-family knowledge of where each site lives.

Everything family-specific (module names, which norm sits where) is in this file; sites.py works
only through ModelAdapter.hook_point(). Site kinds are one table, SITE_KINDS (kind -> hook, width,
module per family): adding a kind is one row there; adding a family is one entry in _LAYOUTS (plus
a column in SITE_KINDS if its blocks are laid out differently).
Structure verified against transformers 5.x modeling_{gpt2,gemma,gemma2,gemma3}.py:

  GPT-2    : h = x + attn(ln_1(x));  out = h + mlp(ln_2(h))             (attn returns (out, weights))
  Gemma 1  : h = x + self_attn(input_layernorm(x))
             out = h + mlp(post_attention_layernorm(h))   <- Gemma 1's "post" norm is the pre-MLP norm
  Gemma 2/3: h = x + post_attention_layernorm(self_attn(input_layernorm(x)))
             out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from sae_harvest.harvest.errors import HarvestError

SUPPORTED_FAMILIES = ("gpt2", "gemma", "gemma2", "gemma3_text", "gemma3")


@dataclass(frozen=True)
class _Layout:
    """Where the decoder stack lives in the model; paths inside a block come from SITE_KINDS."""

    base: str          # the decoder stack (holds the layer list and the final norm)
    layers: str
    final_norm: str
    blocks: str        # which column of SITE_KINDS' module paths: "gpt2", "gemma" or "gemma2"


_LAYOUTS = {"gpt2": _Layout("transformer", "h", "ln_f", "gpt2"),
            "gemma": _Layout("model", "layers", "norm", "gemma"),
            "gemma2": _Layout("model", "layers", "norm", "gemma2"),
            "gemma3_text": _Layout("model", "layers", "norm", "gemma2"),   # Gemma 3 blocks are Gemma 2's
            "gemma3": _Layout("model.language_model", "layers", "norm", "gemma2")}


@dataclass(frozen=True)
class SiteKind:
    """One site kind: where it is read in a block of each family, and its width.

    hook: "input" (the module's first input, a forward pre-hook), "output" (its output, a forward
    hook; the first element for attention, which returns (out, weights)) or "composed" (resid_mid:
    no module holds it; harvest/sites.py builds it from resid_pre and attn_out).
    width: "d_model", "attn" (n_heads * head_dim) or "d_mlp" (the MLP's hidden size).
    modules: module path relative to the block, per block layout ("" = the block itself)."""

    hook: str
    width: str
    modules: dict


def _same(path: str) -> dict:
    return {"gpt2": path, "gemma": path, "gemma2": path}


# THE table of site kinds, in forward order within a block (Site sorts by it). Gemma 2/3 norm each
# sub-block's output before the residual add, so attn_out / mlp_out are read after those post-norms;
# Gemma 1's "post_attention_layernorm" is its pre-MLP norm, so its attn_out is self_attn's output.
# attn_in / mlp_in are the attention's / MLP's own inputs, after their pre-norms (GPT-2 ln_1 / ln_2,
# Gemma input_layernorm / pre-MLP norm).
SITE_KINDS: dict[str, SiteKind] = {
    "resid_pre": SiteKind("input", "d_model", _same("")),
    "attn_in": SiteKind("input", "d_model", {"gpt2": "attn", "gemma": "self_attn", "gemma2": "self_attn"}),
    "attn_z": SiteKind("input", "attn", {"gpt2": "attn.c_proj", "gemma": "self_attn.o_proj",
                                         "gemma2": "self_attn.o_proj"}),
    "attn_out": SiteKind("output", "d_model", {"gpt2": "attn", "gemma": "self_attn",
                                               "gemma2": "post_attention_layernorm"}),
    "resid_mid": SiteKind("composed", "d_model", {}),
    "mlp_in": SiteKind("input", "d_model", _same("mlp")),
    "mlp_act": SiteKind("input", "d_mlp", {"gpt2": "mlp.c_proj", "gemma": "mlp.down_proj",
                                           "gemma2": "mlp.down_proj"}),
    "mlp_out": SiteKind("output", "d_model", {"gpt2": "mlp", "gemma": "mlp",
                                              "gemma2": "post_feedforward_layernorm"}),
    "resid_post": SiteKind("output", "d_model", _same("")),
}
KINDS = tuple(SITE_KINDS)


def _unsupported(model_type) -> HarvestError:
    return HarvestError(f"unsupported model type '{model_type}'; supported families: "
                        f"{', '.join(SUPPORTED_FAMILIES)}")


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything absolute, relative-dotted or home-based is a path.
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise HarvestError(f"unknown dtype '{dtype}'; use e.g. float32, bfloat16, float16")
    return value


CONVERT_HINT = ("convert it once, where you trust its source: load it with transformers and "
                "save_pretrained(folder, safe_serialization=True), then pass that folder")


def _pickle_only(folder: str) -> bool:
    """A local model folder with pickled weights (pytorch_model*.bin, *.pt, *.pth) and no safetensors."""
    names = os.listdir(folder)
    has_safe = any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for n in names)
    return has_pickle and not has_safe


def load_model(name_or_path: str, *, revision=None, device="cpu", dtype=torch.float32,
               trust_remote_code=False):
    """Load (model, tokenizer) for inference: eval mode, every parameter frozen.

    Weights load from safetensors only: a pickled checkpoint (pytorch_model.bin) can run code when
    unpickled, and a store or SAE from someone else chooses which model gets loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if _looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        raise HarvestError(f"model '{name}' not found: no such local path")
    name = os.path.expanduser(name)
    if os.path.isdir(name) and _pickle_only(name):
        raise HarvestError(f"model '{name}' has only pickled weights (pytorch_model.bin), which this tool "
                           f"never loads; {CONVERT_HINT}")
    # The config first: it is small, and it tells us the family before we pay for the weights.
    try:
        config = AutoConfig.from_pretrained(name, revision=revision,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise HarvestError(f"model '{name}' not found: {_first_line(err)}") from err
    if config.model_type not in SUPPORTED_FAMILIES:
        raise _unsupported(config.model_type)

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=revision, dtype=_as_dtype(dtype), trust_remote_code=trust_remote_code,
            use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        text = str(err).lower()
        if "file named" in text and "safetensors" in text:   # a hub repo with pickled weights only
            raise HarvestError(f"model '{name}' has no safetensors weights and this tool never loads "
                               f"pickled ones; {CONVERT_HINT}") from None
        raise HarvestError(f"could not load model '{name}': {_first_line(err)}") from err
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def quiet_transformers() -> None:
    """Our progress bar is the one that matters; HF's per-load bars and warnings are noise here."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class ModelAdapter:
    """The family-specific facts the rest of the code needs about a loaded causal LM."""

    def __init__(self, model: nn.Module):
        config = model.config
        self.family: str = config.model_type
        if self.family not in _LAYOUTS:
            raise _unsupported(self.family)
        self.model = model
        self._layout = _LAYOUTS[self.family]
        # Multimodal Gemma 3 keeps the language model's settings in a sub-config.
        text = config.get_text_config()
        self.config = text
        base = model.get_submodule(self._layout.base)
        self.layers: nn.ModuleList = base.get_submodule(self._layout.layers)
        self.final_norm: nn.Module = base.get_submodule(self._layout.final_norm)
        self.n_layers: int = len(self.layers)
        self.d_model: int = text.hidden_size
        self.n_heads: int = text.num_attention_heads
        self.head_dim: int = getattr(text, "head_dim", None) or self.d_model // self.n_heads
        if self.family == "gpt2":
            self.d_mlp: int = text.n_inner or 4 * self.d_model
            self.max_positions: int = text.n_positions
        else:
            self.d_mlp = text.intermediate_size
            self.max_positions = text.max_position_embeddings
        self.vocab_size: int = text.vocab_size

    def site_width(self, kind: str) -> int:
        if kind not in SITE_KINDS:
            raise HarvestError(f"unknown site kind '{kind}'; kinds: {', '.join(KINDS)}")
        width = SITE_KINDS[kind].width
        return {"d_model": self.d_model, "attn": self.n_heads * self.head_dim, "d_mlp": self.d_mlp}[width]

    def hook_point(self, layer: int, kind: str) -> tuple[nn.Module, str]:
        """(module, "input" | "output"): the site is that module's first input or output.

        resid_mid has no module of its own (it is resid_pre + attn_out); callers compose it.
        """
        entry = SITE_KINDS.get(kind)
        if entry is None or entry.hook == "composed":
            raise HarvestError(f"site kind '{kind}' has no single hook point")
        block = self.layers[layer]
        path = entry.modules[self._layout.blocks]
        return (block.get_submodule(path) if path else block), entry.hook


def get_adapter(model: nn.Module) -> ModelAdapter:
    return ModelAdapter(model)
