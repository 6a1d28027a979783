import torch

# Tiny test models are dominated by per-op overhead; extra threads only contend on 2-core CI.
torch.set_num_threads(1)
