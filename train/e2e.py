"""`train fit --loss e2e | e2e+ds`: SAEs trained through the live, frozen model (e2e paper 2.3-2.4).

Sequences come from the store's `tokens`, not its activations. Per micro-batch of a step: one clean
forward (no grad) gives the clean log-probs and downstream residuals, shared by every SAE of the
sweep; then per SAE one forward with its reconstruction spliced in at the site and one backward,
which reaches only the SAE (model weights are frozen). Losses, defaults and sources: docs/e2e.md.
"""
from __future__ import annotations

import math
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sae_harvest.harvest.default_model import resolve_model
from sae_harvest.harvest.fingerprint import model_against_store
from sae_harvest.harvest.models import get_adapter, load_model
from sae_harvest.harvest.sites import Site, capture, downstream_sites, keep_clean_positions, record, splice
from sae_harvest.stores import open_store
from sae_harvest.stores.errors import UserError
from sae_harvest.stores.urls import scrub
from sae_harvest.train import distributed
from sae_harvest.train.batchtopk import THRESHOLD_ROWS
from sae_harvest.train.config import TrainConfig, sweep
from sae_harvest.train.driver import Driver
from sae_harvest.train.e2e_transcoder import check_target, save_transcoder, transcoder_runs
from sae_harvest.train.errors import TrainError
from sae_harvest.train.feeds import Batch, SequenceFeed, held_out_origin
from sae_harvest.train.registry import ARCHITECTURES
from sae_harvest.train.runs import build_runs, input_scale, optimizer_step, save_run

MICRO_TOKENS = 8192    # tokens per forward; a step accumulates gradients (paper: 8 x 1024, twice)
SAMPLE_TOKENS = 8192   # site activations for the input scale and the b_dec init
E2E_ARCHS = tuple(name for name, cls in ARCHITECTURES.items() if cls.trains_e2e)


@dataclass(frozen=True)
class E2EContext:
    """What `_setup` opens for an e2e fit: the store and its token sequences, the live model at the
    site, the train / held-out split and the provenance saved with every SAE."""
    store: object             # stores.reader.Store
    tokens: object            # the store's `tokens` array [n_seqs, ctx_len]
    site: Site
    model: torch.nn.Module
    adapter: object           # harvest.models.ModelAdapter
    d_in: int
    train_seqs: np.ndarray    # sequence indices a step may draw
    held_seqs: np.ndarray     # the store's held-out sequences: the final report's
    provenance: dict
    device: torch.device | None
    target: Site | None = None   # a transcoder's: the site it writes (the MLP output); None for an SAE
    d_out: int | None = None

    @property
    def n_train(self) -> int:
        return len(self.train_seqs)


@dataclass(frozen=True)
class E2EStepOptions:
    """How every spliced forward of a fit runs: e2e_loss's arguments and the step's settings."""
    downstream: list[str]     # residual streams the e2e+ds term compares (harvest.sites.downstream_sites)
    scale: float              # the input scale the SAEs train under (the driver's, after a resume)
    kl_coeff: float
    downstream_coeff: float
    include_bos: bool
    grad_clip: float | None = None
    device: torch.device | None = None
    autocast: bool = False
    dead_after: int = 0
    read: Site | None = None          # a transcoder's input site (the MLP input); None for an SAE
    out_scale: float | None = None    # a transcoder's target scale

    def loss_kw(self) -> dict:
        """e2e_loss's keyword arguments."""
        kw = dict(scale=self.scale, kl_coeff=self.kl_coeff, downstream_coeff=self.downstream_coeff,
                  downstream=self.downstream, include_bos=self.include_bos)
        return kw if self.read is None else {**kw, "read": self.read, "out_scale": self.out_scale}


def default_coeffs(loss: str, kl_coeff, downstream_coeff) -> tuple[float, float]:
    """Paper app. D: KL x 0.5 and beta = 2.5 (layers 2, 6) for e2e+ds; plain e2e has KL x 1."""
    if loss != "e2e+ds":
        return (1.0 if kl_coeff is None else kl_coeff), 0.0
    return (0.5 if kl_coeff is None else kl_coeff), (2.5 if downstream_coeff is None else downstream_coeff)


@torch.no_grad()
def clean_pass(model, ids, downstream) -> dict:
    """{"logp": float32 log-probs [B, T, V], site name: clean activation} for e2e_loss."""
    with record(model, downstream) as rec:
        logits = model(input_ids=ids, use_cache=False).logits
    return {"logp": F.log_softmax(logits.float(), -1), **{k: v.detach() for k, v in rec.items()}}


