"""`evaluate stitch`, `evaluate meta`, `evaluate geometry` against hand-built dictionaries whose
answers are known exactly, and the live-model parts against independent HF forwards."""
import json
import math
import shutil
from itertools import islice

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sae_harvest.evaluate.cli import main as evaluate_cli
from sae_harvest.evaluate.stitch import (StitchConfig, classify, classify_pair, match_latents, run_stitch,
                                         stitch_path, swap_groups)
from sae_harvest.harvest.data import open_dataset, packed_sequences
from sae_harvest.harvest.models import load_model
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_io import save_sae
from tests.tiny_models import make_tiny_model, write_corpus

D = 64
HOOK = "blocks.1.resid_pre"
CTX, N_SEQS = 16, 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyses_assets")
    corpus = write_corpus(root / "docs.jsonl", n_docs=120, max_words=60)
    return {"gpt2": make_tiny_model("gpt2", root / "gpt2"), "corpus": str(corpus), "root": root}


def e(i, d=D):
    v = torch.zeros(d)
    v[i] = 1.0
    return v


def tied_relu(rows, b_dec=None, hook=HOOK):
    """A ReLU SAE with W_enc = W_dec^T and zero biases: for orthonormal rows and inputs with
    nonnegative coordinates on them, encode() is the projection onto each row."""
    rows = torch.stack(rows)
    sae = make_sae(SAEConfig("relu", rows.shape[1], rows.shape[0]))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)
        if b_dec is not None:
            sae.b_dec.copy_(b_dec)
    return sae


def save(sae, path, hook=HOOK, **extra) -> str:
    save_sae(sae, path, extra_cfg={"hook_name": hook, **extra})
    return str(path)


# --- stitch: classification ----------------------------------------------------------------------
def _planted_pair():
    """Small: e0..e7. Large (shuffled): near-copies (cos 0.9) of e0..e6, a composite (e0+e1)/sqrt2
    (cos 0.707 with both), novel e20, e21, e22 and 0.6 e2 + 0.8 e23 (cos 0.6 < 0.7). e7 has no partner."""
    small = [e(i) for i in range(8)]
    large = [0.9 * e(j) + math.sqrt(1 - 0.81) * e(40 + j) for j in range(7)]
    large += [(e(0) + e(1)) / math.sqrt(2), e(20), e(21), e(22), 0.6 * e(2) + 0.8 * e(23)]
    kinds = ["copy"] * 7 + ["composite", "novel", "novel", "novel", "novel"]
    perm = torch.randperm(len(large), generator=torch.Generator().manual_seed(1)).tolist()
    return small, [large[p] for p in perm], [kinds[p] for p in perm], perm


def test_novel_and_reconstruction_latents_are_the_planted_ones():
    small, large, kinds, perm = _planted_pair()
    max_cos, best, edges = match_latents(torch.stack(large) * 3.0, torch.stack(small), 0.7)  # norms do not matter
    novel, recon = classify(max_cos, 0.7)
    assert novel == [i for i, k in enumerate(kinds) if k == "novel"]
    assert recon == [i for i, k in enumerate(kinds) if k != "novel"]
    where = {p: i for i, p in enumerate(perm)}          # original large index -> shuffled index
    assert max_cos[where[11]].item() == pytest.approx(0.6, abs=1e-6)
    assert best[where[3]].item() == 3 and max_cos[where[3]].item() == pytest.approx(0.9, abs=1e-6)
    groups, orphans = swap_groups(edges, len(small))
    # the composite joins e0's and e1's groups into one; e7 has no partner
    expected = [([0, 1], sorted([where[0], where[1], where[7]]))] + [([j], [where[j]]) for j in range(2, 7)]
    assert sorted(groups) == sorted(expected)
    assert orphans == [7]
    # a lower threshold makes the 0.6 latent a reconstruction latent of e2's group
    novel_low, _ = classify(max_cos, 0.5)
    assert where[11] not in novel_low and len(novel_low) == 3


# --- stitch: the path on data with known structure ------------------------------------------------
def _planted_data(n=2000, seed=0):
    """x = sum of positive multiples of e0..e7 (what the small SAE knows) and e20..e22 (novel)."""
    g = torch.Generator().manual_seed(seed)
    feats = list(range(8)) + [20, 21, 22]
    coef = torch.rand(n, len(feats), generator=g) * (torch.rand(n, len(feats), generator=g) < 0.3)
    x = torch.zeros(n, D)
    x[:, feats] = coef
    return x


