"""`evaluate splice` on tiny models: crafted SAEs whose metrics are known exactly, values checked
against HF's own loss and hand-made ablations, gtopk selection, outputs, and bad input."""
import json
import math
import shutil
from itertools import islice

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sae_harvest.evaluate import EvaluateError, evaluate_saes, pareto_front
from sae_harvest.evaluate.config import EvalConfig
from sae_harvest.evaluate.cli import main as evaluate_cli
from sae_harvest.evaluate.metrics import kl_per_token, log_probs
from sae_harvest.harvest.data import open_dataset, packed_sequences
from sae_harvest.harvest.models import load_model
from sae_harvest.harvest.sites import capture
from sae_harvest.train.sae_io import save_sae
from sae_harvest.train.registry import SAEConfig, make_sae
from tests.tiny_models import make_tiny_model, write_corpus

D = 64           # tiny models' d_model
CTX, N_SEQS, BATCH = 32, 8, 4   # two batches, so accumulation across batches is exercised


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_assets")
    words = "the quick brown fox reads every token of sparse features in a layer".split()
    corpus = write_corpus(root / "docs.jsonl", n_docs=200, max_words=60, words=words)
    gpt2 = make_tiny_model("gpt2", root / "gpt2")
    # the same model with a final norm whose affine weights are not the identity
    shutil.copytree(gpt2, root / "gpt2_affine")
    model, _ = load_model(gpt2)
    torch.manual_seed(1)
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 2.0)
        model.transformer.ln_f.bias.normal_()
    model.save_pretrained(root / "gpt2_affine")
    return {"gpt2": gpt2, "gpt2_affine": str(root / "gpt2_affine"),
            "gemma2": make_tiny_model("gemma2", root / "gemma2"),
            "corpus": str(corpus), "root": root}


def _save(sae, path, hook, **extra) -> str:
    save_sae(sae, path, extra_cfg={"hook_name": hook, **extra})
    return str(path)


def _relu_sae(d_sae, w_enc=None, w_dec=None, b_enc=None):
    sae = make_sae(SAEConfig("relu", D, d_sae))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        if w_enc is not None:
            sae.W_enc.copy_(w_enc)
            sae.W_dec.copy_(w_dec)
        if b_enc is not None:
            sae.b_enc.copy_(b_enc)
    return sae


def _exact_sae(n_dead=0):
    """f = [ReLU(x), ReLU(-x), dead...]; x_hat = ReLU(x) - ReLU(-x) == x exactly (one term is 0).
    Zero biases: the same whether or not b_dec is subtracted from the encoder input."""
    eye = torch.eye(D)
    w_enc = torch.cat([eye, -eye, torch.zeros(D, n_dead)], 1)
    w_dec = torch.cat([eye, -eye, torch.ones(n_dead, D)], 0)   # dead rows must not matter
    b_enc = torch.cat([torch.zeros(2 * D), -torch.ones(n_dead)])  # pre = -1 < 0: never fire
    return _relu_sae(2 * D + n_dead, w_enc, w_dec, b_enc)


def _eval(assets, family, saes, **kw):
    args = dict(dataset=assets["corpus"], tokens=CTX * N_SEQS, ctx_len=CTX, batch_size=BATCH, device="cpu")
    cfg = EvalConfig(model=assets[family], saes=tuple(map(str, saes)), **{**args, **kw})
    return evaluate_saes(cfg, progress=False)


def _ids(assets, family):
    """The evaluation sequences, packed independently of evaluate."""
    _, tok = load_model(assets[family])
    ds = open_dataset(assets["corpus"])
    return torch.from_numpy(np.stack(list(islice(packed_sequences(ds, tok, CTX), N_SEQS)))).long()


