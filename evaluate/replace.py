"""Splicing transcoders (and several dictionaries at once) into the live model.

A transcoder reads its input site (blocks.L.mlp_in) and writes its target site (blocks.L.mlp_out):
in the spliced forward the target's activation is replaced by the transcoder's prediction from the
input site's *live* value, i.e. the value the model computes in that same forward, after every
replacement upstream. So errors compound as in real use. An SAE is the special case input =
target = its site (the prediction is its reconstruction of the live activation).

`evaluate splice` sends every transcoder here, and with `--all-at-once` every dictionary given
(SAEs and transcoders) is also spliced together in one forward: one extra result row, "all at once".
Each row reports, on the same tokens as `evaluate splice`:
  ce_clean, ce_spliced, ce_increase (nats, positions predicting tokens 1..T-1), kl (clean || spliced),
  ce_zero_ablation and loss_recovered_zero (the written sites zeroed instead),
  nmse: sum ||y_hat - y||^2 / sum ||y||^2 of the written site, y being what the model itself computes
  there from the same live input (so the transcoder's own error, not the upstream drift),
  l0 and alive latents.
Position 0 keeps its clean value unless --splice-bos, and the NMSE/L0 are over positions >= 1
(dictionaries are trained without position 0), as in evaluate/splice.py.
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_harvest.evaluate.config import EvalConfig
from sae_harvest.evaluate.replace_clt import clt_row
from sae_harvest.evaluate.replace_scores import Tally, forward_log_probs, keep_pos0, replacement_row, score_replacements
from sae_harvest.evaluate.splice import EvaluateError, Live, evaluate_saes, open_live
from sae_harvest.stores.urls import scrub


def _sae_field(path: str, name: str):
    """sae_harvest.sae.<name> from cfg.json alone, before anything is loaded (None if absent)."""
    d = Path(path)
    d = d.parent if d.is_file() else d
    try:
        cfg = json.loads((d / "cfg.json").read_text())
        return ((cfg.get("sae_harvest") or {}).get("sae") or {}).get(name)
    except (OSError, ValueError, AttributeError):
        return None   # load_sae reports unreadable folders with their own message


def is_transcoder_folder(path: str) -> bool:
    return bool(_sae_field(path, "d_out"))


def is_crosscoder_folder(path: str) -> bool:
    return bool(_sae_field(path, "n_sites"))


def is_clt_folder(path: str) -> bool:
    return bool(_sae_field(path, "clt_layers"))


@dataclass
class Replacement:
    """One dictionary spliced in: reads `read` live, writes `write`."""
    name: str
    path: str
    module: torch.nn.Module
    read: object                    # harvest.sites.Site
    write: object
    d_sae: int
    arch: str

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, latents) for rows x [n, d_in]."""
        feats = self.module.encode(x)
        out = self.module.decode(feats)
        if getattr(self.module, "is_transcoder", False):
            out = out + self.module.skip_out(x)
        return out, feats


def replacement_of(entry, adapter) -> Replacement:
    """A Replacement for an attached evaluate.splice.Entry; a transcoder's target is checked here."""
    from sae_harvest.harvest.errors import HarvestError
    from sae_harvest.harvest.sites import Site

    sae, ours = entry.sae, entry.cfg.get("sae_harvest") or {}
    name = ours.get("sweep_name") or Path(entry.path).name
    if not getattr(sae, "is_transcoder", False):
        return Replacement(name, entry.path, sae, entry.site, entry.site, sae.cfg.d_sae, sae.cfg.arch)
    try:
        target = Site.parse(str(ours.get("target")))
    except HarvestError as e:
        raise EvaluateError(f"{entry.path}: transcoder target: {e}") from None
    if not 0 <= target.layer < adapter.n_layers:
        raise EvaluateError(f"{entry.path}: target {target.name} is not in the model ({adapter.n_layers} layers)")
    if adapter.site_width(target.kind) != sae.cfg.d_out:
        raise EvaluateError(f"{entry.path}: transcoder d_out {sae.cfg.d_out} != width "
                            f"{adapter.site_width(target.kind)} of its target {target.name} in this model")
    if not entry.site < target:
        raise EvaluateError(f"{entry.path}: transcoder reads {entry.site.name} after it writes {target.name}: "
                            f"its input must come first in the forward pass")
    arch = f"{'skip_' if sae.cfg.skip else ''}transcoder ({sae.cfg.arch})"
    return Replacement(name, entry.path, sae, entry.site, target, sae.cfg.d_sae, arch)


