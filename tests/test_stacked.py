"""A TopK sweep trained as one batched step (train/stacked.py) against the same SAEs trained one by
one with the trainer's own step (loss + train.runs.optimizer_step): the same weights, AuxK and
clipping included; and Adam as built by the trainer against the plain per-tensor loop."""
import copy

import pytest
import torch

from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.runs import Run, make_adam, optimizer_step
from sae_harvest.train.stacked import StackedSAEs, StackedTopK, stacked_step


def _sweep(ks, d_in=16, d_sae=64, seed=0, arch="topk"):
    saes = []
    for k in ks:
        torch.manual_seed(seed + int(k * 10))   # each SAE its own init stream, as the trainer seeds them
        swept = {"k": k} if arch in ("topk", "batchtopk") else {"l1_coeff": float(k)}
        sae = make_sae(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, aux_k=8, aux_coeff=0.5, **swept))
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.2)
        sae.calibrate(torch.randn(64, d_in), None)   # jumprelu: theta_0 = sqrt(lambda); gated: b_gate
        saes.append(sae)
    return saes


def _data(steps, batch, d_in=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(40, d_in, generator=g)
    codes = (torch.rand(steps * batch, 40, generator=g) < 0.1) * torch.rand(steps * batch, 40, generator=g)
    return (codes @ dictionary * 3).split(batch)


# the swept values per architecture: k, or the L1 / L0 coefficient (each SAE its own)
SWEEPS = {"topk": (4, 8, 16), "batchtopk": (4, 8, 16), "relu": (3.0, 30.0, 300.0), "jumprelu": (0.1, 0.5, 2.0),
          "gated": (0.3, 1.0, 3.0)}


def _train_both(arch, grad_clip, own_rows: bool, steps=8, d_sae=64, sparse_decode=False, ks=None,
                sparse_backward=False):
    """The sweep trained one by one (the trainer's loss + optimizer_step per SAE) and stacked;
    own_rows: each SAE reads its own rows ([S, n, d], several sites) instead of one shared batch."""
    ks, lr, dead_after, batch = ks or SWEEPS[arch], 3e-3, 128, 64
    one_by_one = _sweep(ks, arch=arch, d_sae=d_sae)
    if sparse_decode:
        assert all(sae.enable_sparse_decode() for sae in one_by_one)
    if sparse_backward:
        assert all(sae.enable_sparse_backward() for sae in one_by_one)
    stack = StackedSAEs(copy.deepcopy(one_by_one))
    assert stack.sparse_decode == sparse_decode and stack.sparse_backward == (sparse_backward and arch == "topk")
    betas = one_by_one[0].adam_betas
    runs = [Run(name=str(k), sae=s, opt=make_adam(s.parameters(), lr, betas), lr=lr,
                since_fired=torch.zeros(d_sae, dtype=torch.long)) for k, s in zip(ks, one_by_one)]
    opt = make_adam(stack.parameters(), lr, betas)
    since, bound, aux_seen = torch.zeros(len(ks), d_sae, dtype=torch.long), 0, 0.0
    data = [_data(steps, batch, seed=1 + s) for s in range(len(ks))] if own_rows else [_data(steps, batch)] * len(ks)
    for i in range(steps):
        rows = [data[s][i] for s in range(len(ks))]
        for run, x in zip(runs, rows):   # what train/local.py's _step does per SAE
            dead = run.since_fired >= dead_after if run.idle_bound >= dead_after else None
            out = run.sae.loss(x, dead_mask=dead)
            out.loss.backward()
            optimizer_step(run, 1.0, grad_clip, fired=(out.feats > 0).any(0), tokens=len(x))
        x = torch.stack(rows) if own_rows else rows[0]
        terms = stacked_step(stack, opt, x, since, dead_after, bound, lr, grad_clip)
        bound += batch
        aux_seen += float(terms.get("aux", torch.zeros(1)).sum())
    return ks, runs, stack, since, aux_seen


@pytest.mark.parametrize("own_rows", [False, True])   # True: SAEs of several sites, [S, n, d] inputs
@pytest.mark.parametrize("grad_clip", [10.0, 0.05])   # 0.05: clipping binds, per SAE
@pytest.mark.parametrize("arch", list(SWEEPS))
def test_stacked_sweep_trains_the_weights_one_by_one_does(arch, grad_clip, own_rows):
    ks, runs, stack, since, aux_seen = _train_both(arch, grad_clip, own_rows)
    if arch in ("topk", "batchtopk"):
        assert aux_seen > 0   # AuxK ran, so its batched form is part of what is compared
    fresh = _sweep(ks, arch=arch)
    _same(ks, runs, stack, since, fresh)
    if arch == "batchtopk":
        assert all(float(r.sae.threshold[0]) > 0 for r in runs)   # the EMA ran


def _same(ks, runs, stack, since, fresh):
    for s, (run, trained) in enumerate(zip(runs, stack.unstack())):
        torch.testing.assert_close(since[s], run.since_fired)
        for name, w in run.sae.state_dict().items():   # batchtopk: its threshold EMA too
            torch.testing.assert_close(trained.state_dict()[name], w, rtol=1e-5, atol=1e-6, msg=f"{ks[s]} {name}")
        assert not torch.equal(trained.W_enc, fresh[s].W_enc)   # it did train


def test_stacked_sites_of_one_k_train_the_weights_one_by_one_does():
    """One k for every SAE (one SAE per site, or a sweep value across sites): the unranked top-k path."""
    ks, runs, stack, since, aux_seen = _train_both("topk", 10.0, True, ks=(8, 8, 8))
    assert stack.one_k and aux_seen > 0
    _same(ks, runs, stack, since, _sweep(ks))


@pytest.mark.parametrize("ks", [(4, 8, 16), (8, 8, 8)])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])   # batchtopk: the stack's dense backward, the same gradients
def test_stacked_sparse_backward_trains_the_weights_one_by_one_does(arch, ks):
    """--sparse-backward (CUDA's default for the TopK family): the stacked encoder gradients at the
    chosen latents only (AuxK's included) against each SAE's own sparse backward."""
    ks, runs, stack, since, aux_seen = _train_both(arch, 10.0, True, ks=ks, sparse_backward=True, d_sae=256,
                                                   sparse_decode=arch == "topk")
    assert aux_seen > 0
    _same(ks, runs, stack, since, _sweep(ks, arch=arch, d_sae=256))


