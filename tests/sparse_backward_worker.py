"""Run by tests/test_sparse_backward.py under torchrun (2 gloo ranks): for each architecture of the
TopK family, the gradients of a data-parallel step with the sparse backward equal dense autograd's,
and both equal one process's on the whole batch. Writes <out>/<arch>.ok on rank 0 when they do."""
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sae_harvest.train import distributed
from sae_harvest.train.registry import SAEConfig, make_sae

torch.set_num_threads(1)


def grads(sae, x, g, dead, reducer=distributed.LOCAL):
    out = sae.loss(x, g, dead_mask=dead, reducer=reducer)
    out.loss.backward()
    reducer.average_gradients(sae)
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def main():
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for arch in ("topk", "gtopk", "batchtopk", "matryoshka_batchtopk"):
        torch.manual_seed(0)   # every rank builds the same SAE and the same global batch
        one = make_sae(SAEConfig(arch=arch, d_in=16, d_sae=64, k=4, beta=3.0, aux_k=8, aux_coeff=0.5))
        with torch.no_grad():
            one.b_enc.normal_(0, 0.1)
            one.b_dec.normal_(0, 0.3)
        x = torch.randn(64, 16) * 2
        # per-token scales differ a lot, so BatchTopK's global threshold keeps unequal shares per rank
        x[:32] *= 3
        g = torch.randn(64, 16) if arch == "gtopk" else None
        dead = torch.arange(64) % 4 == 0
        dense, sparse = copy.deepcopy(one), copy.deepcopy(one)
        sparse.enable_sparse_backward()
        reference = grads(one, x, g, dead)    # one process, whole batch
        mine = slice(rank * 32, (rank + 1) * 32)
        with distributed.data_parallel() as reducer:   # the SAEs reduce through what they are handed
            got_dense = grads(dense, x[mine], g[mine] if g is not None else None, dead, reducer)
            got_sparse = grads(sparse, x[mine], g[mine] if g is not None else None, dead, reducer)
        for name in reference:
            torch.testing.assert_close(got_sparse[name], got_dense[name], rtol=1e-5, atol=1e-6, msg=f"{arch} {name}")
            torch.testing.assert_close(got_dense[name], reference[name], rtol=1e-4, atol=1e-5, msg=f"{arch} {name}")
        dist.barrier()
        if rank == 0:
            (out / f"{arch}.ok").write_text("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
