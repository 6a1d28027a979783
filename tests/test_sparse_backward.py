"""The TopK family's sparse encoder backward (train/sparse_topk.py) against dense autograd: the
same loss and the same gradients for every parameter, AuxK included; the global top-k of two
gloo ranks too; and `train fit --sparse-backward on` trains the weights `off` does."""
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_harvest import train
from sae_harvest.train.fit import fit
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sparse_topk import SparsePre
from tests.test_train_loop import _cfg, make_store

FAMILY = ("topk", "gtopk", "batchtopk", "matryoshka_batchtopk")
WORKER = str(Path(__file__).with_name("sparse_backward_worker.py"))


def _pair(arch, seed=0, d_in=24, d_sae=96, k=6, **kw):
    torch.manual_seed(seed)
    dense = make_sae(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k, beta=3.0, aux_k=16, aux_coeff=0.5, **kw))
    with torch.no_grad():   # a non-zero b_enc and b_dec, so their gradients are tested too
        dense.b_enc.normal_(0, 0.1)
        dense.b_dec.normal_(0, 0.3)
    sparse = copy.deepcopy(dense)
    assert sparse.enable_sparse_backward() and not dense.use_sparse_backward
    return dense, sparse


def _grads(sae, x, g, dead, decode_sparse=False):
    sae.use_sparse_decode = decode_sparse
    out = sae.loss(x, g, dead_mask=dead)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("arch", FAMILY)
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_backward_equals_dense_autograd(arch, with_dead):
    dense, sparse = _pair(arch)
    x = torch.randn(40, 24) * 2
    g = torch.randn(40, 24) if arch == "gtopk" else None
    dead = (torch.arange(96) % 3 == 0) if with_dead else None
    out_d, grads_d = _grads(dense, x, g, dead)
    out_s, grads_s = _grads(sparse, x, g, dead)
    torch.testing.assert_close(out_s.loss, out_d.loss)
    torch.testing.assert_close(out_s.feats, out_d.feats)
    if with_dead:   # AuxK really contributes, so its gradient is part of what is compared
        aux = out_d.terms["auxk" if arch == "matryoshka_batchtopk" else "aux"]
        assert float(aux) > 1e-3
    for name in grads_d:
        assert grads_d[name].abs().max() > 0, name
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sparse_backward_with_sparse_decode_and_input_gradient():
    """TopK with the gathered decode, and an input that needs its own gradient (dL/dx)."""
    dense, sparse = _pair("topk")
    x = torch.randn(40, 24)
    dead = torch.arange(96) % 2 == 0
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    _, grads_d = _grads(dense, xs[0], None, dead, decode_sparse=True)
    _, grads_s = _grads(sparse, xs[1], None, dead, decode_sparse=True)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)


def test_sparse_pre_carries_no_dense_graph():
    """The point of it: the [n, d_sae] pre-activations are not part of the autograd graph."""
    _, sparse = _pair("topk")
    enc = SparsePre(sparse, torch.randn(8, 24))
    assert enc.pre.grad_fn is None and not enc.pre.requires_grad
    assert enc.gather(enc.pre.topk(6, dim=-1).indices).grad_fn is not None


def test_two_ranks_global_topk_sparse_equals_dense(tmp_path):
    """2 gloo ranks, each with half the batch, inside a data-parallel step: BatchTopK's global
    threshold, AuxK's global variance, averaged gradients; sparse == dense, and == one process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), WORKER, str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{a}.ok" for a in sorted(FAMILY)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("sparse") / "s.zarr"
    make_store(path)
    return path


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_fit_with_sparse_backward_trains_the_same_weights(store, tmp_path, arch):
    weights = {}
    for setting in ("off", "on"):
        # dead_tokens small, so AuxK runs within the few steps
        fit(_cfg(store, tmp_path / setting, arch=arch, tokens=256 * 8, sparse_backward=setting,
                 dead_tokens=256), progress=False)
        (sub,) = [p for p in (tmp_path / setting).iterdir() if p.name != "checkpoint"]
        weights[setting] = train.load_sae(sub).state_dict()
    for name, w in weights["off"].items():
        torch.testing.assert_close(weights["on"][name], w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_backward_under_bf16_autocast(arch):
    """The GPU setting (bf16 autocast): the same latents, and gradients within bf16 rounding of the
    dense backward's; the sparse one, computed in fp32, is no further from the fp32 reference."""
    dense, sparse = _pair(arch)
    reference = copy.deepcopy(dense)
    x = torch.randn(40, 24) * 2
    dead = torch.arange(96) % 3 == 0
    _, grads_ref = _grads(reference, x, None, dead)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_d = dense.loss(x, dead_mask=dead)
        out_s = sparse.loss(x, dead_mask=dead)
    out_d.loss.backward()
    out_s.loss.backward()
    torch.testing.assert_close(out_s.feats, out_d.feats)
    for name, p in dense.named_parameters():
        q = dict(sparse.named_parameters())[name]
        scale = grads_ref[name].abs().max()
        assert (q.grad - p.grad).abs().max() <= 0.05 * scale, name
        assert (q.grad - grads_ref[name]).abs().max() <= (p.grad - grads_ref[name]).abs().max() * 1.5 + 1e-6 * scale, name
