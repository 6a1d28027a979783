"""`harvest run`: stream text through a model and write a shuffled activation store.

One forward pass per batch serves every site (and one backward pass every
gradient). Rows are scattered into a shuffle window at seeded random positions as
they are computed; a full window goes to a writer thread while the model computes
the next, so writes overlap compute and host memory is bounded by two windows.
"""
from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from sae_harvest.stores import StoreError, StoreWriter, fs, layout
from sae_harvest.stores.check import check_root_attrs
from sae_harvest.stores.errors import UserError
from sae_harvest.stores.cli import opt, pick_device
from sae_harvest.stores.progress import token_progress
from sae_harvest.stores.urls import scrub, scrub_tree

from . import __version__
from .data import OPENWEBTEXT, open_dataset, packed_sequences, separator_and_bos
from .default_model import resolve_dataset, resolve_model
from .errors import HarvestError
from .models import get_adapter, load_model, quiet_transformers
from .sites import capture, parse_sites

GRAD_DEFINITION = (
    "grad[t] = d(sum_{s=0}^{T-2} CE_s)/d(act[t]) per sequence, CE_s = -log p(token[s+1] | tokens[:s+1]) "
    "in nats; summed (not averaged) over the sequence's positions, taken w.r.t. the raw site activation "
    "in the harvest dtype; zero at the last position (it predicts nothing)"
)


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
    sites: str = opt("blocks.6.resid_pre", "Comma list / globs of blocks.<L>.<kind>; kinds: resid_pre, resid_mid, "
                                           "resid_post, attn_out, attn_z, mlp_out, mlp_act.")
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
    compressor: str = opt("none", "Chunk compression.", choices=("none", "zstd"))
    trust_remote_code: bool = opt(False, "Allow model code from the hub (off by default).")


# a resumed harvest must agree on everything that shapes the rows and their values
IDENTITY_KEYS = ("model", "revision", "dataset", "split", "text_column", "sites", "grads", "tokens", "ctx_len",
                 "batch_size", "dtype", "seed", "shuffle_window", "act_encoding", "grad_encoding", "compressor")

_MAX = {"float16": 65504.0, "bfloat16": 3.38e38, "float32": 3.4e38}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _to_storage(t: torch.Tensor, encoding: str) -> torch.Tensor:
    """Encode on the device (halves the copy to host for 16-bit encodings)."""
    if encoding == "bfloat16":
        return t.to(torch.bfloat16)
    return t.to(torch.float16 if encoding == "float16" else torch.float32)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).cpu().numpy().view(np.uint16)
    return t.cpu().numpy()


class _WindowWriter(threading.Thread):
    """Writes finished windows in order on a background thread.

    One window is written while the next is computed; handing over a window waits until the
    previous one is on disk, so host memory holds at most two windows.
    """

    def __init__(self, writer: StoreWriter):
        super().__init__(daemon=True)
        self.writer = writer
        self.jobs: queue.Queue = queue.Queue()
        self.free = threading.Semaphore(1)
        self.error: BaseException | None = None

    def run(self):
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_window(**job)
                except BaseException as e:  # surfaced in the main thread
                    self.error = e
            del job
            self.free.release()

    def put(self, job):
        self._check()
        self.free.acquire()
        self._check()
        self.jobs.put(job)

    def close(self):
        self.jobs.put(None)
        self.join()
        self._check()

    def abort(self):
        self.error = self.error or RuntimeError("harvest aborted")
        self.jobs.put(None)

    def _check(self):
        if self.error is not None:
            raise self.error


def _identity(cfg: HarvestConfig) -> dict:
    """What a resume must agree on, as stored: paths and URLs scrubbed of credentials."""
    return scrub_tree({k: getattr(cfg, k) for k in IDENTITY_KEYS})


def _check_out_not_in_corpus(cfg: HarvestConfig) -> None:
    """A store inside a local corpus folder would be read back as corpus (its .json files) next time."""
    import os

    corpus = resolve_dataset(cfg.dataset)
    if fs.is_url(cfg.out) or not os.path.isdir(corpus):
        return
    out, corpus = os.path.realpath(fs._local(cfg.out)), os.path.realpath(corpus)
    if os.path.commonpath([out, corpus]) == corpus:
        raise HarvestError(f"--out {cfg.out} is inside the corpus folder {cfg.dataset}: its files would be read "
                           f"as text next time; write the store elsewhere")


