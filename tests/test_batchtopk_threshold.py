"""BatchTopK's inference threshold: estimated from >= 1e5 training rows (or all there are) at the
end of training, the same whatever the training batch size, for the local and the e2e trainer."""
import pytest
import torch

from sae_harvest.train.batchtopk import THRESHOLD_ROWS
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_io import load_sae
from tests.test_train_loop import make_store


def test_estimate_is_the_global_cutoff_whatever_the_chunking():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig("batchtopk", d_in=16, d_sae=64, k=5))
    with torch.no_grad():
        sae.b_enc.fill_(-0.2)
    x = torch.randn(6000, 16)
    pre = sae.pre_acts(x).flatten()
    want = pre.topk(6000 * 5).values.min()          # the (N*k)-th largest pre-activation, by hand
    for chunk in (100, 1000, 6000):
        assert sae.estimate_threshold(x.split(chunk)) == 6000
        torch.testing.assert_close(sae.threshold, want.expand(64))
    sae.eval()
    assert (sae.encode(x) > 0).sum().item() == pytest.approx(6000 * 5, abs=2)   # L0 == k on these rows
    assert THRESHOLD_ROWS >= 100_000


def test_estimate_refuses_a_chunk_that_breaks_its_candidate_budget():
    sae = make_sae(SAEConfig("batchtopk", d_in=4, d_sae=64, k=1))
    x = torch.randn(400, 4) * 0.01
    x[:10] *= 1000          # ten rows hold almost every large activation
    with pytest.raises(RuntimeError, match="share"):
        sae.estimate_threshold(x.split(10))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("thr") / "s.zarr"
    make_store(path, n_seqs=64, ctx=512, window_seqs=16, grads=False)   # 32768 rows, 31,7k without pos 0
    return path


@pytest.mark.parametrize("batch_size", [1024, 4096, 16384])
def test_inference_l0_within_10_percent_of_k_for_any_batch_size(store, tmp_path, batch_size):
    k = 6
    cfg = TrainConfig(store=str(store), out=str(tmp_path / "o"), site="blocks.0.resid_pre", arch="batchtopk",
                      k=(k,), d_sae=64, batch_size=batch_size, tokens=65536, device="cpu",
                      checkpoint_every=10**9, log_every=1000)
    summary = fit(cfg, progress=False)[f"batchtopk_k{k}"]
    l0 = summary["held_out"]["l0"]      # JumpReLU with the saved threshold, on rows never trained on
    assert abs(l0 - k) <= 0.1 * k, (batch_size, l0)
    sae = load_sae(tmp_path / "o" / f"batchtopk_k{k}")
    assert (sae.threshold > 0).all()
