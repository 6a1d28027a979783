"""torch.distributed as every command uses it, knowing nothing of models: whether torchrun launched
this process, joining the process group, and the small control messages (counts, errors, a lease
owner, a harvest identity, training summaries).

Control messages are UTF-8 JSON bytes in uint8 tensors over a gloo group, never pickles: torch's
*_object collectives unpickle whatever a peer sends, and a peer is another process on another node.
`train/distributed.py` builds the training reductions (gradients, BatchTopK, dead latents) on this;
`harvest/run.py` uses `Dist` directly (`stop_if_any`: every rank stops together).

Without torchrun (no RANK / WORLD_SIZE in the environment) everything here is a no-op for one
process. Under torchrun the process group uses NCCL when the job runs on CUDA, gloo on the CPU; the
control messages always go over a gloo group so they never touch the GPU.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from .errors import UserError


class RankError(UserError):
    """Another rank of the job stopped, or the ranks disagree; every rank raises it together."""


def launched(env=None) -> bool:
    """Started by torchrun (or another launcher that sets the torch.distributed environment)."""
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def node_count(env, world: int) -> int:
    """torchrun launchers (nodes) in the job. GROUP_WORLD_SIZE is the agent count torchrun sets
    under every rendezvous (c10d included); world // LOCAL_WORLD_SIZE is only right when every
    node runs the same number of processes, so it is the fallback for launchers that lack it."""
    if env.get("GROUP_WORLD_SIZE"):
        return int(env["GROUP_WORLD_SIZE"])
    local = int(env.get("LOCAL_WORLD_SIZE", world))
    return max(1, -(-world // max(local, 1)))


def _encode(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def all_gather_json(obj, group=None) -> list:
    """Every rank's JSON-able `obj`, in rank order, on every rank. `group` must be a gloo group
    (CPU tensors); None is the default group, which must then be gloo."""
    data = _encode(obj)
    size = dist.get_world_size(group)
    lengths = [torch.zeros(1, dtype=torch.long) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([len(data)]), group=group)
    longest = max(int(n) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:len(data)] = data
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return [json.loads(bytes(p[:int(n)].numpy()).decode()) for p, n in zip(parts, lengths)]


def broadcast_json(obj, src: int = 0, group=None):
    """Rank `src`'s JSON-able `obj` on every rank (the others' `obj` is ignored)."""
    mine = dist.get_rank() == src
    data = _encode(obj) if mine else None
    length = torch.tensor([len(data) if mine else 0], dtype=torch.long)
    dist.broadcast(length, src=src, group=group)
    buffer = data if mine else torch.empty(int(length), dtype=torch.uint8)
    dist.broadcast(buffer, src=src, group=group)
    return json.loads(bytes(buffer.numpy()).decode())


class Dist:
    """Which rank this is, and the few collectives a job needs around its main loop."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, nodes: int = 1, group=None,
                 owns_group: bool = False):
        self.rank, self.world, self.local_rank, self.nodes = rank, world, local_rank, nodes
        self.group = group   # the gloo group of the control messages (None: the default group is gloo)
        self.owns_group = owns_group

    @classmethod
    def from_env(cls, device: str) -> "Dist":
        env = os.environ
        if not launched(env) or int(env["WORLD_SIZE"]) <= 1:
            return cls()
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", 0))
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        owns = not dist.is_initialized()
        if owns:
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
        group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        return cls(rank, world, local_rank, node_count(env, world), group, owns)

    @property
    def active(self) -> bool:
        return self.world > 1

    def device_name(self, device: str) -> str:
        """Each rank of a CUDA job uses the GPU of its local rank."""
        if self.active and (device in ("auto", "cuda")) and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def all_sum(self, values: list[int]) -> list[int]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def all_gather(self, obj) -> list:
        """Every rank's JSON-able obj, in rank order."""
        return all_gather_json(obj, self.group) if self.active else [obj]

    def broadcast(self, obj):
        """rank 0's JSON-able obj on every rank."""
        return broadcast_json(obj, 0, self.group) if self.active else obj

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def agree(self, fn):
        """Run fn on every rank; if any rank raised a UserError, every rank raises (the rank's own
        error where it had one, else a RankError naming the first rank that stopped), so no rank
        waits forever for one that gave up."""
        try:
            result, error = fn(), None
        except UserError as e:
            result, error = None, e
        if not self.active:
            if error is not None:
                raise error
            return result
        errors = self.all_gather(None if error is None else str(error))
        if error is not None:
            raise error
        for rank, message in enumerate(errors):
            if message is not None:
                raise RankError(f"rank {rank} stopped: {message}")
        return result

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
