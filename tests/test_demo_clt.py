"""The demo's cross-layer transcoder row, end to end at a tiny size: its own gradient-free store of
every layer's MLP input and output, a CLT over all 4 layers of the offline default model, its
replacement-model scores (CE, KL, NMSE per layer) in results.json, and the feature browser leaving
it out with a reason instead of failing."""
import json
import math

import pytest

from sae_harvest.evaluate import demo
from sae_harvest.stores import open_store


@pytest.mark.slow   # two harvests, a fit and a live evaluation: ~25 s on the 2-core box
def test_demo_trains_and_scores_a_clt_over_every_layer(tmp_path, capsys):
    out = tmp_path / "demo"
    results = demo.run_demo(str(out), tokens=4096, clt_tokens=16384, sweeps=[demo.CLT_SWEEP],
                            local={"batch_size": 512, "epochs": 1})
    store = open_store(str(out / demo.CLT_STORE))
    assert sorted(store.sites) == sorted(f"blocks.{l}.{k}" for l in range(4) for k in ("mlp_in", "mlp_out"))
    assert not store.has_grads   # a CLT needs none: the main store keeps the gradients
    (row,) = results
    assert row["arch"] == "clt (topk)" and row["d_sae"] == 4 * 256
    assert list(row["per_layer"]) == [f"blocks.{t}.mlp_out" for t in range(4)]
    for key in ("ce_increase", "kl", "nmse", "loss_recovered_zero"):
        assert math.isfinite(row[key]), key
    assert all(math.isfinite(m["nmse"]) and m["l0"] == 8 for m in row["per_layer"].values())
    saved = json.loads((out / "results.json").read_text())["results"]
    assert saved[0]["per_layer"] == row["per_layer"]
    printed = capsys.readouterr().out
    assert "replacement model, per layer" in printed and "left out (a cross-layer transcoder" in printed
    assert not (out / "features").exists()
