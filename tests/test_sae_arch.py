"""Each SAE architecture against independent numpy references on small hand-set tensors."""
import math

import numpy as np
import pytest
import torch

from sae_harvest.train.registry import ARCH_NAMES, SAEConfig, make_sae
from sae_harvest.train.sae import geometric_median
from sae_harvest.train.gtopk import DEFAULT_BETA, calibrate_beta

ARCHS = list(ARCH_NAMES)


def cfg_for(arch, d_in=3, d_sae=4, **kw):
    base = dict(l1_coeff=0.5, k=2, beta=3.0, aux_k=8, aux_coeff=0.25)
    base.update(kw)
    return SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, **base)


def randomised(arch, d_in=3, d_sae=4, seed=0, **kw):
    """float64 SAE with every parameter random (biases non-zero), so no term is trivially zero."""
    torch.manual_seed(seed)
    sae = make_sae(cfg_for(arch, d_in, d_sae, **kw)).double()
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name.startswith(("b_", "r_")) else 1.0))
        sae.set_decoder_norm_to_unit_norm()
    return sae


def P(sae):
    return {n: p.detach().numpy().copy() for n, p in sae.named_parameters()}


relu_np = lambda z: np.maximum(z, 0.0)


# ---------------------------------------------------------------- relu
def test_relu_hand_computed():
    sae = make_sae(SAEConfig("relu", d_in=3, d_sae=4, l1_coeff=3.0)).double()
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1., 0, 0, 1], [0, 1, 0, -1], [0, 0, 1, 0]]))
        sae.b_enc.copy_(torch.tensor([0., -1, 0, 0.5]))
        sae.W_dec.copy_(torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]]))
        sae.b_dec.copy_(torch.tensor([0.1, 0, 0]))
    x = torch.tensor([[1., 2, -1]], dtype=torch.float64)
    # pre = [1, 1, -1, -0.5] -> f = [1, 1, 0, 0] (b_dec is NOT subtracted for relu)
    # x_hat = [1.1, 1, 0]; err^2 = 0.01 + 1 + 1 = 2.01; phi = 3/3 = 1; l1 = 2 -> loss 4.01
    out = sae.loss(x)
    assert out.feats.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    assert out.terms["mse"].item() == pytest.approx(2.01)
    assert out.terms["sparsity"].item() == pytest.approx(2.0)
    assert out.loss.item() == pytest.approx(4.01)


def test_relu_matches_numpy():
    sae = randomised("relu")
    x = torch.randn(6, 3, dtype=torch.float64)
    p, xn = P(sae), x.numpy()
    f = relu_np(xn @ p["W_enc"] + p["b_enc"])
    x_hat = f @ p["W_dec"] + p["b_dec"]
    loss = ((xn - x_hat) ** 2).sum(1).mean() + 0.5 / 3 * np.abs(f).sum(1).mean()
    out = sae.loss(x)
    np.testing.assert_allclose(out.feats.detach().numpy(), f)
    np.testing.assert_allclose(out.x_hat.detach().numpy(), x_hat)
    assert out.loss.item() == pytest.approx(loss)


# ---------------------------------------------------------------- gated
def gated_np(p, xn, lam):
    xc = xn - p["b_dec"]
    pi_gate = xc @ p["W_enc"] + p["b_gate"]
    pi_mag = xc @ (p["W_enc"] * np.exp(p["r_mag"])) + p["b_mag"]
    f = (pi_gate > 0) * relu_np(pi_mag)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    via_gate = relu_np(pi_gate) @ p["W_dec"] + p["b_dec"]
    loss = (((xn - x_hat) ** 2).sum(1) + lam * relu_np(pi_gate).sum(1) + ((xn - via_gate) ** 2).sum(1)).mean()
    return f, x_hat, loss


def test_gated_matches_numpy():
    sae = randomised("gated")
    assert not hasattr(sae, "b_enc")
    x = torch.randn(8, 3, dtype=torch.float64)
    f, x_hat, loss = gated_np(P(sae), x.numpy(), 0.5)
    assert 0 < (f > 0).sum() < f.size   # the gate really gates something
    out = sae.loss(x)
    np.testing.assert_allclose(out.feats.detach().numpy(), f)
    np.testing.assert_allclose(sae.encode(x).detach().numpy(), f)
    np.testing.assert_allclose(out.x_hat.detach().numpy(), x_hat)
    assert out.loss.item() == pytest.approx(loss)


