"""BatchTopK SAE (Bussmann et al. 2024, meta-SAE paper sec. 6).

Training: pre = ReLU((x - b_dec) @ W_enc + b_enc); keep the n*k largest entries of pre over the whole
batch of n tokens (average L0 == k, per-token L0 varies). AuxK as in TopK.
Inference must not depend on the batch: f = pre * (pre > threshold) (JumpReLU). The paper's threshold
is E_batch[min positive kept activation]; we track it as an exponential moving average
(decay cfg.threshold_ema) of that per-batch minimum, updated by every training-mode loss() call, so
estimates from the random-init phase are forgotten rather than averaged in forever.
`threshold` is a [d_sae] buffer (one scalar broadcast, SAELens JumpReLU layout); -1 means "not yet
estimated" (then inference is plain ReLU, since pre >= 0 > -1).
encode() uses BatchTopK while self.training, JumpReLU otherwise (call .eval() for inference).
use_sparse_decode is ignored: the per-token number of active latents varies, so decode stays dense.
"""
from __future__ import annotations

import torch

from sae_harvest.train import distributed
from sae_harvest.train.sae import LossOutput
from sae_harvest.train.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    arch = "batchtopk"
    saelens_architecture = "jumprelu"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.full((cfg.d_sae,), -1.0))

    def batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        return distributed.batch_topk(pre, self.cfg.k)   # over the global batch under torchrun

    def jumprelu(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold.to(pre.dtype))

    def encode(self, x, grad=None):
        pre = self.pre_acts(x)
        return self.batch_topk(pre) if self.training else self.jumprelu(pre)

    def forward(self, x, grad=None):
        return self.decode(self.encode(x))

    def encode_sparse(self, x, grad=None):
        raise NotImplementedError("batchtopk has a variable number of active latents per token")

    def enable_sparse_decode(self):
        return False

    def observe_training_latents(self, feats):
        if self.training:
            self.update_threshold(feats)

    @torch.no_grad()
    def finalize(self, batches):
        self.estimate_threshold(batches)

    def saelens_fields(self):
        return {"inference": "jumprelu with the tracked BatchTopK threshold (batch-independent)"}

    @torch.no_grad()
    def update_threshold(self, feats: torch.Tensor) -> None:
        pos = feats[feats > 0]
        batch_min = distributed.global_min(pos.min() if pos.numel() else feats.new_tensor(float("inf")))
        if torch.isinf(batch_min):
            return
        batch_min = batch_min.to(self.threshold.dtype)
        if self.threshold[0] < 0:
            self.threshold.fill_(batch_min)
        else:
            d = self.cfg.threshold_ema
            self.threshold.mul_(d).add_((1 - d) * batch_min)

    @torch.no_grad()
    def estimate_threshold(self, batches) -> None:
        """Re-estimate the threshold with the final weights: the mean over training batches of the
        smallest activation BatchTopK keeps. The EMA lags behind while the weights still move (on
        short runs it stays far too high), this does not; the trainer calls it at the end."""
        mins = []
        for x in batches:
            feats = self.batch_topk(self.pre_acts(x))
            pos = feats[feats > 0]
            if pos.numel():
                mins.append(pos.min().float())
        if mins:
            self.threshold.fill_(torch.stack(mins).mean().to(self.threshold.dtype))

    def loss(self, x, grad=None, dead_mask=None) -> LossOutput:
        pre = self.pre_acts(x)
        feats = self.batch_topk(pre)   # training objective always uses BatchTopK
        if self.training:
            self.update_threshold(feats)
        x_hat = self.decode(feats)
        return self._loss_terms(x, pre, feats, x_hat, dead_mask)