def e2e_loss(model, sae, site, ids, *, clean: dict, scale: float = 1.0, kl_coeff: float = 1.0,
             downstream_coeff: float = 0.0, downstream=(), include_bos: bool = False, read=None,
             out_scale: float | None = None, reducer: distributed.Reducer = distributed.LOCAL) -> dict:
    """One spliced forward. Returns {"loss": scalar with grad, "fired": bool [d_sae]} and detached
    scalars: kl, ds:<site> (MSE, mean over tokens and d), downstream_mse (mean over those sites),
    l1, l0, sparsity (if the architecture has one), ce, ce_clean. As in local training and in
    `evaluate splice`, position 0 keeps its clean activation and is not encoded (so it never enters
    BatchTopK's batch top-k) unless include_bos; the terms average over the same positions (GPT-2's
    position 0 has norm ~3000).
    A transcoder (read: its input site) writes `site` with its prediction (skip path included) from
    read's live value in the same forward, x divided by `scale` and the output times `out_scale`.
    In training mode the SAE's batch-wide selection reduces through `reducer` (the step's)."""
    seen = {}
    first = 0 if include_bos else 1

    def replace(a):
        part = a[:, first:]
        src = part if read is None else live[read.name][:, first:]
        x = src.reshape(-1, src.shape[-1]).float() / scale
        if sae.training:   # the training selection (batchtopk: over the batch), reduced over the ranks
            feats = sae.encode_train(x, reducer=reducer)
            sae.observe_training_latents(feats, reducer=reducer)
        else:
            feats = sae.encode(x)
        seen["feats"], seen["x"] = feats, x   # only the positions the loss terms average over
        if read is None:
            return keep_clean_positions(a, (sae.decode(feats) * scale).view(part.shape), first)
        y_hat = (sae.decode(feats) + sae.skip_out(x)) * out_scale
        return keep_clean_positions(a, y_hat.view(*part.shape[:-1], -1), first)

    with ExitStack() as stack:
        live = stack.enter_context(record(model, [read])) if read is not None else {}
        stack.enter_context(splice(model, site, replace))
        rec = stack.enter_context(record(model, downstream))
        logits = model(input_ids=ids, use_cache=False).logits
    mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    mask[:, 0] = include_bos
    logp = F.log_softmax(logits.float(), -1)
    # KL(clean || spliced) = sum_v p_clean (log p_clean - log p_spliced), as e2e_sae computes it
    kl = F.kl_div(logp, clean["logp"], log_target=True, reduction="none").sum(-1)[mask].mean()
    terms, loss = {"kl": kl}, kl_coeff * kl
    if downstream:
        for k in downstream:
            terms[f"ds:{k}"] = (rec[k].float() - clean[k].float()).pow(2).mean(-1)[mask].mean()
        terms["downstream_mse"] = torch.stack([terms[f"ds:{k}"] for k in downstream]).mean()
        loss = loss + downstream_coeff * terms["downstream_mse"]
    feats = seen["feats"]   # already only the positions the mask keeps
    terms["l1"] = feats.abs().sum(-1).mean()
    terms["l0"] = (feats > 0).float().sum(-1).mean()
    sparsity = sae.sparsity_penalty(feats, seen["x"])   # None for the TopK family
    if sparsity is not None:
        terms["sparsity"] = sparsity
        loss = loss + sparsity
    target, pred = ids[:, 1:, None], mask[:, :-1]   # next-token CE, same positions as the KL
    terms["ce"] = -logp[:, :-1].gather(-1, target)[..., 0][pred].mean()
    terms["ce_clean"] = -clean["logp"][:, :-1].gather(-1, target)[..., 0][pred].mean()
    out = {k: v.detach() for k, v in terms.items()}
    out.update(loss=loss, fired=(feats > 0).any(0))
    return out


def _pass(model, site, runs, ids, opts: E2EStepOptions, train: bool, reducer=distributed.LOCAL):
    """Every SAE on the sequences `ids`, in micro-batches that each share one clean forward.
    Returns ({name: mean of each term}, {name: latents that fired}); with train, gradients
    accumulate to those of the whole batch (each sequence counts the same number of tokens)."""
    sums = {name: {} for name in runs}
    fired = {name: torch.zeros(run.cfg.d_sae, dtype=torch.bool, device=ids.device) for name, run in runs.items()}
    micro = max(1, MICRO_TOKENS // ids.shape[1])
    # bf16 autocast covers the clean and the spliced forwards alike, so the KL compares like with like
    amp = torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=opts.autocast)
    for lo in range(0, len(ids), micro):
        chunk = ids[lo:lo + micro]
        w = len(chunk) / len(ids)
        with amp:
            clean = clean_pass(model, chunk, opts.downstream)
        for name, run in runs.items():
            run.sae.train(train)   # batchtopk: batch top-k in training, its threshold otherwise
            with torch.set_grad_enabled(train), amp:
                t = e2e_loss(model, run.sae, site, chunk, clean=clean, reducer=reducer, **opts.loss_kw())
            run.sae.train()
            if train:
                (t["loss"] * w).backward()
            t["loss"] = t["loss"].detach()
            fired[name] |= t.pop("fired")
            for k, v in t.items():
                sums[name][k] = sums[name].get(k, 0.0) + w * v
    return sums, fired


