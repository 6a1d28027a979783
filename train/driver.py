"""The step loop shared by the local and end-to-end trainers: lr schedule, logging, progress,
periodic checkpoints, Ctrl-C and SIGTERM (save, then stop), faults (save, then stop) and exact
resume. Trainers supply the step.

A fault (any exception in the loop: a store read that fails, a full disk) saves a checkpoint at
the last completed step with the feed position from before the failing batch, so --resume redoes
exactly that batch. A fault inside the optimizer step itself may have updated some SAEs of the
sweep for that batch already; their resume then sees the batch twice.

`on_step`, if given, is called before every step with a StepEvent: the public way to watch (or
stop) training from outside, e.g. in tests."""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_harvest.stores.progress import StepProgress

from sae_harvest.train import distributed
from sae_harvest.train import resume as train_state
from sae_harvest.stores.errors import UserError
from sae_harvest.stores.identity import identity_of
from sae_harvest.stores.artifacts import artifact_json
from sae_harvest.train.errors import Diverged, TrainError


class TrainInterrupted(UserError):
    """Training stopped by a signal after saving a resumable checkpoint; `code` is the exit status
    a shell gives that signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)   # Ctrl-C; what Slurm and Kubernetes send before a kill


@dataclass(frozen=True)
class StepEvent:
    step: int          # 0-based index of the step about to run
    inputs: object     # what the step trains on (local: x / scale on the device; e2e: token ids)
    runs: dict         # {name: train.runs.Run}
    scale: float       # the input scale the SAEs train under


def lr_factor(step: int, total: int, warmup: int, final: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def _wandb(cfg, world):
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise TrainError("--wandb needs the wandb package: pip install wandb") from None
    # sweep parallel: one wandb run per rank, each logging its own SAEs
    name = f"{Path(cfg.out).name}-rank{world.rank}" if world.sweep_parallel else None
    return wandb.init(project=cfg.wandb, config=cfg.to_dict(), name=name)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= step (the checkpoint's): a resumed run logs the later ones again.
    A torn last line (killed mid-write) goes too."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line + "\n")
    text = "".join(keep)
    if text != path.read_text():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


def _log(runs, step, tokens, wandb_run):
    for name, run in runs.items():
        record = {"step": step, "tokens": tokens, **run.last}
        run.log.write(artifact_json(record, indent=None, allow_nan=True) + "\n")
        run.log.flush()
        if wandb_run is not None:
            wandb_run.log({f"{name}/{k}": v for k, v in record.items() if k != "step"}, step=step)


class Driver:
    """Owns `out/`: metrics files, checkpoints, the progress bar and the SIGINT handler.
    Under torchrun, data parallel: only rank 0 writes; every rank steps, and a stop on any rank
    stops them all. Sweep parallel: each rank runs this loop alone over its own SAEs and writes
    their files and its own checkpoint (checkpoint/rank<r>/), at its own pace."""

    def __init__(self, cfg, out: Path, runs: dict, *, scale: float, total_steps: int, tokens_per_step: int,
                 label: str, world: distributed.World = distributed.World(), store=None,
                 target_scale: float | None = None, parent: dict | None = None):
        self.cfg, self.out, self.runs, self.scale = cfg, Path(out), runs, scale
        # an e2e transcoder's output scale: like `scale`, a resume continues under the saved one (a
        # fresh sample's scale, on another device, may differ in its last bits)
        self.target_scale = target_scale
        # which store the SAEs train on, saved in every checkpoint: a resume refuses another one
        self.store_identity = identity_of(store).to_dict() if store is not None else None
        # a meta-SAE's parent decoder (train/local.py DecoderSource.identity), likewise saved and compared
        self.parent_identity = parent
        self.saved_step = None   # the step of the last checkpoint of this run on disk (None: none yet)
        self.world = world
        self.writes = world.main or world.sweep_parallel          # this rank saves its runs
        self.lockstep = world.size > 1 and not world.sweep_parallel   # ranks share every step
        # --shard-decoders: every rank checkpoints its own slice of the CLT (train/clt_shard.py)
        self.saves_state = self.writes or world.shards
        self.where = train_state.rank_dir(world.rank) if world.sweep_parallel or world.shards \
            else train_state.CHECKPOINT_DIR
        self.total_steps, self.tokens_per_step, self.label = total_steps, tokens_per_step, label
        self.step, self.feed, self.elapsed = 0, None, 0.0
        self.feed_wait = 0.0   # seconds the step loop waited for the next batch: > 0 means the feed binds
        self.warmup = max(1, int(cfg.warmup_fraction * total_steps))

    def prepare(self, resume: bool, overwrite: bool, device) -> dict | None:
        """Restore a checkpoint (returns the saved feed state) or start clean."""
        out = self.out
        if self.saves_state and resume:   # repairs a checkpoint killed mid-swap: by its one writer
            train_state.has_state(out, self.where)
        distributed.barrier()
        if self.world.main and overwrite and out.exists() and not (resume and train_state.saved_layout(out)):
            import shutil
            shutil.rmtree(out)
        distributed.barrier()
        if not resume:
            return None
        self._check_layout(train_state.saved_layout(out))
        if not train_state.has_state(out, self.where):
            return None   # sweep parallel: this rank died before its first checkpoint
        meta = train_state.load_meta(out, self.where)
        saved, now = meta["config"], self.cfg.to_dict()
        # options that do not change the trained weights (checkpoint_every: how often state is saved)
        free = ("device", "wandb", "out", "dist_timeout", "sweep_parallel", "sparse_backward", "stack_sweep",
                "checkpoint_every")
        gone = sorted(k for k in saved if k not in now and k not in free)
        if gone:   # e.g. holdout_fraction: trained on the old split and init, which a resume cannot continue
            raise TrainError(f"cannot resume {out}: its checkpoint was saved by an older version (options "
                             f"{', '.join(gone)} no longer exist; it trained without the store's held-out "
                             f"split): start a new run")
        # an option added after the checkpoint was saved counts as its default there
        defaults = {f.name: f.default for f in dataclasses.fields(self.cfg)}
        differ = [k for k, v in now.items() if k not in free and _plain(saved.get(k, defaults.get(k))) != _plain(v)]
        if differ:
            raise TrainError(f"cannot resume {out}: options differ from the saved run: {', '.join(differ)}")
        train_state.check_store_identity(out, meta, self.store_identity, self.cfg.store)
        train_state.check_parent_identity(out, meta, self.parent_identity, self.cfg.decoder_of)
        if self.world.sweep_parallel and meta.get("runs") != list(self.runs):
            raise TrainError(f"cannot resume {out}: {self.where} holds {', '.join(meta.get('runs') or [])}, but "
                             f"rank {self.world.rank} of {self.world.size} trains {', '.join(self.runs)}")
        self.step, self.scale = meta["step"], meta["scale"]
        self.saved_step = self.step
        if meta.get("target_scale") is not None:
            self.target_scale = meta["target_scale"]
        for name, run in self.runs.items():
            train_state.load_run(out, name, run, device, self.where)
        return meta["feed"]

    def _check_layout(self, saved: list[str]) -> None:
        """A sweep-parallel checkpoint resumes only as sweep parallel on as many ranks (each rank's
        SAEs and step are its own); one process's or a data-parallel one only as either of those."""
        if not saved:
            return
        mine = [train_state.rank_dir(r) for r in range(self.world.size)]
        metas = {where: train_state.load_meta(self.out, where) for where in saved if where != train_state.CHECKPOINT_DIR}
        if any(m.get("shard_decoders") for m in metas.values()):
            # a sharded CLT's slices only make the whole CLT at one step, on as many ranks
            steps = sorted({m.get("step") for m in metas.values()})
            n = {m.get("world_size") for m in metas.values()}
            n = n.pop() if len(n) == 1 else "?"
            if self.world.shards and saved == mine and n == self.world.size and len(steps) == 1:
                return
            if len(steps) > 1:
                raise TrainError(f"cannot resume {self.out}: its ranks' checkpoints (--shard-decoders) are at "
                                 f"steps {', '.join(map(str, steps))}, not one step (a rank died while saving): "
                                 f"start a new run")
            raise TrainError(f"cannot resume {self.out}: its checkpoint was saved with --shard-decoders on {n} ranks: "
                             f"resume the same way (torchrun --nproc-per-node {n} ... --shard-decoders)")
        if self.world.shards:
            raise TrainError(f"cannot resume {self.out} with --shard-decoders: its checkpoint was not sharded; "
                             f"resume it as it was saved")
        if self.world.sweep_parallel:
            mine = {train_state.rank_dir(r) for r in range(self.world.size)}
            sizes = {train_state.load_meta(self.out, where).get("world_size") for where in saved if where in mine}
            if set(saved) <= mine and sizes == {self.world.size}:
                return
        elif saved == [train_state.CHECKPOINT_DIR]:
            return
        if saved == [train_state.CHECKPOINT_DIR]:
            how = "by one process or data parallel: resume without --sweep-parallel (or with one process)"
        else:
            sizes = {train_state.load_meta(self.out, where).get("world_size") for where in saved}
            n = sizes.pop() if len(sizes) == 1 else "?"
            how = f"with --sweep-parallel on {n} ranks: resume the same way (torchrun --nproc-per-node {n})"
        raise TrainError(f"cannot resume {self.out}: its checkpoint was saved {how}")

    def checkpoint(self, feed_state: dict | None = None) -> None:
        if not self.saves_state:
            return
        bad = _nonfinite_weights(self.runs)
        if bad:   # never let NaN weights replace the last good checkpoint
            raise self._diverged(bad)
        feed_state = self.feed.state() if feed_state is None else feed_state
        meta = {"step": self.step, "feed": feed_state, "scale": self.scale, "config": self.cfg.to_dict(),
                "world_size": self.world.size, "sweep_parallel": self.world.sweep_parallel, "runs": list(self.runs),
                "shard_decoders": self.world.shards, "store_identity": self.store_identity}
        if self.target_scale is not None:
            meta["target_scale"] = self.target_scale
        if self.parent_identity is not None:
            meta["parent_identity"] = self.parent_identity
        train_state.save_state(self.out, meta=meta, runs=self.runs, where=self.where)
        self.saved_step = self.step

    def _diverged(self, what: str) -> Diverged:
        if self.saved_step is not None:
            kept = (f"the last good checkpoint (step {self.saved_step}) in {self.out / self.where} is kept; lower "
                    f"--lr or --grad-clip and start again with --overwrite or another --out")
        else:   # only the metrics logs are left: this trainer's, so --overwrite replaces them
            kept = (f"no checkpoint was saved; lower --lr or --grad-clip and start again with --overwrite (the "
                    f"metrics.jsonl logs left in {self.out} show where it diverged)")
        return Diverged(f"training diverged at step {self.step}: {what}; nothing was saved as finished and {kept}")

    def _save_after_fault(self, err: BaseException, feed_state: dict) -> UserError:
        """Checkpoint at the last completed step; the error to stop with (one line)."""
        what = err if isinstance(err, UserError) else f"{type(err).__name__}: {_first_line(err)}"
        if self.world.shards:   # the other ranks may be at another step: only the last checkpoint all wrote is whole
            return TrainError(f"training stopped at step {self.step} ({what}); --shard-decoders: the ranks' last "
                              f"periodic checkpoint in {self.out} is kept (continue with --resume)")
        try:
            self.checkpoint(feed_state)
        except Diverged as diverged:   # NaN weights: not saved, the previous checkpoint is kept
            return diverged
        except Exception as save_err:   # e.g. the disk is full: the previous checkpoint is still there
            return TrainError(f"training stopped at step {self.step} ({what}) and the checkpoint could not be "
                              f"saved ({type(save_err).__name__}: {_first_line(save_err)}); the last periodic "
                              f"checkpoint in {self.out} is kept")
        if isinstance(err, UserError):   # keep its class: a StoreError stays a StoreError
            try:
                return type(err)(f"{err} (training stopped at step {self.step}: checkpoint saved in {self.out}; "
                                 f"continue with --resume)")
            except TypeError:
                return err
        return TrainError(f"training stopped at step {self.step} ({what}): checkpoint saved in {self.out}; "
                          f"fix the cause and continue with --resume")

    def run(self, feed, prepare, step_fn, info_fn, *, progress: bool, console, on_step=None) -> None:
        """prepare(data) -> inputs puts a batch in training form; step_fn(inputs, lr_factor, log_now,
        reducer) trains every run on it, reducing batch-wide quantities through `reducer` (the
        step's distributed.Reducer: over every rank in lockstep data parallel, else LOCAL); info_fn() -> the metrics shown under the step line after each logged
        step: rows {"sae": name, metric: value} (one line each) or one line of text."""
        self.feed = feed
        main, writes = self.world.main, self.writes
        wandb_run = _wandb(self.cfg, self.world) if writes else None
        if writes:
            self.out.mkdir(parents=True, exist_ok=True)
            for name, run in self.runs.items():
                (self.out / name).mkdir(exist_ok=True)
                _truncate_metrics(self.out / name / "metrics.jsonl", self.step)
                run.log = open(self.out / name / "metrics.jsonl", "a")
        interrupted = []
        old_handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        show = progress and main and console is not None
        bar = StepProgress(self.tokens_per_step, console=console, disable=not show)
        parallel = self.lockstep
        per = self.tokens_per_step
        self.start_step = self.step   # a resumed run times only its own steps
        t0 = time.perf_counter()
        try:
            for s in STOP_SIGNALS:
                signal.signal(s, lambda signum, _frame: interrupted.append(signum))
            with bar:
                task = bar.add_task(self.label, total=self.total_steps, completed=self.step)
                batches = iter(feed)
                while self.step < self.total_steps:
                    before = feed.state()   # the feed position a fault in this step resumes from
                    try:
                        waited = time.perf_counter()
                        data = next(batches, None)
                        self.feed_wait += time.perf_counter() - waited
                        if data is None:
                            break
                        log_now = (self.step + 1) % self.cfg.log_every == 0 or self.step + 1 == self.total_steps
                        inputs = prepare(data)
                        if on_step is not None:
                            on_step(StepEvent(self.step, inputs, self.runs, self.scale))
                        with distributed.data_parallel(parallel and not self.world.shards) as reducer:
                            step_fn(inputs, lr_factor(self.step, self.total_steps, self.warmup,
                                                      self.cfg.lr_final_fraction), log_now, reducer)
                    except Exception as e:
                        raise self._save_after_fault(e, before) from e
                    self.step += 1
                    bar.advance(task, 1)
                    if log_now and writes:
                        _log(self.runs, self.step, self.step * per, wandb_run)
                        bar.set_metrics(info_fn())
                    bad = _nonfinite_loss(self.runs) if log_now else None
                    if bad:   # every rank logs the same global means, so every rank stops here
                        raise self._diverged(bad)
                    if self.step % self.cfg.checkpoint_every == 0 and self.step < self.total_steps:
                        self.checkpoint()
                    stop = distributed.anywhere(bool(interrupted)) if parallel else bool(interrupted)
                    if stop:
                        self.checkpoint()
                        signum = interrupted[0] if interrupted else signal.SIGTERM   # or another rank's
                        name = signal.Signals(signum).name
                        raise TrainInterrupted(f"stopped by {name} at step {self.step}: checkpoint saved in "
                                               f"{self.out / self.where}; continue with --resume",
                                               code=128 + int(signum))
        finally:
            for s, handler in old_handlers.items():
                signal.signal(s, handler)
            for run in self.runs.values():
                if run.log:
                    run.log.close()
        bad = _nonfinite_weights(self.runs)
        if bad:   # before any trainer saves an SAE folder as finished
            raise self._diverged(bad)
        self.elapsed = time.perf_counter() - t0
        self.wandb_run = wandb_run
        if show:   # the live display is gone (transient): one line says how the run went
            s = self.summary()
            console.print(f"{self.label}: {self.step:,}/{self.total_steps:,} steps, "
                          f"{s['tokens_per_s'] or 0:,.0f} tok/s, {self.elapsed:,.1f} s", highlight=False, markup=False)

    def summary(self) -> dict:
        """`seconds` and `tokens_per_s` cover this process's steps only: after --resume, the steps
        since `resumed_from_step`, not the whole run's tokens over the resumed part's time."""
        tokens = self.step * self.tokens_per_step
        start = getattr(self, "start_step", 0)
        timed = (self.step - start) * self.tokens_per_step
        return {"steps": self.step, "tokens": tokens, "seconds": self.elapsed, "feed_wait_s": self.feed_wait,
                "resumed_from_step": start,
                "tokens_per_s": timed / self.elapsed if self.elapsed > 0 else None, "input_scale": self.scale,
                "world_size": self.world.size, "sweep_parallel": self.world.sweep_parallel,
                "shard_decoders": self.world.shards, "rank": self.world.rank if self.world.sweep_parallel else None}   # the one rank that trained it

    def gather(self, summaries: dict, order: list[str]) -> dict:
        """Sweep parallel: every rank's {name: summary}, in sweep order, on rank 0 ({} elsewhere);
        otherwise `summaries` as they are. Each rank has saved its own SAEs before it waits here."""
        if not self.world.sweep_parallel:
            return summaries
        merged = {}
        for part in distributed.all_gather_json(summaries, self.world.results_group):
            merged.update(part)
        return {name: merged[name] for name in order} if self.world.main else {}

    def finish(self) -> None:
        self.checkpoint()
        if getattr(self, "wandb_run", None) is not None:
            self.wandb_run.finish()


def _nonfinite_loss(runs: dict) -> str | None:
    """The first SAE whose last logged loss is NaN or infinite (host values: no GPU read)."""
    for name, run in runs.items():
        loss = run.last.get("loss") if isinstance(run.last, dict) else None
        if isinstance(loss, (int, float)) and not math.isfinite(loss):
            return f"{name}'s loss is {loss}"
    return None


def _nonfinite_weights(runs: dict) -> str | None:
    """The first SAE with a NaN or infinite parameter (one read per parameter)."""
    for name, run in runs.items():
        for pname, p in run.sae.named_parameters():
            if not bool(torch.isfinite(p).all()):
                return f"{name}'s {pname} is not finite"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _plain(v):
    # an option that became a list (a sweep) compares equal to the one value an older run saved
    v = list(v) if isinstance(v, (tuple, list)) else v
    return v[0] if isinstance(v, list) and len(v) == 1 else v
