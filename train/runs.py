"""What the local and the end-to-end trainers share: the sweep's runs, the optimizer step, the
input scale, the output check, and folding + saving the finished SAEs."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae_harvest.stores.urls import scrub
from sae_harvest.stores.artifacts import artifact_json, enclosing_store
from sae_harvest.train import distributed
from sae_harvest.train.config import TrainConfig, swept_fields, sweep
from sae_harvest.train.errors import TrainError
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.init_streams import INIT_SCHEME, checkpoint_stream, init_identity, init_stream, stream_seed
from sae_harvest.train.sae import SAE
from sae_harvest.train.sae_io import load_sae, save_sae
from sae_harvest.train.sparse_topk import wants_sparse_backward


@dataclass
class Run:
    """One SAE of a sweep while it trains."""
    name: str                     # folder under --out, e.g. topk_k32
    sae: SAE
    opt: torch.optim.Optimizer
    lr: float                     # peak learning rate (the schedule multiplies it)
    since_fired: torch.Tensor     # long [d_sae]: tokens since each latent was last active
    idle_bound: int = 0           # host-side upper bound on since_fired.max(), so no step reads the GPU for it
    log: object = None            # metrics.jsonl file while training
    init: dict = field(default_factory=dict)   # where the initial weights came from (cfg.json sae_harvest.init)
    last: dict = field(default_factory=dict)   # latest logged metrics

    @property
    def cfg(self) -> SAEConfig:
        return self.sae.cfg


def input_scale(sample: torch.Tensor, normalize: bool) -> float:
    """One constant with E||x / scale|| = sqrt(d_in) (1.0 without normalisation)."""
    if not normalize:
        return 1.0
    return float(sample.norm(dim=-1).mean() / math.sqrt(sample.shape[-1]))


def build_runs(cfg: TrainConfig, d_in: int, sample: torch.Tensor, grad_sample: torch.Tensor | None,
               device, scale: float, world: distributed.World = distributed.World(),
               site: str | None = None) -> dict[str, Run]:
    """One Run per swept value, each initialised from its own stream (the seed and the SAE's identity,
    `site` included: train.sae.init_stream); `sample` / `grad_sample` are raw rows. Sweep
    parallel: only the runs this rank trains (SAE i on rank i mod N), each built as one process would."""
    runs = {}
    x = sample / scale
    g = grad_sample * scale if grad_sample is not None else None   # gradient w.r.t. x / scale
    swept = swept_fields(cfg)
    for index, (name, sae_cfg) in enumerate(sweep(cfg, d_in)):
        if world.sweep_parallel and world.owner(index) != world.rank:
            continue
        identity = init_identity(sae_cfg, site if site is not None else cfg.site, swept)
        stream = init_stream(cfg.seed, identity)
        origin = {"scheme": INIT_SCHEME, "seed": cfg.seed, "identity": identity, "stream": stream}
        torch.manual_seed(stream_seed(stream))
        sae = make_sae(sae_cfg)
        if cfg.init:
            init = load_sae(cfg.init)
            if (init.cfg.d_in, init.cfg.d_sae, init.cfg.arch) != (sae_cfg.d_in, sae_cfg.d_sae, sae_cfg.arch):
                raise TrainError(f"--init {cfg.init} is a {init.cfg.arch} {init.cfg.d_in}->{init.cfg.d_sae} SAE; "
                                 f"this run trains {sae_cfg.arch} {sae_cfg.d_in}->{sae_cfg.d_sae}")
            init.fold_input_scale(1.0 / scale)   # saved weights take raw inputs; training sees x / scale
            sae.load_state_dict(init.state_dict())
            origin = {"scheme": "checkpoint", "from": scrub(cfg.init), "stream": checkpoint_stream(cfg.init)}
        else:
            sae.init_b_dec(x, cfg.b_dec_init)
        sae.calibrate(x, g)
        sae.to(device).train()
        if cfg.sparse_decode == "on" or (cfg.sparse_decode == "auto" and device.type == "cuda"):
            sae.enable_sparse_decode()
        if wants_sparse_backward(cfg.sparse_backward, device):
            sae.enable_sparse_backward()
        runs[name] = new_run(cfg, name, sae, origin, device)
    return runs


def new_run(cfg: TrainConfig, name: str, sae: SAE, origin: dict, device) -> Run:
    """A built dictionary on the device in training mode, with its lr, Adam and dead counts."""
    sae.to(device).train()
    lr = cfg.lr or sae.default_lr(sae.cfg.d_sae)
    opt = make_adam(sae.parameters(), lr, cfg.adam_betas or sae.adam_betas)
    return Run(name=name, sae=sae, opt=opt, lr=lr, init=origin,
               since_fired=torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device))


def seed_init(cfg: TrainConfig, sae_cfg: SAEConfig, site: str, **extra) -> dict:
    """Seed torch with the initialisation stream of one dictionary (the seed and its identity: its
    sites, widths, swept value and any `extra` that tells it apart, e.g. a transcoder's target) and
    return the origin recorded in its cfg.json, as build_runs does for an SAE."""
    identity = {**init_identity(sae_cfg, site, swept_fields(cfg)), **extra}
    stream = init_stream(cfg.seed, identity)
    torch.manual_seed(stream_seed(stream))
    return {"scheme": INIT_SCHEME, "seed": cfg.seed, "identity": identity, "stream": stream}


def make_adam(params, lr: float, betas) -> torch.optim.Adam:
    """Adam as one fused kernel where this torch has it for the parameters' device (CUDA, CPU:
    7x the per-tensor loop on a 768 x 24576 SAE, docs/benchmarks.md), else the foreach form."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def optimizer_step(run: Run, lr_factor: float, grad_clip: float, fired: torch.Tensor, tokens: int,
                   reducer: distributed.Reducer = distributed.LOCAL) -> None:
    """Apply the accumulated gradients: decoder-norm constraint, clipping, Adam, dead-latent counts.
    Data parallel: gradients and `fired` are reduced over the ranks by `reducer` first; `tokens` is global."""
    sae, opt = run.sae, run.opt
    reducer.average_gradients(sae)
    fired = reducer.any_rank(fired)
    for group in opt.param_groups:
        group["lr"] = run.lr * lr_factor
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm()
    run.since_fired += tokens
    run.idle_bound += tokens
    run.since_fired.masked_fill_(fired, 0)   # not since_fired[fired] = 0: a boolean index syncs the GPU


