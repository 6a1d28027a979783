"""Building, reporting and saving the multi-site dictionaries of train/multisite.py: cross-layer
transcoders (train/clt.py) and crosscoders (train/crosscoder.py)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from sae_harvest.train.batchtopk import THRESHOLD_ROWS
from sae_harvest.train.clt_shard import CLTShard, shard_plan
from sae_harvest.train.config import sweep
from sae_harvest.train.registry import make_sae
from sae_harvest.train.feeds import held_out_origin
from sae_harvest.train.held_out import HeldOutSums
from sae_harvest.train.runs import Run, new_run, seed_init
from sae_harvest.train.sae_io import save_sae


def clt_runs(cfg, pairs, sources, scales, device, world=None) -> dict[str, Run]:
    """One Run per swept value; --d-sae / --expansion count latents per layer. --shard-decoders
    (world.shards): each is built whole, on the host, exactly as one process builds it, and this
    rank keeps its slice of source layers (train/clt_shard.py)."""
    n = len(pairs)
    y = torch.cat([sources[p.target].sample / scales[p.target] for p in pairs], -1)
    d = sources[pairs[0].site].d_in
    runs = {}
    for name, sae_cfg in sweep(cfg, d):
        sae_cfg = dataclasses.replace(sae_cfg, d_in=n * d, d_sae=n * sae_cfg.d_sae, clt_layers=n)
        origin = seed_init(cfg, sae_cfg, ",".join(p.site for p in pairs), clt_layers=n,
                           targets=[p.target for p in pairs])
        clt = make_sae(sae_cfg)
        clt.init_b_dec(y)
        clt.calibrate(None)
        if world is not None and world.shards:
            plan = shard_plan(sae_cfg, world.size)
            clt = CLTShard(clt, plan[world.rank], world.rank, world.size)
            clt.plan = plan
        runs[name] = new_run(cfg, name, clt, origin, device)
    return runs


@torch.no_grad()
def held_out_layers(clt, store, pairs, scales, batch_size: int, exclude_pos0: bool, device) -> dict:
    """Per target layer NMSE of the CLT's prediction (training space), L0 per layer, dead fraction, on
    the rows of the store's held-out sequences (stores/split.py)."""
    clt.eval()
    sites = [s for p in pairs for s in (p.site, p.target)]
    sums = HeldOutSums(range(len(pairs)), clt.cfg.d_sae, device, double_sums=True)
    for b in store.batches(sites, batch_size, seqs="held_out", exclude_pos0=exclude_pos0, epochs=1, drop_last=False):
        x = torch.cat([torch.from_numpy(b["acts"][p.site]).to(device) / scales[p.site] for p in pairs], -1)
        feats = clt.encode(x)
        for t, (p, y_hat) in enumerate(zip(pairs, clt.decode_layers(feats))):
            sums.add(t, y_hat, torch.from_numpy(b["acts"][p.target]).to(device) / scales[p.target])
        sums.add_latents(feats)
    clt.train()
    if sums.count == 0:
        return {}
    err, norm2, count = list(sums.err.values()), list(sums.norm2.values()), sums.count
    total = sum(sums.centred(t) for t in range(len(pairs)))
    return {"held_out_tokens": count, "nmse": sum(err) / sum(norm2), "explained_variance": 1 - sum(err) / total,
            "per_layer": {p.target: {"nmse": e / m} for p, e, m in zip(pairs, err, norm2)},
            "l0": sums.l0 / count, "l0_per_layer": sums.l0 / count / len(pairs),
            "dead_fraction": sums.dead_fraction()}


