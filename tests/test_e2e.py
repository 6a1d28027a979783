"""`train fit --loss e2e | e2e+ds` on a tiny GPT-2: the loss terms against independent HF
computations, KL going down, exact reconstruction, resume, --init, bad input."""
import json
import shutil
import signal

import numpy as np
import pytest
import torch

from sae_harvest.stores.errors import UserError
from click.testing import CliRunner

from sae_harvest import train
from sae_harvest.train import e2e as e2e
from sae_harvest.harvest.sites import Site
from sae_harvest.stores import open_store
from sae_harvest.train.cli import main as train_cli
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.errors import TrainError
from sae_harvest.train.driver import TrainInterrupted
from sae_harvest.train.fit import fit
from sae_harvest.train.registry import SAEConfig, make_sae

CTX, SEQS = 32, 8   # 8 sequences of 32 tokens per step


@pytest.fixture(scope="module")
def assets(e2e_assets):   # tests/conftest.py
    return e2e_assets


def _cfg(assets, out, **kw):
    base = dict(store=assets["store"], out=str(out), loss="e2e", arch="relu", l1=(0.1,), d_sae=128,
                batch_size=SEQS * CTX, tokens=SEQS * CTX * 40, lr=1e-3, device="cpu",
                log_every=5, checkpoint_every=1000)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _batch(assets, n=4):
    return torch.from_numpy(open_store(assets["store"]).tokens[:n].astype(np.int64))


def _sae(seed=0, d_sae=128):
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(arch="relu", d_in=64, d_sae=d_sae, l1_coeff=0.3))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.5)
    return sae


