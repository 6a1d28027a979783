"""A cross-layer transcoder sharded over the ranks by source layer (`--clt --shard-decoders` under
torchrun; docs/training.md "Sharding a CLT's decoders").

Rank r holds every parameter indexed by a source layer of its contiguous slice [lo, hi): W_enc, b_enc
(and jumprelu's log_threshold) of those layers, their decoders W_dec_L [F, n - L, d], and b_dec of
those layers as targets; Adam's moments follow the parameters. Every rank reads every whole batch,
but only its own layers' inputs and targets. Per step it computes its part of the reconstruction
error for every target,

    c_r[T] = sum_{L in [lo, hi), L <= T} f_L W_dec_L[:, T - L]  +  (b_dec[T] - y_T  if T in [lo, hi))

and one all-reduce gives e = sum_r c_r = y^ - y on every rank, hence the same loss everywhere. Its
backward is the identity: dloss/dc_r = dloss/de on every rank, so the gradient of each rank's own
parameters is complete and exact with no gradient all-reduce at all (a layer's encoder only reaches
the loss through its own decoder). Clipping needs the global gradient norm (one scalar all-reduce);
the dead-latent masks are OR-ed so every rank keeps the whole run's counters.

Saving gathers the shards into one CrossLayerTranscoder state dict on rank 0 (point-to-point, one
tensor at a time), so a sharded run saves the same single file as an unsharded one. Checkpoints are
per rank (checkpoint/rank<r>/: each rank's own parameters and Adam state, no collective), so a
sharded run resumes sharded on as many ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sae_harvest.train.errors import TrainError
from sae_harvest.train.jumprelu import JumpReLUFunction, StepFunction
from sae_harvest.train.sae import LossOutput

LAYER_PARAMS = ("W_enc", "b_enc", "b_dec", "log_threshold")   # [n, ...]: sliced by layer


def layer_costs(n: int, d: int, f: int, jumprelu: bool) -> list[int]:
    """Parameters indexed by source layer L: encoder, biases, threshold and W_dec_L [F, n - L, d]."""
    return [d * f + f + d + f * jumprelu + f * (n - layer) * d for layer in range(n)]


def split_layers(costs: list[int], parts: int) -> list[range]:
    """Contiguous slices of the layers, one per rank, minimising the largest slice's cost (exact:
    dynamic programming over the cut points; n and the rank count are small)."""
    n = len(costs)
    if parts > n:
        raise TrainError(f"--shard-decoders: a CLT over {n} layers cannot be split over {parts} ranks (one "
                         f"source layer at least per rank): launch at most {n}")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[p][i]: the smallest possible largest slice covering layers [0, i) with p slices
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                v = max(best[p - 1][j], prefix[i] - prefix[j])
                if v < best[p][i]:
                    best[p][i], cut[p][i] = v, j
    bounds, i = [], n
    for p in range(parts, 0, -1):
        bounds.append(range(cut[p][i], i))
        i = cut[p][i]
    return bounds[::-1]


def shard_plan(cfg, world_size: int) -> list[range]:
    n = cfg.clt_layers
    return split_layers(layer_costs(n, cfg.d_in // n, cfg.d_sae // n, cfg.arch == "jumprelu"), world_size)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; backward is the identity, because every rank computes the same loss from
    the sum (d loss / d part = d loss / d sum, already on every rank)."""

    @staticmethod
    def forward(ctx, part):
        total = part.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad


