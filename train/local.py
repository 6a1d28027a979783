"""Local training: SAEs that reconstruct the site's stored activations (`train fit --loss local`).

Practice of the public trainers: inputs divided by one constant (E||x|| = sqrt(d)) and the
constant folded back into the saved weights; b_dec at the geometric median; unit-norm decoder
rows with the parallel gradient removed; warmup + cosine decay; grad-norm clipping; dead-latent
tracking feeding AuxK. Every SAE of a sweep trains on the same batches, read once.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sae_harvest.stores import open_store
from sae_harvest.stores.urls import scrub
from sae_harvest.train import distributed
from sae_harvest.train.batchtopk import THRESHOLD_ROWS
from sae_harvest.train.config import TrainConfig, sweep
from sae_harvest.train.driver import Driver
from sae_harvest.train.errors import TrainError
from sae_harvest.train.feeds import Batch, StoreFeed, TensorFeed, held_out_origin, sample_rows, train_tokens
from sae_harvest.train import held_out
from sae_harvest.train.held_out import held_out_reconstruction
from sae_harvest.train.registry import ARCHITECTURES
from sae_harvest.train.runs import Run, build_runs, input_scale, optimizer_step, save_run
from sae_harvest.train.sae import unit_rows
from sae_harvest.train.sae_io import load_sae
from sae_harvest.train.stacked import StackedRuns, stack_groups


class Source:
    """The data side of a fit: feed, widths, normalisation, held-out rows, provenance. Two kinds:
    StoreSource (a store's rows at one site) and DecoderSource (another SAE's decoder rows, for a
    meta-SAE); open_source picks by the config."""
    store = None                     # the store it reads, if any (the driver's identity checks)
    identity: dict | None = None     # a meta-SAE's parent decoder fingerprint (the driver's resume check)
    site: str | None = None
    report_rows: int | None = None   # the held-out report's cap (held_out.capped); None: every row
    d_in: int
    grads: bool
    sample: torch.Tensor             # rows for the input scale and the b_dec init
    grad_sample: torch.Tensor | None
    epoch_tokens: int                # training rows in one pass
    provenance: dict

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.warnings: list[str] = []   # one line each, printed before training starts

    def feed(self, batch_size: int, state: dict | None, part=(0, 1), pin=False):
        """The training feed (train/feeds.py), resumed at `state`; `part`: this rank's share."""
        raise NotImplementedError

    def threshold_rows(self, n_rows: int, chunk: int = 8192):
        """Up to n_rows raw training rows in chunks: what sae.finalize() estimates batch-independent
        quantities (BatchTopK's threshold) from. Lazy: nothing is read unless finalize() asks."""
        raise NotImplementedError

    def held_out(self, batch_size: int):
        """(x, g or None) batches, raw, of the rows the final report scores."""
        raise NotImplementedError

    def origin(self, tokens: int) -> dict | None:
        """Where the report's rows came from (train.feeds.held_out_origin); None: not held out."""
        return None


