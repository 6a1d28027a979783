"""One config per architecture (issue 17): a new architecture with a new hyperparameter, declared in
its own file and registered with one call, gets its `train fit` option, its sweep and its cfg.json
round trip with no other edit; old flat cfg.json files still load; calibrated values are state;
BatchTopK's training selection is asked for explicitly; reductions arrive as an argument."""
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from sae_harvest.train import distributed, registry
from sae_harvest.train.cli import main as train_cli
from sae_harvest.train.config import TrainConfig, sweep, sweep_size
from sae_harvest.train.registry import ARCH_NAMES, SAEConfig, make_sae
from sae_harvest.train.sae import SAE, LossOutput, recon_loss
from sae_harvest.train.sae_config import LEGACY_FIELDS, SAEConfigBase, hyper
from sae_harvest.train.sae_io import load_sae, save_sae
from tests.test_train_loop import make_store


# ---- the walkthrough of docs/extending.md, as a test: everything below would be train/gainrelu.py ----
@dataclass(frozen=True)
class GainReLUConfig(SAEConfigBase):
    l1_coeff: float = hyper(0.0, "lambda on the L1 of the latents.", sweep=True, option="l1", option_default=(),
                            train_default=1.0)
    gain: float = hyper(1.0, "Multiplies the pre-activations.", sweep=True)

    def check(self):
        if self.gain <= 0:
            raise ValueError(f"gainrelu needs gain > 0, got {self.gain}")


class GainReLUSAE(SAE):
    arch = "gainrelu"
    saelens_architecture = "standard"

    def encode(self, x, grad=None):
        return F.relu(self.cfg.gain * (self._center(x) @ self.W_enc + self.b_enc))

    def loss(self, x, grad=None, dead_mask=None, reducer=distributed.LOCAL) -> LossOutput:
        feats = self.encode(x)
        x_hat = self.decode(feats)
        mse, sparsity = recon_loss(x, x_hat), self.cfg.l1_coeff * feats.abs().sum(-1).mean()
        terms = {"mse": mse, "sparsity": sparsity, "l0": (feats > 0).float().sum(-1).mean()}
        return LossOutput(mse + sparsity, {n: t.detach() for n, t in terms.items()}, feats, x_hat)


@pytest.fixture
def gainrelu():
    registry.register(GainReLUSAE, GainReLUConfig)   # the one registry line
    yield
    registry.unregister("gainrelu")