@pytest.mark.parametrize("family,hook", [("gpt2", "blocks.1.resid_pre"), ("gemma2", "blocks.1.mlp_out")])
def test_exact_reconstruction_changes_nothing(assets, tmp_path, family, hook):
    n_dead = 8
    path = _save(_exact_sae(n_dead), tmp_path / "exact", hook, sweep_name="exact-relu")
    (r,) = _eval(assets, family, [path])
    for v in ("", "_nobos"):
        assert r["ce_increase" + v] == pytest.approx(0, abs=1e-5)
        assert r["kl" + v] == pytest.approx(0, abs=1e-6)
        assert r["downstream_mse" + v] == pytest.approx(0, abs=1e-10)
        assert r["downstream_mse_ln" + v] == pytest.approx(0, abs=1e-10)
        assert all(x == pytest.approx(0, abs=1e-10) for x in r["downstream_mse_by_layer" + v].values())
        assert r["nmse" + v] == pytest.approx(0, abs=1e-10)
        for key in ("explained_variance", "cosine", "l2_ratio", "relative_reconstruction_bias"):
            assert r[key + v] == pytest.approx(1, abs=1e-5), key
        assert r["loss_recovered_zero" + v] == pytest.approx(1, abs=1e-4)
    layer = int(hook.split(".")[1])
    # the e2e paper's downstream layers: the input of each later block (the 3-layer model's last
    # block output is read only by the final norm and unembedding, which KL and CE score)
    assert list(r["downstream_mse_by_layer"]) == [f"blocks.{l}.resid_post" for l in range(layer, 2)]
    assert (r["site"], r["arch"], r["sweep_name"], r["tokens"]) == (hook, "relu", "exact-relu", CTX * N_SEQS)

    # L0 and alive latents against the site activations computed here: every nonzero component
    # fires exactly one of its two latents; the dead latents never fire.
    model, _ = load_model(assets[family])
    x = capture(model, _ids(assets, family), [hook]).acts[hook]
    assert r["l0"] == pytest.approx((x != 0).sum(-1).float().mean().item())
    flat = x.reshape(-1, D)
    assert r["alive"] == int((flat > 0).any(0).sum() + (flat < 0).any(0).sum())
    assert r["alive"] <= 2 * D and r["d_sae"] == 2 * D + n_dead
    assert r["alive_tokens"] == CTX * N_SEQS and r["alive_tokens_nobos"] == (CTX - 1) * N_SEQS


def test_downstream_layers_are_the_e2e_papers_for_training_and_evaluation():
    """e2e paper eq. 1 on GPT-2 small (12 layers): an SAE at layer 6's input is compared at the
    input of blocks 7..11, i.e. resid_post of blocks 6..10; training and evaluation share the list."""
    from sae_harvest.harvest.sites import Site, downstream_sites
    from sae_harvest.train import e2e

    post = lambda layers: [f"blocks.{k}.resid_post" for k in layers]  # noqa: E731
    assert downstream_sites(Site.parse("blocks.6.resid_pre"), 12) == post(range(6, 11))
    assert downstream_sites(Site.parse("blocks.6.mlp_out"), 12) == post(range(6, 11))
    assert downstream_sites(Site.parse("blocks.6.resid_post"), 12) == post(range(7, 11))
    assert downstream_sites(Site.parse("blocks.11.resid_pre"), 12) == []
    assert e2e.downstream_sites is downstream_sites


