#!/usr/bin/env bash
# A short check of the CUDA build's unfused paths (the shared decoder block, the qlora and lrqat
# graph nodes) on the GPU machine, for when device time is short: perplexity of both shared
# models (fp and w4a8kv4, f32 and bf16, --batch 1, against ../shared/fixtures/ppl.json), and 10
# steps each of qlora (NF4 base, lora_dropout 0.1) and lrqat (checkpointed) training in bf16.
#   scripts/gpu-check.sh prepare; scripts/build-cuda.sh   (here)
#   scripts/gpu-quick.sh                                   (there; writes $OUT/gpu-quick.jsonl)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu-quick}
W=/tmp/gpu-quick-work
rm -rf "$W" && mkdir -p "$OUT" "$W"
R=$OUT/gpu-quick.jsonl
: >"$R"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
B=$W/pipeline
xz -dc .xz/pipeline.xz >"$B" && chmod +x "$B"
T=.carry/data/tinystories-valid-64k.txt
for m in stories260k tinystories-656k; do
  for q in fp w4a8kv4; do
    flags=()
    [ $q = w4a8kv4 ] && flags=(--w-bits 4 --a-bits 8 --kv-bits 4)
    for dt in f32 bf16; do
      ppl=$("$B" eval --model .carry/models/$m --text $T "${flags[@]}" --device cuda --dtype $dt --batch 1 --json 2>>"$OUT/err.log" |
        python3 -c "import json,sys; print(json.load(sys.stdin)['ppl'])")
      want=$(python3 -c "import json; print(json.load(open('.carry/fixtures/ppl.json'))['$m']['$q']['ppl'])")
      echo "{\"check\": \"ppl\", \"model\": \"$m\", \"quant\": \"$q\", \"dtype\": \"$dt\", \"ppl\": ${ppl:-null}, \"reference\": $want}" | tee -a "$R"
    done
  done
done
M=.carry/models/stories260k
"$B" generate --teacher $M --out $W/corpus --samples 64 --max-tokens 129 --batch 64 --device cuda --dtype bf16 >/dev/null 2>>"$OUT/err.log"
"$B" quantize --model $M --out $W/nf4 --format nf4 --double-quant >/dev/null 2>>"$OUT/err.log"
for c in "qlora|--method qlora --base $W/nf4 --lora-dropout 0.1" "lrqat|--method lrqat --lora-rank 16 --w-bits 4 --a-bits 8 --kv-bits 4 --checkpoint-activations"; do
  n=${c%%|*}
  # shellcheck disable=SC2086
  "$B" train --teacher $M --corpus $W/corpus --out $W/$n --steps 10 --batch 8 --seq-len 128 --lr 2e-3 \
    --log-every 5 --device cuda --dtype bf16 ${c#*|} >$W/$n.log 2>&1
  rc=$?
  ppl=$([ $rc = 0 ] && "$B" eval --model $W/$n/student --text $T --device cuda --dtype bf16 --batch 1 \
    $([ $n = lrqat ] && echo --a-bits 8 --kv-bits 4) --json 2>>"$OUT/err.log" | python3 -c "import json,sys; print(json.load(sys.stdin)['ppl'])")
  echo "{\"check\": \"train\", \"method\": \"$n\", \"rc\": $rc, \"loss\": \"$(grep -o 'loss [0-9.]*' $W/$n.log | tr '\n' ' ')\", \"ppl\": ${ppl:-null}}" | tee -a "$R"
  [ $rc = 0 ] || tail -5 $W/$n.log
done
