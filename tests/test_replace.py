"""Transcoders spliced into the live model (evaluate/replace.py), against hand-made HF hooks: a
crafted skip transcoder equal to an identity-activation MLP changes nothing; perturbed ones match a
reference written with plain forward hooks, alone and all at once (errors compound)."""
import json
import shutil
from itertools import islice

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sae_harvest.evaluate.cli import main as eval_cli
from sae_harvest.evaluate.config import EvalConfig
from sae_harvest.evaluate.replace import evaluate_all
from sae_harvest.evaluate.splice import EvaluateError
from sae_harvest.harvest.data import open_dataset, packed_sequences
from sae_harvest.harvest.models import load_model
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_io import save_sae
from tests.tiny_models import make_tiny_model, write_corpus

CTX, N_SEQS, BATCH, D = 32, 6, 3, 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("replace_assets")
    corpus = write_corpus(root / "docs.jsonl", n_docs=120, max_words=60)
    gpt2 = make_tiny_model("gpt2", root / "gpt2")
    linear = root / "gpt2_linear"   # the same weights, identity activation: MLP(x) = (x W_fc + b_fc) W_proj + b_proj
    shutil.copytree(gpt2, linear)
    cfg = json.loads((linear / "config.json").read_text())
    cfg["activation_function"] = "linear"
    (linear / "config.json").write_text(json.dumps(cfg))
    return {"model": str(linear), "corpus": corpus}


