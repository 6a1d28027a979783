"""The architectures, listed once, and the config they share.

Adding an architecture: write train/<name>.py (a subclass of train.sae.SAE), import it here and add
it to ARCHITECTURES; add a field to SAEConfig only if it needs a hyperparameter no other one has.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sae_harvest.train.batchtopk import BatchTopKSAE
from sae_harvest.train.clt import CLT_ARCHS, CrossLayerTranscoder
from sae_harvest.train.crosscoder import CROSSCODER_ARCHS, crosscoder_class
from sae_harvest.train.gated import GatedSAE
from sae_harvest.train.gtopk import GradTopKSAE
from sae_harvest.train.jumprelu import JumpReLUSAE
from sae_harvest.train.matryoshka import MatryoshkaBatchTopKSAE
from sae_harvest.train.relu import ReLUSAE
from sae_harvest.train.sae import SAE
from sae_harvest.train.topk import TopKSAE
from sae_harvest.train.transcoder import TRANSCODER_ARCHS, transcoder_class

ARCHITECTURES: dict[str, type[SAE]] = {cls.arch: cls for cls in (
    ReLUSAE, GatedSAE, TopKSAE, BatchTopKSAE, GradTopKSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE,
)}
ARCH_NAMES = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class SAEConfig:
    arch: str
    d_in: int
    d_sae: int
    l1_coeff: float = 0.0      # relu: phi = l1_coeff / d_in (e2e paper); gated: lambda on ||ReLU(pi_gate)||_1;
                               # jumprelu: lambda on the L0
    k: int = 0                 # topk family: active latents per token (batchtopk: on average)
    beta: float = 0.0          # gtopk gradient weight (see train/gtopk.py DEFAULT_BETA)
    aux_k: int = 512           # AuxK: top aux_k dead latents, capped at d_sae // 2
    aux_coeff: float = 1 / 32
    threshold_ema: float = 0.99  # batchtopk: EMA decay of the per-batch min kept activation
    bandwidth: float = 0.05    # jumprelu: width eps of the straight-through estimators' rectangle kernel
    threshold_init: float = 0.01   # jumprelu: floor of the initial theta (theta starts at max(this, sqrt(lambda)))
    l0_penalty: str = "step"   # jumprelu: "step" (lambda * ||f||_0 through the STE) or "tanh" (SAELens)
    tanh_scale: float = 4.0    # jumprelu, l0_penalty "tanh": c in tanh(c * f * ||W_dec row||)
    prefixes: tuple[int, ...] = ()   # matryoshka: nested dictionary sizes; () = d_sae/16, /8, /4, /2, d_sae
    d_out: int = 0             # transcoder: the target site's width (0: an SAE, decoding into d_in)
    skip: bool = False         # transcoder: learned linear skip W_skip x added to the output
    n_sites: int = 0           # crosscoder: d_in is this many equal-width sites concatenated (0: not one)
    clt_layers: int = 0        # cross-layer transcoder over this many layers: d_in, d_sae = layers x (d, F)

    def __post_init__(self):
        object.__setattr__(self, "prefixes", tuple(int(m) for m in self.prefixes))   # JSON gives a list
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown SAE arch {self.arch!r}; expected one of {ARCH_NAMES}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        ARCHITECTURES[self.arch].check_config(self)
        if (self.d_out or self.skip) and self.arch not in TRANSCODER_ARCHS:
            raise ValueError(f"--target: a {self.arch} SAE cannot be a transcoder; transcoders take "
                             f"{', '.join(TRANSCODER_ARCHS)}")
        if self.n_sites and (self.arch not in CROSSCODER_ARCHS or self.d_out or self.d_in % self.n_sites):
            raise ValueError(f"a crosscoder takes {', '.join(CROSSCODER_ARCHS)}, no --target, and d_in a "
                             f"multiple of its {self.n_sites} sites")
        if self.clt_layers and (self.arch not in CLT_ARCHS or self.d_out or self.n_sites
                                or self.d_in % self.clt_layers or self.d_sae % self.clt_layers
                                or (self.arch == "topk" and self.k > self.d_sae // self.clt_layers)):
            raise ValueError(f"a cross-layer transcoder takes {', '.join(CLT_ARCHS)}, d_in and d_sae multiples "
                             f"of its {self.clt_layers} layers, and k <= the latents per layer")
        if self.skip and not self.d_out:
            raise ValueError("a skip connection needs a transcoder (--target)")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "prefixes": list(self.prefixes)}   # as JSON reads it back

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown SAEConfig keys {unknown}")
        return cls(**d)


def make_sae(cfg: SAEConfig) -> SAE:
    if cfg.d_out:
        return transcoder_class(cfg.arch, cfg.skip)(cfg)
    if cfg.n_sites:
        return crosscoder_class(cfg.arch)(cfg)
    if cfg.clt_layers:
        return CrossLayerTranscoder(cfg)
    return ARCHITECTURES[cfg.arch](cfg)
