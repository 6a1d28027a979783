"""Several dictionaries from one pass over a store: an SAE (or a sweep) per site, and transcoders.

`train fit --site 'blocks.*.resid_pre'` (a comma list or globs over the store's sites, as `harvest
--sites` takes) trains one SAE or sweep per matched site; `--target SITE` makes each a transcoder
from --site to --target (train/transcoder.py). The sites are columns of the same rows, so one feed
reads every block of every site array once (and the position array once, not once per site) and
every dictionary steps on its own columns of the same batch. Each site keeps its own input scale
(E||x / s|| = sqrt(d) per site), b_dec init and seed, exactly as a single-site run would: a K-site
run gives the same SAEs as K single-site runs with the same seed (tests/test_multisite.py).

Folders: `<out>/<site>-<sweep name>` for SAEs, `<out>/<site>-<target>-<[skip_]transcoder>_<sweep name>`
for transcoders; each cfg.json records its site (hook_name) and, for a transcoder, its target.
Data parallel, --sweep-parallel (the dictionaries of every site dealt over the ranks) and --resume
work as for one site: the step loop is train/driver.py's.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_harvest.stores import open_store
from sae_harvest.stores.artifacts import write_artifact
from sae_harvest.stores.layout import acts_path, grads_path
from sae_harvest.stores.urls import scrub
from sae_harvest.train import distributed
from sae_harvest.train.batchtopk import THRESHOLD_ROWS
from sae_harvest.train.config import TrainConfig, sweep
from sae_harvest.train.clt import CLT_ARCHS
from sae_harvest.train.clt_shard import CLTShard, finish_shard, shard_step, sharded_sites
from sae_harvest.train.multisite_fit import clt_runs, crosscoder_runs, finish_clt, finish_crosscoder
from sae_harvest.train.crosscoder import CROSSCODER_ARCHS
from sae_harvest.train.driver import Driver
from sae_harvest.train.errors import TrainError
from sae_harvest.train.feeds import StoreFeed, as_tensor, held_out_origin
from sae_harvest.train.local import StoreSource, _finish, _info, _print_summary, _step
from sae_harvest.train.registry import make_sae
from sae_harvest.train.init_streams import checkpoint_stream
from sae_harvest.train.runs import Run, build_runs, input_scale, new_run, seed_init
from sae_harvest.train.sae_io import save_sae
from sae_harvest.train.stacked import StackedRuns, stack_groups
from sae_harvest.train.transcoder import TRANSCODER_ARCHS


@dataclass(frozen=True)
class Pair:
    """One dictionary family of the run: the encoder reads `site`; the decoder writes `target`
    (None: the site itself, an SAE)."""
    site: str
    target: str | None = None


def is_multisite(cfg: TrainConfig) -> bool:
    """Whether this module trains the run: several sites, a glob, or a transcoder target."""
    return bool(cfg.target) or cfg.skip or cfg.crosscoder or cfg.clt or any(ch in (cfg.site or "") for ch in ",*?[")


def _site_order(name: str):
    from sae_harvest.harvest.sites import Site

    try:
        return (0, Site.parse(name))
    except Exception:   # a store's own non-block name, if any: after the block sites
        return (1, name)


def match_sites(spec: str, sites: list[str], option: str, store: str) -> list[str]:
    """Comma list of names and fnmatch globs over the store's sites -> sorted (layer, forward order)."""
    items = [item.strip() for item in str(spec).split(",") if item.strip()]
    if not items:
        raise TrainError(f"{option} is empty; the store has: {', '.join(sites)}")
    found = set()
    for item in items:
        matched = fnmatch.filter(sites, item) if any(ch in item for ch in "*?[") else \
            ([item] if item in sites else [])
        if not matched:
            raise TrainError(f"{option} {item!r} matches no site in store {scrub(store)}; it has: {', '.join(sites)}")
        found.update(matched)
    return sorted(found, key=_site_order)


