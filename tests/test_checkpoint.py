"""save_sae / load_sae: round trip per architecture, SAELens-style cfg.json, one-line errors."""
import json

import pytest
import torch
from safetensors import safe_open

from sae_harvest import train
from sae_harvest.train.saelens_format import tl_hook_name
from sae_harvest.train.sae_io import CFG_NAME, WEIGHTS_NAME, CheckpointError, load_sae, save_sae
from sae_harvest.train.registry import ARCH_NAMES, SAEConfig, make_sae

EXTRA = {"hook_name": "blocks.6.resid_pre", "model_name": "gpt2", "train": {"lr": 3e-4}}
SAELENS_ARCH = {"relu": "standard", "gated": "gated", "topk": "topk", "batchtopk": "jumprelu", "gtopk": "topk",
                "jumprelu": "jumprelu", "matryoshka_batchtopk": "jumprelu"}


def trained_like(arch, d_in=8, d_sae=24):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch, d_in, d_sae, k=3, beta=2.0, l1_coeff=1.0))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        sae.threshold.fill_(0.05)
    return sae.eval()


@pytest.mark.parametrize("arch", ARCH_NAMES)   # the registry's list: a new architecture is never skipped
def test_round_trip(tmp_path, arch):
    assert arch in SAELENS_ARCH, f"{arch}: write here the SAELens architecture its cfg.json must name"
    sae = trained_like(arch)
    save_sae(sae, tmp_path / "ck", extra_cfg=EXTRA)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [CFG_NAME, WEIGHTS_NAME]  # no temp files
    loaded = train.load_sae(tmp_path / "ck")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg and not loaded.training
    x, g = torch.randn(16, 8), torch.randn(16, 8)
    assert (sae.encode(x, g) > 0).any()
    torch.testing.assert_close(loaded.encode(x, g), sae.encode(x, g), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x, g), sae(x, g), rtol=0, atol=0)
    # loading via the weights file path works too
    torch.testing.assert_close(load_sae(tmp_path / "ck" / WEIGHTS_NAME)(x), sae(x), rtol=0, atol=0)

    cfg = json.loads((tmp_path / "ck" / CFG_NAME).read_text())
    assert cfg["architecture"] == SAELENS_ARCH[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (8, 24, "float32")
    assert cfg["apply_b_dec_to_input"] is (arch != "relu")
    assert cfg["hook_name"] == tl_hook_name(EXTRA["hook_name"]) == "blocks.6.hook_resid_pre"
    assert cfg["sae_harvest"]["hook_name"] == EXTRA["hook_name"]
    assert cfg["sae_harvest"]["sae"] == sae.cfg.to_dict()
    assert cfg["sae_harvest"]["train"] == {"lr": 3e-4}
    if arch in ("topk", "gtopk"):
        assert cfg["k"] == 3
    if arch == "gtopk":
        assert "topk without gradients" in cfg["inference"]

    with safe_open(str(tmp_path / "ck" / WEIGHTS_NAME), "pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    assert shapes["W_enc"] == (8, 24) and shapes["W_dec"] == (24, 8) and shapes["b_dec"] == (8,)
    if arch == "gated":
        assert {"b_gate", "b_mag", "r_mag"} <= set(shapes) and "b_enc" not in shapes
    else:
        assert shapes["b_enc"] == (24,)
    if SAELENS_ARCH[arch] == "jumprelu":   # SAELens's JumpReLU: theta itself, not our log theta
        assert shapes["threshold"] == (24,) and "log_threshold" not in shapes
        with safe_open(str(tmp_path / "ck" / WEIGHTS_NAME), "pt") as f:
            torch.testing.assert_close(f.get_tensor("threshold"), sae.threshold.detach(), rtol=0, atol=0)
    if arch == "matryoshka_batchtopk":
        assert cfg["matryoshka_widths"] == [1, 3, 6, 12, 24]


def test_bfloat16_round_trip(tmp_path):
    sae = trained_like("topk").to(torch.bfloat16)
    save_sae(sae, tmp_path, extra_cfg={"hook_name": "h"})
    loaded = load_sae(tmp_path)
    assert loaded.W_dec.dtype == torch.bfloat16
    assert json.loads((tmp_path / CFG_NAME).read_text())["dtype"] == "bfloat16"
    for name, t in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t)


def test_overwrite_is_atomic_and_never_pickles(tmp_path, monkeypatch):
    save_sae(trained_like("relu"), tmp_path, extra_cfg=EXTRA)
    sae2 = trained_like("gated")
    save_sae(sae2, tmp_path, extra_cfg=EXTRA)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
    assert type(load_sae(tmp_path)) is type(sae2)
    # an unserialisable extra_cfg fails before any file is replaced
    with pytest.raises(TypeError):
        save_sae(trained_like("topk"), tmp_path, extra_cfg={"hook_name": object()})
    assert type(load_sae(tmp_path)) is type(sae2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CFG_NAME, WEIGHTS_NAME]


def assert_one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 400, msg


@pytest.mark.parametrize("keep", [0, 7, 100, -10])
def test_truncated_weights_raise_checkpoint_error(tmp_path, keep):
    save_sae(trained_like("topk"), tmp_path, extra_cfg=EXTRA)
    w = tmp_path / WEIGHTS_NAME
    data = w.read_bytes()
    w.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError) as e:
        load_sae(tmp_path)
    assert isinstance(e.value, ValueError)
    assert_one_line(e)


def test_width_mismatch_raises_checkpoint_error(tmp_path):
    save_sae(trained_like("topk", d_sae=24), tmp_path, extra_cfg=EXTRA)
    cfg_path = tmp_path / CFG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg["d_sae"] = 32
    cfg["sae_harvest"]["sae"]["d_sae"] = 32
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="W_enc") as e:
        load_sae(tmp_path)
    assert_one_line(e)


def test_inconsistent_or_corrupt_cfg_raises(tmp_path):
    save_sae(trained_like("relu"), tmp_path, extra_cfg=EXTRA)
    cfg_path = tmp_path / CFG_NAME
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**good, "d_in": 9}))
    with pytest.raises(CheckpointError, match="disagree"):
        load_sae(tmp_path)
    cfg_path.write_text(json.dumps(good)[:-20])
    with pytest.raises(CheckpointError) as e:
        load_sae(tmp_path)
    assert_one_line(e)
    # weights of another architecture under this cfg
    cfg_path.write_text(json.dumps(good))
    save_sae(trained_like("gated"), tmp_path / "g", extra_cfg=EXTRA)
    (tmp_path / WEIGHTS_NAME).write_bytes((tmp_path / "g" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="do not match"):
        load_sae(tmp_path)
    with pytest.raises(CheckpointError):
        load_sae(tmp_path / "missing")


def test_demo_trains_every_registered_architecture(monkeypatch):
    """The demo's sweeps come from the registry: a newly registered architecture gets a sweep of
    its sweep field even without a tuned row."""
    from sae_harvest.evaluate import demo
    from sae_harvest.train import registry
    from sae_harvest.train.topk import TopKSAE

    # every registered architecture as a local SAE sweep (e2e and the transcoder are extra rows)
    assert [arch for _, arch, extra in demo.SWEEPS if "loss" not in extra and "target" not in extra] == list(ARCH_NAMES)

    class NewSAE(TopKSAE):
        arch = "new_topk"

    monkeypatch.setitem(registry.ARCHITECTURES, "new_topk", NewSAE)
    assert ("new_topk", "new_topk", {"k": (8, 16, 32)}) in demo.registry_sweeps()