def _train_step(model, site, runs, ids, opts: E2EStepOptions, factor: float, log_now: bool,
                reducer: distributed.Reducer = distributed.LOCAL) -> None:
    """One optimiser step of every SAE of the sweep on the sequences `ids`; batch-wide quantities
    reduce through `reducer` (the driver's, for this step)."""
    sums, fired = _pass(model, site, runs, ids, opts, train=True, reducer=reducer)
    counted = (ids.numel() - (0 if opts.include_bos else len(ids))) * reducer.ranks()
    for name, run in runs.items():
        optimizer_step(run, factor, opts.grad_clip, fired=fired[name], tokens=counted, reducer=reducer)
        if log_now:
            m = reducer.global_mean({k: float(v) for k, v in sums[name].items()})   # equal shares
            run.last = {**m, "ce_increase": m["ce"] - m["ce_clean"], "lr": run.lr * factor,
                        "dead_fraction": float((run.since_fired >= opts.dead_after).float().mean())}


def held_out_splice(model, site, runs, batches, opts: E2EStepOptions) -> dict:
    """Per SAE on held-out sequences: mean KL, CE (clean, spliced, increase), downstream MSEs,
    L0, L1 and the fraction of latents that never fired."""
    totals, fired, n = {name: {} for name in runs}, {}, 0
    for ids in batches:
        sums, f = _pass(model, site, runs, ids, opts, train=False)
        for name in runs:
            fired[name] = f[name] | fired.get(name, False)
            for k, v in sums[name].items():
                totals[name][k] = totals[name].get(k, 0.0) + len(ids) * float(v)
        n += len(ids)
    if n == 0:
        return {name: {} for name in runs}
    out = {}
    for name, s in totals.items():
        m = {k: v / n for k, v in s.items()}
        out[name] = {"held_out_sequences": n, **m, "ce_increase": m["ce"] - m["ce_clean"],
                     "dead_fraction": 1 - fired[name].float().mean().item()}
    return out