def _open_for_resume(cfg: HarvestConfig) -> StoreWriter:
    try:
        writer = StoreWriter.open(cfg.out)
        check_root_attrs(writer.attrs, cfg.out)
    except UserError:
        raise
    except Exception as e:   # a truncated or hand-edited zarr.json: say so, touch nothing
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise StoreError(f"cannot resume {cfg.out}: its metadata is unreadable ({type(e).__name__}: {msg}); "
                         f"the store is left as it is") from None
    stored = writer.attrs.get("harvest", {})
    differ = [k for k, v in _identity(cfg).items() if stored.get(k) != v]
    if differ:
        now = _identity(cfg)
        shown = ", ".join(f"{k} (store: {stored.get(k)!r}, now: {now[k]!r})" for k in differ)
        raise HarvestError(f"cannot resume {cfg.out}: arguments differ from the harvest that made it: {shown}")
    return writer


def harvest(cfg: HarvestConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
            console=None) -> dict:
    """Run a harvest; returns the summary dict. Raises HarvestError on bad input."""
    for name in ("tokens", "ctx_len", "batch_size", "shuffle_window"):
        if getattr(cfg, name) <= 0:
            raise HarvestError(f"--{name.replace('_', '-')} must be positive (got {getattr(cfg, name)})")
    if cfg.ctx_len < 2:   # one position is BOS alone: nothing predicted, every gradient zero
        raise HarvestError(f"--ctx-len {cfg.ctx_len} is too short: a sequence needs at least 2 tokens")
    _check_out_not_in_corpus(cfg)
    if cfg.dtype not in DTYPES:
        raise HarvestError(f"unknown --dtype {cfg.dtype!r}; use one of {', '.join(DTYPES)}")
    for flag, enc in (("act-encoding", cfg.act_encoding), ("grad-encoding", cfg.grad_encoding)):
        if enc not in ("auto", *layout.ENCODINGS):
            raise HarvestError(f"unknown --{flag} {enc!r}; use one of auto, {', '.join(layout.ENCODINGS)}")
    writer = None
    if fs.anything_at(cfg.out):
        if resume:
            writer = _open_for_resume(cfg)
            if writer.attrs["complete"]:
                return summarize(cfg.out, seconds=0.0, tokens_this_run=0, console=console, quiet=not progress)
        elif not overwrite:
            raise HarvestError(f"{cfg.out} already exists: pass --resume to continue it or --overwrite to replace it")

    # everything that can fail on bad input is checked before the output is touched
    device = pick_device(cfg.device)
    quiet_transformers()
    model, tokenizer = load_model(resolve_model(cfg.model), revision=cfg.revision, device=device,
                                  dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    adapter = get_adapter(model)
    sites = parse_sites(cfg.sites, adapter.n_layers)
    if cfg.ctx_len > adapter.max_positions:
        raise HarvestError(f"--ctx-len {cfg.ctx_len} is longer than the model's context ({adapter.max_positions})")
    ds = open_dataset(resolve_dataset(cfg.dataset), cfg.split, cfg.text_column)
    sep, bos = separator_and_bos(tokenizer)
    if writer is None and next(packed_sequences(ds, tokenizer, cfg.ctx_len, cfg.text_column), None) is None:
        raise HarvestError(f"dataset {cfg.dataset!r} holds less than one sequence of {cfg.ctx_len} tokens; "
                           f"nothing to harvest")
    act_encoding = cfg.act_encoding
    if act_encoding == "auto":  # fp16 overflows on Gemma's residual stream
        act_encoding = "float16" if adapter.family == "gpt2" else "bfloat16"

    ctx = cfg.ctx_len
    n_seqs = -(-cfg.tokens // ctx)
    window_seqs = min(layout.window_seqs_for(cfg.shuffle_window, ctx), n_seqs)
    if writer is None:
        if overwrite:
            fs.remove(cfg.out)
        meta = {
            "model": {"name": scrub(cfg.model), "revision": cfg.revision, "family": adapter.family,
                      "n_layers": adapter.n_layers, "d_model": adapter.d_model},
            "tokenizer": {"name": scrub(cfg.model), "vocab_size": len(tokenizer), "separator_id": sep,
                          "bos_id": bos, "bos_prepended": bos is not None},
            "dataset": {"name": scrub(cfg.dataset), "split": cfg.split, "text_column": cfg.text_column},
            "seed": cfg.seed,
            "harvest": _identity(cfg),
            "tool_version": __version__,
        }
        grads_meta = ({"encoding": cfg.grad_encoding if cfg.grad_encoding != "auto" else "bfloat16",
                       "definition": GRAD_DEFINITION, "reduction": "sum", "loss": "next-token cross-entropy"}
                      if cfg.grads else None)
        site_meta = {s.name: {"d": adapter.site_width(s.kind), "encoding": act_encoding} for s in sites}
        try:
            writer = StoreWriter.create(cfg.out, meta=scrub_tree(meta), sites=site_meta, grads=grads_meta,
                                        ctx_len=ctx, n_seqs=n_seqs, window_seqs=window_seqs,
                                        compressor=cfg.compressor)
        except OSError as e:
            raise HarvestError(f"cannot create store {cfg.out}: {_os_reason(e)}") from None
    try:
        return _harvest_loop(cfg, writer, model, tokenizer, ds, sites, device, progress, console)
    except OSError as e:   # disk full, a file-size limit, a bucket that refuses: windows done are kept
        raise HarvestError(f"cannot write store {cfg.out}: {_os_reason(e)}; the {writer.windows_done} shuffle "
                           f"windows written so far are kept: make room and continue with --resume") from None


def _os_reason(e: OSError) -> str:
    return f"{e.strerror} (errno {e.errno})" if e.strerror else (str(e).splitlines()[0] if str(e) else type(e).__name__)


def _harvest_loop(cfg, writer, model, tokenizer, ds, sites, device, progress, console) -> dict:
    meta = writer.attrs
    ctx, window_seqs = meta["ctx_len"], meta["window_seqs"]
    window_rows = window_seqs * ctx
    n_seqs = meta["n_seqs"]
    n_windows = -(-n_seqs // window_seqs)
    start = writer.windows_done
    site_enc = {s.name: meta["sites"][s.name]["encoding"] for s in sites}
    grad_enc = meta["grads"]["encoding"] if meta.get("grads") else None
    seqs_iter = packed_sequences(ds, tokenizer, ctx, cfg.text_column, skip=start * window_seqs)
    out = _WindowWriter(writer)
    out.start()
    seqs_done = start * window_seqs
    t0 = time.perf_counter()
    bar = token_progress(console=console, disable=not progress)
    try:
        with bar:
            task = bar.add_task("harvest", total=n_seqs * ctx, completed=seqs_done * ctx, info="")
            for window in range(start, n_windows):
                want = min(window_seqs, n_seqs - window * window_seqs)
                seqs = list(islice(seqs_iter, want))
                if not seqs:
                    break
                job = _compute_window(cfg, model, seqs, window, window_seqs, window_rows, sites, site_enc,
                                      grad_enc, device, lambda n: bar.advance(task, n))
                out.put(job)
                seqs_done = window * window_seqs + len(seqs)
                if len(seqs) < want:
                    break
            out.close()
    except BaseException:
        out.abort()
        raise
    elapsed = time.perf_counter() - t0
    truncated = seqs_done < n_seqs
    writer.finish(seqs_done)
    summary = summarize(cfg.out, seconds=elapsed, tokens_this_run=(seqs_done - start * window_seqs) * ctx,
                        console=console, quiet=not progress)
    if truncated and progress and console is not None:
        console.print(f"[yellow]dataset ran out: {seqs_done * ctx:,} of {cfg.tokens:,} tokens harvested")
    return summary


def _compute_window(cfg, model, seqs, window, window_seqs, window_rows, sites, site_enc, grad_enc,
                    device, advance) -> dict:
    ctx = cfg.ctx_len
    n_rows = len(seqs) * ctx
    perm = np.random.default_rng([cfg.seed, window]).permutation(window_rows)
    first_seq = window * window_seqs
    acts = {s.name: None for s in sites}
    grads = {s.name: None for s in sites} if grad_enc else None
    rows_seq = np.empty(window_rows, np.int32)
    rows_pos = np.empty(window_rows, np.int32)
    for b0 in range(0, len(seqs), cfg.batch_size):
        batch = np.stack(seqs[b0:b0 + cfg.batch_size])
        dest = perm[b0 * ctx:(b0 + len(batch)) * ctx]
        ids = torch.from_numpy(batch).to(device=device, dtype=torch.long)
        captured = capture(model, ids, sites, grads=grad_enc is not None, stop_early=grad_enc is None)
        for s in sites:
            _scatter(acts, s.name, captured.acts[s.name], site_enc[s.name], dest, window_rows, "activations")
            if grads is not None:
                _scatter(grads, s.name, captured.grads[s.name], grad_enc, dest, window_rows, "gradients")
        rows_seq[dest] = np.repeat(np.arange(first_seq + b0, first_seq + b0 + len(batch), dtype=np.int32), ctx)
        rows_pos[dest] = np.tile(np.arange(ctx, dtype=np.int32), len(batch))
        advance(len(batch) * ctx)
    if n_rows < window_rows:  # last, short window: keep the filled slots, still in shuffled order
        keep = np.sort(perm[:n_rows])
        acts = {k: v[keep] for k, v in acts.items()}
        grads = {k: v[keep] for k, v in grads.items()} if grads is not None else None
        rows_seq, rows_pos = rows_seq[keep], rows_pos[keep]
    return {"window": window, "tokens": np.stack(seqs), "rows_seq": rows_seq, "rows_pos": rows_pos,
            "acts": acts, "grads": grads}


def _scatter(buffers, name, values, encoding, dest, window_rows, what):
    values = values.reshape(-1, values.shape[-1])
    # one reduction catches NaN/inf from the model and values the encoding would turn into inf
    peak = float(values.detach().abs().amax())
    if not math.isfinite(peak) or peak > _MAX[encoding]:
        raise HarvestError(
            f"non-finite {what} at {name} (in {encoding}): the model overflowed or the encoding can't hold "
            f"the values; use --dtype float32/bfloat16 and --act-encoding bfloat16/float32")
    array = _to_numpy(_to_storage(values, encoding))
    if buffers[name] is None:
        buffers[name] = np.empty((window_rows, array.shape[1]), array.dtype)
    buffers[name][dest] = array


def summarize(path: str, *, seconds: float, tokens_this_run: int, console=None, quiet=False) -> dict:
    from sae_harvest.stores import open_store

    store = open_store(path)
    size = fs.du(path)
    summary = {
        "store": scrub(path), "rows": store.n_rows, "seqs": store.n_seqs, "ctx_len": store.ctx_len,
        "sites": store.sites, "grads": store.has_grads, "bytes": size,
        "bytes_per_token": size / max(store.n_rows, 1), "seconds": seconds,
        "tokens_per_s": tokens_this_run / seconds if seconds > 0 else None,
    }
    if not quiet and console is not None:
        from rich.table import Table

        table = Table(title=f"store {scrub(path)}", show_header=False)
        table.add_row("rows (tokens)", f"{store.n_rows:,} in {store.n_seqs:,} sequences of {store.ctx_len}")
        table.add_row("sites", ", ".join(f"{s} (d={store.width(s)})" for s in store.sites))
        table.add_row("gradients", "yes" if store.has_grads else "no")
        table.add_row("on disk", f"{size / 2**20:,.1f} MiB ({summary['bytes_per_token']:,.0f} bytes/token)")
        if summary["tokens_per_s"]:
            table.add_row("speed", f"{summary['tokens_per_s']:,.0f} tokens/s over {seconds:,.1f} s")
        console.print(table)
    return summary
