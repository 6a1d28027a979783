"""Several sites in one pass, and transcoders: equivalence with single-site runs, one read per block,
planted maps recovered, losses and gradients by hand, folding, SAELens's transcoder format, bad input."""
import json
import signal

import numpy as np
import pytest
import torch

from sae_harvest.train import local, multisite
from click.testing import CliRunner

from sae_harvest import train
from sae_harvest.stores import StoreWriter, open_store
from sae_harvest.stores.reader import Store
from sae_harvest.train.cli import main as train_cli
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.driver import TrainInterrupted
from sae_harvest.train.errors import TrainError
from sae_harvest.train.fit import fit
from sae_harvest.train.registry import SAEConfig, make_sae

D, D_OUT, F_PLANT = 16, 12, 32
RESID = ["blocks.0.resid_pre", "blocks.1.resid_pre", "blocks.2.resid_pre"]


def make_multisite_store(path, *, n_seqs=64, ctx=32, window_seqs=16, seed=0):
    """Three resid sites (each its own planted dictionary and scale), and a transcoder pair:
    blocks.0.mlp_out = ReLU(mlp_in @ E - 4) @ W (a planted sparse map into a narrower site, ~5 of
    32 latents active) + mlp_in @ A (a dense linear part, which only a skip transcoder can take exactly)."""
    rng = np.random.default_rng(seed)
    sites = {s: {"d": D, "encoding": "float32"} for s in RESID}
    sites.update({"blocks.0.mlp_in": {"d": D, "encoding": "float32"},
                  "blocks.0.mlp_out": {"d": D_OUT, "encoding": "float32"}})
    w = StoreWriter.create(str(path), meta={"model": {"name": "synthetic"}}, sites=sites, grads=None,
                           ctx_len=ctx, n_seqs=n_seqs, window_seqs=window_seqs)
    dicts = [rng.normal(size=(48, D)) for _ in RESID]
    dicts = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in dicts]
    enc = rng.normal(size=(D, F_PLANT)) / np.sqrt(D) * 4
    dec = rng.normal(size=(F_PLANT, D_OUT))
    dec /= np.linalg.norm(dec, axis=1, keepdims=True)
    dense = rng.normal(size=(D, D_OUT)) / np.sqrt(D)
    for win in range(n_seqs // window_seqs):
        n = window_seqs * ctx
        acts = {}
        for i, (site, d) in enumerate(zip(RESID, dicts)):
            codes = (rng.random((n, 48)) < 0.06) * rng.uniform(1, 3, (n, 48))
            acts[site] = (codes @ d * (5.0 * (i + 1))).astype(np.float32)
        x = rng.normal(size=(n, D))
        acts["blocks.0.mlp_in"] = x.astype(np.float32)
        acts["blocks.0.mlp_out"] = (np.maximum(x @ enc - 4.0, 0) @ dec + x @ dense).astype(np.float32)
        seqs = np.repeat(np.arange(win * window_seqs, (win + 1) * window_seqs), ctx)
        pos = np.tile(np.arange(ctx), window_seqs)
        perm = rng.permutation(n)
        w.write_window(win, rng.integers(0, 50, (window_seqs, ctx)), seqs[perm], pos[perm],
                       {s: a[perm] for s, a in acts.items()}, None)
    w.finish(n_seqs)
    return {"enc": enc, "dec": dec, "dense": dense}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("multisite") / "s.zarr"
    planted = make_multisite_store(path)
    return path, planted


def _cfg(store, out, **kw):
    base = dict(store=str(store), out=str(out), site="blocks.0.resid_pre", arch="topk", k=(4,), d_sae=48,
                batch_size=256, device="cpu", log_every=5, checkpoint_every=1000,
                tokens=256 * 12)
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return train.load_sae(path).state_dict()


# --- several sites in one pass -------------------------------------------------------------------
def test_three_site_run_equals_three_single_site_runs(store, tmp_path):
    path, _ = store
    multi = fit(_cfg(path, tmp_path / "multi", site="blocks.*.resid_pre", k=(2, 4)), progress=False)
    assert list(multi) == [f"{s}-topk_k{k}" for s in RESID for k in (2, 4)]
    for site in RESID:
        single = fit(_cfg(path, tmp_path / site, site=site, k=(2, 4)), progress=False)
        for k in (2, 4):
            a = _weights(tmp_path / "multi" / f"{site}-topk_k{k}")
            b = _weights(tmp_path / site / f"topk_k{k}")
            for name in b:
                assert torch.equal(a[name], b[name]), (site, k, name)
            cfg = json.loads((tmp_path / "multi" / f"{site}-topk_k{k}" / "cfg.json").read_text())
            assert cfg["sae_harvest"]["hook_name"] == site   # each SAE records its own site
            held_multi, held_single = multi[f"{site}-topk_k{k}"], single[f"topk_k{k}"]
            assert held_multi["held_out"] == held_single["held_out"]
            assert held_multi["input_scale"] == held_single["input_scale"]
    # each site has its own scale (the planted sites differ 1:2:3)
    scales = [multi[f"{s}-topk_k4"]["input_scale"] for s in RESID]
    assert scales[1] == pytest.approx(2 * scales[0], rel=0.1) and scales[2] == pytest.approx(3 * scales[0], rel=0.1)


def test_one_pass_reads_each_block_once(store, tmp_path, monkeypatch):
    """A 3-site run reads each block of each site array once, and the position array exactly as
    often as a single-site run does (not once per site)."""
    path, _ = store
    reads = []
    real = Store.read_rows

    def counting(self, name, a, b, keep=None, out=None, **kwargs):
        reads.append((name, a, b))
        return real(self, name, a, b, keep=keep, out=out, **kwargs)

    monkeypatch.setattr(Store, "read_rows", counting)
    n_rows = open_store(str(path)).n_rows
    trained = []   # how many reads the training steps made: the held-out report reads after them
    for module in (local, multisite):
        real_finish = module._finish

        def finish(*args, _real=real_finish, **kw):
            if len(trained) == 0 or trained[-1] is None:
                trained[-1:] = [len(reads)]
            return _real(*args, **kw)
        monkeypatch.setattr(module, "_finish", finish)

    def training_reads(**kw):
        reads.clear()
        trained[:] = [None]
        fit(_cfg(path, tmp_path / str(len(list(tmp_path.iterdir()))), tokens=None, **kw), progress=False)  # 1 epoch
        per_array = {}
        for name, a, b in reads[:trained[0]]:
            per_array.setdefault(name, []).append((a, b))
        return {name: sorted(spans) for name, spans in per_array.items()}

    single = training_reads(site=RESID[0])
    multi = training_reads(site=",".join(RESID))
    assert sorted(multi) == sorted(["rows/pos", "rows/seq"] + [f"acts/{s}" for s in RESID])   # only the sites trained on
    one_site = single[f"acts/{RESID[0]}"]
    assert len(one_site) == len(set(one_site))   # one epoch: each block once
    # the held-out sequences are spread over every block (stores/split.py): one epoch reads them all
    assert sum(b - a for a, b in one_site) >= 0.9 * n_rows
    for site in RESID:
        assert multi[f"acts/{site}"] == one_site, site
    assert multi["rows/pos"] == single["rows/pos"] and multi["rows/seq"] == single["rows/seq"]


def test_multisite_resume_continues_exactly(store, tmp_path):
    path, _ = store
    kw = dict(site="blocks.[01].resid_pre", arch="batchtopk", k=(4,), tokens=256 * 16)
    fit(_cfg(path, tmp_path / "full", **kw), progress=False)

    def interrupt(event):
        if event.step == 7:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainInterrupted):
        fit(_cfg(path, tmp_path / "part", **kw), progress=False, on_step=interrupt)
    fit(_cfg(path, tmp_path / "part", **kw), resume=True, progress=False)
    for site in RESID[:2]:
        a, b = _weights(tmp_path / "full" / f"{site}-batchtopk_k4"), _weights(tmp_path / "part" / f"{site}-batchtopk_k4")
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_stacked_sites_train_the_unstacked_weights(store, tmp_path):
    """--stack-sweep on: the SAEs of three sites (a sweep each) step as one stacked module reading
    [S, n, d] inputs; the weights, metrics and held-out figures are the unstacked run's (up to the
    batched matmuls' rounding: the unstacked path is the bitwise reference of single-site runs)."""
    path, _ = store
    kw = dict(site="blocks.*.resid_pre", k=(2, 4), dead_tokens=256 * 3, log_every=3)
    runs = {}
    seen = []
    for setting in ("off", "on"):
        runs[setting] = fit(_cfg(path, tmp_path / setting, stack_sweep=setting, **kw), progress=False,
                            on_step=lambda e: seen.append(e.runs) if e.step == 0 else None)
    names = [f"{s}-topk_k{k}" for s in RESID for k in (2, 4)]
    assert list(runs["on"]) == names
    # the stacked run's SAEs are views of one stacked tensor: they were stepped together
    stacked_params = seen[1]
    base = stacked_params[names[0]].sae.W_enc.untyped_storage().data_ptr()
    assert all(stacked_params[n].sae.W_enc.untyped_storage().data_ptr() == base for n in names)
    for name in names:
        a, b = _weights(tmp_path / "off" / name), _weights(tmp_path / "on" / name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
        ma = [json.loads(line) for line in (tmp_path / "off" / name / "metrics.jsonl").read_text().splitlines()]
        mb = [json.loads(line) for line in (tmp_path / "on" / name / "metrics.jsonl").read_text().splitlines()]
        assert [list(r) for r in ma] == [list(r) for r in mb]   # the same records, keys in the same order
        for ra, rb in zip(ma, mb):
            for key in ("loss", "mse", "aux", "l0", "nmse", "dead_fraction", "lr"):
                assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-6), (name, key)
        assert runs["on"][name]["held_out"]["nmse"] == pytest.approx(runs["off"][name]["held_out"]["nmse"], rel=1e-3)
        assert runs["on"][name]["input_scale"] == runs["off"][name]["input_scale"]   # each site its own scale