def plan_pairs(cfg: TrainConfig, store) -> list[Pair]:
    """The (site, target) pairs a run trains; a TrainError (one line) for anything that does not fit."""
    if cfg.site is None:
        raise TrainError("give --site (a name, a comma list or globs) with --target")
    inputs = match_sites(cfg.site, store.sites, "--site", cfg.store)
    if cfg.crosscoder:
        return _check_crosscoder(cfg, store, inputs)
    if not cfg.target:
        if cfg.clt:
            raise TrainError("--clt needs --target: the MLP outputs (e.g. --site 'blocks.*.mlp_in' "
                             "--target 'blocks.*.mlp_out')")
        if cfg.skip:
            raise TrainError("--skip is for transcoders: give --target too")
        return [Pair(site) for site in inputs]
    if cfg.arch not in TRANSCODER_ARCHS:
        raise TrainError(f"--target: --arch {cfg.arch} cannot be a transcoder; transcoders take "
                         f"{', '.join(TRANSCODER_ARCHS)}")
    targets = match_sites(cfg.target, store.sites, "--target", cfg.store)
    if len(targets) != len(inputs):
        raise TrainError(f"--site matches {len(inputs)} sites and --target {len(targets)}: they pair one to one "
                         f"in layer order ({', '.join(inputs)} / {', '.join(targets)})")
    pairs = [Pair(s, t) for s, t in zip(inputs, targets)]
    same = [p.site for p in pairs if p.site == p.target]
    if same:
        raise TrainError(f"--target {same[0]} is its own --site: that is an SAE, drop --target")
    if cfg.clt:
        _check_clt(cfg, store, pairs)
    return pairs


def _check_clt(cfg: TrainConfig, store, pairs: list[Pair]) -> None:
    """A CLT needs one (input, target) pair per layer of the same width, every layer from the first
    to the last present, each target in its input's layer."""
    from sae_harvest.harvest.sites import Site

    if cfg.arch not in CLT_ARCHS:
        raise TrainError(f"--clt: --arch {cfg.arch} cannot be a cross-layer transcoder; CLTs take {', '.join(CLT_ARCHS)}")
    if cfg.skip:
        raise TrainError("--clt has no --skip")
    layers = [Site.parse(p.site).layer for p in pairs]
    for p in pairs:
        if Site.parse(p.target).layer != Site.parse(p.site).layer:
            raise TrainError(f"--clt: target {p.target} is not in the layer of its input {p.site}")
    missing = sorted(set(range(min(layers), max(layers) + 1)) - set(layers))
    if missing or len(set(layers)) != len(layers):
        raise TrainError(f"--clt needs every layer from {min(layers)} to {max(layers)}: store {scrub(cfg.store)} lacks "
                         f"layer{'s' * (len(missing) != 1)} {', '.join(map(str, missing)) or '(a layer twice)'} "
                         f"at {cfg.site} / {cfg.target}")
    widths = {store.width(s) for p in pairs for s in (p.site, p.target)}
    if len(widths) > 1:
        raise TrainError(f"--clt needs inputs and targets of one width; got {sorted(widths)}")


def _check_crosscoder(cfg: TrainConfig, store, inputs: list[str]) -> list[Pair]:
    if cfg.target or cfg.skip:
        raise TrainError("--crosscoder reconstructs its own sites: drop --target / --skip")
    if cfg.arch not in CROSSCODER_ARCHS:
        raise TrainError(f"--crosscoder: --arch {cfg.arch} cannot be a crosscoder; crosscoders take "
                         f"{', '.join(CROSSCODER_ARCHS)}")
    if len(inputs) < 2:
        raise TrainError(f"--crosscoder needs at least two sites; --site matches {', '.join(inputs)}")
    widths = {s: store.width(s) for s in inputs}
    if len(set(widths.values())) > 1:
        raise TrainError("--crosscoder needs sites of one width; got "
                         + ", ".join(f"{s} ({w})" for s, w in widths.items()))
    return [Pair(s) for s in inputs]


def count_dictionaries(cfg: TrainConfig) -> int:
    """How many site pairs a run trains (1 for a plain single-site run): the sweep-parallel check."""
    if not is_multisite(cfg) or not cfg.store or cfg.crosscoder or cfg.clt:
        return 1
    return len(plan_pairs(cfg, open_store(cfg.store)))


CROSS = "crosscoder"   # the one Pair of a --crosscoder run stands for all its sites
CLT = "clt"            # likewise for a --clt run


