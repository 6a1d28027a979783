"""`evaluate features` on a crafted store with known answers, against brute-force numpy.

Latent i < 14 fires on token id i with value 0.5 * (1 + (seq + pos) % 4) (many ties), latent 14
never fires, latent 15 fires on every row (0.25 + 0.01 pos). Position-0 rows carry 100 on their
token's latent: they must never count. The SAE is exact (identity columns, zero biases), so numpy
computes every activation exactly from the stored rows.
"""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_harvest.evaluate.features import FeaturesConfig, run_features
from sae_harvest.evaluate.features_stats import HIST_EDGES
from sae_harvest.stores import StoreWriter, open_store
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_io import save_sae
from tests.tiny_models import make_tiny_model

SITE, D, F, CTX, SEQS, WIN = "blocks.1.resid_pre", 64, 16, 12, 24, 8
NEVER, EVERY = 14, 15


def value(s, p):
    return 0.5 * (1 + (s + p) % 4)


def write_crafted_store(path, model: str, *, tokens=True):
    rng = np.random.default_rng(0)
    toks = rng.choice(np.r_[np.arange(14), 20, 30], size=(SEQS, CTX)).astype(np.int32)
    w = StoreWriter.create(str(path), meta={"model": {"name": model}}, sites={SITE: {"d": D, "encoding": "float32"}},
                           grads=None, ctx_len=CTX, n_seqs=SEQS, window_seqs=WIN)
    for win in range(SEQS // WIN):
        seqs = np.arange(win * WIN, (win + 1) * WIN)
        rows_seq, rows_pos = np.repeat(seqs, CTX), np.tile(np.arange(CTX), WIN)
        x = np.zeros((len(rows_seq), D), np.float32)
        for h, (s, p) in enumerate(zip(rows_seq, rows_pos)):
            t = toks[s, p]
            if t < 14:
                x[h, t] = 100.0 if p == 0 else value(s, p)
            x[h, EVERY] = 0.25 + 0.01 * p
        perm = rng.permutation(len(rows_seq))
        w.write_window(win, toks[seqs], rows_seq[perm], rows_pos[perm], {SITE: x[perm]})
    w.finish(SEQS)
    return toks


def crafted_sae(path, scale=1.0):
    sae = make_sae(SAEConfig("relu", D, F))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        for i in list(range(14)) + [EVERY]:
            sae.W_enc[i, i] = scale
            sae.W_dec[i, i] = 1.0
        sae.W_dec[NEVER, 40] = 1.0
        sae.W_dec[3, 4] = 0.5     # latent 3 leans towards latent 4: a known nearest neighbour
        sae.b_enc[NEVER] = -1.0
    save_sae(sae, path, extra_cfg={"hook_name": SITE})
    return str(path), sae


def make_crafted(tmp_path_factory) -> dict:
    """The crafted store and SAEs (tests/conftest.py `features_crafted` shares one across files)."""
    root = tmp_path_factory.mktemp("features")
    model = make_tiny_model("gpt2", root / "gpt2")
    toks = write_crafted_store(root / "s.zarr", model)
    sae_a, sae = crafted_sae(root / "sae_a")
    sae_b, sae2 = crafted_sae(root / "sae_b", scale=2.0)
    return {"root": root, "model": model, "store": str(root / "s.zarr"), "tokens": toks,
            "saes": [sae_a, sae_b], "modules": [sae, sae2]}


@pytest.fixture(scope="module")
def crafted(features_crafted):
    return features_crafted


@pytest.fixture(scope="module")
def built(features_built):
    return features_built


def cfg_for(crafted, out, **kw):
    base = dict(store=crafted["store"], saes=tuple(crafted["saes"]), out=str(out), top=5, bands=3,
                band_examples=2, before=4, after=2, block_rows=40, device="cpu")
    return FeaturesConfig(**{**base, **kw})


def read_data(out, key):
    text = (Path(out) / "data" / f"{key}.js").read_text()
    m = re.fullmatch(r'FB\.loaded\("([^"]+)", (.*)\);\n', text, re.S)
    assert m and m.group(1) == key
    return json.loads(m.group(2))


def latent_records(out, k):
    recs = []
    for n in range(math.ceil(F / 128)):
        recs += read_data(out, f"s{k}/c{n}")
    return recs


def make_built(crafted, tmp_path_factory):
    """The browser of the crafted SAEs (tests/conftest.py `features_built`)."""
    out = tmp_path_factory.mktemp("out") / "browser"
    summary = run_features(cfg_for(crafted, out), progress=False)
    return out, summary


# ---- brute force ---------------------------------------------------------------------------------
def brute(crafted, k=0):
    store = open_store(crafted["store"])
    x = store.acts(SITE, slice(None))
    sae = crafted["modules"][k]
    feats = np.maximum(x @ sae.W_enc.detach().numpy() + sae.b_enc.detach().numpy(), 0).astype(np.float32)
    seq, pos = np.asarray(store.rows_seq[:]), np.asarray(store.rows_pos[:])
    return feats, seq, pos, np.nonzero(pos != 0)[0]


def splitmix(x):
    x = (x + np.uint64(0x9E3779B97F4A7C15))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def priority(rows, latent, seed=0):
    with np.errstate(over="ignore"):
        h = splitmix(splitmix(rows.astype(np.uint64) + np.uint64(seed << 40)) + np.uint64(latent))
    return (h >> np.uint64(33)).astype(np.int64)


def test_statistics_equal_brute_force(crafted, built):
    out, summary = built
    feats, seq, pos, used = brute(crafted)
    ix = read_data(out, "s0/index")
    recs = latent_records(out, 0)
    assert summary["rows"] == len(used) == SEQS * (CTX - 1)
    for f in range(F):
        v = feats[used, f]
        fire = v[v > 0]
        assert ix["density"][f] == pytest.approx(len(fire) / len(used), abs=0)
        assert recs[f]["fires"] == len(fire)
        assert ix["max"][f] == pytest.approx(float(fire.max()) if len(fire) else 0.0)
        assert ix["mean"][f] == pytest.approx(float(fire.mean()) if len(fire) else 0.0, rel=1e-4)
        hist = np.bincount(np.searchsorted(HIST_EDGES, fire, side="right"), minlength=len(HIST_EDGES) + 1)
        lo = recs[f]["hist"]["lo"]
        got = np.zeros_like(hist)
        got[lo:lo + len(recs[f]["hist"]["counts"])] = recs[f]["hist"]["counts"]
        np.testing.assert_array_equal(got, hist)
    assert ix["density"][NEVER] == 0 and recs[NEVER]["top"] == [] and recs[NEVER]["hist"]["counts"] == []
    assert ix["density"][EVERY] == 1.0
    assert ix["max"][0] < 100        # position 0 never counts


def test_top_examples_are_an_exact_sort_with_ties_by_row(crafted, built):
    out, _ = built
    feats, seq, pos, used = brute(crafted)
    recs = latent_records(out, 0)
    for f in range(F):
        v = feats[used, f]
        rows = used[v > 0]
        order = np.lexsort((rows, -feats[rows, f]))[:5]
        assert [e["row"] for e in recs[f]["top"]] == rows[order].tolist(), f
        assert [e["v"] for e in recs[f]["top"]] == pytest.approx(feats[rows[order], f].tolist())
        want = list(zip(seq[rows[order]].tolist(), pos[rows[order]].tolist()))
        assert [(e["seq"], e["pos"]) for e in recs[f]["top"]] == want
    # the crafted values tie a lot: the test means something only if top-5 cuts through a tie
    v0 = np.sort(feats[used, 0][feats[used, 0] > 0])[::-1]
    assert len(v0) > 5 and v0[4] == v0[5]


def test_band_samples_equal_brute_force(crafted, built):
    out, _ = built
    feats, _, _, used = brute(crafted)
    recs = latent_records(out, 0)
    for f in range(F):
        v = feats[used, f]
        rows = used[v > 0]
        if not len(rows):
            assert all(b["count"] == 0 and b["ex"] == [] for b in recs[f]["bands"])
            continue
        mx = float(feats[rows, f].max())
        band = np.clip(np.ceil(feats[rows, f].astype(np.float64) * 3 / mx) - 1, 0, 2).astype(int)
        pr = priority(rows, f)
        for b in range(3):
            inb = rows[band == b]
            want = inb[np.lexsort((inb, pr[band == b]))][:2]
            assert recs[f]["bands"][b]["count"] == len(inb)
            assert [e["row"] for e in recs[f]["bands"][b]["ex"]] == want.tolist(), (f, b)
            assert recs[f]["bands"][b]["lo"] == pytest.approx(mx * b / 3, rel=1e-4)


def test_every_context_token_and_value(crafted, built):
    out, _ = built
    feats, seq, pos, _ = brute(crafted)
    where = {(s, p): r for r, (s, p) in enumerate(zip(seq.tolist(), pos.tolist()))}
    vocab = read_data(out, "vocab")
    for f, rec in enumerate(latent_records(out, 0)):
        for ex in rec["top"] + [e for b in rec["bands"] for e in b["ex"]]:
            s, p = ex["seq"], ex["pos"]
            span = range(max(0, p - 4), min(CTX, p + 3))
            assert ex["t"] == crafted["tokens"][s, span.start:span.stop].tolist()
            assert ex["a"] == pytest.approx([float(feats[where[s, q], f]) for q in span])
            assert ex["c"] == p - span.start
            assert all(str(t) in vocab for t in ex["t"])
    # latent i fires on token i: its top contexts are centred on token i
    rec = latent_records(out, 0)[5]
    assert {ex["t"][ex["c"]] for ex in rec["top"]} == {5}


def test_logits_and_neighbours(crafted, built):
    from transformers import AutoModelForCausalLM

    out, _ = built
    model = AutoModelForCausalLM.from_pretrained(crafted["model"])
    ln = model.transformer.ln_f
    W_U = model.lm_head.weight.detach()
    dec = crafted["modules"][0].W_dec.detach()
    eff = ((dec - dec.mean(-1, keepdim=True)) * ln.weight.detach()) @ W_U.T
    recs = latent_records(out, 0)
    for f in (0, 3, NEVER):
        assert [t for t, _ in recs[f]["pos"]] == eff[f].topk(10).indices.tolist()
        assert [t for t, _ in recs[f]["neg"]] == eff[f].topk(10, largest=False).indices.tolist()
        assert [v for _, v in recs[f]["pos"]] == pytest.approx(eff[f].topk(10).values.tolist(), rel=1e-3)
    u = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (u @ u.T).fill_diagonal_(-2)
    for f in range(F):   # ties (cosine 0) may list any of the tied latents: check the cosines
        assert [c for _, c in recs[f]["nb"]] == pytest.approx(cos[f].topk(5).values.tolist(), abs=1e-5)
        assert all(cos[f, j] == pytest.approx(c, abs=1e-5) and j != f for j, c in recs[f]["nb"])
    assert recs[3]["nb"][0][0] == 4 and recs[3]["nb"][0][1] == pytest.approx(0.5 / math.sqrt(1.25), rel=1e-4)


def test_several_saes_and_manifest(crafted, built):
    out, summary = built
    meta = read_data(out, "saes")
    assert [s["name"] for s in meta["saes"]] == ["sae_a", "sae_b"]
    a, b = read_data(out, "s0/index"), read_data(out, "s1/index")
    assert b["max"][0] == pytest.approx(2 * a["max"][0])     # the second SAE scales its encoder by 2
    assert json.loads((out / "features.json").read_text())["tool"] == summary["tool"]


def test_tokens_option_and_pos0(crafted, tmp_path):
    out = tmp_path / "b"
    run_features(cfg_for(crafted, out, saes=crafted["saes"][:1], tokens=100, pos0=True), progress=False)
    feats, seq, pos, _ = brute(crafted)
    ix = read_data(out, "s0/index")
    rows = np.arange(100)
    for f in range(F):
        v = feats[rows, f]
        assert ix["density"][f] == (v > 0).sum() / 100
    assert max(ix["max"]) == 100.0     # position 0 counted when asked


def test_neuronpedia_export(crafted, built, tmp_path):
    out = tmp_path / "np"
    run_features(cfg_for(crafted, out, saes=crafted["saes"][:1], format="neuronpedia"), progress=False)
    recs = latent_records(built[0], 0)
    folder = out / "neuronpedia" / "0-sae_a"
    feats = [json.loads(line) for line in (folder / "features" / "batch-0.jsonl").read_text().splitlines()]
    acts = [json.loads(line) for line in (folder / "activations" / "batch-0.jsonl").read_text().splitlines()]
    assert [x["index"] for x in feats] == [str(f) for f in range(F)]
    for x, r in zip(feats, recs):
        assert x["frac_nonzero"] == r["density"] and x["maxActApprox"] == r["max"]
        assert x["freq_hist_data_bar_heights"] == r["hist"]["counts"]
        assert len(x["pos_str"]) == len(x["pos_values"]) == 10 and x["pos_values"] == [v for _, v in r["pos"]]
        assert sum(x["logits_hist_data_bar_heights"]) == 512
    first = [a for a in acts if a["index"] == "0"][0]
    top = recs[0]["top"][0]
    assert first["values"] == top["a"] and first["maxValue"] == max(top["a"])
    assert first["tokens"][first["maxValueTokenIndex"]] == first["tokens"][top["c"]]
    assert {"binMin", "binMax", "binContains", "minValue"} <= set(first)


# ---- bad input: one line, exit 2, nothing on disk changed -----------------------------------------
def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def bad(crafted):
    import shutil

    root = crafted["root"] / "bad"
    root.mkdir()
    other = make_sae(SAEConfig("relu", D, F))
    save_sae(other, root / "site", extra_cfg={"hook_name": "blocks.0.resid_pre"})
    save_sae(make_sae(SAEConfig("relu", 32, F)), root / "width", extra_cfg={"hook_name": SITE})
    shutil.copytree(crafted["store"], root / "notokens.zarr")
    shutil.rmtree(root / "notokens.zarr" / "tokens")
    (root / "theirs").mkdir()
    (root / "theirs" / "notes.txt").write_text("a researcher's notes")
    return root


@pytest.mark.parametrize("case,expect", [
    ("site", "blocks.0.resid_pre"), ("width", "d_in 32"), ("notokens", "array tokens: missing"),
    ("theirs", "did not write"), ("latent", "out of range"), ("top", "--top"),
])
def test_cli_bad_input(crafted, bad, tmp_path, case, expect):
    from click.testing import CliRunner

    from sae_harvest.evaluate.cli import main

    out = bad / "theirs" if case == "theirs" else tmp_path / "out"
    args = ["features", "--store", crafted["store"], "--sae", crafted["saes"][0], "--out", str(out),
            "--device", "cpu", "--quiet"]
    if case in ("site", "width"):
        args[args.index("--sae") + 1] = str(bad / case)
    if case == "notokens":
        args[args.index("--store") + 1] = str(bad / "notokens.zarr")
    if case == "latent":
        args += ["--latent", str(F)]
    if case == "top":
        args += ["--top", "0"]
    before = {r: _snapshot(r) for r in (bad, crafted["root"] / "s.zarr", tmp_path)}
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], result.output
    assert {r: _snapshot(r) for r in before} == before


