"""JumpReLU and Matryoshka BatchTopK against hand-computed losses and gradients, numpy references
and calculus (the straight-through estimators are kernel density estimates of true derivatives)."""

import numpy as np
import pytest
import torch

from sae_harvest.train.config import TrainConfig, sweep
from sae_harvest.train.matryoshka import prefix_sizes
from sae_harvest.train.registry import SAEConfig, make_sae


def set_params(sae, **values):
    with torch.no_grad():
        for name, v in values.items():
            getattr(sae, name).copy_(torch.as_tensor(v, dtype=getattr(sae, name).dtype))


# ---------------------------------------------------------------- JumpReLU
def hand_jumprelu(l0_penalty="step"):
    """pre = x (W_enc = I, b_enc = b_dec = 0); theta = [1, 0.5, 2]; eps = 0.2; W_dec = 0.5 I."""
    sae = make_sae(SAEConfig("jumprelu", d_in=3, d_sae=3, l1_coeff=0.5, bandwidth=0.2,
                             l0_penalty=l0_penalty)).double()
    set_params(sae, W_enc=torch.eye(3), b_enc=torch.zeros(3), b_dec=torch.zeros(3), W_dec=0.5 * torch.eye(3),
               log_threshold=torch.tensor([1.0, 0.5, 2.0]).log())
    # latent 0: 1.05 and 0.95 both inside its window (0.9, 1.1); latent 1: 0.55 inside (0.4, 0.6),
    # 0.3 outside; latent 2: 2.5 and 1.0 outside (1.9, 2.1)
    x = torch.tensor([[1.05, 0.3, 2.5], [0.95, 0.55, 1.0]], dtype=torch.float64)
    return sae, x