def _setup(cfg: TrainConfig, device) -> E2EContext:
    """Store, site, model and the train / held-out sequence split; TrainError on bad input."""
    if cfg.arch not in E2E_ARCHS:
        raise TrainError(f"--loss {cfg.loss} trains {', '.join(E2E_ARCHS)} SAEs, not --arch {cfg.arch}")
    if cfg.decoder_of or not cfg.store:
        raise TrainError(f"--loss {cfg.loss} needs --store (its token sequences), not --decoder-of")
    if cfg.loss == "e2e" and cfg.downstream_coeff:
        raise TrainError("--downstream-coeff applies to --loss e2e+ds only")
    store = open_store(cfg.store)
    try:
        tokens = store.tokens
    except KeyError:
        raise TrainError(f"store {cfg.store} has no token sequences, which --loss {cfg.loss} needs") from None
    name = cfg.site
    if name is None:
        if len(store.sites) != 1:
            raise TrainError(f"store has several sites; pick one with --site: {', '.join(store.sites)}")
        name = store.sites[0]
    model_name = cfg.model or store.attrs.get("model", {}).get("name")
    if not model_name:
        raise TrainError(f"store {cfg.store} does not name its model: give --model")
    if not cfg.model:   # a store from someone else picks what gets loaded: say what it is
        print(f"loading model {scrub(model_name)!r}, named by store {scrub(cfg.store)} (--model chooses another)",
              file=sys.stderr, flush=True)
    site = Site.parse(name)
    revision = None if cfg.model else store.attrs.get("model", {}).get("revision")
    try:
        model, _ = load_model(resolve_model(model_name), revision=revision, device=device)
    except UserError as e:   # say which step failed: the user may not have named a model at all
        raise TrainError(f"cannot load the model for --loss {cfg.loss}: {e}") from None
    try:   # a model the store names is found from here (a relative folder, a hub name), and a
        # checkpoint resumed from another folder must not continue on another model
        model_check = model_against_store(store.attrs, model_name, revision, named_by_user=bool(cfg.model),
                                          store=cfg.store, what=f"--loss {cfg.loss}")
    except UserError as e:
        raise TrainError(str(e)) from None
    adapter = get_adapter(model)
    if not 0 <= site.layer < adapter.n_layers:
        raise TrainError(f"site {site.name} is not in model {model_name}: it has {adapter.n_layers} "
                         f"layers (0-{adapter.n_layers - 1})")
    target = check_target(cfg, site, adapter) if cfg.target else None
    if store.ctx_len > adapter.max_positions:
        raise TrainError(f"store sequences of {store.ctx_len} tokens exceed the model's "
                         f"{adapter.max_positions} positions")
    # the store's held-out sequences (stores/split.py): never drawn for training, the final report's
    train_seqs = store.split.train_seqs(store.n_seqs)
    held_seqs = store.split.held_out_seqs(store.n_seqs)
    if len(train_seqs) == 0:
        raise TrainError(f"store {cfg.store} has no training sequences outside its held-out split "
                         f"({store.split.describe(store.n_seqs, store.ctx_len)})")
    attrs = store.attrs
    provenance = {"store": scrub(cfg.store), "model_name": scrub(model_name), "model_digest": model_check["model_digest"],
                  "model_matches_store": model_check["model_matches_store"], "hook_name": site.name,
                  "hook_layer": site.layer, "context_size": store.ctx_len,
                  "prepend_bos": bool(attrs.get("tokenizer", {}).get("bos_prepended", False)),
                  "dataset_path": attrs.get("dataset", {}).get("name"),
                  "held_out": {**store.split.to_attrs(), "creation_id": attrs.get("creation_id")}}
    return E2EContext(store=store, tokens=tokens, site=site, model=model, adapter=adapter,
                      d_in=adapter.site_width(site.kind), train_seqs=train_seqs, held_seqs=held_seqs,
                      provenance=provenance, device=device, target=target,
                      d_out=adapter.site_width(target.kind) if target else None)


def _read(env: E2EContext, idx) -> torch.Tensor:
    idx = np.sort(np.asarray(idx, dtype=np.int64))
    ids = np.asarray(env.tokens.get_orthogonal_selection((idx, slice(None))))
    if ids.size and (ids.min() < 0 or ids.max() >= env.adapter.vocab_size):
        raise TrainError(f"store token ids exceed the model's vocabulary of {env.adapter.vocab_size}: "
                         f"was the store harvested with another tokenizer?")
    return torch.from_numpy(ids.astype(np.int64)).to(env.device)