class CLTShard(nn.Module):
    """The parameters of source layers `layers` of a CrossLayerTranscoder (train/clt.py), same names:
    W_enc / b_enc / b_dec / log_threshold sliced to those layers, W_dec_L for L in them."""
    is_clt = True
    uses_grads = False

    def __init__(self, clt, layers: range, rank: int, world_size: int):
        super().__init__()
        self.cfg, self.layers, self.rank, self.world_size = clt.cfg, layers, rank, world_size
        self.n, self.d, self.f = clt.n, clt.d, clt.f
        self.adam_betas = clt.adam_betas
        lo, hi = layers.start, layers.stop
        for name in LAYER_PARAMS:
            if hasattr(clt, name):
                self.register_parameter(name, nn.Parameter(getattr(clt, name).detach()[lo:hi].clone()))
        for layer in layers:
            self.register_parameter(f"W_dec_{layer}", nn.Parameter(clt.decoder(layer).detach().clone()))

    def default_lr(self, d_sae: int) -> float:
        return 5e-4   # CrossLayerTranscoder.default_lr

    @property
    def W_dec(self) -> torch.Tensor:   # what dtype/device checks read
        return getattr(self, f"W_dec_{self.layers.start}")

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """As CrossLayerTranscoder.activate, on this slice's layers [N, m, F]."""
        if self.cfg.arch == "jumprelu":
            return JumpReLUFunction.apply(pre, self.log_threshold.exp().to(pre.dtype), self.cfg.bandwidth)
        pre = F.relu(pre)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    def part(self, x: torch.Tensor, y: torch.Tensor):
        """x, y [N, m*d]: this slice's inputs and targets (training space) -> (c_r [N, n, d], pre, feats)."""
        m = len(self.layers)
        pre = torch.einsum("bld,ldf->blf", x.view(len(x), m, self.d), self.W_enc) + self.b_enc
        feats = self.activate(pre)
        writes = []
        for i, layer in enumerate(self.layers):
            writes.append((layer, torch.einsum("bf,ftd->btd", feats[:, i], getattr(self, f"W_dec_{layer}"))))
        rows = []
        own = self.b_dec - y.view(len(y), m, self.d)
        for t in range(self.n):
            terms = [w[:, t - layer] for layer, w in writes if layer <= t]
            if t in self.layers:
                terms.append(own[:, t - self.layers.start])
            rows.append(sum(terms) if terms else x.new_zeros(len(x), self.d))
        return torch.stack(rows, 1), pre, feats

    def loss(self, x, y) -> LossOutput:
        """The whole CLT's loss on every rank; terms["l0"] / ["sparsity"] are this slice's parts
        (summed over the ranks when logged). x_hat is the error e = y^ - y [N, n*d]."""
        c, pre, feats = self.part(x, y)
        err = _AllReduceSum.apply(c) if self.world_size > 1 else c
        mse = err.pow(2).sum((-2, -1)).mean()
        terms = {"mse": mse, "l0": (feats > 0).float().sum((-2, -1)).mean()}
        loss = mse
        if self.cfg.arch == "jumprelu":
            count = StepFunction.apply(pre, self.log_threshold.exp().to(pre.dtype), self.cfg.bandwidth)
            terms["sparsity"] = self.cfg.l1_coeff * count.sum((-2, -1)).mean()
            loss = loss + terms["sparsity"]
        return LossOutput(loss, {k: v.detach() for k, v in terms.items()}, feats, err.flatten(1))

    def fired_all(self, feats: torch.Tensor) -> torch.Tensor:
        """[n*F] bool: latents that fired on this batch, every rank's layers (OR over the ranks)."""
        mask = torch.zeros(self.n, self.f, dtype=torch.uint8, device=feats.device)
        mask[self.layers.start:self.layers.stop] = (feats > 0).any(0)
        if self.world_size > 1:
            dist.all_reduce(mask, op=dist.ReduceOp.MAX)
        return mask.flatten().bool()

    # ---- saving: every rank's slice into one CrossLayerTranscoder state dict on rank 0 ----
    @torch.no_grad()
    def gather_state(self, plan: list[range]) -> dict[str, torch.Tensor] | None:
        """Collective: the full state dict (CPU) on rank 0, None elsewhere."""
        state = {}
        for name in LAYER_PARAMS:
            if not hasattr(self, name):
                continue
            pieces = [_collect(getattr(self, name), r, self.rank, (len(sl),) + getattr(self, name).shape[1:])
                      for r, sl in enumerate(plan)]
            state[name] = torch.cat(pieces) if self.rank == 0 else None
        for r, sl in enumerate(plan):
            for layer in sl:
                mine = getattr(self, f"W_dec_{layer}", None)
                state[f"W_dec_{layer}"] = _collect(mine, r, self.rank, (self.f, self.n - layer, self.d),
                                                   like=self.W_dec)
        return state if self.rank == 0 else None

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _collect(t, owner: int, rank: int, shape, like=None):
    """Rank `owner`'s tensor of `shape` on rank 0 (CPU); a send on the owner, a receive on rank 0."""
    if owner == 0:
        return t.detach().cpu().clone() if rank == 0 else None
    if rank == owner:
        dist.send(t.detach().contiguous(), dst=0)
        return None
    if rank == 0:
        ref = t if t is not None else like
        buf = torch.empty(shape, dtype=ref.dtype, device=ref.device)
        dist.recv(buf, src=owner)
        return buf.cpu()
    return None


def sharded_sites(runs: dict, pairs: list, needed: list[str]):
    """(the shard, its layers' pairs, the sites the feed reads): with --shard-decoders every rank
    reads every row but only its own source layers' inputs and targets; otherwise (None, pairs, needed)."""
    shard = next((r.sae for r in runs.values() if isinstance(r.sae, CLTShard)), None)
    if shard is None:
        return None, pairs, needed
    own = pairs[shard.layers.start:shard.layers.stop]
    return shard, own, [s for p in own for s in (p.site, p.target)]