class StoreSource(Source):
    """A store's rows at one site: training reads its training sequences, the report its held-out ones."""

    @property
    def report_rows(self) -> int:
        return held_out.HELD_OUT_REPORT_ROWS

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        if not cfg.store:
            raise TrainError("give --store (or --decoder-of for a meta-SAE)")
        store = open_store(cfg.store)
        sites = store.sites
        site = cfg.site
        if site is None:
            if len(sites) > 1:
                raise TrainError(f"store has several sites; pick one with --site: {', '.join(sites)}")
            site = sites[0]
        elif site not in sites:
            raise TrainError(f"site {site!r} is not in store {cfg.store}; it has: {', '.join(sites)}")
        self.grads = ARCHITECTURES[cfg.arch].uses_grads
        if self.grads and not store.has_grads:
            raise TrainError(f"--arch gtopk needs gradients, and store {cfg.store} has none (harvest with --grads)")
        self.store, self.site, self.d_in = store, site, store.width(site)
        self.exclude_pos0 = not cfg.include_bos
        # the store's held-out sequences (stores/split.py) are skipped by every read below but held_out()
        self.epoch_tokens = train_tokens(store, self.exclude_pos0)
        if self.epoch_tokens <= 0:
            raise TrainError(f"store {cfg.store} has no training sequences outside its held-out split "
                             f"({store.split.describe(store.n_seqs, store.ctx_len)})")
        sample = sample_rows(store, site, 8192, cfg.seed, self.exclude_pos0, grads=self.grads)
        self.sample = torch.from_numpy(sample[0])
        self.grad_sample = torch.from_numpy(sample[1]) if self.grads else None
        attrs = store.attrs
        self.provenance = {"store": scrub(cfg.store), "model_name": (attrs.get("model") or {}).get("name"),
                           # the harvest's fingerprint of it: evaluations refuse another model's rows
                           "model_digest": ((attrs.get("provenance") or {}).get("model") or {}).get("digest"),
                           "hook_name": site,
                           "hook_layer": int(site.split(".")[1]) if site.startswith("blocks.") else None,
                           "context_size": store.ctx_len,
                           "prepend_bos": bool(attrs.get("tokenizer", {}).get("bos_prepended", False)),
                           "dataset_path": attrs.get("dataset", {}).get("name"),
                           # the split trained outside, and of which store: evaluate checks both
                           "held_out": {**store.split.to_attrs(), "creation_id": attrs.get("creation_id")},
                           # what the store's gradients are of (g-SAEs; harvest/grad_targets.py)
                           "grad_target": (attrs.get("grads") or {}).get("target", "labels") if self.grads else None}

    def feed(self, batch_size: int, state: dict | None, part=(0, 1), pin=False):
        return StoreFeed(self.store, self.site, batch_size, seed=self.cfg.seed,
                         grads=self.grads, exclude_pos0=self.exclude_pos0, state=state, part=part, pin=pin)

    def threshold_rows(self, n_rows: int, chunk: int = 8192):
        """One seeded pass over whole blocks of the training sequences."""
        it = self.store.batches(self.site, chunk, seqs="train", seed=self.cfg.seed + 1,
                                exclude_pos0=self.exclude_pos0, epochs=1, drop_last=False)
        for batch in it:
            x = torch.from_numpy(batch["acts"][self.site])[:n_rows]
            n_rows -= len(x)
            yield x
            if n_rows <= 0:
                return

    def held_out(self, batch_size: int):
        """The rows of the store's held-out sequences, whole blocks in a seeded order; lazy, so the
        report's cap (report_rows) stops the reads."""
        it = self.store.batches(self.site, batch_size, seqs="held_out", grads=self.grads,
                                exclude_pos0=self.exclude_pos0, epochs=1, drop_last=False)
        for batch in it:
            g = torch.from_numpy(batch["grads"][self.site]) if self.grads else None
            yield torch.from_numpy(batch["acts"][self.site]), g

    def origin(self, tokens: int) -> dict:
        return held_out_origin(self.store, tokens=tokens)