def _site_rows(env: E2EContext, cfg, n_tokens: int, seed: int, site: Site | None = None):
    """Activations [n, width] of `site` (default: the SAE's; raw, float32, CPU) of a seeded sample of
    training sequences from the live model, one micro-batch at a time; position 0 only with
    --include-bos. Lazy."""
    site = site or env.site
    per_seq = env.store.ctx_len - (0 if cfg.include_bos else 1)
    n = min(env.n_train, max(1, math.ceil(n_tokens / per_seq)))
    ids = _read(env, env.train_seqs[np.random.default_rng(seed).choice(env.n_train, n, replace=False)])
    micro = max(1, MICRO_TOKENS // ids.shape[1])
    for lo in range(0, len(ids), micro):
        a = capture(env.model, ids[lo:lo + micro], [site]).acts[site.name]
        yield (a if cfg.include_bos else a[:, 1:]).reshape(-1, a.shape[-1]).float().cpu()


def _site_sample(env: E2EContext, cfg, site: Site | None = None) -> torch.Tensor:
    """Activations of `site` (default: the SAE's) on a seeded sample of training sequences, from the live model."""
    return torch.cat(list(_site_rows(env, cfg, SAMPLE_TOKENS, cfg.seed, site)))


def fit_e2e(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
            console=None, device=None, on_step=None, world=distributed.World()) -> dict:
    """Train every SAE of the sweep end to end; returns {name: summary}. TrainError on bad input.
    Under torchrun each rank takes its share of every step's sequences; rank 0 evaluates and saves.
    Sweep parallel: each rank trains, evaluates and saves its own SAEs on every step's sequences."""
    out = Path(cfg.out)
    env = _setup(cfg, device)
    ctx = env.store.ctx_len
    sample = _site_sample(env, cfg)
    scale = input_scale(sample, cfg.normalize)   # as the local trainer; folded back in at save
    seqs_per_step = max(1, min(cfg.batch_size // ctx, env.n_train))
    if seqs_per_step % world.size and not world.sweep_parallel:
        raise TrainError(f"a step of {seqs_per_step} sequences does not divide over {world.size} ranks: "
                         f"make --batch-size a multiple of {world.size} x {ctx}")
    tokens = cfg.tokens or env.n_train * ctx * (cfg.epochs or 1)
    total_steps = max(1, tokens // (seqs_per_step * ctx))
    if env.target is None:
        out_scale = None
        order = [name for name, _ in sweep(cfg, env.d_in)]
        runs = build_runs(cfg, env.d_in, sample, None, device, scale, world,
                          site=env.provenance["hook_name"])   # sweep parallel: this rank's
    else:   # the same sequences' target activations: b_dec's init and the output scale
        target_sample = _site_sample(env, cfg, env.target)
        out_scale = input_scale(target_sample, cfg.normalize)
        runs, order = transcoder_runs(cfg, env.site, env.target, sample, target_sample, (scale, out_scale),
                                      device, world)
    kl_coeff, ds_coeff = default_coeffs(cfg.loss, cfg.kl_coeff, cfg.downstream_coeff)
    write = env.target or env.site   # where the reconstruction (a transcoder's prediction) goes in
    downstream = downstream_sites(write, env.adapter.n_layers)
    batch_tokens = seqs_per_step * ctx
    driver = Driver(cfg, out, runs, scale=scale, total_steps=total_steps, tokens_per_step=batch_tokens,
                    label=cfg.loss, world=world, store=env.store, target_scale=out_scale)
    feed_state = driver.prepare(resume, overwrite, device)
    scale, out_scale = driver.scale, driver.target_scale   # a resumed run's, which the options must carry
    opts = E2EStepOptions(downstream=downstream, scale=scale, kl_coeff=kl_coeff, downstream_coeff=ds_coeff,
                          include_bos=cfg.include_bos, grad_clip=cfg.grad_clip, device=device,
                          autocast=cfg.autocast == "on" or (cfg.autocast == "auto" and device.type == "cuda"),
                          dead_after=max(seqs_per_step * ctx, min(cfg.dead_tokens, tokens // 4)),
                          read=env.site if env.target else None, out_scale=out_scale)
    # sweep parallel: every rank runs the model on every step's whole batch, for its own SAEs
    # the feed draws from the training sequences only: a held-out sequence is never in a step
    feed = SequenceFeed(torch.from_numpy(env.train_seqs), seqs_per_step, seed=cfg.seed, state=feed_state,
                        part=(0, 1) if world.sweep_parallel else (world.rank, world.size))

    def prepare(batch: Batch):
        return _read(env, batch.seqs.numpy())

    def step_fn(ids, factor, log_now, reducer):
        _train_step(env.model, write, runs, ids, opts, factor, log_now, reducer)

    def info():
        return " | ".join(f"{n}: kl {r.last['kl']:.3g} l0 {r.last['l0']:.1f}" for n, r in list(runs.items())[:3])

    driver.run(feed, prepare, step_fn, info, progress=progress, console=console, on_step=on_step)
    if not driver.writes:
        return {}
    for run in runs.values():   # batch-independent: >= THRESHOLD_ROWS training rows (batchtopk)
        run.sae.finalize(x.to(device) / scale for x in _site_rows(env, cfg, THRESHOLD_ROWS, cfg.seed + 1))
    held_idx = env.held_seqs
    held = held_out_splice(env.model, write, runs, (_read(env, held_idx[i:i + seqs_per_step])
                           for i in range(0, len(held_idx), seqs_per_step)), opts)
    e2e_meta = {"loss": cfg.loss, "kl_coeff": kl_coeff, "downstream_coeff": ds_coeff,
                "downstream_sites": downstream}
    summaries = {}
    for name, run in runs.items():
        origin = held_out_origin(env.store, tokens=len(held_idx) * ctx, sequences=len(held_idx))
        summaries[name] = summary = {**driver.summary(), "held_out": {**held[name], "origin": origin}}
        extra = {**env.provenance, "training": cfg.to_dict(), "e2e": e2e_meta}
        if env.target is None:
            save_run(run, out / name, scale, extra, summary)
        else:
            summary["target_scale"] = out_scale
            save_transcoder(run, out / name, extra, env.target, (scale, out_scale), summary)
    driver.finish()
    summaries = driver.gather(summaries, order)
    if progress and console is not None:
        for name, s in summaries.items():
            h = s["held_out"]
            console.print(f"{name}: held-out KL {h.get('kl', float('nan')):.4f}  CE increase "
                          f"{h.get('ce_increase', float('nan')):.4f}  L0 {h.get('l0', float('nan')):.1f}")
    return summaries
