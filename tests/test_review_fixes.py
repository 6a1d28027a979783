"""Defects a read-only review of the merged branches found (issue 16, 18, 22 seams); each test fails
on the code before its fix."""
import json

import pytest
import torch
from safetensors.torch import save_file

from sae_harvest.train.errors import TrainError
from sae_harvest.train.fit import fit
from sae_harvest.train.runs import made_by_train
from tests.test_train_loop import _cfg, make_store


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_never_removes_a_downloaded_saelens_folder_or_a_foreign_checkpoint(tmp_path):
    saelens = tmp_path / "s" / "blocks.8.hook_resid_pre"   # what SAELens's download looks like
    saelens.mkdir(parents=True)
    (saelens / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "architecture": "standard"}))
    save_file({"W_enc": torch.zeros(4, 8)}, str(saelens / "sae_weights.safetensors"))
    assert not made_by_train(tmp_path / "s")
    other = tmp_path / "o" / "checkpoint"
    other.mkdir(parents=True)
    (other / "epoch=3.ckpt").write_bytes(b"a lightning checkpoint")
    assert not made_by_train(tmp_path / "o")
    ours = tmp_path / "ours" / "topk_k4"
    ours.mkdir(parents=True)
    (ours / "cfg.json").write_text(json.dumps({"d_in": 4, "sae_harvest": {"sweep_name": "topk_k4"}}))
    (tmp_path / "ours" / "checkpoint" / "rank0").mkdir(parents=True)
    (tmp_path / "ours" / "checkpoint" / "rank0" / "state.json").write_text(json.dumps({"step": 0, "config": {}}))
    assert made_by_train(tmp_path / "ours")


def test_overwrite_refuses_a_saelens_folder_through_fit(tmp_path):
    store = tmp_path / "s.zarr"
    make_store(store, grads=False)
    out = tmp_path / "out"
    theirs = out / "blocks.8.hook_resid_pre"
    theirs.mkdir(parents=True)
    (theirs / "cfg.json").write_text(json.dumps({"d_in": 4}))
    (theirs / "sae_weights.safetensors").write_bytes(b"weights")
    before = _tree(out)
    with pytest.raises(TrainError, match="did not write"):
        fit(_cfg(store, out, tokens=256 * 2), overwrite=True, progress=False)
    assert _tree(out) == before


def test_resume_refuses_a_checkpoint_of_an_older_version(tmp_path):
    """A checkpoint saved before the held-out split (its config has holdout_fraction) trained on
    held-out sequences from another init stream: resuming it must not pass for a clean run."""
    import signal

    from sae_harvest.train.driver import TrainInterrupted

    store = tmp_path / "s.zarr"
    make_store(store, grads=False)
    out = tmp_path / "out"

    def stop(event):
        if event.step == 2:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainInterrupted):
        fit(_cfg(store, out, tokens=256 * 6), progress=False, on_step=stop)
    state = out / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    meta["config"]["holdout_fraction"] = 0.02
    state.write_text(json.dumps(meta))
    with pytest.raises(TrainError, match="older version.*holdout_fraction"):
        fit(_cfg(store, out, tokens=256 * 6), resume=True, progress=False)


def test_trained_outside_split_means_this_stores_split():
    """An SAE trained outside store A's held-out sequences says nothing of store B's, even at the same
    `every` (another harvest of the same corpus): only the same store's creation id counts."""
    from sae_harvest.evaluate.eval_tokens import trained_outside_split

    def sae(cid):
        return {"sae_harvest": {"held_out": {"rule": "seq % every == 0", "every": 20, "creation_id": cid}}}

    origin = {"source": "store", "every": 20, "creation_id": "a" * 32}
    assert trained_outside_split(sae("a" * 32), origin) is True
    assert trained_outside_split(sae("b" * 32), origin) is False
    assert trained_outside_split(sae("a" * 32), {**origin, "every": 10}) is False
    assert trained_outside_split({"sae_harvest": {}}, origin) is False
    assert trained_outside_split(sae("a" * 32), {"source": "dataset"}) is None
    # two stores from before creation ids: None == None says nothing of which store either was
    assert trained_outside_split(sae(None), {**origin, "creation_id": None}) is False


@pytest.mark.parametrize("recorded_store", ["gs://no-such-bucket/lf.zarr", "s3://no-such-bucket/lf.zarr",
                                            "/nonexistent/lf.zarr", "relative/not/here.zarr"])