def _mlp_as_skip_transcoder(model, layer, perturb=0.0, seed=0):
    """A skip transcoder whose skip path is exactly layer's MLP; its latents never fire."""
    mlp = model.transformer.h[layer].mlp
    w_fc, b_fc, w_proj, b_proj = (t.detach() for t in (mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight,
                                                       mlp.c_proj.bias))
    tc = make_sae(SAEConfig("relu", D, 8, d_out=D, skip=True, l1_coeff=1.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tc.W_enc.zero_()
        tc.b_enc.fill_(-1.0)   # pre = -1: no latent fires
        tc.W_skip.copy_((w_fc @ w_proj).T + perturb * torch.randn(D, D, generator=g))
        tc.b_dec.copy_(b_fc @ w_proj + b_proj)
    return tc


def _save(tc, path, layer):
    save_sae(tc, path, extra_cfg={"hook_name": f"blocks.{layer}.mlp_in", "target": f"blocks.{layer}.mlp_out",
                                  "sweep_name": path.name})
    return str(path)


def _eval(assets, saes, **kw):
    cfg = EvalConfig(model=assets["model"], saes=tuple(saes), dataset=assets["corpus"], tokens=CTX * N_SEQS,
                     ctx_len=CTX, batch_size=BATCH, device="cpu", **kw)
    return evaluate_all(cfg, progress=False)


def _ids(assets):
    _, tok = load_model(assets["model"])
    ds = open_dataset(assets["corpus"])
    return torch.from_numpy(np.stack(list(islice(packed_sequences(ds, tok, CTX), N_SEQS)))).long()


def test_skip_transcoder_equal_to_the_mlp_changes_nothing(assets, tmp_path):
    model, _ = load_model(assets["model"])
    (r,) = _eval(assets, [_save(_mlp_as_skip_transcoder(model, 1), tmp_path / "exact", 1)])
    assert r["site"] == "blocks.1.mlp_in->blocks.1.mlp_out" and r["arch"] == "skip_transcoder (relu)"
    assert r["ce_increase"] == pytest.approx(0, abs=1e-5) and r["kl"] == pytest.approx(0, abs=1e-6)
    assert r["nmse"] == pytest.approx(0, abs=1e-10) and r["l0"] == 0 and r["alive"] == 0
    assert r["loss_recovered_zero"] == pytest.approx(1, abs=1e-4) and abs(r["ce_zero_ablation"] - r["ce_clean"]) > 1e-3


def _reference(model, ids, tcs: dict):
    """Mean next-token CE with each layer's MLP output replaced by tc(its live input), position 0
    kept, written with plain HF hooks; plus each MLP's NMSE of tc(input) vs its own output."""
    handles, errs = [], {layer: [0.0, 0.0] for layer in tcs}
    for layer, tc in tcs.items():
        mlp = model.transformer.h[layer].mlp

        def hook(_mod, args, out, tc=tc, layer=layer):
            x = args[0]
            y_hat = tc(x.reshape(-1, D)).view_as(out)
            errs[layer][0] += float((y_hat[:, 1:] - out[:, 1:]).pow(2).sum())
            errs[layer][1] += float(out[:, 1:].pow(2).sum())
            return torch.cat([out[:, :1], y_hat[:, 1:]], 1)
        handles.append(mlp.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = torch.cat([model(b).logits for b in ids.split(BATCH)])
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits.float(), -1)
    ce = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    return float(ce), {layer: e / n for layer, (e, n) in errs.items()}


def test_perturbed_transcoders_alone_and_all_at_once_match_hand_hooks(assets, tmp_path):
    model, _ = load_model(assets["model"])
    ids = _ids(assets)
    tcs = {0: _mlp_as_skip_transcoder(model, 0, 0.3, seed=1), 2: _mlp_as_skip_transcoder(model, 2, 0.3, seed=2)}
    paths = [_save(tc, tmp_path / f"tc{layer}", layer) for layer, tc in tcs.items()]
    rows = _eval(assets, paths, all_at_once=True)
    assert [r["name"] for r in rows] == ["tc0", "tc2", "all at once"]
    clean, _ = _reference(model, ids, {})
    for layer, r in zip(tcs, rows):
        ce, nmse = _reference(model, ids, {layer: tcs[layer]})
        assert r["ce_clean"] == pytest.approx(clean, rel=1e-6)
        assert r["ce_spliced"] == pytest.approx(ce, rel=1e-5) and abs(r["ce_increase"]) > 1e-4
        assert r["nmse"] == pytest.approx(nmse[layer], rel=1e-4)
    ce, nmse = _reference(model, ids, tcs)   # together: layer 2 reads an input layer 0's error moved
    joint = rows[2]
    assert joint["ce_spliced"] == pytest.approx(ce, rel=1e-5)
    assert joint["per_dictionary"]["tc2"]["nmse"] == pytest.approx(nmse[2], rel=1e-4)
    assert joint["per_dictionary"]["tc2"]["nmse"] != pytest.approx(rows[1]["nmse"], rel=1e-3)   # it compounds


def test_transcoder_whose_target_does_not_fit_the_model_is_one_line_exit_2(assets, tmp_path):
    tc = make_sae(SAEConfig("relu", D, 8, d_out=D // 2, l1_coeff=1.0))
    path = _save(tc, tmp_path / "narrow", 1)
    with pytest.raises(EvaluateError, match="d_out 32 != width 64"):
        _eval(assets, [path])
    r = CliRunner().invoke(eval_cli, ["splice", "--sae", path, "--model", assets["model"], "--dataset",
                                      assets["corpus"], "--tokens", "64", "--device", "cpu", "--quiet"])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "d_out 32" in lines[0], r.output


def test_saes_at_several_sites_alone_and_all_at_once(assets, tmp_path):
    """SAEs at two sites: each reported alone by evaluate splice; --all-at-once adds the joint row.
    Exact SAEs (f = [ReLU(x), ReLU(-x)], x_hat = x) leave CE unchanged alone and together."""
    eye = torch.eye(D)
    paths = []
    for site in ("blocks.0.resid_post", "blocks.2.mlp_out"):
        sae = make_sae(SAEConfig("relu", D, 2 * D))
        with torch.no_grad():
            sae.W_enc.copy_(torch.cat([eye, -eye], 1))
            sae.W_dec.copy_(torch.cat([eye, -eye], 0))
            sae.b_enc.zero_()
            sae.b_dec.zero_()
        paths.append(str(tmp_path / site))
        save_sae(sae, paths[-1], extra_cfg={"hook_name": site, "sweep_name": site})
    rows = _eval(assets, paths, all_at_once=True)
    assert [r["name"] for r in rows] == ["blocks.0.resid_post", "blocks.2.mlp_out", "all at once"]
    assert [r["site"] for r in rows[:2]] == ["blocks.0.resid_post", "blocks.2.mlp_out"]
    for r in rows:
        assert r["ce_increase"] == pytest.approx(0, abs=1e-5) and r["kl"] == pytest.approx(0, abs=1e-6)
    joint = rows[2]
    assert joint["site"] == "blocks.0.resid_post, blocks.2.mlp_out"
    assert set(joint["per_dictionary"]) == {"blocks.0.resid_post", "blocks.2.mlp_out"}
    assert all(p["nmse"] == pytest.approx(0, abs=1e-10) for p in joint["per_dictionary"].values())
    # writing one site twice in one forward is refused
    with pytest.raises(EvaluateError, match="write the same site"):
        _eval(assets, [paths[0], paths[0]], all_at_once=True)


def _crosscoder(perturb=0.0):
    """A relu crosscoder over blocks.0/1.resid_post: f = [ReLU(x), ReLU(-x)] of the concatenation,
    decoded exactly (x^ = x) unless perturbed."""
    eye = torch.eye(2 * D)
    cc = make_sae(SAEConfig("relu", 2 * D, 4 * D, n_sites=2, l1_coeff=1.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        cc.W_enc.copy_(torch.cat([eye, -eye], 1))
        cc.W_dec.copy_(torch.cat([eye, -eye], 0) + perturb * torch.randn(4 * D, 2 * D, generator=g))
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    return cc


CC_SITES = ["blocks.0.resid_post", "blocks.1.resid_post"]


def _save_cc(cc, path):
    save_sae(cc, path, extra_cfg={"hook_name": CC_SITES[0], "sites": CC_SITES, "sweep_name": path.name})
    return str(path)


def test_crosscoder_spliced_at_every_site_at_once(assets, tmp_path):
    (exact,) = _eval(assets, [_save_cc(_crosscoder(), tmp_path / "exact")])
    assert exact["site"] == ", ".join(CC_SITES) and exact["arch"] == "crosscoder (relu)"
    assert exact["ce_increase"] == pytest.approx(0, abs=1e-5) and exact["kl"] == pytest.approx(0, abs=1e-6)
    assert all(p["nmse"] == pytest.approx(0, abs=1e-10) for p in exact["per_site"].values())

    # perturbed: against plain block hooks replacing both outputs with the reconstruction of the clean ones
    cc = _crosscoder(0.05)
    (r,) = _eval(assets, [_save_cc(cc, tmp_path / "perturbed")])
    model, _ = load_model(assets["model"])
    ids = _ids(assets)
    ces, errs = [], {s: [0.0, 0.0] for s in CC_SITES}
    for batch in ids.split(BATCH):
        with torch.no_grad():
            hidden = model(batch, output_hidden_states=True).hidden_states   # [1], [2] = resid_post of 0, 1
            x = torch.cat([hidden[1], hidden[2]], -1)
            recon = cc(x.reshape(-1, 2 * D)).view_as(x).split(D, -1)
            for s, xs, rs in zip(CC_SITES, (hidden[1], hidden[2]), recon):
                errs[s][0] += float((rs[:, 1:] - xs[:, 1:]).pow(2).sum())
                errs[s][1] += float(xs[:, 1:].pow(2).sum())
            handles = [model.transformer.h[layer].register_forward_hook(
                lambda _m, _a, out, v=recon[layer]: torch.cat([out[:, :1], v[:, 1:]], 1)) for layer in (0, 1)]
            try:
                logp = torch.log_softmax(model(batch).logits.float(), -1)
            finally:
                for h in handles:
                    h.remove()
        ces.append(-logp[:, :-1].gather(-1, batch[:, 1:, None]))
    assert r["ce_spliced"] == pytest.approx(float(torch.cat(ces).mean()), rel=1e-5)
    for s in CC_SITES:
        assert r["per_site"][s]["nmse"] == pytest.approx(errs[s][0] / errs[s][1], rel=1e-4) and errs[s][0] > 0


def _clt_of_linear_mlps(model, perturb=0.0):
    """A TopK CLT over the 3 layers equal to the identity-activation MLPs: layer L's latents are
    [ReLU(z), ReLU(-z)] of z = x W_fc + b_fc (k = all of them), decoded into its own layer by
    [W_proj; -W_proj] (+ b_proj); the cross-layer decoders are 0 unless perturbed."""
    n, d_mlp = 3, 4 * D
    clt = make_sae(SAEConfig("topk", n * D, n * 2 * d_mlp, k=2 * d_mlp, clt_layers=n))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in range(n):
            mlp = model.transformer.h[layer].mlp
            clt.W_enc[layer].copy_(torch.cat([mlp.c_fc.weight, -mlp.c_fc.weight], 1))
            clt.b_enc[layer].copy_(torch.cat([mlp.c_fc.bias, -mlp.c_fc.bias]))
            w = getattr(clt, f"W_dec_{layer}")
            w.copy_(perturb * torch.randn(w.shape, generator=g))
            w[:, 0] += torch.cat([mlp.c_proj.weight, -mlp.c_proj.weight], 0)
            clt.b_dec[layer].copy_(mlp.c_proj.bias)
    return clt


def _save_clt(clt, path):
    save_sae(clt, path, extra_cfg={"hook_name": "blocks.0.mlp_in", "sites": [f"blocks.{l}.mlp_in" for l in range(3)],
                                   "targets": [f"blocks.{l}.mlp_out" for l in range(3)], "sweep_name": path.name})
    return str(path)


def test_clt_replacement_model(assets, tmp_path):
    model, _ = load_model(assets["model"])
    (exact,) = _eval(assets, [_save_clt(_clt_of_linear_mlps(model), tmp_path / "exact")])
    assert exact["arch"] == "clt (topk)"
    assert exact["ce_increase"] == pytest.approx(0, abs=1e-5) and exact["kl"] == pytest.approx(0, abs=1e-6)
    assert all(p["nmse"] == pytest.approx(0, abs=1e-9) for p in exact["per_layer"].values())

    # perturbed (cross-layer writes too): against plain HF hooks on the MLPs, each output replaced by
    # the CLT written out here from every earlier layer's live MLP input
    clt = _clt_of_linear_mlps(model, 0.02)
    (r,) = _eval(assets, [_save_clt(clt, tmp_path / "perturbed")])
    W_enc, b_enc, b_dec = clt.W_enc.detach(), clt.b_enc.detach(), clt.b_dec.detach()
    W_dec = [getattr(clt, f"W_dec_{l}").detach() for l in range(3)]
    ids = _ids(assets)
    ces, errs = [], [[0.0, 0.0] for _ in range(3)]
    for batch in ids.split(BATCH):
        latents = {}

        def hook(_m, args, out, t):
            pre = (args[0] @ W_enc[t] + b_enc[t]).clamp_min(0)   # k = all latents: TopK keeps every one
            latents[t] = pre
            y_hat = b_dec[t] + sum(latents[l] @ W_dec[l][:, t - l] for l in range(t + 1))
            errs[t][0] += float((y_hat[:, 1:] - out[:, 1:]).pow(2).sum())
            errs[t][1] += float(out[:, 1:].pow(2).sum())
            return torch.cat([out[:, :1], y_hat[:, 1:]], 1)
        handles = [model.transformer.h[t].mlp.register_forward_hook(
            lambda m, a, o, t=t: hook(m, a, o, t)) for t in range(3)]
        try:
            with torch.no_grad():
                logp = torch.log_softmax(model(batch).logits.float(), -1)
        finally:
            for h in handles:
                h.remove()
        ces.append(-logp[:, :-1].gather(-1, batch[:, 1:, None]))
    assert r["ce_spliced"] == pytest.approx(float(torch.cat(ces).mean()), rel=1e-5)
    for t in range(3):
        assert r["per_layer"][f"blocks.{t}.mlp_out"]["nmse"] == pytest.approx(errs[t][0] / errs[t][1], rel=1e-4)


def test_saes_transcoders_and_clts_together_load_the_model_once(assets, tmp_path, monkeypatch):
    """One `evaluate splice` over an SAE, a transcoder and a CLT loads the model once (it loaded it
    once for the SAEs and again for the rest), and each row is the one that dictionary gets alone."""
    import sae_harvest.harvest.models as models

    model, _ = load_model(assets["model"])
    sae = make_sae(SAEConfig("relu", D, 2 * D))
    sae_path = str(tmp_path / "sae")
    save_sae(sae, sae_path, extra_cfg={"hook_name": "blocks.0.resid_post", "sweep_name": "sae"})
    paths = [sae_path, _save(_mlp_as_skip_transcoder(model, 1, 0.3, seed=1), tmp_path / "tc", 1),
             _save_clt(_clt_of_linear_mlps(model, 0.02), tmp_path / "clt")]
    alone = [_eval(assets, [p])[0] for p in paths]
    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    rows = _eval(assets, paths)
    assert len(loads) == 1
    assert [r["name"] for r in rows] == ["sae", "tc", "clt"] and rows == alone
    loads.clear()
    rows = _eval(assets, paths[:2], all_at_once=True)   # the joint row shares that one load too
    assert len(loads) == 1 and rows[:2] == alone[:2] and rows[2]["name"] == "all at once"
