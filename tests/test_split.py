"""The store's held-out split (issue 18 item 1, issue 22 item 2): no row of an evaluated sequence is
ever in a training batch (local feed and e2e, counted), the split is recorded and shown, evaluation
refuses more tokens than it holds and says where its tokens came from, --dataset --skip-docs."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sae_harvest.evaluate.cli import main as evaluate_cli
from sae_harvest.evaluate.config import EvalConfig
from sae_harvest.evaluate.eval_tokens import store_tokens
from sae_harvest.harvest.cli import main as harvest_cli
from sae_harvest.harvest.run import HarvestConfig, harvest
from sae_harvest.stores import open_store
from sae_harvest.train import feeds
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_io import save_sae
from tests.test_train_loop import make_store
from tests.tiny_models import make_tiny_model, write_corpus

CTX = 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    corpus = write_corpus(root / "docs.jsonl", n_docs=300, max_words=60)
    model = make_tiny_model("gpt2", root / "gpt2")
    store = root / "s.zarr"
    harvest(HarvestConfig(out=str(store), model=model, dataset=str(corpus), sites="blocks.1.resid_pre",
                          tokens=4096, ctx_len=CTX, batch_size=16, shuffle_window=1024, device="cpu",
                          eval_every=10), progress=False)
    return {"root": root, "corpus": corpus, "model": model, "store": str(store)}


def _evaluated_seqs(store_path) -> set[int]:
    """Sequence ids of what `evaluate splice --store` reads by default, found by their tokens."""
    ids = store_tokens(store_path, EvalConfig().tokens, None)[0].numpy()
    tokens = np.asarray(open_store(store_path).tokens[:])
    index = {tuple(row): s for s, row in enumerate(tokens.tolist())}
    assert len(index) == len(tokens)   # every stored sequence is distinct, so the lookup is exact
    return {index[tuple(row)] for row in ids.tolist()}


def test_local_feed_never_trains_on_an_evaluated_sequence(tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    make_store(store)     # written without a split: the one derived at read time applies
    trained_rows = []
    init = feeds.StoreFeed.__init__

    def spy_init(self, *args, **kwargs):   # record the rows of every batch the training feed yields
        init(self, *args, **kwargs)
        inner = self.iter

        class Spy:
            encodings = inner.encodings

            def __iter__(self):
                for batch in inner:
                    trained_rows.append(np.array(batch["rows"]))
                    yield batch

            def state(self):
                return inner.state()
        self.iter = Spy()

    monkeypatch.setattr(feeds.StoreFeed, "__init__", spy_init)
    fit(TrainConfig(store=str(store), out=str(tmp_path / "o"), site="blocks.0.resid_pre", arch="topk", k=(4,),
                    d_sae=32, batch_size=256, tokens=256 * 30, device="cpu", checkpoint_every=10**9),
        progress=False)
    s = open_store(str(store))
    rows = np.concatenate(trained_rows)
    trained_seqs = np.asarray(s.rows_seq[:])[rows]
    evaluated = _evaluated_seqs(str(store))
    assert len(rows) == 256 * 30 and evaluated
    assert np.isin(trained_seqs, list(evaluated)).sum() == 0
    # several epochs: every training sequence was seen, so the split is all that kept those out
    assert set(trained_seqs.tolist()) | evaluated == set(range(s.n_seqs))


def test_e2e_never_trains_on_an_evaluated_sequence(assets, tmp_path):
    trained = []
    summary = fit(TrainConfig(store=assets["store"], out=str(tmp_path / "e"), loss="e2e", arch="relu", l1=(0.1,),
                              d_sae=64, batch_size=8 * CTX, tokens=8 * CTX * 30, device="cpu",
                              checkpoint_every=10**9), progress=False,
                  on_step=lambda event: trained.append(event.inputs.clone()))["relu_l1-0.1"]
    tokens = np.asarray(open_store(assets["store"]).tokens[:])
    index = {tuple(row): s for s, row in enumerate(tokens.tolist())}
    trained_seqs = {index[tuple(row)] for row in torch.cat(trained).tolist()}
    evaluated = _evaluated_seqs(assets["store"])
    assert len(trained) == 30 and evaluated == set(range(0, 128, 10))
    assert trained_seqs & evaluated == set()
    assert trained_seqs | evaluated == set(range(128))   # 240 drawn sequences cover every training one
    origin = summary["held_out"]["origin"]
    assert (origin["held_out_seqs"], origin["tokens"], origin["every"]) == (13, 13 * CTX, 10)


def test_split_recorded_shown_by_verify_and_info(assets, tmp_path):
    s = open_store(assets["store"])
    assert s.attrs["split"] == {"rule": "seq % every == 0", "every": 10, "origin": "harvest"}
    r = CliRunner().invoke(harvest_cli, ["verify", assets["store"]])
    assert r.exit_code == 0, r.output
    assert "held out: 13 held-out sequences (416 tokens) of 128: every 10th" in r.output
    from sae_harvest.stores.identity import content_digest
    assert f"content: {content_digest(s)} (same data, same digest)" in r.output
    r = CliRunner().invoke(harvest_cli, ["info", assets["store"], "--json"])
    assert json.loads(r.output)["split"]["held_out_seqs"] == 13
    assert json.loads(r.output)["content_digest"] == content_digest(s)
    r = CliRunner().invoke(harvest_cli, ["info", assets["store"]])
    assert "13 held-out sequences (416 tokens)" in " ".join(r.output.split()), r.output
    older = tmp_path / "old.zarr"
    make_store(older)
    r = CliRunner().invoke(harvest_cli, ["verify", str(older)])
    assert r.exit_code == 0 and "every 20th (seq % 20 == 0), derived at read time" in r.output, r.output
    # a bad --eval-every: one line, exit 2, nothing written
    out = tmp_path / "bad.zarr"
    r = CliRunner().invoke(harvest_cli, ["run", "--model", assets["model"], "--dataset", assets["corpus"],
                                         "--out", str(out), "--eval-every", "1", "--device", "cpu"])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "--eval-every" in r.output, r.output
    assert not out.exists()


def _sae(path, dataset=None):
    extra = {"hook_name": "blocks.1.resid_pre"}
    if dataset:
        extra["dataset_path"] = dataset
    save_sae(make_sae(SAEConfig("relu", 64, 32)), path, extra_cfg=extra)
    return str(path)


def test_splice_refuses_more_tokens_than_held_out_and_says_where_its_tokens_came_from(assets, tmp_path):
    sae = _sae(tmp_path / "sae")
    out = tmp_path / "r.json"
    r = CliRunner().invoke(evaluate_cli, ["splice", "--sae", sae, "--store", assets["store"], "--tokens", "417",
                                          "--device", "cpu", "--json", str(out), "--quiet"])
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and "held-out" in r.output and "at most 416" in r.output
    assert not out.exists()
    r = CliRunner().invoke(evaluate_cli, ["splice", "--sae", sae, "--store", assets["store"], "--device", "cpu",
                                          "--json", str(out), "--quiet", "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    assert "416 tokens from 13 of the 13 held-out sequences" in " ".join(r.output.split())
    (res,) = json.loads(out.read_text())["results"]
    assert res["tokens"] == 416 and res["eval_tokens"]["held_out_seqs"] == 13
    assert res["eval_tokens"]["source"] == "store" and res["eval_tokens"]["origin"] == "harvest"
    assert res["trained_outside_split"] is False    # saved by hand: no record of the split it trained under


def test_dataset_overlap_warning_and_skip_docs(assets, tmp_path):
    from sae_harvest.evaluate.eval_tokens import dataset_tokens
    from sae_harvest.harvest.models import load_model

    _, tokenizer = load_model(assets["model"])
    lines = open(assets["corpus"]).read().splitlines()
    rest = tmp_path / "rest.jsonl"
    rest.write_text("\n".join(lines[40:]) + "\n")
    skipped, origin = dataset_tokens(assets["corpus"], tokenizer, 4 * CTX, CTX, "train", "text", skip_docs=40)
    reference, _ = dataset_tokens(str(rest), tokenizer, 4 * CTX, CTX, "train", "text")
    assert torch.equal(skipped, reference) and origin["skip_docs"] == 40 and origin["tokens"] == 4 * CTX
    sae = _sae(tmp_path / "sae", dataset=assets["corpus"])
    base = ["splice", "--sae", sae, "--dataset", assets["corpus"], "--model", assets["model"], "--ctx-len",
            str(CTX), "--tokens", str(2 * CTX), "--device", "cpu", "--quiet"]
    r = CliRunner().invoke(evaluate_cli, base)
    assert r.exit_code == 0 and "texts overlap" in r.output and "--skip-docs" in r.output, r.output
    r = CliRunner().invoke(evaluate_cli, base + ["--skip-docs", "40"])
    assert r.exit_code == 0 and "overlap" not in r.output, r.output
    assert "after 40 documents" in " ".join(r.output.split())


def test_resume_refuses_another_eval_every(assets, tmp_path):
    """--resume --eval-every N on a store with another split: refused in one line, nothing changed
    (it was ignored silently: the store's split won without a word)."""
    import hashlib
    import shutil

    store = tmp_path / "copy.zarr"
    shutil.copytree(assets["store"], store)

    def tree():
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(store.rglob("*")) if p.is_file()}

    before = tree()
    r = CliRunner().invoke(harvest_cli, ["run", "--model", assets["model"], "--dataset", assets["corpus"],
                                         "--out", str(store), "--sites", "blocks.1.resid_pre", "--tokens", "4096",
                                         "--ctx-len", str(CTX), "--batch-size", "16", "--shuffle-window", "1024",
                                         "--eval-every", "20", "--device", "cpu", "--resume", "--quiet"])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0, r.output
    assert "every 10th sequence, not every 20th" in r.output, r.output
    assert tree() == before
