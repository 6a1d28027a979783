"""Site definitions, capture, gradients and splicing, checked against independent references
(HF hidden states, the modules' own projections, autograd through a spliced zero delta)."""

import pytest
import torch
import torch.nn.functional as F

from sae_harvest.harvest.errors import HarvestError
from sae_harvest.harvest.models import SUPPORTED_FAMILIES, get_adapter, load_model
from sae_harvest.harvest.sites import KINDS, Site, capture, parse_sites, record, splice
from tests.tiny_models import make_tiny_model

FAMILIES = ["gpt2", "gemma", "gemma2", "gemma3", "gemma3_mm"]
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls gain nothing from threads, and on a busy 2-core box intra-op threads
    # oversubscribe (100x slower measured); restored afterwards for the other test modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path = make_tiny_model(request.param, tmp_path_factory.getbasetemp() / f"tiny-{request.param}")
    model, _ = load_model(path)
    # 24 tokens > the Gemma 2/3 sliding window (8), so local attention is exercised.
    ids = torch.randint(1, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    return request.param, model, ids


def all_sites(n_layers):
    return [Site(layer, kind) for layer in range(n_layers) for kind in KINDS]


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def test_resid_matches_hf_hidden_states(tiny):
    _, model, ids = tiny
    adapter = get_adapter(model)
    n = adapter.n_layers
    acts = capture(model, ids, all_sites(n)).acts
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == n + 1
    for layer in range(n):
        close(acts[f"blocks.{layer}.resid_pre"], hidden[layer])
    for layer in range(n - 1):
        close(acts[f"blocks.{layer}.resid_post"], hidden[layer + 1])
    # transformers 5 replaces the last hidden state with the final-normed one.
    with torch.no_grad():
        close(adapter.final_norm(acts[f"blocks.{n - 1}.resid_post"]), hidden[n])


def test_residual_decomposition_and_widths(tiny):
    _, model, ids = tiny
    adapter = get_adapter(model)
    acts = capture(model, ids, all_sites(adapter.n_layers)).acts
    for layer in range(adapter.n_layers):
        a = {kind: acts[f"blocks.{layer}.{kind}"] for kind in KINDS}
        close(a["resid_pre"] + a["attn_out"], a["resid_mid"])
        close(a["resid_pre"] + a["attn_out"] + a["mlp_out"], a["resid_post"])
        for kind in KINDS:
            assert a[kind].shape == (*ids.shape, adapter.site_width(kind)), kind


def _reference_modules(family, block):
    """Written out per family here, independently of harvest/models.py."""
    if family == "gpt2":
        attn_proj = block.attn.c_proj
        mlp_proj = block.mlp.c_proj
        post_attn = post_mlp = torch.nn.Identity()
        pre_mlp = block.ln_2

        def act(x):
            return F.gelu(block.mlp.c_fc(x), approximate="tanh")
        return attn_proj, post_attn, mlp_proj, post_mlp, pre_mlp, act
    attn_proj, mlp_proj, mlp = block.self_attn.o_proj, block.mlp.down_proj, block.mlp

    def act(x):
        return F.gelu(mlp.gate_proj(x), approximate="tanh") * mlp.up_proj(x)
    if family == "gemma":  # Gemma 1: no post-norms; post_attention_layernorm is the pre-MLP norm
        ident = torch.nn.Identity()
        return attn_proj, ident, mlp_proj, ident, block.post_attention_layernorm, act
    return (attn_proj, block.post_attention_layernorm, mlp_proj, block.post_feedforward_layernorm,
            block.pre_feedforward_layernorm, act)


def test_attn_z_and_mlp_act_through_projections(tiny):
    family, model, ids = tiny
    adapter = get_adapter(model)
    acts = capture(model, ids, all_sites(adapter.n_layers)).acts
    with torch.no_grad():
        for layer, block in enumerate(adapter.layers):
            a = {kind: acts[f"blocks.{layer}.{kind}"] for kind in KINDS}
            attn_proj, post_attn, mlp_proj, post_mlp, pre_mlp, act = _reference_modules(family, block)
            close(post_attn(attn_proj(a["attn_z"])), a["attn_out"])
            close(post_mlp(mlp_proj(a["mlp_act"])), a["mlp_out"])
            close(act(pre_mlp(a["resid_mid"])), a["mlp_act"], atol=1e-4)


def _norm_and_module_inputs(family, block):
    """(attention module, its pre-norm, MLP module, its pre-norm), written out per family here,
    independently of harvest/models.py's table."""
    if family == "gpt2":
        return block.attn, block.ln_1, block.mlp, block.ln_2
    if family == "gemma":   # Gemma 1's post_attention_layernorm is its pre-MLP norm
        return block.self_attn, block.input_layernorm, block.mlp, block.post_attention_layernorm
    return block.self_attn, block.input_layernorm, block.mlp, block.pre_feedforward_layernorm


def test_attn_in_and_mlp_in_are_the_modules_own_inputs(tiny):
    family, model, ids = tiny
    adapter = get_adapter(model)
    seen, handles = {}, []

    def keep(name):
        def pre_hook(_mod, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return pre_hook
    for layer, block in enumerate(adapter.layers):
        attn, _, mlp, _ = _norm_and_module_inputs(family, block)
        handles.append(attn.register_forward_pre_hook(keep(f"blocks.{layer}.attn_in"), with_kwargs=True))
        handles.append(mlp.register_forward_pre_hook(keep(f"blocks.{layer}.mlp_in"), with_kwargs=True))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    acts = capture(model, ids, all_sites(adapter.n_layers)).acts
    with torch.no_grad():
        for layer, block in enumerate(adapter.layers):
            for kind in ("attn_in", "mlp_in"):
                name = f"blocks.{layer}.{kind}"
                assert torch.equal(acts[name], seen[name]), name
                assert acts[name].shape == (*ids.shape, adapter.d_model)
            # and they are the pre-norms of the residual stream
            _, attn_norm, _, mlp_norm = _norm_and_module_inputs(family, block)
            close(attn_norm(acts[f"blocks.{layer}.resid_pre"]), acts[f"blocks.{layer}.attn_in"])
            close(mlp_norm(acts[f"blocks.{layer}.resid_mid"]), acts[f"blocks.{layer}.mlp_in"])


def test_splicing_mlp_in_changes_only_the_mlp(tiny):
    """Replacing mlp_in by zeros leaves resid_mid and attn_in alone and turns mlp_out into the MLP
    of a zero input; splicing attn_in moves attn_out."""
    family, model, ids = tiny
    _, _, mlp, _ = _norm_and_module_inputs(family, get_adapter(model).layers[1])
    watch = [Site(1, "attn_in"), Site(1, "resid_mid"), Site(1, "mlp_in"), Site(1, "mlp_out"), Site(1, "attn_out")]
    with torch.no_grad():
        with record(model, watch) as clean:
            model(ids)
        clean = dict(clean)
        with splice(model, "blocks.1.mlp_in", torch.zeros_like), record(model, watch) as out:
            model(ids)
        assert torch.equal(out["blocks.1.resid_mid"], clean["blocks.1.resid_mid"])
        assert torch.equal(out["blocks.1.mlp_in"], torch.zeros_like(clean["blocks.1.mlp_in"]))
        zero_mlp = mlp(torch.zeros_like(clean["blocks.1.mlp_in"]))
        if family in ("gemma2", "gemma3", "gemma3_mm"):
            zero_mlp = get_adapter(model).layers[1].post_feedforward_layernorm(zero_mlp)
        close(out["blocks.1.mlp_out"], zero_mlp)
        with splice(model, "blocks.1.attn_in", lambda a: 2 * a), record(model, watch) as out:
            model(ids)
        assert not torch.allclose(out["blocks.1.attn_out"], clean["blocks.1.attn_out"])


def _reference_grad(model, ids, site, width):
    """d(summed next-token CE)/d act via a zero delta spliced in at the site."""
    delta = torch.zeros(*ids.shape, width, requires_grad=True)
    with splice(model, site, lambda a: a + delta):
        logits = model(ids).logits.float()
    vocab = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1),
                           reduction="sum")
    return torch.autograd.grad(loss, delta)[0], loss.detach()