def spliced_forward(model, ids, reps: list[Replacement], splice_bos: bool, zero: bool = False,
                    tallies: list[Tally] | None = None) -> torch.Tensor:
    """Log-probs of one forward with every replacement in `reps` active (zero=True: their written
    sites zeroed instead), adding each one's NMSE / L0 terms to `tallies` (same order) if given."""
    from sae_harvest.harvest.sites import record, splice

    with ExitStack() as stack:
        reads = [r.read for r in reps if r.read != r.write]
        live = stack.enter_context(record(model, sorted(set(reads)))) if reads else {}
        for i, r in enumerate(reps):
            tally = tallies[i] if tallies is not None else None
            stack.enter_context(splice(model, r.write, _writer(r, live, splice_bos, zero, tally)))
        return forward_log_probs(model, ids)


def _writer(r: Replacement, live: dict, splice_bos: bool, zero: bool, tally: Tally | None):
    def write(a):
        if zero:
            return keep_pos0(torch.zeros_like(a), a, splice_bos)
        x = a if r.read == r.write else live[r.read.name]
        rows = x.reshape(-1, x.shape[-1]).to(r.module.W_dec.dtype)
        y_hat, feats = r.predict(rows)
        y_hat = y_hat.view(*a.shape[:-1], -1).to(a.dtype)
        if tally is not None:
            tally.add(y_hat[:, 1:], a[:, 1:], feats.view(*a.shape[:-1], -1)[:, 1:])
        return keep_pos0(y_hat, a, splice_bos)
    return write


def evaluate_replacements(live: Live, reps: list[Replacement], groups: list[list[int]], batch_size: int,
                          splice_bos: bool) -> list[dict]:
    """One result per group of replacement indices (spliced together), all on live.ids; a joint row
    also holds each member's NMSE / L0 inside that joint forward ("per_dictionary")."""
    model = live.model
    tallies = [[Tally() for _ in group] for group in groups]

    def forwards(ids):
        return forward_log_probs(model, ids), [
            lambda zero, members=[reps[j] for j in group], t=t: spliced_forward(
                model, ids, members, splice_bos, zero=zero, tallies=None if zero else t)
            for group, t in zip(groups, tallies)]

    results = []
    for group, t, scores in zip(groups, tallies, score_replacements(live, batch_size, forwards)):
        members = [reps[j] for j in group]
        one = len(group) == 1
        row = {**replacement_row(live, members[0].name if one else "all at once",
                                 scrub(members[0].path) if one else [scrub(r.path) for r in members],
                                 members[0].arch if one else "all at once", _site_label(members), splice_bos, scores),
               "d_sae": sum(r.d_sae for r in members)}
        per = {r.name: {"site": _site_label([r]), **tally.metrics()} for r, tally in zip(members, t)}
        if one:
            row.update(per[members[0].name])
        else:
            row.update({"nmse": None, "l0": sum(p["l0"] or 0 for p in per.values()),
                        "alive": sum(p["alive"] for p in per.values()), "per_dictionary": per})
        results.append(row)
    return results


def _site_label(reps: list[Replacement]) -> str:
    return ", ".join(r.write.name if r.read == r.write else f"{r.read.name}->{r.write.name}" for r in reps)


