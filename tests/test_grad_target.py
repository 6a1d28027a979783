"""`harvest run --grad-target model-top1` (issue 18 item 3): the stored gradient is d L_t / d a[t] with
L_t = -log p_t(argmax p_t), checked against plain autograd through HF hooks on a tiny GPT-2; the
target is recorded in the store's grads attributes and in a g-SAE's cfg.json."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sae_harvest.harvest.cli import main as harvest_cli
from sae_harvest.harvest.models import load_model
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.stores import open_store
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit
from tests.tiny_models import make_tiny_model, write_corpus

CTX = 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt")
    corpus = write_corpus(root / "docs.jsonl", n_docs=60, max_words=40)
    model = make_tiny_model("gpt2", root / "gpt2")
    stores = {}
    for target in ("labels", "model-top1"):
        stores[target] = str(root / f"{target}.zarr")
        harvest(HarvestConfig(out=stores[target], model=model, dataset=str(corpus), sites="blocks.1.resid_pre",
                              grads=True, grad_target=target, grad_encoding="float32", act_encoding="float32",
                              tokens=16 * CTX, ctx_len=CTX, batch_size=8, shuffle_window=8 * CTX, device="cpu"),
                progress=False)
    return {"model": model, "stores": stores, "root": root, "corpus": corpus}


def _autograd_top1(model, ids):
    """[T, d]: for each t, d(-log p_t(argmax p_t)) / d(input of block 1 at t), one backward per t."""
    grads = []
    for t in range(ids.shape[1]):
        leaf = {}

        def pre(_mod, args, kwargs):
            leaf["a"] = args[0].detach().requires_grad_(True)
            return (leaf["a"], *args[1:]), kwargs

        handle = model.transformer.h[1].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            logits = model(input_ids=ids, use_cache=False).logits[0, t].float()
        finally:
            handle.remove()
        logp = torch.log_softmax(logits, -1)
        (g,) = torch.autograd.grad(-logp[logp.argmax()], leaf["a"])
        grads.append(g[0, t])
        assert g[0, t + 1:].abs().max() == 0 if t + 1 < ids.shape[1] else True   # causal: no later position
    return torch.stack(grads)


def test_model_top1_gradient_matches_autograd(assets):
    model, _ = load_model(assets["model"])
    store = open_store(assets["stores"]["model-top1"])
    assert store.attrs["grads"]["target"] == "model-top1"
    assert open_store(assets["stores"]["labels"]).attrs["grads"]["target"] == "labels"
    rows_seq, rows_pos = np.asarray(store.rows_seq[:]), np.asarray(store.rows_pos[:])
    for seq in (1, 6):
        ids = torch.from_numpy(np.asarray(store.tokens[seq:seq + 1]).astype(np.int64))
        expected = _autograd_top1(model, ids)
        rows = np.array([np.flatnonzero((rows_seq == seq) & (rows_pos == t))[0] for t in range(CTX)])
        stored = torch.from_numpy(store.grads("blocks.1.resid_pre", rows))
        torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-6)
    # not the labels gradient: the two definitions differ on the same rows
    labels = open_store(assets["stores"]["labels"])
    assert not np.allclose(labels.grads("blocks.1.resid_pre", slice(0, 64)),
                           store.grads("blocks.1.resid_pre", slice(0, 64)), atol=1e-6)


def test_gsae_records_its_gradient_target_and_resume_refuses_another(assets, tmp_path):
    fit(TrainConfig(store=assets["stores"]["model-top1"], out=str(tmp_path / "g"), arch="gtopk", k=(2,), d_sae=32,
                    batch_size=64, tokens=64 * 3, device="cpu", checkpoint_every=10**9), progress=False)
    cfg = json.loads((tmp_path / "g" / "gtopk_k2" / "cfg.json").read_text())
    assert cfg["sae_harvest"]["grad_target"] == "model-top1"
    r = CliRunner().invoke(harvest_cli, ["run", "--model", assets["model"], "--dataset", assets["corpus"],
                                         "--out", assets["stores"]["labels"], "--grads", "--grad-target", "bogus"])
    assert r.exit_code == 2 and "--grad-target" in r.output, r.output
