#!/usr/bin/env bash
# The student as it runs deployed, on the GPU (issue 18): projections as 4-bit codes read by the
# decoding GEMV (dequantized one weight at a time for larger batches and full forward passes),
# K/V as int8/int4 codes with one scale per token read by the attention kernel.
#
#   scripts/build-cuda.sh && scripts/gpu-check.sh prepare     # here
#   scripts/gpu-lowbit.sh prepare                               # here: the llmqat students into .carry/
#   scripts/gpu-lowbit.sh run                                   # there; writes $OUT/gpu-lowbit.jsonl
#
# 1. Perplexity on the 64k text of the llmqat students of both shared models (W4A8KV4) and of
#    tinystories-656k's W4 per-channel grid with a KV4 quantizer, through every path: CPU f32
#    fake-quantized and packed + int4 cache (the references), GPU bf16 fake-quantized, packed
#    (full forward), and decoded through the batch cache (float, int8 where the student has no
#    K/V quantizer, int4 codes).
# 2. Decoding speed and memory of the synthetic TinyLlama-1.1B: the bf16 teacher against its
#    packed W4 per-channel export with float, int8 and int4 caches, batch 1 and 64, CUDA graphs;
#    peak GPU memory of each process (nvidia-smi every 50 ms).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ "${1:-}" = prepare ]; then
  mkdir -p .carry/students
  for m in stories260k tinystories-656k; do
    rm -rf ".carry/students/$m"
    cp -r "runs/llmqat-short/$m/train/student" ".carry/students/$m"
  done
  du -sh .carry
  exit 0
fi
[ "${1:-}" = run ] || { echo "usage: $0 prepare|run" >&2; exit 2; }
OUT=${OUT:-/tmp/gpu-lowbit}
W=/tmp/gpu-lowbit-work
rm -rf "$W" && mkdir -p "$OUT" "$W"
R=$OUT/gpu-lowbit.jsonl
: >"$R"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
BIN=$W/pipeline
xz -dc .xz/pipeline.xz >"$BIN" && chmod +x "$BIN"
C=.carry
TEXT=$C/data/tinystories-valid-64k.txt
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step() { echo "== $* ($(date +%T))" >&2; }

ppl() { # label model flags...
  local label=$1 model=$2
  shift 2
  local out
  if out=$("$BIN" eval --model "$model" --text $TEXT --json "$@" 2>"$W/err"); then
    python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(json.dumps({'check':'ppl','label':sys.argv[2],'model':sys.argv[3],'flags':sys.argv[4],'ppl':d['ppl'],'seconds':d.get('seconds')}))" \
      "$out" "$label" "$model" "$*" | tee -a "$R"
  else
    python3 -c "import json,sys; print(json.dumps({'check':'ppl','label':sys.argv[1],'model':sys.argv[2],'flags':sys.argv[3],'error':open(sys.argv[4]).read()[-600:]}))" \
      "$label" "$model" "$*" "$W/err" | tee -a "$R"
  fi
}

step perplexity
# The llmqat students (scripts/gpu-lowbit.sh prepare) where they were carried.
for m in $( [ -d $C/students ] && echo stories260k tinystories-656k); do
  S=$C/students/$m
  Q=(--w-bits 4 --a-bits 8 --kv-bits 4 --batch 4)
  ppl cpu-f32-fake "$S" "${Q[@]}" --device cpu
  ppl cpu-f32-packed-int4 "$S" "${Q[@]}" --device cpu --packed --kv-cache int4
  ppl gpu-bf16-fake "$S" "${Q[@]}" --device cuda --dtype bf16
  ppl gpu-bf16-packed "$S" "${Q[@]}" --device cuda --dtype bf16 --packed
  ppl gpu-bf16-fake-int4 "$S" "${Q[@]}" --device cuda --dtype bf16 --kv-cache int4
  ppl gpu-bf16-packed-int4 "$S" "${Q[@]}" --device cuda --dtype bf16 --packed --kv-cache int4
done
# Weight-only W4 with a KV quantizer of each cache's bits: the GEMV path (no activation
# quantizer) with float, int8 and int4 caches.
T=$C/models/tinystories-656k
for kv in 8 4; do
  Q=(--w-bits 4 --kv-bits $kv --batch 4)
  ppl cpu-f32-fake-kv$kv "$T" "${Q[@]}" --device cpu
  ppl cpu-f32-packed-int$kv "$T" "${Q[@]}" --device cpu --packed --kv-cache int$kv
  ppl gpu-bf16-fake-kv$kv "$T" "${Q[@]}" --device cuda --dtype bf16
  ppl gpu-bf16-packed-float-kv$kv "$T" "${Q[@]}" --device cuda --dtype bf16 --packed --kv-cache float
  ppl gpu-bf16-packed-int$kv "$T" "${Q[@]}" --device cuda --dtype bf16 --packed --kv-cache int$kv
done
ppl gpu-bf16-teacher "$T" --batch 4 --device cuda --dtype bf16
ppl gpu-bf16-teacher-decoded "$T" --batch 4 --device cuda --dtype bf16 --kv-cache float

step setup
"$BIN" synth-model --shape tinyllama-1.1b --out $W/tinyllama >/dev/null
mkdir -p $W/student
cp $W/tinyllama/config.json $W/tinyllama/tokenizer.json $W/tinyllama/*.safetensors $W/student/
echo '{"w_bits": 4, "w_group": null, "a_bits": null, "kv_bits": null}' >$W/student/quantization.json
"$BIN" export --student $W/student --out $W/packed --format packed >/dev/null || exit 1
rm -rf $W/student
du -sh $W/tinyllama $W/packed/model
COPY=$("$BIN" bench device --device cuda | python3 -c "import json,sys; print(json.load(sys.stdin)['copy_gb_per_s'])")

step decode
CONFIGS=(
  "teacher-bf16|$W/tinyllama|"
  "packed-w4-float|$W/packed/model|--packed"
  "packed-w4-int8|$W/packed/model|--packed --kv-cache int8"
  "packed-w4-int4|$W/packed/model|--packed --kv-cache int4"
)
for rep in $(seq "${REPEATS:-2}"); do
  for c in "${CONFIGS[@]}"; do
    IFS='|' read -r name model flags <<<"$c"
    for b in 1 64; do
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$W/mem.log" &
      POLL=$!
      # shellcheck disable=SC2086
      out=$("$BIN" bench decode --model "$model" --batch $b --steps 128 --warmup 8 --copy-gbps "$COPY" \
        --device cuda --dtype bf16 --cuda-graph $flags 2>"$W/err")
      rc=$?
      kill $POLL
      peak=$(sort -n "$W/mem.log" | tail -n 1)
      python3 - "$out" "$name" "$flags" "$b" "$peak" "$rc" "$rep" "$W/err" >>"$R" <<'PY'
import json, sys
out, name, flags, b, peak, rc, rep, err = sys.argv[1:9]
row = {"check": "decode", "config": name, "flags": flags, "batch": int(b), "repeat": int(rep),
       "peak_gpu_mib": int(peak) if peak else None, "rc": int(rc)}
if rc == "0":
    v = json.loads(out)
    r = v["runs"][0]
    row.update({k: r[k] for k in ("tokens_per_second", "ms_per_step", "weight_bytes_per_step",
                "kv_cache_bytes_per_token", "bound_tokens_per_second", "fraction_of_bound")})
    row["projection_bytes"] = v.get("projection_bytes")
else:
    row["error"] = open(err).read()[-600:]
print(json.dumps(row))
PY
      tail -n 1 "$R"
    done
  done
done
step done
