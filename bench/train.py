"""`train fit` throughput from a store against a bare step loop of the same SAE on data already
in memory (same architecture, optimizer, batch, per-step decoder constraint), in the same run.

Rates are marginal (N and 2N tokens, rate = N / time difference), so store opening, sampling
for the normalisation constant and b_dec init cancel out. Repeats alternate; medians reported.
Also printed: the store feed's own rate (StoreFeed alone, widened to fp32 on the device),
`train fit` against the lower of the step's and the feed's rates, and the step's roofline
(bench/roofline.py: FLOPs and bytes per token, achieved TFLOP/s, fraction of the device's peak).

    python bench/train.py                                   # TopK d=256 -> 4096, k=32, 4096-token batches
    python bench/train.py --device cuda --dtype bf16 --d-in 768 --d-sae 24576 --k 32 --tokens 20000000
    python bench/train.py --dtype bf16 --decode sparse --d-in 64 --d-sae 1024 --tokens 40960 --repeats 1  # CPU dry run
    python bench/train.py --backward sparse          # the sparse encoder backward (default: on CUDA)
    python bench/train.py --sites 4     # one 4-site pass (--site 'blocks.*.resid_pre'), unstacked and stacked, vs 4 single-site runs
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

from sae_harvest.stores import StoreWriter, open_store
from sae_harvest.train.config import TrainConfig
from sae_harvest.train.feeds import StoreFeed
from sae_harvest.train.fit import fit
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.runs import make_adam

from common import synthetic_store, report
from roofline import describe, device_peaks, roofline, step_cost

TOPK_FAMILY = ("topk", "batchtopk", "gtopk", "matryoshka_batchtopk")


def bare_loop(arch, d, d_sae, k, batch, tokens, device, bf16: bool, sparse: bool, sparse_backward: bool = False,
              adam: str = "trainer") -> float:
    cfg = SAEConfig(arch=arch, d_in=d, d_sae=d_sae, k=k if arch in TOPK_FAMILY else 0, l1_coeff=1.0)
    torch.manual_seed(0)
    sae = make_sae(cfg).to(device)
    if sparse:
        sae.enable_sparse_decode()
    if sparse_backward:
        sae.enable_sparse_backward()
    lr = sae.default_lr(d_sae)
    opt = make_adam(sae.parameters(), lr, sae.adam_betas) if adam == "trainer" else \
        torch.optim.Adam(sae.parameters(), lr=lr, foreach=adam == "foreach")
    data = torch.randn(16 * batch, d, device=device)
    steps = max(1, tokens // batch)
    # the trainer's dead-latent bookkeeping: AuxK (TopK family) runs once a latent can be dead, which
    # the host knows from a bound it tightens every 10 steps (train fit's log_every, where it syncs)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    dead_after = max(batch, min(10_000_000, tokens // 4))
    bound = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        x = data[(i % 16) * batch:(i % 16 + 1) * batch]
        dead = since_fired >= dead_after if bound >= dead_after else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae.loss(x, dead_mask=dead)
        out.loss.backward()
        since_fired += batch
        since_fired.masked_fill_((out.feats > 0).any(0), 0)
        bound = int(since_fired.max()) if (i + 1) % 10 == 0 else bound + batch
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
    sync()
    return time.perf_counter() - t0


def fit_seconds(store, out, arch, d_sae, k, batch, tokens, device, bf16: bool, sparse: bool,
                sparse_backward: bool = False, adam: str = "trainer") -> float:
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(store=store, out=out, arch=arch, d_sae=d_sae, k=(k,), l1=(1.0,), batch_size=batch,
                      tokens=tokens, device=device, checkpoint_every=10**9,
                      autocast="on" if bf16 else "off", sparse_decode="on" if sparse else "off",
                      sparse_backward="on" if sparse_backward else "off")
    t0 = time.perf_counter()
    summaries = fit(cfg, progress=False)
    seconds = time.perf_counter() - t0
    FEED_WAIT.append(sum(s.get("feed_wait_s", 0.0) for s in summaries.values()))
    return seconds


FEED_WAIT: list = []   # seconds each fit's step loop waited on the store feed


def feed_seconds(store_path, batch, tokens, device) -> float:
    """The store feed alone, as `train fit` consumes it: StoreFeed over the store (pinned on CUDA),
    each batch copied to the device and widened to fp32."""
    store = open_store(store_path)
    feed = StoreFeed(store, "blocks.0.resid_pre", batch, seed=0, grads=False,
                     exclude_pos0=True, pin=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _, b in zip(range(max(1, tokens // batch)), feed):
        b.acts.to(device, non_blocking=True).float()
    sync()
    return time.perf_counter() - t0


def print_roofline(label, tok_s, args, bf16, sparse, sparse_backward, peaks) -> dict:
    """The step's roofline at tok_s (bench/roofline.py), printed and returned."""
    cost = step_cost(args.d_in, args.d_sae, args.k, args.batch_size, sparse_decode=sparse,
                     sparse_backward=sparse_backward, bf16=bf16)
    r = roofline(tok_s, cost, peaks)
    print(describe(label, r), flush=True)
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="topk", help="comma list")
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096 * 40, help="N: runs use N and 2N tokens")
    p.add_argument("--store-rows", type=int, default=None, help="default: 2N + 10%% (one epoch)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"),
                   help="SAE step precision (default: bf16 autocast on CUDA, fp32 on CPU)")
    p.add_argument("--decode", default="auto", choices=("auto", "sparse", "dense"),
                   help="TopK decode (auto: sparse on CUDA when k <= d_sae/16)")
    p.add_argument("--backward", default="auto", choices=("auto", "sparse", "dense"),
                   help="TopK family's encoder backward (auto: sparse on CUDA, as train fit's --sparse-backward)")
    p.add_argument("--adam", default="trainer", choices=("trainer", "foreach", "loop"),
                   help="trainer: train.runs.make_adam (fused where supported); the others for comparison "
                        "(bare loop only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--sites", type=int, default=None,
                   help="K: time one K-site `train fit` pass against K single-site runs on the same store instead")
    args = p.parse_args()
    if args.sites:
        return sites_bench(args)
    device = torch.device(args.device)
    bf16 = (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    sparse = args.decode == "sparse" or (args.decode == "auto" and device.type == "cuda")
    sparse_backward = args.backward == "sparse" or (args.backward == "auto" and device.type == "cuda")
    setting = (bf16, sparse, sparse_backward)
    peaks = device_peaks(device, bf16)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    store = os.path.join(tmp, "s.zarr")
    N = args.tokens
    t0 = time.perf_counter()
    synthetic_store(store, args.d_in, args.store_rows or int(2.2 * N))
    print(f"store built in {time.perf_counter() - t0:.1f} s", flush=True)
    results = []
    for arch in args.arch.split(","):
        bare_loop(arch, args.d_in, args.d_sae, args.k, args.batch_size, 2 * args.batch_size, device, *setting,
                  args.adam)  # warm-up
        ratios, fit_rates, bare_rates, feed_rates, min_ratios = [], [], [], [], []
        for rep in range(args.repeats):
            out = os.path.join(tmp, "out")
            f1 = fit_seconds(store, out, arch, args.d_sae, args.k, args.batch_size, N, args.device, *setting)
            f2 = fit_seconds(store, out, arch, args.d_sae, args.k, args.batch_size, 2 * N, args.device, *setting)
            b1 = bare_loop(arch, args.d_in, args.d_sae, args.k, args.batch_size, N, device, *setting, args.adam)
            b2 = bare_loop(arch, args.d_in, args.d_sae, args.k, args.batch_size, 2 * N, device, *setting, args.adam)
            r1 = feed_seconds(store, args.batch_size, N, device)
            r2 = feed_seconds(store, args.batch_size, 2 * N, device)
            fr, br, rr = N / max(f2 - f1, 1e-9), N / max(b2 - b1, 1e-9), N / max(r2 - r1, 1e-9)
            fit_rates.append(fr)
            bare_rates.append(br)
            feed_rates.append(rr)
            ratios.append(fr / br)
            min_ratios.append(fr / min(br, rr))
            print(f"{arch} repeat {rep}: train fit {fr:,.0f} tok/s, bare loop {br:,.0f} tok/s, ratio {fr / br:.3f}; "
                  f"feed alone {rr:,.0f} tok/s, fit / min(step, feed) {fr / min(br, rr):.3f}; "
                  f"feed waits {FEED_WAIT[-2]:.2f} s / {FEED_WAIT[-1]:.2f} s", flush=True)
        fit_med, bare_med = statistics.median(fit_rates), statistics.median(bare_rates)
        rl = {"bare step": print_roofline(f"{arch} bare step", bare_med, args, *setting, peaks),
              "train fit": print_roofline(f"{arch} train fit", fit_med, args, *setting, peaks)}
        results.append({"arch": arch, "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k,
                        "batch_size": args.batch_size, "device": str(device),
                        "dtype": "bf16" if bf16 else "fp32", "decode": "sparse" if sparse else "dense",
                        "backward": "sparse" if sparse_backward else "dense", "adam": args.adam, "tokens": [N, 2 * N],
                        "fit_tok_s": fit_med, "bare_tok_s": bare_med,
                        "feed_tok_s": statistics.median(feed_rates),
                        "fit_vs_min_step_feed": statistics.median(min_ratios), "fit_vs_min_repeats": min_ratios,
                        "ratio_median": statistics.median(ratios), "ratios": ratios, "roofline": rl,
                        "feed_wait_s": FEED_WAIT[-2:], "torch_threads": torch.get_num_threads()})
    report(results, args.json)
    shutil.rmtree(tmp, ignore_errors=True)


def multi_site_store(path: str, d: int, rows: int, sites: int, ctx: int = 128) -> list[str]:
    """K sites blocks.0..K-1.resid_pre of the same rows, each its own sparse dictionary, fp16."""
    rng = np.random.default_rng(0)
    names = [f"blocks.{i}.resid_pre" for i in range(sites)]
    n_seqs = rows // ctx
    window_seqs = min(n_seqs, 2048)
    dicts = [rng.normal(size=(4 * d, d)).astype(np.float32) / math.sqrt(d) for _ in names]
    w = StoreWriter.create(path, meta={"model": {"name": "synthetic"}},
                           sites={n: {"d": d, "encoding": "float16"} for n in names}, grads=None,
                           ctx_len=ctx, n_seqs=n_seqs, window_seqs=window_seqs)
    for win in range(-(-n_seqs // window_seqs)):
        seqs = np.arange(win * window_seqs, min((win + 1) * window_seqs, n_seqs))
        n = len(seqs) * ctx
        perm = rng.permutation(n)
        acts = {}
        for name, dictionary in zip(names, dicts):
            codes = (rng.random((n, 4 * d), dtype=np.float32) < 0.02) * rng.random((n, 4 * d), dtype=np.float32)
            acts[name] = (codes @ dictionary * 10)[perm]
        w.write_window(win, np.zeros((len(seqs), ctx)), np.repeat(seqs, ctx)[perm],
                       np.tile(np.arange(ctx), len(seqs))[perm], acts)
    w.finish(n_seqs)
    return names


def sites_bench(args) -> None:
    """Whole `train fit` wall time (store opening, sampling, b_dec init, steps, held-out report, saving):
    one pass over K sites vs K single-site runs, in-process (K separate commands would also pay K
    interpreter and torch start-ups, not counted here). Repeats alternate; medians reported."""
    tmp = tempfile.mkdtemp(prefix="bench-train-sites-")
    store = os.path.join(tmp, "s.zarr")
    t0 = time.perf_counter()
    names = multi_site_store(store, args.d_in, args.store_rows or int(1.1 * args.tokens), args.sites)
    print(f"{args.sites}-site store built in {time.perf_counter() - t0:.1f} s", flush=True)

    def run(site: str, stack: str = "off") -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds: less moved by other users of a shared box)."""
        out = os.path.join(tmp, "out")
        shutil.rmtree(out, ignore_errors=True)
        cfg = TrainConfig(store=store, out=out, site=site, arch=args.arch.split(",")[0], d_sae=args.d_sae,
                          k=(args.k,), l1=(1.0,), batch_size=args.batch_size, tokens=args.tokens, device=args.device,
                          checkpoint_every=10**9, stack_sweep=stack)
        t, c = time.perf_counter(), time.process_time()
        fit(cfg, progress=False)
        return time.perf_counter() - t, time.process_time() - c

    sides = {"pass": lambda: run(",".join(names)),
             "stacked": lambda: run(",".join(names), "on"),   # the K sites' SAEs as one stacked step
             "single": lambda: tuple(map(sum, zip(*[run(name) for name in names])))}
    run(names[0])   # warm-up
    wall = {side: [] for side in sides}
    cpu = {side: [] for side in sides}
    loads = []
    for rep in range(args.repeats):
        order = list(sides)[rep % 3:] + list(sides)[:rep % 3]   # each side first in turn
        for side in order:
            w, c = sides[side]()
            wall[side].append(w)
            cpu[side].append(c)
        loads.append(os.getloadavg()[0])
        print(f"repeat {rep} ({', '.join(order)}): one {args.sites}-site pass {wall['pass'][-1]:.2f} s "
              f"(cpu {cpu['pass'][-1]:.1f}), stacked {wall['stacked'][-1]:.2f} s (cpu {cpu['stacked'][-1]:.1f}), "
              f"{args.sites} single-site runs {wall['single'][-1]:.2f} s (cpu {cpu['single'][-1]:.1f}); ratios "
              f"{wall['pass'][-1] / wall['single'][-1]:.3f} / stacked {wall['stacked'][-1] / wall['single'][-1]:.3f} "
              f"(load average {loads[-1]:.1f})", flush=True)

    def ratios(times, side):
        return [a / b for a, b in zip(times[side], times["single"])]

    report({"sites": args.sites, "arch": args.arch.split(",")[0], "d_in": args.d_in, "d_sae": args.d_sae,
            "k": args.k, "batch_size": args.batch_size, "tokens": args.tokens, "device": args.device,
            "multi_site_s": statistics.median(wall["pass"]), "stacked_multi_site_s": statistics.median(wall["stacked"]),
            "single_site_runs_s": statistics.median(wall["single"]),
            "ratio_median": statistics.median(ratios(wall, "pass")), "ratios": ratios(wall, "pass"),
            "stacked_ratio_median": statistics.median(ratios(wall, "stacked")),
            "stacked_ratios": ratios(wall, "stacked"),
            "cpu_ratio_median": statistics.median(ratios(cpu, "pass")),
            "stacked_cpu_ratio_median": statistics.median(ratios(cpu, "stacked")), "cpu_s": cpu,
            "load_averages": loads, "torch_threads": torch.get_num_threads()},
           args.json)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
