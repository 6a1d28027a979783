"""Fewer bytes per token, losslessly: standard Zarr v3 codecs on real activations and gradients.

Builds stores with `harvest run` (4 sites + gradients): the offline default model (stdlib-gpt2,
trained weights) and GPT-2 small's shape with random weights (the floor: no structure learnt).
Every stored array is cut into the store's 1 MiB chunks and each codec compresses and
decompresses every chunk on one thread (the store writer and the feed run one chunk per thread
of their pools); each round trip is checked bit for bit. Both 16-bit encodings of every array
are measured (fp16 and bf16, re-encoded from the stored values).

Codecs (what zarr-python and TensorStore read): `zstd` (levels 1, 3) and `blosc` with byte or
bit shuffle and lz4 or zstd inside (clevel 1 and 5), typesize 2. Throughput is uncompressed
GB/s per core. The end-to-end estimate where the disk binds: a disk of D GB/s, P threads,
compression ratio r: writes move min(r D, P x encode GB/s) of activations per second and the
feed min(r D, P x decode GB/s), against D uncompressed.

    python bench/codecs.py                          # CPU: stdlib-gpt2 + gpt2-small-random, 8192 tokens
    python bench/codecs.py --tokens 4096 --no-gpt2 --disk-gbs 1.0 --threads 8
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numcodecs
import numpy as np
from numcodecs import Blosc, Zstd

from common import four_sites, gpt2_small_random, report
from sae_harvest.stores import open_store
from sae_harvest.stores import layout

CHUNK_BYTES = 1 << 20
CODECS = {"zstd-1": Zstd(level=1), "zstd-3": Zstd(level=3)}
for cname in ("lz4", "zstd"):
    for shuffle, sname in ((Blosc.SHUFFLE, "byteshuffle"), (Blosc.BITSHUFFLE, "bitshuffle")):
        for clevel in (1, 5):
            CODECS[f"blosc-{cname}-{sname}-{clevel}"] = Blosc(cname=cname, clevel=clevel, shuffle=shuffle,
                                                              blocksize=0)


def harvest(model: str, out: str, tokens: int, ctx: int, n_layers: int, device: str) -> str:
    cmd = [sys.executable, "-m", "sae_harvest.harvest", "run", "--model", model, "--dataset", "stdlib-py",
           "--sites", four_sites(n_layers), "--grads", "--tokens", str(tokens), "--ctx-len", str(ctx),
           "--batch-size", "8", "--device", device, "--out", out, "--quiet"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def arrays(store_path: str) -> dict[str, np.ndarray]:
    """{kind/site/encoding: [rows, d] 16-bit values} for acts and grads of every site, both encodings."""
    store = open_store(store_path)
    rows = np.arange(store.n_rows)
    out = {}
    for site in store.sites:
        for kind, read in (("acts", store.acts), ("grads", store.grads)):
            values = read(site, rows)   # decoded to float32
            for enc in ("float16", "bfloat16"):
                out[f"{kind} {site} {enc}"] = np.ascontiguousarray(layout.encode(values, enc))
    return out


def chunks(values: np.ndarray) -> list[bytes]:
    flat = values.view(np.uint8).reshape(-1)
    return [flat[i:i + CHUNK_BYTES].tobytes() for i in range(0, len(flat), CHUNK_BYTES)]


def measure(pieces: list[bytes], codec) -> dict:
    raw = sum(len(p) for p in pieces)
    t0 = time.perf_counter()
    encoded = [codec.encode(p) for p in pieces]
    t1 = time.perf_counter()
    decoded = [codec.decode(e) for e in encoded]
    t2 = time.perf_counter()
    for p, d in zip(pieces, decoded):
        if bytes(d) != p:
            raise AssertionError(f"{codec} is not lossless here")
    return {"ratio": raw / sum(len(e) for e in encoded), "encode_gb_s": raw / (t1 - t0) / 1e9,
            "decode_gb_s": raw / (t2 - t1) / 1e9}


def summarise(table: dict, disk_gbs: float, threads: int) -> dict:
    """Per codec: bytes-weighted ratio and rates over every array, and the end-to-end estimate."""
    out = {}
    for codec in CODECS:
        rows = [r[codec] for r in table.values()]
        ratio = len(rows) / sum(1 / r["ratio"] for r in rows)    # total raw / total compressed (equal sizes)
        enc = len(rows) / sum(1 / r["encode_gb_s"] for r in rows)
        dec = len(rows) / sum(1 / r["decode_gb_s"] for r in rows)
        write = min(ratio * disk_gbs, threads * enc)
        read = min(ratio * disk_gbs, threads * dec)
        out[codec] = {"ratio": ratio, "encode_gb_s": enc, "decode_gb_s": dec,
                      "write_gain_vs_none": write / disk_gbs, "read_gain_vs_none": read / disk_gbs}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--device", default="cpu", help="where the harvests run (the codecs run on the CPU)")
    p.add_argument("--no-gpt2", action="store_true", help="skip the GPT-2-shape random-weight floor")
    p.add_argument("--disk-gbs", type=float, default=1.0, help="disk bandwidth of the end-to-end estimate")
    p.add_argument("--threads", type=int, default=8, help="writer / feed threads of the estimate")
    p.add_argument("--json")
    args = p.parse_args()
    numcodecs.blosc.use_threads = False    # one chunk per thread, as the writer's and feed's pools do
    tmp = tempfile.mkdtemp(prefix="bench-codecs-")
    models = [("stdlib-gpt2", "stdlib-gpt2", 4)]
    if not args.no_gpt2:
        models.append(("gpt2-small-random", gpt2_small_random(tmp), 12))
    result = {"tokens": args.tokens, "chunk_bytes": CHUNK_BYTES, "disk_gbs": args.disk_gbs,
              "threads": args.threads, "models": {}}
    for label, model, n_layers in models:
        t0 = time.perf_counter()
        path = harvest(model, os.path.join(tmp, f"{label}.zarr"), args.tokens, args.ctx_len, n_layers, args.device)
        print(f"== {label}: store harvested in {time.perf_counter() - t0:.0f} s", flush=True)
        table = {}
        for name, values in arrays(path).items():
            pieces = chunks(values)
            table[name] = {codec: measure(pieces, c) for codec, c in CODECS.items()}
            best = max(table[name], key=lambda c: table[name][c]["ratio"])
            print(f"  {name}: best ratio {table[name][best]['ratio']:.3f} ({best})", flush=True)
        by_encoding = {enc: summarise({n: r for n, r in table.items() if n.endswith(enc)}, args.disk_gbs,
                                      args.threads) for enc in (" float16", " bfloat16")}
        for kind in ("acts", "grads"):
            for enc in ("float16", "bfloat16"):
                by_encoding[f"{kind} {enc}"] = summarise(
                    {n: r for n, r in table.items() if n.startswith(kind) and n.endswith(" " + enc)},
                    args.disk_gbs, args.threads)
        result["models"][label] = {"arrays": table, "summary": {k.strip(): v for k, v in by_encoding.items()}}
        for enc, rows in result["models"][label]["summary"].items():
            print(f"  -- {label}, {enc}: codec, ratio, encode / decode GB/s per core, "
                  f"write / read gain at {args.disk_gbs} GB/s x {args.threads} threads")
            for codec, r in rows.items():
                print(f"     {codec:30s} {r['ratio']:.3f}  {r['encode_gb_s']:6.2f} / {r['decode_gb_s']:6.2f}  "
                      f"{r['write_gain_vs_none']:.2f}x / {r['read_gain_vs_none']:.2f}x", flush=True)
    report(result, args.json)


if __name__ == "__main__":
    main()