@pytest.mark.parametrize("own_rows", [False, True])
def test_stacked_sparse_decode_trains_the_weights_one_by_one_does(own_rows):
    """TopK SAEs with the sparse decode on (CUDA's default when k <= d_sae/16) decode by gathering
    their k rows in the stack too."""
    ks, runs, stack, since, aux_seen = _train_both("topk", 10.0, own_rows, d_sae=256, sparse_decode=True)
    assert aux_seen > 0
    _same(ks, runs, stack, since, _sweep(ks, d_sae=256))


def test_stacked_rejects_mixed_shapes():
    saes = _sweep((4,)) + _sweep((4,), d_sae=32)
    with pytest.raises(ValueError, match="one shape"):
        StackedTopK(saes)


def test_trainer_adam_equals_the_per_tensor_loop():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(32, 48)), torch.nn.Parameter(torch.randn(48))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = make_adam(a, 1e-2, (0.9, 0.999))
    opt_b = torch.optim.Adam(b, lr=1e-2, betas=(0.9, 0.999), foreach=False)
    for _ in range(5):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ---- train fit with --stack-sweep ----
import json  # noqa: E402
import signal  # noqa: E402

from sae_harvest import train  # noqa: E402
from sae_harvest.train.driver import TrainInterrupted  # noqa: E402
from sae_harvest.train.errors import TrainError  # noqa: E402
from sae_harvest.train.fit import fit  # noqa: E402
from tests.test_train_loop import _cfg, make_store  # noqa: E402

KS = (1, 2, 4)   # with d_sae 256 latents go dead within the run, so AuxK is compared too


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stacked") / "s.zarr"
    make_store(path)
    return path


def _weights(out, arch="topk"):
    return {k: train.load_sae(out / f"{arch}_k{k}").state_dict() for k in KS}


def test_fit_stacked_sweep_trains_the_loops_weights(store, tmp_path):
    summaries = {}
    for setting in ("off", "on"):
        # dead_tokens small: AuxK runs; log_every 3: the per-run metrics of the stacked step too
        summaries[setting] = fit(_cfg(store, tmp_path / setting, k=KS, d_sae=256, tokens=256 * 16,
                                      stack_sweep=setting, dead_tokens=256 * 3, log_every=3), progress=False)
    loop, stacked = _weights(tmp_path / "off"), _weights(tmp_path / "on")
    for k in KS:
        for name, w in loop[k].items():
            torch.testing.assert_close(stacked[k][name], w, rtol=1e-4, atol=1e-5, msg=f"k={k} {name}")
        a = [json.loads(line) for line in (tmp_path / "off" / f"topk_k{k}" / "metrics.jsonl").read_text().splitlines()]
        b = [json.loads(line) for line in (tmp_path / "on" / f"topk_k{k}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for ra, rb in zip(a, b):
            for key in ("loss", "mse", "aux", "l0", "nmse", "dead_fraction", "lr"):
                assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-6), (k, key)
        assert any(r["aux"] > 0 for r in a)
        held = (summaries["off"][f"topk_k{k}"]["held_out"], summaries["on"][f"topk_k{k}"]["held_out"])
        assert held[1]["nmse"] == pytest.approx(held[0]["nmse"], rel=1e-3)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])   # batchtopk: its threshold buffer is a view of the stack's too
def test_fit_stacked_sweep_resumes_exactly(store, tmp_path, arch):
    cfg = dict(arch=arch, k=KS, d_sae=256, tokens=256 * 12, stack_sweep="on", dead_tokens=256 * 3)
    fit(_cfg(store, tmp_path / "full", **cfg), progress=False)

    def interrupt(event):
        if event.step == 6:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainInterrupted):
        fit(_cfg(store, tmp_path / "part", **cfg), progress=False, on_step=interrupt)
    fit(_cfg(store, tmp_path / "part", **cfg), resume=True, progress=False)
    full, part = _weights(tmp_path / "full", arch), _weights(tmp_path / "part", arch)
    for k in KS:
        for name, w in full[k].items():
            torch.testing.assert_close(part[k][name], w, rtol=0, atol=0, msg=f"k={k} {name}")


def test_fit_stack_sweep_on_refuses_what_it_cannot_stack(store, tmp_path):
    with pytest.raises(TrainError, match="cannot stack this sweep.*not a plain"):
        fit(_cfg(store, tmp_path / "b", arch="matryoshka_batchtopk", k=KS, stack_sweep="on"), progress=False)
    assert not (tmp_path / "b").exists()   # refused before anything was written