def check_output(cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    """TrainError unless --out may be written: a local folder, outside any store, and empty unless
    --resume continues this tool's checkpoint there or --overwrite replaces what this tool wrote."""
    if cfg.batch_size <= 0:
        raise TrainError("--batch-size must be positive")
    if "://" in str(cfg.out):
        raise TrainError(f"--out {scrub(cfg.out)} is a URL; SAEs are written to a local folder (copy it to "
                         f"the bucket afterwards)")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; give a folder (it is left as it is)")
    store = enclosing_store(out)
    if store is not None:   # a store's `harvest run --overwrite` replaces the whole folder, SAEs and all
        raise TrainError(f"--out {out} is inside the store {store}; write SAEs to a folder outside it")
    filled = out.exists() and any(out.iterdir())
    if resume and filled and not overwrite and not has_checkpoint(out) and not only_unfinished(out):
        # --resume with nothing to continue must not train from scratch over what is there (a
        # finished run whose checkpoint was deleted, a downloaded SAE, a store)
        raise TrainError(f"--resume: {out} holds no `train fit` checkpoint (checkpoint/state.json) to continue; "
                         f"nothing was changed (choose another --out, or --overwrite a folder `train fit` wrote)")
    if filled and not resume and not overwrite:
        raise TrainError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")
    if overwrite and out.exists() and not made_by_train(out):
        raise TrainError(f"--overwrite: {out} holds files `train fit` did not write; refusing to remove it "
                         f"(choose another --out)")


def has_checkpoint(out: Path) -> bool:
    """Whether out holds a checkpoint `train fit --resume` would continue (one process's, a
    sweep-parallel rank's, or one killed between its two renames, which the driver repairs).
    Whether it really is ours, and of this run, the driver checks before anything is written."""
    from sae_harvest.train.resume import CHECKPOINT_DIR

    folder = out / CHECKPOINT_DIR
    candidates = [folder, out / f".{CHECKPOINT_DIR}.old"]
    if folder.is_dir():
        candidates += [p for p in folder.iterdir() if p.name.startswith("rank") or
                       (p.name.startswith(".rank") and p.name.endswith(".old"))]
    return any((p / "state.json").is_file() for p in candidates)


def only_unfinished(out: Path) -> bool:
    """Whether out holds nothing but the traces of a run of ours killed before its first checkpoint
    (SAE folders with their metrics log alone, a save cut short): --resume starts that run again."""
    return made_by_train(out) and not any((e / "cfg.json").exists() for e in out.iterdir() if e.is_dir())


def _our_log(folder: Path) -> bool:
    """folder holds only a metrics log this trainer writes (lines like {"step": 5, "tokens": ...})."""
    log = folder / "metrics.jsonl"
    if any(f.name != "metrics.jsonl" for f in folder.iterdir()) or not log.is_file():
        return False
    try:
        with open(log) as fh:
            first = fh.readline()
        record = json.loads(first) if first.strip() else {"step": 0, "tokens": 0}
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("step"), int) and "tokens" in record


