"""Cross-layer transcoders (CLTs): layer L's latents read layer L's MLP input and write into the MLP
output of layer L and of every later layer.

    f_L   = sparse(x_L @ W_enc[L] + b_enc[L])                     x_L: mlp_in (or resid_mid) of layer L
    y^_T  = sum_{L <= T} f_L @ W_dec_L[:, T - L] + b_dec[T]       y_T: mlp_out of layer T
    loss  = sum_T mean_n ||y_T - y^_T||^2 (+ AuxK for TopK, lambda * L0 for JumpReLU)

As in Anthropic's "Circuit Tracing: Revealing Computational Graphs in Language Models" (2025) and
circuit-tracer. The trainer hands the module the n input sites concatenated, x [N, n*d], and the n
targets concatenated, y [N, n*d] (each site divided by its own scale, E||x_L / s|| = sqrt(d)), so it
trains through the same step as an SAE or a transcoder. Its config is its arch's (TopKConfig,
JumpReLUConfig) with clt_layers = n, d_in = n*d,
d_sae = n*F (F latents per layer), k = active latents per layer (topk), l1_coeff = lambda (jumprelu).

Layout, for sharding the decoders over GPUs later (docs/training.md): decoders are stored per source
layer, W_dec_L [F, n - L, d] (circuit-tracer's), so the target axis can be split over ranks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sae_harvest.train.jumprelu import JumpReLUFunction, StepFunction
from sae_harvest.train.sae import LossOutput, recon_loss

CLT_ARCHS = ("topk", "jumprelu")


class CrossLayerTranscoder(nn.Module):
    saelens_architecture = ""   # set per arch below: ours, SAELens has no CLT
    apply_b_dec_to_input = False
    uses_grads = False
    trains_e2e = False
    is_clt = True
    adam_betas = (0.9, 0.999)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        n = self.n = cfg.clt_layers
        d, f = cfg.d_in // n, cfg.d_sae // n
        self.d, self.f = d, f
        self.W_enc = nn.Parameter(torch.empty(n, d, f))
        self.b_enc = nn.Parameter(torch.zeros(n, f))
        for layer in range(n):
            self.register_parameter(f"W_dec_{layer}", nn.Parameter(torch.empty(f, n - layer, d)))
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        if cfg.arch == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n, f), math.log(max(cfg.threshold_init, 1e-8))))
        self.saelens_architecture = f"{cfg.arch}_clt"
        self.reset_parameters()

    @classmethod
    def default_lr(cls, d_sae: int) -> float:
        return 5e-4

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # unit-norm random encoder columns; decoders scaled so n layers' writes start small
        nn.init.normal_(self.W_enc)
        self.W_enc /= self.W_enc.norm(dim=1, keepdim=True).clamp_min(1e-8)
        for layer in range(self.n):
            w = self.decoder(layer)
            nn.init.normal_(w)
            w /= w.norm(dim=-1, keepdim=True).clamp_min(1e-8) * math.sqrt(self.n)

    def decoder(self, layer: int) -> torch.Tensor:
        return getattr(self, f"W_dec_{layer}")

    # ---- latents ----
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """[N, n*d] -> [N, n, F]"""
        return torch.einsum("bld,ldf->blf", x.view(len(x), self.n, self.d), self.W_enc) + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.arch == "jumprelu":
            return JumpReLUFunction.apply(pre, self.log_threshold.exp().to(pre.dtype), self.cfg.bandwidth)
        pre = F.relu(pre)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)   # k per layer
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer `layer`'s latents [N, F] from its own input [N, d] (the replacement model's step)."""
        pre = x @ self.W_enc[layer] + self.b_enc[layer]
        if self.cfg.arch == "jumprelu":
            return pre * (pre > self.log_threshold[layer].exp().to(pre.dtype))
        pre = F.relu(pre)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    def write_layer(self, feats: dict, target: int) -> torch.Tensor:
        """y^_target [N, d] from {layer: latents [N, F]} of every layer <= target."""
        out = self.b_dec[target]
        for layer in range(target + 1):
            out = out + feats[layer] @ self.decoder(layer)[:, target - layer]
        return out

    def encode(self, x: torch.Tensor, grad=None) -> torch.Tensor:
        """[N, n*d] -> [N, n*F]: every layer's latents side by side."""
        return self.activate(self.pre_acts(x)).flatten(1)

    def decode_layers(self, feats: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Per target layer T (< upto), y^_T [N, d] from the latents [N, n, F] of layers <= T."""
        feats = feats.view(len(feats), self.n, self.f)
        upto = self.n if upto is None else upto
        outs = [self.b_dec[t].expand(len(feats), self.d) for t in range(upto)]
        for layer in range(upto):
            w = self.decoder(layer)[:, :upto - layer]                    # [F, targets, d]
            writes = torch.einsum("bf,ftd->btd", feats[:, layer], w)
            for j in range(w.shape[1]):
                outs[layer + j] = outs[layer + j] + writes[:, j]
        return outs

    def decode(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.decode_layers(feats), -1)

    def forward(self, x, grad=None):
        return self.decode(self.encode(x))

    def loss(self, x, grad=None, dead_mask=None, target=None, reducer=None) -> LossOutput:
        if target is None:
            raise ValueError("a CLT's loss needs the targets (every layer's MLP output)")
        pre = self.pre_acts(x)
        feats = self.activate(pre)
        y_hat = self.decode(feats.flatten(1))
        mse = recon_loss(target, y_hat)
        terms = {"mse": mse, "l0": (feats > 0).float().sum((-2, -1)).mean()}
        if self.cfg.arch == "jumprelu":
            count = StepFunction.apply(pre, self.log_threshold.exp().to(pre.dtype), self.cfg.bandwidth)
            terms["sparsity"] = self.cfg.l1_coeff * count.sum((-2, -1)).mean()
        loss = mse + terms.get("sparsity", 0)
        return LossOutput(loss, {n: t.detach() for n, t in terms.items()}, feats.flatten(1), y_hat)

    @property
    def W_dec(self) -> torch.Tensor:   # what dtype/device checks read (the first layer's decoder)
        return self.W_dec_0

    # ---- what the trainers call on every SAE ----
    @torch.no_grad()
    def calibrate(self, x, grad=None) -> None:
        # jumprelu: theta starts at sqrt(lambda), the L0 penalty's fixed point (train/jumprelu.py)
        if self.cfg.arch == "jumprelu" and self.cfg.l1_coeff > 0:
            self.log_threshold.fill_(math.log(max(self.cfg.threshold_init, math.sqrt(self.cfg.l1_coeff))))

    def finalize(self, batches) -> None:
        pass

    def enable_sparse_decode(self) -> bool:
        return False

    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        pass   # decoder norms are free: nothing renormalises them

    def set_decoder_norm_to_unit_norm(self) -> None:
        pass

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor, method: str = "mean") -> None:
        self.b_dec.copy_(sample.float().mean(0).view(self.n, self.d).to(self.b_dec.dtype))

    @torch.no_grad()
    def fold_scales(self, in_scales: list[float], out_scales: list[float]) -> None:
        """Trained on x_L / s_L -> y_T / t_T; afterwards raw in, raw out, same latents."""
        for layer in range(self.n):
            self.W_enc[layer] /= in_scales[layer]
            w = self.decoder(layer)
            for j in range(w.shape[1]):
                w[:, j] *= out_scales[layer + j]
            self.b_dec[layer] *= out_scales[layer]

    def saelens_fields(self) -> dict:
        return {"clt_layers": self.n, "d_model": self.d, "d_latents_per_layer": self.f}

    def saelens_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_saelens_state_dict(self, tensors) -> None:
        self.load_state_dict(tensors)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
