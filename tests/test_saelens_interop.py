"""Checkpoints in both directions with SAELens: ours load in SAELens (same encode/decode, attach
by the saved TransformerLens hook_name) and SAELens's load in ours (same encode/decode, and
`evaluate splice` scores them exactly as our own copy of the same weights). The reader is also
tested without sae-lens, on checkpoints written here in SAELens's documented v6 format."""
import json

import pytest
import torch
from safetensors.torch import save_file

from sae_harvest.train.registry import ARCH_NAMES, SAEConfig, make_sae
from sae_harvest.train.saelens_format import site_from_hook_name, tl_hook_name
from sae_harvest.train.sae_io import CheckpointError, load_sae, save_sae

D, F = 16, 40


def _ours(arch):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch, D, F, k=3, beta=2.0, l1_coeff=1.0))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if arch == "batchtopk":
        sae.threshold.copy_(torch.rand(F) * 0.3)
    return sae.eval()


def test_hook_name_mapping_both_ways():
    pairs = {"blocks.6.resid_pre": "blocks.6.hook_resid_pre", "blocks.0.resid_mid": "blocks.0.hook_resid_mid",
             "blocks.2.resid_post": "blocks.2.hook_resid_post", "blocks.1.attn_out": "blocks.1.hook_attn_out",
             "blocks.3.mlp_out": "blocks.3.hook_mlp_out", "blocks.4.attn_z": "blocks.4.attn.hook_z",
             "blocks.5.mlp_act": "blocks.5.mlp.hook_post"}
    for ours, tl in pairs.items():
        assert tl_hook_name(ours) == tl and site_from_hook_name(tl) == ours == site_from_hook_name(ours)
    assert site_from_hook_name("transformer.h.1") == "blocks.1.resid_post"
    assert site_from_hook_name("model.layers.3") == "blocks.3.resid_post"
    assert tl_hook_name("meta:/x") == "meta:/x"
    with pytest.raises(ValueError, match="neither"):
        site_from_hook_name("transformer.h.1.mlp.c_fc")


# ---- the reader, without sae-lens: checkpoints in SAELens v6's on-disk format, written by hand ----
def _write_saelens(path, arch, tensors, hook="blocks.1.hook_resid_pre", apply_b_dec=True, **extra):
    path.mkdir(parents=True)
    cfg = {"architecture": arch, "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": hook, "model_name": "gpt2"}, **extra}
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def _random(names):
    torch.manual_seed(1)
    shapes = {"W_enc": (D, F), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,), "threshold": (F,),
              "b_gate": (F,), "b_mag": (F,), "r_mag": (F,)}
    return {n: torch.randn(shapes[n]) * 0.3 for n in names}


