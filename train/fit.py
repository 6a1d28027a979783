"""`train fit`: check the output, pick the device, and hand over to the local or the e2e trainer."""
from __future__ import annotations

from sae_harvest.stores.cli import pick_device
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.errors import TrainError
from sae_harvest.train.e2e import fit_e2e
from sae_harvest.train.local import fit_local
from sae_harvest.train.runs import check_output


def fit(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        console=None, on_step=None) -> dict:
    """Train every SAE of the sweep; returns {name: summary}. Raises a UserError on bad input.
    on_step(StepEvent) is called before every optimizer step (see train.driver)."""
    check_output(cfg, resume, overwrite)
    device = pick_device(cfg.device)
    trainer = fit_local if cfg.loss == "local" else fit_e2e
    try:
        return trainer(cfg, resume=resume, overwrite=overwrite, progress=progress, console=console,
                       device=device, on_step=on_step)
    except OSError as e:   # a write that failed outside the step loop (disk full, file-size limit)
        reason = f"{e.strerror} (errno {e.errno})" if e.strerror else f"{type(e).__name__}: {e}"
        raise TrainError(f"cannot write under {cfg.out}: {reason}; checkpoints already saved there are "
                         f"kept (continue with --resume)") from None