def test_multifeed_reads_into_its_buffers(store):
    """The multi-site feed's direct path (PinnedBuffers, pinned on CUDA; pin off here): the same
    bytes as the copying path and as the store's own decoding, in the buffers the reads wrote."""
    from sae_harvest.train.feeds import PinnedBuffers

    path, _ = store
    s = open_store(str(path))
    sites = RESID[:2]
    kw = dict(seed=3, grads=False, exclude_pos0=True)
    plain = multisite.MultiFeed(s, sites, 96, **kw, direct=False)
    direct = multisite.MultiFeed(s, sites, 96, **kw, direct=True)
    assert isinstance(direct.buffers, PinnedBuffers) and plain.buffers is None
    allocated, alloc = [], direct.iter.alloc
    direct.iter.alloc = lambda shape, dtype: allocated.append(alloc(shape, dtype)) or allocated[-1]
    n = 0
    for a, b in zip(plain, direct):
        for site in sites:
            assert torch.equal(a["acts"][site], b["acts"][site])
            assert any(b["acts"][site].data_ptr() == arr.ctypes.data for arr in allocated)   # no copy
        n += 1
        if n == 8:
            break
    assert n == 8 and plain.state() == direct.state()
    rows = next(iter(s.batches(sites, 96, seqs="train", seed=3, exclude_pos0=True)))["rows"]
    first = next(iter(multisite.MultiFeed(s, sites, 96, **kw, direct=True)))
    for site in sites:
        np.testing.assert_array_equal(first["acts"][site].float().numpy(), s.acts(site, rows))


