"""Gated SAE's gate on short runs: it starts at its soft threshold b_gate = -lambda/2, so lambda sets
the L0 from the first step (before, every lambda gave the same L0 after 78 steps, ~119 of 256)."""
import pytest
import torch

from sae_harvest.train.fit import fit
from sae_harvest.train.registry import SAEConfig, make_sae

from tests.test_jumprelu_threshold import normalised_rows
from tests.test_train_loop import _cfg


def test_gate_is_a_soft_threshold_at_half_lambda():
    """The gate's own terms (c - pi)^2 + lambda*pi are smallest at pi = c - lambda/2: by autograd on
    the SAE's real loss (the main MSE gives the gate no gradient), for a one-latent dictionary whose
    row explains x, the gradient w.r.t. b_gate is positive at 0 and vanishes at -lambda/2."""
    lam, c = 0.6, 1.7
    sae = make_sae(SAEConfig("gated", 2, 1, l1_coeff=lam))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0]]))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.zero_()
    sae.calibrate(torch.zeros(4, 2), None)
    assert sae.b_gate.item() == pytest.approx(-lam / 2)
    x = torch.tensor([[c, 0.0]])
    grad_at_start = torch.autograd.grad(sae.loss(x).loss, sae.b_gate)[0]
    assert abs(grad_at_start.item()) < 1e-5
    with torch.no_grad():
        sae.b_gate.fill_(0.0)
    assert torch.autograd.grad(sae.loss(x).loss, sae.b_gate)[0].item() == pytest.approx(lam, rel=1e-4)


def test_calibrate_leaves_a_loaded_gate_alone():
    sae = make_sae(SAEConfig("gated", 4, 8, l1_coeff=2.0))
    with torch.no_grad():
        sae.b_gate.copy_(torch.linspace(-1, 1, 8))     # as --init would have set it
    sae.calibrate(torch.randn(16, 4), None)
    torch.testing.assert_close(sae.b_gate.detach(), torch.linspace(-1, 1, 8))
    fresh = make_sae(SAEConfig("gated", 4, 8, l1_coeff=2.0))
    fresh.calibrate(torch.randn(16, 4), None)
    torch.testing.assert_close(fresh.b_gate.detach(), torch.full((8,), -1.0))


def test_lambda_sets_gated_l0_in_a_short_run(store, tmp_path):
    summary = fit(_cfg(store, tmp_path / "g", arch="gated", l1=(0.3, 1.0, 3.0), tokens=256 * 100), progress=False)
    l0 = [summary[f"gated_l1-{lam}"]["held_out"]["l0"] for lam in ("0.3", "1", "3")]
    assert l0[1] < 0.85 * l0[0] and l0[2] < 0.85 * l0[1], l0