def test_path_ends_at_both_saes_and_novel_latents_lower_mse():
    small = tied_relu([e(i) for i in range(8)], b_dec=0.01 * torch.ones(D))
    large = tied_relu([e(i) for i in (20, 21, 22)] + [e(i) for i in range(8)])   # exact copies + novel
    x = _planted_data()
    max_cos, _, edges = match_latents(large.W_dec, small.W_dec, 0.7)
    novel, recon = classify(max_cos, 0.7)
    assert novel == [0, 1, 2] and recon == list(range(3, 11))
    groups, orphans = swap_groups(edges, 8)
    steps, snaps, alone = stitch_path(small, large, x, novel, groups, orphans, snapshot_steps=range(100))

    own = lambda sae: (x.double() - sae(x).double()).pow(2).sum(-1).mean().item()  # noqa: E731
    assert steps[0]["mse"] == pytest.approx(own(small), rel=1e-6)
    assert steps[-1]["mse"] == pytest.approx(own(large), abs=1e-9) and own(large) < 1e-10
    assert [s["phase"] for s in steps] == ["start"] + ["novel"] * 3 + ["swap"] * 8
    assert (steps[0]["n_small"], steps[0]["n_large"], steps[-1]["n_small"], steps[-1]["n_large"]) == (8, 0, 0, 11)
    # each novel latent removes exactly its feature's energy (the bias moves with alpha too)
    assert all(b["mse"] < a["mse"] for a, b in zip(steps[:4], steps[1:4]))
    # a reconstruction latent added alone duplicates its feature: MSE rises; a novel one: it falls
    assert all(alone[i] < 0 for i in novel) and all(alone[i] > 0 for i in recon)
    # L0 along the path: the latents' firing frequencies, summed
    fires = lambda sae: (sae.encode(x) != 0).float().sum(-1).mean().item()  # noqa: E731
    assert steps[0]["l0"] == pytest.approx(fires(small)) and steps[-1]["l0"] == pytest.approx(fires(large))
    # every step's incremental MSE equals eq. 5 computed directly from that step's latents
    for s in steps:
        x_hat = snaps[s["step"]].reconstruct(small, large, x)
        assert s["mse"] == pytest.approx((x - x_hat).double().pow(2).sum(-1).mean().item(), rel=1e-6, abs=1e-12)


def test_incremental_mse_matches_direct_on_random_saes_with_orphans():
    torch.manual_seed(0)
    small, large = make_sae(SAEConfig("topk", 16, 8, k=2)), make_sae(SAEConfig("batchtopk", 16, 24, k=3))
    with torch.no_grad():
        small.b_dec.normal_(), large.b_dec.normal_()
        large.threshold.fill_(0.1)
    x = torch.randn(300, 16)
    max_cos, _, edges = match_latents(large.W_dec, small.W_dec, 0.5)
    novel, recon = classify(max_cos, 0.5)
    groups, orphans = swap_groups(edges, 8)
    assert novel and recon and orphans            # every phase is exercised
    steps, snaps, _ = stitch_path(small, large, x.clone(), novel, groups, orphans, snapshot_steps=range(1000))
    assert len(steps) == 1 + len(novel) + len(groups) + len(orphans)
    for s in steps:
        x_hat = snaps[s["step"]].reconstruct(small, large, x)
        assert s["mse"] == pytest.approx((x - x_hat).double().pow(2).sum(-1).mean().item(), rel=1e-6)
    assert torch.equal(snaps[0].reconstruct(small, large, x), small(x))
    assert torch.allclose(snaps[len(steps) - 1].reconstruct(small, large, x), large(x), atol=1e-6)


def test_live_only_leaves_dead_latents_out_of_the_classes_and_keeps_the_ends():
    """Dead latents (rows no token fires): e30 in the small SAE, e31 and e32 in the large one. Over
    all latents eq. 6 calls e31, e32 novel and e30 an orphan (the defect the tuned stitching run
    showed: 43-77% dead latents filled the novel set); live-only leaves them out, and the path's
    ends and every step still equal eq. 5 computed directly."""
    small = tied_relu([e(i) for i in range(8)] + [e(30)], b_dec=0.01 * torch.ones(D))
    large = tied_relu([e(31)] + [e(i) for i in (20, 21, 22)] + [e(32)] + [0.9 * e(i) + math.sqrt(0.19) * e(40 + i)
                                                                          for i in range(8)])
    x = _planted_data()
    every = classify_pair(small, large, x, 0.7, live_only=False)
    live = classify_pair(small, large, x, 0.7, live_only=True)
    assert (every.dead_small, every.dead_large) == ([8], [0, 4]) == (live.dead_small, live.dead_large)
    assert every.novel == [0, 1, 2, 3, 4] and live.novel == [1, 2, 3]
    assert every.orphans == [8] and live.orphans == []
    assert live.reconstruction == every.reconstruction == list(range(5, 13))
    assert live.live_small.tolist() == [True] * 8 + [False]
    steps, snaps, _ = stitch_path(small, large, x, live.novel, live.groups, live.orphans,
                                  snapshot_steps=range(100), live_small=live.live_small, columns=live.columns)
    own = lambda sae: (x.double() - sae(x).double()).pow(2).sum(-1).mean().item()  # noqa: E731
    assert steps[0]["mse"] == pytest.approx(own(small), rel=1e-6)
    assert steps[-1]["mse"] == pytest.approx(own(large), rel=1e-6)
    assert (steps[0]["n_small"], steps[-1]["n_small"], steps[-1]["n_large"]) == (8, 0, 11)
    for s in steps:
        x_hat = snaps[s["step"]].reconstruct(small, large, x)
        assert s["mse"] == pytest.approx((x - x_hat).double().pow(2).sum(-1).mean().item(), rel=1e-6)
    assert all(b["mse"] < a["mse"] for a, b in zip(steps[:4], steps[1:4]))   # each live novel latent helps
    # over all latents, a dead "novel" latent's step moves nothing but eq. 5's bias weight: x_hat
    # shifts by one vector, the same on every token
    _, snaps_all, _ = stitch_path(small, large, x, every.novel, every.groups, every.orphans, snapshot_steps=range(6))
    for step, latent in enumerate(every.novel, start=1):
        shift = snaps_all[step].reconstruct(small, large, x) - snaps_all[step - 1].reconstruct(small, large, x)
        assert (shift.std(0).max() < 1e-6) == (latent in every.dead_large)


