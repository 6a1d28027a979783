"""bench/overfit.py: training and held-out NMSE of saved SAEs, checked against a brute-force numpy pass
over the store's rows (which sequences are held out, position 0 left out) and against the trainer's
own held-out report in summary.json."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_harvest.stores import open_store
from sae_harvest.train.fit import fit
from sae_harvest.train.sae_io import load_sae
from tests.test_train_loop import _cfg, make_store

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import overfit  # noqa: E402

SITE = "blocks.0.resid_pre"


def _brute_nmse(sae, store, held: bool) -> float:
    acts = np.asarray(store.acts(SITE, np.arange(store.n_rows)), dtype=np.float64)
    seq = np.asarray(store.rows_seq[:])
    pos = np.asarray(store.rows_pos[:])
    keep = (store.split.is_held_out(seq) == held) & (pos != 0)
    x = torch.from_numpy(acts[keep]).float()
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x, None)).double().numpy()
    return float(((acts[keep] - x_hat) ** 2).sum() / (acts[keep] ** 2).sum())


def test_train_and_held_out_nmse_match_a_brute_force_pass(tmp_path, capsys):
    make_store(tmp_path / "s.zarr", grads=False)
    store = open_store(str(tmp_path / "s.zarr"))
    for epochs in (1, 2):
        fit(_cfg(str(tmp_path / "s.zarr"), str(tmp_path / f"epochs{epochs}" / "topk"), arch="topk", k=(4,),
                 epochs=epochs, site=SITE), progress=False)
    roots = [str(tmp_path / "epochs1"), str(tmp_path / "epochs2")]
    got = overfit.measure(str(tmp_path / "s.zarr"), roots)
    assert list(got) == ["topk/topk_k4"]
    for root in roots:
        sae = load_sae(f"{root}/topk/topk_k4", device="cpu")
        r = got["topk/topk_k4"][root]
        assert r["train"]["nmse"] == pytest.approx(_brute_nmse(sae, store, held=False), rel=1e-4)
        assert r["held_out"]["nmse"] == pytest.approx(_brute_nmse(sae, store, held=True), rel=1e-4)
        summary = json.loads(Path(f"{root}/topk/topk_k4/summary.json").read_text())
        assert r["held_out"]["nmse"] == pytest.approx(summary["held_out"]["nmse"], rel=1e-4)
        assert r["train"]["held_out_tokens"] + r["held_out"]["held_out_tokens"] == \
            store.n_rows - store.n_seqs          # every row but position 0, once
    assert overfit.main(["--store", str(tmp_path / "s.zarr"), "--budgets", *roots]) == 0
    assert "topk/topk_k4" in capsys.readouterr().out


def test_budgets_without_a_common_sae_are_one_line(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    with pytest.raises(SystemExit) as e:
        overfit.main(["--store", str(tmp_path / "none.zarr"), "--budgets", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no SAE" in err and "Traceback" not in err


def test_each_sae_is_read_against_the_store_it_trained_on(tmp_path, capsys):
    """A g-SAE trained on another store (the label-free one) selects with that store's gradients:
    without --store each SAE reads its own; a --store it did not train on is one line, exit 2."""
    make_store(tmp_path / "a.zarr", grads=False)
    make_store(tmp_path / "b.zarr", grads=False, seed=1)
    for epochs in (1, 2):
        fit(_cfg(str(tmp_path / "b.zarr"), str(tmp_path / f"epochs{epochs}" / "topk"), arch="topk", k=(4,),
                 epochs=epochs, site=SITE), progress=False)
    roots = [str(tmp_path / "epochs1"), str(tmp_path / "epochs2")]
    got = overfit.measure(None, roots)
    summary = json.loads(Path(f"{roots[0]}/topk/topk_k4/summary.json").read_text())
    assert got["topk/topk_k4"][roots[0]]["held_out"]["nmse"] == pytest.approx(summary["held_out"]["nmse"], rel=1e-4)
    with pytest.raises(SystemExit) as e:
        overfit.main(["--store", str(tmp_path / "a.zarr"), "--budgets", *roots])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "was trained on another store" in err and "Traceback" not in err


def _rep(budgets, saes):
    """A measure() report: saes {name: [(train, held_out) per budget]}."""
    return {"store": None, "budgets": budgets, "saes": {
        name: {b: {"train": {"nmse": t}, "held_out": {"nmse": h}} for b, (t, h) in zip(budgets, vals)}
        for name, vals in saes.items()}}


def test_summary_counts_match_hand_computation(tmp_path, capsys):
    b = ["r/epochs128", "r/epochs256"]
    runs = {"seed1": _rep(b, {"a/x": [(1.0, 1.05), (1.0, 1.10)],      # gap 5% -> 10%: widens; held-out +4.8%
                              "a/y": [(2.0, 2.2), (2.2, 2.42)]}),      # gap 10% -> 10%: narrows (not wider); both +10%
            "seed2": _rep(b, {"a/x": [(1.0, 1.02), (0.9, 0.918)]})}    # gap 2% -> 2%, both fall
    s = overfit.summarise(runs)
    assert s["pairs"] == 3 and s["widens"] == 1 and s["narrows"] == 2
    assert s["gap_pct"] == pytest.approx([2.0, 10.0]) and s["gap_change_points"][1] == pytest.approx(5.0)
    assert s["held_out_rose"] == 2 and s["train_rose_with_it"] == 1     # a/y in seed1 only
    (tmp_path / "m.json").write_text(json.dumps(runs))
    assert overfit.main(["--summary", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "3 SAE-run pairs" in out and "seed1 a/x: held-out +4.8%, train +0.0%" in out


def test_summary_of_a_malformed_report_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"seed1": {"budgets": ["a", "b"]}}')
    with pytest.raises(SystemExit) as e:
        overfit.main(["--summary", str(tmp_path / "bad.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--summary" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        overfit.main([])     # neither mode
