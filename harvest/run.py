"""`harvest run`: stream text through a model and write a shuffled activation store.

One forward pass per batch serves every site (and one backward pass every
gradient). Rows are scattered into a shuffle window at seeded random positions as
they are computed; a full window goes to a writer thread while the model computes
the next, so writes overlap compute and host memory is bounded by two windows.

Under torchrun every rank runs this: window w belongs to rank w % world, each rank
reads its own share of the documents, rank 0 creates and finishes the store.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from itertools import islice

import torch

from sae_harvest.stores import StoreError, StoreWriter, fs, layout
from sae_harvest.stores.cli import opt, pick_device
from sae_harvest.stores.dist import Dist
from sae_harvest.stores.lease import Lease
from sae_harvest.stores.progress import token_progress
from sae_harvest.stores.split import split_attrs
from sae_harvest.stores.urls import scrub, scrub_tree

from . import __version__
from .data import (OPENWEBTEXT, Background, open_dataset, positioned_sequences, rank_stream, separator_and_bos,
                   stream_fingerprint)
from .default_model import resolve_dataset, resolve_model
from .errors import HarvestError
from .fingerprint import agree_across_ranks, check_resumable, provenance
from .models import KINDS, get_adapter, load_model, quiet_transformers
from .outpath import Target, plan_target
from .preflight import resolve_sites
from .grad_targets import GRAD_TARGETS, LOSS_OF, target_of
from .sites import parse_sites
from .window import BufferPool, WindowWriter, compute_window

@dataclass(frozen=True)
class HarvestConfig:
    """Everything that shapes a harvest; `harvest run`'s options are generated from these fields."""
    out: str = opt(dataclasses.MISSING, "Store path or fsspec URL (s3://bucket/x.zarr, gs://..., file://...).")
    model: str = opt("gpt2", "HF model id or local directory (GPT-2, Gemma 1/2/3); 'stdlib-gpt2' = the "
                             "offline default.")
    revision: str | None = opt(None, "Model revision (branch, tag or commit).")
    dataset: str = opt(OPENWEBTEXT, "HF dataset id (streamed), a local jsonl/parquet/txt file or folder, or a "
                                    "saved dataset; 'stdlib-py' = the offline default corpus.")
    split: str = opt("train", "Dataset split.")
    text_column: str = opt("text", "Column holding the text.")
    sites: str | None = opt(None, "Comma list / globs of blocks.<L>.<kind>; kinds: "
                                  f"{', '.join(KINDS)} (docs/sites.md). Default: blocks.<n_layers//2>."
                                  "resid_pre of the given model (gpt2: blocks.6.resid_pre, stdlib-gpt2: "
                                  "blocks.2.resid_pre). Checked against the model's config before any weights load.")
    grads: bool = opt(False, "Also store d(summed next-token CE)/d(activation) per token.", flag="--grads/--no-grads")
    tokens: int = opt(1_000_000, "Tokens to harvest.")
    ctx_len: int = opt(128, "Tokens per sequence.")
    batch_size: int = opt(16, "Sequences per forward pass.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    dtype: str = opt("float32", "Model compute dtype.", choices=("float32", "bfloat16", "float16"))
    seed: int = opt(0, "Seeds the row shuffle.")
    shuffle_window: int = opt(1 << 20, "Tokens shuffled together (bounds host memory: ~2 windows of rows are held).")
    act_encoding: str = opt("auto", "auto: float16 for GPT-2, bfloat16 for Gemma (fp16 overflows there).",
                            choices=("auto", "float16", "bfloat16", "float32"))
    grad_encoding: str = opt("bfloat16", "Encoding of the stored gradients.", choices=("bfloat16", "float32"))
    compressor: str = opt("none", "Chunk compression (standard Zarr v3 codecs; zstd = level 3; blosc with byte "
                                  "shuffle; docs/store-format.md).",
                          choices=("none", "zstd", "zstd-1", "blosc-zstd", "blosc-lz4"))
    trust_remote_code: bool = opt(False, "Allow model code from the hub (off by default).")
    grad_target: str = opt("labels", "With --grads, the gradient of: labels = the summed next-token CE (gradient "
                                     "paper); model-top1 = each position's CE against the model's own top "
                                     "prediction (label-free, causal; several times slower).",
                           choices=tuple(GRAD_TARGETS))
    eval_every: int = opt(20, "Hold out every N-th sequence (seq % N == 0) for evaluation: trainers skip it, "
                              "evaluations use only it (recorded in the store; docs/store-format.md).")


# a resumed harvest must agree on everything that shapes the rows and their values
IDENTITY_KEYS = ("model", "revision", "dataset", "split", "text_column", "sites", "grads", "tokens", "ctx_len",
                 "batch_size", "dtype", "seed", "shuffle_window", "act_encoding", "grad_encoding", "compressor")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _identity(cfg: HarvestConfig) -> dict:
    """What a resume must agree on, as stored: paths and URLs scrubbed of credentials."""
    return scrub_tree({k: getattr(cfg, k) for k in IDENTITY_KEYS})


def _check_out_not_in_corpus(cfg: HarvestConfig) -> None:
    """A store inside a local corpus folder would be read back as corpus (its .json files) next time."""
    corpus = resolve_dataset(cfg.dataset)
    if fs.is_url(cfg.out) or not os.path.isdir(corpus):
        return
    out, corpus = os.path.realpath(fs._local(cfg.out)), os.path.realpath(corpus)
    if os.path.commonpath([out, corpus]) == corpus:
        raise HarvestError(f"--out {cfg.out} is inside the corpus folder {cfg.dataset}: its files would be read "
                           f"as text next time; write the store elsewhere")


def _check_config(cfg: HarvestConfig) -> None:
    for name in ("tokens", "ctx_len", "batch_size", "shuffle_window"):
        if getattr(cfg, name) <= 0:
            raise HarvestError(f"--{name.replace('_', '-')} must be positive (got {getattr(cfg, name)})")
    if cfg.ctx_len < 2:   # one position is BOS alone: nothing predicted, every gradient zero
        raise HarvestError(f"--ctx-len {cfg.ctx_len} is too short: a sequence needs at least 2 tokens")
    _check_out_not_in_corpus(cfg)
    split_attrs(cfg.eval_every)   # a bad --eval-every is refused before anything is loaded
    if cfg.grad_target not in GRAD_TARGETS:
        raise HarvestError(f"unknown --grad-target {cfg.grad_target!r}; use one of {', '.join(GRAD_TARGETS)}")
    if cfg.dtype not in DTYPES:
        raise HarvestError(f"unknown --dtype {cfg.dtype!r}; use one of {', '.join(DTYPES)}")
    for flag, enc in (("act-encoding", cfg.act_encoding), ("grad-encoding", cfg.grad_encoding)):
        if enc not in ("auto", *layout.ENCODINGS):
            raise HarvestError(f"unknown --{flag} {enc!r}; use one of auto, {', '.join(layout.ENCODINGS)}")


def harvest(cfg: HarvestConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
            console=None) -> dict | None:
    """Run a harvest; returns the summary dict (None on ranks other than 0). Raises HarvestError
    (or StoreError) on bad input, before anything at --out is changed."""
    dist = Dist.from_env(cfg.device)
    try:
        def checked():
            _check_config(cfg)
            return resolve_sites(cfg)   # the model's config only: before the model is built, downloaded or loaded
        cfg = dist.agree(checked)   # a rank with a bad option stops every rank, not only itself
        return _harvest(cfg, dist, resume, overwrite, progress and dist.rank == 0, console)
    finally:
        dist.close()


def _harvest(cfg, dist: Dist, resume, overwrite, progress, console):
    # under torchrun every rank runs the same harvest, or none starts (a rank launched with another
    # --model or --dtype would otherwise add its rows to the store that names rank 0's)
    agree_across_ranks(dist, "harvest arguments", {**scrub_tree(dataclasses.asdict(cfg)), "resume": resume,
                                                   "overwrite": overwrite})
    # everything that can fail on bad input is checked before the output is touched
    target: Target = dist.agree(lambda: plan_target(cfg.out, resume=resume, overwrite=overwrite))

    def load():
        device = pick_device(dist.device_name(cfg.device))
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
            check_resumable(cfg.out, target.resume_attrs, _identity(cfg), dist.world, fingerprint, made_by)
            stored_target = target_of(target.resume_attrs.get("grads"))
            if cfg.grads and stored_target != cfg.grad_target:
                raise HarvestError(f"cannot resume {scrub(cfg.out)}: its gradients are of --grad-target "
                                   f"{stored_target}, not {cfg.grad_target}")
            stored_split = (target.resume_attrs.get("split") or {}).get("every")
            if stored_split is not None and stored_split != cfg.eval_every:
                raise HarvestError(f"cannot resume {scrub(cfg.out)}: it holds out every {stored_split}th sequence, "
                                   f"not every {cfg.eval_every}th (--eval-every {stored_split} resumes it)")
        return device, model, tokenizer, adapter, sites, ds, fingerprint, made_by

    device, model, tokenizer, adapter, sites, ds, fingerprint, made_by = dist.agree(load)
    # the same arguments can still name other files on another node (a relative or node-local path)
    agree_across_ranks(dist, "model, tokenizer and corpus", {k: v["digest"] for k, v in made_by.items()})
    if target.complete:   # nothing to harvest; a store complete beside --out is swapped in (a kill before)
        if dist.rank != 0:
            return None
        target.swap(Lease(target.build, creation_id=target.creation_id).acquire(takeover=True)
                    if target.build != target.final else None)
        return summarize(target.final, seconds=0.0, tokens_this_run=0, console=console, quiet=not progress)
    sep, bos = separator_and_bos(tokenizer)
    act_encoding = cfg.act_encoding
    if act_encoding == "auto":  # fp16 overflows on Gemma's residual stream
        act_encoding = "float16" if adapter.family == "gpt2" else "bfloat16"
    ctx = cfg.ctx_len
    n_seqs = -(-cfg.tokens // ctx)
    window_seqs = min(layout.window_seqs_for(cfg.shuffle_window, ctx), n_seqs)
    # rank 0 holds the lease for the whole job; the other ranks learn its owner id

    def create_store():
        meta = {
            "model": {"name": scrub(cfg.model), "revision": cfg.revision, "family": adapter.family,
                      "n_layers": adapter.n_layers, "d_model": adapter.d_model},
            "tokenizer": {"name": scrub(cfg.model), "vocab_size": len(tokenizer), "separator_id": sep,
                          "bos_id": bos, "bos_prepended": bos is not None},
            "dataset": {"name": scrub(cfg.dataset), "split": cfg.split, "text_column": cfg.text_column},
            "stream": {"fingerprint": fingerprint, "split": "split_dataset_by_node" if dist.active else "none"},
            "seed": cfg.seed,
            "world_size": dist.world,
            "nodes": dist.nodes,
            "harvest": _identity(cfg),
            "provenance": made_by,
            "tool_version": __version__,
            "split": split_attrs(cfg.eval_every),   # the held-out sequences (stores/split.py)
        }
        grads_meta = ({"encoding": cfg.grad_encoding if cfg.grad_encoding != "auto" else "bfloat16",
                       "target": cfg.grad_target, "definition": GRAD_TARGETS[cfg.grad_target],
                       "reduction": "sum" if cfg.grad_target == "labels" else "own position",
                       "loss": LOSS_OF[cfg.grad_target]}
                      if cfg.grads else None)
        site_meta = {s.name: {"d": adapter.site_width(s.kind), "encoding": act_encoding} for s in sites}
        lease = target.take_lease()    # before anything is created or cleared: one writer, whatever the timing
        try:
            target.clear_for_build()
            StoreWriter.create(target.build, meta=scrub_tree(meta), sites=site_meta, grads=grads_meta,
                               ctx_len=ctx, n_seqs=n_seqs, window_seqs=window_seqs, compressor=cfg.compressor,
                               creation_id=target.creation_id)
        except OSError as e:
            lease.release()
            raise HarvestError(f"cannot create store {scrub(cfg.out)}: {_os_reason(e)}") from None
        except BaseException:
            lease.release()
            raise
        return lease

    site_enc = {s.name: act_encoding for s in sites}
    grad_enc = (cfg.grad_encoding if cfg.grad_encoding != "auto" else "bfloat16") if cfg.grads else None
    try:
        return _harvest_loop(cfg, dist, target, create_store, model, tokenizer, ds, sites, site_enc,
                             grad_enc, device, progress, console)
    except OSError as e:   # disk full, a file-size limit, a bucket that refuses: recorded windows are kept
        raise HarvestError(f"cannot write store {scrub(cfg.out)}: {_os_reason(e)}; the windows recorded so far "
                           f"are kept: make room and continue with --resume") from None


def _os_reason(e: OSError) -> str:
    return f"{e.strerror} (errno {e.errno})" if e.strerror else (str(e).splitlines()[0] if str(e) else type(e).__name__)


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


def _harvest_loop(cfg, dist, target, create_store, model, tokenizer, ds, sites, site_enc, grad_enc,
                  device, progress, console):
    ctx = cfg.ctx_len
    n_seqs = -(-cfg.tokens // ctx)
    window_seqs = min(layout.window_seqs_for(cfg.shuffle_window, ctx), n_seqs)
    n_windows = -(-n_seqs // window_seqs)
    done: dict[int, dict] = {}
    if target.resume_attrs is not None:
        from sae_harvest.stores.writer import load_records
        done = load_records(target.build)
    mine = [w for w in range(dist.rank, n_windows, dist.world)]
    # this rank writes its windows in order, so its records are a prefix of `mine`
    resume_from = None
    for w in mine:
        if w not in done:
            break
        resume_from = done[w]
    exhausted = resume_from is not None and resume_from["seqs"] < min(window_seqs, n_seqs - resume_from["window"] * window_seqs)
    todo = [w for w in mine if w not in done] and not exhausted

    def open_stream():
        """This rank's stream at its recorded position; the first sequence is taken here so a
        stream that differs from the store's is refused before anything is shown or written."""
        stream = Background(positioned_sequences(rank_stream(ds, dist.rank, dist.world), tokenizer, ctx,
                                             cfg.text_column, start=resume_from["position"] if resume_from else None))
        if not todo:
            return stream
        try:
            first = next(stream)
        except StopIteration:
            if resume_from is None:   # nothing harvested yet: refuse rather than write an empty store
                stream.close()
                raise HarvestError(f"dataset {cfg.dataset!r} holds less than one sequence of {ctx} tokens"
                                   + (f" for rank {dist.rank}" if dist.active else "") + "; nothing to harvest")
            return iter(())
        except BaseException:
            stream.close()
            raise
        return _Prepended(first, stream)

    stream = dist.agree(open_stream)
    # rank 0 holds the lease for the whole job, taken only once every check has passed
    lease = None
    if dist.rank == 0 and target.resume_attrs is not None:
        lease = dist.agree(lambda: Lease(target.build, creation_id=target.creation_id).acquire(takeover=True))
    else:
        dist.agree(lambda: None)
    writer = out = None
    t0 = time.perf_counter()
    tokens_run = 0
    # where the loop stood still (rank 0's): tokenization behind, or the store writes behind
    waits = {"data_s": 0.0, "writer_s": 0.0}
    pool = BufferPool()   # window arrays, reused once written
    bar = token_progress(console=console, disable=not progress)
    rounds = -(-n_windows // dist.world)
    try:
        with bar:
            task = bar.add_task("harvest", total=n_seqs * ctx,
                                completed=sum(r["seqs"] for r in done.values()) * ctx, info="")
            local = (lambda n: bar.advance(task, n)) if not dist.active else (lambda n: None)
            for k in range(rounds):
                w = k * dist.world + dist.rank
                job, error = None, None
                if w < n_windows and w not in done and not exhausted:
                    want = min(window_seqs, n_seqs - w * window_seqs)
                    try:
                        with _waiting(waits, "data_s"):
                            pairs = list(islice(stream, want))
                        job = compute_window(cfg, model, [p[0] for p in pairs], [p[1] for p in pairs], w,
                                             window_seqs, sites, site_enc, grad_enc, device, local, pool)
                        if writer is None:
                            # the first window is checked here, before an old store is replaced; later
                            # ones on the writer thread, while the device runs the next window
                            job.finish()
                    except HarvestError as e:
                        error = e
                    if job is not None and job.n_seqs < want:
                        exhausted = True
                if writer is None:   # first round: the store exists before anyone writes
                    # every rank's first window has passed its checks before rank 0 replaces an old store
                    if dist.all_sum([1 if error else 0])[0]:
                        raise error or HarvestError("another rank stopped (see its error)")
                    if dist.rank == 0 and target.resume_attrs is None:
                        try:
                            lease = create_store()
                        except (HarvestError, StoreError) as e:
                            error = e
                    failed = dist.all_sum([1 if error else 0])[0]
                    if failed:
                        raise error or HarvestError("another rank stopped (see its error)")
                    if dist.rank == 0:
                        lease.start_heartbeat()
                    owner = dist.broadcast(lease.owner if lease is not None else None)
                    shared = lease if dist.rank == 0 else _SharedLease(target.build, owner)
                    writer = StoreWriter.open(target.build, rank=dist.rank, world=dist.world, lease=shared)
                    out = WindowWriter(writer)
                    out.start()
                n = 0
                if job is not None and error is None and out.error is None:
                    n = job.n_seqs * ctx
                    with _waiting(waits, "writer_s"):
                        try:
                            out.put(job)      # waits while the previous window is still being written
                        except BaseException as e:   # the writer thread failed: every rank hears of it below
                            error, n = e, 0
                    job = None
                error = error or out.error    # a window refused or not written on the writer thread
                counts = dist.all_sum([n, 1 if error else 0])
                if counts[1]:
                    raise error or HarvestError("another rank stopped (see its error)")
                tokens_run += counts[0]
                if dist.active:
                    bar.advance(task, counts[0])
            # the last window is checked and written after the last round: its failure must reach
            # every rank before the barrier below, or the others would wait there for a dead peer
            error = None
            if out is not None:
                with _waiting(waits, "writer_s"):
                    try:
                        out.close()
                    except BaseException as e:
                        error = e
            if dist.all_sum([1 if error else 0])[0]:
                raise error or HarvestError("another rank stopped (see its error)")
    except BaseException:
        if out is not None:
            out.abort()
        if lease is not None and dist.rank == 0:
            lease.release()     # the store stays incomplete; the next --resume needs no takeover
        getattr(stream, "close", lambda: None)()
        raise
    getattr(stream, "close", lambda: None)()
    elapsed = time.perf_counter() - t0
    dist.barrier()          # every rank's windows are recorded
    if dist.rank != 0:
        return None
    attrs = StoreWriter.open(target.build).finish()
    if target.build == target.final:
        lease.release()
    target.swap(lease if target.build != target.final else None)   # the lease held through the renames
    summary = summarize(target.final, seconds=elapsed, tokens_this_run=tokens_run, console=console,
                        quiet=not progress, waits=waits)
    if attrs["n_seqs"] < n_seqs and progress and console is not None:
        console.print(f"[yellow]dataset ran out: {attrs['n_rows']:,} of {cfg.tokens:,} tokens harvested")
    return summary


def summarize(path: str, *, seconds: float, tokens_this_run: int, console=None, quiet=False,
              waits: dict | None = None) -> dict:
    from sae_harvest.stores import open_store

    store = open_store(path)
    size = fs.du(path)
    summary = {
        "store": scrub(path), "rows": store.n_rows, "seqs": store.n_seqs, "ctx_len": store.ctx_len,
        "sites": store.sites, "grads": store.has_grads, "bytes": size,
        "bytes_per_token": size / max(store.n_rows, 1), "seconds": seconds,
        "split": {**store.split.to_attrs(), "held_out_seqs": store.split.n_held_out(store.n_seqs)},
        "tokens_per_s": tokens_this_run / seconds if seconds > 0 else None,
        "waited": waits or {},
    }
    if not quiet and console is not None:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(f"store {scrub(path)}"), show_header=False)   # a path is text, not markup
        table.add_row("rows (tokens)", f"{store.n_rows:,} in {store.n_seqs:,} sequences of {store.ctx_len}")
        table.add_row("sites", ", ".join(f"{s} (d={store.width(s)})" for s in store.sites))
        table.add_row("gradients", "yes" if store.has_grads else "no")
        table.add_row("held out", store.split.describe(store.n_seqs, store.ctx_len))
        table.add_row("on disk", f"{size / 2**20:,.1f} MiB ({summary['bytes_per_token']:,.0f} bytes/token)")
        if summary["tokens_per_s"]:
            table.add_row("speed", f"{summary['tokens_per_s']:,.0f} tokens/s over {seconds:,.1f} s")
        if waits:
            table.add_row("stood waiting", f"{waits['data_s']:,.1f} s for text, {waits['writer_s']:,.1f} s for the "
                                           f"store writes")
        console.print(table)
    return summary