@pytest.mark.parametrize("splice_bos", [False, True])
def test_zero_sae_equals_zero_ablation_and_ablations_match_hand_made_hooks(assets, tmp_path, splice_bos):
    """Default: position 0 keeps its clean activation in every splice and ablation; --splice-bos
    replaces it too. The mean of mean-ablation never includes position-0 rows."""
    hook = "blocks.1.resid_pre"
    (r,) = _eval(assets, "gpt2_affine", [_save(_relu_sae(2 * D), tmp_path / "zero", hook)],
                 splice_bos=splice_bos)
    assert r["splice_bos"] is splice_bos
    assert r["ce_spliced"] == r["ce_zero_ablation"]
    assert r["loss_recovered_zero"] == 0 and r["loss_recovered_zero_nobos"] == 0
    assert r["kl"] == r["kl_zero_ablation"] and r["kl"] > 0
    assert (r["l0"], r["alive"], r["nmse"], r["cosine"], r["l2_ratio"]) == (0, 0, 1, 0, 0)
    assert r["relative_reconstruction_bias"] is None   # 0 / 0: undefined, never NaN

    # Independent reference: HF output_hidden_states with the block-1 input replaced by hand,
    # normalised by hand without the final norm's affine weights.
    model, _ = load_model(assets["gpt2_affine"])
    ids = _ids(assets, "gpt2")

    def run(replacement=None):
        def pre_hook(_mod, args, kwargs):
            new = replacement(args[0])
            if not splice_bos:
                new = torch.cat([args[0][:, :1], new[:, 1:]], 1)
            return (new, *args[1:]), kwargs
        handle = model.transformer.h[1].register_forward_pre_hook(pre_hook, with_kwargs=True) \
            if replacement else None
        try:
            with torch.no_grad():
                return model(ids, labels=ids, output_hidden_states=True)
        finally:
            if handle:
                handle.remove()

    clean = run()
    mean = clean.hidden_states[1][:, 1:].reshape(-1, D).double().mean(0).float()   # positions >= 1
    zero, meaned = run(torch.zeros_like), run(lambda a: mean.expand_as(a))
    # Every batch has the same size, so the mean of HF's per-batch losses is the token mean.
    assert r["ce_clean"] == pytest.approx(clean.loss.item(), abs=1e-5)
    assert r["ce_zero_ablation"] == pytest.approx(zero.loss.item(), abs=1e-5)
    assert r["ce_mean_ablation"] == pytest.approx(meaned.loss.item(), abs=1e-5)
    mse = lambda a, b: (a - b).pow(2).mean().item()  # noqa: E731
    ds = r["downstream_mse_by_layer"]
    assert list(ds) == ["blocks.1.resid_post"]   # not the last block's output
    assert ds["blocks.1.resid_post"] == pytest.approx(mse(zero.hidden_states[2], clean.hidden_states[2]), rel=1e-4)
    plain = lambda a: torch.nn.functional.layer_norm(a, (D,), eps=model.transformer.ln_f.eps)  # noqa: E731
    ln_ref = mse(plain(zero.hidden_states[2]), plain(clean.hidden_states[2]))
    assert r["downstream_mse_ln_by_layer"]["blocks.1.resid_post"] == pytest.approx(ln_ref, rel=1e-4)
    # ... which is not what the final norm with its affine weights gives: the check has teeth
    with torch.no_grad():
        affine = mse(model.transformer.ln_f(zero.hidden_states[2]), model.transformer.ln_f(clean.hidden_states[2]))
    assert affine != pytest.approx(ln_ref, rel=1e-2)
    logp_clean, logp_zero = log_probs(clean.logits[:, :-1]), log_probs(zero.logits[:, :-1])
    assert r["kl_zero_ablation"] == pytest.approx(kl_per_token(logp_clean, logp_zero).mean().item(), rel=1e-4)


def test_ce_clean_is_the_models_own_loss_on_held_out_store_rows(assets, tmp_path):
    from sae_harvest.harvest.run import HarvestConfig, harvest
    from sae_harvest.stores import open_store

    out = tmp_path / "s.zarr"
    harvest(HarvestConfig(out=str(out), model=assets["gpt2"], dataset=assets["corpus"],
                          sites="blocks.1.resid_pre", tokens=1024, ctx_len=CTX, batch_size=8,
                          shuffle_window=256, device="cpu", eval_every=8), progress=False)
    path = _save(_exact_sae(), tmp_path / "exact", "blocks.1.resid_pre")
    # No --model: the store's. 3 sequences' worth rounds up to the first 3 held-out sequences
    # (every 8th: 0, 8, 16 of 32)
    (r,) = evaluate_saes(EvalConfig(saes=(str(path),), store=str(out), tokens=2 * CTX + 1, batch_size=2,
                                    device="cpu"), progress=False)
    ids = torch.from_numpy(open_store(str(out)).tokens[:][[0, 8, 16]]).long()
    assert r["eval_tokens"]["held_out_seqs"] == 4 and r["eval_tokens"]["origin"] == "harvest"
    assert r["eval_tokens"]["tokens"] == 3 * CTX
    model, _ = load_model(assets["gpt2"])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert (r["tokens"], r["sequences"], r["ctx_len"]) == (3 * CTX, 3, CTX)
    assert r["ce_clean"] == pytest.approx(loss, abs=1e-5)
    assert r["ce_increase"] == pytest.approx(0, abs=1e-5)


