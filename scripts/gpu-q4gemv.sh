#!/usr/bin/env bash
# The 4-bit decoding GEMV before and after a kernel change, on the GPU machine (issue 18): the
# same packed W4 export of the synthetic TinyLlama-1.1B decoded by two binaries in one run
# (.xz/pipeline-old.xz and .xz/pipeline.xz), the bf16 teacher beside them, and tinystories-656k's
# W4 KV4 perplexity through the GEMV against the CPU's packed path.
#   scripts/build-cuda.sh (and keep the previous .xz/pipeline.xz as .xz/pipeline-old.xz)   # here
#   scripts/gpu-q4gemv.sh                                      # there; writes $OUT/q4gemv.jsonl
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/q4gemv}
W=/tmp/q4gemv-work
rm -rf "$W" && mkdir -p "$OUT" "$W"
R=$OUT/q4gemv.jsonl
: >"$R"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for b in pipeline pipeline-old; do xz -dc .xz/$b.xz >"$W/$b" && chmod +x "$W/$b"; done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
T=.carry/models/tinystories-656k
TEXT=.carry/data/tinystories-valid-64k.txt
for c in "cpu-f32-packed-int4|--device cpu --packed --kv-cache int4" \
  "gpu-bf16-packed-int4|--device cuda --dtype bf16 --packed --kv-cache int4" \
  "gpu-bf16-fake-kv4|--device cuda --dtype bf16"; do
  IFS='|' read -r label flags <<<"$c"
  for b in pipeline pipeline-old; do
    # shellcheck disable=SC2086
    p=$("$W/$b" eval --model $T --text $TEXT --w-bits 4 --kv-bits 4 --batch 4 --json $flags 2>/dev/null |
      python3 -c "import json,sys; print(json.load(sys.stdin)['ppl'])")
    echo "{\"check\": \"ppl\", \"binary\": \"$b\", \"label\": \"$label\", \"ppl\": ${p:-null}}" | tee -a "$R"
  done
done
"$W/pipeline" synth-model --shape tinyllama-1.1b --out $W/tinyllama >/dev/null
mkdir -p $W/student
cp $W/tinyllama/config.json $W/tinyllama/tokenizer.json $W/tinyllama/*.safetensors $W/student/
echo '{"w_bits": 4, "w_group": null, "a_bits": null, "kv_bits": null}' >$W/student/quantization.json
"$W/pipeline" export --student $W/student --out $W/packed --format packed >/dev/null || exit 1
for rep in 1 2; do
  for c in "teacher-bf16|pipeline|$W/tinyllama|" "packed-w4-int4|pipeline-old|$W/packed/model|--packed --kv-cache int4" \
    "packed-w4-int4|pipeline|$W/packed/model|--packed --kv-cache int4"; do
    IFS='|' read -r name b model flags <<<"$c"
    for batch in 1 64; do
      # shellcheck disable=SC2086
      "$W/$b" bench decode --model "$model" --batch $batch --steps 128 --warmup 8 --device cuda --dtype bf16 \
        --cuda-graph $flags 2>/dev/null | python3 -c "
import json,sys; r=json.load(sys.stdin)['runs'][0]
print(json.dumps({'check':'decode','config':'$name','binary':'$b','batch':$batch,'repeat':$rep,'tokens_per_second':r['tokens_per_second'],'ms_per_step':r['ms_per_step'],'fraction_of_bound':r['fraction_of_bound']}))" | tee -a "$R"
    done
  done
done