def test_jumprelu_hand_computed_loss_and_gradients():
    sae, x = hand_jumprelu()
    out = sae.loss(x)
    # f = [[1.05, 0, 2.5], [0, 0.55, 0]]; x_hat = f / 2
    # x_hat - x = [[-0.525, -0.3, -1.25], [-0.95, -0.275, -1.0]] -> ||.||^2 = 1.928125, 1.978125
    assert out.feats.tolist() == [[1.05, 0.0, 2.5], [0.0, 0.55, 0.0]]
    assert out.terms["mse"].item() == pytest.approx(1.953125)
    assert out.terms["sparsity"].item() == pytest.approx(0.5 * 1.5)   # lambda * mean L0
    assert out.terms["l0"].item() == pytest.approx(1.5)
    assert out.loss.item() == pytest.approx(2.703125)
    out.loss.backward()
    # dL/df = (x_hat - x) W_dec^T = [[-0.2625, -0.15, -0.625], [-0.475, -0.1375, -0.5]]
    # reconstruction, JumpReLU STE: dL/dtheta_i = -(theta_i/eps) sum_{n in window} dL/df_ni
    #   latent 0: -5 * (-0.2625 - 0.475) = 3.6875; latent 1: -2.5 * -0.1375 = 0.34375; latent 2: 0
    # L0, step STE: d/dtheta_i lambda mean_n H = -lambda/(n eps) * #in window = [-2.5, -1.25, 0]
    # dL/dlog theta = theta * dL/dtheta
    dtheta = torch.tensor([3.6875 - 2.5, 0.34375 - 1.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(sae.log_threshold.grad, dtheta * torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))
    # z gets H(z - theta) * dL/df from the reconstruction only (none through H of the L0 term)
    dz = torch.tensor([[-0.2625, 0.0, -0.625], [0.0, -0.1375, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(sae.b_enc.grad, dz.sum(0))
    torch.testing.assert_close(sae.W_enc.grad, x.T @ dz)


def test_jumprelu_l0_term_moves_only_the_threshold():
    sae, x = hand_jumprelu()
    sae.l0_penalty(sae.pre_acts(x), sae.encode(x)).backward()
    assert all(g is None or g.abs().max() == 0 for g in (sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad))
    torch.testing.assert_close(sae.log_threshold.grad, torch.tensor([-2.5, -0.625, 0.0], dtype=torch.float64))


def test_jumprelu_tanh_penalty_hand_computed():
    sae, x = hand_jumprelu("tanh")
    out = sae.loss(x)
    c, lam = 4.0, 0.5
    f = np.array([[1.05, 0, 2.5], [0, 0.55, 0]])
    count = np.tanh(c * f * 0.5).sum(1)   # ||W_dec rows|| = 0.5
    assert out.terms["sparsity"].item() == pytest.approx(lam * count.mean())
    out.loss.backward()
    # dL/df adds lambda/n * c * 0.5 * (1 - tanh^2) to the reconstruction's (x_hat - x) W_dec^T
    dldf = np.array([[-0.2625, -0.15, -0.625], [-0.475, -0.1375, -0.5]])
    dldf = dldf + lam / 2 * c * 0.5 * (1 - np.tanh(c * f * 0.5) ** 2)
    theta, eps, z = np.array([1.0, 0.5, 2.0]), 0.2, x.numpy()
    window = np.abs((z - theta) / eps) < 0.5
    dtheta = (-(theta / eps) * window * dldf).sum(0)
    np.testing.assert_allclose(sae.log_threshold.grad.numpy(), dtheta * theta)


def test_jumprelu_matches_numpy_on_random_data():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig("jumprelu", d_in=5, d_sae=16, l1_coeff=0.3, bandwidth=0.3)).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        sae.log_threshold.copy_(torch.rand(16).double() * 0.5 + 0.2)
    x = torch.randn(40, 5, dtype=torch.float64)
    p = {n: t.detach().numpy().copy() for n, t in sae.named_parameters()}
    xn, theta, eps, lam = x.numpy(), np.exp(p["log_threshold"]), 0.3, 0.3
    z = (xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = z * (z > theta)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    loss = ((x_hat - xn) ** 2).sum(1).mean() + lam * (z > theta).sum(1).mean()
    dldf = 2 / len(xn) * (x_hat - xn) @ p["W_dec"].T
    K = np.abs((z - theta) / eps) < 0.5
    assert 0 < K.sum() < K.size   # some pre-activations fall inside the kernel windows
    dtheta = (-(theta / eps) * K * dldf).sum(0) + (-(1 / eps) * K * lam / len(xn)).sum(0)
    out = sae.loss(x)
    np.testing.assert_allclose(out.feats.detach().numpy(), f)
    assert out.loss.item() == pytest.approx(loss)
    out.loss.backward()
    np.testing.assert_allclose(sae.log_threshold.grad.numpy(), dtheta * theta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sae.W_dec.grad.numpy(), f.T @ (2 / len(xn) * (x_hat - xn)), atol=1e-12)


@pytest.mark.parametrize("which", ["jumprelu", "step"])
def test_straight_through_estimators_estimate_the_true_derivatives(which):
    """z ~ U(0, 2): E[H(z - theta)] = (2 - theta)/2 has derivative -1/2 and E[z H(z - theta)] =
    (4 - theta^2)/4 has -theta/2; the kernel estimators must agree (they are density estimates)."""
    torch.manual_seed(0)
    theta, eps, n = 0.8, 0.05, 400_000
    sae = make_sae(SAEConfig("jumprelu", d_in=1, d_sae=1, l1_coeff=1.0, bandwidth=eps, threshold_init=theta))
    set_params(sae, W_enc=[[1.0]], b_enc=[0.0], b_dec=[0.0])
    z = torch.rand(n, 1) * 2
    if which == "step":
        sae.l0_penalty(sae.pre_acts(z), None).backward()   # lambda = 1: mean_n H(z - theta)
        expected = -0.5
    else:
        sae.encode(z).mean().backward()
        expected = -theta / 2
    grad_theta = sae.log_threshold.grad.item() / theta
    assert grad_theta == pytest.approx(expected, rel=0.03)


def test_jumprelu_e2e_penalty_equals_the_local_one():
    """e2e adds sparsity_penalty(feats, x); it must be the loss's L0 term with the same threshold gradient."""
    sae, x = hand_jumprelu()
    out = sae.loss(x)
    (out.loss - out.x_hat.sub(x).pow(2).sum(-1).mean()).backward()   # the L0 term alone
    local = sae.log_threshold.grad.clone()
    sae.zero_grad()
    pen = sae.sparsity_penalty(sae.encode(x), x)
    assert pen.item() == pytest.approx(out.terms["sparsity"].item())
    pen.backward()
    torch.testing.assert_close(sae.log_threshold.grad, local)
    assert sae.W_enc.grad is None or sae.W_enc.grad.abs().max() == 0


def test_jumprelu_config_and_sweep():
    cfg = SAEConfig("jumprelu", 4, 8)
    assert (cfg.bandwidth, cfg.threshold_init, cfg.l0_penalty) == (0.05, 0.01, "step")
    torch.testing.assert_close(make_sae(cfg).threshold, torch.full((8,), 0.01))
    for bad in (dict(bandwidth=0.0), dict(threshold_init=-1.0), dict(l0_penalty="quadratic")):
        with pytest.raises(ValueError):
            SAEConfig("jumprelu", 4, 8, **bad)
    runs = sweep(TrainConfig(out="x", arch="jumprelu", l1=(0.1, 1.0), bandwidth=0.01, l0_penalty="tanh"), d_in=4)
    assert [name for name, _ in runs] == ["jumprelu_l1-0.1", "jumprelu_l1-1"]
    assert [(c.l1_coeff, c.bandwidth, c.threshold_init, c.l0_penalty) for _, c in runs] == \
        [(0.1, 0.01, 0.01, "tanh"), (1.0, 0.01, 0.01, "tanh")]


# ---------------------------------------------------------------- Matryoshka BatchTopK
def test_matryoshka_hand_computed_loss():
    sae = make_sae(SAEConfig("matryoshka_batchtopk", d_in=2, d_sae=3, k=1, prefixes=(1, 2), aux_coeff=0.5)).double()
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    set_params(sae, W_dec=W_dec, W_enc=W_dec.T, b_enc=torch.zeros(3), b_dec=torch.zeros(2))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # pre = [[2, 0, 1.2], [0, 1, 0.8]]; BatchTopK keeps the n*k = 2 largest of the batch: 2 and 1.2
    out = sae.loss(x)
    assert out.feats.tolist() == [[2.0, 0.0, 1.2], [0.0, 0.0, 0.0]]
    # prefix {0}: x_hat = [[2, 0], [0, 0]] -> errors 0, 1 -> 0.5; prefix {0,1}: the same -> 0.5
    # full: x_hat_0 = [2, 0] + 1.2 [0.6, 0.8] = [2.72, 0.96] -> 0.72^2 + 0.96^2 = 1.44; token 1: 1 -> 1.22
    assert out.terms["mse"].item() == pytest.approx(1.22)
    assert out.terms["prefix_mse"].item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(2.22)   # no dead latents: no AuxK
    torch.testing.assert_close(out.x_hat, torch.tensor([[2.72, 0.96], [0.0, 0.0]], dtype=torch.float64))


def test_matryoshka_matches_numpy_loss_and_decoder_gradient():
    torch.manual_seed(1)
    sae = make_sae(SAEConfig("matryoshka_batchtopk", d_in=6, d_sae=20, k=3, aux_k=4, aux_coeff=0.25,
                             prefixes=(2, 5, 11))).double()
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name.startswith("b_") else 1.0))
        sae.set_decoder_norm_to_unit_norm()
    x = torch.randn(12, 6, dtype=torch.float64)
    dead = torch.arange(20) % 4 == 1
    p = {n: t.detach().numpy().copy() for n, t in sae.named_parameters()}
    xn, n = x.numpy(), len(x)
    pre = np.maximum((xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0)
    keep = np.zeros(pre.size, bool)
    keep[np.argsort(-pre.ravel())[:n * 3]] = True
    f = pre * keep.reshape(pre.shape)
    sizes = (2, 5, 11, 20)
    mses, grad_W_dec = [], np.zeros_like(p["W_dec"])
    for m in sizes:
        x_hat = f[:, :m] @ p["W_dec"][:m] + p["b_dec"]
        mses.append(((x_hat - xn) ** 2).sum(1).mean())
        grad_W_dec[:m] += f[:, :m].T @ (2 / n * (x_hat - xn))   # every prefix containing row i pulls on it
    out = sae.loss(x, dead_mask=dead)
    np.testing.assert_allclose(out.feats.detach().numpy(), f)
    assert out.terms["mse"].item() == pytest.approx(mses[-1])
    assert out.terms["prefix_mse"].item() == pytest.approx(sum(mses[:-1]))
    assert out.terms["auxk"].item() > 0
    assert out.loss.item() == pytest.approx(sum(mses) + out.terms["auxk"].item())
    out.loss.backward()
    # AuxK reaches only the dead rows; the live rows' gradient is the sum over prefixes alone
    live = ~dead.numpy()
    np.testing.assert_allclose(sae.W_dec.grad.numpy()[live], grad_W_dec[live], atol=1e-12)


def test_matryoshka_prefix_sizes_and_validation():
    assert prefix_sizes(1024) == (64, 128, 256, 512, 1024)
    assert prefix_sizes(20) == (1, 2, 5, 10, 20)
    assert prefix_sizes(64, (8, 16)) == (8, 16, 64)
    assert prefix_sizes(64, (8, 64)) == (8, 64)
    assert make_sae(SAEConfig("matryoshka_batchtopk", 4, 48, k=2)).prefix_sizes == (3, 6, 12, 24, 48)
    for bad in ((8, 4), (0, 8), (8, 100), (8, 8)):
        with pytest.raises(ValueError):
            SAEConfig("matryoshka_batchtopk", 4, 64, k=2, prefixes=bad)
    cfg = SAEConfig("matryoshka_batchtopk", 4, 64, k=2, prefixes=[8, 16])   # as JSON reads it
    assert cfg.prefixes == (8, 16) and SAEConfig.from_dict(cfg.to_dict()) == cfg
    (_, swept), = sweep(TrainConfig(out="x", arch="matryoshka_batchtopk", k=(4,), prefixes=(16, 32)), d_in=8)
    assert swept.prefixes == (16, 32) and swept.k == 4


def test_matryoshka_inference_is_batchtopk_threshold():
    sae = make_sae(SAEConfig("matryoshka_batchtopk", d_in=8, d_sae=32, k=3, threshold_ema=0.5))
    x = torch.randn(64, 8)
    out = sae.loss(x)
    assert (out.feats > 0).sum().item() == 64 * 3
    torch.testing.assert_close(sae.threshold, out.feats[out.feats > 0].min().expand(32))
    sae.eval()
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), pre * (pre > sae.threshold))


def test_matryoshka_first_prefix_reconstructs_alone():
    """The point of the nesting: trained alike, Matryoshka's first d_sae/4 latents reconstruct the
    data far better on their own than BatchTopK's first d_sae/4 do."""
    torch.manual_seed(0)
    d_in, n_feat = 16, 32
    D = torch.nn.functional.normalize(torch.randn(n_feat, d_in), dim=-1)
    sample = lambda n: ((torch.rand(n, n_feat) < 3 / n_feat) * (torch.rand(n, n_feat) + 0.5)) @ D
    fvu = {}
    for arch in ("batchtopk", "matryoshka_batchtopk"):
        torch.manual_seed(1)
        sae = make_sae(SAEConfig(arch, d_in=d_in, d_sae=64, k=3, prefixes=(16,) if arch != "batchtopk" else ()))
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        for _ in range(250):
            out = sae.loss(sample(256))
            opt.zero_grad()
            out.loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            x = sample(2048)
            f = sae.batch_topk(sae.pre_acts(x))
            x_hat = f[:, :16] @ sae.W_dec[:16] + sae.b_dec
            fvu[arch] = ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu["matryoshka_batchtopk"] < 0.6 * fvu["batchtopk"], fvu