def test_a_sibling_proof_that_cannot_be_made_is_false_not_an_error(recorded_store, monkeypatch):
    """The training store recorded in cfg.json is read only to prove a sibling split: a store that
    cannot be opened here (any error: credentials, a missing filesystem package, a missing path)
    leaves the SAE unproved (a warning), never stops the evaluation."""
    from sae_harvest import stores
    from sae_harvest.evaluate.eval_tokens import trained_outside_split

    def refuse(path, *a, **k):   # what botocore / fsspec raise offline, none of them OSError
        raise RuntimeError(f"cannot reach {path}")

    if "://" in recorded_store:
        monkeypatch.setattr(stores, "open_store", refuse)
    cfg = {"sae_harvest": {"store": recorded_store,
                           "held_out": {"rule": "seq % every == 0", "every": 20, "creation_id": "a" * 32}}}
    origin = {"source": "store", "every": 20, "creation_id": "b" * 32, "sequences": 1}
    assert trained_outside_split(cfg, origin, store=object()) is False


def test_a_fresh_sae_records_the_store_it_trained_outside_of(tmp_path):
    from sae_harvest.stores import open_store

    store = tmp_path / "s.zarr"
    make_store(store, grads=False)
    fit(_cfg(store, tmp_path / "o", tokens=256 * 2), progress=False)
    (folder,) = [p for p in (tmp_path / "o").iterdir() if p.name != "checkpoint"]
    held = json.loads((folder / "cfg.json").read_text())["sae_harvest"]["held_out"]
    assert held["creation_id"] == open_store(str(store)).attrs.get("creation_id")


def test_transcoders_of_a_sweep_or_of_two_layers_start_from_their_own_rows():
    """Transcoders were seeded with the bare --seed: every k of a sweep, and every layer pair of one
    shape, started from identical weights (the trap init streams remove for SAEs)."""
    import dataclasses

    from sae_harvest.train.config import TrainConfig, sweep
    from sae_harvest.train.registry import make_sae
    from sae_harvest.train.runs import seed_init

    cfg = TrainConfig(out="x", arch="topk", k=(4, 8), d_sae=64, seed=0)
    weights, streams = [], []
    for target in ("blocks.0.mlp_out", "blocks.1.mlp_out"):
        for _, sae_cfg in sweep(cfg, 16):
            sae_cfg = dataclasses.replace(sae_cfg, d_out=16)
            streams.append(seed_init(cfg, sae_cfg, target.replace("out", "in"), target=target)["stream"])
            weights.append(make_sae(sae_cfg).W_dec.detach().clone())
    assert len(set(streams)) == 4
    for i in range(4):
        for j in range(i):
            assert not torch.equal(weights[i], weights[j])
    # and the same identity gives the same weights again
    _, sae_cfg = next(iter(sweep(cfg, 16)))
    sae_cfg = dataclasses.replace(sae_cfg, d_out=16)
    seed_init(cfg, sae_cfg, "blocks.0.mlp_in", target="blocks.0.mlp_out")
    assert torch.equal(make_sae(sae_cfg).W_dec, weights[0])


def test_a_meta_sae_table_is_not_titled_held_out(tmp_path):
    """A meta-SAE's report is on the decoder rows it trained on; its table said "held-out results"."""
    from rich.console import Console

    from sae_harvest.train.local import _print_summary

    summaries = {"batchtopk_k2": {"tokens": 64, "tokens_per_s": 1.0,
                                  "held_out": {"nmse": 0.5, "explained_variance": 0.5, "l0": 2.0, "dead_fraction": 0.0}}}
    console = Console(record=True, width=120)
    _print_summary(console, summaries, meta=True)
    text = console.export_text()
    assert "held-out results" not in text and "training-row results" in text
    console = Console(record=True, width=120)
    _print_summary(console, summaries)
    assert "held-out results" in console.export_text()


def test_overwrite_replaces_a_run_interrupted_before_its_first_save(tmp_path):
    """A run stopped after a checkpoint but before any SAE was saved leaves SAE folders holding only
    metrics.jsonl beside checkpoint/<sae>.safetensors: --overwrite refused them as not ours, so the
    only way on was deleting by hand. A metrics-only folder is ours when the log is this trainer's."""
    import shutil
    import signal

    from sae_harvest.train.driver import TrainInterrupted

    store = tmp_path / "s.zarr"
    make_store(store, grads=False)
    out = tmp_path / "out"

    def stop(event):
        if event.step == 2:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainInterrupted):
        fit(_cfg(store, out, tokens=256 * 6), progress=False, on_step=stop)
    folders = [p for p in out.iterdir() if p.name != "checkpoint"]
    assert folders and all(not (p / "cfg.json").exists() for p in folders)
    assert made_by_train(out)
    fit(_cfg(store, out, tokens=256 * 2), overwrite=True, progress=False)
    assert all((p / "cfg.json").exists() for p in folders)

    # a run killed before any checkpoint leaves the metrics logs alone: this trainer's log is ours
    # (otherwise such a run could be neither resumed nor overwritten); another program's is not
    stray = tmp_path / "stray"
    (stray / folders[0].name).mkdir(parents=True)
    shutil.copy(out / folders[0].name / "metrics.jsonl", stray / folders[0].name / "metrics.jsonl")
    assert made_by_train(stray)
    (stray / folders[0].name / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n')
    assert not made_by_train(stray)
