"""The architectures, listed once: name -> (SAE class, config class).

Adding an architecture: write train/<name>.py (a subclass of train.sae.SAE and a frozen subclass of
train.sae_config.SAEConfigBase holding its hyperparameters) and add one `register(...)` line below.
The `train fit` options, the sweep and cfg.json follow from the config class (docs/extending.md).
"""
from __future__ import annotations

import dataclasses
import warnings

from sae_harvest.train.batchtopk import BatchTopKConfig, BatchTopKSAE
from sae_harvest.train.clt import CLT_ARCHS, CrossLayerTranscoder
from sae_harvest.train.crosscoder import CROSSCODER_ARCHS, crosscoder_class
from sae_harvest.train.gated import GatedConfig, GatedSAE
from sae_harvest.train.gtopk import GradTopKConfig, GradTopKSAE
from sae_harvest.train.jumprelu import JumpReLUConfig, JumpReLUSAE
from sae_harvest.train.matryoshka import MatryoshkaBatchTopKSAE, MatryoshkaConfig
from sae_harvest.train.relu import ReLUConfig, ReLUSAE
from sae_harvest.train.sae import SAE
from sae_harvest.train.sae_config import LEGACY_FIELDS, SAEConfigBase
from sae_harvest.train.topk import TopKConfig, TopKSAE
from sae_harvest.train.transcoder import TRANSCODER_ARCHS, transcoder_class

REGISTRY: dict[str, tuple[type[SAE], type[SAEConfigBase]]] = {}
ARCHITECTURES: dict[str, type[SAE]] = {}        # name -> SAE class (REGISTRY's first column)
CONFIGS: dict[str, type[SAEConfigBase]] = {}    # name -> config class (its second)
ARCH_NAMES: tuple[str, ...] = ()                # in registration order; rebound by register()
_listeners = []


def register(sae_cls: type[SAE], config_cls: type[SAEConfigBase]) -> None:
    """Make `sae_cls` (named by its `arch`) trainable with `config_cls`: --arch, its options, its
    sweep and its cfg.json. Code that derives something from the registry (train/config.py's
    TrainConfig, train/cli.py's options) is told through on_register(), so registering after
    those are imported works too."""
    global ARCH_NAMES
    name = sae_cls.arch
    if not name or not (isinstance(config_cls, type) and issubclass(config_cls, SAEConfigBase)):
        raise ValueError(f"register({sae_cls.__name__}, {config_cls!r}): needs an `arch` name and a "
                         f"SAEConfigBase subclass")
    if sae_cls.sweep_field not in {f.name for f in dataclasses.fields(config_cls)}:
        raise ValueError(f"{sae_cls.__name__}.sweep_field {sae_cls.sweep_field!r} is not a field of {config_cls.__name__}")
    REGISTRY[name] = (sae_cls, config_cls)
    ARCHITECTURES[name], CONFIGS[name] = sae_cls, config_cls
    ARCH_NAMES = tuple(REGISTRY)
    for fn in _listeners:
        fn()


def unregister(name: str) -> None:
    """Remove a registered architecture (tests that register a toy one)."""
    global ARCH_NAMES
    REGISTRY.pop(name), ARCHITECTURES.pop(name), CONFIGS.pop(name)
    ARCH_NAMES = tuple(REGISTRY)
    for fn in _listeners:
        fn()


def on_register(fn) -> None:
    """Call fn() after every register() / unregister()."""
    _listeners.append(fn)


register(ReLUSAE, ReLUConfig)
register(GatedSAE, GatedConfig)
register(TopKSAE, TopKConfig)
register(BatchTopKSAE, BatchTopKConfig)
register(GradTopKSAE, GradTopKConfig)
register(JumpReLUSAE, JumpReLUConfig)
register(MatryoshkaBatchTopKSAE, MatryoshkaConfig)


def field_defaults() -> dict:
    """Every config field any architecture has, with the default it has where it is foreign: the
    single config's default for the legacy fields, the declaring class's for newer ones."""
    out = {}
    for cfg_cls in CONFIGS.values():
        for f in dataclasses.fields(cfg_cls):
            if f.default is not dataclasses.MISSING:
                out.setdefault(f.name, f.default)
    out.update({k: v for k, v in LEGACY_FIELDS.items() if v is not None})
    return out


def _same(a, b) -> bool:
    norm = (lambda v: list(v) if isinstance(v, (tuple, list)) else v)
    return norm(a) == norm(b)


