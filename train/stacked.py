"""A sweep, or the SAEs of several sites, as one batched step: SAEs of one architecture and shape
stacked along a leading SAE dimension, so the encoder and decoder of all of them are one `bmm` each
instead of a Python loop of small matmuls, and Adam, the decoder constraint and the dead-latent
counts are one call. Stackable: topk, batchtopk, relu, jumprelu, gated (train/stacked_losses.py
holds their batched losses); the swept value (k or the L1/L0 coefficient) may differ, nothing else.

Each SAE keeps exactly its own objective and update (tests/test_stacked.py trains them both ways
and compares the weights): the SAEs share no parameter, so the gradient of the summed loss is each
one's own; the optimizer step mirrors train/runs.py's optimizer_step per SAE: gradients averaged
over the ranks under torchrun, the parallel part of each decoder row's gradient removed,
gradient-norm clipping per SAE (not over the stack), Adam (elementwise, so one Adam over the stack
is S Adams), unit-norm decoder rows, dead-latent counts (fired OR-ed over the ranks).
TopK SAEs whose sparse decode is on (CUDA) decode by gathering their k rows here too, and those
with --sparse-backward (CUDA) take the encoder gradients at the chosen latents only, as one sparse
matmul over the stack (batchtopk's stacked backward stays dense).
Inputs are [S, n, d_in] (each SAE reads its own site's columns of the batch) or [n, d_in] (one
site's sweep: every SAE the same rows).
The SAEs are built (and initialised, each from its own seed stream) one by one first, then
stacked: `StackedSAEs(saes)`; `unstack()` writes the trained weights back into them.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from sae_harvest.train import stacked_losses
from sae_harvest.train.distributed import LOCAL, Reducer
from sae_harvest.train.batchtopk import BatchTopKSAE
from sae_harvest.train.gated import GatedSAE
from sae_harvest.train.jumprelu import JumpReLUSAE
from sae_harvest.train.relu import ReLUSAE
from sae_harvest.train.runs import make_adam
from sae_harvest.train.topk import TopKSAE

LOSSES = {TopKSAE: stacked_losses.topk, BatchTopKSAE: stacked_losses.batchtopk, ReLUSAE: stacked_losses.relu,
          JumpReLUSAE: stacked_losses.jumprelu, GatedSAE: stacked_losses.gated}
# config fields that may differ within a stack besides the swept one: jumprelu records its theta_0 there
_FREE_FIELDS = ("threshold_init",)


def stack_key(sae) -> tuple | None:
    """SAEs with equal keys can share a stack (None: this one cannot be stacked): the exact class
    (a transcoder, crosscoder or CLT is a subclass and is not stacked) and every config field but
    the swept value."""
    cls = type(sae)
    if cls not in LOSSES:
        return None
    fields = {k: v for k, v in dataclasses.asdict(sae.cfg).items()
              if k != cls.sweep_field and k not in _FREE_FIELDS}
    return (cls, tuple(sorted((k, repr(v)) for k, v in fields.items())))


class StackedSAEs(nn.Module):
    def __init__(self, saes: list):
        super().__init__()
        keys = {stack_key(s) for s in saes}
        if None in keys or len(keys) != 1:
            raise ValueError(f"stacking needs SAEs of one shape and one stackable architecture "
                             f"({', '.join(c.arch for c in LOSSES)}); got {', '.join(s.arch for s in saes)}")
        first = saes[0]
        self.saes, self.cls, self._loss = list(saes), type(first), LOSSES[type(first)]
        self.names = [name for name, _ in first.named_parameters()]
        for name in self.names:   # [S, ...] each, in the SAE's own parameter order
            setattr(self, name, nn.Parameter(torch.stack([getattr(s, name).detach() for s in saes])))
        self.buffer_names = [name for name, _ in first.named_buffers()]
        for name in self.buffer_names:   # batchtopk's threshold
            self.register_buffer(name, torch.stack([getattr(s, name) for s in saes]))
        c, device = first.cfg, self.W_enc.device
        # each architecture's config holds only its own fields (train/<arch>.py): what it lacks, its loss never reads
        field = lambda name, default=None: getattr(c, name, default)   # noqa: E731
        self.d_sae, self.aux_k, self.aux_coeff = c.d_sae, field("aux_k"), field("aux_coeff")
        self.threshold_ema, self.bandwidth = field("threshold_ema"), field("bandwidth")
        self.l0_penalty, self.tanh_scale = field("l0_penalty"), field("tanh_scale")
        self.apply_b_dec_to_input = self.cls.apply_b_dec_to_input
        self.sparse_decode = self.cls is TopKSAE and all(s.use_sparse_decode for s in saes)
        self.sparse_backward = self.cls is TopKSAE and all(s.use_sparse_backward for s in saes)
        ks = [getattr(s.cfg, "k", 0) for s in saes]
        self.register_buffer("ks", torch.tensor(ks, device=device))
        self.k_max = max(ks)
        self.one_k = all(k == self.k_max for k in ks)
        # the swept coefficients as the per-SAE code multiplies them: python floats rounded once to float32
        self.register_buffer("l1", torch.tensor([getattr(s.cfg, "l1_coeff", 0.0) for s in saes], device=device))
        self.register_buffer("l1_over_d", torch.tensor([getattr(s.cfg, "l1_coeff", 0.0) / c.d_in for s in saes], device=device))

    def __len__(self) -> int:
        return len(self.saes)

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None, reducer: Reducer = LOCAL):
        """(summed loss, per-SAE loss [S], per-SAE terms {name: [S]}, fired [S, d_sae] bool, x_hat
        [S, n, d_in]). x: [S, n, d_in] or [n, d_in] (shared). dead: [S, d_sae] bool (an SAE with no
        dead latent has an all-False row) or None: no AuxK. `reducer`: the batch-wide parts' (as the
        architectures' loss())."""
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(len(self), -1, -1)
        per, terms, feats, x_hat = self._loss(self, x, dead, reducer)
        return per.sum(), per.detach(), terms, (feats > 0).any(1), x_hat

    @torch.no_grad()
    def prepare_update(self, grad_clip: float, reducer: Reducer = LOCAL) -> None:
        """Before Adam, per SAE: gradients averaged over the ranks (by `reducer`), the decoder rows'
        radial gradient removed, gradient-norm clipping."""
        reducer.average_gradients(self)
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self.W_dec.grad -= (self.W_dec.grad * unit).sum(-1, keepdim=True) * unit
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # the norm clip_grad_norm_ takes over one SAE's parameters: the norm of the per-tensor norms
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1).norm(dim=1)   # [S]
        coef = (grad_clip / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def unstack(self) -> list:
        """Copy the trained weights back into the SAEs they were stacked from; returns them."""
        for s, sae in enumerate(self.saes):
            for name in self.names + self.buffer_names:
                getattr(sae, name).copy_(getattr(self, name)[s])
        return self.saes


StackedTopK = StackedSAEs   # the name bench/train_parts.py and older code use


def stacked_step(stack: StackedSAEs, opt: torch.optim.Optimizer, x: torch.Tensor, since_fired: torch.Tensor,
                 dead_after: int, idle_bound: int, lr: float, grad_clip: float, reducer: Reducer = LOCAL) -> dict:
    """One training step of the whole stack, the batched form of train/local.py's _step +
    train/runs.py's optimizer_step. since_fired [S, d_sae] is updated in place; idle_bound is the
    host's upper bound on it (AuxK is skipped while no latent can be dead); `reducer` combines the
    batch-wide parts over the ranks. Returns the terms."""
    dead = since_fired >= dead_after if idle_bound >= dead_after else None
    loss, _, terms, fired, _ = stack.loss(x, dead, reducer)
    loss.backward()
    _update(stack, opt, lr, grad_clip, reducer)
    since_fired += x.shape[-2] * reducer.ranks()
    since_fired.masked_fill_(reducer.any_rank(fired), 0)
    return terms


def _update(stack, opt, lr, grad_clip, reducer):
    for group in opt.param_groups:
        group["lr"] = lr
    stack.prepare_update(grad_clip, reducer)
    opt.step()
    opt.zero_grad(set_to_none=True)
    stack.set_decoder_norm_to_unit_norm()


class StackedRuns:
    """Runs of `train fit` trained as one stacked step. The runs stay what the driver checkpoints,
    resumes, logs and saves: each run's parameters, buffers, Adam moments and dead-latent counts
    become views of the stack's tensors (built from the runs' resumed state when there is one), so
    a checkpoint of the runs is a checkpoint of the stack."""

    def __init__(self, runs: list):
        self.runs = list(runs)
        first = self.runs[0]
        self.stack = StackedSAEs([r.sae for r in self.runs])
        self.opt = make_adam(self.stack.parameters(), first.lr, first.opt.param_groups[0]["betas"])
        on_device = bool(self.opt.param_groups[0].get("fused"))
        for name in self.stack.names:
            stacked = getattr(self.stack, name)
            per_run = [r.opt.state.get(getattr(r.sae, name), {}) for r in self.runs]
            if all(per_run):   # resumed: the runs' saved moments (one step count: they trained together)
                step = per_run[0]["step"].clone()
                avg = torch.stack([s["exp_avg"] for s in per_run]).to(stacked)
                avg_sq = torch.stack([s["exp_avg_sq"] for s in per_run]).to(stacked)
            else:
                step = torch.zeros((), dtype=torch.float32, device=stacked.device if on_device else "cpu")
                avg, avg_sq = torch.zeros_like(stacked), torch.zeros_like(stacked)
            self.opt.state[stacked] = {"step": step, "exp_avg": avg, "exp_avg_sq": avg_sq}
            for s, run in enumerate(self.runs):
                param = getattr(run.sae, name)
                param.data = stacked.data[s]
                run.opt.state[param] = {"step": step, "exp_avg": avg[s], "exp_avg_sq": avg_sq[s]}
        for name in self.stack.buffer_names:
            for s, run in enumerate(self.runs):
                run.sae._buffers[name] = getattr(self.stack, name)[s]
        self.since = torch.stack([r.since_fired for r in self.runs])
        for s, run in enumerate(self.runs):
            run.since_fired = self.since[s]

    def step(self, x, factor: float, grad_clip: float, dead_after: int, autocast: bool, log_now: bool,
             reducer: Reducer = LOCAL) -> None:
        """train/local.py's _step + optimizer_step for every run at once; x [S, n, d] or [n, d];
        `reducer`: the step's (the driver's)."""
        can_be_dead = [r.idle_bound >= dead_after for r in self.runs]
        dead = None
        if any(can_be_dead):   # a run whose latents cannot be dead yet gets an all-False row: no AuxK
            dead = (self.since >= dead_after) & torch.tensor(can_be_dead, device=x.device)[:, None]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, per, terms, fired, x_hat = self.stack.loss(x, dead, reducer)
        loss.backward()
        lr = self.runs[0].lr * factor
        _update(self.stack, self.opt, lr, grad_clip, reducer)
        tokens = x.shape[-2] * reducer.ranks()
        self.since += tokens
        self.since.masked_fill_(reducer.any_rank(fired), 0)
        for run in self.runs:
            run.idle_bound += tokens
        if log_now:
            self._log(x, per, terms, x_hat, dead, lr, reducer)

    @torch.no_grad()
    def _log(self, x, per, terms, x_hat, dead, lr, reducer):
        """Each run's metrics as train/local.py's _step logs them (global means under torchrun)."""
        err = (x_hat.float() - x).pow(2).sum((-2, -1))
        norm = x.pow(2).sum((-2, -1)).expand_as(err)
        sums = reducer.all_sum(torch.stack([err, norm])).tolist()
        values = {(s, "loss"): v for s, v in enumerate(per.tolist())}
        values.update({(s, k): v for k, t in terms.items() for s, v in enumerate(t.tolist())})
        flat = reducer.global_mean({f"{s}:{k}": v for (s, k), v in values.items()})
        dead_fraction = dead.float().mean(1).tolist() if dead is not None else [0.0] * len(self.runs)
        for s, run in enumerate(self.runs):
            logged = {k: flat[f"{s}:{k}"] for k in ("loss", *terms)}
            run.last = {**logged, "nmse": sums[0][s] / sums[1][s], "dead_fraction": dead_fraction[s], "lr": lr}
            run.idle_bound = int(run.since_fired.max())


StackedSweep = StackedRuns   # older name


def stack_groups(setting: str, runs: dict, device, sites: dict | None = None, refuse: bool = True) -> list[list[str]]:
    """`--stack-sweep auto|on|off`: the groups of run names (two or more each) to train as one
    StackedRuns each. Runs stack when stack_key, learning rate and betas agree, whatever their sites
    (`sites`: the runs' sites, {name: ...}, for a multi-site run). auto: on CUDA; on: wherever they can, and ValueError when
    a run cannot join a stack (the reasons given) unless refuse=False (--sweep-parallel: each rank
    holds its own share of the runs, and a refusal on some ranks only would leave the others
    waiting at the final gather)."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return []
    groups: dict[tuple, list[str]] = {}
    lone = []
    for name, run in runs.items():
        key = stack_key(run.sae)
        if key is None:
            lone.append(f"{name} is not a plain {' / '.join(c.arch for c in LOSSES)} SAE")
            continue
        groups.setdefault((key, run.lr, tuple(run.opt.param_groups[0]["betas"])), []).append(name)
    out = [names for names in groups.values() if len(names) > 1]
    if setting == "on" and refuse:
        alone = [n for names in groups.values() if len(names) == 1 for n in names]
        if len(runs) < 2:
            lone.append("the sweep has one SAE")
        elif alone:
            lone.append(f"{', '.join(alone)} differ{'s' * (len(alone) == 1)} from every other SAE in shape, "
                        f"hyperparameters or optimizer settings")
        if lone:
            raise ValueError(f"--stack-sweep on: cannot stack {'these SAEs' if sites else 'this sweep'} "
                             f"({'; '.join(lone)})")
    return out
