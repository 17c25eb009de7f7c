#!/usr/bin/env bash
# GPU checks of the checkpoint forms and the student methods (run on the GPU machine, with
# .xz/pipeline.xz from scripts/build-cuda.sh and .carry/ from `scripts/gpu-students.sh prepare`):
#  1. every tiny transformers checkpoint of tests/hf_archs.rs through `bench logits` on the GPU
#     (f32 and bf16): full forward and the batched decoder against transformers' logits;
#  2. a qlora student of stories260k trained on the GPU (NF4 base, f32);
#  3. peak GPU memory and tokens/s of qat against qlora training on the synthetic
#     TinyLlama-1.1B shape in bf16 (batch 4 x 512, teacher online), and trainable parameters.
# Writes $OUT/gpu-students.jsonl.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if [ "${1:-}" = prepare ]; then
  S=${SHARED:-../shared}
  rm -rf .carry && mkdir -p .carry/models .carry/data
  cp -r "$S/models/stories260k" .carry/models/ && rm -rf .carry/models/stories260k/original
  cp "$S/data/tinystories-valid-64k.txt" .carry/data/
  python3 scripts/hf_arch_reference.py .carry/hfarch "$S" >/dev/null
  du -sh .carry
  exit 0
fi
[ "${1:-}" = run ] || { echo "usage: $0 prepare|run" >&2; exit 2; }

OUT=${OUT:-/tmp/gpu-students}
W=/tmp/gpu-students-work
rm -rf "$W" && mkdir -p "$OUT" "$W"
R=$OUT/gpu-students.jsonl
: >"$R"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
BIN=$W/pipeline
xz -dc .xz/pipeline.xz >"$BIN" && chmod +x "$BIN"
C=.carry
step() { echo "== $* ($(date +%T))" >&2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

step hf-archs
for d in $C/hfarch/*/; do
  for dtype in f32 bf16; do
    "$BIN" bench logits --model "$d" --reference "$d/reference.safetensors" --device cuda --dtype $dtype |
      python3 -c "import json,sys; v=json.load(sys.stdin); print(json.dumps({'check':'hf_archs','model':v['model'].rstrip('/').split('/')[-1],'dtype':v['dtype'],'cases':{k:{x:c[x] for x in ('max_abs_diff','argmax_mismatch') if x in c} for k,c in v['cases'].items() if k!='fp.greedy'},'greedy_first_mismatch':v['cases'].get('fp.greedy',{}).get('first_mismatch')}))" >>"$R" ||
      echo "{\"check\":\"hf_archs\",\"model\":\"$d\",\"dtype\":\"$dtype\",\"error\":true}" >>"$R"
  done
done

step qlora-stories260k
"$BIN" quantize --model $C/models/stories260k --out $W/base260k --format nf4 --double-quant >/dev/null
"$BIN" generate --teacher $C/models/stories260k --out $W/corpus260k --samples 128 --max-tokens 256 --device cuda >/dev/null
"$BIN" train --teacher $C/models/stories260k --corpus $W/corpus260k --out $W/q260k --method qlora \
  --base $W/base260k --steps 40 --batch 8 --seq-len 256 --lr 2e-3 --log-every 10 --device cuda 2>&1 | grep -E "step|student" >&2
for m in $W/base260k $W/q260k/student; do
  "$BIN" eval --model $m --text $C/data/tinystories-valid-64k.txt --device cuda --json |
    python3 -c "import json,sys; v=json.load(sys.stdin); print(json.dumps({'check':'qlora_stories260k','model':'$m','ppl':v['ppl']}))" >>"$R"
done

step memory
"$BIN" synth-model --shape tinyllama-1.1b --out $W/tinyllama >/dev/null
"$BIN" generate --teacher $W/tinyllama --out $W/corpus --samples 32 --max-tokens 513 --shard-size 32 \
  --batch 32 --device cuda --dtype bf16 >/dev/null
"$BIN" quantize --model $W/tinyllama --out $W/tinyllama-nf4 --format nf4 --double-quant >/dev/null
for method in qat qlora; do
  extra=""
  [ $method = qlora ] && extra="--method qlora --base $W/tinyllama-nf4 --a-bits 8 --kv-bits 4"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$W/mem-$method.log" &
  POLL=$!
  "$BIN" train --teacher $W/tinyllama --corpus $W/corpus --out $W/train-$method --steps 6 --batch 4 \
    --seq-len 512 --log-every 1 --checkpoint-every 1000 --device cuda --dtype bf16 $extra >$W/train-$method.log 2>&1
  rc=$?
  kill $POLL
  peak=$(sort -n "$W/mem-$method.log" | tail -n 1)
  grep -E "trainable|step 6/" $W/train-$method.log >&2
  python3 - "$method" "$peak" "$rc" "$W/train-$method" "$W/train-$method.log" >>"$R" <<'PY'
import json, re, sys
method, peak, rc, d, log = sys.argv[1:6]
lines = [json.loads(l) for l in open(f"{d}/train_log.jsonl")] if rc == "0" else []
text = open(log).read()
m = re.search(r"(\d+) trainable parameters", text)
print(json.dumps({
    "check": "train_memory", "model": "synth tinyllama-1.1b bf16", "method": method,
    "batch": 4, "seq_len": 512, "rc": int(rc), "peak_gpu_mib": int(peak) if peak else None,
    "trainable_parameters": int(m.group(1)) if m else None,
    "tokens_per_second_last": lines[-1]["tokens_per_second"] if lines else None,
    "loss_last": lines[-1]["loss"] if lines else None,
    "error_tail": None if rc == "0" else text[-800:],
}))
PY
done
cat "$R"
