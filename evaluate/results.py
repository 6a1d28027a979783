"""The results of the analyses (`evaluate stitch | meta | geometry`) as the computations return them
and the printers and plots in evaluate/analysis_report.py read them. `to_dict()` is the JSON document
each command writes, key for key; `from_dict()` reads one back (a saved JSON can be re-printed and
re-plotted); `scrubbed()` is the result with credentials removed from every string, which is what
the commands print and write.

Leaf records the computations build row by row (a path step, a decomposition part, a histogram)
stay plain JSON dicts: their keys are documented in docs/evaluate.md and nothing but the report reads them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from sae_harvest.stores.urls import scrub_tree


def _plain(value):
    if isinstance(value, Result):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class Result:
    """to_dict / from_dict / scrubbed for the frozen dataclasses below."""
    _optional: ClassVar[tuple[str, ...]] = ()   # fields left out of the document when None
    _nested: ClassVar[dict] = {}                 # field -> Result class (a list field: [class])

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not (f.name in self._optional and getattr(self, f.name) is None)}

    @classmethod
    def from_dict(cls, doc: dict):
        kw = dict(doc)
        for name, kind in cls._nested.items():
            if kw.get(name) is None:
                continue
            kw[name] = [kind[0].from_dict(v) for v in kw[name]] if isinstance(kind, list) else kind.from_dict(kw[name])
        return cls(**kw)

    def scrubbed(self):
        return type(self).from_dict(scrub_tree(self.to_dict()))


@dataclass(frozen=True)
class SaeRef(Result):
    """Which SAE a report is about."""
    _optional: ClassVar[tuple[str, ...]] = ("d_in",)
    path: str
    arch: str
    d_sae: int
    d_in: int | None = None


# --- stitch ------------------------------------------------------------------------------------
CE_SUMMARY = ("ce_clean", "ce_increase_small", "ce_increase_after_novel", "ce_increase_large")


@dataclass(frozen=True)
class StitchSummary(Result):
    """The paper's claims as numbers (evaluate/stitch.py summarise); the CE fields only when the
    path's CE was measured (--ce-points > 0)."""
    _optional: ClassVar[tuple[str, ...]] = CE_SUMMARY + ("n_dead_small", "n_dead_large")
    n_novel: int
    n_reconstruction: int
    n_groups: int
    n_orphans: int
    mse_small: float
    mse_after_novel: float
    mse_after_swaps: float
    mse_large: float
    l0_small: float
    l0_after_novel: float
    l0_large: float
    novel_steps_lowering_mse: float | None
    swap_steps_lowering_mse: float | None
    largest_step_mse_increase: float
    largest_step_mse_increase_rel: float | None
    novel_alone_lowering_mse: float | None
    reconstruction_alone_raising_mse: float | None
    n_dead_small: int | None = None    # latents firing on none of the tokens (older documents: None)
    n_dead_large: int | None = None
    ce_clean: float | None = None
    ce_increase_small: float | None = None
    ce_increase_after_novel: float | None = None
    ce_increase_large: float | None = None


@dataclass(frozen=True)
class StitchResult(Result):
    """`evaluate stitch`: the latent classes, swap groups and the path (one dict per step:
    evaluate/stitch.py stitch_path)."""
    _optional: ClassVar[tuple[str, ...]] = ("dead_small", "dead_large")
    _nested: ClassVar[dict] = {"small": SaeRef, "large": SaeRef, "summary": StitchSummary}
    config: dict
    model: str
    site: str
    small: SaeRef
    large: SaeRef
    tokens: int
    positions: str
    eval_tokens: dict | None
    threshold: float
    novel: list
    reconstruction: list
    groups: list         # [{"small": [latents], "large": [latents]}]
    orphans: list
    max_cosine: list
    best_small: list
    alone_delta_mse: list
    summary: StitchSummary
    path: list           # [{"step", "phase", "added", "removed", "n_small", "n_large", "latents", "l0", ...}]
    live_only: bool = False          # dead latents left out of the path (older documents: all latents)
    dead_small: list | None = None   # latents firing on none of the tokens (older documents: None)
    dead_large: list | None = None


# --- meta --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetaSaeRef(Result):
    """The meta-SAE of a report and what its cfg.json says it was trained on."""
    path: str
    arch: str
    d_sae: int
    k: int | None
    trained_on: str | None
    trained_on_this_sae: bool | None


@dataclass(frozen=True)
class LatentDecomposition(Result):
    """One SAE latent's meta-latents (largest first, each with its users) and the latents sharing
    the most meta-latents with it (evaluate/meta.py describe)."""
    latent: int
    meta_l0: int
    reconstruction_cosine: float
    decomposition: list   # [{"meta_latent", "value", "used_by", "top_users": [{"latent", "value"}]}]
    sharing: list         # [{"latent", "shared": [meta-latents], "cosine"}]


@dataclass(frozen=True)
class MetaResult(Result):
    """`evaluate meta`."""
    _nested: ClassVar[dict] = {"sae": SaeRef, "meta": MetaSaeRef, "samples": [LatentDecomposition]}
    config: dict
    sae: SaeRef
    meta: MetaSaeRef
    eval_tokens: dict
    meta_l0: float
    explained_variance: float | None
    mean_cosine: float
    latents_without_meta: int
    alive_meta_latents: int
    meta_latent_usage: list
    samples: list[LatentDecomposition]


# --- geometry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SaeGeometry(Result):
    """One SAE of `evaluate geometry`: its nearest-neighbour cosines (a distribution: mean, median,
    p10, p90, hist) and, with --store, its latents' activation frequencies."""
    _optional: ClassVar[tuple[str, ...]] = ("frequency",)
    path: str
    name: str
    site: str | None
    arch: str
    loss: str
    d_in: int
    d_sae: int
    nn_cosine: dict
    frequency: dict | None = None


@dataclass(frozen=True)
class CrossCosines(Result):
    """Each latent of SAE a's max decoder cosine to SAE b's latents, as a distribution."""
    a: str
    b: str
    mean: float
    median: float
    p10: float
    p90: float
    hist: dict


@dataclass(frozen=True)
class GeometryResult(Result):
    """`evaluate geometry`."""
    _nested: ClassVar[dict] = {"saes": [SaeGeometry], "cross": [CrossCosines]}
    config: dict
    saes: list[SaeGeometry]
    cross: list[CrossCosines]
