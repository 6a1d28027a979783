"""Stop 16 safety review, items 1, 4, 7 and evaluate features' Ctrl-C: what the commands write, or
delete, where the user points them. Each test fails on the code before its fix.

1. --json / --plot (and the demo's reports) replace only a report of this tool's; never a store's
   zarr.json, an SAE's cfg.json or a user's file; no temporary left behind.
4. harvest run --overwrite refuses a store holding what is not part of it (an SAE trained into it).
7. A literal path holding '[' is that path, not a glob pattern (--sae, --dataset).
"""
import hashlib
import json
import os

import pytest
from click.testing import CliRunner

from sae_harvest.evaluate.cli import main as evaluate_cli
from sae_harvest.harvest.cli import main as harvest_cli
from sae_harvest.stores.errors import UserError
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_io import save_sae
from tests.test_train_loop import make_store

SITE = "blocks.0.resid_pre"
D = 16     # make_store's width


def snapshot(root) -> dict:
    """Every file's sha256 and every folder under root."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel + "/"] = "dir"
        for name in files:
            out[os.path.join(rel, name)] = hashlib.sha256(open(os.path.join(dirpath, name), "rb").read()).hexdigest()
    return out


def one_error_line(result, *words):
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    for w in words:
        assert w in lines[0], result.output


@pytest.fixture(scope="module")
def sae_and_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("outsafety")
    make_store(root / "s.zarr", n_seqs=16, window_seqs=8)
    sae = root / "run" / "topk_k4"
    save_sae(make_sae(SAEConfig("topk", D, 32, k=4)), sae, extra_cfg={"hook_name": SITE})
    return root, str(sae), str(root / "s.zarr")


def _geometry(sae, *extra):
    return CliRunner().invoke(evaluate_cli, ["geometry", "--sae", sae, "--device", "cpu", "--quiet", *map(str, extra)])


# ---- item 1 -----------------------------------------------------------------------------------
def test_json_and_plot_never_replace_what_this_tool_did_not_write(sae_and_store, tmp_path):
    root, sae, store = sae_and_store
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.json").write_text('{"years": "of work"}\n')
    (mine / "g-nn.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"a user's figure")
    (mine / "jdir").mkdir()
    before = snapshot(root), snapshot(tmp_path)
    for args, words in (
            (["--json", f"{store}/zarr.json"], ["zarr.json", "Zarr store"]),   # the store's own metadata
            (["--json", f"{store}/report.json"], ["report.json", "Zarr store"]),   # a new file inside the store
            (["--json", f"{sae}/cfg.json"], ["cfg.json"]),                     # the SAE's own config
            (["--json", mine / "notes.json"], ["notes.json", "is not a report of this tool"]),
            (["--plot", mine / "g"], ["g-nn.png", "is not a report of this tool"]),
            (["--json", mine / "jdir"], ["jdir", "folder"])):
        r = _geometry(sae, *args)
        one_error_line(r, *words)
        assert (snapshot(root), snapshot(tmp_path)) == before, args   # nothing changed, no temporary left


def test_a_rerun_replaces_its_own_report_and_plots(sae_and_store, tmp_path):
    _, sae, _ = sae_and_store
    for _ in range(2):
        r = _geometry(sae, "--json", tmp_path / "g.json", "--plot", tmp_path / "g")
        assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path)) == ["g-nn.png", "g.json"]       # no temporary left behind
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["config"]["written_by"] == "sae_harvest evaluate geometry"
    from sae_harvest.evaluate.report import is_own_plot
    assert is_own_plot(tmp_path / "g-nn.png")
    # the report reads back as its result (written_by sits in config, a plain dict)
    from sae_harvest.evaluate.results import GeometryResult
    assert GeometryResult.from_dict(doc).config["written_by"].startswith("sae_harvest")


def test_splice_writers_refuse_a_foreign_file(tmp_path):
    from sae_harvest.evaluate.report import write_json, write_plot

    rows = [{"name": "topk_k4", "arch": "topk", "site": SITE, "model": "m", "tokens": 10, "loss": "local",
             "k": 4, "l1": None, "l0": 4.0, "alive": 10, "ce_increase": 0.25}]
    cfg_json, png = tmp_path / "eval.json", tmp_path / "p.png"
    cfg_json.write_text('{"architecture": "topk"}')
    png.write_bytes(b"\x89PNG\r\n\x1a\nnot ours")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="is not a report of this tool"):
        write_json(rows, cfg_json)
    with pytest.raises(UserError, match="is not a report of this tool"):
        write_plot(rows, png)
    assert snapshot(tmp_path) == before
    write_json(rows, tmp_path / "r.json")     # new paths are written, and written again
    write_json(rows, tmp_path / "r.json")
    assert write_plot(rows, tmp_path / "q.png") == [str(tmp_path / "q.png")]
    write_plot(rows, tmp_path / "q.png")


def test_write_artifact_leaves_no_temporary_when_the_path_is_a_folder(tmp_path):
    from sae_harvest.stores.artifacts import write_artifact

    (tmp_path / "jdir").mkdir()
    with pytest.raises(OSError):
        write_artifact(tmp_path / "jdir", {"a": 1})
    assert os.listdir(tmp_path) == ["jdir"] and os.listdir(tmp_path / "jdir") == []


@pytest.mark.parametrize("name", ["results.json", "pareto.png", "timing.json"])
def test_demo_refuses_foreign_outputs_before_any_work(tmp_path, monkeypatch, name):
    from sae_harvest.evaluate import demo

    def no_work(*a, **k):
        raise AssertionError("the demo started work before checking its outputs")

    monkeypatch.setattr(demo, "harvest", no_work)
    out = tmp_path / "demo-out"
    out.mkdir()
    (out / name).write_bytes(b"a user's file")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=name):
        demo.run_demo(str(out))
    assert snapshot(tmp_path) == before


# ---- item 4 -----------------------------------------------------------------------------------
def test_overwrite_refuses_a_store_holding_foreign_content(tmp_path):
    from sae_harvest.harvest import outpath

    out = tmp_path / "h.zarr"
    make_store(out, n_seqs=16, window_seqs=8)
    sae = out / "saes" / "topk_k4"        # `train fit --out h.zarr/saes`
    save_sae(make_sae(SAEConfig("topk", D, 32, k=4)), sae, extra_cfg={"hook_name": SITE})
    (out / "NOTES.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(UserError, match=r"\(saes, NOTES.txt\)"):   # the plan, before a model is loaded
        outpath.plan_target(str(out), resume=False, overwrite=True)
    # the command line: refused before the model is loaded (only its config is here, for the site check)
    from transformers import GPT2Config
    GPT2Config(n_layer=2, n_embd=D, n_head=2).save_pretrained(tmp_path / "model")
    r = CliRunner().invoke(harvest_cli, [
        "run", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "no.jsonl"), "--tokens", "512",
        "--sites", SITE, "--device", "cpu", "--out", str(out), "--quiet", "--overwrite"])
    one_error_line(r, "NOTES.txt", "saes", "--overwrite")
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["h.zarr", "model"]


def test_overwrite_looks_inside_the_arrays_too(tmp_path):
    from sae_harvest.harvest import outpath

    out = tmp_path / "x.zarr"
    make_store(out, n_seqs=16, window_seqs=8)
    outpath.plan_target(str(out), resume=False, overwrite=True)      # a store holding only its own
    (out / "acts" / SITE / "features").mkdir()                        # `evaluate features --out` inside it
    (out / "acts" / SITE / "features" / "index.html").write_text("<html>")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=f"acts/{SITE}/features"):
        outpath.plan_target(str(out), resume=False, overwrite=True)
    assert snapshot(tmp_path) == before


def test_swap_checks_the_old_store_again(tmp_path):
    from sae_harvest.harvest import outpath

    final, build = tmp_path / "x.zarr", tmp_path / ("x.zarr" + outpath.BUILD_SUFFIX)
    make_store(final, n_seqs=16, window_seqs=8)
    # planned while the old store was clean; an SAE trained into it before the swap stops the swap
    target = outpath.plan_target(str(final), resume=False, overwrite=True)
    make_store(build, n_seqs=16, window_seqs=8, seed=1)
    (final / "saes").mkdir()
    (final / "saes" / "sae_weights.safetensors").write_bytes(b"weights")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="saes.*--resume"):
        target.swap()
    assert snapshot(tmp_path) == before


# ---- item 7 -----------------------------------------------------------------------------------
def test_sae_path_with_brackets_is_literal_when_it_exists(tmp_path, monkeypatch):
    from sae_harvest.evaluate.sweeps import expand_saes

    monkeypatch.chdir(tmp_path)
    for folder in ("gl/sae[1]", "gl/sae1", "[blink]run/topk_k4"):
        os.makedirs(folder)
        (tmp_path / folder / "cfg.json").write_text("{}")
    assert expand_saes(["gl/sae[1]"]) == ("gl/sae[1]",)
    assert expand_saes(["[blink]run/topk_k4"]) == ("[blink]run/topk_k4",)
    assert expand_saes(["[blink]run"]) == ("[blink]run/topk_k4",)     # a sweep folder
    assert expand_saes(["gl/sae[0-9]"]) == ("gl/sae1",)               # no such path: a pattern


def test_dataset_path_with_brackets_is_literal(tmp_path, monkeypatch):
    from sae_harvest.harvest.data import _local_files, open_dataset

    monkeypatch.chdir(tmp_path)
    for name, text in (("gx/d[1].jsonl", "the bracketed file"), ("gx/d1.jsonl", "another file"),
                       ("gx/corp[1]/a.jsonl", "the bracketed folder"), ("gx/corp1/b.jsonl", "another folder")):
        os.makedirs(os.path.dirname(name), exist_ok=True)
        with open(name, "w") as f:
            f.write(json.dumps({"text": text}) + "\n")
    assert _local_files("gx/corp[1]") == ("json", ["gx/corp[1]/a.jsonl"])
    assert next(iter(open_dataset("gx/d[1].jsonl")))["text"] == "the bracketed file"
    assert next(iter(open_dataset("gx/corp[1]")))["text"] == "the bracketed folder"


# ---- evaluate features: Ctrl-C is 130 like every command ----------------------------------------
def test_features_interrupted_exits_130(tmp_path, monkeypatch):
    from sae_harvest.evaluate import features

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "run_features", interrupted)
    r = CliRunner().invoke(evaluate_cli, ["features", "--store", str(tmp_path / "s.zarr"), "--sae",
                                          str(tmp_path / "sae"), "--out", str(tmp_path / "f"), "--quiet"])
    assert r.exit_code == 130 and "interrupted" in r.output, r.output


def test_nothing_is_written_inside_a_store_through_a_symlink_or_a_v2_group(tmp_path):
    """--out / --json under a store, reached through a symlink, or in a folder holding a Zarr v2
    .zgroup: refused like a path straight into the store (stores.artifacts.enclosing_store)."""
    from sae_harvest.stores.artifacts import check_report_folder, enclosing_store
    from sae_harvest.stores.errors import UserError
    from sae_harvest.evaluate.features import check_out
    from sae_harvest.train.config import TrainConfig
    from sae_harvest.train.runs import check_output

    store = tmp_path / "s.zarr"
    (store / "acts").mkdir(parents=True)
    (store / "zarr.json").write_text("{}")
    (store / "acts" / "zarr.json").write_text("{}")
    (tmp_path / "link").symlink_to(store / "acts")
    v2 = tmp_path / "old.zarr"
    v2.mkdir()
    (v2 / ".zgroup").write_text("{}")
    assert enclosing_store(tmp_path / "link" / "x") == store.resolve()     # the outermost, not acts
    for bad in (tmp_path / "link" / "r.json", v2 / "r.json"):
        with pytest.raises(UserError, match="inside the Zarr store"):
            check_report_folder(bad)
    with pytest.raises(UserError, match="inside the Zarr store"):
        check_out(str(tmp_path / "link" / "feat"))
    with pytest.raises(UserError, match="inside the store"):
        check_output(TrainConfig(store=str(store), out=str(tmp_path / "link" / "saes")), resume=False, overwrite=False)
