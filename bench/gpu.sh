#!/usr/bin/env bash
# Every GPU measurement in one go; prints one table (bench/gpu_table.py) for docs/benchmarks.md.
#   bash bench/gpu.sh            # on a CUDA machine: GPT-2-small shapes, full sizes
#   bash bench/gpu.sh --dry-run  # on a CPU: the same pipeline with tiny sizes (checks the script)
#   ONLY="harvest train" bash bench/gpu.sh   # some sections (store, harvest, train, parts, sites, codecs,
#                                            # bf16, e2e, evaluate, clt): one device call may run at most 10 min
#   ONLY=clt bash bench/gpu.sh               # a 12-layer CLT step at GPT-2-small shape, F 8192 and 24576
#                                            # per layer, topk and jumprelu (~3 min estimated; not yet run)
#   ONLY=bf16 bash bench/gpu.sh              # issue 21's bf16 harvest table (4 harvests of 131k tokens:
#                                            # ~2 min estimated on an H100/H200, not yet run there)
#   ONLY=pareto bash bench/gpu.sh            # issue 18's wider-store Pareto (5 seeds, d_sae 2048, 2M tokens,
#                                            # PW_EPOCHS=2 epochs: ~8 min estimated, not yet run)
#   REP=1 ONLY="store train parts codecs" bash bench/gpu.sh   # issue 21's sections, ~7 min estimated on
#                                            # an H100/H200 (not yet run there)
# Needs the offline default model's tokenizer (built on first use, or SAE_HARVEST_CACHE pointing at
# a built cache). Where the project is not installed, the repo goes on PYTHONPATH through a folder
# of symlinks, and wheels carried in bench/wheels/ (zarr, numcodecs, donfig, crc32c, google-crc32c:
# the device image has torch and transformers only) are installed offline first. Make them here,
# before the device call, for the device's Python (x86-64, manylinux):
#   pip download --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.X \
#       zarr numcodecs donfig crc32c google-crc32c -d bench/wheels     # bench/wheels is git-ignored
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
T=$(mktemp -d)
if ! python3 -c "import zarr" 2>/dev/null && [ -d bench/wheels ]; then
  python3 -m pip install --quiet --no-index --find-links bench/wheels zarr numcodecs google-crc32c
fi
if ! python3 -c "import sae_harvest.train" 2>/dev/null; then
  mkdir -p "$T/pkg/sae_harvest"
  for d in stores harvest train evaluate; do ln -s "$PWD/$d" "$T/pkg/sae_harvest/$d"; done
  export PYTHONPATH="$T/pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "${1:-}" = "--dry-run" ]; then
  DEV=cpu; MODEL=stdlib-gpt2; CTX=64; HN=4096; TD_IN=64; TD_SAE=1024; TN=16384; TROWS=20000
  E2E_TOKENS=2048; E2E_DSAE=256; E2E_SITE=blocks.2.resid_pre; EN=2048; REP=${REP:-1}; HBATCH=4
  WSITES=2; WD=64; WROWS=8192; RROWS=65536; RD=64; PBATCH=512; PITERS=1; CTOK=1024; CGPT2=--no-gpt2; SN=4096
  CLT_LAYERS=4; CLT_D=64; CLT_F=128,256; CLT_BATCH=512; CLT_ITERS=2; BTOK=4096
  PW_TOKENS=12000; PW_DSAE=64; PW_EVERY=10; PW_EPOCHS=${PW_EPOCHS:-1}
else
  DEV=cuda; MODEL=gpt2-small-random; CTX=1024; HN=131072; TD_IN=768; TD_SAE=24576; TN=4096000; TROWS=600000
  E2E_TOKENS=2097152; E2E_DSAE=46080; E2E_SITE=blocks.6.resid_pre; EN=131072; REP=${REP:-2}; HBATCH=16
  WSITES=4; WD=768; WROWS=131072; RROWS=524288; RD=768; PBATCH=4096; PITERS=20; CTOK=4096; CGPT2=; SN=32768
  CLT_LAYERS=12; CLT_D=768; CLT_F=8192,24576; CLT_BATCH=4096; CLT_ITERS=10; BTOK=131072
  PW_TOKENS=2000000; PW_DSAE=2048; PW_EVERY=40; PW_EPOCHS=${PW_EPOCHS:-2}
fi
ONLY=${ONLY:-store harvest train parts sites codecs bf16 e2e evaluate clt}   # pareto: only when named
want() { [[ " $ONLY " == *" $1 "* ]]; }
py() { python3 "$@"; }
MPATH=$MODEL
if [ "$MODEL" = gpt2-small-random ]; then
  MPATH=$(cd bench && py -c "from common import gpt2_small_random; print(gpt2_small_random('$T'))")
fi
py -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'torch', torch.__version__)" | tee "$OUT/device.txt"

if want store; then
echo "== store writer and feed on this machine's disk, vs raw writes / reads of the same bytes"
py bench/write.py --sites $WSITES --d $WD --window-rows $WROWS --windows 4 --repeats 3 --dir "$T" \
   --json "$OUT/write.json" > /dev/null
py bench/read.py --rows $RROWS --d $RD --repeats 3 --no-s3 --json "$OUT/read.json" > /dev/null
fi

