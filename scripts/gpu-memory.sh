#!/usr/bin/env bash
# Peak GPU memory and tokens/s of the student methods on the synthetic TinyLlama-1.1B shape in
# bf16 (batch 4 x 512, teacher online, W4A8KV4 where the method has weight bits): qat, qlora
# (NF4 + double quantization base) and lrqat (rank 16), each with and without
# `--checkpoint-activations`. Run on the GPU machine with .xz/pipeline.xz from
# scripts/build-cuda.sh:   scripts/gpu-memory.sh        (writes $OUT/gpu-memory.jsonl)
# METHODS="qat qlora" limits the methods.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu-memory}
W=/tmp/gpu-memory-work
STEPS=${STEPS:-6}
rm -rf "$W" && mkdir -p "$OUT" "$W"
R=$OUT/gpu-memory.jsonl
: >"$R"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
BIN=$W/pipeline
xz -dc .xz/pipeline.xz >"$BIN" && chmod +x "$BIN"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step() { echo "== $* ($(date +%T))" >&2; }

step setup
"$BIN" synth-model --shape tinyllama-1.1b --out $W/tinyllama >/dev/null
"$BIN" generate --teacher $W/tinyllama --out $W/corpus --samples 32 --max-tokens 513 --shard-size 32 \
  --batch 32 --device cuda --dtype bf16 >/dev/null
"$BIN" quantize --model $W/tinyllama --out $W/nf4 --format nf4 --double-quant >/dev/null

CONFIGS=(
  "qat|--w-bits 4 --a-bits 8 --kv-bits 4"
  "qlora|--method qlora --base $W/nf4 --a-bits 8 --kv-bits 4"
  "lrqat|--method lrqat --lora-rank 16 --w-bits 4 --a-bits 8 --kv-bits 4"
)
for c in "${CONFIGS[@]}"; do
  method=${c%%|*}
  flags=${c#*|}
  [[ " ${METHODS:-qat qlora lrqat} " == *" $method "* ]] || continue
  for ck in "" "--checkpoint-activations"; do
    step "$method $ck"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$W/mem.log" &
    POLL=$!
    # shellcheck disable=SC2086
    "$BIN" train --teacher $W/tinyllama --corpus $W/corpus --out $W/train --steps "$STEPS" --batch 4 \
      --seq-len 512 --log-every 1 --checkpoint-every 1000 --device cuda --dtype bf16 $flags $ck >$W/train.log 2>&1
    rc=$?
    kill $POLL
    peak=$(sort -n "$W/mem.log" | tail -n 1)
    grep -E "trainable|step $STEPS/" $W/train.log >&2
    python3 - "$method" "$ck" "$peak" "$rc" "$W/train" "$W/train.log" >>"$R" <<'PY'
import json, re, sys
method, ck, peak, rc, d, log = sys.argv[1:7]
lines = [json.loads(l) for l in open(f"{d}/train_log.jsonl")] if rc == "0" else []
text = open(log).read()
m = re.search(r"(\d+) trainable parameters", text)
print(json.dumps({
    "check": "train_memory", "model": "synth tinyllama-1.1b bf16", "method": method,
    "checkpoint_activations": bool(ck), "batch": 4, "seq_len": 512, "rc": int(rc),
    "peak_gpu_mib": int(peak) if peak else None,
    "trainable_parameters": int(m.group(1)) if m else None,
    "tokens_per_second_last": lines[-1]["tokens_per_second"] if lines else None,
    "loss": [l["loss"] for l in lines],
    "error_tail": None if rc == "0" else text[-800:],
}))
PY
    rm -rf $W/train
  done
done
cat "$R"
