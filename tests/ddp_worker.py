"""Run `train fit` for several configs inside one torchrun job (the process group is ours, so fit
joins it instead of creating one). Usage: ddp_worker.py CONFIGS.json [--kill-rank R --kill-step S]."""
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit

torch.set_num_threads(1)


def main():
    configs = json.loads(open(sys.argv[1]).read())
    kill = dict(zip(sys.argv[2::2], map(int, sys.argv[3::2])))
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def on_step(event):
        if rank == kill.get("--kill-rank", -1) and event.step == kill.get("--kill-step"):
            os.kill(os.getpid(), signal.SIGKILL)   # a rank dies mid-run, without any cleanup

    for fields in configs:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        fit(TrainConfig(**fields), progress=False, on_step=on_step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
