"""`train fit`: train one SAE per swept value from a store, reading it once.

Practice of the public trainers: inputs divided by one constant (E||x|| = sqrt(d))
and the constant folded back into the saved weights; b_dec at the geometric median;
unit-norm decoder rows with the parallel gradient removed; warmup + cosine decay;
grad-norm clipping; dead-latent tracking feeding AuxK.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from stores import StoreError, open_store

from train import state as train_state
from train.checkpoint import CheckpointError, load_sae, save_sae
from train.config import TrainConfig, default_lr, sweep
from train.driver import Driver, TrainInterrupted, lr_factor  # noqa: F401 (re-exported)
from train.errors import TrainError
from train.feeds import StoreFeed, TensorFeed, holdout_split, sample_rows
from train.gtopk import calibrate_beta
from train.sae import SAE, make_sae


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


class Source:
    """The data side of a fit: feed, widths, normalisation, held-out rows, provenance."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.decoder_of:
            self._from_decoder(cfg)
        else:
            self._from_store(cfg)

    def _from_store(self, cfg):
        if not cfg.store:
            raise TrainError("give --store (or --decoder-of for a meta-SAE)")
        try:
            store = open_store(cfg.store)
        except StoreError as e:
            raise TrainError(str(e)) from None
        sites = store.sites
        site = cfg.site
        if site is None:
            if len(sites) > 1:
                raise TrainError(f"store has several sites; pick one with --site: {', '.join(sites)}")
            site = sites[0]
        elif site not in sites:
            raise TrainError(f"site {site!r} is not in store {cfg.store}; it has: {', '.join(sites)}")
        self.grads = cfg.arch == "gtopk"
        if self.grads and not store.has_grads:
            raise TrainError(f"--arch gtopk needs gradients, and store {cfg.store} has none (harvest with --grads)")
        self.store, self.site, self.d_in = store, site, store.d(site)
        self.exclude_pos0 = not cfg.include_bos
        self.train_rows, self.held_rows = holdout_split(store, cfg.holdout_fraction)
        if self.train_rows[1] <= 0:
            raise TrainError(f"store {cfg.store} has too few rows to train on ({store.n_rows})")
        sample = sample_rows(store, site, self.train_rows, 8192, cfg.seed, self.exclude_pos0, grads=self.grads)
        self.sample = torch.from_numpy(sample[0])
        self.grad_sample = torch.from_numpy(sample[1]) if self.grads else None
        n_train = self.train_rows[1] - self.train_rows[0]
        self.epoch_tokens = n_train - (n_train // store.ctx_len if self.exclude_pos0 else 0)
        attrs = store.attrs
        self.provenance = {"store": cfg.store, "model_name": attrs["model"]["name"], "hook_name": site,
                           "hook_layer": int(site.split(".")[1]) if site.startswith("blocks.") else None,
                           "context_size": store.ctx_len,
                           "prepend_bos": bool(attrs.get("tokenizer", {}).get("bos_prepended", False)),
                           "dataset_path": attrs.get("dataset", {}).get("name")}

    def _from_decoder(self, cfg):
        try:
            parent = load_sae(cfg.decoder_of)
        except CheckpointError as e:
            raise TrainError(str(e)) from None
        rows = parent.W_dec.detach().float()
        # a saved SAE has its input scale folded into W_dec; meta-SAEs see directions only
        self.data = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self.sample, self.d_in, self.grads, self.site = self.data, self.data.shape[1], False, None
        self.epoch_tokens = len(self.data)
        self.provenance = {"decoder_of": cfg.decoder_of, "hook_name": f"meta:{cfg.decoder_of}"}

    def feed(self, batch_size: int, state: dict | None):
        if self.cfg.decoder_of:
            return TensorFeed(self.data, batch_size, seed=self.cfg.seed, state=state)
        return StoreFeed(self.store, self.site, batch_size, rows=self.train_rows, seed=self.cfg.seed,
                         grads=self.grads, exclude_pos0=self.exclude_pos0, state=state)

    def held_out(self, batch_size: int):
        if self.cfg.decoder_of:
            for i in range(0, len(self.data), batch_size):
                yield self.data[i:i + batch_size], None
            return
        it = self.store.batches(self.site, batch_size, rows=self.held_rows, grads=self.grads,
                                exclude_pos0=self.exclude_pos0, epochs=1, drop_last=False)
        for batch in it:
            g = torch.from_numpy(batch["grads"][self.site]) if self.grads else None
            yield torch.from_numpy(batch["acts"][self.site]), g


def _build_runs(cfg, source, device, scale, total_steps):
    runs = {}
    for name, sae_cfg in sweep(cfg, source.d_in):
        torch.manual_seed(cfg.seed)
        sae = make_sae(sae_cfg)
        if cfg.init:
            try:
                init = load_sae(cfg.init)
            except CheckpointError as e:
                raise TrainError(str(e)) from None
            if (init.cfg.d_in, init.cfg.d_sae, init.cfg.arch) != (sae_cfg.d_in, sae_cfg.d_sae, sae_cfg.arch):
                raise TrainError(f"--init {cfg.init} is a {init.cfg.arch} {init.cfg.d_in}->{init.cfg.d_sae} SAE; "
                                 f"this run trains {sae_cfg.arch} {sae_cfg.d_in}->{sae_cfg.d_sae}")
            init.fold_input_scale(1.0 / scale)   # saved weights take raw inputs; training sees x / scale
            sae.load_state_dict(init.state_dict())
        else:
            sae.init_b_dec(source.sample / scale, cfg.b_dec_init)
        if sae_cfg.arch == "gtopk" and cfg.beta is None:
            # gradient scale depends on the loss reduction, the site and the input scale; match the
            # paper's operating point (beta * |W_dec^T grad| ~ 2.4) instead of copying its number
            beta = calibrate_beta(sae, source.sample / scale, source.grad_sample * scale)
            sae.cfg = sae_cfg = dataclasses.replace(sae_cfg, beta=beta)
        sae.to(device).train()
        if cfg.sparse_decode == "on" or (cfg.sparse_decode == "auto" and device.type == "cuda"
                                          and sae_cfg.k and sae_cfg.k * 16 <= sae_cfg.d_sae):
            sae.use_sparse_decode = True
        lr = cfg.lr or default_lr(cfg.arch, sae_cfg.d_sae)
        betas = cfg.adam_betas or ((0.0, 0.999) if cfg.arch == "gated" else (0.9, 0.999))
        opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=betas)
        runs[name] = {"sae": sae, "opt": opt, "lr": lr, "cfg": sae_cfg,
                      "since_fired": torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=device),
                      "log": None, "last": {}}
    return runs


