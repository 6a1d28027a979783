"""bench/meta_live.py: the live rows it hands the meta-SAE are exactly the base SAE's latents that
fire on a held-out row (counted here by brute force over the store), and the restricted SAE is the
base SAE on those latents, nothing else."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_harvest.stores import open_store
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_io import load_sae, save_sae

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import meta_live  # noqa: E402

SITE = "blocks.0.resid_pre"


def _base(store, tmp_path, dead=(3, 10, 11, 40)):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig("relu", 16, 48, l1_coeff=1.0))
    with torch.no_grad():
        sae.W_enc[:, list(dead)] = 0.0
        sae.b_enc[list(dead)] = -1.0   # can never fire
        sae.b_enc[20] = -1e4           # fires on no row of this store (its rows are ~20x unit scale)
    path = tmp_path / "base"
    save_sae(sae, path, extra_cfg={"hook_name": SITE, "store": str(store)})
    return sae, str(path)


def _fires_brute_force(sae, store_path) -> np.ndarray:
    s = open_store(str(store_path))
    rows = np.flatnonzero((np.asarray(s.rows_pos[:]) != 0) & s.split.is_held_out(np.asarray(s.rows_seq[:])))
    x = torch.from_numpy(s.acts(SITE, rows)).float()
    with torch.no_grad():
        return (torch.relu(x @ sae.W_enc + sae.b_enc) > 0).sum(0).numpy()


def test_the_live_sae_is_the_base_on_its_firing_latents(store, tmp_path):
    sae, base = _base(store, tmp_path)
    fires = _fires_brute_force(sae, store)
    expect = np.flatnonzero(fires > 0).tolist()
    assert not set(expect) & {3, 10, 11, 40, 20} and len(expect) > 30
    args = type("A", (), {"sae": base, "store": str(store), "out": str(tmp_path / "out")})
    rec = meta_live.build_live_sae(args, str(tmp_path / "out" / "live-sae"))
    assert rec["live"] == len(expect) and rec["d_sae"] == 48
    live = load_sae(tmp_path / "out" / "live-sae")
    cfg = json.loads((tmp_path / "out" / "live-sae" / "cfg.json").read_text())
    assert cfg["sae_harvest"]["restricted"]["kept"] == expect and cfg["d_sae"] == len(expect)
    assert torch.equal(live.W_dec, sae.W_dec[expect]) and torch.equal(live.b_dec, sae.b_dec)
    x = torch.randn(200, 16) * 20
    with torch.no_grad():
        assert torch.allclose(live.encode(x), sae.encode(x)[:, expect])
    # a second base into the same --out is refused, the first record stays
    other = tmp_path / "other"
    save_sae(sae, other, extra_cfg={"hook_name": SITE})
    before = (tmp_path / "out" / "live_sae.json").read_bytes()
    args.sae = str(other)
    with pytest.raises(SystemExit, match="use another --out"):
        meta_live.build_live_sae(args, str(tmp_path / "out" / "live-sae"))
    assert (tmp_path / "out" / "live_sae.json").read_bytes() == before


def test_a_non_relu_base_is_refused(store, tmp_path):
    sae = make_sae(SAEConfig("topk", 16, 32, k=4))
    save_sae(sae, tmp_path / "topk", extra_cfg={"hook_name": SITE})
    args = type("A", (), {"sae": str(tmp_path / "topk"), "store": str(store), "out": str(tmp_path / "out")})
    with pytest.raises(SystemExit, match="restricts ReLU"):
        meta_live.build_live_sae(args, str(tmp_path / "out" / "live-sae"))
    assert not (tmp_path / "out" / "live-sae").exists()


def _main(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["meta_live.py", *argv])
    meta_live.main()


def test_a_run_records_steps_and_refuses_to_mix_another_config(store, tmp_path, monkeypatch, capsys):
    _, base = _base(store, tmp_path)
    out = tmp_path / "out"
    argv = ["--sae", base, "--store", str(store), "--out", str(out), "--seeds", "2", "--epochs", "3",
            "--meta-latents", "8"]
    _main(monkeypatch, argv)
    doc = json.loads((out / "meta_live.json").read_text())
    (r,) = doc["results"]
    assert r["meta_latents"] == 8 and len(r["explained_variance"]) == 2 and r["steps"] == [3, 3]
    assert r["paper_steps"] == 24000 and r["vs_paper"].startswith("untested")   # 2 seeds: below the rule's 5
    before = (out / "meta_live.json").read_bytes()
    with pytest.raises(SystemExit) as e:   # the same --out, another lr: refused, nothing changed
        _main(monkeypatch, argv + ["--lr", "3e-4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "another config (lr)" in err[0]
    assert (out / "meta_live.json").read_bytes() == before


@pytest.mark.parametrize("extra", [["--meta-latents", "8,x"], ["--seeds", "0"], ["--meta-latents", "0"],
                                   ["--lr", "0"]])
def test_bad_flags_are_one_line_and_exit_2(store, tmp_path, monkeypatch, capsys, extra):
    _, base = _base(store, tmp_path)
    with pytest.raises(SystemExit) as e:
        _main(monkeypatch, ["--sae", base, "--store", str(store), "--out", str(tmp_path / "out"), *extra])
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_base_that_never_fires_is_one_line(store, tmp_path, monkeypatch, capsys):
    sae = make_sae(SAEConfig("relu", 16, 8, l1_coeff=1.0))
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)
    save_sae(sae, tmp_path / "silent", extra_cfg={"hook_name": SITE})
    with pytest.raises(SystemExit) as e:
        _main(monkeypatch, ["--sae", str(tmp_path / "silent"), "--store", str(store), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "fires on none" in err[0]
    assert not (tmp_path / "out" / "live-sae").exists()


def test_the_paper_value_is_judged_by_the_one_verdict_rule():
    # every seed above 55.47%, but one far out: "every seed on one side" said above; the t-interval
    # of the per-seed log ratio contains 1, so it is a tie
    spread = [0.56, 0.56, 0.56, 0.56, 0.90]
    v = meta_live.vs_paper(spread)
    logs = np.log(np.array(spread) / 0.5547)
    half = 2.776 * logs.std(ddof=1) / np.sqrt(5)
    assert v["vs_paper_interval"] == pytest.approx([np.exp(logs.mean() - half), np.exp(logs.mean() + half)])
    assert v["vs_paper"] == "tie"
    assert meta_live.vs_paper([0.44, 0.441, 0.442, 0.439, 0.4415])["vs_paper"] == "below"
    assert meta_live.vs_paper([0.78, 0.79, 0.785, 0.788, 0.781])["vs_paper"] == "above"
    assert meta_live.vs_paper([0.78, 0.79, 0.785])["vs_paper"].startswith("untested")


def _meta_json(path, ev, meta_d_sae=384, base="base"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sae": {"path": base, "d_sae": 8192, "d_in": 128},
                                "meta": {"d_sae": meta_d_sae, "k": 4}, "explained_variance": ev}))
    return str(path)


def test_judge_reads_evaluate_meta_jsons_of_one_shape_and_refuses_a_mix(tmp_path, monkeypatch, capsys):
    paths = [_meta_json(tmp_path / f"s{i}" / "meta.json", ev) for i, ev in enumerate([0.44, 0.441, 0.442, 0.439, 0.4415])]
    _main(monkeypatch, ["--judge", *paths, "--json", str(tmp_path / "all.json")])
    (r,) = json.loads((tmp_path / "all.json").read_text())["results"]
    assert r["vs_paper"] == "below" and r["rows_per_meta_latent"] == pytest.approx(8192 / 384) and len(r["sources"]) == 5
    assert "paper 0.5547: below" in capsys.readouterr().out
    _main(monkeypatch, ["--report-only", str(tmp_path / "all.json")])
    assert "below (ratio 0.79" in capsys.readouterr().out
    for bad in (_meta_json(tmp_path / "other" / "meta.json", 0.44, meta_d_sae=54), str(tmp_path / "none.json")):
        with pytest.raises(SystemExit) as e:
            _main(monkeypatch, ["--judge", *paths[:4], bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "Traceback" not in err[0]