def run_name(pair: Pair, sweep_name: str, cfg: TrainConfig) -> str:
    if pair.site in (CROSS, CLT):
        return f"{pair.site}_{sweep_name}"
    if pair.target is None:
        return f"{pair.site}-{sweep_name}"
    return f"{pair.site}-{pair.target}-{'skip_' if cfg.skip else ''}transcoder_{sweep_name}"


def claim_runs(built: dict, pair: Pair, cfg: TrainConfig, world, runs: dict, order: list) -> list[str]:
    """Name each of `built` (run_name) and append it to `order`, the same list on every rank; put in
    `runs` the ones this rank trains (all of them unless --sweep-parallel spreads them over the ranks
    by their index in `order`). The names put in `runs`."""
    kept = []
    for sweep_name, run in built.items():
        name = run_name(pair, sweep_name, cfg)
        order.append(name)
        if world.sweep_parallel and world.owner(len(order) - 1) != world.rank:
            continue
        run.name = name
        runs[name] = run
        kept.append(name)
    return kept


class MultiFeed(StoreFeed):
    """StoreFeed over several sites: yields {"acts": {site: tensor}, "grads": {site: tensor} | None},
    every site's columns of the same rows, read in one pass (train/feeds.py StoreFeed for one,
    whose `direct` / `pin`, read-ahead and resume state this shares: reads straight into
    PinnedBuffers, or copies pinned)."""

    def __init__(self, store, sites: list[str], batch_size: int, **kw):
        super().__init__(store, sites, batch_size, **kw)
        self.sites = sites

    def _tensors(self):
        enc = self.iter.encodings
        convert = self.buffers.tensor if self.buffers is not None else as_tensor
        for batch in self.iter:
            acts = {s: convert(batch["acts"][s], enc[acts_path(s)]) for s in self.sites}
            grads = {s: convert(batch["grads"][s], enc[grads_path(s)]) for s in self.sites} if self.grads else None
            if self.pin and self.buffers is None:
                acts = {s: a.pin_memory() for s, a in acts.items()}
                grads = {s: g.pin_memory() for s, g in grads.items()} if grads else None
            yield {"acts": acts, "grads": grads}, self.iter.state()


def _transcoder_runs(cfg, pair: Pair, sources, scales, device) -> dict[str, Run]:
    """One Run per swept value, seeded like an SAE's; b_dec starts at the target's geometric median."""
    src, tgt = sources[pair.site], sources[pair.target]
    x, y = src.sample / scales[pair.site], tgt.sample / scales[pair.target]
    runs = {}
    for name, sae_cfg in sweep(cfg, src.d_in):
        sae_cfg = dataclasses.replace(sae_cfg, d_out=tgt.d_in, skip=cfg.skip)
        # its own stream (train/init_streams.py): transcoders of a sweep, or of two layers, never share rows
        origin = seed_init(cfg, sae_cfg, pair.site, target=pair.target, d_out=tgt.d_in, skip=cfg.skip)
        sae = make_sae(sae_cfg)
        if cfg.init:
            _load_init(sae, cfg.init, scales[pair.site], scales[pair.target])
            origin = {"scheme": "checkpoint", "from": scrub(cfg.init), "stream": checkpoint_stream(cfg.init)}
        else:
            sae.init_b_dec(y, cfg.b_dec_init)
        sae.calibrate(x, None)
        runs[name] = new_run(cfg, name, sae, origin, device)
    return runs


def _load_init(sae, path: str, in_scale: float, out_scale: float) -> None:
    """--init for a transcoder: the same kind and widths, its raw-activation weights unfolded into
    the training space."""
    from sae_harvest.train.sae_io import load_sae

    init = load_sae(path)
    want, got = sae.cfg, init.cfg
    if (got.arch, got.d_in, got.d_sae, got.d_out, got.skip) != (want.arch, want.d_in, want.d_sae, want.d_out, want.skip):
        raise TrainError(f"--init {scrub(path)} is a {got.arch} {got.d_in}->{got.d_sae}->{got.d_out or got.d_in} "
                         f"{'skip transcoder' if got.skip else 'transcoder' if got.d_out else 'SAE'}; this run trains a "
                         f"{want.arch} {want.d_in}->{want.d_sae}->{want.d_out} {'skip ' if want.skip else ''}transcoder")
    init.fold_scales(1.0 / in_scale, 1.0 / out_scale)
    sae.load_state_dict(init.state_dict())