def finish_clt(run: Run, pairs, sources, scales, folder: Path, cfg, device, driver, sharded=None) -> dict:
    """sharded: clt_shard.finish_shard's result (its held-out report and the gathered weights)."""
    clt, src = run.sae, sources[pairs[0].site]
    held = sharded["held_out"] if sharded else \
        held_out_layers(clt, src.store, pairs, scales, cfg.batch_size, src.exclude_pos0, device)
    if held:
        held["origin"] = held_out_origin(src.store, tokens=held["held_out_tokens"])
    summary = {**driver.summary(), "held_out": held,
               "parameters": sharded["parameters"] if sharded else clt.parameter_count(),
               "input_scales": {p.site: scales[p.site] for p in pairs},
               "target_scales": {p.target: scales[p.target] for p in pairs}}
    if sharded:
        summary["shards"] = sharded["ranks"]
    saved = make_sae(run.cfg)
    saved.load_state_dict(sharded["state"] if sharded else clt.state_dict())
    saved.fold_scales([scales[p.site] for p in pairs], [scales[p.target] for p in pairs])
    extra = {**src.provenance, "init": run.init, "sites": [p.site for p in pairs], "targets": [p.target for p in pairs],
             "training": cfg.to_dict(), "sweep_name": folder.name, "lr": run.lr, "summary": summary,
             "world_size": summary.get("world_size", 1), "sweep_parallel": summary.get("sweep_parallel", False),
             "rank": summary.get("rank")}
    save_sae(saved, folder, extra_cfg=extra)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# --- crosscoders (train/crosscoder.py) -----------------------------------------------------------
def crosscoder_runs(cfg, sites: list[str], sources, scales, device) -> dict[str, Run]:
    """One Run per swept value over the concatenation of the sites (each divided by its own scale)."""
    x = torch.cat([sources[s].sample / scales[s] for s in sites], -1)
    runs = {}
    for name, sae_cfg in sweep(cfg, x.shape[1]):
        sae_cfg = dataclasses.replace(sae_cfg, n_sites=len(sites))
        origin = seed_init(cfg, sae_cfg, ",".join(sites), n_sites=len(sites))
        sae = make_sae(sae_cfg)
        sae.init_b_dec(x, cfg.b_dec_init)
        sae.calibrate(x, None)
        runs[name] = new_run(cfg, name, sae, origin, device)
    return runs


@torch.no_grad()
def held_out_sites(sae, store, sites: list[str], scales, batch_size: int, exclude_pos0: bool, device) -> dict:
    """Per site NMSE and explained variance of the crosscoder's reconstruction, plus L0 and dead
    fraction, on the rows of the store's held-out sequences (stores/split.py; training space)."""
    sae.eval()
    sums = HeldOutSums(sites, sae.cfg.d_sae, device)
    for b in store.batches(sites, batch_size, seqs="held_out", exclude_pos0=exclude_pos0, epochs=1, drop_last=False):
        xs = [torch.from_numpy(b["acts"][s]).to(device) / scales[s] for s in sites]
        feats = sae.encode(torch.cat(xs, -1))
        for s, x, x_hat in zip(sites, xs, sae.decode(feats).split([x.shape[1] for x in xs], -1)):
            sums.add(s, x_hat, x)
        sums.add_latents(feats)
    sae.train()
    if sums.count == 0:
        return {}
    err, norm2 = sums.err, sums.norm2
    per_site = {s: {"nmse": err[s] / norm2[s], "explained_variance": 1 - err[s] / sums.centred(s)} for s in sites}
    return {"held_out_tokens": sums.count, "nmse": sum(err.values()) / sum(norm2.values()), "per_site": per_site,
            "l0": sums.l0 / sums.count, "dead_fraction": sums.dead_fraction()}


def finish_crosscoder(run: Run, sites: list[str], sources, scales, folder: Path, cfg, device, driver) -> dict:
    sae, src = run.sae, sources[sites[0]]
    # every site's threshold rows come in the same seeded order: zip them into the concatenation
    chunks = zip(*(sources[s].threshold_rows(THRESHOLD_ROWS) for s in sites))
    sae.finalize(torch.cat([x.to(device) / scales[s] for s, x in zip(sites, xs)], -1) for xs in chunks)
    held = held_out_sites(sae, src.store, sites, scales, cfg.batch_size, src.exclude_pos0, device)
    if held:
        held["origin"] = held_out_origin(src.store, tokens=held["held_out_tokens"])
    summary = {**driver.summary(), "held_out": held, "input_scales": {s: scales[s] for s in sites}}
    saved = make_sae(run.cfg)
    saved.load_state_dict(sae.state_dict())
    saved.fold_site_scales([scales[s] for s in sites])
    extra = {**src.provenance, "init": run.init, "sites": sites, "training": cfg.to_dict(), "sweep_name": folder.name, "lr": run.lr,
             "summary": summary, "world_size": summary.get("world_size", 1),
             "sweep_parallel": summary.get("sweep_parallel", False), "rank": summary.get("rank")}
    save_sae(saved, folder, extra_cfg=extra)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
