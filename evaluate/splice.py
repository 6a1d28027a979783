"""Evaluate SAEs by splicing their reconstructions into the live model (HF forward hooks).

Per batch of evaluation sequences:
  1. one clean forward records every SAE site, the downstream resid_posts and the logits;
  2. gtopk SAEs with gradient selection: the clean gradients at their sites, per mode
     (evaluate/gradients.py: "causal", label-free, and "paper", the gradient paper's protocol);
  3. per site: a zero-ablation and a mean-ablation forward (shared by all SAEs at the site);
  4. per SAE (per gradient mode for gtopk): one spliced forward (reconstruction in place of the
     site activation).
Position 0 keeps its clean activation in 3 and 4 unless cfg.splice_bos: SAEs are trained without
it, and in GPT-2 it is the attention sink (norm in the thousands) whose damage would spread to every
later token. The SAE still encodes it, so the reconstruction metrics' all-positions view covers it.
The site means for mean-ablation come from a first pass over the same tokens (stopped early) and
never include position 0.
Metrics are in evaluate/metrics.py and docs/evaluate.md.
"""
from __future__ import annotations

import json
import sys
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from sae_harvest.evaluate.config import EvalConfig, LiveOptions
# EvaluateError is re-exported: the other evaluate modules raise it from here
from sae_harvest.evaluate.eval_tokens import (EvaluateError, dataset_tokens, store_tokens, trained_outside_split,
                                               warn_dataset_overlap)
from sae_harvest.evaluate.model_identity import check_trained_models, model_identity
from sae_harvest.evaluate.gradients import GRAD_MODES, TARGET_OF_MODE, causal_site_grads, paper_site_grads
from sae_harvest.evaluate.metrics import (Sums, ce_from_log_probs, kl_per_token, kl_reference, log_probs,
                                          mse_per_token, normalize_without_affine, reconstruction_terms,
                                          result_metrics)
from sae_harvest.harvest.errors import HarvestError
from sae_harvest.stores.urls import scrub


@dataclass
class Entry:
    """One SAE to evaluate and the sums its metrics are built from."""
    path: str
    sae: torch.nn.Module
    cfg: dict                      # cfg.json
    site: object = None            # harvest.sites.Site
    grad_mode: str | None = None   # gtopk: "causal" / "paper" gradient-aware selection, "none"; else None
    downstream: list[str] = field(default_factory=list)  # resid_post sites after the SAE's site
    sums: Sums = field(default_factory=Sums)
    outside_split: bool | None = None   # trained outside the evaluated held-out sequences (None: not a store)
    trained_model: dict | None = None   # its training model's fingerprint against the evaluation's (eval_tokens)


# --- inputs ------------------------------------------------------------------------------------
def load_entry(path: str, device) -> Entry:
    from sae_harvest.train.sae_io import CFG_NAME, load_sae

    sae = load_sae(path, device=device)
    d = Path(path)
    d = d.parent if d.is_file() else d
    return Entry(path=str(path), sae=sae, cfg=json.loads((d / CFG_NAME).read_text()))


def attach_site(entry: Entry, adapter) -> None:
    """Parse the SAE's hook_name and check the model has that site with the SAE's width."""
    from sae_harvest.harvest.sites import Site, downstream_sites

    from sae_harvest.train.saelens_format import hook_name_of

    hook = hook_name_of(entry.cfg)   # ours, or a TransformerLens / HF name mapped to our site
    if not hook or str(hook).startswith("meta:"):
        raise EvaluateError(f"{entry.path}: hook_name {hook!r} is not a model site; "
                            f"only SAEs on blocks.<layer>.<kind> can be spliced")
    try:
        site = Site.parse(str(hook))
    except HarvestError as e:
        raise EvaluateError(f"{entry.path}: {e}") from None
    if not 0 <= site.layer < adapter.n_layers:
        raise EvaluateError(f"{entry.path}: site {site.name} is not in the model: it has "
                            f"{adapter.n_layers} layers (0-{adapter.n_layers - 1})")
    width = adapter.site_width(site.kind)
    if entry.sae.cfg.d_in != width:
        raise EvaluateError(f"{entry.path}: SAE d_in {entry.sae.cfg.d_in} != width {width} of "
                            f"site {site.name} in this model")
    entry.site = site
    entry.downstream = downstream_sites(site, adapter.n_layers)   # the ones e2e+ds trains on


