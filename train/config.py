"""The training config: one frozen dataclass, serialised into every saved SAE; `train fit`'s options
are generated from its fields."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sae_harvest.stores.cli import opt
from sae_harvest.train.jumprelu import L0_PENALTIES
from sae_harvest.stores.urls import scrub_tree
from sae_harvest.train.registry import ARCH_NAMES, ARCHITECTURES, SAEConfig

SAE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SAEConfig)}


@dataclass(frozen=True)
class TrainConfig:
    out: str = opt(dataclasses.MISSING, "Output folder: one sub-folder per swept SAE.")
    store: str | None = opt(None, "Store path or fsspec URL (from `harvest run`).")
    site: str | None = opt(None, "Site to train on (required when the store has several); a comma list or globs "
                                 "(blocks.*.resid_pre) train one SAE or sweep per site in one pass over the store.")
    target: str | None = opt(None, "Transcoder: the decoder predicts this site (e.g. blocks.6.mlp_out) from --site "
                                   "(blocks.6.mlp_in); several sites pair with as many targets in layer order.")
    skip: bool = opt(False, "Transcoder: add a learned linear skip W_skip x to the output (skip transcoder).")
    clt: bool = opt(False, "Cross-layer transcoder: --site / --target one MLP input and output per layer, no layer "
                           "missing (blocks.*.mlp_in / blocks.*.mlp_out); --d-sae is per layer; topk or jumprelu.")
    crosscoder: bool = opt(False, "Train one crosscoder over every --site (equal widths): per-site encoders "
                                  "summed, per-site decoders (relu, topk, batchtopk).")
    decoder_of: str | None = opt(None, "Meta-SAE: train a BatchTopK SAE on this SAE checkpoint's decoder rows.")
    arch: str = opt("topk", f"SAE architecture: {', '.join(ARCH_NAMES)}.")
    d_sae: int | None = opt(None, "Dictionary size (default: --expansion x d_in).")
    expansion: int = opt(16, "Dictionary size as a multiple of d_in, when --d-sae is not given.")
    l1: tuple[float, ...] = opt((), "Sparsity coefficient lambda (relu: phi = lambda/d_in; gated: lambda; jumprelu: "
                                    "lambda on the L0), on normalised inputs; the e2e paper's / SAELens's scales: "
                                    "docs/e2e.md. Comma list = sweep. Default: the architecture's (relu 300, "
                                    "gated 3: L0 16-128 on the default model).")
    k: tuple[int, ...] = opt((32,), "Active latents for topk/batchtopk/gtopk/matryoshka_batchtopk. "
                                    "Comma list = sweep.")
    beta: float | None = opt(None, "gtopk gradient weight (default: calibrated so beta*|W_dec^T grad| ~ 2.4, "
                                   "the paper's operating point).")
    bandwidth: float | None = opt(None, "jumprelu: bandwidth eps of the threshold's straight-through "
                                        f"estimators (default {SAE_DEFAULTS['bandwidth']:g}).")
    threshold_init: float | None = opt(None, f"jumprelu: floor of the initial threshold; theta starts at "
                                             f"max(this, sqrt(lambda)) (default {SAE_DEFAULTS['threshold_init']:g}).")
    l0_penalty: str | None = opt(None, "jumprelu L0 penalty: step (straight-through) or tanh (SAELens) "
                                       f"(default {SAE_DEFAULTS['l0_penalty']}).", choices=L0_PENALTIES)
    prefixes: tuple[int, ...] | None = opt(None, "matryoshka_batchtopk: nested dictionary sizes, e.g. "
                                                 "256,1024,4096 (default d_sae/16,/8,/4,/2; d_sae is always last).")
    lr: float | None = opt(None, "Learning rate (default 5e-4 for relu/gated/jumprelu, 2e-4/sqrt(d_sae/2^14) "
                                 "for the TopK family and matryoshka_batchtopk).")
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
    stack_sweep: str = opt("auto", "Train a sweep of plain topk SAEs of one shape as one batched step (bmm over "
                                   "the SAEs) instead of a loop (auto: on CUDA; not data parallel).",
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

    def to_dict(self) -> dict:
        """The config as stored (cfg.json, checkpoint/state.json) and logged (wandb): every path
        and URL scrubbed of credentials, so a resume compares like with like."""
        return scrub_tree(dataclasses.asdict(self))


def sweep_size(cfg: TrainConfig) -> int:
    """How many SAEs the sweep trains (known before the data's width is)."""
    if ARCHITECTURES[cfg.arch].sweep_field == "k":
        return len(cfg.k)
    return len(cfg.l1 or (None,))


def sweep(cfg: TrainConfig, d_in: int) -> list[tuple[str, SAEConfig]]:
    """One (folder name, SAEConfig) per swept value; every SAE sees the same batches."""
    cls = ARCHITECTURES[cfg.arch]
    d_sae = cfg.d_sae or cfg.expansion * d_in
    # beta 0 tells gtopk to calibrate itself on the data (its calibrate() hook)
    common = dict(arch=cfg.arch, d_in=d_in, d_sae=d_sae, beta=cfg.beta or 0.0)
    # unset (None): the SAEConfig default; so a run saved before these options existed still resumes
    common.update({f: getattr(cfg, f) for f in ("bandwidth", "threshold_init", "l0_penalty", "prefixes")
                   if getattr(cfg, f) is not None})
    if cls.sweep_field == "k":
        return [(f"{cfg.arch}_k{k}", SAEConfig(**common, k=int(k))) for k in cfg.k]
    return [(f"{cfg.arch}_l1-{l1:g}", SAEConfig(**common, l1_coeff=float(l1)))
            for l1 in (cfg.l1 or (cls.default_l1,))]
