"""`train fit --loss e2e` for transcoders (train/e2e.py, train/e2e_transcoder.py): the transcoder's
prediction from the MLP's live input replaces the MLP's output and the KL to the clean logits is
minimised. Checked against plain HF forward hooks (KL and its gradients), an exact transcoder of a
linear-activation MLP (KL 0), and a short fit whose saved transcoder reproduces its held-out KL."""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sae_harvest import train
from sae_harvest.harvest.models import load_model
from sae_harvest.harvest.sites import Site
from sae_harvest.stores import open_store
from sae_harvest.train import e2e
from sae_harvest.train.cli import main as train_cli
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit
from sae_harvest.train.registry import SAEConfig, make_sae

CTX, SEQS, D = 32, 8, 64
READ, WRITE = Site.parse("blocks.1.mlp_in"), Site.parse("blocks.1.mlp_out")


@pytest.fixture(scope="module")
def assets(e2e_assets):   # tests/conftest.py: a tiny GPT-2 (d_model 64, 3 layers) and a store of its tokens
    return e2e_assets


def _ids(assets, n=4):
    return torch.from_numpy(open_store(assets["store"]).tokens[:n].astype(np.int64))


def _transcoder(seed=0, skip=True, l1_coeff=0.3):
    torch.manual_seed(seed)
    tc = make_sae(SAEConfig("relu", D, 32, d_out=D, skip=skip, l1_coeff=l1_coeff))
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.5)
        tc.b_dec.normal_(0, 0.1)
        if skip:
            tc.W_skip.normal_(0, 0.1)
    return tc


def _hand_logits(model, tc, ids, scale, out_scale):
    """Independent reference: a plain forward hook on block 1's MLP writes the transcoder's prediction
    from the MLP's own input, position 0 kept clean."""
    def hook(_mod, args, out):
        x = args[0].reshape(-1, D) / scale
        y = ((tc.decode(tc.encode(x)) + tc.skip_out(x)) * out_scale).view(out.shape)
        return torch.cat([out[:, :1], y[:, 1:]], 1)
    handle = model.transformer.h[1].mlp.register_forward_hook(hook)
    try:
        return model(input_ids=ids).logits
    finally:
        handle.remove()


def _kl(clean_logits, logits):
    p = torch.softmax(clean_logits.double(), -1)
    kl = (p * (torch.log_softmax(clean_logits.double(), -1) - torch.log_softmax(logits.double(), -1))).sum(-1)
    return kl[:, 1:].mean()


def test_kl_and_its_gradients_match_hand_hooks(assets):
    model, ids = assets["model"], _ids(assets)
    tc = _transcoder(l1_coeff=0.0)   # the loss is the KL alone, so its gradients are the KL's
    t = e2e.e2e_loss(model, tc, WRITE, ids, clean=e2e.clean_pass(model, ids, []), read=READ, scale=1.7,
                     out_scale=0.6)
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    hand = _kl(clean, _hand_logits(model, tc, ids, 1.7, 0.6))
    assert float(t["kl"]) == pytest.approx(float(hand.detach()), rel=1e-4) and float(hand.detach()) > 1e-3
    assert float(t["loss"]) == pytest.approx(float(t["kl"]))
    grads = torch.autograd.grad(t["loss"], [tc.W_enc, tc.W_dec, tc.W_skip])
    ref = torch.autograd.grad(hand, [tc.W_enc, tc.W_dec, tc.W_skip])
    for g, r in zip(grads, ref):
        assert torch.allclose(g.double(), r.double(), rtol=1e-3, atol=1e-7)
    # the latents are those of the positions >= 1 of the MLP's input
    with torch.no_grad():
        x = _mlp_input(model, ids)[:, 1:].reshape(-1, D) / 1.7
        assert float(t["l0"]) == pytest.approx(float((tc.encode(x) > 0).float().sum(-1).mean()))


def _mlp_input(model, ids):
    seen = {}
    handle = model.transformer.h[1].mlp.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    return seen["x"]