@dataclass
class Live:
    """The live-model context every evaluation runs in: `evaluate splice` and the analyses."""
    model: torch.nn.Module
    adapter: object
    ids: torch.Tensor          # [n_seqs, ctx_len] evaluation tokens (held-out store rows or text)
    model_name: str
    revision: str | None
    entries: list[Entry]       # the SAEs, each attached to its site in this model
    device: torch.device
    origin: dict | None = None  # how many evaluation tokens and where from (store_tokens, dataset_tokens)
    model_check: dict | None = None   # the model's fingerprint against the store's (harvest.fingerprint)


def open_live(paths, opts: LiveOptions, *, default_tokens: int | None = None) -> Live:
    """The SAEs at `paths`, the model (default: the store's) and the evaluation tokens: opts.tokens of
    the store's held-out sequences (more is refused) or of the dataset; with opts.tokens None, all the
    held-out ones up to default_tokens (or 65536 of text). Raises a UserError for any input problem."""
    from sae_harvest.harvest.default_model import resolve_model
    from sae_harvest.harvest.models import get_adapter, load_model, quiet_transformers
    from sae_harvest.stores.cli import pick_device

    if (opts.store is None) == (opts.dataset is None):
        raise EvaluateError("give exactly one of --store (its held-out sequences) or --dataset")
    if opts.dtype not in ("float32", "bfloat16", "float16"):
        raise EvaluateError(f"unknown dtype {opts.dtype!r}; use float32, bfloat16 or float16")
    if (opts.tokens is not None and opts.tokens <= 0) or opts.batch_size <= 0:
        raise EvaluateError("--tokens and --batch-size must be positive")
    if opts.skip_docs < 0 or (opts.skip_docs and opts.dataset is None):
        raise EvaluateError("--skip-docs takes a non-negative count and goes with --dataset")
    dev = pick_device(opts.device)
    entries = [load_entry(p, dev) for p in paths]
    model_name, revision = opts.model, opts.revision
    ids, store_obj, origin = (None, None, None) if opts.store is None else \
        store_tokens(opts.store, opts.tokens, opts.ctx_len, default_tokens)
    if store_obj is not None and model_name is None:
        stored = store_obj.attrs.get("model", {})
        model_name, revision = stored.get("name"), revision or stored.get("revision")
        if model_name:   # a store from someone else picks what gets loaded: say what it is
            print(f"loading model {scrub(model_name)!r}"
                  f"{f' at revision {revision!r}' if revision else ''}, named by store "
                  f"{scrub(opts.store)} (--model chooses another)", file=sys.stderr, flush=True)
    if not model_name:
        raise EvaluateError("no model given (--model)")
    seen = {}
    for e in entries if origin is not None else ():
        e.outside_split = trained_outside_split(e.cfg, origin, store_obj, seen)
        if not e.outside_split:
            print(f"warning: {scrub(e.path)} does not record training outside this store's held-out split "
                  f"(its cfg.json records no split, another split, or a training store not readable here): "
                  f"its numbers may include training tokens",
                  file=sys.stderr, flush=True)
    quiet_transformers()
    model, tokenizer = load_model(resolve_model(model_name), revision=revision, device=dev,
                                  dtype=getattr(torch, opts.dtype))
    # the model a store names is found from here (a relative folder, a hub name): is it the harvest's?
    model_check = model_identity(store_obj, model_name, revision, named_by_user=opts.model is not None,
                                 store=opts.store, what="the evaluation")
    check_trained_models(entries, model_check["model_digest"], named_by_user=opts.model is not None)
    adapter = get_adapter(model)
    for e in entries:
        attach_site(e, adapter)
    if ids is None:
        warning = warn_dataset_overlap(opts.dataset, entries, opts.skip_docs)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        ids, origin = dataset_tokens(opts.dataset, tokenizer, opts.tokens, opts.ctx_len, opts.split,
                                     opts.text_column, opts.skip_docs, default_tokens or 65536)
        origin = {**origin, "overlap_warning": warning}
    if ids.shape[1] < 3:
        raise EvaluateError(f"sequences of {ids.shape[1]} tokens are too short to evaluate")
    if ids.shape[1] > adapter.max_positions:
        raise EvaluateError(f"ctx_len {ids.shape[1]} exceeds the model's {adapter.max_positions} positions")
    return Live(model, adapter, ids, model_name, revision, entries, dev, origin, model_check)


