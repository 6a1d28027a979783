"""`evaluate features --format neuronpedia`: Neuronpedia's feature and activation batch JSONL.

One folder per SAE, neuronpedia/<k>-<name>/, with features/batch-<n>.jsonl and
activations/batch-<n>.jsonl (CHUNK latents per batch, one JSON object per line). Field names are
those of Neuronpedia's bulk export; docs/features.md maps every field to what it holds here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .features_out import CHUNK, _g, latent_record
from .features_stats import HIST_EDGES


def _bin_centre(b: int) -> float:
    """Geometric centre of log bin b (bin 0: half its upper edge; the last: its lower edge)."""
    if b == 0:
        return float(HIST_EDGES[0]) / 2
    if b >= len(HIST_EDGES):
        return float(HIST_EDGES[-1])
    return float(np.sqrt(HIST_EDGES[b - 1] * HIST_EDGES[b]))


def feature_json(rec: dict, logits, f: int, model_id: str, layer: str, vocab: dict) -> dict:
    out = {"modelId": model_id, "layer": layer, "index": str(f), "maxActApprox": rec["max"],
           "frac_nonzero": rec["density"],
           "freq_hist_data_bar_heights": rec["hist"]["counts"],
           "freq_hist_data_bar_values": [_g(_bin_centre(rec["hist"]["lo"] + j))
                                         for j in range(len(rec["hist"]["counts"]))],
           "pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
           "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": []}
    if logits is not None:
        out["pos_str"] = [vocab[str(t)] for t, _ in rec["pos"]]
        out["pos_values"] = [v for _, v in rec["pos"]]
        out["neg_str"] = [vocab[str(t)] for t, _ in rec["neg"]]
        out["neg_values"] = [v for _, v in rec["neg"]]
        lo, hi, n = float(logits["hist_lo"][f]), float(logits["hist_hi"][f]), logits["bins"]
        out["logits_hist_data_bar_heights"] = logits["hist"][f].tolist()
        out["logits_hist_data_bar_values"] = [_g(lo + (hi - lo) * (j + 0.5) / n) for j in range(n)]
    return out


def activation_json(ex: dict, f: int, model_id: str, layer: str, vocab: dict, bin_min, bin_max, contains) -> dict:
    values = [0.0 if v is None else v for v in ex["a"]]
    return {"modelId": model_id, "layer": layer, "index": str(f),
            "tokens": [vocab[str(t)] for t in ex["t"]], "values": values,
            "maxValue": max(values), "maxValueTokenIndex": int(np.argmax(values)), "minValue": min(values),
            "qualifyingTokenIndex": ex["c"], "binMin": bin_min, "binMax": bin_max, "binContains": contains}


def write_neuronpedia(build: Path, per_sae, cfg, ctx, vocab: dict, summary: dict, store) -> None:
    model_id = str(store.attrs.get("model", {}).get("name", "model")).rstrip("/").split("/")[-1]
    for k, (src, logits, nb) in enumerate(per_sae):
        layer = f"{src.site}/{src.name}"
        folder = build / "neuronpedia" / f"{k}-{re.sub(r'[^A-Za-z0-9._-]+', '_', src.name)}"
        (folder / "features").mkdir(parents=True)
        (folder / "activations").mkdir()
        F = src.sae.cfg.d_sae
        for c in range(0, F, CHUNK):
            feats, acts = [], []
            for f in range(c, min(c + CHUNK, F)):
                rec = latent_record(src, f, cfg, ctx, logits, nb)
                feats.append(feature_json(rec, logits, f, model_id, layer, vocab))
                tops = rec["top"]
                for ex in tops:   # top examples: the bin is [N-th top value, max]
                    acts.append(activation_json(ex, f, model_id, layer, vocab, tops[-1]["v"], rec["max"], len(tops)))
                for b in rec["bands"]:
                    for ex in b["ex"]:
                        acts.append(activation_json(ex, f, model_id, layer, vocab, b["lo"], b["hi"], b["count"]))
            n = c // CHUNK
            (folder / "features" / f"batch-{n}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in feats))
            (folder / "activations" / f"batch-{n}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in acts))