def check_output(cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    if cfg.batch_size <= 0:
        raise TrainError("--batch-size must be positive")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not resume and not overwrite:
        raise TrainError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")


def fit(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        console=None) -> dict:
    """Train every SAE of the sweep; returns {name: summary}. Raises TrainError on bad input."""
    check_output(cfg, resume, overwrite)
    if cfg.loss != "local":
        from train.e2e import fit_e2e
        return fit_e2e(cfg, resume=resume, overwrite=overwrite, progress=progress, console=console)
    out = Path(cfg.out)
    device = _device(cfg.device)
    source = Source(cfg)
    if cfg.normalize and not cfg.decoder_of:
        scale = float(source.sample.norm(dim=-1).mean() / math.sqrt(source.d_in))
    else:
        scale = 1.0
    epochs_tokens = source.epoch_tokens * (cfg.epochs or 1)
    tokens = cfg.tokens or epochs_tokens
    batch = min(cfg.batch_size, source.epoch_tokens)
    total_steps = max(1, tokens // batch)
    dead_after = max(batch, min(cfg.dead_tokens, tokens // 4))
    runs = _build_runs(cfg, source, device, scale, total_steps)

    driver = Driver(cfg, out, runs, scale=scale, total_steps=total_steps, tokens_per_step=batch, label="train")
    feed_state = driver.prepare(resume, overwrite, lambda name, run: train_state.load_run(out, name, run, device))
    scale = driver.scale
    feed = source.feed(batch, feed_state)
    autocast = cfg.autocast == "on" or (cfg.autocast == "auto" and device.type == "cuda")

    def step_fn(data, factor, log_now):
        x = data["acts"].to(device, non_blocking=True) / scale
        g = data["grads"].to(device, non_blocking=True) * scale if data["grads"] is not None else None
        for run in runs.values():
            _step(run, x, g, factor, cfg, dead_after, autocast, log_now)

    driver.run(feed, step_fn, lambda: _info(runs), progress=progress, console=console)
    summaries = {name: _finish(run, source, out / name, cfg, scale, device, driver)
                 for name, run in runs.items()}
    driver.finish()
    if progress and console is not None:
        _print_summary(console, summaries)
    return summaries


def _step(run, x, g, factor, cfg, dead_after, autocast, log_now):
    sae: SAE = run["sae"]
    opt = run["opt"]
    for group in opt.param_groups:
        group["lr"] = run["lr"] * factor
    dead = run["since_fired"] >= dead_after
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = sae.loss(x, g, dead_mask=dead)
    out.loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm()
    fired = (out.feats > 0).any(0)
    run["since_fired"] += len(x)
    run["since_fired"][fired] = 0
    if log_now:
        with torch.no_grad():
            nmse = ((out.x_hat.float() - x).pow(2).sum() / x.pow(2).sum()).item()
        run["last"] = {"loss": out.loss.item(), **{k: float(v) for k, v in out.terms.items()},
                       "nmse": nmse, "dead_fraction": float(dead.float().mean()),
                       "lr": run["lr"] * factor}


def _info(runs) -> str:
    parts = []
    for name, run in list(runs.items())[:3]:
        m = run["last"]
        parts.append(f"{name}: loss {m.get('loss', 0):.3g} l0 {m.get('l0', 0):.1f} "
                     f"nmse {m.get('nmse', 0):.3f} dead {m.get('dead_fraction', 0):.2f}")
    return " | ".join(parts) + (f" (+{len(runs) - 3})" if len(runs) > 3 else "")


@torch.no_grad()
def evaluate_held_out(sae: SAE, batches, scale: float, device) -> dict:
    """NMSE, explained variance, L0 and dead fraction of an SAE (training scale) on held-out rows."""
    sae.eval()
    err = norm2 = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    xs_sum, count = None, 0
    for x, g in batches:
        x = x.to(device) / scale
        g = g.to(device) * scale if g is not None else None
        feats = sae.encode(x, g)
        x_hat = sae.decode(feats)
        err += (x_hat - x).pow(2).sum().item()
        norm2 += x.pow(2).sum().item()
        xs_sum = x.sum(0) if xs_sum is None else xs_sum + x.sum(0)
        l0 += (feats > 0).sum().item()
        fired |= (feats > 0).any(0)
        count += len(x)
    sae.train()
    if count == 0:
        return {}
    tot = norm2 - (xs_sum.pow(2).sum().item() / count)   # sum ||x - mean||^2
    return {"held_out_tokens": count, "nmse": err / norm2, "explained_variance": 1 - err / tot,
            "l0": l0 / count, "dead_fraction": 1 - fired.float().mean().item()}


def _finish(run, source, folder, cfg, scale, device, driver) -> dict:
    sae = run["sae"]
    if hasattr(sae, "estimate_threshold"):
        sample, batch = source.sample.to(device) / scale, driver.tokens_per_step
        sae.estimate_threshold(sample[i:i + batch] for i in range(0, len(sample) - batch + 1, batch))
    held = evaluate_held_out(sae, source.held_out(cfg.batch_size), scale, device)
    saved = make_sae(sae.cfg)
    saved.load_state_dict(sae.state_dict())
    saved.fold_input_scale(scale)
    summary = {**driver.summary(), "held_out": held}
    extra = {**source.provenance, "training": cfg.to_dict(), "sweep_name": folder.name,
             "lr": run["lr"], "summary": summary}
    save_sae(saved, folder, extra_cfg=extra)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _print_summary(console, summaries):
    from rich.table import Table

    table = Table(title="held-out results")
    for col in ("sae", "tokens", "tok/s", "NMSE", "expl. var.", "L0", "dead"):
        table.add_column(col, justify="right" if col != "sae" else "left")
    for name, s in summaries.items():
        h = s["held_out"]
        table.add_row(name, f"{s['tokens']:,}", f"{s['tokens_per_s'] or 0:,.0f}", f"{h.get('nmse', float('nan')):.4f}",
                      f"{h.get('explained_variance', float('nan')):.4f}", f"{h.get('l0', float('nan')):.1f}",
                      f"{h.get('dead_fraction', float('nan')):.3f}")
    console.print(table)
