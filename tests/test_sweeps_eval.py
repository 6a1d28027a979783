"""Issue 22 item 5: sweeps are first-class in `evaluate`: --sae takes a sweep folder or a glob
(expanded by the command), rows name run and swept value, Pareto points carry their k/λ labels, and
the CLI lists every file it wrote."""
import json

import pytest
import torch
from click.testing import CliRunner

from sae_harvest.evaluate.cli import main as evaluate_cli
from sae_harvest.evaluate.report import point_label, write_plot
from sae_harvest.evaluate.sweeps import expand_saes, name_rows
from sae_harvest.stores.errors import UserError
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_io import save_sae
from tests.tiny_models import make_tiny_model, write_corpus

D, HOOK = 64, "blocks.1.resid_pre"


def _sweep(root, run, ks, d_sae=32):
    for i, k in enumerate(ks):
        torch.manual_seed(i)
        save_sae(make_sae(SAEConfig("topk", D, d_sae, k=k)), root / run / f"topk_k{k}",
                 extra_cfg={"hook_name": HOOK, "sweep_name": f"topk_k{k}"})
    (root / run / "checkpoint").mkdir()          # what `train fit` leaves besides the SAEs
    (root / run / "checkpoint" / "state.json").write_text("{}")
    return root / run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    _sweep(root, "a", (4, 16))
    _sweep(root, "b", (16,))
    return root


def test_sweep_folders_and_globs_expand_to_every_sae(runs):
    a, b = str(runs / "a"), str(runs / "b")
    assert expand_saes([a]) == (f"{a}/topk_k16", f"{a}/topk_k4")
    assert expand_saes([str(runs / "*" / "topk_k16")]) == (f"{a}/topk_k16", f"{b}/topk_k16")
    assert expand_saes([a, f"{a}/topk_k4", b]) == (f"{a}/topk_k16", f"{a}/topk_k4", f"{b}/topk_k16")
    assert expand_saes([str(runs / "missing")]) == (str(runs / "missing"),)   # the loader says what is wrong
    with pytest.raises(UserError, match="matches nothing"):
        expand_saes([str(runs / "z*")])
    with pytest.raises(UserError, match="no SAE there"):
        expand_saes([str(runs / "a" / "checkpoint")])


def test_rows_name_run_and_swept_value():
    rows = [{"sae": "/x/a/topk_k16", "name": "topk_k16", "sweep_name": "topk_k16", "k": 16, "l1": None},
            {"sae": "/x/b/topk_k16", "name": "topk_k16", "sweep_name": "topk_k16", "k": 16, "l1": None},
            {"sae": "/x/b/relu_l1-300", "name": "relu_l1-300", "sweep_name": "relu_l1-300", "k": None, "l1": 300.0}]
    name_rows(rows)
    assert [r["name"] for r in rows] == ["a/topk_k16", "b/topk_k16", "b/relu_l1-300"]
    assert [r["run"] for r in rows] == ["a", "b", "b"] and [r["swept"] for r in rows] == ["k=16", "k=16", "l1=300"]
    one_run = [dict(rows[1]), dict(rows[2])]
    for r in one_run:
        r["name"] = r["sweep_name"]
    assert [r["name"] for r in name_rows(one_run)] == ["topk_k16", "relu_l1-300"]   # no prefix needed
    assert [point_label(r) for r in rows] == ["a k16", "b k16", "b λ300"]


def test_pareto_points_carry_their_labels(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    real = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", lambda self, text, *a, **k: (labels.append(text),
                                                                                      real(self, text, *a, **k))[1])
    rows = [{"name": f"topk_k{k}", "arch": "topk", "site": HOOK, "model": "m", "tokens": 10, "loss": "local",
             "k": k, "l1": None, "l0": float(k), "alive": 10, "ce_increase": 1.0 / k} for k in (4, 16)]
    write_plot(rows, tmp_path / "p.png")
    assert sorted(labels) == ["k16", "k16", "k4", "k4"]      # both panels
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_splice_cli_takes_a_sweep_folder_and_a_glob_and_lists_what_it_wrote(runs, tmp_path):
    model = make_tiny_model("gpt2", tmp_path / "gpt2")
    corpus = write_corpus(tmp_path / "docs.jsonl", n_docs=40, max_words=40)
    out_json, out_png = tmp_path / "r.json", tmp_path / "fig" / "p.png"
    args = ["splice", "--model", model, "--dataset", corpus, "--tokens", "32", "--ctx-len", "16", "--device",
            "cpu", "--quiet", "--sae", str(runs / "a"), "--sae", str(runs / "b" / "topk_*"),
            "--json", str(out_json), "--plot", str(out_png)]
    r = CliRunner().invoke(evaluate_cli, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(out_json.read_text())
    assert [x["name"] for x in doc["results"]] == ["a/topk_k16", "a/topk_k4", "b/topk_k16"]
    assert [x["run"] for x in doc["results"]] == ["a", "a", "b"]
    assert f"wrote {out_json}" in r.output and f"wrote {out_png}" in r.output
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(evaluate_cli, args[:-4] + ["--sae", str(runs / "nothing*"), "--json",
                                                        str(tmp_path / "bad.json")])
    assert bad.exit_code == 2 and bad.output.strip().splitlines() == [bad.output.strip()]
    assert "matches nothing" in bad.output and not (tmp_path / "bad.json").exists()
