"""What `evaluate features` writes: logit effects, neighbours, per-latent records, and either the
offline page (features_page) or the Neuronpedia export (features_neuronpedia).

The output is built in a folder beside --out and swapped in when complete; an --out this command
wrote before (its features.json says so) is replaced, anything else was refused up front.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from sae_harvest.stores.urls import scrub_text

from .features_stats import HIST_BINS, HIST_EDGES, mini_hist

MANIFEST = "features.json"   # marks an --out this command wrote
TOOL = "sae_harvest evaluate features"
CHUNK = 128          # latents per data file of the page
LOGITS = 10          # promoted / suppressed tokens per latent
NEIGHBOURS = 5
RESIDUAL_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def _g(v) -> float | None:
    """A float for JSON, 5 significant digits (None for NaN)."""
    v = float(v)
    return None if v != v else float(f"{v:.5g}")


# ---- logit effects and neighbours ----------------------------------------------------------------
def unembedding_directions(model, adapter, dec: torch.Tensor) -> torch.Tensor:
    """Decoder rows as the unembedding sees them through the final norm, weights only: LayerNorm
    (GPT-2) centres a vector and multiplies by its weight; Gemma's RMSNorm multiplies by (1 + w).
    The division by the token's own scale (positive, one number per token) and the norm's bias (the
    same for every latent) change no latent's ranking and are left out."""
    norm = adapter.final_norm
    w = norm.weight.detach().float().to(dec.device)
    if isinstance(norm, torch.nn.LayerNorm):
        return (dec - dec.mean(-1, keepdim=True)) * w
    return dec * (1.0 + w)


def logit_effects(dec: torch.Tensor, W_U: torch.Tensor, chunk: int = 1024, bins: int = 20):
    """Per latent: top LOGITS promoted and suppressed (ids, values), and a histogram of the effect
    on every vocabulary token (bins equal-width between its min and max)."""
    pos_i, pos_v, neg_i, neg_v, hist_h, hist_lo, hist_hi = [], [], [], [], [], [], []
    for lo in range(0, len(dec), chunk):
        eff = dec[lo:lo + chunk] @ W_U.T                       # [c, V]
        top = eff.topk(min(LOGITS, eff.shape[1]), dim=1)
        bot = eff.topk(min(LOGITS, eff.shape[1]), dim=1, largest=False)
        pos_i.append(top.indices.cpu()), pos_v.append(top.values.cpu())
        neg_i.append(bot.indices.cpu()), neg_v.append(bot.values.cpu())
        mn, mx = eff.min(1, keepdim=True).values, eff.max(1, keepdim=True).values
        b = ((eff - mn) / (mx - mn).clamp_min(1e-12) * bins).floor().clamp(0, bins - 1).long()
        h = torch.zeros(len(eff), bins, dtype=torch.int64, device=eff.device).scatter_add_(1, b, torch.ones_like(b))
        hist_h.append(h.cpu()), hist_lo.append(mn.cpu()), hist_hi.append(mx.cpu())
    cat = lambda xs: torch.cat(xs).numpy()   # noqa: E731
    return {"pos_ids": cat(pos_i), "pos_values": cat(pos_v), "neg_ids": cat(neg_i), "neg_values": cat(neg_v),
            "hist": cat(hist_h), "hist_lo": cat(hist_lo)[:, 0], "hist_hi": cat(hist_hi)[:, 0], "bins": bins}