def test_live_only_matches_against_live_rows_and_drops_dead_copies():
    """Dead latents with partners: the small SAE's dead row e30 is copied by a live large latent
    (decoder 0.9 e30 + ..., encoder reading e20: it fires), and a dead large latent copies the live
    small e5. Over all latents both are reconstruction latents in groups with their partners; live
    only, the first is novel (its one partner is dead) and the second is in no class or group."""
    small = tied_relu([e(i) for i in range(8)] + [e(30)])
    copy30 = 0.9 * e(30) + math.sqrt(0.19) * e(41)
    large = tied_relu([copy30] + [e(i) for i in range(8)] + [0.95 * e(5) + math.sqrt(1 - 0.95**2) * e(42)])
    with torch.no_grad():
        large.W_enc[:, 0] = e(20)         # latent 0 fires on e20's tokens
        large.W_enc[:, 9] = 0.0           # latent 9 (a copy of e5) never fires
        large.b_enc[9] = -1.0
    x = _planted_data()
    every = classify_pair(small, large, x, 0.7, live_only=False)
    live = classify_pair(small, large, x, 0.7, live_only=True)
    assert (every.dead_small, every.dead_large) == ([8], [9])
    assert every.novel == [] and 0 in every.reconstruction and 9 in every.reconstruction
    assert ([8], [0]) in every.groups and ([5], [6, 9]) in every.groups
    assert live.novel == [0] and 9 not in live.novel + live.reconstruction
    assert ([5], [6]) in live.groups and all(8 not in s and 9 not in l for s, l in live.groups)
    assert live.max_cos[0].item() < 0.7 and live.best[0].item() != 8   # matched against live rows only
    assert every.best[0].item() == 8 and every.max_cos[0].item() == pytest.approx(0.9, abs=1e-6)
    steps, snaps, _ = stitch_path(small, large, x, live.novel, live.groups, live.orphans, snapshot_steps=range(100),
                                  live_small=live.live_small, columns=live.columns)
    assert (steps[-1]["n_small"], steps[-1]["n_large"]) == (0, 9)
    for s in steps:
        x_hat = snaps[s["step"]].reconstruct(small, large, x)
        assert s["mse"] == pytest.approx((x - x_hat).double().pow(2).sum(-1).mean().item(), rel=1e-6)


def test_a_path_started_without_a_firing_small_latent_matches_eq5():
    """live_small may leave out a latent that fires: the start subtracts its contribution."""
    small = tied_relu([e(i) for i in range(8)], b_dec=0.05 * torch.ones(D))
    large = tied_relu([e(i) for i in range(8)] + [e(20)])
    x = _planted_data()
    keep = torch.tensor([True] * 7 + [False])
    pair = classify_pair(small, large, x, 0.7, live_only=False)
    groups = [g for g in pair.groups if 7 not in g[0]]
    steps, snaps, _ = stitch_path(small, large, x, pair.novel, groups, [], snapshot_steps=range(100), live_small=keep)
    for s in steps:
        x_hat = snaps[s["step"]].reconstruct(small, large, x)
        assert s["mse"] == pytest.approx((x - x_hat).double().pow(2).sum(-1).mean().item(), rel=1e-6)
    assert steps[0]["n_small"] == 7


# --- stitch: live model ----------------------------------------------------------------------------
def _ids(assets):
    _, tok = load_model(assets["gpt2"])
    seqs = list(islice(packed_sequences(open_dataset(assets["corpus"]), tok, CTX), N_SEQS))
    return torch.from_numpy(np.stack(seqs)).long()