def fit_multisite(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                  console=None, device=None, on_step=None, world=distributed.World()) -> dict:
    """Train every (site, target) pair's sweep in one pass; {folder name: summary} (rank 0 under torchrun)."""
    if cfg.decoder_of:
        raise TrainError("--decoder-of trains a meta-SAE on one SAE's decoder: drop --target / the site list")
    if cfg.loss != "local":
        raise TrainError(f"--loss {cfg.loss} trains one site (or one --site/--target transcoder) at a time; several "
                         f"sites, crosscoders and CLTs take --loss local")
    if not cfg.store:
        raise TrainError("give --store")
    out = Path(cfg.out)
    pairs = plan_pairs(cfg, open_store(cfg.store))
    needed = sorted({s for p in pairs for s in (p.site, p.target) if s}, key=_site_order)
    sources = {s: StoreSource(dataclasses.replace(cfg, site=s, target=None)) for s in needed}
    scales = {s: input_scale(src.sample, cfg.normalize) for s, src in sources.items()}
    first = sources[pairs[0].site]
    tokens = cfg.tokens or first.epoch_tokens * (cfg.epochs or 1)
    batch = min(cfg.batch_size, first.epoch_tokens)
    if batch % world.size and not world.sweep_parallel and not world.shards:
        raise TrainError(f"the global batch of {batch} rows does not divide over {world.size} ranks")
    total_steps = max(1, tokens // batch)
    dead_after = max(batch, min(cfg.dead_tokens, tokens // 4))

    runs, pair_of, order = {}, {}, []
    cross = [p.site for p in pairs] if cfg.crosscoder else []
    clt = pairs if cfg.clt else []
    for pair in ([Pair(CROSS)] if cross else [Pair(CLT)] if clt else pairs):
        if pair.site == CROSS:
            built = crosscoder_runs(cfg, cross, sources, scales, device)
        elif pair.site == CLT:
            built = clt_runs(cfg, clt, sources, scales, device, world)
        elif pair.target is None:
            src = sources[pair.site]
            built = build_runs(dataclasses.replace(cfg, site=pair.site), src.d_in, src.sample, src.grad_sample,
                               device, scales[pair.site])
        else:
            built = _transcoder_runs(cfg, pair, sources, scales, device)
        pair_of.update((name, pair) for name in claim_runs(built, pair, cfg, world, runs, order))

    try:   # SAEs of one shape, of any of the sites, step as one stacked module (train/stacked.py)
        groups = stack_groups(cfg.stack_sweep, runs, device, sites=pair_of, refuse=not world.sweep_parallel)
    except ValueError as e:
        raise TrainError(str(e)) from None
    label = f"train {len(pairs)} sites" + (f" (rank {world.rank}: {len(runs)} of {len(order)})"
                                           if world.sweep_parallel else "")
    # every dictionary folds its own site's scale; the driver's single scale stays 1
    driver = Driver(cfg, out, runs, scale=1.0, total_steps=total_steps, tokens_per_step=batch, label=label,
                    world=world, store=first.store)
    feed_state = driver.prepare(resume, overwrite, device)
    part = (0, 1) if world.sweep_parallel or world.shards else (world.rank, world.size)
    shard, own, needed = sharded_sites(runs, clt, needed)   # --shard-decoders: this rank's layers' sites only
    feed = MultiFeed(first.store, needed, batch, seed=cfg.seed, grads=first.grads,
                     exclude_pos0=first.exclude_pos0, state=feed_state, part=part, pin=device.type == "cuda")
    autocast = cfg.autocast == "on" or (cfg.autocast == "auto" and device.type == "cuda")
    stacks = [(StackedRuns([runs[n] for n in names]), [pair_of[n].site for n in names]) for names in groups]
    loose = {n: run for n, run in runs.items() if not any(n in names for names in groups)}

    def prepare(data):
        x = {s: a.to(device, non_blocking=True).float() / scales[s] for s, a in data["acts"].items()}
        g = {s: a.to(device, non_blocking=True).float() * scales[s]
             for s, a in data["grads"].items()} if data["grads"] is not None else {}
        return x, g

    def step_fn(inputs, factor, log_now, reducer):
        x, g = inputs
        joint = torch.cat([x[s] for s in cross], -1) if cross else None   # a crosscoder's input
        for stack, sites in stacks:   # one site's sweep shares its rows; SAEs of several sites get [S, n, d]
            rows = x[sites[0]] if len(set(sites)) == 1 else torch.stack([x[s] for s in sites])
            stack.step(rows, factor, cfg.grad_clip, dead_after, autocast, log_now, reducer)
        for name, run in loose.items():
            pair = pair_of[name]
            if pair.site == CROSS:
                _step(run, joint, None, factor, cfg, dead_after, autocast, log_now, reducer=reducer)
                continue
            if pair.site == CLT and shard is not None:
                shard_step(run, torch.cat([x[p.site] for p in own], -1), torch.cat([x[p.target] for p in own], -1),
                           factor, cfg, dead_after, autocast, log_now)
                continue
            if pair.site == CLT:
                _step(run, torch.cat([x[p.site] for p in clt], -1), None, factor, cfg, dead_after, autocast,
                      log_now, target=torch.cat([x[p.target] for p in clt], -1), reducer=reducer)
                continue
            target = x[pair.target] if pair.target else None
            _step(run, x[pair.site], g.get(pair.site), factor, cfg, dead_after, autocast, log_now, target=target,
                  reducer=reducer)

    driver.run(feed, prepare, step_fn, lambda: _info(runs), progress=progress, console=console, on_step=on_step)
    sharded = {name: finish_shard(run, clt, sources, scales, run.sae.plan, cfg, device)
               for name, run in runs.items() if isinstance(run.sae, CLTShard)}   # collective
    if not driver.writes:
        if sharded:
            driver.finish()   # each rank checkpoints its own slice
        return {}
    summaries = {}
    for name, run in runs.items():
        pair = pair_of[name]
        if pair.site == CLT:
            summaries[name] = finish_clt(run, clt, sources, scales, out / name, cfg, device, driver,
                                         sharded.get(name))
        elif pair.site == CROSS:
            summaries[name] = finish_crosscoder(run, cross, sources, scales, out / name, cfg, device, driver)
        elif pair.target is None:
            summaries[name] = _finish(run, sources[pair.site], out / name, cfg, scales[pair.site], device, driver)
        else:
            summaries[name] = _finish_transcoder(run, pair, sources, scales, out / name, cfg, device, driver)
    driver.finish()
    summaries = driver.gather(summaries, order)
    if progress and console is not None:
        _print_summary(console, summaries)
    return summaries


def held_out_prediction(sae, store, pair: Pair, scales, batch_size: int, exclude_pos0: bool, device) -> dict:
    """The target's NMSE and FVU (1 - explained variance), L0 and dead fraction on the rows of the
    store's held-out sequences (stores/split.py), in the training space (both sites divided by their
    scales): the SAEs' report loop (train/held_out.py), with its cap on the rows read."""
    from sae_harvest.train import held_out

    return held_out.held_out_prediction(sae, store, pair.site, pair.target, scales, batch_size, exclude_pos0, device)


def _finish_transcoder(run: Run, pair: Pair, sources, scales, folder: Path, cfg, device, driver) -> dict:
    sae, src = run.sae, sources[pair.site]
    sae.finalize(x.to(device) / scales[pair.site] for x in src.threshold_rows(THRESHOLD_ROWS))
    held = held_out_prediction(sae, src.store, pair, scales, cfg.batch_size, src.exclude_pos0, device)
    if held:
        held["origin"] = held_out_origin(src.store, tokens=held["held_out_tokens"])
    summary = {**driver.summary(), "held_out": held, "input_scale": scales[pair.site],
               "target_scale": scales[pair.target]}
    saved = make_sae(run.cfg)
    saved.load_state_dict(sae.state_dict())
    saved.fold_scales(scales[pair.site], scales[pair.target])
    from sae_harvest.train.saelens_format import tl_hook_name

    extra = {**src.provenance, "init": run.init, "target": pair.target, "hook_name_out": tl_hook_name(pair.target),
             "training": cfg.to_dict(), "sweep_name": folder.name, "lr": run.lr, "summary": summary,
             "world_size": summary.get("world_size", 1), "sweep_parallel": summary.get("sweep_parallel", False),
             "rank": summary.get("rank")}
    save_sae(saved, folder, extra_cfg=extra)
    write_artifact(folder / "summary.json", summary)
    return summary