if want harvest; then
echo "== harvest: 4 sites + grads, ctx $CTX, vs bare forward+backward"
py bench/harvest.py --model "$MPATH" --device $DEV --ctx-len $CTX --batch-size $HBATCH --tokens $HN \
   --repeats $REP --json "$OUT/harvest.json"
fi

if want train; then
for BW in sparse dense; do
  echo "== train fit: TopK $TD_IN -> $TD_SAE, k=32, batch 4096, bf16, sparse decode, $BW backward, vs bare loop and feed"
  py bench/train.py --device $DEV --d-in $TD_IN --d-sae $TD_SAE --k 32 --batch-size 4096 --tokens $TN \
     --store-rows $TROWS --dtype bf16 --decode sparse --backward $BW --repeats $REP --json "$OUT/train_$BW.json"
done
fi

if want parts; then
echo "== the step part by part, and 8 SAEs stacked vs looped vs one"
py bench/train_parts.py --device $DEV --dtype bf16 --d-in $TD_IN --d-sae $TD_SAE --k 32 --batch-size $PBATCH \
   --iters $PITERS --repeats 3 --compile --json "$OUT/parts.json" | grep -v '^ *[]["{}0-9]'
fi

if want sites; then
echo "== 4 sites in one pass, unstacked and stacked (--stack-sweep on), vs 4 single-site runs (issue 20: <= 0.5x)"
py bench/train.py --sites 4 --device $DEV --d-in 64 --d-sae 512 --k 16 --tokens $SN --batch-size 1024 \
   --repeats $REP --json "$OUT/sites.json" | grep -v '^ *[]["{}0-9]'
fi

if want codecs; then
echo "== codecs: compression ratio and GB/s per core on harvested activations and gradients"
py bench/codecs.py --device $DEV --tokens $CTOK $CGPT2 --disk-gbs 1.0 --threads 8 --json "$OUT/codecs.json" \
   | grep -v '^ *[]["{}0-9]'
fi

if want bf16; then
echo "== bf16 harvest: --dtype bfloat16 and fp32 under bf16 autocast vs fp32, tok/s and per-row error vs the fp32 store"
py bench/bf16_harvest.py --model "$MPATH" --device $DEV --ctx-len $CTX --batch-size $HBATCH --tokens $BTOK \
   --json "$OUT/bf16.json" | grep -v '^ *[]["{}0-9]'
fi

if want e2e; then
echo "== e2e / e2e+ds at $E2E_SITE: tokens/s of train fit (summary.json)"
py -m sae_harvest.harvest run --model "$MPATH" --dataset stdlib-py --sites $E2E_SITE --tokens $((E2E_TOKENS / 2)) \
   --ctx-len $CTX --batch-size $HBATCH --device $DEV --out "$T/e2e.zarr" --quiet > /dev/null
for LOSS in e2e e2e+ds; do
  py -m sae_harvest.train fit --store "$T/e2e.zarr" --loss $LOSS --arch relu --l1 1 --d-sae $E2E_DSAE \
     --batch-size $((16 * CTX)) --tokens $E2E_TOKENS --device $DEV \
     --out "$T/e2e-$LOSS" --quiet > "$OUT/train_${LOSS/+/_}.json"
done
fi

if want evaluate; then
echo "== evaluate splice: cost per SAE in clean forwards"
py bench/evaluate.py --model "$MPATH" --device $DEV --ctx-len $CTX --batch-size 8 --tokens $EN \
   --repeats $REP --json "$OUT/evaluate.json"
fi

if want clt; then
echo "== CLT step: $CLT_LAYERS layers x d $CLT_D, F per layer $CLT_F, batch $CLT_BATCH (tokens/s, peak memory)"
py bench/clt.py --device $DEV --layers $CLT_LAYERS --d $CLT_D --f $CLT_F --k 32 --batch-size $CLT_BATCH \
   --iters $CLT_ITERS --repeats 3 --json "$OUT/clt.json" > /dev/null
fi

if want pareto; then
# issue 18's wider store: the offline default model (d = 128) at d_sae = 16x d on 25x the CPU runs'
# tokens, every local architecture, 5 seeds, one equal budget of PW_EPOCHS epochs (a GPU-hour would
# search a plateau; this is sized for one device call: ~8 min estimated, not yet run), the
# architectures' default lrs (the CPU tuning was at d_sae 256). Stores and SAEs stay in $T; only
# pareto.json comes back.
echo "== pareto, wider store: $PW_TOKENS tokens, d_sae $PW_DSAE, $PW_EPOCHS epoch(s), 5 seeds"
py bench/pareto.py --out "$T/pareto-wide" --tokens $PW_TOKENS --d-sae $PW_DSAE --eval-every $PW_EVERY \
   --local-only --seeds 5 --epochs $PW_EPOCHS --max-epochs $PW_EPOCHS --until-plateau 2 --plateau-seeds 1 \
   | grep -v "^warning:" | tail -n 60
mkdir -p "$OUT/pareto-wide" && cp "$T/pareto-wide/pareto.json" "$OUT/pareto-wide/"
fi

py bench/gpu_table.py "$OUT"
rm -rf "$T"
