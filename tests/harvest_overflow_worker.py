"""torchrun worker for test_store_v2: a harvest whose rank 1 overflows float16 in its last window
(checked on the writer thread after the last round), or with `first` in its first window under
--overwrite (checked before rank 0 may replace the old store). Prints one line per rank."""
import os
import sys

import torch

from sae_harvest.harvest import window
from sae_harvest.harvest.run import HarvestConfig, harvest

torch.set_num_threads(1)
rank = int(os.environ["RANK"])
real, calls = window.capture, []


def capture(*a, **k):
    got = real(*a, **k)
    calls.append(1)
    if rank == 1 and len(calls) >= (1 if first else 3):   # rank 1 owns windows 1 and 3, two batches each
        for name in got.acts:
            got.acts[name] = got.acts[name] * 1e6
    return got


window.capture = capture
out, model, corpus, which = sys.argv[1:5]
first = which == "first"
cfg = HarvestConfig(out=out, model=model, dataset=corpus, sites="blocks.1.resid_pre", tokens=1024, ctx_len=32,
                    batch_size=4, shuffle_window=256, device="cpu", act_encoding="float16")
try:
    harvest(cfg, progress=False, overwrite=first)
    print(f"rank {rank}: finished", flush=True)
except Exception as e:
    print(f"rank {rank}: {type(e).__name__}: {e}", flush=True)
    sys.exit(2)
