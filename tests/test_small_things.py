"""Issue 22 item 8: the small things seen on the way (help text, --quiet, splice table, geometry plots)."""

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from sae_harvest.evaluate.cli import main as evaluate_cli
from sae_harvest.evaluate.geometry import GeometryConfig, distribution, run_geometry
from sae_harvest.evaluate.report import print_table
from sae_harvest.train.cli import main as train_cli
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_io import save_sae


def test_empty_list_options_show_no_empty_default():
    text = CliRunner().invoke(train_cli, ["fit", "--help"]).output
    assert 'default: ""' not in text and "default: )" not in text
    assert "[default: 32]" in text        # a non-empty list default is still shown (--k)


def _result(name, arch, nmse, grad_mode=None):
    return {"name": name, "arch": arch, "site": "blocks.1.resid_pre", "model": "m", "ce_clean": 3.0,
            "ce_clean_nobos": 3.1, "tokens": 1000, "splice_bos": False, "alive": 10, "d_sae": 16, "loss": "local",
            "grad_mode": grad_mode, "l0": 5.0, "ce_increase": 0.1, "nmse": nmse, "nmse_nobos": nmse}


def _render(results):
    console = Console(width=400, record=True)
    print_table(results, console)
    return console.export_text()


def test_splice_table_nmse_one_format_and_caption_mentions_gtopk_only_with_gtopk():
    text = _render([_result("a", "topk", 0.22), _result("b", "relu", 0.0983)])
    assert "0.2200" in text and "0.0983" in text
    assert "gtopk" not in text and "gradient mode" not in text
    text = _render([_result("a", "topk", 0.22), _result("g", "gtopk", 0.1, grad_mode="causal")])
    assert "gradient mode" in text


def test_geometry_histograms_span_the_data_and_share_bins(tmp_path):
    d = distribution(torch.tensor([0.1, 0.2, 0.3]), bins=4)
    edges = d["hist"]["edges"]
    assert edges[0] == pytest.approx(0.1 - 0.004) and edges[-1] == pytest.approx(0.3 + 0.004)
    assert sum(d["hist"]["counts"]) == 3
    paths = []
    for i, d_sae in enumerate((32, 48, 64)):
        torch.manual_seed(i)
        path = tmp_path / f"s{i}"
        save_sae(make_sae(SAEConfig("topk", 16, d_sae, k=4)), path, extra_cfg={"hook_name": "blocks.0.resid_pre"})
        paths.append(str(path))
    doc = run_geometry(GeometryConfig(saes=tuple(paths), bins=20, device="cpu")).to_dict()
    nn = [s["nn_cosine"]["hist"] for s in doc["saes"]]
    assert all(h["edges"] == nn[0]["edges"] for h in nn)                 # one range per figure
    assert -1 < nn[0]["edges"][0] and nn[0]["edges"][-1] < 1
    assert all(sum(c > 0 for c in h["counts"]) >= 5 for h in nn)         # the mass is spread, not in 1-3 bins
    cross = [x["hist"] for x in doc["cross"]]
    assert len(cross) == 6 and all(h["edges"] == cross[0]["edges"] for h in cross)


def test_twelve_series_have_twelve_distinct_styles():
    from sae_harvest.evaluate.analysis_report import series_styles

    styles = series_styles(12)
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 12


def test_meta_and_geometry_take_quiet(tmp_path):
    path = tmp_path / "s"
    save_sae(make_sae(SAEConfig("topk", 16, 32, k=4)), path, extra_cfg={"hook_name": "blocks.0.resid_pre"})
    r = CliRunner().invoke(evaluate_cli, ["geometry", "--sae", str(path), "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(evaluate_cli, ["meta", "--help"])
    assert "--quiet" in r.output