def _reference(arch, t, x, apply_b_dec):
    """SAELens's encode (sae_lens/saes/*.py), written out here."""
    xin = x - t["b_dec"] if apply_b_dec else x
    if arch == "gated":
        gate = (xin @ t["W_enc"] + t["b_gate"]) > 0
        return gate * torch.relu(xin @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    pre = xin @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        return torch.relu(pre)
    if arch == "jumprelu":
        return torch.relu(pre) * (pre > t["threshold"])
    vals, idx = pre.topk(3, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


@pytest.mark.parametrize("arch,apply_b_dec", [("standard", True), ("standard", False), ("gated", True),
                                              ("gated", False), ("topk", True), ("topk", False),
                                              ("jumprelu", True), ("jumprelu", False)])
def test_reader_on_saelens_format_by_hand(tmp_path, arch, apply_b_dec):
    names = {"standard": ["W_enc", "b_enc", "W_dec", "b_dec"], "topk": ["W_enc", "b_enc", "W_dec", "b_dec"],
             "jumprelu": ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"],
             "gated": ["W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"]}[arch]
    t = _random(names)
    extra = {"k": 3} if arch == "topk" else {}
    path = _write_saelens(tmp_path / arch, arch, t, apply_b_dec=apply_b_dec, **extra)
    sae = load_sae(path)
    x = torch.randn(64, D)
    want = _reference(arch, t, x, apply_b_dec)
    assert (want > 0).any() and (want == 0).any()
    torch.testing.assert_close(sae.encode(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), want @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-5)


def test_reader_refuses_what_it_cannot_represent(tmp_path):
    t = _random(["W_enc", "b_enc", "W_dec", "b_dec"])
    bad = _write_saelens(tmp_path / "norm", "standard", t, normalize_activations="expected_average_only_in")
    with pytest.raises(CheckpointError, match="normalize_activations"):
        load_sae(bad)
    with pytest.raises(CheckpointError, match="not supported"):
        load_sae(_write_saelens(tmp_path / "mp", "matching_pursuit", t))
    with pytest.raises(CheckpointError, match="tensors"):
        load_sae(_write_saelens(tmp_path / "jr", "jumprelu", t))   # no threshold


# ---- with the real sae-lens ----------------------------------------------------------------------
def _sae_lens():
    try:
        import sae_lens
    except Exception as e:   # noqa: BLE001 - any import failure means "not usable here"
        pytest.skip(f"sae-lens is not installed ({type(e).__name__}); pip install sae-lens to run this test")
    return sae_lens


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_saelens_loads_our_checkpoints(tmp_path, arch):
    sl = _sae_lens()
    ours = _ours(arch)
    save_sae(ours, tmp_path / arch, extra_cfg={"hook_name": "blocks.1.resid_pre", "model_name": "tiny"})
    theirs = sl.SAE.load_from_disk(str(tmp_path / arch))
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    x = torch.randn(64, D)
    with torch.no_grad():
        f = ours.encode(x)   # gtopk without a gradient is plain TopK, as SAELens runs it
        assert (f > 0).any()
        torch.testing.assert_close(theirs.encode(x), f, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs.decode(f), ours.decode(f), rtol=1e-5, atol=1e-6)


def test_saelens_attaches_by_the_saved_hook_name(tmp_path):
    sl = _sae_lens()
    from transformer_lens import HookedTransformerConfig

    model = sl.HookedSAETransformer(HookedTransformerConfig(n_layers=2, d_model=D, n_ctx=8, d_head=4, n_heads=4,
                                                            d_mlp=32, d_vocab=50, act_fn="gelu"))
    ours = _ours("topk")
    save_sae(ours, tmp_path / "s", extra_cfg={"hook_name": "blocks.1.resid_pre"})
    theirs = sl.SAE.load_from_disk(str(tmp_path / "s"))
    model.add_sae(theirs)
    assert theirs.cfg.metadata.hook_name in model.acts_to_saes
    ids = torch.randint(0, 50, (2, 8))
    _, cache = model.run_with_cache(ids)
    x = cache["blocks.1.hook_resid_pre.hook_sae_input"]
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre.hook_sae_recons"], ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "gated", "topk", "jumprelu"])
def test_we_load_checkpoints_saelens_writes(tmp_path, arch):
    sl = _sae_lens()
    cls = {"standard": (sl.StandardSAE, sl.StandardSAEConfig), "gated": (sl.GatedSAE, sl.GatedSAEConfig),
           "topk": (sl.TopKSAE, sl.TopKSAEConfig), "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig)}[arch]
    kw = {"k": 3} if arch == "topk" else {}
    torch.manual_seed(2)
    theirs = cls[0](cls[1](d_in=D, d_sae=F, **kw))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if arch == "jumprelu":
            theirs.threshold.copy_(torch.rand(F) * 0.2)
    theirs.cfg.metadata.hook_name = "transformer.h.0"
    theirs.save_model(str(tmp_path / arch))
    ours = load_sae(tmp_path / arch)
    x = torch.randn(64, D)
    with torch.no_grad():
        f = theirs.encode(x)
        assert (f > 0).any()
        torch.testing.assert_close(ours.encode(x), f, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.decode(f), theirs.decode(f), rtol=1e-5, atol=1e-6)