def _hf_spliced(model, sae, layer, ids, scale=1.0, keep_pos0=False):
    """Independent reference: a plain forward pre-hook on block `layer` and output_hidden_states."""
    def pre_hook(_mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x_hat = sae.decode(sae.encode(x.reshape(-1, 64) / scale)).view(x.shape) * scale
        if keep_pos0:
            x_hat = x_hat.clone()
            x_hat[:, 0] = x[:, 0]
        return ((x_hat, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x_hat})
    handle = model.transformer.h[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        return model(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()


def _kl_by_hand(clean_logits, logits, start):
    p = torch.softmax(clean_logits.double(), -1)
    kl = (p * (torch.log_softmax(clean_logits.double(), -1) - torch.log_softmax(logits.double(), -1))).sum(-1)
    return kl[:, start:].mean()


@pytest.mark.parametrize("include_bos", [False, True])
def test_loss_terms_match_independent_computation(assets, include_bos):
    model, ids, sae = assets["model"], _batch(assets), _sae()
    site = Site.parse("blocks.0.resid_pre")
    downstream = e2e.downstream_sites(site, 3)
    assert downstream == ["blocks.0.resid_post", "blocks.1.resid_post"]   # = hidden_states[1], [2]
    clean = e2e.clean_pass(model, ids, downstream)
    t = e2e.e2e_loss(model, sae, site, ids, clean=clean, scale=1.7, kl_coeff=0.5, downstream_coeff=2.5,
                     downstream=downstream, include_bos=include_bos)
    with torch.no_grad():
        ref_clean = model(input_ids=ids, output_hidden_states=True)
        ref = _hf_spliced(model, sae, 0, ids, scale=1.7, keep_pos0=not include_bos)
        start = 0 if include_bos else 1
        kl = _kl_by_hand(ref_clean.logits, ref.logits, start)
        ds = [(ref.hidden_states[k] - ref_clean.hidden_states[k]).double().pow(2).mean(-1)[:, start:].mean()
              for k in (1, 2)]
        feats = sae.encode(ref_clean.hidden_states[0].reshape(-1, 64) / 1.7).view(*ids.shape, -1)[:, start:]
        l1 = feats.abs().sum(-1).mean().double()
    assert kl > 1e-3 and min(ds) > 1e-3          # a random SAE changes things: the test has teeth
    torch.testing.assert_close(t["kl"].double(), kl, rtol=1e-4, atol=1e-7)
    for k, name in enumerate(downstream):
        torch.testing.assert_close(t[f"ds:{name}"].double(), ds[k], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(t["downstream_mse"].double(), (ds[0] + ds[1]) / 2, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(t["l1"].double(), l1, rtol=1e-4, atol=1e-6)
    expected = 0.5 * kl + 2.5 * (ds[0] + ds[1]) / 2 + 0.3 / 64 * l1
    torch.testing.assert_close(t["loss"].detach().double(), expected, rtol=1e-4, atol=1e-7)
    # CE: next-token loss on the same positions
    ce = torch.nn.functional.cross_entropy(ref.logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    torch.testing.assert_close(t["ce"], ce[:, start:].mean(), rtol=1e-5, atol=1e-6)
    # the gradient reaches the SAE and only the SAE
    t["loss"].backward()
    assert sae.W_enc.grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())


def test_exact_reconstruction_gives_zero_kl_and_downstream(assets):
    model, ids = assets["model"], _batch(assets)
    sae = make_sae(SAEConfig(arch="relu", d_in=64, d_sae=128, l1_coeff=1.0))
    eye = torch.eye(64)
    with torch.no_grad():   # relu: no b_dec subtraction at the input; f = [relu(x), relu(-x)]
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    for name in ("blocks.0.resid_pre", "blocks.1.mlp_out", "blocks.0.resid_post"):
        site = Site.parse(name)
        downstream = e2e.downstream_sites(site, 3)
        clean = e2e.clean_pass(model, ids, downstream)
        t = e2e.e2e_loss(model, sae, site, ids, clean=clean, downstream=downstream, downstream_coeff=1.0)
        assert abs(float(t["kl"])) < 1e-7 and float(t["downstream_mse"]) < 1e-10, name
        assert float(t["ce"]) == pytest.approx(float(t["ce_clean"]), abs=1e-6)


def test_position0_is_neither_spliced_nor_in_the_batch_topk(assets):
    """Like local training: position 0 keeps its clean activation and BatchTopK's batch top-k runs
    over positions >= 1 only; with include_bos both change (so the test can fail)."""
    model, ids = assets["model"], _batch(assets)
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="batchtopk", d_in=64, d_sae=128, k=4)).train()
    seen, final = [], []
    encode = sae.encode_train   # what a training forward asks for (batchtopk: the batch top-k)
    sae.encode_train = lambda x, grad=None, reducer=None: (seen.append(len(x)), encode(x))[1]
    handle = model.transformer.ln_f.register_forward_hook(lambda m, i, o: final.append(o.detach()))
    site = Site.parse("blocks.1.resid_pre")
    try:
        with torch.no_grad():
            model(input_ids=ids)
            clean_final = final.pop()
            clean = e2e.clean_pass(model, ids, [])
            final.clear()
            for include_bos, rows in ((False, ids.numel() - len(ids)), (True, ids.numel())):
                seen.clear()
                t = e2e.e2e_loss(model, sae, site, ids, clean=clean, include_bos=include_bos)
                assert seen == [rows]                           # encoded rows: pos 0 only with include_bos
                assert float(t["l0"]) == pytest.approx(4.0)     # batch top-k over exactly those rows
                same = torch.allclose(final.pop()[:, 0], clean_final[:, 0])
                assert same == (not include_bos)                # pos 0 attends only to itself
    finally:
        handle.remove()


def test_e2e_training_lowers_kl_and_saves_raw_input_sae(assets, tmp_path):
    trained = []
    out = tmp_path / "run"
    summaries = fit(_cfg(assets, out), progress=False, on_step=lambda event: trained.append(event.inputs))
    (name, summary), = summaries.items()
    assert name == "relu_l1-0.1"
    records = _metrics(out / name / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(5, 45, 5))
    assert {"kl", "loss", "l1", "l0", "lr", "sparsity", "ce_increase", "downstream_mse",
            "ds:blocks.1.resid_post"} <= set(records[-1])
    # 0.5 held for the bare-seed initialisation; from the seed+identity stream (issue 22) the KL falls
    # 0.112 -> 0.063 in these 40 steps: still a clear fall, the point of the check
    assert records[-1]["kl"] < 0.6 * records[0]["kl"], [r["kl"] for r in records]
    cfg = json.loads((out / name / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.1.hook_resid_pre" and cfg["model_name"] == assets["model_path"]
    assert cfg["sae_harvest"]["hook_name"] == "blocks.1.resid_pre"
    assert cfg["sae_harvest"]["e2e"] == {"loss": "e2e", "kl_coeff": 1.0, "downstream_coeff": 0.0,
                                         "downstream_sites": ["blocks.1.resid_post"]}
    held = summary["held_out"]
    assert {"kl", "ce_increase", "l0", "ce_clean", "dead_fraction"} <= set(held)
    # held out: the store's held-out sequences (every 20th, recorded by the harvest), never trained on
    store = open_store(assets["store"])
    held_seqs = store.split.held_out_seqs(store.n_seqs)
    assert store.split.origin == "harvest" and held["held_out_sequences"] == len(held_seqs) == 7
    assert held["origin"]["held_out_seqs"] == 7 and held["origin"]["tokens"] == 7 * CTX
    held_rows = {tuple(r) for r in store.tokens[:][held_seqs].tolist()}
    assert not any(tuple(r) in held_rows for r in torch.cat(trained).tolist())
    assert len(trained) == 40 and all(len(ids) == SEQS for ids in trained)
    # the saved SAE takes raw activations: spliced with scale 1 on the held-out sequences it
    # reproduces the reported held-out KL
    sae = train.load_sae(out / name)
    ids = torch.from_numpy(store.tokens[:][held_seqs].astype(np.int64))
    site = Site.parse("blocks.1.resid_pre")
    t = e2e.e2e_loss(assets["model"], sae, site, ids, clean=e2e.clean_pass(assets["model"], ids, []))
    assert float(t["kl"]) == pytest.approx(held["kl"], rel=1e-4)
    assert summary["input_scale"] != 1.0


def test_e2e_ds_sweep_shares_batches(assets, tmp_path):
    out = tmp_path / "ds"
    summaries = fit(_cfg(assets, out, loss="e2e+ds", site="blocks.0.resid_pre", l1=(0.1, 1.0),
                         tokens=SEQS * CTX * 10), progress=False)
    assert list(summaries) == ["relu_l1-0.1", "relu_l1-1"]
    for name in summaries:
        r = _metrics(out / name / "metrics.jsonl")[-1]
        ds = [r["ds:blocks.0.resid_post"], r["ds:blocks.1.resid_post"]]
        assert r["downstream_mse"] == pytest.approx(sum(ds) / 2, rel=1e-5)
        assert r["loss"] == pytest.approx(0.5 * r["kl"] + 2.5 * r["downstream_mse"] + r["sparsity"], rel=1e-4)
        cfg = json.loads((out / name / "cfg.json").read_text())["sae_harvest"]["e2e"]
        assert (cfg["kl_coeff"], cfg["downstream_coeff"]) == (0.5, 2.5)
    # both SAEs saw the same clean batches: same clean CE logged at every step
    a, b = (_metrics(out / n / "metrics.jsonl") for n in summaries)
    assert [r["ce_clean"] for r in a] == [r["ce_clean"] for r in b]


def test_resume_continues_exactly(assets, tmp_path):
    kw = dict(arch="batchtopk", k=(8,), tokens=SEQS * CTX * 12, log_every=4)
    full = tmp_path / "full"
    fit(_cfg(assets, full, **kw), progress=False)
    part = tmp_path / "part"

    def interrupt_at_7(event):
        if event.step == 6:
            signal.raise_signal(signal.SIGINT)   # Ctrl-C: the loop finishes the step, saves, stops

    with pytest.raises(TrainInterrupted, match="--resume"):
        fit(_cfg(assets, part, **kw), progress=False, on_step=interrupt_at_7)
    with pytest.raises(TrainError, match="already exists"):
        fit(_cfg(assets, part, **kw), progress=False)
    with pytest.raises(TrainError, match="options differ.*lr"):
        fit(_cfg(assets, part, **{**kw, "lr": 2e-3}), resume=True, progress=False)
    fit(_cfg(assets, part, **kw), resume=True, progress=False)
    a = train.load_sae(full / "batchtopk_k8").state_dict()
    b = train.load_sae(part / "batchtopk_k8").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    steps = [r["step"] for r in _metrics(part / "batchtopk_k8" / "metrics.jsonl")]
    assert steps == [4, 8, 12]


def test_init_from_local_sae(assets, tmp_path):
    local = tmp_path / "local"
    fit(TrainConfig(store=assets["store"], out=str(local), arch="relu", l1=(0.1,), d_sae=128, batch_size=256,
                    tokens=256 * 5, device="cpu"), progress=False)
    init = train.load_sae(local / "relu_l1-0.1")
    seen = {}

    def spy(event):
        if not seen:
            (run,) = event.runs.values()
            seen["sae"] = make_sae(run.cfg)
            seen["sae"].load_state_dict(run.sae.state_dict())
            seen["scale"] = event.scale

    fit(_cfg(assets, tmp_path / "e2e", init=str(local / "relu_l1-0.1"), tokens=SEQS * CTX * 2), progress=False,
        on_step=spy)
    x = torch.randn(50, 64) * 5
    with torch.no_grad():   # the e2e run starts from the very same function of raw activations
        ours = seen["sae"](x / seen["scale"]) * seen["scale"]
        torch.testing.assert_close(ours, init(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TrainError, match="64->128"):
        fit(_cfg(assets, tmp_path / "bad", init=str(local / "relu_l1-0.1"), d_sae=64), progress=False)


def test_bad_input(assets, tmp_path):
    with pytest.raises(TrainError, match="cannot load the model.*not found"):
        fit(_cfg(assets, tmp_path / "a", model=str(tmp_path / "no-such-model")), progress=False)
    with pytest.raises(TrainError, match="blocks.7.resid_pre is not in model.*3 layers"):
        fit(_cfg(assets, tmp_path / "b", site="blocks.7.resid_pre"), progress=False)
    with pytest.raises(TrainError, match="not --arch gated"):
        fit(_cfg(assets, tmp_path / "c", arch="gated"), progress=False)
    no_tokens = tmp_path / "nt.zarr"
    shutil.copytree(assets["store"], no_tokens)
    shutil.rmtree(no_tokens / "tokens")
    # the reader refuses a store whose records list an array that is gone (stores/check.py)
    with pytest.raises(UserError, match="damaged: array tokens: missing"):
        fit(_cfg(assets, tmp_path / "d", store=str(no_tokens)), progress=False)
    r = CliRunner().invoke(train_cli, ["fit", "--store", assets["store"], "--loss", "e2e", "--site",
                                       "blocks.1.resid_pre", "--model", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "e")])
    assert r.exit_code != 0 and r.output.startswith("error:") and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_jumprelu_e2e_loss_adds_its_l0_penalty(assets):
    """The e2e loss of a JumpReLU SAE is KL + lambda * mean L0 (positions >= 1), and its threshold
    learns from both terms through the straight-through estimators."""
    model, ids = assets["model"], _batch(assets)
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="jumprelu", d_in=64, d_sae=128, l1_coeff=0.02, bandwidth=0.5, threshold_init=0.5))
    site = Site.parse("blocks.0.resid_pre")
    with torch.no_grad():
        ref_clean = model(input_ids=ids, output_hidden_states=True)
        scale = float(ref_clean.hidden_states[0][:, 1:].norm(dim=-1).mean()) / 8   # E||x / scale|| = sqrt(64)
        ref = _hf_spliced(model, sae, 0, ids, scale=scale, keep_pos0=True)
        x = ref_clean.hidden_states[0].reshape(-1, 64) / scale
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        l0 = (pre > sae.threshold).view(*ids.shape, -1)[:, 1:].sum(-1).double().mean()
    kl = _kl_by_hand(ref_clean.logits, ref.logits, 1)
    t = e2e.e2e_loss(model, sae, site, ids, clean=e2e.clean_pass(model, ids, []), scale=scale)
    assert 0 < l0 < 128
    torch.testing.assert_close(t["l0"].double(), l0)
    torch.testing.assert_close(t["sparsity"].double(), 0.02 * l0, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(t["loss"].detach().double(), kl + 0.02 * l0, rtol=1e-4, atol=1e-7)
    t["loss"].backward()
    assert sae.log_threshold.grad.abs().sum() > 0 and sae.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("arch,kw", [("jumprelu", dict(l1=(0.3,), threshold_init=0.1)),
                                     ("matryoshka_batchtopk", dict(k=(8,), prefixes=(16, 64)))])
def test_new_architectures_train_locally_then_e2e(assets, tmp_path, arch, kw):
    """Local training, then e2e fine-tuning from it (--init); both save SAELens jumprelu checkpoints."""
    local = tmp_path / "local"
    (name, summary), = fit(TrainConfig(store=assets["store"], out=str(local), arch=arch, d_sae=128, batch_size=256,
                                       tokens=256 * 30, lr=3e-3, device="cpu", **kw),
                           progress=False).items()
    held = summary["held_out"]
    assert held["nmse"] < 0.5 and 0 < held["l0"] < 64, held
    e2e_kw = {**kw, "l1": (0.01,)} if arch == "jumprelu" else kw
    out = tmp_path / "e2e"
    (name2, summary2), = fit(_cfg(assets, out, arch=arch, init=str(local / name), tokens=SEQS * CTX * 20,
                                  **e2e_kw), progress=False).items()
    assert name2 == name or arch == "jumprelu"   # its lambda is on KL's scale in e2e
    name = name2
    records = _metrics(out / name / "metrics.jsonl")
    assert records[-1]["kl"] < records[0]["kl"], [r["kl"] for r in records]
    assert ("sparsity" in records[-1]) is (arch == "jumprelu")
    cfg = json.loads((out / name / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["sae_harvest"]["sae"]["arch"] == arch
    sae = train.load_sae(out / name)   # takes raw activations: reproduces the held-out KL
    store = open_store(assets["store"])
    ids = torch.from_numpy(store.tokens[:][store.split.held_out_seqs(store.n_seqs)].astype(np.int64))
    t = e2e.e2e_loss(assets["model"], sae, Site.parse("blocks.1.resid_pre"), ids,
                     clean=e2e.clean_pass(assets["model"], ids, []))
    assert float(t["kl"]) == pytest.approx(summary2["held_out"]["kl"], rel=1e-4)
