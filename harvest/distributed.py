"""torchrun support: which rank this is, and the few collectives the harvest needs.

Without torchrun (no RANK/WORLD_SIZE in the environment) everything here is a no-op for one
process. Under torchrun the process group uses NCCL when the harvest runs on CUDA, gloo on the
CPU; the small control messages (counts, errors, the lease owner) always go over a gloo group so
they never touch the GPU.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from sae_harvest.stores.errors import UserError

from .errors import HarvestError


def _node_count(env, world: int) -> int:
    """torchrun launchers (nodes) in the job. GROUP_WORLD_SIZE is the agent count torchrun sets
    under every rendezvous (c10d included); world // LOCAL_WORLD_SIZE is only right when every
    node runs the same number of processes, so it is the fallback for launchers that lack it."""
    if env.get("GROUP_WORLD_SIZE"):
        return int(env["GROUP_WORLD_SIZE"])
    local = int(env.get("LOCAL_WORLD_SIZE", world))
    return max(1, -(-world // max(local, 1)))


class Dist:
    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, nodes: int = 1, group=None,
                 owns_group: bool = False):
        self.rank, self.world, self.local_rank, self.nodes = rank, world, local_rank, nodes
        self.group = group
        self.owns_group = owns_group

    @classmethod
    def from_env(cls, device: str) -> "Dist":
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) <= 1:
            return cls()
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", 0))
        nodes = _node_count(env, world)
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        owns = not dist.is_initialized()
        if owns:
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
        group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        return cls(rank, world, local_rank, nodes, group, owns)

    @property
    def active(self) -> bool:
        return self.world > 1

    def device_name(self, device: str) -> str:
        """Each rank of a CUDA harvest uses the GPU of its local rank."""
        if self.active and (device in ("auto", "cuda")) and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def all_sum(self, values: list[int]) -> list[int]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def broadcast(self, obj):
        """rank 0's obj on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def agree(self, fn):
        """Run fn on every rank; if any rank raised a UserError, every rank raises (the rank's own
        error where it had one), so no rank waits forever for one that gave up."""
        try:
            result, error = fn(), None
        except UserError as e:
            result, error = None, e
        if not self.active:
            if error is not None:
                raise error
            return result
        errors = [None] * self.world
        dist.all_gather_object(errors, None if error is None else str(error), group=self.group)
        if error is not None:
            raise error
        for rank, message in enumerate(errors):
            if message is not None:
                raise HarvestError(f"rank {rank} stopped: {message}")
        return result

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