def make_config(arch: str, d_in: int, d_sae: int, *, strict: bool = True, **fields) -> SAEConfigBase:
    """The config of architecture `arch`. A field it does not have (another architecture's) is
    dropped at its foreign default; any other value raises when strict (a file that asks for a
    value this architecture would ignore), and is ignored otherwise (SAEConfig(...)'s keywords,
    as the single config of earlier versions ignored them)."""
    if arch not in REGISTRY:
        raise ValueError(f"unknown SAE arch {arch!r}; expected one of {ARCH_NAMES}")
    cfg_cls = CONFIGS[arch]
    own = {f.name for f in dataclasses.fields(cfg_cls)}
    defaults = field_defaults()
    unknown = sorted(set(fields) - own - set(defaults))
    if unknown:
        raise ValueError(f"unknown SAEConfig keys {unknown}")
    foreign = {k: v for k, v in fields.items() if k not in own and not _same(v, defaults[k])}
    if strict:
        # the single flat config of earlier versions stored every field, and `train fit` passed e.g.
        # --beta to every architecture, which ignored it: such a file still loads (the value never
        # acted), with a warning; a newer field this architecture lacks is a file asking for
        # something it would not do, and raises
        ignored = [f"{k}={v!r}" for k, v in foreign.items() if k in LEGACY_FIELDS]
        bad = [f"{k}={v!r}" for k, v in foreign.items() if k not in LEGACY_FIELDS]
        if bad:
            raise ValueError(f"a {arch} SAE has no {', '.join(bad)}")
        if ignored:
            warnings.warn(f"a {arch} SAE has no {', '.join(ignored)}: written by an earlier version, which "
                          f"ignored it; dropped", stacklevel=3)
    cfg = cfg_cls(arch=arch, d_in=d_in, d_sae=d_sae, **{k: v for k, v in fields.items() if k in own})
    check_dictionary(cfg)
    return cfg


def config_from_dict(d: dict) -> SAEConfigBase:
    """A config from cfg.json's sae_harvest.sae, as every version wrote it (the single flat config
    of earlier versions included): strict (see make_config)."""
    d = dict(d)
    missing = [k for k in ("arch", "d_in", "d_sae") if k not in d]
    if missing:
        raise ValueError(f"SAEConfig needs {', '.join(missing)}")
    return make_config(d.pop("arch"), d.pop("d_in"), d.pop("d_sae"), strict=True, **d)


class _Factory(type):
    def __instancecheck__(cls, obj):
        return isinstance(obj, SAEConfigBase)


class SAEConfig(metaclass=_Factory):
    """SAEConfig(arch, d_in, d_sae, **fields): the config of `arch` (TopKConfig for "topk", ...),
    taking every keyword the single config of earlier versions took; `SAEConfig.from_dict` reads any
    cfg.json's sae_harvest.sae. isinstance(c, SAEConfig) is True for every architecture's config."""

    def __new__(cls, arch: str, d_in: int, d_sae: int, **fields) -> SAEConfigBase:
        return make_config(arch, d_in, d_sae, strict=False, **fields)

    from_dict = staticmethod(config_from_dict)


def check_dictionary(cfg) -> None:
    """What a config's shape fields allow for its architecture: which ones make transcoders,
    crosscoders and cross-layer transcoders."""
    if (cfg.d_out or cfg.skip) and cfg.arch not in TRANSCODER_ARCHS:
        raise ValueError(f"--target: a {cfg.arch} SAE cannot be a transcoder; transcoders take "
                         f"{', '.join(TRANSCODER_ARCHS)}")
    if cfg.n_sites and (cfg.arch not in CROSSCODER_ARCHS or cfg.d_out or cfg.d_in % cfg.n_sites):
        raise ValueError(f"a crosscoder takes {', '.join(CROSSCODER_ARCHS)}, no --target, and d_in a "
                         f"multiple of its {cfg.n_sites} sites")
    if cfg.clt_layers and (cfg.arch not in CLT_ARCHS or cfg.d_out or cfg.n_sites
                           or cfg.d_in % cfg.clt_layers or cfg.d_sae % cfg.clt_layers
                           or (cfg.arch == "topk" and cfg.k > cfg.d_sae // cfg.clt_layers)):
        raise ValueError(f"a cross-layer transcoder takes {', '.join(CLT_ARCHS)}, d_in and d_sae multiples "
                         f"of its {cfg.clt_layers} layers, and k <= the latents per layer")


def make_sae(cfg: SAEConfigBase) -> SAE:
    if cfg.arch not in REGISTRY or not isinstance(cfg, CONFIGS[cfg.arch]):
        raise ValueError(f"a {type(cfg).__name__} cannot build a {cfg.arch!r} SAE (expected one of {ARCH_NAMES} "
                         f"with its config class)")
    check_dictionary(cfg)
    if cfg.d_out:
        return transcoder_class(cfg.arch, cfg.skip)(cfg)
    if cfg.n_sites:
        return crosscoder_class(cfg.arch)(cfg)
    if cfg.clt_layers:
        return CrossLayerTranscoder(cfg)
    return ARCHITECTURES[cfg.arch](cfg)
