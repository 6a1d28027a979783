"""The training config: one frozen dataclass, serialised into every saved SAE; `train fit`'s options
are generated from its fields.

Its architecture options (--k, --l1, --bandwidth, ...) are not written here: they are generated from
the hyperparameters the registered architectures' config classes declare (train/sae_config.py
`hyper`), one option per name, and regenerated in place whenever an architecture is registered.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from sae_harvest.stores.cli import opt
from sae_harvest.stores.urls import scrub_tree
from sae_harvest.train import registry
from sae_harvest.train.errors import TrainError
from sae_harvest.train.registry import make_config
from sae_harvest.train.sae_config import SAEConfigBase, hyper_fields, type_name


@dataclass(frozen=True)
class TrainConfig:
    out: str = opt(dataclasses.MISSING, "Output folder: one sub-folder per swept SAE.")
    store: str | None = opt(None, "Store path or fsspec URL (from `harvest run`).")
    site: str | None = opt(None, "Site to train on (required when the store has several); a comma list or globs "
                                 "(blocks.*.resid_pre) train one SAE or sweep per site in one pass over the store.")
    target: str | None = opt(None, f"Transcoder: the decoder predicts this site (e.g. blocks.6.mlp_out) from --site "
                                   f"(blocks.6.mlp_in); several sites pair with as many targets in layer order; "
                                   f"{', '.join(registry.TRANSCODER_ARCHS)}.")
    skip: bool = opt(False, "Transcoder: add a learned linear skip W_skip x to the output (skip transcoder).")
    clt: bool = opt(False, f"Cross-layer transcoder: --site / --target one MLP input and output per layer, no layer "
                           f"missing (blocks.*.mlp_in / blocks.*.mlp_out); --d-sae is per layer; "
                           f"{', '.join(registry.CLT_ARCHS)}.")
    crosscoder: bool = opt(False, f"Train one crosscoder over every --site (equal widths): per-site encoders "
                                  f"summed, per-site decoders ({', '.join(registry.CROSSCODER_ARCHS)}).")
    decoder_of: str | None = opt(None, "Meta-SAE: train an SAE (by default the meta-SAE paper's architecture) on "
                                       "this SAE checkpoint's decoder rows.")
    arch: str = opt("topk", "SAE architecture (the registered ones are listed in `train fit --help`'s --arch).")
    d_sae: int | None = opt(None, "Dictionary size (default: --expansion x d_in).")
    expansion: int = opt(16, "Dictionary size as a multiple of d_in, when --d-sae is not given.")
    lr: float | None = opt(None, "Learning rate (default: the architecture's default_lr(d_sae)).")
    batch_size: int = opt(4096, "Tokens per optimizer step.")
    tokens: int | None = opt(None, "Training tokens (default: one pass; more than the store = epochs).")
    seed: int = opt(0, "Seeds the initialisation and the batch order.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    include_bos: bool = opt(False, "Train on position-0 rows too (excluded by default: they dwarf the rest).")
    warmup_fraction: float = opt(0.05, "Fraction of the steps with a linear learning-rate warmup.")
    lr_final_fraction: float = opt(0.1, "Cosine decay ends at this fraction of the learning rate.")
    grad_clip: float = opt(10.0, "Gradient-norm clipping.")
    adam_betas: tuple[float, float] | None = opt(None, "Adam betas (default: the architecture's).", cli=False)
    dead_tokens: int = opt(10_000_000, "A latent is dead after this many tokens without firing.")
    b_dec_init: str = opt("geometric_median", "Initial decoder bias.", choices=("geometric_median", "mean"))
    normalize: bool = opt(True, "Divide inputs by one constant so E||x|| = sqrt(d_in) (folded back at save).")
    checkpoint_every: int = opt(1000, "Steps between checkpoints.")
    log_every: int = opt(10, "Steps between metrics.jsonl records.")
    wandb: str | None = opt(None, "Log to this Weights & Biases project (needs wandb installed).")
    autocast: str = opt("auto", "bf16 autocast of the SAE step, and of the model forwards for --loss e2e (auto: on CUDA).", choices=("auto", "on", "off"))
    sparse_decode: str = opt("auto", "Decode TopK by gathering the k rows (auto: on CUDA when k <= d_sae/16).",
                             choices=("auto", "on", "off"))
    sparse_backward: str = opt("auto", "TopK family: encoder gradients only at the chosen latents (sparse "
                               "backward; off: dense autograd, the reference) (auto: on CUDA).",
                               choices=("auto", "on", "off"))
    stack_sweep: str = opt("auto", "Train the SAEs of one architecture and shape, of a sweep or of several "
                                   "--site's, as one batched step (bmm over the SAEs) instead of a loop, where "
                                   "the architecture stacks (auto: on CUDA).",
                           choices=("auto", "on", "off"))
    epochs: int | None = opt(None, "Passes over the data when --tokens is not given (meta-SAE).")
    loss: str = opt("local", "local: reconstruction; e2e / e2e+ds: through the live frozen --model.",
                    choices=("local", "e2e", "e2e+ds"))
    model: str | None = opt(None, "Live model for --loss e2e / e2e+ds (default: the store's model).")
    kl_coeff: float | None = opt(None, "e2e KL weight (default 1, 0.5 for e2e+ds).")
    downstream_coeff: float | None = opt(None, "e2e+ds downstream MSE weight beta (default 2.5).")
    init: str | None = opt(None, "Start from this SAE checkpoint (e.g. a local SAE before e2e).")
    dist_timeout: int = opt(600, "Under torchrun: seconds a rank waits for the others before the job fails.")
    sweep_parallel: bool = opt(False, "Under torchrun: spread the sweep's SAEs over the ranks (SAE i on rank i "
                                      "mod N; each reads every whole batch and trains its SAEs alone) instead "
                                      "of training every SAE data parallel: for sweeps too large for one GPU's "
                                      "memory. Needs at least N SAEs. Without torchrun it changes nothing.")
    shard_decoders: bool = opt(False, "Under torchrun, --clt: each rank holds the encoders, decoders and Adam state "
                                      "of a contiguous slice of source layers and reads every whole batch; one "
                                      "all-reduce of the reconstruction error per step combines them (a CLT too "
                                      "large for one GPU). Saved as one file, as unsharded. Without torchrun it "
                                      "changes nothing.")

    def __post_init__(self):
        # an architecture option given as one value (or a JSON list) is a sweep of one
        for spec in _OPTIONS.values():
            v = getattr(self, spec.name, None)
            if spec.sweep and v is not None and not isinstance(v, tuple):
                object.__setattr__(self, spec.name, tuple(v) if isinstance(v, list) else (v,))
            elif not spec.sweep and isinstance(v, list):
                object.__setattr__(self, spec.name, tuple(v))

    def to_dict(self) -> dict:
        """The config as stored (cfg.json, checkpoint/state.json) and logged (wandb): every path
        and URL scrubbed of credentials, so a resume compares like with like."""
        return scrub_tree(dataclasses.asdict(self))


@dataclass(frozen=True)
class OptionSpec:
    """One generated architecture option: the TrainConfig field `name` (flag --name), setting the
    config field `field` of every architecture in `archs`."""
    name: str
    field: str
    type: str          # the config field's type, e.g. "int"
    sweep: bool        # a comma list: one SAE per value
    default: object    # the option's default (None / (): each architecture's own)
    help: str
    archs: tuple[str, ...]
    choices: tuple | None = None


_OPTIONS: dict[str, OptionSpec] = {}
_STATIC = [f for f in dataclasses.fields(TrainConfig)]
_AFTER = "expansion"   # the architecture options come after this field, as in --help


def _declared() -> dict[str, list]:
    """{option name: [(arch, config field)]} over the registered architectures, in their order."""
    out: dict[str, list] = {}
    for arch, cfg_cls in registry.CONFIGS.items():
        for f in hyper_fields(cfg_cls):
            out.setdefault(f.metadata["hyper"]["option"] or f.name, []).append((arch, f))
    return out


def _fmt(v) -> str:
    return ",".join(map(_fmt, v)) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else str(v)


def _option(name: str, decls: list) -> OptionSpec:
    first = decls[0][1]
    meta = first.metadata["hyper"]
    kinds = {type_name(f) for _, f in decls}
    if len(kinds) > 1 or len({f.metadata["hyper"]["sweep"] for _, f in decls}) > 1:
        raise TypeError(f"architectures declare option {name} differently: {sorted(kinds)}")
    # one help per distinct text, naming the architectures it applies to and their defaults
    parts: dict[str, list] = {}
    for arch, f in decls:
        m = f.metadata["hyper"]
        default = m["train_default"] if m["train_default"] is not None else f.default
        parts.setdefault(m["help"].rstrip("."), []).append((arch, default))
    texts = []
    for text, uses in parts.items():
        defaults = [_fmt(d) for _, d in uses if d not in ((), None)]
        note = "" if meta["option_default"] not in (None, ()) or not defaults else (
            f" (default {defaults[0]})" if len(set(defaults)) == 1 else
            " (default " + ", ".join(f"{a} {_fmt(d)}" for a, d in uses) + ")")
        texts.append(f"{', '.join(a for a, _ in uses)}: {text}{note}")
    help_text = "; ".join(texts) + (". Comma list = sweep." if meta["sweep"] else ".")
    return OptionSpec(name=name, field=first.name, type=type_name(first), sweep=meta["sweep"],
                      default=meta["option_default"], help=help_text, archs=tuple(a for a, _ in decls),
                      choices=meta["choices"])


def _install_options() -> None:
    """(Re)generate TrainConfig's architecture options from the registry, in place: the class
    object stays the same, so every module that imported it sees the new fields."""
    global _OPTIONS
    _OPTIONS = {name: _option(name, decls) for name, decls in _declared().items()}
    static = [f for f in _STATIC if f.name not in _OPTIONS]
    cut = [f.name for f in static].index(_AFTER) + 1
    fields = []
    for spec in _OPTIONS.values():
        kind = f"tuple[{spec.type}, ...]" if spec.sweep else spec.type
        kw = {"choices": spec.choices} if spec.choices else {}
        f = dataclasses.field(default=spec.default, metadata={"help": spec.help, "arch_option": True, **kw})
        f.name, f.type = spec.name, kind if spec.default is not None and spec.sweep else f"{kind} | None"
        fields.append(f)
    ordered = static[:cut] + fields + static[cut:]
    for name in ("__setattr__", "__delattr__", "__init__", "__repr__", "__eq__", "__hash__", "__match_args__",
                 "__dataclass_fields__", "__dataclass_params__"):
        if name in TrainConfig.__dict__:
            delattr(TrainConfig, name)
    for name in list(TrainConfig.__dict__.get("__annotations__", {})):
        if name not in {f.name for f in ordered} and name in TrainConfig.__dict__:
            delattr(TrainConfig, name)   # an option no registered architecture declares any more
    TrainConfig.__annotations__ = {f.name: f.type for f in ordered}
    for f in ordered:
        setattr(TrainConfig, f.name, dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                       metadata=f.metadata))
    dataclass(frozen=True)(TrainConfig)
    arch_field = TrainConfig.__dataclass_fields__["arch"]
    arch_field.metadata = {**arch_field.metadata, "help": f"SAE architecture: {', '.join(registry.ARCH_NAMES)}."}


def options() -> dict[str, OptionSpec]:
    """The architecture options TrainConfig has now, by name."""
    return dict(_OPTIONS)


_install_options()
registry.on_register(_install_options)


def _values(cfg: TrainConfig, arch: str) -> dict[str, tuple]:
    """{config field: the values to train} for `arch`'s own hyperparameters, primary sweep field first."""
    sae_cls, cfg_cls = registry.REGISTRY[arch]
    own = {f.name: f for f in hyper_fields(cfg_cls)}
    out = {}
    for spec in _OPTIONS.values():
        given = getattr(cfg, spec.name)
        if arch not in spec.archs:
            continue   # another architecture's option: ignored, as it always was (--k with --arch relu)
        f = own[spec.field]
        meta = f.metadata["hyper"]
        if given is None or given == ():
            given = meta["train_default"] if meta["train_default"] is not None else f.default
            given = (given,) if spec.sweep else given
        cast = {"int": int, "float": float}.get(type_name(f), lambda v: v)
        out[spec.field] = tuple(cast(v) for v in given) if spec.sweep else (given,)
    first = sae_cls.sweep_field
    return {first: out.pop(first), **out} if first in out else out