def made_by_train(out: Path) -> bool:
    """True for an empty folder or one holding only what `train fit` writes: checkpoint folders
    (checkpoint_ours) and SAE folders holding nothing but cfg.json (with this tool's `sae_harvest`
    record), weights, metrics and summary. Only such a folder is ever removed by --overwrite: a
    downloaded SAELens folder (cfg.json and weights alone) or a folder named `checkpoint` holding
    anything else is not ours."""
    ours = {"cfg.json", "sae_weights.safetensors", "metrics.jsonl", "summary.json"}
    for entry in out.iterdir():
        if not entry.is_dir() or entry.is_symlink():
            return False
        if entry.name in ("checkpoint", ".checkpoint.tmp", ".checkpoint.old"):
            if not checkpoint_ours(entry):
                return False
            continue
        if any(f.name not in ours and not f.name.startswith((".sae_weights.safetensors.tmp-", ".cfg.json.tmp-"))
               for f in entry.iterdir()):
            return False
        if not (entry / "cfg.json").exists() and (_checkpointed(out, entry.name) or _our_log(entry)):
            continue   # a run killed before its first save: its log (and its state beside, if checkpointed)
        try:
            record = json.loads((entry / "cfg.json").read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(record, dict) or not isinstance(record.get("sae_harvest"), dict):
            return False
    return True


def _checkpointed(out: Path, name: str) -> bool:
    """A checkpoint of ours (checked by made_by_train's caller loop) beside an SAE folder holds that SAE's
    state: `checkpoint/<name>.safetensors` (or a rank's), with a state.json whose config names this tool's."""
    for folder in (out / "checkpoint", *sorted((out / "checkpoint").glob("rank*"))):
        if (folder / f"{name}.safetensors").is_file() and _our_state(folder) is not None:
            return True
    return False


def _our_state(folder: Path) -> dict | None:
    """folder/state.json as train/resume.save_state writes it (step, config), else None."""
    try:
        meta = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("config"), dict)
    return meta if ok else None


def _our_tensors(path: Path, cut_short_ok: bool = False) -> bool:
    """Whether a safetensors file holds what save_state writes: `since_fired` and `sae.*` tensors
    (read from its header alone: a user's model shards hold neither). cut_short_ok: in a save's
    .tmp folder, a file killed before its header was whole counts too (a whole header must be ours)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8:
                return cut_short_ok
            if not 0 < n <= 100_000_000:
                return False
            body = fh.read(n)
            if len(body) < n:
                return cut_short_ok
            header = json.loads(body)
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and "since_fired" in header and any(k.startswith("sae.") for k in header)


def checkpoint_ours(folder: Path, depth: int = 0) -> bool:
    """Whether a checkpoint folder (checkpoint/, .checkpoint.tmp|old, or a rank's under it) holds
    only what save_state writes, so --overwrite may remove it: this tool's state.json, and one
    safetensors file per run it lists (a save killed before its state.json, the .tmp folders,
    keeps files whose headers are ours); sweep-parallel rank folders likewise, one level down.
    A folder of someone else's safetensors (model shards, another trainer's state) is not ours."""
    tmp = folder.name.endswith(".tmp")
    meta = _our_state(folder)
    if meta is None and (folder / "state.json").exists() and not (tmp and _cut_short(folder / "state.json")):
        return False   # a state.json, but not this tool's (in a save's .tmp, one cut short is)
    runs = meta.get("runs") if meta is not None else None
    for f in folder.iterdir():
        if f.is_symlink():
            return False
        if f.is_dir():
            named = (f.name.startswith("rank") and f.name[4:].isdigit()) or \
                (f.name.startswith(".rank") and f.name.endswith((".tmp", ".old")))
            if depth > 0 or not named or not checkpoint_ours(f, depth + 1):
                return False
        elif f.name == "state.json":
            continue
        elif not f.name.endswith(".safetensors") or not (meta is not None or tmp):
            return False   # weights with no state.json of ours beside them: not provably ours
        elif isinstance(runs, list) and f.name[:-len(".safetensors")] not in runs:
            return False
        elif not _our_tensors(f, cut_short_ok=tmp):
            return False
    return True


def _cut_short(path: Path) -> bool:
    """A JSON file that does not parse because it ends early (a write killed midway): it starts
    like save_state's state.json, {"step": ..."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    try:
        json.loads(text)
        return False
    except ValueError:
        return text.strip() == "" or text.lstrip().startswith(('{"step"', "{\n"))


def save_run(run: Run, folder: Path, scale: float, extra: dict, summary: dict) -> None:
    """Save the SAE so that it takes raw activations (the input scale folded in), plus summary.json."""
    saved = make_sae(run.cfg)
    saved.load_state_dict(run.sae.state_dict())
    saved.fold_input_scale(scale)
    save_sae(saved, folder, extra_cfg={**extra, "sweep_name": folder.name, "lr": run.lr, "summary": summary,
                                       "world_size": summary.get("world_size", 1),
                                       "sweep_parallel": summary.get("sweep_parallel", False), "init": run.init,
                                       "rank": summary.get("rank")})
    (folder / "summary.json").write_text(artifact_json(summary, allow_nan=True))
