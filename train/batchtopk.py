"""BatchTopK SAE (Bussmann et al. 2024, meta-SAE paper sec. 6).

Training: pre = ReLU((x - b_dec) @ W_enc + b_enc); keep the n*k largest entries of pre over the whole
batch of n tokens (average L0 == k, per-token L0 varies). AuxK as in TopK.
Inference must not depend on the batch: f = pre * (pre > threshold) (JumpReLU). During training we
track the paper's threshold, E_batch[min positive kept activation], as an exponential moving average
(decay cfg.threshold_ema), updated by every training-mode loss() call (a running diagnostic only).
At the end the trainer calls finalize() with >= THRESHOLD_ROWS training rows: the saved threshold is
the cutoff of BatchTopK over all of them at once (the (N*k)-th largest pre-activation of N rows), so
the inference L0 on those rows is k whatever the training batch size was, and the lagging EMA is
replaced.
`threshold` is a [d_sae] buffer (one scalar broadcast, SAELens JumpReLU layout); -1 means "not yet
estimated" (then inference is plain ReLU, since pre >= 0 > -1).
encode() is always the inference rule (JumpReLU with the threshold); encode_train() is the training
selection (BatchTopK over the batch, global under data parallel through its `reducer`), which the
trainers ask for explicitly; neither looks at self.training.
use_sparse_decode is ignored: the per-token number of active latents varies, so decode stays dense.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_harvest.train.distributed import LOCAL, Reducer
from sae_harvest.train.sae import LossOutput
from sae_harvest.train.sae_config import hyper
from sae_harvest.train.sparse_topk import SparsePre
from sae_harvest.train.topk import TopKConfig, TopKSAE

THRESHOLD_ROWS = 100_000   # rows the final threshold is estimated from (fewer only if the data has fewer)
_CANDIDATE_FACTOR = 4      # per chunk, keep 4x its share of the n*k kept values as candidates


@dataclass(frozen=True)
class BatchTopKConfig(TopKConfig):
    threshold_ema: float = hyper(0.99, "EMA decay of the threshold tracked while training (a diagnostic: the "
                                       "saved threshold is re-estimated from the final weights).", sweep=True)

    def check(self):
        super().check()
        if not 0 <= self.threshold_ema <= 1:   # also refuses nan
            raise ValueError(f"{self.arch} needs 0 <= threshold_ema <= 1, got {self.threshold_ema}")


class BatchTopKSAE(TopKSAE):
    arch = "batchtopk"
    saelens_architecture = "jumprelu"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((cfg.d_sae,), -1.0))

    def batch_topk(self, pre: torch.Tensor, reducer: Reducer = LOCAL) -> torch.Tensor:
        return reducer.batch_topk(pre, self.cfg.k)   # over the global batch under data parallel

    def jumprelu(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold.to(pre.dtype))

    def encode(self, x, grad=None):
        return self.jumprelu(self.pre_acts(x))

    def encode_train(self, x, grad=None, reducer: Reducer = LOCAL):
        return self.batch_topk(self.pre_acts(x), reducer)

    def forward(self, x, grad=None):
        return self.decode(self.encode(x))

    def encode_sparse(self, x, grad=None):
        raise NotImplementedError("batchtopk has a variable number of active latents per token")

    def enable_sparse_decode(self):
        return False

    def observe_training_latents(self, feats, reducer: Reducer = LOCAL):
        self.update_threshold(feats, reducer)

    @torch.no_grad()
    def finalize(self, batches):
        self.estimate_threshold(batches)

    def saelens_fields(self):
        return {"inference": "jumprelu with the tracked BatchTopK threshold (batch-independent)"}

    @torch.no_grad()
    def update_threshold(self, feats: torch.Tensor, reducer: Reducer = LOCAL) -> None:
        pos = feats[feats > 0]
        batch_min = reducer.global_min(pos.min() if pos.numel() else feats.new_tensor(float("inf")))
        if torch.isinf(batch_min):
            return
        batch_min = batch_min.to(self.threshold.dtype)
        if self.threshold[0] < 0:
            self.threshold.fill_(batch_min)
        else:
            d = self.cfg.threshold_ema
            self.threshold.mul_(d).add_((1 - d) * batch_min)

    @torch.no_grad()
    def estimate_threshold(self, batches) -> int:
        """Set the threshold to BatchTopK's cutoff over every row of `batches` taken together: the
        (N*k)-th largest pre-activation of the N rows, so JumpReLU keeps on average k per row there.
        Streams: each chunk contributes its top 4*n*k values as candidates; that is exact unless a
        chunk holds more than 4x its share of the global top N*k (checked: then it raises).
        Returns N (0: no rows, threshold unchanged)."""
        cands, cutoffs, n_rows = [], [], 0
        for x in batches:
            pre = self.pre_acts(x).flatten().float()
            m = min(_CANDIDATE_FACTOR * len(x) * self.cfg.k, pre.numel())
            vals = pre.topk(m, sorted=False).values
            cands.append(vals[vals > 0])
            cutoffs.append(vals.min() if m < pre.numel() else pre.new_tensor(-1.0))
            n_rows += len(x)
        if n_rows == 0:
            return 0
        allv = torch.cat(cands)
        want = n_rows * self.cfg.k
        if allv.numel() == 0:
            return n_rows   # nothing ever fires: leave the threshold as it is
        theta = allv.topk(want).values.min() if allv.numel() > want else allv.new_zeros(())
        if allv.numel() > want and max(float(c) for c in cutoffs) > float(theta):
            raise RuntimeError("batchtopk threshold estimate: one chunk held over 4x its share of the "
                               "kept activations; use more, smaller chunks")
        self.threshold.fill_(float(theta))
        return n_rows

    def training_latents(self, x, reducer: Reducer = LOCAL):
        """(pre, feats, values_at) of BatchTopK over the (global) batch, the training objective's
        selection. Sparse backward: feats are built from the kept values alone, which carry the
        gradient; finding them (nonzero) reads their count on the host (one GPU sync a step)."""
        if not self.use_sparse_backward:
            pre = self.pre_acts(x)
            return pre, self.batch_topk(pre, reducer), None
        enc = SparsePre(self, x)
        rows, cols = (self.batch_topk(enc.pre, reducer) > 0).nonzero(as_tuple=True)
        feats = torch.zeros_like(enc.pre).index_put((rows, cols), enc.at(rows, cols))
        return enc.pre, feats, enc.gather

    def loss(self, x, grad=None, dead_mask=None, reducer: Reducer = LOCAL) -> LossOutput:
        pre, feats, values_at = self.training_latents(x, reducer)   # the training objective is BatchTopK's
        if self.training:   # the tracked threshold follows training steps only
            self.update_threshold(feats, reducer)
        x_hat = self.decode(feats)
        return self._loss_terms(x, pre, feats, x_hat, dead_mask, values_at, reducer)
