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
