"""Run `train fit` for several configs inside one torchrun job (the process group is ours, so fit
joins it instead of creating one). Usage:
ddp_worker.py CONFIGS.json [--kill-rank R --kill-step S] [--results RESULTS.json]
--results: rank 0 writes, per config, what fit returned ({"summaries": ...}) or the one-line
UserError it raised ({"error": ...}: every rank must raise it alike, as for bad input)."""
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

from sae_harvest.stores.errors import UserError
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit

torch.set_num_threads(1)


def main():
    configs = json.loads(open(sys.argv[1]).read())
    args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
    kill_rank, kill_step = int(args.get("--kill-rank", -1)), int(args.get("--kill-step", -1))
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def on_step(event):
        if rank == kill_rank and event.step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)   # a rank dies mid-run, without any cleanup

    results = []
    for fields in configs:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        try:
            results.append({"summaries": fit(TrainConfig(**fields), progress=False, on_step=on_step)})
        except UserError as e:
            if "--results" not in args:
                raise
            results.append({"error": str(e)})
    if "--results" in args and rank == 0:
        with open(args["--results"], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
