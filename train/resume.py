"""Training state on disk without pickle: safetensors for tensors, JSON for the rest.

`out/checkpoint/` holds state.json plus one <sae>.safetensors per swept SAE with its
weights, Adam moments and dead-latent counters. It is written to a temporary folder
and swapped in with renames, so a kill mid-save leaves the previous checkpoint.
Under `--sweep-parallel` each rank saves its own SAEs, at its own step, in
`out/checkpoint/rank<r>/` (same contents), so no two ranks ever write the same file.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_harvest.stores.artifacts import artifact_json

CHECKPOINT_DIR = "checkpoint"


def rank_dir(rank: int) -> str:
    """Where a sweep-parallel rank keeps its checkpoint, relative to --out."""
    return f"{CHECKPOINT_DIR}/rank{rank}"


def saved_layout(out: str | Path) -> list[str]:
    """The checkpoints under out: ["checkpoint"] (one process or data parallel), the sweep-parallel
    ranks' ["checkpoint/rank0", ...] (those saved so far), or [] (none)."""
    folder = Path(out) / CHECKPOINT_DIR
    found = [CHECKPOINT_DIR] if (folder / "state.json").exists() else []
    if folder.is_dir():
        found += sorted((f"{CHECKPOINT_DIR}/{p.name}" for p in folder.iterdir()
                         if p.name.startswith("rank") and p.name[4:].isdigit() and (p / "state.json").exists()),
                        key=lambda name: int(name.rsplit("rank", 1)[1]))
    return found


def save_state(out: str | Path, *, meta: dict, runs: dict, where: str = CHECKPOINT_DIR) -> None:
    """runs: {name: train.runs.Run}; where: the checkpoint's folder relative to out."""
    out = Path(out)
    final = out / where
    tmp = final.with_name(f".{final.name}.tmp")
    old = final.with_name(f".{final.name}.old")
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
    (tmp / "state.json").write_text(artifact_json(meta, allow_nan=True))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def has_state(out: str | Path, where: str = CHECKPOINT_DIR) -> bool:
    """Whether a checkpoint is saved there; repairs one killed between the two renames (call it
    from the checkpoint's one writer)."""
    final = Path(out) / where
    old = final.with_name(f".{final.name}.old")
    if not (final / "state.json").exists() and old.exists():
        old.rename(final)
    return (final / "state.json").exists()


def load_meta(out: str | Path, where: str = CHECKPOINT_DIR) -> dict:
    from sae_harvest.train.sae_io import CheckpointError

    path = Path(out) / where / "state.json"
    try:
        meta = json.loads(path.read_text())
        if not (isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("config"), dict)
                and isinstance(meta.get("scale"), (int, float)) and "feed" in meta):
            raise ValueError("needs step, scale, feed and config")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); nothing was changed") from None
    return meta


def load_run(out: str | Path, name: str, run, device, where: str = CHECKPOINT_DIR) -> None:
    """Restore weights, optimizer moments and counters into an already built run."""
    from sae_harvest.train.sae_io import CheckpointError

    path = Path(out) / where / f"{name}.safetensors"
    try:
        tensors = load_file(str(path))
    except Exception as e:   # missing, truncated or corrupt: safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    sae = run.sae
    state = {k[4:]: v for k, v in tensors.items() if k.startswith("sae.")}
    # a checkpoint saved before calibrated values were buffers has none: the run was just built
    # and calibrated on the same sample, so its own value is the one the checkpoint's run had
    state.update({n: getattr(sae, n) for n in getattr(sae, "metadata_buffers", ()) if n not in state})
    sae.load_state_dict(state)
    opt = run.opt
    for pname, p in sae.named_parameters():
        state = {key.rsplit(".", 1)[1]: v.to(device) for key, v in tensors.items()
                 if key.startswith(f"opt.{pname}.") and key.count(".") == pname.count(".") + 2}
        if state:
            if "step" in state and state["step"].dim() == 0:
                # fused (and capturable) Adam keeps its step on the parameter's device, the others on the CPU
                on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
                state["step"] = state["step"].float().to(p.device if on_device else "cpu")
            opt.state[p] = state
    run.since_fired.copy_(tensors["since_fired"].to(run.since_fired.device))
    run.idle_bound = int(tensors["since_fired"].max()) if tensors["since_fired"].numel() else 0


def check_store_identity(out, meta: dict, now: dict | None, store: str | None) -> None:
    """Refuse to resume on another store than the checkpoint was trained on (`now`: this run's
    stores.identity.StoreIdentity as a dict). A checkpoint saved before identities were recorded
    has nothing to compare; a meta-SAE (no store) compares its parent (check_parent_identity)."""
    from sae_harvest.stores.identity import StoreIdentity
    from sae_harvest.train.sae_io import CheckpointError

    saved = meta.get("store_identity")
    if saved is None or now is None:
        return
    differ = StoreIdentity.from_dict(saved).differences(StoreIdentity.from_dict(now))
    if differ:
        raise CheckpointError(f"cannot resume {out}: store {store} is not the store its checkpoint was trained on "
                              f"({', '.join(differ)} differ: it was replaced or rewritten since); training on "
                              f"would mix two stores in one SAE: start a new --out (or --overwrite) instead")


def check_parent_identity(out, meta: dict, now: dict | None, parent: str | None) -> None:
    """Refuse to resume a meta-SAE on another parent decoder than its checkpoint was trained on
    (`now`: train/local.py DecoderSource.identity; the parent was retrained or overwritten since).
    A checkpoint saved before parents were fingerprinted has nothing to compare."""
    from sae_harvest.stores.urls import scrub
    from sae_harvest.train.sae_io import CheckpointError

    saved = meta.get("parent_identity")
    if saved is None or now is None or saved == now:
        return
    raise CheckpointError(f"cannot resume {out}: --decoder-of {scrub(parent)} is not the SAE its checkpoint was "
                          f"trained on (its decoder's sha256 differs: it was retrained or overwritten since); "
                          f"training on would mix two decoders in one meta-SAE: start a new --out (or --overwrite) "
                          f"instead")
