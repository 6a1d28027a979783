"""Save / load an SAE as SAELens-style `sae_weights.safetensors` + `cfg.json` (no pickle anywhere).

cfg.json top level: SAELens keys (architecture, d_in, d_sae, dtype, apply_b_dec_to_input, hook_name as
the TransformerLens name, k for topk, ...); our full config lives under "sae_harvest":
{"sae": SAEConfig.to_dict(), **extra_cfg}, with our site name in its "hook_name". load_sae also reads
checkpoints SAELens wrote (train/saelens_format.py).
Both files are written to temporaries and os.replace()d, weights first, so a crash never leaves a
cfg.json pointing at half-written weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_harvest.stores.errors import UserError
from sae_harvest.stores.artifacts import artifact_json
from sae_harvest.train import registry
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.sae_config import type_name
from sae_harvest.train.saelens_format import (ForeignCheckpointError, convert_saelens, is_saelens_checkpoint,
                                              tl_hook_name)
from sae_harvest.train.sae import SAE

WEIGHTS_NAME = "sae_weights.safetensors"
CFG_NAME = "cfg.json"
BUFFERS_KEY = "sae_harvest.buffers"   # safetensors header metadata: {buffer: value} of metadata_buffers


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, truncated, corrupt, or inconsistent with its cfg.json."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def saelens_cfg(sae: SAE, extra_cfg: dict) -> dict:
    cfg = sae.cfg
    out = {
        "architecture": sae.saelens_architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": _dtype_name(sae.W_dec.dtype),
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "hook_name": tl_hook_name(extra_cfg.get("hook_name")),   # ours stays in "sae_harvest"
        # The saved weights take raw activations (the loop folds its normalisation in before saving).
        "normalize_activations": extra_cfg.get("normalize_activations", "none"),
    }
    for key in ("model_name", "hook_layer", "context_size", "prepend_bos", "dataset_path"):
        if key in extra_cfg:
            out[key] = extra_cfg[key]
    out.update(sae.saelens_fields())
    out["sae_harvest"] = {"sae": cfg.to_dict(), **extra_cfg}
    return out


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_sae(sae: SAE, out_dir, *, extra_cfg: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = artifact_json(saelens_cfg(sae, dict(extra_cfg)), allow_nan=True)   # fail before touching any file
    tensors = {n: t.detach().cpu().contiguous() for n, t in sae.saelens_state_dict().items()}
    metadata = {"format": "pt"}
    side = {n: getattr(sae, n).detach().float().cpu().tolist() for n in getattr(sae, "metadata_buffers", ())}
    if side:   # calibrated state SAELens has no tensor for (its loader refuses unknown tensors)
        metadata[BUFFERS_KEY] = artifact_json(side, indent=None)
    _replace_atomically(out_dir / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=metadata))
    _replace_atomically(out_dir / CFG_NAME, lambda p: p.write_text(text))


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


# A cfg.json or safetensors header beyond these is not an SAE checkpoint, and widths beyond
# MAX_WIDTH would not fit in memory anyway: refuse before reading or allocating anything big.
MAX_CFG_BYTES = 16 << 20
MAX_HEADER_BYTES = 100 << 20
MAX_WIDTH = 1 << 31
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
             "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def checked_sae_config(raw, where) -> SAEConfig:
    """SAEConfig from cfg.json's sae_harvest.sae after checking every value's type and range, so a
    hostile or careless file (d_sae = 2**40, d_sae = 256.0, k = "8") is one CheckpointError."""
    import dataclasses

    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: sae_harvest.sae is a {type(raw).__name__}, not an object")
    fields = {f.name: f for cfg_cls in registry.CONFIGS.values() for f in dataclasses.fields(cfg_cls)}
    for f in fields.values():
        if f.name not in raw:
            continue
        v, kind = raw[f.name], type_name(f)
        if kind == "str" and not isinstance(v, str):
            raise CheckpointError(f"{where}: {f.name} must be a string, got {v!r}")
        if kind == "int":
            if not isinstance(v, int) or isinstance(v, bool):
                raise CheckpointError(f"{where}: {f.name} must be an integer, got {v!r}")
            if not 0 <= v < MAX_WIDTH:
                raise CheckpointError(f"{where}: {f.name} = {v} is out of range (0 to {MAX_WIDTH - 1})")
        if kind == "bool" and not isinstance(v, bool):
            raise CheckpointError(f"{where}: {f.name} must be true or false, got {v!r}")
        if kind == "float" and (not isinstance(v, (int, float)) or isinstance(v, bool) or v != v
                                or abs(v) == float("inf")):
            raise CheckpointError(f"{where}: {f.name} must be a finite number, got {v!r}")
    try:
        return SAEConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: invalid SAE config ({_one_line(e)})") from None


def safetensors_header(wpath: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from the file's header alone (8-byte length + JSON), after
    checking that every tensor's bytes lie inside the file: nothing the header claims is allocated."""
    try:
        size = wpath.stat().st_size
        with open(wpath, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        out, data = {}, size - 8 - n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in _ITEMSIZE or not all(isinstance(s, int) and s >= 0 for s in shape) \
                    or not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data):
                raise ValueError(f"bad entry for {name}")
            numel = 1
            for s in shape:
                numel *= s
            if numel * _ITEMSIZE[dtype] != end - begin:
                raise ValueError(f"{name}: shape {shape} does not match its {end - begin} bytes")
            out[name] = (dtype, tuple(shape))
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{wpath}: truncated or corrupt safetensors file ({_one_line(e)})") from None