def test_gated_decoder_gets_no_gradient_from_via_gate_term():
    sae = randomised("gated", seed=1)
    x = torch.randn(8, 3, dtype=torch.float64)
    sae.loss(x).loss.backward()
    g_full = sae.W_dec.grad.clone()
    sae.zero_grad()
    out = sae.loss(x)
    ((out.x_hat - x).pow(2).sum(-1).mean()).backward()   # main reconstruction only
    torch.testing.assert_close(g_full, sae.W_dec.grad)
    sae.zero_grad()
    out = sae.loss(x)
    ((out.x_hat - x).pow(2).sum(-1).mean()).backward()
    assert sae.b_gate.grad is None or sae.b_gate.grad.abs().max() == 0   # Heaviside: no gate gradient


def test_gated_equals_jumprelu_form():
    sae = randomised("gated", d_in=16, d_sae=64, seed=2)
    x = torch.randn(256, 16, dtype=torch.float64)
    W, b, thr = sae.to_jumprelu()
    pre = (x - sae.b_dec) @ W + b
    f_jump = torch.relu(pre) * (pre > thr)
    f = sae.encode(x)
    assert 0 < (f > 0).float().mean() < 1
    torch.testing.assert_close(f_jump, f)


# ---------------------------------------------------------------- topk family
def topk_np(p, xn, k):
    pre = relu_np((xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    f = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=1)[:, :k]
    np.put_along_axis(f, idx, np.take_along_axis(pre, idx, 1), 1)
    return pre, f


def auxk_np(p, pre, resid, dead, k_aux):
    masked = np.where(dead[None], pre, -np.inf)
    idx = np.argsort(-masked, axis=1)[:, :k_aux]
    acts = np.zeros_like(pre)
    np.put_along_axis(acts, idx, np.take_along_axis(pre, idx, 1), 1)
    e_hat = acts @ p["W_dec"]
    return ((resid - e_hat) ** 2).sum() / ((resid - resid.mean(0)) ** 2).sum()


def test_topk_matches_numpy_and_auxk():
    sae = randomised("topk", d_in=5, d_sae=12, k=3, aux_k=4)
    x = torch.randn(10, 5, dtype=torch.float64)
    p, xn = P(sae), x.numpy()
    pre, f = topk_np(p, xn, 3)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    dead = np.zeros(12, bool)
    dead[[0, 3, 5, 7, 8, 11]] = True       # 6 dead, aux_k=4, d_sae//2=6 -> 4 used
    aux = auxk_np(p, pre, xn - x_hat, dead, 4)
    out = sae.loss(x, dead_mask=torch.from_numpy(dead))
    np.testing.assert_allclose(out.feats.detach().numpy(), f)
    assert out.terms["mse"].item() == pytest.approx(((xn - x_hat) ** 2).sum(1).mean())
    assert out.terms["aux"].item() == pytest.approx(0.25 * aux)
    assert out.loss.item() == pytest.approx(out.terms["mse"].item() + 0.25 * aux)
    # capped by the number of dead latents: 2 dead -> k_aux = 2
    dead2 = np.zeros(12, bool)
    dead2[[2, 9]] = True
    out2 = sae.loss(x, dead_mask=torch.from_numpy(dead2))
    assert out2.terms["aux"].item() == pytest.approx(0.25 * auxk_np(p, pre, xn - x_hat, dead2, 2))
    # capped at d_sae // 2: aux_k=8, 9 dead -> 6 used
    sae8 = randomised("topk", d_in=5, d_sae=12, k=3, aux_k=8)
    dead3 = np.ones(12, bool)
    dead3[[1, 4, 10]] = False
    out3 = sae8.loss(x, dead_mask=torch.from_numpy(dead3))
    assert out3.terms["aux"].item() == pytest.approx(0.25 * auxk_np(p, pre, xn - x_hat, dead3, 6))
    for mask in (None, torch.zeros(12, dtype=torch.bool)):
        assert sae.loss(x, dead_mask=mask).terms["aux"].item() == 0.0
    # fewer dead than aux_k (the -inf picks get weight 0) and none dead: finite gradients, and the
    # same gradients as the loss without its aux term
    for mask in (torch.from_numpy(dead2), torch.zeros(12, dtype=torch.bool)):
        sae.zero_grad()
        out = sae.loss(x, dead_mask=mask)
        aux_only = out.loss - (out.x_hat - x).pow(2).sum(-1).mean()
        aux_only.backward()
        grads = torch.cat([p.grad.flatten() for p in sae.parameters() if p.grad is not None])
        assert torch.isfinite(grads).all()
        if not mask.any():
            assert grads.abs().max() == 0
        else:
            assert sae.W_dec.grad[~mask].abs().max() == 0 and sae.W_dec.grad[mask].abs().max() > 0


def test_auxk_residual_is_detached():
    sae = randomised("topk", d_in=5, d_sae=12, k=3, seed=3)
    x = torch.randn(10, 5, dtype=torch.float64)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[:6] = True
    out = sae.loss(x, dead_mask=dead)
    # gradient of the aux term alone must not reach the latents that reconstructed x (not dead)
    sae.zero_grad()
    aux_only = out.loss - (out.x_hat - x).pow(2).sum(-1).mean()
    aux_only.backward()
    live = ~dead
    assert sae.W_dec.grad[live].abs().max() == 0
    assert sae.W_dec.grad[dead].abs().max() > 0


def test_topk_l0_is_exactly_k():
    sae = make_sae(SAEConfig("topk", d_in=16, d_sae=64, k=5))
    with torch.no_grad():
        sae.b_enc.fill_(10.0)   # all pre-activations positive: ReLU cannot lower L0 below k
    f = sae.encode(torch.randn(300, 16))
    assert ((f > 0).sum(-1) == 5).all()


def test_sparse_decode_equals_dense_decode():
    for arch in ("topk", "gtopk"):
        sae = randomised(arch, d_in=8, d_sae=40, k=6, seed=4)
        x, g = torch.randn(20, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
        vals, idx = sae.encode_sparse(x, g)
        assert vals.shape == idx.shape == (20, 6)
        dense = sae.decode(sae.encode(x, g))
        sparse = sae.sparse_decode(idx, vals)
        torch.testing.assert_close(sparse, dense)
        sparse.pow(2).sum().backward()
        g_sparse = sae.W_dec.grad.clone()
        sae.zero_grad()
        sae.decode(sae.encode(x, g)).pow(2).sum().backward()
        torch.testing.assert_close(g_sparse, sae.W_dec.grad)


@pytest.mark.parametrize("arch", ["topk", "gtopk", "batchtopk"])
def test_use_sparse_decode_flag_matches_dense_loss(arch):
    x, g = torch.randn(20, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    dead = torch.arange(40) % 3 == 0
    results = []
    for flag in (False, True):
        sae = randomised(arch, d_in=8, d_sae=40, k=6, seed=9)
        sae.use_sparse_decode = flag
        if flag and arch != "batchtopk":   # the flag really avoids the dense [n, d_sae] @ W_dec matmul
            sae.decode = lambda f: pytest.fail("dense decode used")
        out = sae.loss(x, grad=g, dead_mask=dead)
        out.loss.backward()
        results.append((out.loss.detach(), out.x_hat.detach(), sae.W_dec.grad, sae.W_enc.grad, sae(x, g).detach()))
    for dense, sparse in zip(*results):
        torch.testing.assert_close(sparse, dense)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_under_bf16_autocast(arch):
    # the loop runs loss() under autocast: bf16 activations meet fp32 parameters (embedding_bag dtypes)
    sae = make_sae(cfg_for(arch, d_in=8, d_sae=64, k=4))
    sae.use_sparse_decode = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.loss(torch.randn(16, 8), grad=torch.randn(16, 8).bfloat16(), dead_mask=torch.ones(64, dtype=torch.bool))
    out.loss.backward()
    assert torch.isfinite(out.loss) and sae.W_dec.grad is not None


def test_batchtopk_training_l0_and_eval_threshold():
    sae = make_sae(SAEConfig("batchtopk", d_in=16, d_sae=32, k=4, threshold_ema=0.9))
    x = torch.randn(64, 16)
    sae.train()
    out = sae.loss(x)
    per_token = (out.feats > 0).sum(-1)
    assert per_token.sum().item() == 64 * 4           # average L0 exactly k
    assert per_token.min() < per_token.max()           # but per token it varies
    pre = sae.pre_acts(x)
    kept_min = out.feats[out.feats > 0].min()
    assert (pre[(out.feats == 0)] <= kept_min).all()   # kept = the n*k largest of the batch
    assert torch.allclose(sae.threshold, kept_min.expand(32))   # first batch initialises it
    out2 = sae.loss(x[:32] * 2)
    m2 = out2.feats[out2.feats > 0].min()
    assert torch.allclose(sae.threshold, (0.9 * kept_min + 0.1 * m2).expand(32))
    # eval: JumpReLU(threshold), token-wise independent of the batch; loss() in eval leaves theta alone
    sae.eval()
    theta = sae.threshold.clone()
    f = sae.encode(x)
    torch.testing.assert_close(f, pre * (pre > theta))
    torch.testing.assert_close(sae.encode(x[3:4]), f[3:4])
    sae.loss(x)
    assert torch.equal(sae.threshold, theta)


def test_batchtopk_inference_l0_near_k_after_training():
    torch.manual_seed(0)
    d_in, n_feat, k = 16, 32, 3
    D = torch.nn.functional.normalize(torch.randn(n_feat, d_in), dim=-1)
    sample = lambda n: ((torch.rand(n, n_feat) < k / n_feat) * (torch.rand(n, n_feat) + 0.5)) @ D
    sae = make_sae(SAEConfig("batchtopk", d_in=d_in, d_sae=64, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(300):
        out = sae.loss(sample(256))
        opt.zero_grad()
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    sae.eval()
    l0 = (sae.encode(sample(4096)) > 0).float().sum(-1).mean().item()
    assert abs(l0 - k) <= 0.25 * k, l0


def gtopk_fixture():
    """k=1; latent 0 has the bigger pre-activation, latent 1 the bigger gradient attribution."""
    sae = make_sae(SAEConfig("gtopk", d_in=3, d_sae=4, k=1, beta=10.0)).double()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3, 4))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.eye(4, 3))
        sae.W_dec[3] = torch.tensor([0.6, 0.8, 0.0])
    x = torch.tensor([[2.0, 1.0, 0.5]], dtype=torch.float64)
    grad = torch.tensor([[0.0, 0.5, 0.0]], dtype=torch.float64)
    return sae, x, grad


def test_gtopk_gradient_changes_the_selection():
    sae, x, grad = gtopk_fixture()
    # pre = [2, 1, 0.5, 0]; |grad @ W_dec.T| = [0, 0.5, 0, 0.4]
    # score = pre * (1 + 10 * attr) = [2, 6, 0.5, 0] -> latent 1; plain TopK -> latent 0
    assert sae.encode(x).tolist() == [[2.0, 0.0, 0.0, 0.0]]
    assert sae.encode(x, grad).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    out = sae.loss(x, grad=grad)
    assert out.feats.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert out.terms["mse"].item() == pytest.approx(4.0 + 0.25)     # x_hat = [0, 1, 0]
    sae0 = make_sae(SAEConfig("gtopk", d_in=3, d_sae=4, k=1, beta=0.0)).double()
    sae0.load_state_dict(sae.state_dict())
    assert sae0.encode(x, grad).tolist() == [[2.0, 0.0, 0.0, 0.0]]


def test_gtopk_matches_numpy_and_gradient_flows_only_through_values():
    sae = randomised("gtopk", d_in=6, d_sae=20, k=4, beta=5.0, seed=5)
    x, g = torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)
    p, xn, gn = P(sae), x.numpy(), g.numpy()
    g.requires_grad_(True)
    pre = relu_np((xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    score = pre + 5.0 * pre * np.abs(gn @ p["W_dec"].T)
    idx = np.argsort(-score, axis=1)[:, :4]
    f = np.zeros_like(pre)
    np.put_along_axis(f, idx, np.take_along_axis(pre, idx, 1), 1)
    out = sae.loss(x, grad=g)
    np.testing.assert_allclose(out.feats.detach().numpy(), f)
    assert not np.allclose(f, topk_np(p, xn, 4)[1])   # the gradient mattered here
    out.loss.backward()   # must not try to differentiate through the score
    assert g.grad is None


def test_gtopk_default_beta_and_calibration():
    assert 5 <= DEFAULT_BETA <= 20
    sae = randomised("gtopk", d_in=6, d_sae=20, k=4, seed=6)
    x, g = torch.randn(50, 6, dtype=torch.float64), torch.randn(50, 6, dtype=torch.float64)
    b1 = calibrate_beta(sae, x, g, target=2.0)
    b2 = calibrate_beta(sae, x, g * 100, target=2.0)   # 100x bigger gradients -> 100x smaller beta
    assert b1 > 0 and b2 == pytest.approx(b1 / 100)


# ---------------------------------------------------------------- shared machinery
@pytest.mark.parametrize("arch", ARCHS)
def test_init_tied_unit_norm_and_loss_is_sum_of_terms(arch):
    sae = make_sae(cfg_for(arch, d_in=8, d_sae=24))
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(24))
    # relu: the tie carries the d_in / d_sae init scale (see train/relu.py); gated: in r_mag
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T * (8 / 24 if arch == "relu" else 1.0))
    if arch == "gated":
        torch.testing.assert_close(sae.r_mag, torch.full((24,), math.log(8 / 24)))
    assert sae.W_enc.shape == (8, 24) and sae.W_dec.shape == (24, 8) and sae.b_dec.shape == (8,)
    x = torch.randn(16, 8)
    out = sae.loss(x, grad=torch.randn(16, 8), dead_mask=torch.arange(24) % 2 == 0)
    total = sum(out.terms.get(t, 0.0) for t in ("mse", "sparsity", "aux"))
    assert out.loss.item() == pytest.approx(float(total), rel=1e-5)
    assert out.feats.shape == (16, 24) and out.x_hat.shape == (16, 8)
    assert all(not t.requires_grad for t in out.terms.values())
    assert SAEConfig.from_dict(sae.cfg.to_dict()) == sae.cfg


def test_config_validation():
    with pytest.raises(ValueError):
        SAEConfig("nope", 3, 4)
    with pytest.raises(ValueError):
        SAEConfig("topk", 3, 4, k=0)
    with pytest.raises(ValueError):
        SAEConfig.from_dict({"arch": "relu", "d_in": 3, "d_sae": 4, "bogus": 1})


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_norm_and_parallel_gradient_removal(arch):
    sae = randomised(arch, d_in=8, d_sae=24, seed=7)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(24, 1) * 3 + 0.1)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_gradient_parallel_to_decoder_directions()
    dots = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert dots.abs().max() < 1e-10
    assert sae.W_dec.grad.abs().max() > 0.01
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(24, dtype=torch.float64))


