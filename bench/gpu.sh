#!/usr/bin/env bash
# Every GPU measurement in one go; prints one table (bench/gpu_table.py) for docs/benchmarks.md.
#   bash bench/gpu.sh            # on a CUDA machine: GPT-2-small shapes, full sizes
#   bash bench/gpu.sh --dry-run  # on a CPU: the same pipeline with tiny sizes (checks the script)
#   ONLY="harvest train" bash bench/gpu.sh   # some sections (store, harvest, train, e2e, evaluate): one
#                                            # device call may run at most 10 minutes
# Needs the project importable (pip install -e . or PYTHONPATH) and the offline default model's
# tokenizer (built on first use, or SAE_HARVEST_CACHE pointing at a built cache).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
T=$(mktemp -d)
if [ "${1:-}" = "--dry-run" ]; then
  DEV=cpu; MODEL=stdlib-gpt2; CTX=64; HN=4096; TD_IN=64; TD_SAE=1024; TN=16384; TROWS=20000
  E2E_TOKENS=2048; E2E_DSAE=256; E2E_SITE=blocks.2.resid_pre; EN=2048; REP=${REP:-1}; HBATCH=4
  WSITES=2; WD=64; WROWS=8192; RROWS=65536; RD=64
else
  DEV=cuda; MODEL=gpt2-small-random; CTX=1024; HN=131072; TD_IN=768; TD_SAE=24576; TN=4096000; TROWS=600000
  E2E_TOKENS=2097152; E2E_DSAE=46080; E2E_SITE=blocks.6.resid_pre; EN=131072; REP=${REP:-2}; HBATCH=16
  WSITES=4; WD=768; WROWS=131072; RROWS=524288; RD=768
fi
ONLY=${ONLY:-store harvest train e2e evaluate}
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
for SD in sparse dense; do
  echo "== train fit: TopK $TD_IN -> $TD_SAE, k=32, batch 4096, bf16, $SD decode, vs bare in-memory loop"
  py bench/train.py --device $DEV --d-in $TD_IN --d-sae $TD_SAE --k 32 --batch-size 4096 --tokens $TN \
     --store-rows $TROWS --dtype bf16 --decode $SD --repeats $REP --json "$OUT/train_$SD.json"
done
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

py bench/gpu_table.py "$OUT"
rm -rf "$T"