def test_a_new_architecture_gets_its_option_sweep_and_cfg_json(gainrelu, tmp_path):
    fit_cmd = train_cli.commands["fit"]
    gain = next(p for p in fit_cmd.params if p.name == "gain")
    assert "--gain" in gain.opts and "gainrelu" in gain.help
    assert "gainrelu" in next(p for p in fit_cmd.params if p.name == "l1").help
    assert "gainrelu" in next(p for p in fit_cmd.params if p.name == "arch").help

    cfg = TrainConfig(out="o", arch="gainrelu", gain=(0.5, 2.0))
    runs = sweep(cfg, 8)
    assert sweep_size(cfg) == 2
    assert [n for n, _ in runs] == ["gainrelu_l1-1_gain-0.5", "gainrelu_l1-1_gain-2"]
    assert [(type(c), c.gain, c.l1_coeff, c.d_sae) for _, c in runs] == [(GainReLUConfig, 0.5, 1.0, 128),
                                                                          (GainReLUConfig, 2.0, 1.0, 128)]
    with pytest.raises(ValueError, match="gain > 0"):
        sweep(TrainConfig(out="o", arch="gainrelu", gain=(-1.0,)), 8)

    store = tmp_path / "s.zarr"
    make_store(store, n_seqs=16, ctx=32, window_seqs=8, grads=False)
    r = CliRunner().invoke(train_cli, ["fit", "--store", str(store), "--site", "blocks.0.resid_pre", "--arch",
                                       "gainrelu", "--gain", "0.5,2", "--d-sae", "32", "--batch-size", "128",
                                       "--tokens", "512", "--device", "cpu", "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 0, r.output
    for g in (0.5, 2.0):
        folder = tmp_path / "o" / f"gainrelu_l1-1_gain-{g:g}"
        saved = json.loads((folder / "cfg.json").read_text())
        assert saved["sae_harvest"]["sae"]["gain"] == g and saved["sae_harvest"]["training"]["gain"] == [0.5, 2.0]
        assert list(saved["sae_harvest"]["sae"])[:len(LEGACY_FIELDS)] == list(LEGACY_FIELDS)   # the old shape first
        sae = load_sae(folder)
        assert isinstance(sae, GainReLUSAE) and sae.cfg == SAEConfig.from_dict(saved["sae_harvest"]["sae"])
        assert sae.cfg.gain == g
        tensors = load_file(str(folder / "sae_weights.safetensors"))
        assert all(torch.equal(tensors[n], t) for n, t in sae.state_dict().items())


def test_registration_is_undone_and_not_seen_by_other_architectures(gainrelu):
    with pytest.raises(ValueError, match="has no gain"):   # a file asking relu for a gain it would ignore
        SAEConfig.from_dict({"arch": "relu", "d_in": 4, "d_sae": 8, "gain": 2.0})
    assert not hasattr(SAEConfig.from_dict({"arch": "relu", "d_in": 4, "d_sae": 8, "gain": 1.0}), "gain")


def test_unregistered_toy_leaves_nothing_behind():
    assert "gainrelu" not in registry.ARCH_NAMES and not hasattr(TrainConfig(out="o"), "gain")
    assert "gain" not in [p.name for p in train_cli.commands["fit"].params]


# ---- configs: per architecture, the factory and the flat cfg.json of earlier versions ----
def _old_flat(arch, **values):
    """sae_harvest.sae as every version before per-architecture configs wrote it: all 18 keys."""
    return {**LEGACY_FIELDS, "arch": arch, "d_in": 8, "d_sae": 32, "k": 4 if arch not in ("relu", "gated", "jumprelu")
            else 0, **values}


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_old_flat_cfg_json_loads_and_keeps_its_shape(arch):
    cfg = SAEConfig.from_dict(_old_flat(arch))
    assert type(cfg) is registry.CONFIGS[arch] and isinstance(cfg, SAEConfig)
    assert cfg.to_dict() == _old_flat(arch)   # same keys, same order, same values
    assert list(cfg.to_dict()) == list(LEGACY_FIELDS)


def test_foreign_fields_at_their_defaults_are_dropped_others_raise():
    assert not hasattr(SAEConfig.from_dict(_old_flat("relu")), "k")
    # earlier versions' `train fit` passed --k, --beta, --bandwidth ... to every architecture, which
    # ignored them, and wrote them into cfg.json: such SAEs still load, with a warning (review fix)
    with pytest.warns(UserWarning, match="has no k=4"):
        assert not hasattr(SAEConfig.from_dict(_old_flat("relu", k=4)), "k")
    with pytest.warns(UserWarning, match="has no beta=0.5, bandwidth=0.1"):
        cfg = SAEConfig.from_dict(_old_flat("batchtopk", beta=0.5, bandwidth=0.1))
    assert type(cfg) is registry.CONFIGS["batchtopk"] and cfg.k == 4
    with pytest.raises(ValueError, match="unknown SAEConfig keys"):
        SAEConfig.from_dict(_old_flat("topk", bogus=1))
    # the factory takes every keyword the single config took, as it ignored the foreign ones
    assert SAEConfig("relu", 8, 32, k=3, beta=2.0, l1_coeff=1.0) == registry.CONFIGS["relu"]("relu", 8, 32, l1_coeff=1.0)


# ---- calibrated values are state, saved with the weights ----
def test_gtopk_calibrated_beta_is_a_buffer_not_config(tmp_path):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig("gtopk", 8, 32, k=2))
    x, g = torch.randn(64, 8), torch.randn(64, 8)
    cfg = sae.cfg
    sae.calibrate(x, g)
    assert sae.cfg is cfg and cfg.beta == 0.0 and float(sae.beta) > 0
    save_sae(sae, tmp_path / "new", extra_cfg={"hook_name": "blocks.0.resid_pre"})
    loaded = load_sae(tmp_path / "new")
    assert float(loaded.beta) == float(sae.beta) and loaded.cfg.beta == 0.0
    torch.testing.assert_close(loaded.encode(x, g), sae.encode(x, g), rtol=0, atol=0)
    # saved before beta was a buffer: no header entry, the calibrated value in cfg.json's beta
    old = tmp_path / "old"
    old.mkdir()
    save_file(load_file(str(tmp_path / "new" / "sae_weights.safetensors")), str(old / "sae_weights.safetensors"))
    doc = json.loads((tmp_path / "new" / "cfg.json").read_text())
    doc["sae_harvest"]["sae"]["beta"] = sae._beta
    (old / "cfg.json").write_text(json.dumps(doc))
    torch.testing.assert_close(load_sae(old).encode(x, g), sae.encode(x, g), rtol=0, atol=0)


def test_jumprelu_start_is_state_and_old_files_keep_theirs(tmp_path):
    sae = make_sae(SAEConfig("jumprelu", 4, 8, l1_coeff=0.25))
    sae.calibrate(torch.randn(8, 4), None)
    assert sae.cfg.threshold_init == 0.01 and float(sae.threshold_start) == pytest.approx(0.5)
    save_sae(sae, tmp_path / "j", extra_cfg={})
    assert float(load_sae(tmp_path / "j").threshold_start) == pytest.approx(0.5)


# ---- BatchTopK: training and inference selections are explicit ----
def test_batchtopk_encode_is_inference_whatever_the_mode():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig("batchtopk", 8, 32, k=2))
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    x = torch.randn(16, 8)
    pre = sae.pre_acts(x)
    for mode in (sae.train, sae.eval):
        mode()
        torch.testing.assert_close(sae.encode(x), pre * (pre > 0.3))
        feats = sae.encode_train(x)
        assert (feats > 0).sum() == 16 * 2   # the batch top-k: n*k kept over the batch