def _part(option: str, value) -> str:
    return f"k{value}" if option == "k" else f"{option}-{_fmt(value)}"


def check_options(cfg: TrainConfig) -> None:
    """TrainError unless --arch is registered, every number is finite and in range (and the
    architecture's options make valid configs: sweep() checks)."""
    if cfg.arch not in registry.REGISTRY:
        raise TrainError(f"unknown --arch {cfg.arch!r}; choose one of {', '.join(registry.ARCH_NAMES)}")
    _check_numbers(cfg)
    _values(cfg, cfg.arch)


# (option, lowest, highest, lowest allowed itself): a NaN or inf here trains an all-NaN SAE (or
# fails deep inside torch), so each is refused up front with one line naming the option
_RANGES = (("lr", 0.0, None, False), ("warmup_fraction", 0.0, 1.0, True),
           ("lr_final_fraction", 0.0, 1.0, True), ("grad_clip", 0.0, None, False),
           ("kl_coeff", 0.0, None, True), ("downstream_coeff", 0.0, None, True))
# counts the step loop divides by or loops over: 0 or less is a crash or an empty run, not a choice
_POSITIVE = ("checkpoint_every", "log_every", "tokens", "epochs", "dead_tokens")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_numbers(cfg: TrainConfig) -> None:
    for name, low, high, closed in _RANGES:
        v = getattr(cfg, name)
        if v is None:
            continue
        ok = math.isfinite(v) and (v >= low if closed else v > low) and (high is None or v <= high)
        if not ok:
            where = f"in [{low:g}, {high:g}]" if high is not None else f"{'>=' if closed else '>'} {low:g}"
            raise TrainError(f"{_flag(name)} must be a finite number {where}, got {v}")
    for name in _POSITIVE:
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise TrainError(f"{_flag(name)} must be at least 1, got {v}")
    if cfg.adam_betas is not None and not all(math.isfinite(b) and 0 <= b < 1 for b in cfg.adam_betas):
        raise TrainError(f"adam_betas must be two finite numbers in [0, 1), got {cfg.adam_betas}")
    for spec in _OPTIONS.values():   # the architectures' own float options (--l1, --aux-coeff, ...)
        v = getattr(cfg, spec.name, None)
        if spec.type != "float" or v is None:
            continue
        for value in v if isinstance(v, tuple) else (v,):
            if not math.isfinite(float(value)):
                raise TrainError(f"{_flag(spec.name)} must be finite, got {value}")