def evaluate_all(cfg: EvalConfig, *, progress=True, console=None) -> list[dict]:
    """`evaluate splice`: SAEs through evaluate_saes (every metric of evaluate/splice.py), transcoders
    here, and with cfg.all_at_once one more row with every dictionary spliced together."""
    if not cfg.saes:
        raise EvaluateError("no SAE given (--sae PATH)")
    crosscoders = [p for p in cfg.saes if is_crosscoder_folder(p) or is_clt_folder(p)]   # whole-model ones
    transcoders = [p for p in cfg.saes if is_transcoder_folder(p)]
    plain = [p for p in cfg.saes if p not in transcoders and p not in crosscoders]
    if not transcoders and not crosscoders and not cfg.all_at_once:
        return evaluate_saes(cfg, progress=progress, console=console)
    if crosscoders and cfg.all_at_once:
        raise EvaluateError("--all-at-once does not take crosscoders or CLTs: they already splice all their "
                            "sites at once; evaluate them on their own")
    spliced = [p for p in cfg.saes if p not in crosscoders]
    live = open_live(spliced, cfg)   # the one model every row below is spliced into
    reps = [replacement_of(e, live.adapter) for e in live.entries]
    written = [r.write for r in reps]
    if cfg.all_at_once and len(set(written)) < len(written):
        raise EvaluateError("--all-at-once: two dictionaries write the same site "
                            f"({', '.join(sorted({s.name for s in written if written.count(s) > 1}))})")
    saes = [e for p, e in zip(spliced, live.entries) if p not in transcoders]
    results = evaluate_saes(dataclasses.replace(cfg, saes=tuple(plain)), progress=progress, console=console,
                            live=dataclasses.replace(live, entries=saes)) if plain else []
    crossed = [(clt_row if is_clt_folder(p) else crosscoder_row)(live, p, cfg.batch_size, cfg.splice_bos)
               for p in crosscoders]
    index = {p: i for i, p in enumerate(spliced)}
    groups = [[index[p]] for p in transcoders] + ([list(range(len(reps)))] if cfg.all_at_once else [])
    rows = evaluate_replacements(live, reps, groups, cfg.batch_size, cfg.splice_bos) if groups else []
    for r in crossed + rows:   # how many evaluation tokens and where from, as evaluate_saes's rows say
        r["eval_tokens"] = live.origin
    by_name = {r["sae"]: r for r in rows if isinstance(r["sae"], str)}
    return results + [by_name[scrub(p)] for p in transcoders] + crossed + \
        [r for r in rows if r["name"] == "all at once"]


def crosscoder_row(live: Live, path: str, batch_size: int, splice_bos: bool) -> dict:
    """A crosscoder spliced at every one of its sites at once. Its latents need every site, and a
    later site does not exist yet when an earlier one is replaced, so they are computed from a
    clean forward; the reconstructions then replace all the sites in one spliced forward.
    NMSE per site is against the clean activations (positions >= 1)."""
    from sae_harvest.harvest.errors import HarvestError
    from sae_harvest.harvest.sites import Site, record, splice
    from sae_harvest.train.sae_io import load_sae

    cc = load_sae(path, device=live.device)
    d = Path(path)
    d = d.parent if d.is_file() else d
    try:
        sites = [Site.parse(str(s)) for s in json.loads((d / "cfg.json").read_text())["sae_harvest"]["sites"]]
    except (HarvestError, KeyError, TypeError, ValueError) as e:
        raise EvaluateError(f"{path}: crosscoder sites unreadable ({e})") from None
    for site in sites:
        if not 0 <= site.layer < live.adapter.n_layers or live.adapter.site_width(site.kind) * len(sites) != cc.cfg.d_in:
            raise EvaluateError(f"{path}: crosscoder site {site.name} does not fit this model "
                                f"(d_in {cc.cfg.d_in} over {len(sites)} sites)")
    model, tallies = live.model, [Tally() for _ in sites]

    def forwards(ids):
        with record(model, sites) as rec:
            clean = forward_log_probs(model, ids)
        xs = [rec[s.name] for s in sites]
        feats = cc.encode(torch.cat(xs, -1).reshape(-1, cc.cfg.d_in).to(cc.W_dec.dtype))
        parts = cc.decode(feats).split(cc.cfg.d_in // len(sites), -1)
        feats = feats.view(*ids.shape, -1)
        recons = [p.view_as(x).to(x.dtype) for p, x in zip(parts, xs)]
        for t, r, x in zip(tallies, recons, xs):
            t.add(r[:, 1:], x[:, 1:], feats[:, 1:])

        def spliced(zero: bool):
            with ExitStack() as stack:
                for s, r in zip(sites, recons):
                    v = torch.zeros_like(r) if zero else r
                    stack.enter_context(splice(model, s, lambda a, v=v: keep_pos0(v, a, splice_bos)))
                return forward_log_probs(model, ids)
        return clean, [spliced]

    (scores,) = score_replacements(live, batch_size, forwards)
    per = {s.name: t.metrics() for s, t in zip(sites, tallies)}
    return {**replacement_row(live, d.name, scrub(path), f"crosscoder ({cc.cfg.arch})",
                              ", ".join(s.name for s in sites), splice_bos, scores),
            "d_sae": cc.cfg.d_sae, "l0": per[sites[0].name]["l0"], "alive": per[sites[0].name]["alive"],
            "nmse": sum(t.err for t in tallies) / max(sum(t.norm2 for t in tallies), 1e-30), "per_site": per}
