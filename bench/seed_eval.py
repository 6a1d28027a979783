"""A bench seed's store and evaluation: the offline default model's store at SITE (harvested once,
shared by the benches), the check that two stores hold out the same sequences, and one seed's SAEs
spliced into the model together on the held-out tokens (bench/pareto.py, bench/jumprelu_gated.py)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from plateau import say
from sae_harvest.evaluate.demo import SITE


def series_key(r: dict) -> str:
    """The sweep folder (relu_cont100 ... merge into relu_cont), plus the g-SAE's gradient mode."""
    folder = Path(r["sae"]).parent.name
    folder = "relu_cont" if folder.startswith("relu_cont") else folder
    return folder + (f"+{r['grad_mode']}" if r.get("grad_mode") not in (None, "none") else "")


def evaluate_seed(paths: list[str], store: str, out: str, tag: str) -> tuple[dict, dict]:
    """(series {key: [points]}, evaluation tokens' origin): the seed's evaluated SAEs spliced into
    the model together, once, on all the store's held-out tokens; results.json beside them."""
    from sae_harvest.evaluate.config import EvalConfig
    from sae_harvest.evaluate.replace import evaluate_all
    from sae_harvest.evaluate.report import write_json

    wall, cpu = time.perf_counter(), time.process_time()
    say(f"[{tag}] evaluate {len(paths)} SAEs spliced into the model on the store's held-out tokens")
    cfg = EvalConfig(saes=tuple(paths), store=store, batch_size=16)
    results = evaluate_all(cfg, progress=False)
    write_json(results, os.path.join(out, "results.json"), config=cfg.to_dict())
    series = {}
    for r in results:
        series.setdefault(series_key(r), []).append(
            {"name": r["name"], "l0": r["l0"], "ce_increase": r["ce_increase"], "kl": r["kl"],
             "alive": r["alive"], "nmse_nobos": r["nmse_nobos"], "grad_mode": r.get("grad_mode"),
             "grad_matched": r.get("grad_matched"), "downstream_mse": r["downstream_mse"],
             "downstream_mse_ln": r["downstream_mse_ln"]})
    origin = results[0]["eval_tokens"] if results else None
    say(f"[{tag}] evaluated {len(results)} rows on {(origin or {}).get('tokens')} held-out tokens: "
        f"{time.perf_counter() - wall:.1f} s (CPU {time.process_time() - cpu:.1f} s)")
    return {k: sorted(v, key=lambda q: q["l0"]) for k, v in series.items()}, origin


def harvest_store(path: str, tokens: int, eval_every: int, grad_target: str = "labels") -> str:
    """The bench's store: the offline default model at SITE only, with gradients (of the labels'
    CE, or label-free: --grad-target model-top1), every eval_every-th sequence held out."""
    from sae_harvest.harvest.default_model import OFFLINE_DATASET, OFFLINE_MODEL
    from sae_harvest.harvest.run import HarvestConfig, harvest

    wall, cpu = time.perf_counter(), time.process_time()
    harvest(HarvestConfig(out=path, model=OFFLINE_MODEL, dataset=OFFLINE_DATASET, sites=SITE, grads=True,
                          grad_target=grad_target, tokens=tokens, ctx_len=128, batch_size=16,
                          shuffle_window=1 << 16, device="auto", eval_every=eval_every),
            resume=True, progress=False)
    say(f"harvest {path} ({tokens:,} tokens, gradients of {grad_target}): {time.perf_counter() - wall:.1f} s "
        f"(CPU {time.process_time() - cpu:.1f} s)")
    return path


def check_same_held_out(store: str, lf_store: str) -> None:
    """Both stores hold out the same sequences with the same tokens (one corpus, one split): what lets
    `evaluate splice` count the label-free g-SAE, trained on lf_store, as trained outside store's split."""
    from sae_harvest.stores import open_store
    from sae_harvest.stores.split import same_held_out

    a, b = open_store(store), open_store(lf_store)
    if a.n_seqs != b.n_seqs or not same_held_out(b, a):
        raise SystemExit(f"{lf_store} does not hold out the same sequences as {store}")


def store_content(path: str) -> dict:
    """What says whether a rerun trained on the same data: the store's content digest (equal only for
    byte-identical shards and the same split and layout; the harvest is deterministic on one machine,
    but the offline default model is trained where it is first used) and the store's provenance
    fingerprints: the model's (its config and sampled weight bytes) and the corpus's (the stream and,
    for local files, their names and sizes; the tokens themselves are in the content digest)."""
    from sae_harvest.stores import open_store
    from sae_harvest.stores.identity import content_digest

    store = open_store(path)
    prov = store.attrs.get("provenance") or {}
    return {"content_digest": content_digest(store),
            "model_fingerprint": (prov.get("model") or {}).get("digest"),
            "corpus_fingerprint": (prov.get("corpus") or {}).get("digest")}