def test_grads_match_autograd_reference(tiny):
    _, model, ids = tiny
    adapter = get_adapter(model)
    sites = all_sites(adapter.n_layers)
    got = capture(model, ids, sites, grads=True)
    for site in sites:
        ref, ref_loss = _reference_grad(model, ids, site, adapter.site_width(site.kind))
        g = got.grads[site.name]
        assert g.abs().max() > 0, site.name
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
        # The last position predicts nothing inside the sequence: no loss depends on it.
        assert torch.all(g[:, -1] == 0), site.name
    torch.testing.assert_close(got.loss_sum, ref_loss, rtol=1e-5, atol=1e-4)
    # Capturing grads must not disturb the forward pass.
    close(got.acts["blocks.1.resid_post"], capture(model, ids, [Site(1, "resid_post")]).acts[
        "blocks.1.resid_post"])


def test_grads_are_per_sequence(tiny):
    _, model, ids = tiny
    site = [Site(1, "resid_mid")]
    both = capture(model, ids, site, grads=True).grads["blocks.1.resid_mid"]
    first = capture(model, ids[:1], site, grads=True).grads["blocks.1.resid_mid"]
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-7)


def test_stop_early_skips_later_layers(tiny):
    _, model, ids = tiny
    adapter = get_adapter(model)
    calls = []
    handle = adapter.layers[-1].register_forward_hook(lambda *args: calls.append(1))
    try:
        early = capture(model, ids, [Site(0, "resid_post"), Site(0, "mlp_act")])
        assert calls == [] and early.loss_sum is None and early.grads is None
        full = capture(model, ids, [Site(0, "resid_post"), Site(0, "mlp_act")], stop_early=False)
        assert calls == [1] and full.loss_sum is not None
    finally:
        handle.remove()
    single = capture(model, ids, "blocks.0.resid_post")  # one name, not a list
    assert list(single.acts) == ["blocks.0.resid_post"]
    for name in early.acts:
        assert torch.equal(early.acts[name], full.acts[name])
        assert not early.acts[name].requires_grad