def shard_step(run, x, y, factor: float, cfg, dead_after: int, autocast: bool, log_now: bool) -> None:
    """One optimizer step of a sharded CLT: the whole batch, this rank's layers (runs.optimizer_step's
    order: lr, clipping by the global norm, Adam, dead counts)."""
    shard, opt = run.sae, run.opt
    dead = run.since_fired >= dead_after if run.idle_bound >= dead_after else None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = shard.loss(x, y)
    out.loss.backward()
    for group in opt.param_groups:
        group["lr"] = run.lr * factor
    grads = [p.grad for p in shard.parameters() if p.grad is not None]
    sq = torch.stack([torch.linalg.vector_norm(g).pow(2) for g in grads]).sum()
    if shard.world_size > 1:
        dist.all_reduce(sq)
    # torch.nn.utils.clip_grad_norm_'s rule, on the norm over every rank's parameters
    coef = torch.clamp(cfg.grad_clip / (sq.sqrt() + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)
    opt.step()
    opt.zero_grad(set_to_none=True)
    fired = shard.fired_all(out.feats)
    tokens = len(x)
    run.since_fired += tokens
    run.idle_bound += tokens
    run.since_fired.masked_fill_(fired, 0)
    if log_now:
        with torch.no_grad():
            parts = torch.stack([y.float().pow(2).sum(), out.terms["l0"].float(),
                                 out.terms.get("sparsity", torch.zeros((), device=x.device)).float()])
            if shard.world_size > 1:
                dist.all_reduce(parts)
        err = float(out.x_hat.float().pow(2).sum())
        terms = {"loss": float(out.terms["mse"]) + float(parts[2]), "mse": float(out.terms["mse"]),
                 "l0": float(parts[1])}
        if "sparsity" in out.terms:
            terms["sparsity"] = float(parts[2])
        dead_fraction = float(dead.float().mean()) if dead is not None else 0.0
        run.last = {**terms, "nmse": err / float(parts[0]), "dead_fraction": dead_fraction, "lr": run.lr * factor}
        run.idle_bound = int(run.since_fired.max())


@torch.no_grad()
def held_out_sharded(shard: CLTShard, store, pairs, scales, batch_size: int, exclude_pos0: bool, device) -> dict:
    """multisite_fit.held_out_layers for a sharded CLT (collective): each rank reads its own layers'
    sites of the held-out rows; the same dict on every rank."""
    own = pairs[shard.layers.start:shard.layers.stop]
    sites = [s for p in own for s in (p.site, p.target)]
    n = shard.n
    sums = torch.zeros(2 * n + 1, dtype=torch.float64, device=device)   # err per target, |y|^2 per target, l0
    y_sum = torch.zeros(n, shard.d, dtype=torch.float64, device=device)  # per target: the sum of its rows
    fired = torch.zeros(n, shard.f, dtype=torch.uint8, device=device)
    count = 0
    for b in store.batches(sites, batch_size, seqs="held_out", exclude_pos0=exclude_pos0, epochs=1, drop_last=False):
        x = torch.cat([torch.from_numpy(b["acts"][p.site]).to(device).float() / scales[p.site] for p in own], -1)
        y = torch.cat([torch.from_numpy(b["acts"][p.target]).to(device).float() / scales[p.target] for p in own], -1)
        c, _, feats = shard.part(x, y)
        if shard.world_size > 1:
            dist.all_reduce(c)
        part = torch.zeros_like(sums)
        # every rank holds the same error: rank 0 alone counts it, so the sum over ranks is once
        if shard.rank == 0:
            part[:n] = c.double().pow(2).sum((0, 2))
        lo, hi = shard.layers.start, shard.layers.stop
        part[n + lo:n + hi] = y.view(len(y), hi - lo, shard.d).double().pow(2).sum((0, 2))
        part[2 * n] = (feats > 0).sum()
        y_sum[lo:hi] += y.view(len(y), hi - lo, shard.d).double().sum(0)
        if shard.world_size > 1:
            dist.all_reduce(part)
        sums += part
        fired[lo:hi] |= (feats > 0).any(0).to(torch.uint8)
        count += len(x)
    if shard.world_size > 1:
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        dist.all_reduce(y_sum)
    if count == 0:
        return {}
    err, norm2, l0 = sums[:n].tolist(), sums[n:2 * n].tolist(), float(sums[2 * n])
    total = sum(norm2) - float(y_sum.pow(2).sum()) / count
    return {"held_out_tokens": count, "nmse": sum(err) / sum(norm2), "explained_variance": 1 - sum(err) / total,
            "per_layer": {p.target: {"nmse": e / m} for p, e, m in zip(pairs, err, norm2)},
            "l0": l0 / count, "l0_per_layer": l0 / count / n,
            "dead_fraction": 1 - fired.bool().float().mean().item()}


def finish_shard(run, pairs, sources, scales, plan: list[range], cfg, device) -> dict:
    """Collective, after the last step: the held-out report (every rank), the gathered full state
    (rank 0; None elsewhere) and what each rank held."""
    shard, src = run.sae, sources[pairs[0].site]
    shard.eval()
    held = held_out_sharded(shard, src.store, pairs, scales, cfg.batch_size, src.exclude_pos0, device)
    shard.train()
    held_now = torch.tensor([shard.parameter_count(), sum(v.numel() for s in run.opt.state.values()
                                                          for v in s.values() if torch.is_tensor(v) and v.dim() > 0)],
                            device=device)
    counts = [torch.zeros_like(held_now) for _ in range(shard.world_size)]
    dist.all_gather(counts, held_now)   # a device tensor: NCCL's default group as well as gloo's
    ranks = [{"rank": r, "layers": [sl.start, sl.stop], "parameters": int(c[0]), "adam_state": int(c[1])}
             for r, (sl, c) in enumerate(zip(plan, counts))]
    return {"held_out": held, "state": shard.gather_state(plan), "ranks": ranks,
            "parameters": sum(r["parameters"] for r in ranks)}
