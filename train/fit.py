"""`train fit`: check the output, pick the device (and, under torchrun, join the process group),
and hand over to the local or the e2e trainer."""
from __future__ import annotations

import dataclasses

import torch.distributed as dist

from sae_harvest.stores.cli import pick_device
from sae_harvest.train import distributed
from sae_harvest.train.config import TrainConfig, check_options, sweep_size
from sae_harvest.train.errors import TrainError
from sae_harvest.train.e2e import fit_e2e
from sae_harvest.train.e2e_transcoder import is_e2e_transcoder
from sae_harvest.train.local import fit_local
from sae_harvest.train.multisite import count_dictionaries, fit_multisite, is_multisite
from sae_harvest.train.runs import check_output


def fit(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        console=None, on_step=None) -> dict:
    """Train every SAE of the sweep; returns {name: summary} (under torchrun: on rank 0; {} elsewhere).
    Raises a UserError on bad input. on_step(StepEvent) is called before every optimizer step
    (see train.driver)."""
    own_group = distributed.launched() and not dist.is_initialized()
    world, device = distributed.init(pick_device(cfg.device), cfg.dist_timeout)
    try:
        check_output(cfg, resume, overwrite)
        check_options(cfg)
        if cfg.shard_decoders and not cfg.clt:
            raise TrainError("--shard-decoders shards a cross-layer transcoder's layers over the ranks: give --clt")
        if cfg.shard_decoders and world.size > 1:
            if cfg.sweep_parallel:
                raise TrainError("--shard-decoders and --sweep-parallel both split the work over the ranks: "
                                 "give one of them")
            world = dataclasses.replace(world, shards=True)
        elif cfg.sweep_parallel and world.size > 1:
            n = sweep_size(cfg) * count_dictionaries(cfg)
            if n < world.size:
                plural = "s" * (n != 1)
                raise TrainError(f"--sweep-parallel deals the sweep's {n} SAE{plural} over {world.size} ranks, "
                                 f"so some rank would idle: launch at most {n} rank{plural}, or train data "
                                 f"parallel (without --sweep-parallel)")
            world = distributed.split_sweep(world)
        elif cfg.batch_size % world.size:
            raise TrainError(f"--batch-size {cfg.batch_size} is the global batch: it must divide evenly "
                             f"over the {world.size} ranks")
        distributed.barrier()   # every rank has checked --out before rank 0 writes to it
        trainer = fit_e2e if is_e2e_transcoder(cfg) else fit_multisite if is_multisite(cfg) else \
            fit_local if cfg.loss == "local" else fit_e2e
        return trainer(cfg, resume=resume, overwrite=overwrite, progress=progress, console=console,
                       device=device, on_step=on_step, world=world)
    except OSError as e:   # a write that failed outside the step loop (disk full, file-size limit)
        reason = f"{e.strerror} (errno {e.errno})" if e.strerror else f"{type(e).__name__}: {e}"
        raise TrainError(f"cannot write under {cfg.out}: {reason}; checkpoints already saved there are "
                         f"kept (continue with --resume)") from None
    finally:
        distributed.close(world)
        if own_group:
            distributed.shutdown()