# --- passes ------------------------------------------------------------------------------------
def _forward(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _site_means(model, batches, sites, bar) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{site: (mean over all evaluated tokens, mean over positions >= 1)}, float64."""
    from sae_harvest.harvest.sites import capture

    sums = {s.name: [0, 0, 0, 0] for s in sites}   # sum all, count all, sum nobos, count nobos
    task = bar.add_task("site means", total=sum(b.numel() for b in batches), info="")
    for ids in batches:
        acts = capture(model, ids, sites, stop_early=True).acts
        for s, a in acts.items():
            a = a.double()
            acc = sums[s]
            acc[0] += a.sum((0, 1)); acc[1] += a.shape[0] * a.shape[1]
            acc[2] += a[:, 1:].sum((0, 1)); acc[3] += a.shape[0] * (a.shape[1] - 1)
        bar.update(task, advance=ids.numel())
    return {s: (acc[0] / acc[1], acc[2] / max(acc[3], 1)) for s, acc in sums.items()}


def _keep_pos0(fn, splice_bos: bool):
    """fn applied to the site activation [B, T, d], position 0 left clean unless splice_bos."""
    from sae_harvest.harvest.sites import keep_clean_positions

    return lambda a: keep_clean_positions(a, fn(a), first=0 if splice_bos else 1)


def _ablate(model, ids, site, value_fn, clean: dict, site_sums: Sums, tag: str, splice_bos: bool) -> None:
    from sae_harvest.harvest.sites import splice

    with splice(model, site, _keep_pos0(value_fn, splice_bos)):
        logp = log_probs(_forward(model, ids))
    site_sums.add(f"ce_{tag}", ce_from_log_probs(logp, ids))
    site_sums.add(f"kl_{tag}", kl_per_token(None, logp[:, :-1], ref=clean["kl_ref"]))


def _spliced(model, ids, entry: Entry, grad, clean: dict, means, final_norm, splice_bos: bool) -> None:
    """One forward with the SAE's reconstruction spliced in; adds every per-token metric."""
    from sae_harvest.harvest.sites import record, splice

    sae, seen = entry.sae, {}

    def replace(a):
        x = a.reshape(-1, a.shape[-1]).to(sae.W_dec.dtype)
        g = None if grad is None else grad.reshape(-1, a.shape[-1])
        feats = sae.encode(x, g)
        x_hat = sae.decode(feats).view(a.shape)
        seen.update(x=a, x_hat=x_hat, feats=feats.view(*a.shape[:-1], -1))
        return x_hat.to(a.dtype)

    with splice(model, entry.site, _keep_pos0(replace, splice_bos)), record(model, entry.downstream) as rec:
        logp = log_probs(_forward(model, ids))
    s = entry.sums
    s.add("ce", ce_from_log_probs(logp, ids))
    s.add("kl", kl_per_token(None, logp[:, :-1], ref=clean["kl_ref"]))
    for name in entry.downstream:
        s.add("ds:" + name, mse_per_token(rec[name], clean[name]))
        s.add("dsln:" + name, mse_per_token(normalize_without_affine(final_norm, rec[name]),
                                            clean["ln:" + name]))
    mean, mean_nobos = means[entry.site.name]
    terms = reconstruction_terms(seen["x"], seen["x_hat"], mean, mean_nobos)
    var_nobos = terms.pop("var_nobos")
    for name, q in terms.items():
        s.add(name, q, nobos=var_nobos if name == "var" else None)
    s.add("l0", (seen["feats"] != 0).sum(-1).float())
    s.add_fired(seen["feats"])


def _eval_batch(model, adapter, ids, entries, site_sums, clean_sums, means, splice_bos: bool) -> None:
    from sae_harvest.harvest.sites import record

    sites = sorted({e.site for e in entries})
    posts = sorted({name for e in entries for name in e.downstream})
    with record(model, sites + posts) as rec:
        logp_clean = log_probs(_forward(model, ids))
    clean = dict(rec)
    # the clean side of every comparison, computed once per batch for all SAEs and ablations
    clean["kl_ref"] = kl_reference(logp_clean[:, :-1])
    with torch.no_grad():
        clean.update({"ln:" + name: normalize_without_affine(adapter.final_norm, clean[name]) for name in posts})
    clean_sums.add("ce", ce_from_log_probs(logp_clean, ids))

    grads = {"paper": {}, "causal": {}}
    paper_sites = sorted({e.site for e in entries if e.grad_mode == "paper"})
    if paper_sites:
        grads["paper"] = paper_site_grads(model, ids, paper_sites)
    for site in sorted({e.site for e in entries if e.grad_mode == "causal"}):
        grads["causal"][site.name] = causal_site_grads(model, ids, site)

    for site in sites:
        mean = means[site.name][1]   # the mean over positions >= 1, whether or not position 0 is spliced
        _ablate(model, ids, site, torch.zeros_like, clean, site_sums[site.name], "zero", splice_bos)
        _ablate(model, ids, site, lambda a: mean.to(a.dtype).expand_as(a).clone(),
                clean, site_sums[site.name], "mean", splice_bos)
        for e in entries:
            if e.site == site:
                grad = grads[e.grad_mode][site.name] if e.grad_mode in grads else None
                _spliced(model, ids, e, grad, clean, means, adapter.final_norm, splice_bos)


# --- entry point -------------------------------------------------------------------------------
def evaluate_saes(cfg: EvalConfig, *, progress=True, console=None, live: Live | None = None) -> list[dict]:
    """Splice each SAE into the model on the same held-out tokens; one metrics dict per SAE,
    in the order given. Raises a UserError for any input problem. `live`: the SAEs (its entries),
    model and tokens already open (evaluate_all, whose transcoders and CLTs share that model)."""
    from sae_harvest.stores.progress import token_progress

    if not cfg.saes:
        raise EvaluateError("no SAE given (--sae PATH)")
    bad = sorted(set(cfg.grad_modes) - set(GRAD_MODES))
    if bad or not cfg.grad_modes:
        raise EvaluateError(f"--grad-modes: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(GRAD_MODES)}")
    live = live if live is not None else open_live(cfg.saes, cfg)
    model, adapter, ids, model_name, dev = live.model, live.adapter, live.ids, live.model_name, live.device
    origin = live.origin
    entries = []
    for e in live.entries:
        if not e.sae.uses_grads:
            entries.append(e)
        elif not cfg.grad_select:
            entries.append(dataclasses.replace(e, grad_mode="none"))
        else:   # one row per gradient mode, the causal (headline) one first
            entries += [dataclasses.replace(e, grad_mode=m, sums=Sums()) for m in GRAD_MODES if m in cfg.grad_modes]

    batches = [b.to(dev) for b in ids.split(cfg.batch_size)]
    sites = sorted({e.site for e in entries})
    site_sums = {s.name: Sums() for s in sites}
    clean_sums = Sums()
    # Progress goes to stderr by default so stdout stays clean for scripts.
    bar = token_progress(console=console or Console(stderr=True), disable=not progress)
    with torch.no_grad(), bar:
        means = _site_means(model, batches, sites, bar)
        task = bar.add_task("splicing", total=ids.numel(), info=f"{len(entries)} SAEs")
        for batch in batches:
            _eval_batch(model, adapter, batch, entries, site_sums, clean_sums, means, cfg.splice_bos)
            bar.update(task, advance=batch.numel())
    return [{**_result(e, site_sums[e.site.name], clean_sums, ids, model_name, cfg.dtype, cfg.splice_bos),
             "eval_tokens": origin, "trained_outside_split": e.outside_split, **(live.model_check or {}),
             "trained_model": e.trained_model}
            for e in entries]


def _result(e: Entry, site_sums: Sums, clean_sums: Sums, ids, model_name, dtype, splice_bos) -> dict:
    cfg, ours = e.sae.cfg, e.cfg.get("sae_harvest", {})
    sweep = ours.get("sweep_name")
    arch = cfg.arch if "sae_harvest" in e.cfg else f"saelens-{e.cfg.get('architecture')}"
    folder = Path(e.path).parent if Path(e.path).is_file() else Path(e.path)
    head = {
        "sae": scrub(e.path), "name": sweep or folder.name, "sweep_name": sweep,
        "site": e.site.name, "arch": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
        "k": cfg.k if e.sae.sweep_field == "k" and arch != "saelens-jumprelu" else None,
        "l1": cfg.l1_coeff if e.sae.sweep_field == "l1_coeff" else None,
        "loss": (ours.get("training") or {}).get("loss", "local"),
        "grad_select": e.grad_mode in GRAD_MODES, "grad_mode": e.grad_mode,
        # the gradient the g-SAE trained on, and whether this row selects with that same definition
        "grad_target_trained": ours.get("grad_target", "labels") if e.sae.uses_grads else None,
        "grad_matched": (TARGET_OF_MODE.get(e.grad_mode) == ours.get("grad_target", "labels"))
        if e.grad_mode in GRAD_MODES else None,
        "splice_bos": splice_bos, "model": scrub(model_name), "dtype": dtype,
        "sae_model": e.cfg.get("model_name"),  # what it was trained on, to spot a mismatch
        "tokens": int(ids.numel()), "sequences": int(ids.shape[0]), "ctx_len": int(ids.shape[1]),
    }
    return {**head, **result_metrics(e.sums, site_sums, clean_sums, e.downstream)}
