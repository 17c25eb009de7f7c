#!/usr/bin/env bash
# The llmqat recipe (pipelines/llmqat.toml, W4A8KV4, f32) on the GPU machine, for the small
# teachers stories260k and tinystories-656k, resumable across calls of the device tool.
#   here:  scripts/gpu-llmqat.sh prepare [RUN_TARBALL...]
#            fills .carry/ with the two models (stories260k without original/), the 64k eval
#            text, and copies each RUN_TARBALL (MODEL.tar.xz from an earlier call) to
#            .carry/resume/ so that the next call resumes that run
#   there: scripts/gpu-llmqat.sh run MODEL... (carry .xz and .carry)
#            unpacks .carry/resume/MODEL.tar.xz if present, runs `pipeline run` into
#            runs/llmqat-gpu/MODEL under a time budget (BUDGET_S seconds for all models,
#            default 540), and writes $OUT/MODEL.tar.xz (the whole run directory, relative to
#            runs/llmqat-gpu/) and $OUT/MODEL.log.
#   back here: mkdir -p runs/llmqat-gpu && tar -xJf MODEL.tar.xz -C runs/llmqat-gpu
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
C=.carry

if [ "${1:-}" = prepare ]; then
  shift
  S=${SHARED:-../shared}
  rm -rf $C && mkdir -p $C/models $C/data $C/resume
  cp -r "$S/models/stories260k" $C/models/ && rm -rf $C/models/stories260k/original
  cp -r "$S/models/tinystories-656k" $C/models/
  cp "$S/data/tinystories-valid-64k.txt" $C/data/
  chmod -R u+w $C
  for t in "$@"; do cp "$t" $C/resume/; done
  du -sh $C
  exit 0
fi
[ "${1:-}" = run ] && [ $# -ge 2 ] || { echo "usage: $0 prepare [RUN_TARBALL...] | run MODEL..." >&2; exit 2; }
shift

T0=$(date +%s)
BUDGET=${BUDGET_S:-540}
OUT=${OUT:-/tmp/gpu-llmqat}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
BIN=/tmp/pipeline-llmqat
xz -dc .xz/pipeline.xz >"$BIN" && chmod +x "$BIN" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
RUNS=runs/llmqat-gpu
mkdir -p $RUNS

for m in "$@"; do
  D=$RUNS/$m
  LOG=$OUT/$m.log
  rm -rf "$D"
  if [ -f $C/resume/$m.tar.xz ]; then
    tar -xJf $C/resume/$m.tar.xz -C $RUNS && echo "== $m: unpacked $C/resume/$m.tar.xz"
  fi
  left=$((BUDGET - ($(date +%s) - T0)))
  if [ $left -lt 30 ]; then echo "== $m: no time left ($left s)"; continue; fi
  echo "== $m: pipeline run, $left s budget ($(date +%T))"
  # Generation prints nothing while stderr is not a terminal: report its shards meanwhile.
  (while sleep 30; do
     [ -d "$D/corpus" ] && echo "   [$(date +%T)] corpus: $(ls "$D/corpus" | wc -l) files, $(du -sh "$D/corpus" | cut -f1)"
   done) &
  WATCH=$!
  s=$(date +%s)
  timeout -k 5 "$left" "$BIN" run pipelines/llmqat.toml \
    --set run.device=cuda \
    --set teacher.model=$C/models/$m \
    --set run.directory=$D \
    --set eval.text=$C/data/tinystories-valid-64k.txt 2>&1 | tee "$LOG"
  rc=${PIPESTATUS[0]}
  kill $WATCH 2>/dev/null; wait $WATCH 2>/dev/null
  echo "== $m: rc $rc after $(($(date +%s) - s)) s ($(date +%T))"
  for st in corpus train eval; do
    [ -f "$D/$st/stage.json" ] && python3 -c "import json,sys; v=json.load(open(sys.argv[1])); print('   $st:', v.get('status'), {k: v[k] for k in v if 'sec' in k or 'time' in k})" "$D/$st/stage.json"
  done
  rm -f "$D/.lock"
  tar -cJf "$OUT/$m.tar.xz" -C $RUNS "$m" && ls -l "$OUT/$m.tar.xz"
  [ -f "$D/eval/report.json" ] && cp "$D/eval/report.json" "$OUT/$m.report.json"
done
echo "== done after $(($(date +%s) - T0)) s"
