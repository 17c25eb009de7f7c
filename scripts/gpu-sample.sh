#!/usr/bin/env bash
# `pipeline sample` on the GPU machine: greedy continuations of the shared stories260k teacher and
# its llmqat student (.carry/, from scripts/gpu-lowbit.sh prepare), the student dense and packed
# with an int4 K/V cache, in bf16 on the GPU and in f32 on the CPU, for issue 18.
#   scripts/gpu-sample.sh           (writes $OUT/sample-*.json; needs .xz/pipeline.xz)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu-sample}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
BIN=/tmp/gpu-sample-pipeline
[ -x "$BIN" ] || { xz -dc .xz/pipeline.xz >"$BIN" && chmod +x "$BIN"; }
T=.carry/models/stories260k
S=.carry/students/stories260k
P="Once upon a time, there was a little girl named Lily"
run() {
  local name=$1
  shift
  "$BIN" sample --teacher "$T" --prompt "$P" --max-tokens 48 --json "$@" >"$OUT/sample-$name.json" 2>"$OUT/sample-$name.err"
  echo "sample $name: rc $?" >&2
}
Q=(--w-bits 4 --a-bits 8 --kv-bits 4)
run gpu-bf16 --model "$S" "${Q[@]}" --device cuda --dtype bf16
run gpu-bf16-packed-int4 --model "$S" "${Q[@]}" --packed --kv-cache int4 --device cuda --dtype bf16
run cpu-f32 --model "$S" "${Q[@]}"
run cpu-f32-packed-int4 --model "$S" "${Q[@]}" --packed --kv-cache int4
for f in "$OUT"/sample-*.json; do echo "== $f"; head -c 1500 "$f"; echo; done
