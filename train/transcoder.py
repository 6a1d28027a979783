"""Transcoders and skip transcoders: an encoder reads one site, the decoder predicts another.

    f     = sparse(x @ W_enc + b_enc)            x = the input site (e.g. blocks.L.mlp_in), d_in wide
    y_hat = f @ W_dec + b_dec [+ x @ W_skip^T]   y = the target site (blocks.L.mlp_out), d_out wide
    loss  = mean_n ||y - y_hat||^2 + the architecture's sparsity / auxiliary term

"Transcoders find interpretable LLM feature circuits" (Dunefsky et al. 2024) for the transcoder;
"Transcoders beat sparse autoencoders for interpretability" (Paulo et al. 2025) for the skip
(`--skip`: a learned linear map of the input added to the output, W_skip starting at zero).

Any sparsity of TRANSCODER_ARCHS works, with the same meaning as for an SAE: relu (L1 lambda/d_in
on the latents), topk and batchtopk (k, AuxK on dead latents against the target's residual),
jumprelu (L0 lambda through the straight-through estimators). The encoder never subtracts b_dec
(it lives in the output space): apply_b_dec_to_input is False, as SAELens requires of transcoders.

Normalisation: the trainer divides x by s_x and y by s_y, each one constant so that
E||x / s_x|| = sqrt(d_in) and E||y / s_y|| = sqrt(d_out) (the SAE convention per site), so the MSE is
the target's squared error summed over d_out in that space and lambda means the same as for an SAE.
Saving folds both back (fold_scales): the saved weights take raw x and return raw y, same latents.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sae_harvest.train.batchtopk import BatchTopKSAE
from sae_harvest.train.distributed import LOCAL, Reducer
from sae_harvest.train.jumprelu import JumpReLUSAE
from sae_harvest.train.relu import ReLUSAE, init_encoder_scale
from sae_harvest.train.sae import LossOutput, recon_loss
from sae_harvest.train.topk import TopKSAE, auxk_loss

BASES = {cls.arch: cls for cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE)}
TRANSCODER_ARCHS = tuple(BASES)
# SAELens 6 registers these transcoder architectures (sae_lens/saes/transcoder.py); the TopK family
# has none there, so topk / batchtopk transcoders are saved in our format only.
SAELENS_TRANSCODERS = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
                       ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder"}


class TranscoderMixin:
    """Put in front of an SAE architecture (see transcoder_class); cfg.d_out > 0 is the target's width."""

    apply_b_dec_to_input = False
    trains_e2e = False
    is_transcoder = True

    def __init__(self, cfg):
        super().__init__(cfg)   # the base builds an SAE's [d_sae, d_in] decoder: replace it
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_out))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in))   # SAELens's layout
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # no tie (input and output spaces differ): unit-norm random rows for both, and relu's d/F
        # encoder factor so that about half the latents firing do not blow up the first output
        nn.init.kaiming_uniform_(self.W_dec, a=math.sqrt(5))
        self.set_decoder_norm_to_unit_norm()
        enc = torch.empty(self.W_enc.shape[1], self.W_enc.shape[0], device=self.W_enc.device)
        nn.init.kaiming_uniform_(enc, a=math.sqrt(5))
        self.W_enc.copy_((enc / enc.norm(dim=-1, keepdim=True).clamp_min(1e-8)).T)
        if isinstance(self, ReLUSAE):
            self.W_enc.mul_(init_encoder_scale(self.cfg))

    def skip_out(self, x: torch.Tensor) -> torch.Tensor | int:
        return x @ self.W_skip.T if self.cfg.skip else 0

    def forward(self, x, grad=None):
        """The prediction of the target site from the input site."""
        return self.decode(self.encode(x)) + self.skip_out(x)

    def latents(self, x: torch.Tensor, reducer: Reducer = LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-activations, training latents): what loss() sparsifies, per architecture."""
        if isinstance(self, ReLUSAE):
            pre = x @ self.W_enc + self.b_enc
            return pre, F.relu(pre)
        pre = self.pre_acts(x)
        if isinstance(self, BatchTopKSAE):
            feats = self.batch_topk(pre, reducer)
            if self.training:
                self.update_threshold(feats, reducer)
            return pre, feats
        if isinstance(self, TopKSAE):
            vals, idx = self.select(pre)
            return pre, torch.zeros_like(pre).scatter(-1, idx, vals)
        return pre, self._jumprelu(pre)

    def loss(self, x, grad=None, dead_mask=None, target=None, reducer: Reducer = LOCAL) -> LossOutput:
        if target is None:
            raise ValueError("a transcoder's loss needs the target site's activations")
        pre, feats = self.latents(x, reducer)
        y_hat = self.decode(feats) + self.skip_out(x)
        mse = recon_loss(target, y_hat)
        terms = {"mse": mse, "l0": (feats > 0).float().sum(-1).mean()}
        if isinstance(self, JumpReLUSAE):
            terms["sparsity"] = self.l0_penalty(pre, feats)
        elif isinstance(self, ReLUSAE):
            terms["sparsity"] = self.sparsity_penalty(feats)
            terms["l1"] = feats.abs().sum(-1).mean()
        else:   # TopK family: AuxK predicts the target's residual from the dead latents
            terms["aux"] = self.cfg.aux_coeff * auxk_loss(self, pre, (target - y_hat).detach(), dead_mask,
                                                           reducer=reducer)
        loss = sum(terms[n] for n in ("mse", "sparsity", "aux") if n in terms)
        return LossOutput(loss, {n: t.detach() for n, t in terms.items()}, feats, y_hat)

    @torch.no_grad()
    def fold_scales(self, in_scale: float, out_scale: float) -> None:
        """Trained on x / s_x -> y / s_y; afterwards takes raw x and returns raw y, same latents:
        W_enc /= s_x; W_dec, b_dec *= s_y; W_skip *= s_y / s_x."""
        self.W_enc /= in_scale
        self.W_dec *= out_scale
        self.b_dec *= out_scale
        if self.cfg.skip:
            self.W_skip *= out_scale / in_scale

    def fold_input_scale(self, scale: float) -> None:
        self.fold_scales(scale, scale)

    def saelens_fields(self) -> dict:
        return {**super().saelens_fields(), "d_out": self.cfg.d_out}


_CLASSES: dict[tuple[str, bool], type] = {}


def transcoder_class(arch: str, skip: bool = False) -> type:
    """The transcoder (or skip transcoder) with `arch`'s sparsity, e.g. TopKTranscoder."""
    if arch not in BASES:
        raise ValueError(f"no transcoder for arch {arch!r}; transcoders take {', '.join(TRANSCODER_ARCHS)}")
    key = (arch, bool(skip))
    if key not in _CLASSES:
        base = BASES[arch]
        name = f"{'Skip' if skip else ''}{base.__name__.removesuffix('SAE')}Transcoder"
        # ours for the TopK family; a different name, so a loader never mistakes it for an SAE
        saelens = SAELENS_TRANSCODERS.get(key, f"{arch}_{'skip_' if skip else ''}transcoder")
        _CLASSES[key] = type(name, (TranscoderMixin, base), {"saelens_architecture": saelens})
    return _CLASSES[key]