class DecoderSource(Source):
    """Another SAE's unit decoder rows (a meta-SAE): trained on and reported on, all of them."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        parent = load_sae(cfg.decoder_of)
        # a saved SAE has its input scale folded into W_dec; meta-SAEs see directions only
        self.data = unit_rows(parent.W_dec)
        self.sample, self.d_in, self.grads = self.data, self.data.shape[1], False
        self.grad_sample = None
        self.epoch_tokens = len(self.data)
        # which decoder exactly: a resume refuses a parent retrained or overwritten since (the path is
        # the same), and cfg.json records it so the meta-SAE can be matched to its parent later
        self.identity = decoder_identity(parent.W_dec)
        self.provenance = {"decoder_of": scrub(cfg.decoder_of), "hook_name": f"meta:{scrub(cfg.decoder_of)}",
                           "decoder_of_identity": self.identity}

    def feed(self, batch_size: int, state: dict | None, part=(0, 1), pin=False):
        return TensorFeed(self.data, batch_size, seed=self.cfg.seed, state=state, part=part)

    def threshold_rows(self, n_rows: int, chunk: int = 8192):
        yield from self.data[:n_rows].split(chunk)

    def held_out(self, batch_size: int):
        for i in range(0, len(self.data), batch_size):
            yield self.data[i:i + batch_size], None


def decoder_identity(w_dec: torch.Tensor) -> dict:
    """A meta-SAE parent's fingerprint: sha256 of its decoder weights as saved (float32, row-major),
    with their shape."""
    import hashlib

    w = w_dec.detach().cpu().float().contiguous()
    return {"decoder_sha256": hashlib.sha256(w.numpy().tobytes()).hexdigest(), "shape": list(w.shape)}


def open_source(cfg: TrainConfig) -> Source:
    """The source a config names: --decoder-of's decoder rows, else --store's rows."""
    return DecoderSource(cfg) if cfg.decoder_of else StoreSource(cfg)


def fit_local(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
              console=None, device=None, on_step=None, world=distributed.World()) -> dict:
    """Train every SAE of the sweep on stored activations (or decoder rows); {name: summary}
    (under torchrun, rank 0 returns it and the other ranks {})."""
    out = Path(cfg.out)
    source = open_source(cfg)
    scale = input_scale(source.sample, cfg.normalize and not cfg.decoder_of)
    tokens = cfg.tokens or source.epoch_tokens * (cfg.epochs or 1)
    batch = min(cfg.batch_size, source.epoch_tokens)
    if batch % world.size and not world.sweep_parallel:
        raise TrainError(f"the global batch of {batch} rows does not divide over {world.size} ranks")
    total_steps = max(1, tokens // batch)
    dead_after = max(batch, min(cfg.dead_tokens, tokens // 4))
    order = [name for name, _ in sweep(cfg, source.d_in)]
    runs = build_runs(cfg, source.d_in, source.sample, source.grad_sample, device, scale, world,
                      site=source.provenance["hook_name"])

    label = f"train (rank {world.rank}: {len(runs)} of {len(order)} SAEs)" if world.sweep_parallel else "train"
    try:
        groups = stack_groups(cfg.stack_sweep, runs, device, refuse=not world.sweep_parallel)
    except ValueError as e:
        raise TrainError(str(e)) from None
    driver = Driver(cfg, out, runs, scale=scale, total_steps=total_steps, tokens_per_step=batch, label=label,
                    world=world, store=source.store, parent=source.identity)
    feed_state = driver.prepare(resume, overwrite, device)
    if world.main:   # after every check of the input: bad input stays one error line
        for line in source.warnings + short_run_warnings(cfg, source.epoch_tokens, batch, total_steps):
            warn(line, console)
    stacks = [StackedRuns([runs[n] for n in names]) for names in groups]   # after prepare: from the resumed runs
    loose = [run for name, run in runs.items() if not any(name in names for names in groups)]
    scale = driver.scale
    # sweep parallel: every rank reads every whole batch, as one process would
    part = (0, 1) if world.sweep_parallel else (world.rank, world.size)
    feed = source.feed(batch, feed_state, part=part, pin=device.type == "cuda")
    autocast = cfg.autocast == "on" or (cfg.autocast == "auto" and device.type == "cuda")

    def prepare(batch: Batch):
        # the feed ships the stored 16-bit values; widen to float32 on the device
        x = batch.acts.to(device, non_blocking=True).float() / scale
        g = batch.grads.to(device, non_blocking=True).float() * scale if batch.grads is not None else None
        return x, g

    def step_fn(inputs, factor, log_now, reducer):
        x, g = inputs
        for stack in stacks:
            stack.step(x, factor, cfg.grad_clip, dead_after, autocast, log_now, reducer)
        for run in loose:
            _step(run, x, g, factor, cfg, dead_after, autocast, log_now, reducer=reducer)

    driver.run(feed, prepare, step_fn, lambda: _info(runs), progress=progress, console=console,
               on_step=on_step)
    if not driver.writes:   # data parallel: rank 0 finalises, evaluates and saves (same weights everywhere)
        return {}
    summaries = {name: _finish(run, source, out / name, cfg, scale, device, driver)
                 for name, run in runs.items()}
    driver.finish()
    summaries = driver.gather(summaries, order)
    if progress and console is not None:
        _print_summary(console, summaries, meta=bool(cfg.decoder_of))
    return summaries


# Fewer optimizer steps than this and an SAE has barely left its initialisation (dead latents are not
# even detected yet at the default --dead-tokens): its numbers describe the init, not the data.
MIN_STEPS = 200


def short_run_warnings(cfg: TrainConfig, epoch_tokens: int, batch: int, total_steps: int) -> list[str]:
    """One line per reason this run is too short to mean much (empty when it is not)."""
    per_pass = epoch_tokens // batch
    if cfg.decoder_of:   # a meta-SAE trains many passes over a few rows by design: count the run
        if total_steps < MIN_STEPS:
            return [f"the run is {_steps(total_steps)} (< {MIN_STEPS}): raise --epochs"]
        return []
    if per_pass < MIN_STEPS:
        return [f"one pass over the store is {_steps(per_pass)} of {batch:,} rows (< {MIN_STEPS}; {epoch_tokens:,} "
                f"training rows): results describe little more than the initialisation; harvest more tokens "
                f"or lower --batch-size"]
    return []


def _steps(n: int) -> str:
    return f"{n} step" + "s" * (n != 1)


def warn(line: str, console=None) -> None:
    """A warning as one line on the console (stderr), or a Python warning for library callers."""
    if console is not None:
        console.print(f"warning: {line}", highlight=False, markup=False, soft_wrap=True)
    else:
        import warnings
        warnings.warn(line, stacklevel=3)


def _step(run: Run, x, g, factor, cfg, dead_after, autocast, log_now, target=None, reducer=distributed.LOCAL):
    """One optimizer step of one SAE on x; a transcoder (train/transcoder.py) predicts `target`.
    `reducer` combines the batch-wide parts over the ranks (the driver's, for this step)."""
    sae = run.sae
    # while no latent can be dead yet (the host knows a bound), AuxK is skipped rather than computed as 0
    dead = run.since_fired >= dead_after if run.idle_bound >= dead_after else None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = sae.loss(x, g, dead_mask=dead, reducer=reducer,
                       **({} if target is None else {"target": target}))
    if target is not None:
        x = target   # the NMSE below is the target's
    out.loss.backward()
    optimizer_step(run, factor, cfg.grad_clip, fired=(out.feats > 0).any(0), tokens=len(x) * reducer.ranks(),
                   reducer=reducer)
    if log_now:   # every term is a mean over the rank's equal share: averaging gives the global batch's
        with torch.no_grad():
            sums = reducer.all_sum(torch.stack([(out.x_hat.float() - x).pow(2).sum(), x.pow(2).sum()]))
        terms = reducer.global_mean({"loss": out.loss.item(), **{k: float(v) for k, v in out.terms.items()}})
        dead_fraction = float(dead.float().mean()) if dead is not None else 0.0
        run.last = {**terms, "nmse": float(sums[0] / sums[1]), "dead_fraction": dead_fraction, "lr": run.lr * factor}
        run.idle_bound = int(run.since_fired.max())   # the step syncs here anyway: tighten the bound


def _info(runs) -> list[dict]:
    """The progress display's metrics: one row per SAE (the latest logged step's)."""
    return [{"sae": name, "loss": run.last.get("loss", 0.0), "l0": run.last.get("l0", 0.0),
             "nmse": run.last.get("nmse", 0.0), "dead": run.last.get("dead_fraction", 0.0)}
            for name, run in runs.items()]


def _finish(run: Run, source, folder, cfg, scale, device, driver) -> dict:
    sae = run.sae
    # batch-independent: >= THRESHOLD_ROWS training rows, whatever --batch-size was
    sae.finalize(x.to(device) / scale for x in source.threshold_rows(THRESHOLD_ROWS))
    held = held_out_reconstruction(sae, source.held_out(cfg.batch_size), scale, device, limit=source.report_rows)
    origin = source.origin(held["held_out_tokens"]) if held else None
    if origin is not None:
        held["origin"] = origin
    summary = {**driver.summary(), "input_scale": scale, "held_out": held}
    save_run(run, folder, scale, {**source.provenance, "training": cfg.to_dict()}, summary)
    return summary


def _print_summary(console, summaries, meta: bool = False):
    from rich.table import Table

    origin = next((s["held_out"].get("origin") for s in summaries.values() if s["held_out"].get("origin")), None)
    # a meta-SAE's report is on the decoder rows it trained on: no held-out data exists for it
    table = Table(title="training-row results (a meta-SAE has no held-out rows)" if meta else "held-out results",
                  caption=None if origin is None else
                  f"on {origin['tokens']:,} tokens of the store's {origin['held_out_seqs']:,} held-out sequences "
                  f"(every {origin['every']}th, {origin['origin']}), never trained on")
    for col in ("sae", "tokens", "tok/s", "NMSE", "expl. var.", "L0", "dead"):
        table.add_column(col, justify="right" if col != "sae" else "left")
    for name, s in summaries.items():
        h = s["held_out"]
        table.add_row(name, f"{s['tokens']:,}", f"{s['tokens_per_s'] or 0:,.0f}", f"{h.get('nmse', float('nan')):.4f}",
                      f"{h.get('explained_variance', float('nan')):.4f}", f"{h.get('l0', float('nan')):.1f}",
                      f"{h.get('dead_fraction', float('nan')):.3f}")
    console.print(table)
