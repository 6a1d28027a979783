"""A TopK sweep as one batched step: the sweep's SAEs (one shape, any k) stacked along a leading
SAE dimension, so the encoder and decoder of all of them are one `bmm` each instead of a Python
loop of small matmuls, and Adam, the decoder constraint and the dead-latent counts are one call.

Each SAE keeps exactly its own objective and update (tests/test_stacked.py trains a sweep both
ways and compares the weights):
    pre_s  = ReLU((x - b_dec_s) @ W_enc_s + b_enc_s)         [S, n, d_sae]  (one bmm)
    f_s    = top-k_s of pre_s per token (top max(k) sorted, entries past k_s dropped)
    x_hat_s = f_s @ W_dec_s + b_dec_s                         (one bmm)
    loss   = sum_s (mse_s + aux_coeff * AuxK_s)               (the SAEs share no parameter, so
                                                               each gets its own gradient)
AuxK per SAE with its own dead latents and k_aux_s = min(aux_k, d_sae/2, n_dead_s), as
train/topk.py. The optimizer step mirrors train/runs.py's optimizer_step per SAE: the
parallel part of each decoder row's gradient removed, gradient-norm clipping per SAE (not over
the stack), Adam (elementwise, so one Adam over the stack is S Adams), unit-norm decoder rows.
The SAEs are built (and initialised, each from its own seed stream) one by one first, then
stacked: `StackedTopK(saes)`; `unstack()` writes the trained weights back into them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sae_harvest.train.runs import make_adam
from sae_harvest.train.topk import TopKSAE


class StackedTopK(nn.Module):
    def __init__(self, saes: list[TopKSAE]):
        super().__init__()
        first = saes[0].cfg
        for sae in saes:
            c = sae.cfg
            if type(sae) is not TopKSAE or (c.d_in, c.d_sae, c.aux_k, c.aux_coeff) != \
                    (first.d_in, first.d_sae, first.aux_k, first.aux_coeff):
                raise ValueError("stacking needs plain topk SAEs of one shape (d_in, d_sae, aux_k, aux_coeff)")
        self.saes = list(saes)
        self.W_enc = nn.Parameter(torch.stack([s.W_enc.detach() for s in saes]))   # [S, d_in, d_sae]
        self.b_enc = nn.Parameter(torch.stack([s.b_enc.detach() for s in saes]))   # [S, d_sae]
        self.W_dec = nn.Parameter(torch.stack([s.W_dec.detach() for s in saes]))   # [S, d_sae, d_in]
        self.b_dec = nn.Parameter(torch.stack([s.b_dec.detach() for s in saes]))   # [S, d_in]
        self.register_buffer("ks", torch.tensor([s.cfg.k for s in saes], device=self.W_enc.device))
        self.k_max, self.d_sae = max(s.cfg.k for s in saes), first.d_sae
        self.aux_k, self.aux_coeff = first.aux_k, first.aux_coeff

    def __len__(self) -> int:
        return len(self.saes)

    def _gather_decode(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """sum_j vals[s, n, j] * W_dec[s, idx[s, n, j]] as one embedding-bag over the stacked rows."""
        S, n, j = idx.shape
        flat = (idx + (torch.arange(S, device=idx.device) * self.d_sae)[:, None, None]).reshape(S * n, j)
        rows = F.embedding_bag(flat, self.W_dec.reshape(S * self.d_sae, -1),
                               per_sample_weights=vals.reshape(S * n, j).to(self.W_dec.dtype), mode="sum")
        return rows.view(S, n, -1)

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None):
        """(summed loss, per-SAE terms {mse, aux, l0: [S]}, fired [S, d_sae] bool, x_hat [S, n, d_in]).
        dead: [S, d_sae] bool (an SAE with no dead latent has an all-False row) or None: no AuxK."""
        S = len(self)
        xc = x.unsqueeze(0) - self.b_dec[:, None]
        pre = F.relu(torch.baddbmm(self.b_enc[:, None], xc, self.W_enc))
        vals, idx = pre.topk(self.k_max, dim=-1, sorted=True)
        vals = vals * (torch.arange(self.k_max, device=x.device) < self.ks[:, None, None])
        feats = torch.zeros_like(pre).scatter(-1, idx, vals)
        x_hat = torch.baddbmm(self.b_dec[:, None], feats, self.W_dec)
        mse = (x_hat - x).pow(2).sum(-1).mean(-1)
        aux = self._auxk(pre, (x - x_hat).detach(), dead) if dead is not None else mse.new_zeros(S)
        aux = self.aux_coeff * aux
        terms = {"mse": mse.detach(), "aux": aux.detach(), "l0": (feats > 0).float().sum(-1).mean(-1)}
        return (mse + aux).sum(), terms, (feats > 0).any(1), x_hat

    def _auxk(self, pre, resid, dead):
        n_dead = dead.sum(-1)
        k_aux = n_dead.clamp(max=min(self.aux_k, self.d_sae // 2))   # per SAE
        k_top = int(k_aux.max())    # host read, as train/topk.py's auxk_loss
        if k_top == 0:
            return pre.new_zeros(len(self))
        masked = torch.where(dead[:, None, :], pre, torch.full_like(pre, -torch.inf))
        vals, idx = masked.topk(k_top, dim=-1, sorted=True)
        keep = torch.arange(k_top, device=pre.device) < k_aux[:, None, None]
        vals = torch.where(keep, vals, torch.zeros_like(vals))
        e_hat = self._gather_decode(idx, vals)
        var = (resid - resid.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
        return (e_hat - resid).pow(2).sum((1, 2)) / var * (k_aux > 0)

    @torch.no_grad()
    def prepare_update(self, grad_clip: float) -> None:
        """Before Adam, per SAE: the decoder rows' radial gradient removed, gradient-norm clipping."""
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self.W_dec.grad -= (self.W_dec.grad * unit).sum(-1, keepdim=True) * unit
        grads = [p.grad for p in self.parameters()]
        # the norm clip_grad_norm_ takes over one SAE's parameters: the norm of the per-tensor norms
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1).norm(dim=1)   # [S]
        coef = (grad_clip / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def unstack(self) -> list[TopKSAE]:
        """Copy the trained weights back into the SAEs they were stacked from; returns them."""
        for s, sae in enumerate(self.saes):
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(getattr(self, name)[s])
        return self.saes


def stacked_step(stack: StackedTopK, opt: torch.optim.Optimizer, x: torch.Tensor, since_fired: torch.Tensor,
                 dead_after: int, idle_bound: int, lr: float, grad_clip: float) -> dict:
    """One training step of the whole sweep, the batched form of train/local.py's _step +
    train/runs.py's optimizer_step. since_fired [S, d_sae] is updated in place; idle_bound is the
    host's upper bound on it (AuxK is skipped while no latent can be dead). Returns the terms."""
    dead = since_fired >= dead_after if idle_bound >= dead_after else None
    loss, terms, fired, _ = stack.loss(x, dead)
    loss.backward()
    for group in opt.param_groups:
        group["lr"] = lr
    stack.prepare_update(grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    stack.set_decoder_norm_to_unit_norm()
    since_fired += len(x)
    since_fired.masked_fill_(fired, 0)
    return terms


PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


class StackedSweep:
    """`train fit`'s sweep trained as one stacked step. The runs stay what the driver checkpoints,
    resumes, logs and saves: each run's parameters, Adam moments and dead-latent counts become views
    of the stack's tensors (built from the runs' resumed state when there is one), so a checkpoint
    of the runs is a checkpoint of the stack."""

    def __init__(self, runs: dict):
        self.runs = list(runs.values())
        first = self.runs[0]
        self.stack = StackedTopK([r.sae for r in self.runs])
        self.opt = make_adam(self.stack.parameters(), first.lr, first.opt.param_groups[0]["betas"])
        on_device = bool(self.opt.param_groups[0].get("fused"))
        for name in PARAMS:
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
        self.since = torch.stack([r.since_fired for r in self.runs])
        for s, run in enumerate(self.runs):
            run.since_fired = self.since[s]

    def step(self, x, factor: float, grad_clip: float, dead_after: int, autocast: bool, log_now: bool) -> None:
        """train/local.py's _step + optimizer_step for every run at once."""
        can_be_dead = [r.idle_bound >= dead_after for r in self.runs]
        dead = None
        if any(can_be_dead):   # a run whose latents cannot be dead yet gets an all-False row: no AuxK
            dead = (self.since >= dead_after) & torch.tensor(can_be_dead, device=x.device)[:, None]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, terms, fired, x_hat = self.stack.loss(x, dead)
        loss.backward()
        lr = self.runs[0].lr * factor
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.stack.prepare_update(grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.stack.set_decoder_norm_to_unit_norm()
        self.since += len(x)
        self.since.masked_fill_(fired, 0)
        for run in self.runs:
            run.idle_bound += len(x)
        if log_now:
            with torch.no_grad():
                err = (x_hat.float() - x).pow(2).sum((1, 2)).tolist()
                norm = float(x.pow(2).sum())
                dead_fraction = dead.float().mean(1).tolist() if dead is not None else [0.0] * len(self.runs)
                for s, run in enumerate(self.runs):
                    t = {k: float(v[s]) for k, v in terms.items()}
                    run.last = {"loss": t["mse"] + t["aux"], **t, "nmse": err[s] / norm,
                                "dead_fraction": dead_fraction[s], "lr": lr}
                    run.idle_bound = int(run.since_fired.max())


def wants_stacking(setting: str, runs: dict, device, data_parallel: bool) -> bool:
    """`--stack-sweep auto|on|off`: whether to train the runs as a StackedSweep: they can be stacked
    (two or more plain topk SAEs of one shape, learning rate and betas, not data parallel) and the
    setting wants it (auto: on CUDA). `on` with runs that cannot be stacked: ValueError."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return False
    first = next(iter(runs.values()))
    reasons = []
    if len(runs) < 2:
        reasons.append("the sweep has one SAE")
    if data_parallel:
        reasons.append("the sweep trains data parallel")
    for run in runs.values():
        if type(run.sae) is not TopKSAE:
            reasons.append(f"{run.sae.arch} is not plain topk")
            break
        c, f = run.sae.cfg, first.sae.cfg
        if (c.d_in, c.d_sae, c.aux_k, c.aux_coeff, run.lr, run.opt.param_groups[0]["betas"]) != \
                (f.d_in, f.d_sae, f.aux_k, f.aux_coeff, first.lr, first.opt.param_groups[0]["betas"]):
            reasons.append("the SAEs differ in shape or optimizer settings")
            break
    if reasons:
        if setting == "on":
            raise ValueError(f"--stack-sweep on: cannot stack this sweep ({'; '.join(reasons)})")
        return False
    return True
