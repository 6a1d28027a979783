"""The training config: one frozen dataclass, serialised into every saved SAE."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from train.sae import SAEConfig, TOPK_FAMILY


@dataclass(frozen=True)
class TrainConfig:
    out: str
    store: str | None = None
    site: str | None = None
    decoder_of: str | None = None     # meta-SAE: train on this SAE's decoder rows instead of a store
    arch: str = "topk"
    d_sae: int | None = None
    expansion: int = 16
    l1: tuple[float, ...] = (1.0,)    # sweep values; relu: phi = l1 / d_in; gated: lambda
    k: tuple[int, ...] = (32,)        # sweep values for the TopK family
    beta: float | None = None         # gtopk; None -> calibrated on the data (train.gtopk.calibrate_beta)
    lr: float | None = None           # None -> 5e-4 (relu, gated), 2e-4 / sqrt(d_sae / 2^14) (TopK family)
    batch_size: int = 4096            # tokens per step
    tokens: int | None = None         # None -> one pass over the training rows
    seed: int = 0
    device: str = "auto"
    include_bos: bool = False         # position-0 rows dwarf the rest (e2e paper app. B)
    holdout_fraction: float = 0.02    # last blocks of the store, never trained on
    warmup_fraction: float = 0.05
    lr_final_fraction: float = 0.1    # cosine decay to 10% of lr (e2e paper)
    grad_clip: float = 10.0
    adam_betas: tuple[float, float] | None = None   # None -> (0, 0.999) gated, (0.9, 0.999) otherwise
    dead_tokens: int = 10_000_000     # a latent is dead after this many tokens without firing
    b_dec_init: str = "geometric_median"
    normalize: bool = True            # divide inputs by one constant so E||x|| = sqrt(d_in)
    checkpoint_every: int = 1000      # steps
    log_every: int = 10
    wandb: str | None = None
    autocast: str = "auto"            # auto: bf16 autocast for the encoder on CUDA
    sparse_decode: str = "auto"       # auto: gather the k decoder rows on CUDA when k <= d_sae / 16
    epochs: int | None = None         # meta-SAE: passes over the decoder rows
    loss: str = "local"               # local | e2e | e2e+ds
    model: str | None = None          # live model for e2e losses
    kl_coeff: float | None = None
    downstream_coeff: float | None = None
    init: str | None = None           # start from this checkpoint (e.g. a local SAE for e2e)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**d)


def default_lr(arch: str, d_sae: int) -> float:
    if arch in TOPK_FAMILY:
        return 2e-4 / math.sqrt(d_sae / 2**14)
    return 5e-4


def sweep(cfg: TrainConfig, d_in: int) -> list[tuple[str, SAEConfig]]:
    """One (folder name, SAEConfig) per swept value; every SAE sees the same batches."""
    d_sae = cfg.d_sae or cfg.expansion * d_in
    beta = 0.0 if cfg.beta is None else cfg.beta   # None: the loop calibrates it on the data
    out = []
    if cfg.arch in TOPK_FAMILY:
        for k in cfg.k:
            out.append((f"{cfg.arch}_k{k}", SAEConfig(arch=cfg.arch, d_in=d_in, d_sae=d_sae, k=int(k),
                                                      beta=beta if cfg.arch == "gtopk" else 0.0)))
    else:
        for l1 in cfg.l1:
            out.append((f"{cfg.arch}_l1-{l1:g}", SAEConfig(arch=cfg.arch, d_in=d_in, d_sae=d_sae, l1_coeff=float(l1))))
    if len(out) == 1:
        out = [(out[0][0], out[0][1])]
    return out
