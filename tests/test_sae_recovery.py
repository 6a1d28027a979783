"""Every architecture recovers a planted dictionary from toy superposition data.

64 random unit directions in R^32 (2x overcomplete, so they interfere); each sample switches each
feature on with p = 4/64 (~4 active) at magnitude U(0.5, 1.5). A 128-latent SAE trained briefly with
Adam (unit-norm decoder, parallel gradient removed) must find every direction: mean over planted
directions of the max cosine to a learned decoder row > 0.9. A random decoder scores ~0.5.
"""
import pytest
import torch

from sae_harvest.train.registry import ARCH_NAMES, ARCHITECTURES, SAEConfig, make_sae

D_IN, N_FEAT, D_SAE, STEPS, BATCH = 32, 64, 128, 1200, 256

# Tuned per architecture; one registered without a row here is still tested, with DEFAULT below.
CONFIGS = {
    "relu": SAEConfig("relu", D_IN, D_SAE, l1_coeff=20.0),
    "gated": SAEConfig("gated", D_IN, D_SAE, l1_coeff=1.0),
    "topk": SAEConfig("topk", D_IN, D_SAE, k=4),
    "batchtopk": SAEConfig("batchtopk", D_IN, D_SAE, k=4),
    "gtopk": SAEConfig("gtopk", D_IN, D_SAE, k=4, beta=10.0),
    # this toy's inputs are not normalised (E||x|| ~ 2, not sqrt(32)): theta starts nearer its scale
    "jumprelu": SAEConfig("jumprelu", D_IN, D_SAE, l1_coeff=0.1, threshold_init=0.1),
    # the planted features are flat (no hierarchy), so the one inner prefix holds as many as there are
    "matryoshka_batchtopk": SAEConfig("matryoshka_batchtopk", D_IN, D_SAE, k=4, prefixes=(N_FEAT,)),
}
DEFAULT = {"k": dict(k=4), "l1_coeff": dict(l1_coeff=1.0)}   # by the architecture's sweep field


def config(arch: str) -> SAEConfig:
    return CONFIGS.get(arch) or SAEConfig(arch, D_IN, D_SAE, **DEFAULT[ARCHITECTURES[arch].sweep_field])


class Toy:
    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.gen = g
        self.D = torch.nn.functional.normalize(torch.randn(N_FEAT, D_IN, generator=g), dim=-1)
        self.importance = torch.rand(N_FEAT, generator=g)

    def batch(self, n):
        on = (torch.rand(n, N_FEAT, generator=self.gen) < 4 / N_FEAT).float()
        x = (on * (torch.rand(n, N_FEAT, generator=self.gen) + 0.5)) @ self.D
        # a stand-in loss gradient: points along the active features, weighted by their importance
        grad = 0.1 * (on * self.importance) @ self.D + 0.01 * torch.randn(n, D_IN, generator=self.gen)
        return x, grad


def mean_max_cos(D_true, W_dec):
    W = torch.nn.functional.normalize(W_dec.detach(), dim=-1)
    return (D_true @ W.T).max(dim=1).values.mean().item()


def train(sae, toy):
    sae.init_b_dec(toy.batch(2048)[0])
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    for _ in range(STEPS):
        x, grad = toy.batch(BATCH)
        out = sae.loss(x, grad=grad, dead_mask=since_fired > 50)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        since_fired = torch.where((out.feats > 0).any(0), 0, since_fired + 1)
    return sae.eval()


@pytest.mark.parametrize("arch", ARCH_NAMES)   # the registry's list: a new architecture is never skipped
def test_recovers_planted_dictionary(arch):
    toy = Toy(seed=0)
    torch.manual_seed(1)
    sae = make_sae(config(arch))
    before = mean_max_cos(toy.D, sae.W_dec)
    train(sae, toy)
    score = mean_max_cos(toy.D, sae.W_dec)
    assert before < 0.7
    assert score > 0.9, f"{arch}: mean max cosine {score:.3f}"
    x, _ = toy.batch(2048)
    with torch.no_grad():
        f = sae.encode(x)
        fvu = ((sae.decode(f) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    l0 = (f > 0).float().sum(-1).mean().item()
    assert fvu < 0.3 and l0 < 12, (fvu, l0)   # sparse codes that actually reconstruct