def check_shapes(cfg: SAEConfig, header: dict, wpath: Path) -> None:
    """The tensors the config implies (built on the meta device: no memory) against the header."""
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in make_sae(cfg).saelens_state_dict().items()}
    got = {n: shape for n, (_, shape) in header.items()}
    if set(expected) != set(got):
        raise CheckpointError(f"{wpath}: tensors {sorted(got)} do not match {cfg.arch} tensors {sorted(expected)}")
    bad = [f"{n} {got[n]} != {expected[n]}" for n in expected if got[n] != expected[n]]
    if bad:
        raise CheckpointError(f"{wpath}: shapes disagree with cfg.json (d_in={cfg.d_in}, d_sae={cfg.d_sae}): "
                              + "; ".join(bad))


def load_sae(path, device: str | torch.device = "cpu") -> SAE:
    """Load a checkpoint directory (or its sae_weights.safetensors). Returns the SAE in eval mode,
    with `sae.provenance` (train.provenance: site, TransformerLens hook name, model, store).
    The config's types and the tensor shapes are checked against the file before anything is allocated."""
    from sae_harvest.train.provenance import provenance_of

    sae = _load_checkpoint(path, device)
    d = Path(path).parent if Path(path).name == WEIGHTS_NAME else Path(path)
    sae.provenance = provenance_of(json.loads((d / CFG_NAME).read_text()), d)   # read and checked just now
    return sae


def _load_checkpoint(path, device) -> SAE:
    path = Path(path)
    d = path.parent if path.name == WEIGHTS_NAME else path
    foreign = _saelens_cfg(d)
    if foreign is not None:
        return _load_saelens(d, foreign, device)
    try:
        if (d / CFG_NAME).stat().st_size > MAX_CFG_BYTES:
            raise ValueError(f"larger than {MAX_CFG_BYTES} bytes")
        cfg_json = json.loads((d / CFG_NAME).read_text())
        raw = cfg_json["sae_harvest"]["sae"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{d / CFG_NAME}: unreadable SAE config ({_one_line(e)})") from None
    cfg = checked_sae_config(raw, d / CFG_NAME)
    if (cfg_json.get("d_in"), cfg_json.get("d_sae")) != (cfg.d_in, cfg.d_sae):
        raise CheckpointError(f"{d / CFG_NAME}: top-level d_in/d_sae {cfg_json.get('d_in')}/"
                              f"{cfg_json.get('d_sae')} disagree with sae_harvest.sae {cfg.d_in}/{cfg.d_sae}")
    wpath = d / WEIGHTS_NAME
    check_shapes(cfg, safetensors_header(wpath), wpath)   # before reading or allocating anything
    return _build(cfg, *_read_tensors(wpath, with_metadata=True), wpath, device)


def _read_tensors(wpath: Path, with_metadata: bool = False):
    try:
        tensors = {}
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError / OSError on bad files
        raise CheckpointError(f"{wpath}: truncated or corrupt safetensors file ({_one_line(e)})") from None
    return (tensors, metadata) if with_metadata else tensors


def _saelens_cfg(d: Path) -> dict | None:
    """cfg.json if SAELens (not this tool) wrote it; None otherwise, or when unreadable (load_sae says)."""
    try:
        cfg_json = json.loads((d / CFG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return cfg_json if isinstance(cfg_json, dict) and is_saelens_checkpoint(cfg_json) else None


def _load_saelens(d: Path, cfg_json: dict, device) -> SAE:
    """A checkpoint SAELens wrote: converted exactly to our equivalent architecture."""
    wpath = d / WEIGHTS_NAME
    tensors = _read_tensors(wpath)
    try:
        fields, tensors = convert_saelens(cfg_json, tensors)
        cfg = SAEConfig.from_dict(fields)
    except ForeignCheckpointError as e:
        raise CheckpointError(f"{d / CFG_NAME}: {e}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{d / CFG_NAME}: unreadable SAELens config ({_one_line(e)})") from None
    return _build(cfg, tensors, {}, wpath, device)


def _metadata_buffers(sae: SAE, metadata: dict, wpath: Path) -> dict[str, torch.Tensor]:
    """The buffers saved in the safetensors header; one missing (saved before it was kept there)
    keeps the value the config gave it (gtopk: the beta the old cfg.json recorded)."""
    names = getattr(sae, "metadata_buffers", ())
    if not names:
        return {}
    try:
        saved = json.loads(metadata.get(BUFFERS_KEY) or "{}")
        if not isinstance(saved, dict):
            raise ValueError("not an object")
        out = {}
        for n in names:
            current = getattr(sae, n)
            out[n] = torch.tensor(saved[n], dtype=current.dtype).reshape(current.shape) if n in saved else current
        return out
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{wpath}: unreadable {BUFFERS_KEY} metadata ({_one_line(e)})") from None


def _build(cfg: SAEConfig, tensors: dict, metadata: dict, wpath: Path, device) -> SAE:
    # converted SAELens tensors are checked here; ours were checked against the header already
    check_shapes(cfg, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, wpath)
    sae = make_sae(cfg)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or not all(t.dtype.is_floating_point for t in tensors.values()):
        raise CheckpointError(f"{wpath}: expected one floating dtype, got {sorted(map(str, dtypes))}")
    sae.to(dtype=dtypes.pop())
    sae.load_saelens_state_dict({**tensors, **_metadata_buffers(sae, metadata, wpath)})
    return sae.to(device).eval()