def test_rerun_replaces_its_own_output_and_cli_prints_the_page(crafted, tmp_path):
    from click.testing import CliRunner

    from sae_harvest.evaluate.cli import main

    out = tmp_path / "b"
    args = ["features", "--store", crafted["store"], "--sae", crafted["saes"][0], "--out", str(out),
            "--device", "cpu", "--quiet", "--top", "3", "--before", "2", "--after", "1", "--latent", "5"]
    for _ in range(2):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == (out / "index.html").absolute().as_uri() + "#sae=0&latent=5"
    assert "never fire" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]    # no work or build folder left


def test_split_rows_merge_to_the_whole(crafted):
    """What the ranks do, in one process: tables of disjoint row ranges merge to the whole's."""
    from sae_harvest.evaluate.features_stats import LatentStats, merged_keys

    feats, _, _, used = brute(crafted)
    whole, halves = LatentStats(F, 5, "cpu"), [LatentStats(F, 5, "cpu") for _ in range(2)]
    whole.add(torch.from_numpy(feats[used]), torch.from_numpy(used))
    for h, part in zip(halves, np.array_split(np.arange(len(used)), 2)):
        for blk in np.array_split(part, 3):
            h.add(torch.from_numpy(feats[used[blk]]), torch.from_numpy(used[blk]))
    assert torch.equal(merged_keys([h.top.keys for h in halves], 5), whole.top.keys)
    assert torch.equal(halves[0].hist + halves[1].hist, whole.hist)
    assert torch.equal(torch.maximum(halves[0].max, halves[1].max), whole.max)