def test_init_b_dec():
    torch.manual_seed(0)
    pts = torch.randn(200, 4) + torch.tensor([5.0, -3.0, 0.0, 1.0])
    pts[0] = 1e4   # BOS-like outlier
    sae = make_sae(SAEConfig("topk", d_in=4, d_sae=8, k=2))
    sae.init_b_dec(pts, "mean")
    torch.testing.assert_close(sae.b_dec.detach(), pts.mean(0))
    sae.init_b_dec(pts)
    assert (sae.b_dec.detach() - torch.tensor([5.0, -3.0, 0.0, 1.0])).norm() < 0.5
    # Weiszfeld fixed point: the unit vectors from the median to the points sum to ~0
    med = geometric_median(pts.double(), max_iter=500, tol=1e-12)
    u = torch.nn.functional.normalize(pts.double() - med, dim=-1).sum(0)
    assert u.norm() < 1e-3 * len(pts)


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_input_scale(arch):
    s = 3.7
    sae = randomised(arch, d_in=6, d_sae=20, k=4, beta=5.0, seed=8)
    sae.eval()
    if arch == "batchtopk":
        sae.threshold.fill_(0.2)
    x = torch.randn(30, 6, dtype=torch.float64) * s
    g_raw = torch.randn(30, 6, dtype=torch.float64) * 0.1
    g_norm = g_raw * s           # gradient w.r.t. x/s, what the loop feeds during training
    f_old = sae.encode(x / s, g_norm)
    x_hat_old = sae.decode(f_old)
    sae.fold_input_scale(s)
    f_new = sae.encode(x, g_raw)
    assert (f_old > 0).any()
    torch.testing.assert_close(f_new, f_old)
    torch.testing.assert_close(sae.decode(f_new), s * x_hat_old)
    torch.testing.assert_close(sae(x, g_raw), s * x_hat_old)


