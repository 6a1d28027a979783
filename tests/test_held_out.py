"""The held-out report after a local fit (train/held_out.py): one loop for SAEs and transcoders,
both capped at HELD_OUT_REPORT_ROWS rows, scored against numpy on the same rows."""
import numpy as np
import pytest
import torch

from sae_harvest import train
from sae_harvest.stores import open_store
from sae_harvest.train import held_out
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.fit import fit
from tests.test_multisite import make_multisite_store
from tests.test_train_loop import make_store

CAP = 50   # the stores below hold 4 held-out sequences x 31 rows = 124 held-out rows


def _held_rows(path, sites, batch_size=32):
    """The store's held-out rows (position 0 excluded) in the order the report reads them (the
    block order depends on the batch size: the fit's --batch-size)."""
    s = open_store(str(path))
    batches = list(s.batches(sites, batch_size, seqs="held_out", exclude_pos0=True, epochs=1, drop_last=False))
    return [np.concatenate([b["acts"][site] for b in batches]).astype(np.float64) for site in sites]


def _nmse_ev(pred, target):
    err = ((pred - target) ** 2).sum()
    return err / (target ** 2).sum(), 1 - err / ((target - target.mean(0)) ** 2).sum()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("held")
    make_store(root / "s.zarr")
    make_multisite_store(root / "m.zarr")
    return root / "s.zarr", root / "m.zarr"


def _cfg(store, out, **kw):
    # batch 32: the cap falls inside the second held-out batch
    return TrainConfig(**{**dict(store=str(store), out=str(out), arch="topk", k=(4,), d_sae=32, batch_size=32,
                                 tokens=32 * 20, device="cpu", log_every=5, checkpoint_every=1000), **kw})


def test_transcoder_report_is_capped(stores, tmp_path, monkeypatch):
    _, path = stores
    assert sum(len(a) for a in _held_rows(path, ["blocks.0.mlp_in"])) > CAP
    monkeypatch.setattr(held_out, "HELD_OUT_REPORT_ROWS", CAP)
    out = tmp_path / "tc"
    summaries = fit(_cfg(path, out, site="blocks.0.mlp_in", target="blocks.0.mlp_out", skip=True), progress=False)
    (name, summary), = summaries.items()
    held = summary["held_out"]
    assert held["held_out_tokens"] == CAP and held["origin"]["tokens"] == CAP
    x, y = (a[:CAP] for a in _held_rows(path, ["blocks.0.mlp_in", "blocks.0.mlp_out"]))
    tc = train.load_sae(out / name)   # takes raw activations; NMSE and FVU do not depend on the scale
    with torch.no_grad():
        pred = tc(torch.from_numpy(x).float()).double().numpy()
    nmse, ev = _nmse_ev(pred, y)
    assert held["nmse"] == pytest.approx(nmse, rel=1e-4)
    assert held["explained_variance"] == pytest.approx(ev, rel=1e-4)
    assert held["fvu"] == pytest.approx(1 - ev, rel=1e-4)


def test_sae_report_is_capped_and_meta_report_is_not(stores, tmp_path, monkeypatch):
    path, _ = stores
    monkeypatch.setattr(held_out, "HELD_OUT_REPORT_ROWS", CAP)
    out = tmp_path / "sae"
    (name, summary), = fit(_cfg(path, out, site="blocks.0.resid_pre"), progress=False).items()
    held = summary["held_out"]
    assert held["held_out_tokens"] == CAP
    x, = (a[:CAP] for a in _held_rows(path, ["blocks.0.resid_pre"]))
    sae = train.load_sae(out / name)
    with torch.no_grad():
        pred = sae(torch.from_numpy(x).float()).double().numpy()
    nmse, ev = _nmse_ev(pred, x)
    assert held["nmse"] == pytest.approx(nmse, rel=1e-4)
    assert held["explained_variance"] == pytest.approx(ev, rel=1e-4)
    assert "fvu" not in held
    # a meta-SAE's report is on all the decoder rows it trained on (32 < CAP: the cap lowered below them)
    monkeypatch.setattr(held_out, "HELD_OUT_REPORT_ROWS", 8)
    meta = fit(TrainConfig(out=str(tmp_path / "meta"), decoder_of=str(out / name), arch="batchtopk", k=(2,),
                           d_sae=8, batch_size=16, epochs=2, device="cpu"), progress=False)
    (meta_summary,) = meta.values()
    assert meta_summary["held_out"]["held_out_tokens"] == 32 and "origin" not in meta_summary["held_out"]


def test_capped_stops_reading_at_the_limit():
    read = []

    def batches():
        for i in range(5):
            read.append(i)
            yield np.arange(10 * i, 10 * i + 10), None

    got = list(held_out.capped(batches(), 25))
    assert [len(x) for x, _ in got] == [10, 10, 5] and read == [0, 1, 2]
    assert [len(x) for x, _ in held_out.capped(batches(), None)] == [10] * 5