def test_kl_helper_by_hand_and_never_nan():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    logq = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_per_token(logp, logq).item() == pytest.approx(expected, rel=1e-6)
    assert kl_per_token(logp, logp).item() == 0
    ninf = float("-inf")
    ref = log_probs(torch.tensor([[0.0, ninf, 1.0, -1e30]]))
    new = log_probs(torch.tensor([[ninf, 0.0, 1.0, -1e30]]))
    kl = kl_per_token(ref, new)
    assert torch.isfinite(kl).all() and kl.item() > 0
    # Where both are -inf the term is 0, not NaN: same as the KL without that entry.
    a, b = log_probs(torch.tensor([[0.0, 2.0, ninf]])), log_probs(torch.tensor([[1.0, 0.0, ninf]]))
    assert kl_per_token(a, b).item() == pytest.approx(kl_per_token(a[:, :2], b[:, :2]).item(), rel=1e-6)


def test_gtopk_gradient_selection(assets, tmp_path):
    hook = "blocks.1.resid_pre"
    torch.manual_seed(0)
    g = make_sae(SAEConfig("gtopk", D, 128, k=2, beta=1e4))
    t = make_sae(SAEConfig("topk", D, 128, k=2))
    t.load_state_dict(g.saelens_state_dict())   # the TopK tensors (not gtopk's calibrated-beta buffer)
    paths = [_save(g, tmp_path / "g", hook), _save(t, tmp_path / "t", hook)]
    causal, with_grad, topk = _eval(assets, "gpt2", paths)   # every g-SAE in both modes, causal first
    assert (causal["grad_mode"], with_grad["grad_mode"], topk["grad_mode"]) == ("causal", "paper", None)
    (without,) = _eval(assets, "gpt2", paths[:1], grad_select=False)
    assert (with_grad["grad_select"], without["grad_select"], topk["grad_select"]) == (True, False, False)
    assert without["grad_mode"] == "none"
    # Without gradients gtopk is plain TopK; with them it picks other latents.
    for key in ("ce_spliced", "nmse", "kl", "alive"):
        assert without[key] == pytest.approx(topk[key], rel=1e-9, abs=1e-12), key
    assert with_grad["nmse"] != pytest.approx(without["nmse"], rel=1e-3)
    assert causal["nmse"] != pytest.approx(without["nmse"], rel=1e-3)
    assert causal["nmse"] != pytest.approx(with_grad["nmse"], rel=1e-3)

    # paper: the selection used the clean gradient of the summed next-token CE at the site, per token.
    model, _ = load_model(assets["gpt2"])
    ids = _ids(assets, "gpt2")
    cap = capture(model, ids, [hook], grads=True)
    x, grad = cap.acts[hook].reshape(-1, D), cap.grads[hook].reshape(-1, D)
    with torch.no_grad():
        err = (x - g(x, grad)).pow(2).sum() / x.pow(2).sum()
    assert with_grad["nmse"] == pytest.approx(err.item(), rel=1e-4)
    # causal: d L_t / d a[t], L_t = CE of position t against the model's own argmax, by hand
    own = _own_prediction_grads_by_hand(model, ids).reshape(-1, D)
    with torch.no_grad():
        err = (x - g(x, own)).pow(2).sum() / x.pow(2).sum()
    assert causal["nmse"] == pytest.approx(err.item(), rel=1e-4)


