#!/usr/bin/env bash
# Generation speed with the synthetic TinyLlama-1.1B teacher on the GPU machine, for two builds
# side by side (.xz/pipeline-old.xz and .xz/pipeline.xz, carried), and whether they write the
# same corpus. Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gen-bench}
W=/tmp/gen-bench-work
rm -rf "$W" && mkdir -p "$W" "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for b in old new; do
  src=.xz/pipeline-$b.xz
  [ $b = new ] && src=.xz/pipeline.xz
  xz -dc $src >$W/pipeline-$b && chmod +x $W/pipeline-$b
done
$W/pipeline-new synth-model --shape tinyllama-1.1b --out $W/tinyllama >/dev/null
# Warm-up: kernel modules loaded and JIT-compiled once.
$W/pipeline-new generate --teacher $W/tinyllama --out $W/warm --samples 16 --max-tokens 64 --batch 16 \
  --device cuda --dtype bf16 >/dev/null 2>&1
: >"$OUT/generate.jsonl"
for run in old new new-graph; do
  b=${run%-graph}
  extra=""
  [ $run = new-graph ] && extra="--cuda-graph --workers 1"
  $W/pipeline-$b generate --teacher $W/tinyllama --out $W/corpus-$run \
    --samples ${SAMPLES:-256} --max-tokens 513 --shard-size 256 --batch 128 --device cuda --dtype bf16 \
    $extra --json | sed "s/^{/{\"run\":\"$run\",/" | tee -a "$OUT/generate.jsonl"
done
for run in new new-graph; do
  if cmp -s $W/corpus-old/shard-00000.parquet $W/corpus-$run/shard-00000.parquet; then
    echo "corpus of $run: identical to old"
  else
    echo "corpus of $run: DIFFERS from old"
  fi
done | tee "$OUT/compare.txt"