def _short_run_fvu(arch, plain_tie=False):
    """64 -> 256 on ~200k tokens (48 steps of 4096), the trainer's defaults; held-out FVU."""
    torch.manual_seed(0)
    d, n_feat = 64, 512
    D = torch.nn.functional.normalize(torch.randn(n_feat, d), dim=-1)
    offset = torch.randn(d) * 2
    sample = lambda n: ((torch.rand(n, n_feat) < 0.02) * torch.rand(n, n_feat) * 3) @ D + offset  # noqa: E731
    x0 = sample(8192)
    s = float(x0.norm(dim=-1).mean() / math.sqrt(d))
    torch.manual_seed(1)
    sae = make_sae(SAEConfig(arch, d, 256, l1_coeff=1.0))
    if plain_tie:
        with torch.no_grad():
            sae.W_enc.copy_(sae.W_dec.T)
    sae.init_b_dec(x0 / s)
    opt = torch.optim.Adam(sae.parameters(), lr=5e-4, betas=sae.adam_betas)
    for _ in range(48):
        out = sae.loss(sample(4096) / s)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 10.0)
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    x = sample(8192) / s
    with torch.no_grad():
        return ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_short_run_clearly_beats_predicting_the_mean(arch):
    """Fraction of variance unexplained well below 1 (the mean predictor's) after a short run."""
    assert _short_run_fvu(arch) < 0.35