# --- transcoders --------------------------------------------------------------------------------
def _raw(path, sites):
    s = open_store(str(path))   # the rows of the store's held-out sequences, position 0 excluded
    batches = list(s.batches(sites, 4096, seqs="held_out", exclude_pos0=True, epochs=1, drop_last=False))
    return [torch.from_numpy(np.concatenate([b["acts"][site] for b in batches])) for site in sites]


def test_transcoder_recovers_a_planted_sparse_map(store, tmp_path):
    path, planted = store
    out = tmp_path / "tc"
    summaries = fit(_cfg(path, out, site="blocks.0.mlp_in", target="blocks.0.mlp_out", skip=True, k=(8,),
                         d_sae=64, lr=1e-2, tokens=256 * 400), progress=False)
    name = "blocks.0.mlp_in-blocks.0.mlp_out-skip_transcoder_topk_k8"
    held = summaries[name]["held_out"]
    x, y = _raw(path, ["blocks.0.mlp_in", "blocks.0.mlp_out"])
    ones = torch.cat([x, torch.ones(len(x), 1)], 1)   # the best affine map, by least squares: FVU ~0.44
    affine = ones @ torch.linalg.lstsq(ones, y).solution
    linear_fvu = float((affine - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert held["fvu"] < 0.3 * linear_fvu, (held, linear_fvu)
    cfg = json.loads((out / name / "cfg.json").read_text())
    assert cfg["architecture"] == "topk_skip_transcoder" and cfg["d_out"] == D_OUT
    assert cfg["sae_harvest"]["target"] == "blocks.0.mlp_out" and cfg["sae_harvest"]["hook_name"] == "blocks.0.mlp_in"
    tc = train.load_sae(out / name)
    with torch.no_grad():
        fvu = float((tc(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu == pytest.approx(held["fvu"], rel=1e-3)   # saved weights take raw activations
    # the planted decoder directions are found, far closer than random rows come by chance
    def best_cos(rows):
        rows = rows / rows.norm(dim=-1, keepdim=True)
        return (torch.from_numpy(planted["dec"]).float() @ rows.T).max(1).values
    cos = best_cos(tc.W_dec.detach())
    chance = best_cos(torch.randn(64, D_OUT, generator=torch.Generator().manual_seed(0)))
    assert cos.mean() > 0.85 and chance.mean() < 0.75, (cos, chance)


def test_skip_transcoder_beats_plain_on_a_dense_part(store, tmp_path):
    path, _ = store
    fvu = {}
    for skip in (False, True):
        s = fit(_cfg(path, tmp_path / f"s{skip}", site="blocks.0.mlp_in", target="blocks.0.mlp_out", skip=skip,
                     k=(8,), d_sae=64, lr=1e-2, tokens=256 * 250), progress=False)
        fvu[skip] = next(iter(s.values()))["held_out"]["fvu"]
    assert fvu[True] < 0.8 * fvu[False], fvu


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_transcoder_loss_and_gradients_by_hand(arch):
    torch.manual_seed(0)
    kw = {"k": 3} if arch in ("topk", "batchtopk") else {"l1_coeff": 0.5}
    tc = make_sae(SAEConfig(arch=arch, d_in=5, d_sae=8, d_out=3, skip=True, **kw))
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    out = tc.loss(x, target=y)
    out.loss.backward()
    # by hand, from the weights alone
    W_enc, b_enc, W_dec, b_dec, W_skip = (getattr(tc, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"))
    pre = x @ W_enc + b_enc                      # no b_dec subtraction: it lives in the output space
    if arch == "relu":
        f = pre.clamp_min(0)
        penalty = 0.5 / 5 * f.abs().sum(-1).mean()
    elif arch == "topk":
        pre = pre.clamp_min(0)
        f = torch.where(pre >= pre.topk(3, dim=-1).values[:, -1:], pre, torch.zeros_like(pre))
        penalty = 0.0
    elif arch == "batchtopk":
        pre = pre.clamp_min(0)
        f = torch.where(pre >= pre.flatten().topk(18).values[-1], pre, torch.zeros_like(pre))
        penalty = 0.0
    else:
        theta = tc.threshold.detach()
        f = pre * (pre > theta)
        penalty = 0.5 * (pre > theta).float().sum(-1).mean()
    y_hat = f @ W_dec + b_dec + x @ W_skip.T
    err = y_hat - y
    torch.testing.assert_close(out.x_hat, y_hat)
    torch.testing.assert_close(out.loss, err.pow(2).sum(-1).mean() + penalty)
    # the gradients of the reconstruction's linear parts, by hand: d/dW_skip = 2/n err^T x, etc.
    n = len(x)
    torch.testing.assert_close(tc.W_skip.grad, 2 / n * err.T @ x)
    torch.testing.assert_close(tc.b_dec.grad, 2 / n * err.sum(0))
    torch.testing.assert_close(tc.W_dec.grad, 2 / n * f.T @ err)
    if arch == "relu":   # and the encoder's, through the active latents plus the L1 term
        g_f = 2 / n * err @ W_dec.T + 0.5 / 5 / n
        torch.testing.assert_close(tc.W_enc.grad, x.T @ (g_f * (pre > 0)))


@pytest.mark.parametrize("arch, skip", [("relu", True), ("jumprelu", False), ("jumprelu", True), ("relu", False)])
def test_saelens_loads_our_transcoders(tmp_path, arch, skip):
    sl = pytest.importorskip("sae_lens")
    from sae_harvest.train.sae_io import save_sae

    torch.manual_seed(1)
    tc = make_sae(SAEConfig(arch=arch, d_in=D, d_sae=24, d_out=D_OUT, skip=skip, l1_coeff=0.1))
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    save_sae(tc, tmp_path / "t", extra_cfg={"hook_name": "blocks.1.mlp_in"})
    theirs = sl.SAE.load_from_disk(str(tmp_path / "t"))
    assert type(theirs).__name__ == {("relu", False): "Transcoder", ("relu", True): "SkipTranscoder",
                                     ("jumprelu", False): "JumpReLUTranscoder",
                                     ("jumprelu", True): "JumpReLUSkipTranscoder"}[(arch, skip)]
    x = torch.randn(32, D)
    tc.eval()
    with torch.no_grad():
        assert (tc.encode(x) > 0).any()
        torch.testing.assert_close(theirs.encode(x), tc.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs(x), tc(x), rtol=1e-5, atol=1e-5)
    ours = train.load_sae(tmp_path / "t")   # and back
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tc(x))


def test_fold_scales_keeps_latents_and_scales_outputs():
    torch.manual_seed(3)
    tc = make_sae(SAEConfig(arch="topk", d_in=D, d_sae=24, d_out=D_OUT, skip=True, k=4))
    with torch.no_grad():
        tc.W_skip.copy_(torch.randn_like(tc.W_skip))
    x = torch.randn(10, D)
    with torch.no_grad():
        f, y = tc.encode(x), tc(x)
        tc.fold_scales(3.0, 0.5)
        torch.testing.assert_close(tc.encode(3.0 * x), f)
        torch.testing.assert_close(tc(3.0 * x), 0.5 * y)


# --- bad input ----------------------------------------------------------------------------------
def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


@pytest.mark.parametrize("args, words", [
    (["--site", "blocks.0.mlp_in", "--target", "blocks.5.mlp_out"], ["--target", "matches no site", "mlp_out"]),
    (["--site", "blocks.0.mlp_in", "--target", "blocks.0.mlp_out", "--arch", "gated"], ["cannot be a transcoder"]),
    (["--site", "blocks.[01].resid_pre", "--target", "blocks.0.mlp_out"], ["pair one to one"]),
    (["--site", "blocks.9.*"], ["matches no site"]),
    (["--site", "blocks.0.mlp_in", "--skip"], ["--skip is for transcoders"]),
    # one transcoder trains e2e (tests/test_e2e_transcoder.py); several sites or pairs do not
    (["--site", "blocks.[01].resid_pre", "--loss", "e2e"], ["--loss e2e", "one site"]),
    # SAEs of several sites stack (test_stacked_sites_train_the_unstacked_weights); transcoders do not
    (["--site", "blocks.0.mlp_in", "--target", "blocks.0.mlp_out", "--stack-sweep", "on", "--k", "4,8"],
     ["--stack-sweep on", "not a plain"]),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(store, tmp_path, args, words):
    path, _ = store
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before, store_before = _snapshot(tmp_path), _snapshot(path)
    r = CliRunner().invoke(train_cli, ["fit", "--store", str(path), "--out", str(out / "run"), "--device", "cpu",
                                       "--d-sae", "32", *args])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for word in words:
        assert word in lines[0], lines[0]
    assert _snapshot(tmp_path) == before and _snapshot(path) == store_before


def test_width_that_does_not_fit_is_refused(store, tmp_path):
    """--init of a transcoder with other widths: one line, exit 2, nothing written; kinds that
    cannot be transcoders are refused by the config itself."""
    path, _ = store
    args = ["fit", "--store", str(path), "--device", "cpu", "--site", "blocks.0.mlp_in", "--target",
            "blocks.0.mlp_out", "--tokens", "512", "--batch-size", "256"]
    r = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "first"), "--d-sae", "32", "--quiet"])
    assert r.exit_code == 0, r.output
    (first,) = [p for p in (tmp_path / "first").iterdir() if p.name != "checkpoint"]
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "second"), "--d-sae", "48", "--init", str(first)])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "16->32->12" in lines[0] and "16->48->12" in lines[0], r.output
    assert _snapshot(tmp_path) == before
    # the same widths start from it: the first step's weights are the saved ones, unfolded
    seen = []
    fit(_cfg(path, tmp_path / "third", site="blocks.0.mlp_in", target="blocks.0.mlp_out", d_sae=32, k=(32,),
             init=str(first), tokens=256), progress=False,
        on_step=lambda e: seen.append({n: p.detach().clone() for n, p in next(iter(e.runs.values())).sae.named_parameters()}))
    saved = train.load_sae(first)
    scale_in = json.loads((first / "summary.json").read_text())["input_scale"]
    torch.testing.assert_close(seen[0]["W_enc"], saved.W_enc * scale_in)
    with pytest.raises(ValueError, match="cannot be a transcoder"):
        SAEConfig(arch="gated", d_in=4, d_sae=8, d_out=3)
    with pytest.raises(ValueError, match="skip connection needs a transcoder"):
        SAEConfig(arch="topk", d_in=4, d_sae=8, k=2, skip=True)


# --- under torchrun ----------------------------------------------------------------------------
@pytest.mark.slow   # one torchrun job of two processes
def test_sites_under_torchrun_data_parallel_and_spread_over_ranks(tmp_path):
    """Two sites, two ranks: data parallel gives what one process gives (up to the all-reduce's
    rounding); --sweep-parallel deals the sites' SAEs over the ranks, bitwise as one process."""
    from tests.test_distributed import WORKER, torchrun
    from tests.test_train_loop import _cfg as one_cfg, make_store

    path = tmp_path / "s.zarr"
    make_store(path)   # blocks.0.resid_pre and blocks.1.resid_pre
    kw = dict(site="blocks.*.resid_pre", tokens=256 * 8, log_every=4)
    fit(one_cfg(path, tmp_path / "one", **kw), progress=False)
    configs = [one_cfg(path, tmp_path / "dp", **kw).to_dict(),
               one_cfg(path, tmp_path / "sp", sweep_parallel=True, **kw).to_dict()]
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    r = torchrun(WORKER, str(tmp_path / "configs.json"), "--results", str(tmp_path / "results.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    names = ["blocks.0.resid_pre-topk_k4", "blocks.1.resid_pre-topk_k4"]
    assert list(results[0]["summaries"]) == list(results[1]["summaries"]) == names
    for rank, name in enumerate(names):
        one = _weights(tmp_path / "one" / name)
        for key, value in _weights(tmp_path / "dp" / name).items():
            torch.testing.assert_close(value, one[key], rtol=1e-5, atol=1e-6)
        for key, value in _weights(tmp_path / "sp" / name).items():
            assert torch.equal(value, one[key]), (name, key)
        assert results[1]["summaries"][name]["rank"] == rank   # one site per rank


def test_transformerlens_names_of_the_normalised_inputs():
    """Ours are written as the nearest TransformerLens hooks; a foreign checkpoint hooked there is
    not read back as ours (TransformerLens's are before the norm's affine weights)."""
    from sae_harvest.harvest.models import KINDS
    from sae_harvest.train.saelens_format import TL_HOOKS, site_from_hook_name, tl_hook_name

    assert set(TL_HOOKS) == set(KINDS)
    assert tl_hook_name("blocks.3.mlp_in") == "blocks.3.ln2.hook_normalized"
    assert tl_hook_name("blocks.3.attn_in") == "blocks.3.ln1.hook_normalized"
    assert site_from_hook_name("blocks.3.mlp_in") == "blocks.3.mlp_in"
    with pytest.raises(ValueError, match="neither a site"):
        site_from_hook_name("blocks.3.ln2.hook_normalized")


# --- crosscoders ------------------------------------------------------------------------------
CROSS = ["blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post"]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """Three sites written by the same sparse latents: x_s = codes @ D_s * scale_s (a planted
    crosscoder: latent j has direction D_s[j] at every site s), plus one narrower site."""
    path = tmp_path_factory.mktemp("cross") / "s.zarr"
    rng = np.random.default_rng(5)
    n_seqs, ctx, window_seqs, n_lat = 64, 32, 16, 24
    sites = {s: {"d": D, "encoding": "float32"} for s in CROSS}
    sites["blocks.2.mlp_out"] = {"d": D_OUT, "encoding": "float32"}
    w = StoreWriter.create(str(path), meta={"model": {"name": "synthetic"}}, sites=sites, grads=None,
                           ctx_len=ctx, n_seqs=n_seqs, window_seqs=window_seqs)
    dicts = [rng.normal(size=(n_lat, D)) for _ in CROSS]
    dicts = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in dicts]
    for win in range(n_seqs // window_seqs):
        n = window_seqs * ctx
        codes = (rng.random((n, n_lat)) < 0.08) * rng.uniform(1, 3, (n, n_lat))
        acts = {s: (codes @ d * (3.0 * (i + 1))).astype(np.float32) for i, (s, d) in enumerate(zip(CROSS, dicts))}
        acts["blocks.2.mlp_out"] = rng.normal(size=(n, D_OUT)).astype(np.float32)
        seqs = np.repeat(np.arange(win * window_seqs, (win + 1) * window_seqs), ctx)
        pos = np.tile(np.arange(ctx), window_seqs)
        perm = rng.permutation(n)
        w.write_window(win, rng.integers(0, 50, (window_seqs, ctx)), seqs[perm], pos[perm],
                       {s: a[perm] for s, a in acts.items()}, None)
    w.finish(n_seqs)
    return path, dicts


def test_crosscoder_recovers_latents_shared_across_sites(shared_store, tmp_path):
    path, dicts = shared_store
    out = tmp_path / "cc"
    summaries = fit(_cfg(path, out, site="blocks.*.resid_post", crosscoder=True, k=(4,), d_sae=48, lr=1e-2,
                         tokens=256 * 300), progress=False)
    held = summaries["crosscoder_topk_k4"]["held_out"]
    assert set(held["per_site"]) == set(CROSS) and all(v["nmse"] < 0.15 for v in held["per_site"].values()), held
    cc = train.load_sae(out / "crosscoder_topk_k4")
    cfg = json.loads((out / "crosscoder_topk_k4" / "cfg.json").read_text())
    assert cfg["sae_harvest"]["sites"] == CROSS and cc.cfg.n_sites == 3 and cc.cfg.d_in == 3 * D
    # one learned latent per planted one, the same at every site: pick it by site 0, check 1 and 2
    rows = cc.W_dec.detach().view(48, 3, D)
    rows = rows / rows.norm(dim=-1, keepdim=True)
    planted = [torch.from_numpy(d).float() for d in dicts]
    best = (planted[0] @ rows[:, 0].T).argmax(1)   # [24]
    for s in range(3):
        cos = (planted[s] * rows[best, s]).sum(-1)
        assert cos.mean() > 0.9, (s, cos)
    # the saved crosscoder takes the raw concatenation: its per-site NMSE on raw rows is the reported one
    xs = _raw(path, CROSS)
    with torch.no_grad():
        parts = cc(torch.cat(xs, -1)).split(D, -1)
    for site, x, x_hat in zip(CROSS, xs, parts):
        assert float((x_hat - x).pow(2).sum() / x.pow(2).sum()) == pytest.approx(held["per_site"][site]["nmse"],
                                                                                rel=1e-3)


def test_crosscoder_relu_loss_and_gradients_by_hand():
    torch.manual_seed(0)
    cc = make_sae(SAEConfig(arch="relu", d_in=3 * 4, d_sae=6, n_sites=3, l1_coeff=2.0))
    with torch.no_grad():
        for p in cc.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(5, 12)
    out = cc.loss(x)
    out.loss.backward()
    W_enc, b_enc, W_dec, b_dec = (getattr(cc, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    # the sum of the per-site encoders' contributions, before the ReLU
    pre = sum(x[:, 4 * s:4 * s + 4] @ W_enc[4 * s:4 * s + 4] for s in range(3)) + b_enc
    f = pre.clamp_min(0)
    x_hat = torch.cat([f @ W_dec[:, 4 * s:4 * s + 4] + b_dec[4 * s:4 * s + 4] for s in range(3)], -1)
    norms = torch.stack([W_dec[:, 4 * s:4 * s + 4].norm(dim=-1) for s in range(3)], -1)   # [6, 3]
    penalty = 2.0 / 12 * (f * norms.sum(-1)).sum(-1).mean()
    err = x_hat - x
    torch.testing.assert_close(out.loss, err.pow(2).sum(-1).mean() + penalty)
    # d/dW_dec: reconstruction 2/n f^T err, plus the penalty's (lambda/d) mean_n f_i W_dec,s,i / ||W_dec,s,i||
    unit = torch.cat([W_dec[:, 4 * s:4 * s + 4] / norms[:, s:s + 1] for s in range(3)], -1)
    want = 2 / 5 * f.T @ err + 2.0 / 12 * f.mean(0)[:, None] * unit
    torch.testing.assert_close(cc.W_dec.grad, want)
    # and the optimizer step leaves a relu crosscoder's decoder norms free (the penalty holds them)
    before = cc.W_dec.detach().clone()
    cc.remove_gradient_parallel_to_decoder_directions()
    cc.set_decoder_norm_to_unit_norm()
    assert torch.equal(cc.W_dec.detach(), before)


@pytest.mark.parametrize("args, words", [
    (["--site", "blocks.2.*", "--crosscoder"], ["one width", "blocks.2.mlp_out (12)"]),
    (["--site", "blocks.0.resid_post", "--crosscoder"], ["at least two sites"]),
    (["--site", "blocks.*.resid_post", "--crosscoder", "--arch", "jumprelu"], ["cannot be a crosscoder"]),
])
def test_crosscoder_bad_input(shared_store, tmp_path, args, words):
    path, _ = shared_store
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(train_cli, ["fit", "--store", str(path), "--out", str(tmp_path / "run"), "--device", "cpu",
                                       "--d-sae", "32", *args])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    for word in words:
        assert word in lines[0], lines[0]
    assert _snapshot(tmp_path) == before


def test_checkpoint_saved_before_the_new_options_still_resumes(store, tmp_path):
    """A checkpoint whose saved config predates --target / --skip / --clt / --crosscoder resumes
    (the missing options count as their defaults), and a real difference is still refused."""
    path, _ = store
    kw = dict(site="blocks.0.resid_pre", tokens=256 * 8)

    def interrupt(event):
        if event.step == 3:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainInterrupted):
        fit(_cfg(path, tmp_path / "run", **kw), progress=False, on_step=interrupt)
    state = tmp_path / "run" / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    for key in ("target", "skip", "clt", "crosscoder"):
        del meta["config"][key]
    state.write_text(json.dumps(meta))
    with pytest.raises(TrainError, match="options differ from the saved run: k"):
        fit(_cfg(path, tmp_path / "run", k=(8,), **kw), resume=True, progress=False)
    fit(_cfg(path, tmp_path / "run", **kw), resume=True, progress=False)
    assert (tmp_path / "run" / "topk_k4" / "cfg.json").exists()