def neighbours(dec: torch.Tensor, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """[F, 5] nearest other latents by decoder cosine and their cosines."""
    u = dec.float() / dec.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = min(NEIGHBOURS, len(u) - 1)
    idx, val = [], []
    for lo in range(0, len(u), chunk):
        cos = u[lo:lo + chunk] @ u.T
        rows = torch.arange(lo, min(lo + chunk, len(u)), device=u.device)
        cos[rows - lo, rows] = -float("inf")
        t = cos.topk(k, dim=1)
        idx.append(t.indices.cpu()), val.append(t.values.cpu())
    return torch.cat(idx).numpy(), torch.cat(val).numpy()


def load_unembedding(store, cfg, dev):
    """(tokenizer, model, adapter) named by --model or the store; weights only, never a forward."""
    from sae_harvest.harvest.default_model import resolve_model
    from sae_harvest.harvest.models import get_adapter, load_model, quiet_transformers

    from .model_identity import model_identity

    stored = store.attrs.get("model", {})
    name = cfg.model or stored.get("name")
    revision = None if cfg.model else stored.get("revision")
    if not name:
        from .splice import EvaluateError
        raise EvaluateError(f"store {cfg.store} names no model; give --model for the tokenizer and unembedding")
    quiet_transformers()
    model, tokenizer = load_model(resolve_model(name), revision=revision, device=dev)
    model_identity(store, name, revision, named_by_user=cfg.model is not None, store=cfg.store,
                   what="the feature browser's tokens and logit effects")
    return tokenizer, model, get_adapter(model)


# ---- records -------------------------------------------------------------------------------------
def _example(ctx, i, slot, value) -> dict | None:
    if ctx.rows[i][slot] < 0:
        return None
    vals, toks = ctx.values[i][slot], ctx.tokens[i][slot]
    inside = toks >= 0
    first = int(np.argmax(inside))
    return {"row": int(ctx.rows[i][slot]), "seq": int(ctx.seqs[i][slot]), "pos": int(ctx.pos[i][slot]),
            "v": _g(value), "c": ctx.before - first, "t": toks[inside].tolist(), "a": [_g(v) for v in vals[inside]]}


def latent_record(src, f: int, cfg, ctx, logits, nb) -> dict:
    st, bd, i = src.stats, src.bands, src.index
    F, N, k = src.sae.cfg.d_sae, cfg.top, cfg.band_examples
    lo, counts = 0, []
    used = np.nonzero(st["hist"][f])[0]
    if len(used):
        lo, hi = int(used[0]), int(used[-1]) + 1
        counts = st["hist"][f][lo:hi].tolist()
    top = [_example(ctx, i, f * N + j, st["top_values"][f, j]) for j in range(N)]
    bands = []
    mx = float(st["max"][f])
    for b in range(cfg.bands):
        slots = [F * N + (f * cfg.bands + b) * k + j for j in range(k)]
        ex = [_example(ctx, i, s, ctx.values[i][s][cfg.before]) for s in slots]
        bands.append({"lo": _g(mx * b / cfg.bands), "hi": _g(mx * (b + 1) / cfg.bands),
                      "count": int(bd["count"][f, b]), "ex": [e for e in ex if e]})
    rec = {"i": f, "density": float(st["density"][f]), "fires": int(st["fires"][f]), "mean": _g(st["mean"][f]),
           "max": _g(mx), "hist": {"lo": lo, "counts": counts}, "top": [e for e in top if e], "bands": bands,
           "nb": [[int(j), _g(c)] for j, c in zip(*nb[f])] if nb else []}
    if logits is not None:
        rec["pos"] = [[int(t), _g(v)] for t, v in zip(logits["pos_ids"][f], logits["pos_values"][f])]
        rec["neg"] = [[int(t), _g(v)] for t, v in zip(logits["neg_ids"][f], logits["neg_values"][f])]
    return rec


def _top_token_ids(ctx, i, f, N, limit=3) -> list[int]:
    out = []
    for j in range(N):
        s = f * N + j
        if ctx.rows[i][s] < 0:
            break
        t = int(ctx.tokens[i][s][ctx.before])
        if t not in out:
            out.append(t)
        if len(out) == limit:
            break
    return out


def index_record(src, cfg, ctx, logits) -> dict:
    st, i, F = src.stats, src.index, src.sae.cfg.d_sae
    return {"name": src.name, "path": src.path, "site": src.site, "arch": src.sae.cfg.arch, "d_sae": F,
            "rows": int(st["rows"]), "chunk": CHUNK, "density": [float(x) for x in st["density"]],
            "mean": [_g(x) for x in st["mean"]], "max": [_g(x) for x in st["max"]],
            "toptok": [_top_token_ids(ctx, i, f, cfg.top) for f in range(F)],
            "toplogit": [logits["pos_ids"][f][:3].tolist() for f in range(F)] if logits is not None else None,
            "mini": [mini_hist(st["hist"][f]) for f in range(F)]}


def vocab_strings(tokenizer, ids) -> dict[str, str]:
    return {str(t): tokenizer.decode([int(t)]) for t in sorted(set(int(x) for x in ids if x >= 0))}


# ---- the whole output ----------------------------------------------------------------------------
def write_output(cfg, store, sources, ctx, dev, seconds: float, write_format) -> dict:
    """Everything but the format's own files, which write_format(build, per_sae, cfg, ctx, vocab,
    summary, store) writes (features_page or features_neuronpedia)."""
    tokenizer, model, adapter = load_unembedding(store, cfg, dev)
    W_U = model.get_output_embeddings().weight.detach().float()
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a fresh folder of our own beside --out: only what this call made is ever removed
    build = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        summary = _write(build, cfg, store, sources, ctx, tokenizer, model, adapter, W_U, seconds, write_format)
        _swap_in(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return summary


def _write(build, cfg, store, sources, ctx, tokenizer, model, adapter, W_U, seconds, write_format) -> dict:
    used = set()
    per_sae = []
    for src in sources:
        dec = src.sae.W_dec.detach().float()
        kind = src.site.rsplit(".", 1)[-1]
        logits = logit_effects(unembedding_directions(model, adapter, dec), W_U.to(dec.device)) \
            if kind in RESIDUAL_KINDS and dec.shape[1] == W_U.shape[1] else None
        nb = neighbours(dec) if len(dec) > 1 else None
        nb = list(zip(*nb)) if nb else None
        toks = ctx.tokens[src.index]
        for a in range(0, len(toks), 1 << 16):   # in steps: the memory-mapped tokens may be large
            used.update(np.unique(toks[a:a + (1 << 16)]).tolist())
        if logits is not None:
            used.update(np.unique(logits["pos_ids"]).tolist() + np.unique(logits["neg_ids"]).tolist())
        per_sae.append((src, logits, nb))
    vocab = vocab_strings(tokenizer, used)
    summary = {"tool": TOOL, "config": cfg.to_dict(), "store": scrub_text(store.path),
               "rows": int(sources[0].stats["rows"]),
               "seconds": round(seconds, 1), "format": cfg.format,
               "hist_edges": HIST_EDGES.tolist(), "hist_bins": HIST_BINS,
               "saes": [{"name": s.name, "path": s.path, "site": s.site, "d_sae": s.sae.cfg.d_sae,
                         "dead": int((s.stats["fires"] == 0).sum()),
                         "median_density": float(np.median(s.stats["density"])),
                         "logits": lg is not None} for s, lg, _ in per_sae]}
    write_format(build, per_sae, cfg, ctx, vocab, summary, store)
    # every file written, so that a later run replaces this folder only while it holds nothing else
    summary["files"] = sorted(str(f.relative_to(build)) for f in build.rglob("*") if f.is_file())
    (build / MANIFEST).write_text(json.dumps(summary, indent=1))
    return summary


def _swap_in(build: Path, out: Path) -> None:
    """Replace --out (empty, absent, or ours: checked before the passes) by the finished build."""
    old = None
    if out.exists():
        if any(out.iterdir()) and not written_by_us(out):    # someone wrote there while we ran
            from .splice import EvaluateError
            raise EvaluateError(f"--out {out} holds files this command did not write (added while it ran); "
                                f"left it as it is")
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        old.rmdir()          # a name no one else holds, for the rename
        out.rename(old)
    build.rename(out)
    if old is not None:
        shutil.rmtree(old)


def written_by_us(p: Path) -> bool:
    """True when p holds an earlier output of this command and nothing else: its manifest names
    this tool and lists every file there (a note or screenshot added later makes it not ours)."""
    try:
        manifest = json.loads((p / MANIFEST).read_text())
        listed = set(manifest["files"]) | {MANIFEST}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return False
    if manifest.get("tool") != TOOL:
        return False
    for f in p.rglob("*"):
        if f.is_symlink() or (f.is_file() and str(f.relative_to(p)) not in listed):
            return False
    return True


def latent_url(out: str, sae: int, latent: int) -> str:
    return Path(out).absolute().joinpath("index.html").as_uri() + f"#sae={sae}&latent={latent}"


def print_summary(summary: dict, out: str, say=None) -> None:
    say = say or (lambda s: print(s, file=sys.stderr))
    say(f"{summary['rows']:,} rows in {summary['seconds']:,.0f} s")
    for s in summary["saes"]:
        say(f"  {s['name']} ({s['site']}, {s['d_sae']} latents): {s['dead']} never fire, "
            f"median density {s['median_density']:.2e}{'' if s['logits'] else ', no logit effects (site kind)'}")
