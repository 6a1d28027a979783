"""`harvest run`: stream text through a model and write a shuffled activation store.

One forward pass per batch serves every site (and one backward pass every
gradient). Rows are scattered into a shuffle window at seeded random positions as
they are computed; a full window goes to a writer thread while the model computes
the next, so writes overlap compute and host memory is bounded by two windows.

Under torchrun every rank runs this: window w belongs to rank w % world, each rank
reads its own share of the documents, rank 0 creates and finishes the store.

Read top to bottom: `harvest` checks the options on every rank; `_harvest` plans the output,
loads the model and corpus (`_load`) and fixes the plan (`HarvestPlan`, harvest/config.py);
`HarvestLoop` runs the windows in rounds all ranks take together; `summarize`
(harvest/summary.py) reports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from itertools import islice

import torch

from sae_harvest.stores import StoreError, StoreWriter
from sae_harvest.stores.cli import pick_device
from sae_harvest.stores.dist import Dist
from sae_harvest.stores.lease import Lease
from sae_harvest.stores.progress import token_progress
from sae_harvest.stores.split import split_attrs
from sae_harvest.stores.urls import scrub, scrub_tree
from sae_harvest.stores.writer import load_records

from . import __version__
from .config import DTYPES, HarvestConfig, HarvestPlan, check_config, check_resume, identity
from .data import Background, open_dataset, positioned_sequences, rank_stream, separator_and_bos, stream_fingerprint
from .default_model import resolve_dataset, resolve_model
from .errors import HarvestError
from .fingerprint import agree_across_ranks, provenance
from .grad_targets import GRAD_TARGETS, LOSS_OF
from .models import get_adapter, load_model, quiet_transformers
from .outpath import Target, plan_target
from .preflight import resolve_sites
from .sites import parse_sites
from .summary import summarize
from .window import BufferPool, WindowWriter, compute_window

# HarvestConfig is re-exported: `from sae_harvest.harvest.run import HarvestConfig, harvest` is the API
__all__ = ["HarvestConfig", "HarvestLoop", "harvest", "summarize"]


def harvest(cfg: HarvestConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
            console=None) -> dict | None:
    """Run a harvest; returns the summary dict (None on ranks other than 0). Raises HarvestError
    (or StoreError) on bad input, before anything at --out is changed."""
    dist = Dist.from_env(cfg.device)
    try:
        def checked():
            check_config(cfg)
            return resolve_sites(cfg)   # the model's config only: before the model is built, downloaded or loaded
        cfg = dist.agree(checked)   # a rank with a bad option stops every rank, not only itself
        return _harvest(cfg, dist, resume, overwrite, progress and dist.rank == 0, console)
    finally:
        dist.close()


@dataclass(frozen=True)
class Loaded:
    """What every rank loads before it harvests: the model, its sites and the corpus it reads."""
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    adapter: object             # harvest.models.ModelAdapter
    sites: list                 # harvest.sites.Site
    ds: object                  # the corpus (harvest.data.open_dataset)
    fingerprint: str            # of the corpus stream
    made_by: dict               # provenance of model, tokenizer and corpus


def _load(cfg: HarvestConfig, target: Target, world: int, device_name: str) -> Loaded:
    device = pick_device(device_name)
    quiet_transformers()
    model, tokenizer = load_model(resolve_model(cfg.model), revision=cfg.revision, device=device,
                                  dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    adapter = get_adapter(model)
    sites = parse_sites(cfg.sites, adapter.n_layers)
    if cfg.ctx_len > adapter.max_positions:
        raise HarvestError(f"--ctx-len {cfg.ctx_len} is longer than the model's context ({adapter.max_positions})")
    ds = open_dataset(resolve_dataset(cfg.dataset), cfg.split, cfg.text_column)
    fingerprint = stream_fingerprint(ds, cfg.text_column)
    made_by = provenance(resolve_model(cfg.model), cfg.revision, tokenizer, resolve_dataset(cfg.dataset),
                         fingerprint)
    if target.resume_attrs is not None:
        check_resume(cfg, target.resume_attrs, world, fingerprint, made_by)
    return Loaded(device, model, tokenizer, adapter, sites, ds, fingerprint, made_by)


def _harvest(cfg, dist: Dist, resume, overwrite, progress, console):
    # under torchrun every rank runs the same harvest, or none starts (a rank launched with another
    # --model or --dtype would otherwise add its rows to the store that names rank 0's)
    agree_across_ranks(dist, "harvest arguments", {**scrub_tree(dataclasses.asdict(cfg)), "resume": resume,
                                                   "overwrite": overwrite})
    # everything that can fail on bad input is checked before the output is touched
    target: Target = dist.agree(lambda: plan_target(cfg.out, resume=resume, overwrite=overwrite))
    loaded = dist.agree(lambda: _load(cfg, target, dist.world, dist.device_name(cfg.device)))
    # the same arguments can still name other files on another node (a relative or node-local path)
    agree_across_ranks(dist, "model, tokenizer and corpus", {k: v["digest"] for k, v in loaded.made_by.items()})
    if target.complete:   # nothing to harvest; a store complete beside --out is swapped in (a kill before)
        if dist.rank != 0:
            return None
        target.swap(Lease(target.build, creation_id=target.creation_id).acquire(takeover=True)
                    if target.build != target.final else None)
        return summarize(target.final, seconds=0.0, tokens_this_run=0, console=console, quiet=not progress)
    plan = HarvestPlan.of(cfg, loaded.sites, loaded.adapter.family)
    try:
        return HarvestLoop(cfg, plan, loaded, dist, target, progress, console).run()
    except OSError as e:   # disk full, a file-size limit, a bucket that refuses: recorded windows are kept
        raise HarvestError(f"cannot write store {scrub(cfg.out)}: {_os_reason(e)}; the windows recorded so far "
                           f"are kept: make room and continue with --resume") from None


def _store_meta(cfg: HarvestConfig, plan: HarvestPlan, loaded: Loaded, dist: Dist) -> dict:
    """The root attributes of a new store (sites, gradients and geometry are StoreWriter.create's)."""
    adapter, tokenizer = loaded.adapter, loaded.tokenizer
    sep, bos = separator_and_bos(tokenizer)
    return {
        "model": {"name": scrub(cfg.model), "revision": cfg.revision, "family": adapter.family,
                  "n_layers": adapter.n_layers, "d_model": adapter.d_model},
        "tokenizer": {"name": scrub(cfg.model), "vocab_size": len(tokenizer), "separator_id": sep,
                      "bos_id": bos, "bos_prepended": bos is not None},
        "dataset": {"name": scrub(cfg.dataset), "split": cfg.split, "text_column": cfg.text_column},
        "stream": {"fingerprint": loaded.fingerprint, "split": "split_dataset_by_node" if dist.active else "none"},
        "seed": cfg.seed,
        "world_size": dist.world,
        "nodes": dist.nodes,
        "harvest": identity(cfg),
        "provenance": loaded.made_by,
        "tool_version": __version__,
        "split": split_attrs(cfg.eval_every),   # the held-out sequences (stores/split.py)
    }


def _create_store(cfg: HarvestConfig, plan: HarvestPlan, loaded: Loaded, dist: Dist, target: Target) -> Lease:
    """Create the empty store at the build location (rank 0); returns the lease held for the job."""
    grads_meta = ({"encoding": plan.grad_encoding, "target": cfg.grad_target,
                   "definition": GRAD_TARGETS[cfg.grad_target],
                   "reduction": "sum" if cfg.grad_target == "labels" else "own position",
                   "loss": LOSS_OF[cfg.grad_target]}
                  if cfg.grads else None)
    site_meta = {s.name: {"d": loaded.adapter.site_width(s.kind), "encoding": plan.act_encoding} for s in plan.sites}
    lease = target.take_lease()    # before anything is created or cleared: one writer, whatever the timing
    try:
        target.clear_for_build()
        StoreWriter.create(target.build, meta=scrub_tree(_store_meta(cfg, plan, loaded, dist)), sites=site_meta,
                           grads=grads_meta, ctx_len=plan.ctx_len, n_seqs=plan.n_seqs,
                           window_seqs=plan.window_seqs, compressor=cfg.compressor, creation_id=target.creation_id)
    except OSError as e:
        lease.release()
        raise HarvestError(f"cannot create store {scrub(cfg.out)}: {_os_reason(e)}") from None
    except BaseException:
        lease.release()
        raise
    return lease


def _os_reason(e: OSError) -> str:
    return f"{e.strerror} (errno {e.errno})" if e.strerror else (str(e).splitlines()[0] if str(e) else type(e).__name__)


def stop_if_any(dist: Dist, error: BaseException | None, *counts: int) -> list[int]:
    """Sum `counts` and whether each rank failed, over every rank, in one all-reduce; if any rank
    failed, every rank raises: its own error where it had one, else the same one line. Every rank
    must call it at the same point, so no rank waits in a collective for a peer that gave up."""
    sums = dist.all_sum([*counts, 1 if error else 0])
    if sums[-1]:
        raise error or HarvestError("another rank stopped (see its error)")
    return sums[:-1]


@contextlib.contextmanager
def _waiting(waits: dict, key: str):
    """Add the block's wall time to waits[key] (where the harvest loop stood still)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        waits[key] += time.perf_counter() - t


class _SharedLease:
    """What ranks other than 0 check before each record: that the job still holds the lease."""

    def __init__(self, path: str, owner: str):
        self.path, self.owner = path, owner

    def check(self):
        Lease(self.path, self.owner).check()


class _Prepended:
    def __init__(self, first, rest):
        self.first, self.rest = first, rest

    def __iter__(self):
        return self

    def __next__(self):
        if self.first is not None:
            item, self.first = self.first, None
            return item
        return next(self.rest)

    def close(self):
        self.rest.close()


class HarvestLoop:
    """One rank's share of a harvest, in rounds every rank takes together. In round k this rank
    reads and computes window k * world + rank (if it is still to do), hands it to the writer
    thread, and hears whether any rank failed; round 0 also creates (or reopens) the store, once
    every rank's first window has passed its checks."""

    def __init__(self, cfg: HarvestConfig, plan: HarvestPlan, loaded: Loaded, dist: Dist, target: Target,
                 progress: bool, console):
        self.cfg, self.plan, self.loaded, self.dist, self.target = cfg, plan, loaded, dist, target
        self.progress, self.console = progress, console
        self.done: dict[int, dict] = load_records(target.build) if target.resume_attrs is not None else {}
        self.resume_from, self.exhausted = self._resume_point()
        self.stream = self.lease = self.out = None
        self.tokens_run = 0
        # where the loop stood still (rank 0's): tokenization behind, or the store writes behind
        self.waits = {"data_s": 0.0, "writer_s": 0.0}
        self.pool = BufferPool()   # window arrays, reused once written

    def _mine(self) -> range:
        return range(self.dist.rank, self.plan.n_windows, self.dist.world)

    def _resume_point(self) -> tuple[dict | None, bool]:
        """This rank's last recorded window (it writes its windows in order, so its records are a
        prefix of its windows), and whether the corpus ran out there."""
        last = None
        for w in self._mine():
            if w not in self.done:
                break
            last = self.done[w]
        return last, last is not None and last["seqs"] < self.plan.window_size(last["window"])

    def run(self) -> dict | None:
        """Harvest this rank's windows; rank 0 then finishes the store and returns the summary."""
        self.stream = self.dist.agree(self._open_stream)
        # rank 0 holds the lease for the whole job, taken only once every check has passed
        if self.dist.rank == 0 and self.target.resume_attrs is not None:
            self.lease = self.dist.agree(
                lambda: Lease(self.target.build, creation_id=self.target.creation_id).acquire(takeover=True))
        else:
            self.dist.agree(lambda: None)
        t0 = time.perf_counter()
        try:
            self._rounds()
        except BaseException:
            self._abort()
            raise
        self._close_stream()
        elapsed = time.perf_counter() - t0
        self.dist.barrier()          # every rank's windows are recorded
        return self._finish(elapsed) if self.dist.rank == 0 else None

    def _open_stream(self):
        """This rank's stream at its recorded position; the first sequence is taken here so a
        stream that differs from the store's is refused before anything is shown or written."""
        dist, cfg = self.dist, self.cfg
        start = self.resume_from["position"] if self.resume_from else None
        stream = Background(positioned_sequences(rank_stream(self.loaded.ds, dist.rank, dist.world),
                                                 self.loaded.tokenizer, self.plan.ctx_len, cfg.text_column,
                                                 start=start))
        if self.exhausted or all(w in self.done for w in self._mine()):
            return stream
        try:
            first = next(stream)
        except StopIteration:
            if self.resume_from is None:   # nothing harvested yet: refuse rather than write an empty store
                stream.close()
                raise HarvestError(f"dataset {cfg.dataset!r} holds less than one sequence of {cfg.ctx_len} tokens"
                                   + (f" for rank {dist.rank}" if dist.active else "") + "; nothing to harvest")
            return iter(())
        except BaseException:
            stream.close()
            raise
        return _Prepended(first, stream)

    def _rounds(self) -> None:
        plan, dist = self.plan, self.dist
        bar = token_progress(console=self.console, disable=not self.progress)
        with bar:
            task = bar.add_task("harvest", total=plan.n_seqs * plan.ctx_len,
                                completed=sum(r["seqs"] for r in self.done.values()) * plan.ctx_len, info="")
            local = (lambda n: bar.advance(task, n)) if not dist.active else (lambda n: None)
            for k in range(-(-plan.n_windows // dist.world)):
                job, error = self._compute(k * dist.world + dist.rank, local, first=k == 0)
                if k == 0:   # the store exists before anyone writes
                    self._open_writer(error)
                n, error = self._hand_over(job, error)
                del job      # the writer thread holds the window now
                [n] = stop_if_any(dist, error, n)
                self.tokens_run += n
                if dist.active:
                    bar.advance(task, n)
            self._close_writer()

    def _compute(self, w: int, advance, first: bool):
        """(window w computed, or None when it is not this rank's to do; the HarvestError that
        refused it). The stream running out makes a short window and ends this rank's share."""
        plan = self.plan
        if w >= plan.n_windows or w in self.done or self.exhausted:
            return None, None
        want = plan.window_size(w)
        job = error = None
        try:
            with _waiting(self.waits, "data_s"):
                pairs = list(islice(self.stream, want))
            job = compute_window(self.cfg, plan, self.loaded.model, self.loaded.device, w, [p[0] for p in pairs],
                                 [p[1] for p in pairs], advance, self.pool)
            if first:
                # the first window is checked here, before an old store is replaced; later ones on
                # the writer thread, while the device runs the next window
                job.finish()
        except HarvestError as e:
            error = e
        if job is not None and job.n_seqs < want:
            self.exhausted = True
        return job, error

    def _open_writer(self, error: HarvestError | None) -> None:
        """Round 0: rank 0 creates the store (a new harvest) once every rank's first window passed
        its checks, so an old store is replaced only then; every rank then opens its writer."""
        dist, target = self.dist, self.target
        stop_if_any(dist, error)
        if dist.rank == 0 and target.resume_attrs is None:
            try:
                self.lease = _create_store(self.cfg, self.plan, self.loaded, dist, target)
            except (HarvestError, StoreError) as e:
                error = e
        stop_if_any(dist, error)
        if dist.rank == 0:
            self.lease.start_heartbeat()
        owner = dist.broadcast(self.lease.owner if self.lease is not None else None)
        shared = self.lease if dist.rank == 0 else _SharedLease(target.build, owner)
        writer = StoreWriter.open(target.build, rank=dist.rank, world=dist.world, lease=shared)
        self.out = WindowWriter(writer)
        self.out.start()

    def _hand_over(self, job, error):
        """(tokens handed to the writer thread, the error of this rank's round, if any)."""
        n = 0
        if job is not None and error is None and self.out.error is None:
            n = job.n_seqs * self.plan.ctx_len
            with _waiting(self.waits, "writer_s"):
                try:
                    self.out.put(job)      # waits while the previous window is still being written
                except BaseException as e:   # the writer thread failed: every rank hears of it
                    error, n = e, 0
        return n, error or self.out.error    # a window refused or not written on the writer thread

    def _close_writer(self) -> None:
        """The last window is checked and written after the last round: its failure must reach
        every rank before the barrier that follows, or the others would wait there for a dead peer."""
        error = None
        if self.out is not None:
            with _waiting(self.waits, "writer_s"):
                try:
                    self.out.close()
                except BaseException as e:
                    error = e
        stop_if_any(self.dist, error)

    def _abort(self) -> None:
        if self.out is not None:
            self.out.abort()
        if self.lease is not None and self.dist.rank == 0:
            self.lease.release()     # the store stays incomplete; the next --resume needs no takeover
        self._close_stream()

    def _close_stream(self) -> None:
        getattr(self.stream, "close", lambda: None)()

    def _finish(self, elapsed: float) -> dict:
        """Rank 0, every window recorded: size the store, put it in place, report."""
        target = self.target
        attrs = StoreWriter.open(target.build).finish()
        beside = target.build != target.final
        if not beside:
            self.lease.release()
        target.swap(self.lease if beside else None)   # the lease held through the renames
        summary = summarize(target.final, seconds=elapsed, tokens_this_run=self.tokens_run, console=self.console,
                            quiet=not self.progress, waits=self.waits)
        if attrs["n_seqs"] < self.plan.n_seqs and self.progress and self.console is not None:
            self.console.print(f"[yellow]dataset ran out: {attrs['n_rows']:,} of {self.cfg.tokens:,} tokens harvested")
        return summary