def test_plain_tied_relu_init_would_fail_the_short_run():
    assert _short_run_fvu("relu", plain_tie=True) > 0.5   # the old init: the test above has teeth


def test_l1_conversions_give_proportional_losses():
    """Our relu loss with l1_from_e2e_paper / l1_from_saelens is a constant multiple of the paper's /
    SAELens's loss for the same SAE, so the optimum (and L0) is the same (docs/e2e.md)."""
    from sae_harvest.train.relu import l1_from_e2e_paper, l1_from_saelens

    torch.manual_seed(0)
    d, s, lam = 8, 3.7, 4.0
    x_raw = torch.randn(32, d) * 5
    sae = make_sae(SAEConfig("relu", d, 24, l1_coeff=l1_from_e2e_paper(lam, d, s)))
    ours = sae.loss(x_raw / s).loss.item()
    # the same SAE on raw activations with unit-norm rows: latents s times larger, output s times
    f_raw = torch.relu(x_raw @ sae.W_enc + s * sae.b_enc)
    x_hat_raw = f_raw @ sae.W_dec + s * sae.b_dec
    paper = ((x_hat_raw - x_raw).pow(2).mean(-1) + lam / d * f_raw.abs().sum(-1)).mean().item()
    assert paper == pytest.approx(s * s / d * ours, rel=1e-5)
    assert l1_from_e2e_paper(lam, d, s, loss="e2e") == pytest.approx(lam * s)
    # SAELens, inputs normalised like ours: sum over d + l1_coefficient * sum |f| ||W_dec||
    c = 0.3
    sae2 = make_sae(SAEConfig("relu", d, 24, l1_coeff=l1_from_saelens(c, d)))
    xn = x_raw / s
    f = sae2.encode(xn)
    saelens = ((sae2.decode(f) - xn).pow(2).sum(-1) + c * (f * sae2.W_dec.norm(dim=-1)).sum(-1)).mean()
    assert sae2.loss(xn).loss.item() == pytest.approx(saelens.item(), rel=1e-5)


def test_l1_default_is_the_architectures():
    from sae_harvest.train.config import TrainConfig, sweep

    assert sweep(TrainConfig(out="o", arch="relu"), 64) == [("relu_l1-300", SAEConfig("relu", 64, 1024, l1_coeff=300.0))]
    assert sweep(TrainConfig(out="o", arch="gated"), 64)[0][1].l1_coeff == 3.0
    assert [n for n, _ in sweep(TrainConfig(out="o", arch="relu", l1=(1.0, 2.0)), 64)] == ["relu_l1-1", "relu_l1-2"]
