"""The SAE step against the machine: FLOPs and bytes per token of a TopK step (dense or sparse
decode and backward), a table of peaks per device, and on a CPU the peaks measured in the same
run (a matmul and a copy microbenchmark). bench/train.py and bench/train_parts.py print it.

FLOPs per token (multiply-adds count 2), TopK d_in -> d_sae, k active, batch n:
    encoder forward                 2 d_in d_sae                  (always dense: top-k needs every latent)
    decoder forward                 2 d_sae d_in  | sparse: 2 k d_in
    decoder backward (W_dec, feats) 4 d_sae d_in  | sparse: 4 k d_in
    encoder backward (W_enc, input) 4 d_in d_sae  | sparse: 4 k d_in  (train/sparse_topk.py)
    optimizer + constraint          ~ 20 FLOPs per parameter per step / n
Bytes per token (memory traffic, one pass per tensor an op reads or writes; a model, not a
measurement): the input (4 d_in); pre-activations written, rectified, read by top-k (4 passes of
d_sae at the compute dtype's width); dense decode: the scattered latents written and read (2
passes); dense backward: the pre-activations' gradient (4 passes at 4 B); per step, over n
tokens: the parameters read forward, read backward, gradients written, and Adam (params, grads,
two moments read; params and moments written): 11 passes of 4 B over the 2 d_in d_sae parameters.
"""
from __future__ import annotations

import time

import torch

# (substring of torch.cuda.get_device_name(), device, dense bf16 tensor TFLOP/s, fp32 TFLOP/s,
# memory TB/s): vendors' datasheet figures, without structured sparsity. First match wins.
PEAKS = [
    ("H200", "H200 SXM", 989.0, 67.0, 4.8),
    ("H100 PCIe", "H100 PCIe", 756.0, 51.0, 2.0),
    ("H100 NVL", "H100 NVL", 835.0, 60.0, 3.9),
    ("H100", "H100 SXM", 989.0, 67.0, 3.35),
    ("A100-SXM4-80GB", "A100 SXM 80GB", 312.0, 19.5, 2.04),
    ("A100-PCIE-80GB", "A100 PCIe 80GB", 312.0, 19.5, 1.94),
    ("A100", "A100 40GB", 312.0, 19.5, 1.56),
    ("L40S", "L40S", 362.0, 91.6, 0.864),
    ("L4", "L4", 121.0, 30.3, 0.3),
    ("A10", "A10", 125.0, 31.2, 0.6),
]


def step_cost(d_in: int, d_sae: int, k: int, batch: int, *, sparse_decode: bool, sparse_backward: bool,
              bf16: bool) -> dict:
    """{"flops": per token, "bytes": per token, "parts": {part: flops per token}}."""
    mm = 2 * d_in * d_sae
    sp = 2 * k * d_in
    params = 2 * d_in * d_sae + d_sae + d_in
    parts = {"encoder forward": mm,
             "decoder forward": sp if sparse_decode else mm,
             "decoder backward": 2 * (sp if sparse_decode else mm),
             "encoder backward": 2 * sp if sparse_backward else 2 * mm,
             "optimizer": 20 * params / batch}
    width = 2 if bf16 else 4
    per_token = 4 * d_in + 4 * d_sae * width
    if not sparse_decode:
        per_token += 2 * d_sae * width
    if not sparse_backward:
        per_token += 4 * d_sae * 4
    per_step = 11 * 4 * params
    return {"flops": sum(parts.values()), "bytes": per_token + per_step / batch, "parts": parts}


def device_peaks(device: torch.device, bf16: bool) -> dict:
    """{"device", "tflops", "tb_s", "source"}: the table's row on CUDA, measured on a CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, label, tf_bf16, tf_fp32, tb_s in PEAKS:
            if key in name:
                return {"device": f"{name} ({label})", "tflops": tf_bf16 if bf16 else tf_fp32, "tb_s": tb_s,
                        "source": "datasheet"}
        return {"device": name, "tflops": None, "tb_s": None, "source": "not in bench/roofline.py PEAKS"}
    return {"device": f"cpu ({torch.get_num_threads()} threads)", **measure_cpu(bf16), "source": "measured"}


def measure_cpu(bf16: bool, size: int = 1024, seconds: float = 1.0) -> dict:
    """The CPU's matmul rate (square size^2 matmuls at the step's dtype) and copy bandwidth
    (read + write of a 256 MiB tensor), measured now: what the step can reach on this box."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    tflops = 2 * size ** 3 * n / (time.perf_counter() - t0) / 1e12
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        dst.copy_(src)
        n += 1
    tb_s = 2 * src.numel() * 4 * n / (time.perf_counter() - t0) / 1e12
    return {"tflops": tflops, "tb_s": tb_s}


def roofline(tok_s: float, cost: dict, peaks: dict) -> dict:
    """Achieved TFLOP/s and GB/s at tok_s, the fraction of the device's peaks, and the roofline's
    bound on tokens/s (the lower of compute and memory) with the fraction of it reached."""
    out = {"flops_per_token": cost["flops"], "bytes_per_token": cost["bytes"],
           "intensity_flops_per_byte": cost["flops"] / cost["bytes"],
           "achieved_tflops": tok_s * cost["flops"] / 1e12, "achieved_tb_s": tok_s * cost["bytes"] / 1e12, **peaks}
    if peaks.get("tflops"):
        bound = min(peaks["tflops"] * 1e12 / cost["flops"], peaks["tb_s"] * 1e12 / cost["bytes"])
        out.update(fraction_of_peak_flops=out["achieved_tflops"] / peaks["tflops"],
                   roofline_tok_s=bound, fraction_of_roofline=tok_s / bound)
    return out


def describe(label: str, r: dict) -> str:
    line = (f"{label}: {r['flops_per_token'] / 1e6:,.1f} MFLOP and {r['bytes_per_token'] / 1e3:,.1f} kB per token "
            f"(intensity {r['intensity_flops_per_byte']:.0f}); {r['achieved_tflops']:.3f} TFLOP/s achieved")
    if r.get("tflops"):
        line += (f" = {100 * r['fraction_of_peak_flops']:.1f}% of {r['device']}'s {r['tflops']:.3g} TFLOP/s "
                 f"({r['source']}); roofline {r['roofline_tok_s']:,.0f} tok/s, "
                 f"{100 * r['fraction_of_roofline']:.1f}% of it")
    return line