def test_splice_identity_keeps_logits(tiny):
    _, model, ids = tiny
    with torch.no_grad():
        clean = model(ids).logits
        for kind in KINDS:
            with splice(model, Site(1, kind), lambda a: a):
                close(model(ids).logits, clean)
        # The hooks are gone afterwards.
        assert torch.equal(model(ids).logits, clean)


def test_splice_changes_downstream_only(tiny):
    _, model, ids = tiny
    watch = [Site(1, "resid_pre"), Site(1, "resid_mid"), Site(2, "resid_post")]
    with torch.no_grad():
        clean_logits = model(ids).logits
        with record(model, watch) as clean:
            model(ids)
        clean = dict(clean)
        with splice(model, "blocks.0.resid_pre", torch.zeros_like):
            assert not torch.allclose(model(ids).logits, clean_logits)
        v = torch.randn(get_adapter(model).d_model)
        with splice(model, "blocks.1.resid_mid", lambda a: a + v), record(model, watch) as out:
            model(ids)
        assert torch.equal(out["blocks.1.resid_pre"], clean["blocks.1.resid_pre"])
        close(out["blocks.1.resid_mid"], clean["blocks.1.resid_mid"] + v)
        assert not torch.allclose(out["blocks.2.resid_post"], clean["blocks.2.resid_post"])
        # The record sees the spliced value even when it hooks the same module as the splice.
        with record(model, [Site(1, "mlp_out")]) as rec, \
                splice(model, "blocks.1.mlp_out", torch.zeros_like):
            model(ids)
        assert torch.equal(rec["blocks.1.mlp_out"], torch.zeros_like(rec["blocks.1.mlp_out"]))


def test_splice_hidden_states_passed_as_keyword(tmp_path_factory):
    model, _ = load_model(make_tiny_model("gpt2", tmp_path_factory.getbasetemp() / "tiny-gpt2"))
    block = get_adapter(model).layers[0]
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        want = block(torch.zeros_like(x))
        with splice(model, "blocks.0.resid_pre", torch.zeros_like):
            assert torch.equal(block(hidden_states=x), want)


def test_parse_sites_globs_and_order():
    sites = parse_sites("blocks.[1-2].resid_*, blocks.0.attn_z,blocks.0.attn_z", 4)
    assert [s.name for s in sites] == [
        "blocks.0.attn_z", "blocks.1.resid_pre", "blocks.1.resid_mid", "blocks.1.resid_post",
        "blocks.2.resid_pre", "blocks.2.resid_mid", "blocks.2.resid_post"]
    assert len(parse_sites("blocks.*.*", 3)) == 3 * len(KINDS)
    assert [s.name for s in parse_sites("blocks.0.*_in,blocks.0.resid_mid", 2)] == [
        "blocks.0.attn_in", "blocks.0.resid_mid", "blocks.0.mlp_in"]   # forward order
    assert Site.parse("blocks.6.resid_pre") == Site(6, "resid_pre")
    assert str(Site(6, "resid_pre")) == "blocks.6.resid_pre"


@pytest.mark.parametrize("spec, words", [
    ("blocks.1.resid", ["unknown site kind", "resid_pre"]),
    ("blocks.4.resid_pre", ["out of range", "4 layers"]),
    ("blocks.x.resid_pre", ["malformed"]),
    ("layer1.resid_pre", ["malformed"]),
    ("blocks.9*.mlp_out", ["matches no site"]),
    (" , ", ["no sites"]),
])
def test_parse_sites_errors(spec, words):
    with pytest.raises(HarvestError) as err:
        parse_sites(spec, 4)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_load_model_errors(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(HarvestError, match="not found"):
        load_model(str(tmp_path / "missing"))
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(HarvestError) as err:
        load_model(str(tmp_path / "llama"))
    assert "llama" in str(err.value)
    assert all(family in str(err.value) for family in SUPPORTED_FAMILIES)


def test_loaded_model_is_frozen_eval(tiny):
    _, model, _ = tiny
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
