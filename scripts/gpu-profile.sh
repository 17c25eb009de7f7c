#!/usr/bin/env bash
# Where a 1.1B QAT training step's GPU time goes, in one call on the GPU machine:
# tokens/s at batch 4 and 16, SM utilisation while training (nvidia-smi dmon), the
# PIPELINE_PROFILE phase split, and every kernel's duration over two steps (ncu).
#
#   scripts/build-cuda.sh; scripts/gpu-check.sh prepare   # here
#   scripts/gpu-profile.sh                               # there, with .xz and .carry carried
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu-profile}
W=/tmp/gpu-prof
rm -rf "$W" && mkdir -p "$OUT" "$W"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
BIN=$W/pipeline
xz -dc .xz/pipeline.xz >"$BIN" && chmod +x "$BIN"
step() { echo "== $* ($(date +%T))" >&2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

step grads
# The fused training block against the CPU in f32: loss and every parameter gradient.
: >"$OUT/grads.jsonl"
for m in stories260k tinystories-656k; do
  for q in "" "--w-bits 4 --a-bits 8 --kv-bits 4" "--w-bits 4 --a-bits 8 --kv-bits 4 --kv-point pre_rope --w-group 32"; do
    for dt in f32 bf16; do
      "$BIN" bench grads --model .carry/models/$m $q --device cuda --dtype $dt >>"$OUT/grads.jsonl" || echo "grads failed: $m $q $dt"
    done
  done
done
python3 -c "
import json
for l in open('$OUT/grads.jsonl'):
    r = json.loads(l)
    print(r['model'].split('/')[-1], r['quant'], r['dtype'], 'loss rel %.2e' % r['loss_rel_diff'], 'grad median %.2e' % r['grad_rel_diff_median'], 'worst %.2e %s' % (r['grad_rel_diff_worst'][0]['rel'], r['grad_rel_diff_worst'][0]['tensor']))
"
[ "${ONLY_GRADS:-0}" = 1 ] && exit 0

step device
"$BIN" bench device --device cuda | tee "$OUT/device.json"
"$BIN" synth-model --shape tinyllama-1.1b --out $W/tinyllama >/dev/null
"$BIN" generate --teacher $W/tinyllama --out $W/corpus --samples ${SAMPLES:-256} --max-tokens 513 \
  --shard-size 256 --batch 128 --device cuda --dtype bf16 --json

# train BATCH STEPS NAME [env...]: timed steps only (stopped before the final checkpoint).
train() {
  local batch=$1 steps=$2 name=$3
  shift 3
  rm -rf $W/train-$name
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$W/mem-$name.log" &
  local poll=$!
  env "$@" "$BIN" train --teacher $W/tinyllama --corpus $W/corpus --out $W/train-$name --steps $steps \
    --batch $batch --seq-len 512 --log-every 1 --checkpoint-every 100000 --device cuda --dtype bf16 \
    >$W/train-$name.log 2>&1 &
  local pid=$!
  while kill -0 $pid 2>/dev/null && [ "$(cat $W/train-$name/train_log.jsonl 2>/dev/null | wc -l)" -lt "$steps" ]; do sleep 0.2; done
  kill -9 $pid 2>/dev/null
  wait $pid 2>/dev/null
  kill $poll
  grep -E "profile|error|Error" $W/train-$name.log | tail -n 3
  python3 - "$W/train-$name/train_log.jsonl" "$W/mem-$name.log" "$name" "$batch" <<'PY' | tee -a "$OUT/train.jsonl"
import json, sys
log = [json.loads(l) for l in open(sys.argv[1])]
steady = log[2:] or log
tps = sum(l["tokens_per_second"] for l in steady) / len(steady)
mem = max([float(x) for x in open(sys.argv[2]).read().split() if x.strip()] or [0])
print(json.dumps({"name": sys.argv[3], "batch": int(sys.argv[4]), "tokens_per_second": tps,
                  "ms_per_step": 1000 * int(sys.argv[4]) * 512 / tps, "peak_mib": mem}))
PY
}

step train
nvidia-smi dmon -s u -d 1 >"$W/dmon.log" &
DMON=$!
train 4 12 b4
kill $DMON
cp $W/dmon.log $OUT/dmon.log
train 16 8 b16
[ "${PROFILE_PHASES:-0}" = 1 ] && train 4 12 profile PIPELINE_PROFILE=1

step ncu
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)
rm -rf $W/train-ncu
timeout 300 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --log-file "$W/ncu.csv" \
  "$BIN" train --teacher $W/tinyllama --corpus $W/corpus --out $W/train-ncu --steps 2 --batch 4 \
  --seq-len 512 --log-every 1 --checkpoint-every 100000 --device cuda --dtype bf16 >$W/ncu-train.log 2>&1
echo "ncu exit $?"
grep -v '^==PROF==' "$W/ncu.csv" | xz -T0 >"$OUT/ncu.csv.xz"

step attention
[ "${ATTENTION:-0}" = 1 ] && "$BIN" bench attention --device cuda --dtype bf16 2>&1 | tail -n 40 | tee "$OUT/attention.txt"