# ---- reductions reach an architecture as an argument ----
class _Spy(distributed.Reducer):
    def __init__(self):
        super().__init__()
        object.__setattr__(self, "calls", [])

    def batch_topk(self, pre, k):
        self.calls.append("batch_topk")
        return super().batch_topk(pre, k)

    def global_min(self, t):
        self.calls.append("global_min")
        return t

    def residual_variance(self, resid):
        self.calls.append("residual_variance")
        return super().residual_variance(resid)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_the_reducer_handed_to_loss_does_the_batch_reductions(arch):
    sae = make_sae(SAEConfig(arch, 8, 32, k=2)).train()
    spy = _Spy()
    sae.loss(torch.randn(16, 8), dead_mask=torch.ones(32, dtype=torch.bool), reducer=spy)
    assert {"batch_topk", "global_min", "residual_variance"} <= set(spy.calls)
    spy2 = _Spy()
    sae.encode_train(torch.randn(16, 8), reducer=spy2)
    assert spy2.calls == ["batch_topk"]


# ---- a run checkpointed by the previous version resumes ----
@pytest.mark.parametrize("arch, kw, option", [("jumprelu", {"l1": (0.3,), "bandwidth": (0.1,)}, "bandwidth"),
                                              ("gtopk", {"k": (4,)}, None)])
def test_a_checkpoint_of_the_flat_config_era_resumes_exactly(tmp_path, arch, kw, option):
    """Its state.json holds the option as one number (now a list) and its safetensors no
    calibrated buffer (gtopk beta, jumprelu threshold_start: they lived in the config then)."""
    import signal

    from safetensors.torch import load_file as load, save_file as save

    from sae_harvest.train.driver import TrainInterrupted
    from sae_harvest.train.fit import fit

    store = tmp_path / "s.zarr"
    make_store(store, n_seqs=16, ctx=32, window_seqs=8, grads=True)
    base = dict(store=str(store), site="blocks.0.resid_pre", arch=arch, d_sae=32, batch_size=128, device="cpu",
                log_every=5, checkpoint_every=1000, tokens=128 * 12, **kw)
    fit(TrainConfig(out=str(tmp_path / "full"), **base), progress=False)

    def interrupt(event):
        if event.step == 5:
            signal.raise_signal(signal.SIGINT)

    part = tmp_path / "part"
    with pytest.raises(TrainInterrupted):
        fit(TrainConfig(out=str(part), **base), progress=False, on_step=interrupt)
    ckpt = part / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    if option:
        state["config"][option] = state["config"][option][0]
    (ckpt / "state.json").write_text(json.dumps(state))
    for f in ckpt.glob("*.safetensors"):
        tensors = load(str(f))
        removed = [k for k in tensors if k in ("sae.beta", "sae.threshold_start")]
        assert removed
        save({k: v for k, v in tensors.items() if k not in removed}, str(f))
    fit(TrainConfig(out=str(part), **base), resume=True, progress=False)
    name = next(p.name for p in (tmp_path / "full").iterdir() if p.name != "checkpoint")
    a, b = load_sae(tmp_path / "full" / name).state_dict(), load_sae(part / name).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_config_builds_only_its_own_architecture():
    with pytest.raises(ValueError, match="cannot build"):
        make_sae(registry.CONFIGS["topk"]("relu", 4, 8, k=2))


@pytest.mark.parametrize("arch,flag,value", [
    ("topk", "--aux-k", "-3"), ("topk", "--aux-coeff", "-0.1"), ("topk", "--aux-coeff", "nan"),
    ("batchtopk", "--threshold-ema", "5"), ("jumprelu", "--tanh-scale", "nan"), ("jumprelu", "--bandwidth", "inf"),
])
def test_out_of_range_hyperparameters_are_one_line_exit_2_nothing_written(tmp_path, arch, flag, value):
    """The options the per-architecture configs opened (--aux-k, --aux-coeff, --threshold-ema,
    --tanh-scale) were unchecked: --aux-k -3 died at step 2 in torch, leaving a checkpoint; nan trained."""
    store = tmp_path / "s.zarr"
    make_store(store, n_seqs=16, ctx=32, window_seqs=8, grads=False)
    out = tmp_path / "o"
    r = CliRunner().invoke(train_cli, ["fit", "--store", str(store), "--site", "blocks.0.resid_pre", "--arch", arch,
                                       flag, value, "--d-sae", "32", "--batch-size", "128", "--tokens", "512",
                                       "--device", "cpu", "--out", str(out), "--quiet"])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert "Traceback" not in r.output and not out.exists()