@pytest.mark.slow   # two torchrun processes: ~35 s on the shared 2-core box
def test_torchrun_two_ranks_merge_exactly(crafted, built, tmp_path):
    """Two gloo ranks split the rows (block_rows 40: both hold rows of every latent's top and
    bands) and write the same page data, byte for byte, as one process."""
    from tests.test_distributed import torchrun

    out = tmp_path / "ddp"
    r = torchrun("-m", "sae_harvest.evaluate", "features", "--store", crafted["store"], "--sae", crafted["saes"][0],
                 "--sae", crafted["saes"][1], "--out", str(out), "--device", "cpu", "--quiet", "--top", "5",
                 "--bands", "3", "--band-examples", "2", "--before", "4", "--after", "2", "--block-rows", "40")
    assert r.returncode == 0, r.stderr[-3000:]
    one = {p.relative_to(built[0]): p.read_bytes() for p in (built[0] / "data").rglob("*.js")}
    two = {p.relative_to(out): p.read_bytes() for p in (out / "data").rglob("*.js")}
    assert one == two
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]


def test_progress_bar_fits_80_columns_for_a_billion_rows():
    import io

    from rich.console import Console

    from sae_harvest.evaluate.features import progress_bar

    buf = io.StringIO()
    bar = progress_bar(Console(file=buf, width=80, force_terminal=True, color_system=None))
    with bar:
        task = bar.add_task("contexts", total=10**9, info="")
        bar.advance(task, 123_456_789)
        bar.refresh()
    lines = [ln.replace("\x1b[2K", "").replace("\x1b[?25l", "").replace("\x1b[?25h", "")
             for ln in buf.getvalue().replace("\r", "\n").split("\n")]
    shown = [ln for ln in lines if "contexts" in ln]
    assert shown and all(len(ln) <= 80 for ln in lines)
    assert "rows/s" in shown[-1] and "eta" in shown[-1] and "12%" in shown[-1]