def _own_prediction_grads_by_hand(model, ids, layer=1):
    """One backward per (sequence, position), through a plain forward pre-hook on block `layer`."""
    out = torch.zeros(*ids.shape, D)
    for b in range(len(ids)):
        for t in range(ids.shape[1]):
            held = {}

            def pre_hook(_mod, args, kwargs):
                held["a"] = args[0].detach().requires_grad_(True)
                return (held["a"], *args[1:]), kwargs
            h = model.transformer.h[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
            try:
                logp = torch.log_softmax(model(ids[b:b + 1]).logits[0, t].float(), -1)
            finally:
                h.remove()
            (grad,) = torch.autograd.grad(-logp.max(), held["a"])
            out[b, t] = grad[0, t]
    return out


def test_causal_gradients_use_no_later_token(assets):
    """Changing tokens t+1.. leaves the causal gradients (and so a g-SAE's selection) at positions
    <= t unchanged; the paper's gradients change (the test can fail)."""
    from sae_harvest.evaluate.gradients import causal_site_grads, paper_site_grads
    from sae_harvest.harvest.sites import Site

    model, _ = load_model(assets["gpt2"])
    site = Site.parse("blocks.1.resid_pre")
    ids = _ids(assets, "gpt2")[:3]
    t = 12
    other = ids.clone()
    other[:, t + 1:] = torch.randint(0, 50, other[:, t + 1:].shape)
    causal = causal_site_grads(model, ids, site), causal_site_grads(model, other, site)
    paper = [paper_site_grads(model, i, [site])[site.name] for i in (ids, other)]
    torch.testing.assert_close(causal[0][:, :t + 1], causal[1][:, :t + 1], rtol=1e-5, atol=1e-9)
    assert not torch.allclose(paper[0][:, :t + 1], paper[1][:, :t + 1], rtol=1e-3, atol=1e-9)
    assert not torch.allclose(causal[0][:, t + 1:], causal[1][:, t + 1:])
    assert causal[0].abs().sum() > 0
    # the selection of a g-SAE follows: positions <= t choose the same latents
    torch.manual_seed(0)
    g = make_sae(SAEConfig("gtopk", D, 128, k=2, beta=1e4))
    x = capture(model, ids, [site]).acts[site.name][:, :t + 1].reshape(-1, D)
    sel = [g.encode(x, c[:, :t + 1].reshape(-1, D)) != 0 for c in causal]
    assert torch.equal(sel[0], sel[1])


def test_pareto_front():
    pts = [(4, 0.5), (1, 1.0), (2, 0.8), (3, 0.9), (2, 0.7), (8, 0.5), (16, 0.1), (5, float("nan"))]
    assert pareto_front(pts) == [(1, 1.0), (2, 0.7), (4, 0.5), (16, 0.1)]
    assert pareto_front([]) == [] and pareto_front([(1, None)]) == []


def test_cli_json_order_and_png(assets, tmp_path):
    hook = "blocks.1.resid_pre"
    torch.manual_seed(0)
    paths = [_save(_relu_sae(2 * D), tmp_path / "zero", hook),
             _save(make_sae(SAEConfig("topk", D, 128, k=4)), tmp_path / "topk4", hook, sweep_name="k4"),
             _save(_exact_sae(), tmp_path / "exact", hook)]
    out_json, out_png = tmp_path / "out" / "r.json", tmp_path / "p.png"
    args = ["splice", "--model", assets["gpt2"], "--dataset", assets["corpus"], "--tokens", "64",
            "--ctx-len", "16", "--device", "cpu", "--json", str(out_json), "--plot", str(out_png), "--quiet"]
    for p in paths:
        args += ["--sae", p]
    result = CliRunner().invoke(evaluate_cli, args)
    assert result.exit_code == 0, result.output
    assert "topk" in result.output and "Traceback" not in result.output
    data = json.loads(out_json.read_text())
    assert list(data) == ["config", "results"]   # the frozen EvalConfig, as cfg.json holds TrainConfig
    assert data["config"]["saes"] == paths and data["config"]["tokens"] == 64 and data["config"]["ctx_len"] == 16
    assert [r["sae"] for r in data["results"]] == paths
    assert [r["name"] for r in data["results"]] == ["zero", "k4", "exact"]
    r = data["results"][1]
    assert (r["arch"], r["k"], r["l1"], r["tokens"], r["l0"]) == ("topk", 4, None, 64, 4)
    for key in ("ce_clean", "ce_increase", "ce_increase_nobos", "loss_recovered_mean", "kl",
                "downstream_mse", "downstream_mse_ln_by_layer", "alive", "explained_variance_nobos"):
        assert key in r
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bad_saes(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_saes")
    good = _save(_exact_sae(), root / "good", "blocks.1.resid_pre")
    trunc = root / "truncated"
    shutil.copytree(good, trunc)
    weights = trunc / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    narrow = make_sae(SAEConfig("relu", 32, 64))
    return {"good": good, "truncated": str(trunc),
            "narrow": _save(narrow, root / "narrow", "blocks.1.resid_pre"),
            "layer7": _save(_exact_sae(), root / "layer7", "blocks.7.resid_pre"),
            "badkind": _save(_exact_sae(), root / "badkind", "blocks.1.resid_foo")}


@pytest.mark.parametrize("case,expect", [
    ("truncated", "truncated"), ("narrow", "width"), ("layer7", "blocks.7.resid_pre"),
    ("badkind", "resid_foo"), ("model", "not found"), ("store", "no store"), ("nodata", "--store"),
])
def test_cli_bad_input(assets, bad_saes, tmp_path, case, expect):
    sae = bad_saes.get(case, bad_saes["good"])
    args = ["splice", "--sae", sae, "--model", assets["gpt2"], "--dataset", assets["corpus"],
            "--tokens", "32", "--ctx-len", "16", "--device", "cpu", "--quiet"]
    if case == "model":
        args[args.index("--model") + 1] = str(tmp_path / "no" / "such" / "model")
    if case == "store":
        args[args.index("--dataset"):args.index("--dataset") + 2] = ["--store", str(tmp_path / "nope.zarr")]
    if case == "nodata":
        del args[args.index("--dataset"):args.index("--dataset") + 2]
    result = CliRunner().invoke(evaluate_cli, args)
    assert result.exit_code == 2, result.output
    first = result.output.strip().splitlines()[0]
    assert first.startswith("error:") and expect in result.output, result.output
    if case in bad_saes:
        assert bad_saes[case] in result.output   # names the offending file
    assert "Traceback" not in result.output


def test_library_raises_evaluate_error(assets, bad_saes):
    with pytest.raises(EvaluateError, match="layer"):
        _eval(assets, "gpt2", [bad_saes["layer7"]])


def test_offline_default_corpus_name_is_resolved(assets, tmp_path, monkeypatch):
    """--dataset stdlib-py means the embedded corpus, never a hub lookup."""
    monkeypatch.setenv("SAE_HARVEST_CACHE", str(tmp_path / "cache"))
    sae = _save(_exact_sae(), tmp_path / "exact", "blocks.1.resid_pre")
    (r,) = _eval(assets, "gpt2", [sae], dataset="stdlib-py")
    assert r["ce_increase"] == pytest.approx(0, abs=1e-5)
    assert (tmp_path / "cache").exists()


@pytest.mark.parametrize("hook,site", [("blocks.1.hook_resid_pre", "blocks.1.resid_pre"),
                                       ("transformer.h.0", "blocks.0.resid_post")])
def test_checkpoint_saelens_wrote_is_scored_as_our_copy(assets, tmp_path, hook, site):
    try:
        import sae_lens as sl
    except Exception as e:   # noqa: BLE001
        pytest.skip(f"sae-lens is not installed ({type(e).__name__}); pip install sae-lens to run this test")
    torch.manual_seed(3)
    theirs = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=D, d_sae=96))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        theirs.threshold.copy_(torch.rand(96) * 0.3)
    theirs.cfg.metadata.hook_name = hook
    theirs.save_model(str(tmp_path / "theirs"))
    from sae_harvest.train.sae_io import load_sae
    copy = _save(load_sae(tmp_path / "theirs"), tmp_path / "ours", site)
    a, b = _eval(assets, "gpt2", [tmp_path / "theirs", copy])
    assert a["site"] == b["site"] == site and a["arch"] == "saelens-jumprelu" and b["arch"] == "batchtopk"
    assert a["l0"] > 0 and a["ce_increase"] > 0
    for key in ("ce_spliced", "kl", "nmse", "l0", "alive", "downstream_mse", "explained_variance_nobos"):
        assert a[key] == b[key], key
