"""`train fit --loss e2e | e2e+ds --site blocks.L.mlp_in --target blocks.L.mlp_out`: transcoders
trained through the live, frozen model. train/e2e.py runs the steps (e2e_loss with `read`: the
transcoder's prediction from the input site's live value replaces the target's activation, and the
KL to the clean logits is minimised); this module checks the pair and builds and saves the
transcoders, initialised and saved as local ones are (train/multisite.py, train/transcoder.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sae_harvest.harvest.sites import Site
from sae_harvest.stores.artifacts import write_artifact
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.errors import TrainError
from sae_harvest.train.registry import make_sae
from sae_harvest.train.sae_io import save_sae
from sae_harvest.train.transcoder import TRANSCODER_ARCHS


def is_e2e_transcoder(cfg: TrainConfig) -> bool:
    """One transcoder (or sweep of them) trained e2e: --target with a single --site; several pairs,
    crosscoders and CLTs stay local-only (train/multisite.py refuses them with one line)."""
    names = f"{cfg.site or ''}{cfg.target or ''}"
    return (cfg.loss != "local" and bool(cfg.target) and not (cfg.crosscoder or cfg.clt)
            and not any(ch in names for ch in ",*?["))


def check_target(cfg: TrainConfig, site: Site, adapter) -> Site:
    """The target site of an e2e transcoder reading `site`; TrainError (one line) if it cannot be one."""
    if cfg.arch not in TRANSCODER_ARCHS:
        raise TrainError(f"--target: --arch {cfg.arch} cannot be a transcoder; transcoders take "
                         f"{', '.join(TRANSCODER_ARCHS)}")
    target = Site.parse(cfg.target)
    if target == site:
        raise TrainError(f"--target {target.name} is its own --site: that is an SAE, drop --target")
    if not 0 <= target.layer < adapter.n_layers:
        raise TrainError(f"--target {target.name} is not in the model: it has {adapter.n_layers} layers "
                         f"(0-{adapter.n_layers - 1})")
    if not site < target:
        raise TrainError(f"--site {site.name} comes after --target {target.name} in the forward pass: a "
                         f"transcoder reads its input before it writes its target")
    return target


@dataclass(frozen=True)
class _Rows:
    """A site's sample as train.multisite._transcoder_runs reads a source."""
    sample: torch.Tensor

    @property
    def d_in(self) -> int:
        return self.sample.shape[1]


def transcoder_runs(cfg: TrainConfig, site: Site, target: Site, x: torch.Tensor, y: torch.Tensor,
                    scales: tuple[float, float], device, world) -> tuple[dict, list[str]]:
    """({name: Run} this rank trains, every name of the sweep in order): built exactly as a local
    transcoder sweep (seed streams, --init, b_dec at the target's geometric median), named as one."""
    from sae_harvest.train.multisite import Pair, _transcoder_runs, claim_runs

    pair = Pair(site.name, target.name)
    built = _transcoder_runs(cfg, pair, {site.name: _Rows(x), target.name: _Rows(y)},
                             {site.name: scales[0], target.name: scales[1]}, device)
    runs, order = {}, []
    claim_runs(built, pair, cfg, world, runs, order)
    return runs, order


def save_transcoder(run, folder: Path, extra: dict, target: Site, scales: tuple[float, float], summary: dict) -> None:
    """Save as a local transcoder is (both scales folded in: it takes raw x, returns raw y), plus summary.json."""
    from sae_harvest.train.saelens_format import tl_hook_name

    saved = make_sae(run.cfg)
    saved.load_state_dict(run.sae.state_dict())
    saved.fold_scales(*scales)
    save_sae(saved, folder, extra_cfg={**extra, "init": run.init, "target": target.name,
                                       "hook_name_out": tl_hook_name(target.name), "sweep_name": folder.name,
                                       "lr": run.lr, "summary": summary, "world_size": summary.get("world_size", 1),
                                       "sweep_parallel": summary.get("sweep_parallel", False),
                                       "rank": summary.get("rank")})
    write_artifact(folder / "summary.json", summary)
