"""Issue 22 item 7: the top-level imports, what a loaded SAE knows, the snippets of
docs/python-api.md (run as written), `harvest info`, and one exit status per cause."""
import json
import re
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sae_harvest
from sae_harvest.harvest.cli import main as harvest_cli
from sae_harvest.stores.urls import scrub
from sae_harvest.train.fit import fit
from tests.test_train_loop import _cfg, make_store

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """store.zarr and a `train fit` sweep at saes/topk (topk_k32), as the docs' snippets expect."""
    root = tmp_path_factory.mktemp("api")
    make_store(root / "store.zarr")
    fit(_cfg(root / "store.zarr", root / "saes" / "topk", k=(32,), tokens=256 * 4), progress=False)
    return root


def test_top_level_imports():
    from sae_harvest import __version__, load_sae, open_store
    from sae_harvest.stores import open_store as stores_open
    from sae_harvest.train import load_sae as train_load

    assert load_sae is train_load and open_store is stores_open
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", __version__)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{__version__}"' in pyproject
    with pytest.raises(AttributeError):
        sae_harvest.no_such_thing


def test_loaded_sae_knows_site_hook_model_store(workdir):
    from sae_harvest import load_sae

    sae = load_sae(workdir / "saes" / "topk" / "topk_k32")
    assert sae.site == "blocks.0.resid_pre" and sae.hook_name == "blocks.0.hook_resid_pre"
    p = sae.provenance
    assert (p.model, p.store, p.sweep_name) == ("synthetic", scrub(str(workdir / "store.zarr")), "topk_k32")
    saelens = json.loads((workdir / "saes" / "topk" / "topk_k32" / "cfg.json").read_text())
    assert sae.hook_name == saelens["hook_name"]            # SAELens's cfg.hook_name, the same string


def _snippets():
    text = (ROOT / "docs" / "python-api.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_python_api_doc_snippets_run_as_written(workdir, monkeypatch):
    from sae_harvest import load_sae, open_store

    monkeypatch.chdir(workdir)
    snippets = _snippets()
    assert len(snippets) == 4
    spaces = []
    for code in snippets:
        ns = {}
        exec(compile(code, "docs/python-api.md", "exec"), ns)
        spaces.append(ns)
    _, loaded, encoded, read = spaces
    assert loaded["sae"].site == "blocks.0.resid_pre"
    # the encode snippet against an independent computation on the same rows
    sae, store = load_sae("saes/topk/topk_k32"), open_store("store.zarr")
    x = torch.from_numpy(np.asarray(store.acts("blocks.0.resid_pre", np.arange(1024)), dtype=np.float32))
    assert torch.equal(encoded["x"], x)
    assert encoded["feats"].shape == (1024, 64) and torch.allclose(encoded["x_hat"], sae(x))
    assert float(encoded["l0"]) <= 32
    # the read snippet saw every training row after position 0, once
    assert read["n"] == store.n_rows - store.n_seqs
    assert set(read["first"]["acts"]) == {read["site"]}


def test_harvest_info_human_and_json(workdir):
    store = str(workdir / "store.zarr")
    r = CliRunner().invoke(harvest_cli, ["info", store])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.replace("│", " ").split())
    for expect in ("model synthetic", "blocks.0.resid_pre (d=16, float32)", "2,048 in 64 sequences of 32",
                   "MiB", "complete yes", "gradients yes"):
        assert expect in flat, (expect, r.output)
    r = CliRunner().invoke(harvest_cli, ["info", store, "--json"])
    info = json.loads(r.output)
    assert info["rows"] == 2048 and info["seqs"] == 64 and info["complete"] is True and info["model"] == "synthetic"
    assert info["sites"]["blocks.1.resid_pre"] == {"d": 16, "encoding": "float16"}
    assert info["bytes"] == sum(f.stat().st_size for f in (workdir / "store.zarr").rglob("*") if f.is_file())
    assert info["attrs"]["n_rows"] == 2048


