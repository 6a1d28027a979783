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
