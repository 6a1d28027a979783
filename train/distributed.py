"""Training on several processes: `torchrun --nproc-per-node N -m sae_harvest.train fit ...`.

Data parallel (the default under torchrun): `--batch-size` is the global batch. Every rank reads the
same seeded block order and keeps its own contiguous share of the rows of every global batch, so N
ranks see exactly the rows one process would. Each step is handed a `Reducer` (`data_parallel()`
yields it; the driver passes it to the step function, which passes it on), through which the few
places whose result depends on the whole batch reduce across ranks: gradients
(averaged: each rank's loss is a mean over its equal share), dead-latent masks (OR) and the logged
metrics in the trainers; AuxK's residual variance, BatchTopK's batch-wide top-k and its threshold
(global min) in the architectures, which get the reducer as an argument (`loss(..., reducer=)`,
`encode_train(..., reducer=)`; LOCAL by default). Outside a step (finalising, held-out evaluation)
nothing holds a reducer, so every call is local.

Sweep parallel (`--sweep-parallel`): the sweep's SAEs are dealt over the ranks (SAE i of the sweep
on rank i mod N); every rank reads every whole batch and trains its own SAEs exactly as one process
would, with no collective inside the loop. The ranks meet only at the start and once at the end,
where rank 0 gathers every rank's summaries as JSON (`stores.dist.all_gather_json`: bytes in
tensors, nothing pickled) in a gloo group that waits as long as the slowest rank trains.

Without torchrun (no RANK / WORLD_SIZE in the environment) nothing here does anything.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# the process-group plumbing and the JSON control messages every command shares (no pickles)
from sae_harvest.stores.dist import all_gather_json, launched  # noqa: F401  (all_gather_json: driver.gather)



@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    sweep_parallel: bool = False   # each rank trains its own SAEs of the sweep (split_sweep)
    results_group: object = None   # sweep parallel: the gloo group the final gather waits in
    shards: bool = False           # --shard-decoders: each rank holds a slice of a CLT's layers (train/clt_shard.py)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The rank that trains the sweep's SAE number `index` (every rank, data parallel: -1)."""
        return index % self.size if self.sweep_parallel else -1


# A rank that ends its SAEs early waits this long for the others at the final gather: its share of
# the sweep may be far lighter. A rank that dies still ends the job at once (torchrun stops the rest).
RESULTS_WAIT = timedelta(days=7)


def init(device: torch.device, timeout_s: float) -> tuple[World, torch.device]:
    """Join the process group when launched by torchrun: NCCL on CUDA (one GPU per local rank),
    gloo on CPU. A collective that waits longer than timeout_s (a rank died) fails the job."""
    if not launched():
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return world, device


def split_sweep(world: World) -> World:
    """The world of a sweep-parallel fit (collective: every rank calls it once, at the start)."""
    return World(world.rank, world.size, world.local_rank, sweep_parallel=True,
                 results_group=dist.new_group(backend="gloo", timeout=RESULTS_WAIT))


def close(world: World) -> None:
    if world.results_group is not None:
        dist.destroy_process_group(world.results_group)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def anywhere(flag: bool) -> bool:
    """True on every rank if it is True on any rank (e.g. Ctrl-C reached only some of them)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@dataclass(frozen=True)
class Reducer:
    """How one step's batch-wide quantities are combined. An architecture is handed one (its
    loss() / encode_train() take `reducer=`) instead of asking a module global: LOCAL, the
    default, is one process (nothing to reduce), so library use needs no process group; the
    trainers pass the one their step was handed, which under torchrun reduces over every rank."""
    active: bool = False

    def ranks(self) -> int:
        """How many ranks share the current batch (1 outside a data-parallel step)."""
        return dist.get_world_size() if self.active else 1

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t)
        return t

    def global_min(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's t, in rank order, concatenated along dim (t itself in one process)."""
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.ranks())]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim)

    def any_rank(self, mask: torch.Tensor) -> torch.Tensor:
        """Elementwise OR of a bool tensor over the ranks."""
        if not self.active:
            return mask
        m = mask.to(torch.uint8)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return m.bool()

    def global_mean(self, values: dict) -> dict:
        """Average logged scalars over the ranks (each is a mean over an equal share of the batch)."""
        if not self.active or not values:
            return values
        keys = list(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Gradients of the global batch from each rank's gradient of its local mean: one all_reduce."""
        if not self.active:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def residual_variance(self, resid: torch.Tensor) -> torch.Tensor:
        """sum ||r - mean(r)||^2 over the global batch (AuxK's normaliser)."""
        if not self.active:
            return (resid - resid.mean(0)).pow(2).sum()
        mean = self.all_sum(resid.sum(0)) / (len(resid) * self.ranks())
        return self.all_sum((resid - mean).pow(2).sum())

    def batch_topk(self, pre: torch.Tensor, k: int) -> torch.Tensor:
        """Keep the n*k largest entries of pre [n, d] over the batch: over the global batch of n x ranks
        rows inside a data-parallel step. Exact: each rank offers its own top n_global*k values (no
        more can win), the n_global*k-th largest of all offers is the global threshold, and each rank
        keeps its entries at or above it. Entries tied with the threshold are all kept, in one process
        too: identical rows (every sequence's position 0 in e2e) would otherwise leave which copy wins
        to torch.topk's order, which differs between one process and several. Ties at 0 keep zeros,
        which change nothing."""
        flat = pre.flatten()
        if not self.active:
            threshold = flat.detach().topk(min(pre.shape[0] * k, flat.numel()), sorted=False).values.min()
            return pre * (pre >= threshold)
        want = pre.shape[0] * self.ranks() * k
        offer = flat.detach().topk(min(want, flat.numel()), sorted=False).values
        offers = self.all_gather(offer)
        threshold = offers.topk(min(want, offers.numel()), sorted=False).values.min()
        return pre * (pre >= threshold)


LOCAL = Reducer()   # immutable: the one module-level reducer, and it reduces nothing


@contextmanager
def data_parallel(on: bool = True):
    """The reducer of one training step: over every rank when `on` under torchrun, else LOCAL. The
    driver hands what this yields to the step function, which hands it on (no hidden state here)."""
    yield Reducer(True) if on and dist.is_initialized() and dist.get_world_size() > 1 else LOCAL


def share(n: int, world: World) -> slice:
    """This rank's contiguous part of a global batch of n items."""
    return slice(world.rank * n // world.size, (world.rank + 1) * n // world.size)
