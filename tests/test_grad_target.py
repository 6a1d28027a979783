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


def test_an_sae_from_a_sibling_store_is_proved_outside_the_evaluated_split(assets, tmp_path):
    """The label-free g-SAE trains on the model-top1 store and is evaluated on the labels store
    (bench/pareto.py): two harvests of one corpus with one split. cfg.json records the other store's
    creation id, so the id alone proves nothing; the training store, still readable, holding out the
    same sequences token by token does (stores/split.py same_held_out). Moved away, or replaced by
    another harvest at its path, it proves nothing again."""
    import shutil

    from sae_harvest.evaluate.cli import main as evaluate_cli

    lf = str(tmp_path / "lf.zarr")
    shutil.copytree(assets["stores"]["model-top1"], lf)
    fit(TrainConfig(store=lf, out=str(tmp_path / "g"), arch="gtopk", k=(2,), d_sae=32, batch_size=64,
                    tokens=64 * 3, device="cpu", checkpoint_every=10**9), progress=False)

    def splice():
        out = tmp_path / "r.json"
        r = CliRunner().invoke(evaluate_cli, ["splice", "--sae", str(tmp_path / "g" / "gtopk_k2"), "--store",
                                              assets["stores"]["labels"], "--device", "cpu", "--json", str(out),
                                              "--quiet", "--batch-size", "16"])
        assert r.exit_code == 0, r.output
        return {x["trained_outside_split"] for x in json.loads(out.read_text())["results"]}, r.output

    got, said = splice()
    assert got == {True} and "may include training tokens" not in said
    moved = tmp_path / "moved.zarr"
    shutil.move(lf, moved)
    got, said = splice()
    assert got == {False} and "may include training tokens" in said
    # another harvest at the recorded path: same corpus and split, another creation id
    shutil.copytree(assets["stores"]["labels"], lf)
    got, _ = splice()
    assert got == {False}


def test_same_held_out_compares_the_held_out_sequences_token_by_token():
    from sae_harvest.stores.split import Split, same_held_out

    class Tokens:
        def __init__(self, a):
            self.a = a

        def get_orthogonal_selection(self, sel):
            return self.a[sel[0]]

    class Store:
        def __init__(self, tokens, every=4):
            self.tokens, self.n_seqs, self.ctx_len, self.split = Tokens(tokens), len(tokens), tokens.shape[1], \
                Split(every, "harvest")

    rng = np.random.default_rng(0)
    a = rng.integers(0, 50, size=(20, 8))
    b = a.copy()
    b[5] += 1                                        # a training sequence differs: still the same split
    assert same_held_out(Store(a), Store(b), chunk=2)
    c = a.copy()
    c[12, 3] += 1                                    # a held-out one (12 % 4 == 0) differs by one token
    assert not same_held_out(Store(a), Store(c), chunk=2)
    assert same_held_out(Store(a), Store(c), sequences=3, chunk=2)   # only 0, 4, 8 evaluated
    assert not same_held_out(Store(a), Store(a, every=5))
    assert not same_held_out(Store(a[:10]), Store(a))   # b's held-out 12, 16 are not in a