def _spliced_loss(assets, sae):
    """Independent reference: HF's own loss with block 1's input replaced by hand at positions >= 1."""
    model, _ = load_model(assets["gpt2"])
    ids = _ids(assets)

    def pre_hook(_mod, args, kwargs):
        a = args[0].clone()
        if sae is not None:
            a[:, 1:] = sae(a[:, 1:].reshape(-1, D)).view(a[:, 1:].shape)
        return (a, *args[1:]), kwargs
    handle = model.transformer.h[1].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(ids, labels=ids, output_hidden_states=True)
    finally:
        handle.remove()
    return out.loss.item(), out.hidden_states[1][:, 1:].reshape(-1, D)


@pytest.fixture(scope="module")
def live_pair(assets):
    torch.manual_seed(0)
    small, large = make_sae(SAEConfig("topk", D, 32, k=4)), make_sae(SAEConfig("topk", D, 96, k=6))
    with torch.no_grad():   # share some rows so that there are reconstruction latents
        large.W_dec[:20] = small.W_dec[:20] + 0.1 * torch.randn(20, D)
        large.W_enc[:, :20] = small.W_enc[:, :20]
        large.set_decoder_norm_to_unit_norm()
    root = assets["root"]
    return small, large, save(small, root / "small"), save(large, root / "large")


def test_stitch_live_ends_equal_each_sae_spliced(assets, live_pair):
    small, large, p_small, p_large = live_pair
    cfg = StitchConfig(small=p_small, large=p_large, model=assets["gpt2"], dataset=assets["corpus"],
                       tokens=CTX * N_SEQS, ctx_len=CTX, batch_size=4, device="cpu", ce_points=3)
    doc = run_stitch(cfg, progress=False).to_dict()
    assert doc["tokens"] == (CTX - 1) * N_SEQS
    assert sorted(doc["novel"] + doc["reconstruction"]) == list(range(96))
    assert set(range(20)) <= set(doc["reconstruction"])
    clean, x = _spliced_loss(assets, None)
    for sae, step in ((small, doc["path"][0]), (large, doc["path"][-1])):
        loss, _ = _spliced_loss(assets, sae)
        assert step["ce_increase"] == pytest.approx(loss - clean, abs=1e-5)
        assert step["mse"] == pytest.approx((x - sae(x)).pow(2).sum(-1).mean().item(), rel=1e-5)
    assert doc["summary"]["mse_small"] == pytest.approx(doc["path"][0]["mse"], rel=1e-9)
    assert doc["summary"]["mse_large"] == pytest.approx(doc["path"][-1]["mse"], rel=1e-6)
    measured = [s["step"] for s in doc["path"] if s["ce_increase"] is not None]
    assert 0 in measured and len(doc["path"]) - 1 in measured and len(doc["novel"]) in measured


def test_stitch_live_only_on_the_live_model(assets, live_pair, tmp_path):
    """Large latents 90-95 can never fire (encoder column 0, bias -100); over all latents they are
    novel, with --live-only they are out of every class, and both ends are the same SAEs' spliced
    numbers as without it."""
    small, large, p_small, _ = live_pair
    dead = make_sae(SAEConfig("topk", D, 96, k=6))
    with torch.no_grad():
        dead.load_state_dict(large.state_dict())
        dead.W_enc[:, 90:] = 0.0
        dead.b_enc[90:] = -100.0
    p_dead = save(dead, tmp_path / "dead")
    docs = {flag: run_stitch(StitchConfig(small=p_small, large=p_dead, model=assets["gpt2"], dataset=assets["corpus"],
                                          tokens=CTX * N_SEQS, ctx_len=CTX, batch_size=4, device="cpu", ce_points=2,
                                          live_only=flag), progress=False).to_dict() for flag in (False, True)}
    every, live = docs[False], docs[True]
    assert set(range(90, 96)) <= set(every["dead_large"]) == set(live["dead_large"])
    assert set(range(90, 96)) <= set(every["novel"])
    assert not set(live["dead_large"]) & set(live["novel"] + live["reconstruction"])
    assert sorted(live["novel"] + live["reconstruction"] + live["dead_large"]) == list(range(96))
    assert not set(live["dead_small"]) & set(live["orphans"])
    assert live["live_only"] is True and every["live_only"] is False
    assert live["summary"]["n_dead_large"] == len(live["dead_large"])
    for key in ("ce_increase_small", "ce_increase_large"):
        assert live["summary"][key] == pytest.approx(every["summary"][key], rel=1e-9, abs=1e-12)
    for end in (0, -1):   # the path's own ends (mse_small / mse_large are computed apart from the path)
        assert live["path"][end]["mse"] == pytest.approx(every["path"][end]["mse"], rel=1e-9)
    assert live["path"][-1]["n_small"] == 0 and live["path"][-1]["n_large"] == 96 - len(live["dead_large"])