def test_harvest_info_prints_user_text_literally(tmp_path):
    from sae_harvest.stores import StoreWriter

    w = StoreWriter.create(str(tmp_path / "m.zarr"), meta={"model": {"name": "[bold red]x[/bold red]"}},
                           sites={"blocks.0.resid_pre": {"d": 4, "encoding": "float32"}}, grads=None,
                           ctx_len=2, n_seqs=2, window_seqs=2)
    w.write_window(0, np.zeros((2, 2), dtype=np.int64), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]),
                   {"blocks.0.resid_pre": np.ones((4, 4), dtype=np.float32)}, None)
    w.finish(2)
    r = CliRunner().invoke(harvest_cli, ["info", str(tmp_path / "m.zarr")])
    assert "[bold red]x[/bold red]" in r.output


def _entry_exit(monkeypatch, module_entry, argv):
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        module_entry()
    return e.value.code


@pytest.mark.parametrize("command", ["harvest", "train", "evaluate splice", "evaluate meta"])
def test_ctrl_c_exits_130_and_a_bug_70_in_every_command(command, monkeypatch, tmp_path, capsys):
    """Ctrl-C was 130 in training but 2 in harvesting; an unexpected error exits 70, not 1 (verify's)."""
    from sae_harvest.evaluate import cli as evaluate_cli, meta, replace
    from sae_harvest.harvest import cli as harvest_cli_mod, run
    from sae_harvest.train import cli as train_cli_mod, fit as fit_mod

    target, entry, argv = {
        "harvest": (run, harvest_cli_mod.entry, ["harvest", "run", "--out", str(tmp_path / "s.zarr")]),
        "train": (fit_mod, train_cli_mod.entry, ["train", "fit", "--out", str(tmp_path / "o"), "--store", "x"]),
        "evaluate splice": (replace, evaluate_cli.entry, ["evaluate", "splice", "--sae", "x", "--store", "y"]),
        "evaluate meta": (meta, evaluate_cli.entry, ["evaluate", "meta", "--sae", "x", "--meta", "y"]),
    }[command]
    name = {"harvest": "harvest", "train": "fit", "evaluate splice": "evaluate_all", "evaluate meta": "run_meta"}[command]
    for exc, code in ((KeyboardInterrupt, 130), (RuntimeError, 70)):
        def boom(*a, **k):
            raise exc("boom")
        monkeypatch.setattr(target, name, boom)
        assert _entry_exit(monkeypatch, entry, argv) == code, command
        err = capsys.readouterr().err
        if code == 130:
            assert err.strip().startswith("error: interrupted") and len(err.strip().splitlines()) == 1, err
        else:
            # a bug is one scrubbed line too (SAE_HARVEST_TRACEBACK=1 adds the traceback)
            assert err.strip().startswith("error: RuntimeError: boom") and len(err.strip().splitlines()) == 1, err
            assert "Traceback" not in err


def test_harvest_info_gives_no_content_digest_for_a_partial_store(tmp_path):
    """The records of a store that never finished are not its data: no digest in --json or the table;
    the same store finished has one."""
    from sae_harvest.stores import StoreWriter

    w = StoreWriter.create(str(tmp_path / "p.zarr"), meta={"model": {"name": "m"}},
                           sites={"blocks.0.resid_pre": {"d": 4, "encoding": "float32"}}, grads=None,
                           ctx_len=2, n_seqs=4, window_seqs=2)
    w.write_window(0, np.zeros((2, 2), dtype=np.int64), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]),
                   {"blocks.0.resid_pre": np.ones((4, 4), dtype=np.float32)}, None)
    r = CliRunner().invoke(harvest_cli, ["info", str(tmp_path / "p.zarr"), "--partial", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["complete"] is False and info["content_digest"] is None
    r = CliRunner().invoke(harvest_cli, ["info", str(tmp_path / "p.zarr"), "--partial"])
    assert r.exit_code == 0 and "content" not in r.output.replace("complete", ""), r.output
    w.write_window(1, np.ones((2, 2), dtype=np.int64), np.array([2, 2, 3, 3]), np.array([0, 1, 0, 1]),
                   {"blocks.0.resid_pre": np.ones((4, 4), dtype=np.float32)}, None)
    w.finish(4)
    r = CliRunner().invoke(harvest_cli, ["info", str(tmp_path / "p.zarr"), "--json"])
    assert len(json.loads(r.output)["content_digest"]) == 64