def swept_fields(cfg: TrainConfig) -> tuple[str, ...]:
    """The config fields this run trains more than one value of."""
    return tuple(f for f, vals in _values(cfg, cfg.arch).items() if len(vals) > 1) \
        if cfg.arch in registry.REGISTRY else ()


def sweep_size(cfg: TrainConfig) -> int:
    """How many SAEs the sweep trains (known before the data's width is)."""
    n = 1
    for vals in _values(cfg, cfg.arch).values():
        n *= len(vals)
    return n


def sweep(cfg: TrainConfig, d_in: int) -> list[tuple[str, SAEConfigBase]]:
    """One (folder name, config) per combination of the swept values (the primary field's values
    outermost); every SAE sees the same batches. Folder: <arch>_k<k> or <arch>_<option>-<value> for
    the architecture's primary sweep field (topk_k32, relu_l1-300), then _<option>-<value> for each
    other option given more than one value (topk_k32_aux_coeff-0.03)."""
    check_options(cfg)
    d_sae = cfg.d_sae or cfg.expansion * d_in
    values = _values(cfg, cfg.arch)
    option = {spec.field: spec.name for spec in _OPTIONS.values() if cfg.arch in spec.archs}
    first = registry.ARCHITECTURES[cfg.arch].sweep_field
    named = [f for f, vals in values.items() if f == first or len(vals) > 1]
    out = []
    for combo in itertools.product(*values.values()):
        fields = dict(zip(values, combo))
        name = "_".join([cfg.arch] + [_part(option[f], fields[f]) for f in named])
        out.append((name, make_config(cfg.arch, d_in, d_sae, **fields)))   # ValueError: a bad value
    return out