def test_exact_transcoder_of_a_linear_mlp_gives_zero_kl(assets, tmp_path):
    linear = tmp_path / "gpt2_linear"   # the same weights, identity activation: MLP(x) = (x W_fc + b_fc) W_proj + b_proj
    shutil.copytree(assets["model_path"], linear)
    cfg = json.loads((linear / "config.json").read_text())
    cfg["activation_function"] = "linear"
    (linear / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(str(linear))
    mlp = model.transformer.h[1].mlp
    tc = _transcoder()
    with torch.no_grad():
        tc.W_enc.zero_()
        tc.b_enc.fill_(-1.0)   # no latent fires: the skip path is the whole MLP
        tc.W_skip.copy_((mlp.c_fc.weight @ mlp.c_proj.weight).T)
        tc.b_dec.copy_(mlp.c_fc.bias @ mlp.c_proj.weight + mlp.c_proj.bias)
    ids = _ids(assets)
    downstream = e2e.downstream_sites(WRITE, 3)
    clean = e2e.clean_pass(model, ids, downstream)
    t = e2e.e2e_loss(model, tc, WRITE, ids, clean=clean, read=READ, out_scale=1.0, downstream=downstream,
                     downstream_coeff=1.0)
    assert float(t["kl"]) == pytest.approx(0, abs=1e-6) and float(t["downstream_mse"]) == pytest.approx(0, abs=1e-9)
    assert float(t["ce"]) == pytest.approx(float(t["ce_clean"]), abs=1e-5) and float(t["l0"]) == 0
    with torch.no_grad():
        tc.W_skip.add_(0.05 * torch.randn_like(tc.W_skip))
    off = e2e.e2e_loss(model, tc, WRITE, ids, clean=clean, read=READ, out_scale=1.0)
    assert float(off["kl"]) > 1e-4   # the check can fail: a perturbed skip path moves the logits


def _cfg(assets, out, **kw):
    return TrainConfig(**{**dict(store=assets["store"], out=str(out), loss="e2e", site=READ.name, target=WRITE.name,
                                 skip=True, arch="topk", k=(4,), d_sae=32, batch_size=SEQS * CTX,
                                 tokens=SEQS * CTX * 20, lr=1e-3, device="cpu", log_every=5,
                                 checkpoint_every=1000), **kw})


def test_fit_saves_a_raw_scale_transcoder_that_reproduces_its_held_out_kl(assets, tmp_path):
    out = tmp_path / "run"
    summaries = fit(_cfg(assets, out), progress=False)
    (name, summary), = summaries.items()
    assert name == "blocks.1.mlp_in-blocks.1.mlp_out-skip_transcoder_topk_k4"
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kl"] < records[0]["kl"], [r["kl"] for r in records]
    cfg = json.loads((out / name / "cfg.json").read_text())
    assert cfg["architecture"] == "topk_skip_transcoder" and cfg["d_out"] == D
    ours = cfg["sae_harvest"]
    assert ours["hook_name"] == READ.name and ours["target"] == WRITE.name
    assert ours["e2e"]["downstream_sites"] == ["blocks.1.resid_post"] and ours["training"]["loss"] == "e2e"
    tc = train.load_sae(out / name)
    assert tc.is_transcoder and tc.cfg.skip
    store = open_store(assets["store"])
    held_seqs = store.split.held_out_seqs(store.n_seqs)
    ids = torch.from_numpy(store.tokens[:][held_seqs].astype(np.int64))
    held = summary["held_out"]
    assert held["held_out_sequences"] == len(held_seqs)
    with torch.no_grad():   # saved with both scales folded in: raw MLP input in, raw MLP output out
        clean = assets["model"](input_ids=ids).logits
        kl = _kl(clean, _hand_logits(assets["model"], tc, ids, 1.0, 1.0))
    assert float(kl) == pytest.approx(held["kl"], rel=1e-4)
    assert summary["target_scale"] != 1.0 and summary["input_scale"] != 1.0


@pytest.mark.parametrize("args, words", [
    (["--target", "blocks.0.mlp_out"], ["comes after --target"]),
    (["--target", "blocks.1.mlp_in"], ["its own --site"]),
    (["--target", "blocks.7.mlp_out"], ["not in the model"]),
    (["--target", "blocks.1.mlp_out", "--arch", "gtopk"], ["--loss e2e"]),
])
def test_bad_pairs_are_one_line_exit_2(assets, tmp_path, args, words):
    r = CliRunner().invoke(train_cli, ["fit", "--store", assets["store"], "--out", str(tmp_path / "run"), "--loss",
                                       "e2e", "--model", assets["model_path"], "--device", "cpu", "--site", READ.name,
                                       "--d-sae", "32", *args])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "run").exists()


def test_resume_continues_under_the_saved_target_scale(assets, tmp_path):
    """The input scale was restored from the checkpoint but the target scale recomputed from a fresh
    sample: on another device the two halves of a run could train under different output scales.
    The checkpoint's target scale (set here to a value no sample gives) must be the one saved."""
    import signal

    from sae_harvest.train.driver import TrainInterrupted

    out = tmp_path / "run"

    def stop(event):
        if event.step == 3:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainInterrupted):
        fit(_cfg(assets, out), progress=False, on_step=stop)
    state = out / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    assert meta["target_scale"] > 0
    meta["target_scale"] *= 1.5
    state.write_text(json.dumps(meta))
    (summary,) = fit(_cfg(assets, out), resume=True, progress=False).values()
    assert summary["target_scale"] == meta["target_scale"]
