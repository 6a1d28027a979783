"""Collect bench/gpu.sh's JSON outputs into one markdown table (for docs/benchmarks.md)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

PAPER_LOCAL_TOKENS = 410e6     # e2e paper's local SAE run: 4h45m on an A100
PAPER_E2E_TOK_S = 411e6 / (11 * 3600 + 20 * 60)   # 411M tokens in 11h20m on an A100


def main(out: Path) -> None:
    rows = []

    def load(name):
        p = out / name
        return json.loads(p.read_text()) if p.exists() else None

    print((out / "device.txt").read_text().strip())
    w = load("write.json")
    if w:
        a = w["args"]
        rows.append((f"store writer, {a['sites']} sites x {a['d']} acts+grads fp16, windows of {a['window_rows']} rows",
                     f"{w['GiB_s']['store writer']:.2f} GiB/s vs raw writes {w['GiB_s']['raw write']:.2f} GiB/s",
                     f"{w['ratio_to_raw']['store writer']:.2f}x (previous writer "
                     f"{w['ratio_to_raw']['zarr + read-back (old)']:.2f}x)"))
    r = load("read.json")
    if r:
        loc = r["local"]
        rows.append((f"store feed, {r['rows']} rows x {r['d']} fp16, batch {r['batch_size']}",
                     f"{loc['GiB_s']['feed (stored 16-bit)']:.2f} GiB/s vs raw reads {loc['GiB_s']['raw']:.2f} GiB/s",
                     f"{loc['ratio_to_raw']['feed (stored 16-bit)']:.2f}x (+ fp32 on the GPU: "
                     f"{loc['ratio_to_raw']['feed + float32 on device']:.2f}x"
                     + (f"; copied into pinned memory after the read, as before: {old_pin:.2f}x)"
                        if (old_pin := loc['ratio_to_raw'].get('feed, copied into pinned memory (old)')) else ")")))
    h = load("harvest.json")
    if h:
        rows.append(("harvest, 4 sites + grads, ctx %d" % h["ctx_len"],
                     f"{h['harvest_tok_s']:,.0f} tok/s vs bare fwd+bwd {h['bare_tok_s']:,.0f} tok/s",
                     f"{h['ratio_median']:.2f}x (repeats {', '.join(f'{r:.2f}' for r in h['ratios'])}); "
                     f"{h['bytes_per_token']:,.0f} B/token"))
    for bw in ("sparse", "dense"):
        t = load(f"train_{bw}.json")
        if t:
            t = t[0]
            step = t["roofline"]["bare step"]
            feed_min = PAPER_LOCAL_TOKENS / min(t["bare_tok_s"], t["feed_tok_s"]) / 60
            rows.append((f"train fit topk {t['d_in']}->{t['d_sae']} k={t['k']} batch {t['batch_size']}, "
                         f"bf16, {t.get('decode', '?')} decode, {bw} backward",
                         f"{t['fit_tok_s']:,.0f} tok/s; bare step {t['bare_tok_s']:,.0f}; feed alone "
                         f"{t['feed_tok_s']:,.0f} tok/s",
                         f"fit / min(step, feed) {t['fit_vs_min_step_feed']:.2f}x; 410M tokens in "
                         f"{PAPER_LOCAL_TOKENS / t['fit_tok_s'] / 60:.1f} min (at min(step, feed): {feed_min:.1f} min)"))
            frac = step.get("fraction_of_peak_flops")
            rows.append((f"roofline of that step ({bw} backward)",
                         f"{step['flops_per_token'] / 1e6:.1f} MFLOP, {step['bytes_per_token'] / 1e3:.1f} kB per token; "
                         f"{step['achieved_tflops']:.1f} TFLOP/s",
                         f"{100 * frac:.1f}% of {step['device']} peak; {100 * step['fraction_of_roofline']:.1f}% of the "
                         f"roofline" if frac is not None else step["source"]))
    pa = load("parts.json")
    if pa and "parts" in pa:
        ms = pa["parts"]["ms_per_step"]
        rows.append((f"step parts, topk {pa['d_in']}->{pa['d_sae']} batch {pa['batch_size']} ({pa['dtype']})",
                     "; ".join(f"{k} {v:.2f} ms" for k, v in ms.items()),
                     f"torch.compile first call {pa['parts']['compile_s']:.0f} s" if pa["parts"].get("compile_s") else ""))
    if pa and "sweep" in pa:
        sw = pa["sweep"]
        rows.append((f"sweep of {len(sw['ks'])} topk SAEs {pa['d_in']}->{pa['d_sae']}",
                     "; ".join(f"{k} {v:.2f} ms" for k, v in sw["ms_per_step"].items()),
                     "; ".join(f"{k} {v:.2f}x one SAE" for k, v in sw["ratio_to_one_sae"].items())))
    si = load("sites.json")
    if si:
        rows.append((f"{si['sites']}-site pass vs {si['sites']} single-site runs, topk {si['d_in']}->{si['d_sae']}",
                     f"pass {si['multi_site_s']:.1f} s, stacked {si['stacked_multi_site_s']:.1f} s, "
                     f"runs {si['single_site_runs_s']:.1f} s",
                     f"{si['ratio_median']:.2f}x unstacked, {si['stacked_ratio_median']:.2f}x stacked (goal <= 0.5x)"))
    c = load("codecs.json")
    if c:
        for model, m in c["models"].items():
            for enc in ("acts float16", "acts bfloat16", "grads bfloat16"):
                best = max(m["summary"][enc].items(), key=lambda kv: min(kv[1]["write_gain_vs_none"], kv[1]["read_gain_vs_none"]))
                rows.append((f"codecs, {model}, {enc}: best end-to-end at {c['disk_gbs']} GB/s disk x {c['threads']} threads",
                             f"{best[0]}: ratio {best[1]['ratio']:.3f}, {best[1]['encode_gb_s']:.2f} / "
                             f"{best[1]['decode_gb_s']:.2f} GB/s per core",
                             f"writes {best[1]['write_gain_vs_none']:.2f}x, feed {best[1]['read_gain_vs_none']:.2f}x"))
    cl = load("clt.json")
    for r in (cl or {}).get("rows", []):
        what = f"CLT step, {r['arch']}, {r['layers']} layers x {r['d']}, F {r['f_per_layer']} per layer, batch {r['batch_size']}"
        if "error" in r:
            rows.append((what, r["error"], ""))
            continue
        two = r["shards"].get("2") or r["shards"].get(2)
        rows.append((what + f" ({r['dtype']})",
                     f"{r['tok_s']:,.0f} tok/s ({r['ms_per_step']:.1f} ms/step); peak {r['peak_bytes'] / 2**30:.2f} GiB "
                     f"({r['peak_source']})",
                     f"{r['parameters'] / 1e6:,.1f} M parameters ({r['param_adam_grad_bytes'] / 2**30:.1f} GiB with "
                     f"grads + Adam)" + (f"; --shard-decoders on 2 ranks: largest rank "
                                        f"{two['largest_rank_parameters'] / 1e6:,.1f} M" if two else "")))
    for loss in ("e2e", "e2e+ds"):
        p = out / f"train_{loss.replace('+', '_')}.json"
        if p.exists() and p.read_text().strip():
            (name, s), = json.loads(p.read_text()).items()
            rows.append((f"train fit --loss {loss} ({name})", f"{s['tokens_per_s']:,.0f} tok/s",
                         f"{s['tokens_per_s'] / PAPER_E2E_TOK_S:.1f}x the paper's {PAPER_E2E_TOK_S:,.0f} tok/s"))
    e = load("evaluate.json")
    if e:
        rows.append((f"evaluate splice, {e['n_saes']} SAEs d_sae={e['d_sae']}",
                     f"{e['evaluate_tok_s']:,.0f} tok/s vs bare forward {e['bare_forward_tok_s']:,.0f} tok/s",
                     f"{e['clean_forwards_per_sae']:.2f} clean forwards per SAE"))
    b = load("bf16.json")
    if b:
        rows.append((f"harvest fp32 reference (fp32 compute and storage), {b['attn_implementation']} attention, "
                     f"ctx {b['ctx_len']}", f"{b['reference_tok_s']:,.0f} tok/s", "1.00x"))
        for name, v in b["variants"].items():
            worst = max(v["errors"].items(), key=lambda kv: kv[1].get("frac_above_1e-2", 0))
            med = lambda kind: max(e.get("median", 0) for k, e in v["errors"].items() if k.startswith(kind))  # noqa: E731
            rows.append((f"harvest {name} (acts {v['encodings']['acts']}, grads {v['encodings']['grads']})",
                         f"{v['tok_s']:,.0f} tok/s; per-row rel. error vs fp32 store, worst site's median: acts "
                         f"{med('acts'):.1e}, grads {med('grads'):.1e}",
                         f"{v['ratio_to_fp32_reference']:.2f}x; rows > 1e-2: up to "
                         f"{100 * worst[1].get('frac_above_1e-2', 0):.2f}% ({worst[0]})"))
    print("| measurement | rate | ratio / derived |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
