"""Training state on disk without pickle: safetensors for tensors, JSON for the rest.

`out/checkpoint/` holds state.json plus one <sae>.safetensors per swept SAE with its
weights, Adam moments and dead-latent counters. It is written to a temporary folder
and swapped in with renames, so a kill mid-save leaves the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_harvest.stores.urls import scrub_tree

CHECKPOINT_DIR = "checkpoint"


def save_state(out: str | Path, *, meta: dict, runs: dict) -> None:
    """runs: {name: train.runs.Run}."""
    out = Path(out)
    final = out / CHECKPOINT_DIR
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    old = out / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, run in runs.items():
        tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in run.sae.state_dict().items()}
        params = dict(run.sae.named_parameters())
        opt_state = run.opt.state
        for pname, p in params.items():
            for key, value in opt_state.get(p, {}).items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"opt.{pname}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
        tensors["since_fired"] = run.since_fired.detach().cpu()
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    (tmp / "state.json").write_text(json.dumps(scrub_tree(meta), indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def has_state(out: str | Path) -> bool:
    out = Path(out)
    if not (out / CHECKPOINT_DIR / "state.json").exists() and (out / f".{CHECKPOINT_DIR}.old").exists():
        (out / f".{CHECKPOINT_DIR}.old").rename(out / CHECKPOINT_DIR)   # killed between the two renames
    return (out / CHECKPOINT_DIR / "state.json").exists()


def load_meta(out: str | Path) -> dict:
    from sae_harvest.train.sae_io import CheckpointError

    path = Path(out) / CHECKPOINT_DIR / "state.json"
    try:
        meta = json.loads(path.read_text())
        if not (isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("config"), dict)
                and isinstance(meta.get("scale"), (int, float)) and "feed" in meta):
            raise ValueError("needs step, scale, feed and config")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); nothing was changed") from None
    return meta


def load_run(out: str | Path, name: str, run, device) -> None:
    """Restore weights, optimizer moments and counters into an already built run."""
    from sae_harvest.train.sae_io import CheckpointError

    path = Path(out) / CHECKPOINT_DIR / f"{name}.safetensors"
    try:
        tensors = load_file(str(path))
    except Exception as e:   # missing, truncated or corrupt: safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    sae = run.sae
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    opt = run.opt
    for pname, p in sae.named_parameters():
        state = {key.rsplit(".", 1)[1]: v.to(device) for key, v in tensors.items()
                 if key.startswith(f"opt.{pname}.") and key.count(".") == pname.count(".") + 2}
        if state:
            if "step" in state:
                state["step"] = state["step"].float().cpu() if state["step"].dim() == 0 else state["step"]
            opt.state[p] = state
    run.since_fired.copy_(tensors["since_fired"].to(run.since_fired.device))
