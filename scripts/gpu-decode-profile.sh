#!/usr/bin/env bash
# Where a decoding step of the packed W4 student (synthetic TinyLlama-1.1B, int4 cache) and of
# the bf16 teacher spends its time on the GPU, at batch 1 and 64: ms per step with and without
# a CUDA graph, and the GPU time of each piece of an eager step (PIPELINE_PROFILE=1: CUDA
# events between the pieces); nsys's kernel summary too where the machine has nsys.
# Writes $OUT/steps.txt and $OUT/pieces.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-profile}
W=/tmp/gpu-profile-work
rm -rf "$W" && mkdir -p "$OUT" "$W"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
xz -dc .xz/pipeline.xz >"$W/pipeline" && chmod +x "$W/pipeline"
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
echo "nsys: ${NSYS:-none}" | tee "$OUT/tools.txt"
"$W/pipeline" synth-model --shape tinyllama-1.1b --out $W/tinyllama >/dev/null
mkdir -p $W/student
cp $W/tinyllama/config.json $W/tinyllama/tokenizer.json $W/tinyllama/*.safetensors $W/student/
echo '{"w_bits": 4, "w_group": null, "a_bits": null, "kv_bits": null}' >$W/student/quantization.json
"$W/pipeline" export --student $W/student --out $W/packed --format packed >/dev/null || exit 1
for c in "teacher|$W/tinyllama|" "packed|$W/packed/model|--packed --kv-cache int4"; do
  IFS='|' read -r name model flags <<<"$c"
  for batch in 1 64; do
    # shellcheck disable=SC2086
    PIPELINE_PROFILE=1 "$W/pipeline" bench decode --model "$model" --batch $batch --steps 64 --warmup 8 --device cuda --dtype bf16 $flags 2>/dev/null |
      python3 -c "import json,sys; r=json.load(sys.stdin)['runs'][0]; print(json.dumps({'config':'$name','batch':$batch,'ms_per_step':r['ms_per_step'],'pieces':r.get('gpu_ms_per_step_by_piece')}))" | tee -a "$OUT/pieces.jsonl"
  done
  for graph in --cuda-graph ""; do
    # shellcheck disable=SC2086
    "$W/pipeline" bench decode --model "$model" --batch 1 --steps 128 --warmup 8 --device cuda --dtype bf16 $graph $flags 2>/dev/null |
      python3 -c "import json,sys; r=json.load(sys.stdin)['runs'][0]; print('$name', '${graph:-no-graph}', r['ms_per_step'], 'ms/step')" | tee -a "$OUT/steps.txt"
  done
  if [ -n "${NSYS:-}" ]; then
    # shellcheck disable=SC2086
    "$NSYS" profile -o $W/$name --force-overwrite true --trace cuda "$W/pipeline" bench decode --model "$model" --batch 1 --steps 64 --warmup 4 --device cuda --dtype bf16 $flags >/dev/null 2>&1
    "$NSYS" stats --report cuda_gpu_kern_sum --format table $W/$name.nsys-rep >"$OUT/profile-$name.txt" 2>&1
    head -30 "$OUT/profile-$name.txt"
  fi
done