def test_stitch_cli_json_png_and_bad_input(assets, live_pair, tmp_path):
    _, _, p_small, p_large = live_pair
    base = ["stitch", "--model", assets["gpt2"], "--dataset", assets["corpus"], "--tokens", "48",
            "--ctx-len", str(CTX), "--device", "cpu", "--quiet", "--ce-points", "2"]
    out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
    r = CliRunner().invoke(evaluate_cli, base + ["--small", p_small, "--large", p_large, "--json", str(out_json),
                                                 "--plot", str(out_png)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out_json.read_text())
    assert {"novel", "reconstruction", "groups", "path", "summary", "config"} <= set(doc)
    assert doc["config"]["threshold"] == 0.7
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "novel" in r.output

    other = save(make_sae(SAEConfig("topk", D, 96, k=6)), tmp_path / "other", hook="blocks.2.resid_pre")
    for args, expect in (([p_large, p_small], "swap them"), ([p_small, other], "different sites"),
                         ([p_small, str(tmp_path / "nope")], "nope")):
        r = CliRunner().invoke(evaluate_cli, base + ["--small", args[0], "--large", args[1], "--json",
                                                     str(tmp_path / "bad.json")])
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines()[0].startswith("error:") and expect in r.output
        assert "Traceback" not in r.output and not (tmp_path / "bad.json").exists()


# --- meta --------------------------------------------------------------------------------------
PLANTED = [(0, 1), (0, 2), (1, 2, 3), (4,), (0, 1), (5, 6, 7), (3,), (2, 6)]   # meta-latents of each latent


@pytest.fixture(scope="module")
def meta_pair(tmp_path_factory):
    """An SAE whose unit decoder rows are planted sums of e0..e7 (plus one row half outside their
    span), scaled by arbitrary norms, and a BatchTopK meta-SAE whose dictionary is exactly e0..e7."""
    root = tmp_path_factory.mktemp("meta")
    rows = [sum(e(m) for m in ms) / math.sqrt(len(ms)) for ms in PLANTED] + [(e(5) + e(30)) / math.sqrt(2)]
    norms = torch.linspace(0.5, 4.0, len(rows))
    sae = tied_relu([r * s for r, s in zip(rows, norms)])
    meta = make_sae(SAEConfig("batchtopk", D, 8, k=2))
    with torch.no_grad():
        for p in meta.parameters():
            p.zero_()
        meta.W_dec.copy_(torch.eye(D)[:8])
        meta.W_enc.copy_(torch.eye(D)[:, :8])
        meta.threshold.fill_(0.05)
    p_sae = save(sae, root / "sae")
    p_meta = save(meta, root / "meta", hook=f"meta:{p_sae}", decoder_of=p_sae)
    return p_sae, p_meta, torch.stack(rows)


def test_meta_report_recovers_the_planted_decomposition(meta_pair):
    from sae_harvest.evaluate.meta import MetaConfig, run_meta

    p_sae, p_meta, rows = meta_pair
    doc = run_meta(MetaConfig(sae=p_sae, meta=p_meta, latents=(0, 2, 8), neighbours=3, device="cpu")).to_dict()
    sizes = [len(ms) for ms in PLANTED] + [1]
    assert doc["meta_l0"] == pytest.approx(sum(sizes) / len(sizes))
    # only the last row is not reconstructed: it misses e30 / sqrt2, squared error 1/2
    var = (rows - rows.mean(0)).pow(2).sum().item()
    assert doc["explained_variance"] == pytest.approx(1 - 0.5 / var, rel=1e-5)
    assert doc["meta"]["trained_on_this_sae"] is True and doc["alive_meta_latents"] == 8
    assert doc["meta_latent_usage"] == [sum(m in ms for ms in PLANTED + [(5,)]) for m in range(8)]
    s0, s2, s8 = doc["samples"]
    assert [p["meta_latent"] for p in s0["decomposition"]] in ([0, 1], [1, 0])
    assert all(p["value"] == pytest.approx(1 / math.sqrt(2), rel=1e-5) for p in s0["decomposition"])
    assert sorted(p["meta_latent"] for p in s2["decomposition"]) == [1, 2, 3]
    assert s8["reconstruction_cosine"] == pytest.approx(1 / math.sqrt(2), rel=1e-5)
    # latent 4 has exactly latent 0's meta-latents: it shares both and comes first
    assert s0["sharing"][0] == {"latent": 4, "shared": s0["sharing"][0]["shared"], "cosine": pytest.approx(1.0)}
    assert sorted(s0["sharing"][0]["shared"]) == [0, 1]
    users_of_0 = next(p for p in s0["decomposition"] if p["meta_latent"] == 0)
    assert users_of_0["used_by"] == 3 and {u["latent"] for u in users_of_0["top_users"]} == {1, 4}


def test_meta_cli_table_json_and_bad_input(meta_pair, tmp_path):
    p_sae, p_meta, _ = meta_pair
    out = tmp_path / "m.json"
    r = CliRunner().invoke(evaluate_cli, ["meta", "--sae", p_sae, "--meta", p_meta, "--samples", "3",
                                          "--device", "cpu", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "meta-L0" in r.output and "explained variance" in r.output
    doc = json.loads(out.read_text())
    assert len(doc["samples"]) == 3 and doc["config"]["samples"] == 3
    for args, expect in ((["--meta", p_sae], "not a meta-SAE"), (["--meta", p_meta, "--latents", "99"], "99"),
                         (["--meta", str(tmp_path / "none")], "none")):
        r = CliRunner().invoke(evaluate_cli, ["meta", "--sae", p_sae, "--device", "cpu", *args])
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines()[0].startswith("error:") and expect in r.output


# --- geometry ----------------------------------------------------------------------------------
def test_nearest_neighbour_and_cross_cosines_of_known_dictionaries():
    from sae_harvest.evaluate.geometry import distribution, max_cosines, nearest_neighbour_cosines

    a = torch.stack([e(i) for i in range(16)]) * 2.5                          # orthogonal
    b = torch.stack([e(i) for i in range(8)] + [(e(0) + e(1)) / math.sqrt(2), -e(40), e(40) * 0.5 + e(41)])
    assert torch.equal(nearest_neighbour_cosines(a), torch.zeros(16))
    nn_b = nearest_neighbour_cosines(b, chunk=3)                                 # chunks cross the diagonal
    s = 1 / math.sqrt(2)
    # -e40 and 0.5 e40 + e41 (cos -0.447) each have orthogonal rows closer: max cosine 0
    assert nn_b.tolist() == pytest.approx([s, s, 0, 0, 0, 0, 0, 0, s, 0, 0], abs=1e-6)
    assert nearest_neighbour_cosines(torch.stack([e(0), -3 * e(0)])).tolist() == [-1.0, -1.0]   # signed
    assert max_cosines(a, b).tolist() == pytest.approx([1.0] * 8 + [0.0] * 8, abs=1e-6)
    assert max_cosines(b, a).tolist() == pytest.approx([1.0] * 8 + [s, 0.0, 0.0], abs=1e-6)
    d = distribution(torch.tensor([0.0, 0.5, 1.0, 1.0]), bins=4, lo=0.0, hi=1.0)
    assert d["hist"]["counts"] == [1, 0, 1, 2] and d["mean"] == pytest.approx(0.625) and d["median"] == 0.5


@pytest.fixture(scope="module")
def store(assets, tmp_path_factory):
    from sae_harvest.harvest.run import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("geom") / "s.zarr"
    harvest(HarvestConfig(out=str(out), model=assets["gpt2"], dataset=assets["corpus"], sites=HOOK, tokens=2048,
                          ctx_len=CTX, batch_size=8, shuffle_window=512, device="cpu"), progress=False)
    return str(out)


def test_geometry_frequencies_on_held_out_store_rows(store, tmp_path):
    from sae_harvest.evaluate.geometry import GeometryConfig, run_geometry
    from sae_harvest.stores import open_store

    # latent 0 always fires, latent 1 never, latent 2 + j fires when coordinate j > 0
    sae = tied_relu([e(j) for j in range(D)] + [e(0), e(1)])
    with torch.no_grad():
        sae.W_enc[:, :2] = 0
        sae.b_enc[:2] = torch.tensor([1e4, -1e4])
        sae.W_enc[:, 2:] = torch.eye(D)
        sae.W_dec[:2] = torch.stack([e(0), e(1)])
        sae.W_dec[2:] = torch.eye(D)
    path = save(sae, tmp_path / "freq")
    other = save(tied_relu([e(j) for j in range(D)]), tmp_path / "eye")
    doc = run_geometry(GeometryConfig(saes=(path, other), store=store, tokens=10**6, device="cpu")).to_dict()

    s = open_store(store)
    # only the rows of the store's held-out sequences (seq % every == 0), position 0 excluded
    held = np.flatnonzero((np.asarray(s.rows_seq[:]) % s.split.every == 0) & (np.asarray(s.rows_pos[:]) != 0))
    x = s.acts(HOOK, held)
    f = doc["saes"][0]["frequency"]
    assert f["tokens"] == len(x) and 0 < len(x) < s.n_rows // 4
    assert f["dead"] == 1 + int(((x > 0).sum(0) == 0).sum())    # latent 1, and any coordinate never > 0
    assert f["eval_tokens"]["tokens"] == len(x) and f["eval_tokens"]["held_out_seqs"] == len(s.split.held_out_seqs(s.n_seqs))
    assert f["values"][:2] == [1.0, 0.0]
    assert f["values"][2:] == pytest.approx((x > 0).mean(0).tolist(), abs=1e-12)
    # within "freq", latents 0/1 duplicate e0/e1: nearest-neighbour cosine 1 for those four, else 0
    assert doc["saes"][0]["nn_cosine"]["mean"] == pytest.approx(4 / (D + 2))
    assert [(c["a"], c["b"], c["mean"]) for c in doc["cross"]] == [("freq", "eye", pytest.approx(1.0)),
                                                                   ("eye", "freq", pytest.approx(1.0))]
    # a cap on tokens reads only that many rows
    capped = run_geometry(GeometryConfig(saes=(path,), store=store, tokens=50, device="cpu")).to_dict()
    assert capped["saes"][0]["frequency"]["tokens"] == 50


def test_geometry_warns_when_an_sae_was_trained_on_another_store(store, tmp_path, capsys, monkeypatch):
    """Frequencies on --store's held-out rows are held out only for an SAE proved trained outside
    them: this store's split, or a sibling store that holds out the same sequences token by token;
    another store that is not readable here, or no record, gets one warning line and
    frequency.trained_outside_split false."""
    from sae_harvest.evaluate.geometry import GeometryConfig, run_geometry
    from sae_harvest.stores import open_store

    s = open_store(store)
    split = {**s.split.to_attrs(), "creation_id": s.attrs["creation_id"]}
    rows = [e(j) for j in range(D)]
    here = save(tied_relu(rows), tmp_path / "here", store=store, held_out=split)
    there = save(tied_relu(rows), tmp_path / "there", store="/elsewhere/other.zarr",
                 held_out={**split, "creation_id": "0" * 32})
    unrecorded = save(tied_relu(rows), tmp_path / "old")
    # a sibling: the same tokens and split under another creation id (another harvest of one corpus)
    shutil.copytree(store, tmp_path / "sib.zarr")
    root = json.loads((tmp_path / "sib.zarr" / "zarr.json").read_text())
    root["attributes"]["sae_store"]["creation_id"] = "1" * 32
    (tmp_path / "sib.zarr" / "zarr.json").write_text(json.dumps(root))
    sibling, sibling2 = (save(tied_relu(rows), tmp_path / name, store=str(tmp_path / "sib.zarr"),
                              held_out={**split, "creation_id": "1" * 32}) for name in ("sib", "sib2"))
    from sae_harvest.stores import split as split_module
    compared = []
    real = split_module.same_held_out
    monkeypatch.setattr(split_module, "same_held_out", lambda *a, **k: compared.append(1) or real(*a, **k))
    doc = run_geometry(GeometryConfig(saes=(here, there, unrecorded, sibling, sibling2), store=store, tokens=64,
                                      device="cpu", allow_shared_init=True)).to_dict()
    assert [x["frequency"]["trained_outside_split"] for x in doc["saes"]] == [True, False, False, True, True]
    assert len(compared) == 1    # one comparison per training store, not per SAE
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "there" in warnings[0] and "/elsewhere/other.zarr" in warnings[0] and "0" * 32 in warnings[0]
    assert "old" in warnings[1] and s.attrs["creation_id"] in warnings[1]
    # without --store nothing is compared and nothing warned
    run_geometry(GeometryConfig(saes=(there,), device="cpu"))
    assert "warning" not in capsys.readouterr().err


def test_geometry_cli_pngs_and_bad_input(store, tmp_path):
    p1 = save(tied_relu([e(j) for j in range(8)]), tmp_path / "a")
    p2 = save(make_sae(SAEConfig("topk", D, 32, k=4)), tmp_path / "b")
    out = tmp_path / "g.json"
    r = CliRunner().invoke(evaluate_cli, ["geometry", "--sae", p1, "--sae", p2, "--store", store, "--device", "cpu",
                                          "--json", str(out), "--plot", str(tmp_path / "fig" / "g")])
    assert r.exit_code == 0, r.output
    for suffix in ("nn", "cross", "freq"):
        assert (tmp_path / "fig" / f"g-{suffix}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(out.read_text())
    assert [s["name"] for s in doc["saes"]] == ["a", "b"] and len(doc["cross"]) == 2
    wrong_site = save(tied_relu([e(j) for j in range(8)]), tmp_path / "c", hook="blocks.2.resid_pre")
    for args, expect in ((["--sae", wrong_site, "--store", store], "not in store"),
                         (["--sae", p1, "--store", str(tmp_path / "nope.zarr")], "no store"),
                         (["--sae", str(tmp_path / "missing")], "missing")):
        r = CliRunner().invoke(evaluate_cli, ["geometry", "--device", "cpu", *args])
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines()[0].startswith("error:") and expect in r.output


# --- the typed results (evaluate/results.py) ---------------------------------------------------
def _printed(print_fn, result) -> str:
    import io

    from rich.console import Console

    console = Console(record=True, width=200, file=io.StringIO())
    print_fn(result, console)
    return console.export_text()


def test_results_read_back_from_their_json_and_print_the_same(assets, live_pair, meta_pair, store, tmp_path):
    """to_dict() is the document; from_dict() of the saved JSON rebuilds the typed result, which
    prints and writes the same (a saved report can be re-printed and re-plotted)."""
    from sae_harvest.evaluate.analysis_report import plot_geometry, plot_stitch, print_geometry, print_meta, print_stitch
    from sae_harvest.evaluate.geometry import GeometryConfig, run_geometry
    from sae_harvest.evaluate.meta import MetaConfig, run_meta
    from sae_harvest.evaluate.results import LatentDecomposition, SaeGeometry, StitchSummary

    _, _, p_small, p_large = live_pair
    stitch = run_stitch(StitchConfig(small=p_small, large=p_large, model=assets["gpt2"], dataset=assets["corpus"],
                                     tokens=CTX * 2, ctx_len=CTX, batch_size=4, device="cpu", ce_points=2),
                        progress=False)
    meta = run_meta(MetaConfig(sae=meta_pair[0], meta=meta_pair[1], latents=(0, 8), device="cpu"))
    p1 = save(tied_relu([e(j) for j in range(8)]), tmp_path / "a")
    geometry = run_geometry(GeometryConfig(saes=(p1, meta_pair[0]), store=store, device="cpu"))
    for result, print_fn, part, kind in ((stitch, print_stitch, "summary", StitchSummary),
                                         (meta, print_meta, "samples", LatentDecomposition),
                                         (geometry, print_geometry, "saes", SaeGeometry)):
        doc = json.loads(json.dumps(result.to_dict()))
        back = type(result).from_dict(doc)
        assert json.dumps(back.to_dict()) == json.dumps(doc)
        got = getattr(back, part)
        assert isinstance(got[0] if isinstance(got, list) else got, kind)
        assert _printed(print_fn, back) == _printed(print_fn, result)
    assert "ce_clean" in stitch.to_dict()["summary"]
    plot_stitch(type(stitch).from_dict(json.loads(json.dumps(stitch.to_dict()))), tmp_path / "s.png")
    assert plot_geometry(type(geometry).from_dict(json.loads(json.dumps(geometry.to_dict()))), tmp_path / "g") == \
        [str(tmp_path / f"g-{s}.png") for s in ("nn", "cross", "freq")]
    # the Python API replaces only plots of ours, like the commands
    from sae_harvest.stores.errors import UserError
    (tmp_path / "mine.png").write_bytes(b"a user's picture")
    with pytest.raises(UserError, match="is not a report of this tool"):
        plot_stitch(stitch, tmp_path / "mine.png")
    assert (tmp_path / "mine.png").read_bytes() == b"a user's picture"
    plot_stitch(stitch, tmp_path / "s.png")       # its own plot: replaced


def test_result_fields_left_out_when_not_measured():
    from sae_harvest.evaluate.results import SaeRef, StitchSummary

    numbers = dict(n_novel=1, n_reconstruction=2, n_groups=1, n_orphans=0, mse_small=1.0, mse_after_novel=0.5,
                   mse_after_swaps=0.4, mse_large=0.3, l0_small=2.0, l0_after_novel=3.0, l0_large=2.5,
                   novel_steps_lowering_mse=1.0, swap_steps_lowering_mse=None, largest_step_mse_increase=0.0,
                   largest_step_mse_increase_rel=0.0, novel_alone_lowering_mse=1.0,
                   reconstruction_alone_raising_mse=None)
    assert list(StitchSummary(**numbers).to_dict()) == list(numbers)   # no CE measured: no CE keys, None kept
    with_ce = StitchSummary(**numbers, ce_clean=3.0, ce_increase_small=0.1, ce_increase_after_novel=0.2,
                            ce_increase_large=0.05).to_dict()
    assert list(with_ce)[len(numbers):] == ["ce_clean", "ce_increase_small", "ce_increase_after_novel",
                                            "ce_increase_large"]
    assert SaeRef("p", "topk", 8).to_dict() == {"path": "p", "arch": "topk", "d_sae": 8}
    assert SaeRef("p", "topk", 8, d_in=4).to_dict() == {"path": "p", "arch": "topk", "d_sae": 8, "d_in": 4}


def test_meta_report_takes_a_relu_meta_sae(meta_pair, tmp_path):
    """`train fit --decoder-of ... --arch relu` makes a meta-SAE with no k: the report read
    `meta.cfg.k` and stopped on the per-architecture config (a ReLU config has no k field)."""
    from sae_harvest.evaluate.meta import MetaConfig, run_meta

    p_sae = meta_pair[0]
    meta = make_sae(SAEConfig("relu", D, 8, l1_coeff=1.0))
    with torch.no_grad():
        meta.W_dec.copy_(torch.eye(D)[:8])
        meta.W_enc.copy_(torch.eye(D)[:, :8])
    p_meta = save(meta, tmp_path / "meta", hook=f"meta:{p_sae}", decoder_of=p_sae)
    doc = run_meta(MetaConfig(sae=p_sae, meta=p_meta, latents=(0,), device="cpu")).to_dict()
    assert doc["meta"]["arch"] == "relu" and doc["meta"]["k"] == 0