def test_wide_saes_encode_in_slices_with_the_same_result(crafted, built, tmp_path, monkeypatch):
    """A block is encoded in slices of at most ENCODED_ELEMENTS values (memory bounded for 65k
    latents); slices of 7 rows give the same page data byte for byte."""
    from sae_harvest.evaluate import features_stats

    monkeypatch.setattr(features_stats, "ENCODED_ELEMENTS", 7 * F)
    out = tmp_path / "sliced"
    run_features(cfg_for(crafted, out), progress=False)
    one = {p.relative_to(built[0]): p.read_bytes() for p in (built[0] / "data").rglob("*.js")}
    two = {p.relative_to(out): p.read_bytes() for p in (out / "data").rglob("*.js")}
    assert one == two


def test_gemma_logit_effects_use_one_plus_the_norm_weight(crafted, tmp_path):
    """Gemma's final RMSNorm multiplies by (1 + w) (no centring): checked by hand on a tiny Gemma 2."""
    from transformers import AutoModelForCausalLM

    gemma = make_tiny_model("gemma2", crafted["root"] / "gemma2")
    out = tmp_path / "g"
    run_features(cfg_for(crafted, out, saes=crafted["saes"][:1], model=gemma), progress=False)
    model = AutoModelForCausalLM.from_pretrained(gemma)
    w = model.model.norm.weight.detach()
    dec = crafted["modules"][0].W_dec.detach()
    eff = (dec * (1 + w)) @ model.get_output_embeddings().weight.detach().T
    recs = latent_records(out, 0)
    for f in (0, 3, EVERY):
        assert [t for t, _ in recs[f]["pos"]] == eff[f].topk(10).indices.tolist()
        assert [v for _, v in recs[f]["neg"]] == pytest.approx(eff[f].topk(10, largest=False).values.tolist(), rel=1e-3)


def test_demo_final_step_writes_the_browser_and_returns_its_address(crafted, tmp_path):
    from sae_harvest.evaluate.demo import demo_browser

    url = demo_browser(tmp_path, crafted["store"], crafted["saes"])
    assert url == (tmp_path / "features" / "index.html").absolute().as_uri()
    assert [s["name"] for s in read_data(tmp_path / "features", "saes")["saes"]] == ["sae_b"]   # one per sweep


def test_rerun_refuses_an_output_folder_a_user_added_files_to(crafted, tmp_path):
    """An earlier browser plus a researcher's notes: the folder is no longer only ours, so a rerun
    refuses it (one line, exit 2, every byte kept) instead of replacing the notes with it."""
    from click.testing import CliRunner

    from sae_harvest.evaluate.cli import main

    out = tmp_path / "b"
    args = ["features", "--store", crafted["store"], "--sae", crafted["saes"][0], "--out", str(out),
            "--device", "cpu", "--quiet", "--top", "3", "--before", "2", "--after", "1"]
    assert CliRunner().invoke(main, args).exit_code == 0
    (out / "notes.md").write_text("latent 3 looks like a tokenizer artefact")
    before = {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert "did not write" in result.output
    assert {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
