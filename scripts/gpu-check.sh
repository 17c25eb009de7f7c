#!/usr/bin/env bash
# Checks and benchmarks of the CUDA build, in one call on the GPU machine.
#
#   scripts/build-cuda.sh              # here: .xz/pipeline.xz
#   scripts/gpu-check.sh prepare       # here: copies models, text and fixtures from ../shared to .carry/
#   scripts/gpu-check.sh run           # there, with .xz and .carry carried; results under $OUT
#
# `run` measures copy bandwidth and matmul peak; perplexity (f32 and bf16) and logits of both
# shared models against ../shared/fixtures; one training step's loss and gradients against the
# CPU (bench grads); decoding tokens/s of a synthetic TinyLlama-1.1B in
# bf16 at batch 1, 32 and 128 next to the bandwidth bound; W4A8KV4 QAT training tokens/s with
# the teacher online at batch 4 and 16 (x 512), its MFU and peak GPU memory; and a training run killed with SIGKILL and
# resumed, compared with an uninterrupted one. Everything lands in $OUT/gpu-check.json.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if [ "${1:-}" = prepare ]; then
  S=${SHARED:-../shared}
  rm -rf .carry && mkdir -p .carry/models .carry/data .carry/fixtures
  cp -r "$S/models/stories260k" "$S/models/tinystories-656k" .carry/models/
  rm -rf .carry/models/*/original
  cp "$S/data/tinystories-valid-64k.txt" .carry/data/
  cp -r "$S/fixtures/ppl.json" "$S/fixtures/logits" .carry/fixtures/
  du -sh .carry
  exit 0
fi
[ "${1:-}" = run ] || { echo "usage: $0 prepare|run" >&2; exit 2; }

OUT=${OUT:-/tmp/gpu-check}
W=/tmp/gpu-work # models, corpora and checkpoints stay here
RES=$W/res      # per-step results; $OUT gets gpu-check.json and raw.tar.gz (at most 8 files come back)
rm -rf "$W" && mkdir -p "$OUT" "$RES"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
BIN=$W/pipeline
xz -dc .xz/pipeline.xz >"$BIN" && chmod +x "$BIN"
C=.carry
TEXT=$C/data/tinystories-valid-64k.txt
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RES/gpu.txt"
step() { echo "== $* ($(date +%T))" >&2; }

step device
"$BIN" bench device --device cuda >"$RES/device.json" || exit 1
cat "$RES/device.json"
COPY=$(python3 -c "import json;print(json.load(open('$RES/device.json'))['copy_gb_per_s'])")

step perplexity
: >"$RES/ppl.jsonl"
for m in stories260k tinystories-656k; do
  for dtype in f32 bf16 f16; do
    # --batch 1: each window alone, as the references were computed. Batched windows change
    # cuBLAS's summation order, which flips 4-bit K/V roundings (stories260k w4a8kv4 f32:
    # 21.045 alone, 20.979 batched; fixture 21.038).
    "$BIN" eval --model $C/models/$m --text $TEXT --json --device cuda --dtype $dtype --batch 1 >>"$RES/ppl.jsonl"
    "$BIN" eval --model $C/models/$m --text $TEXT --json --device cuda --dtype $dtype --batch 1 \
      --w-bits 4 --a-bits 8 --kv-bits 4 >>"$RES/ppl.jsonl"
  done
done
cat "$RES/ppl.jsonl"

step grads
# One training step's loss and every gradient on the GPU (fused training blocks) against the CPU.
: >"$RES/grads.jsonl"
for m in stories260k tinystories-656k; do
  for q in "" "--w-bits 4 --a-bits 8 --kv-bits 4" "--w-bits 4 --a-bits 8 --kv-bits 4 --kv-point pre_rope --w-group 32"; do
    for dtype in f32 bf16; do
      "$BIN" bench grads --model $C/models/$m $q --device cuda --dtype $dtype >>"$RES/grads.jsonl"
    done
  done
done

step logits
: >"$RES/logits.jsonl"
for m in stories260k tinystories-656k; do
  for dtype in f32 bf16; do
    "$BIN" bench logits --model $C/models/$m --reference $C/fixtures/logits/$m.safetensors \
      --device cuda --dtype $dtype >>"$RES/logits.jsonl"
  done
done

step synth-model
"$BIN" synth-model --shape tinyllama-1.1b --out $W/tinyllama | tee "$RES/synth.json"

step decode
"$BIN" bench decode --model $W/tinyllama --batch 1,32,128 --steps 64 --warmup 8 \
  --copy-gbps "$COPY" --device cuda --dtype bf16 | tee "$RES/decode.json"
"$BIN" bench decode --model $W/tinyllama --batch 1,32,128 --steps 64 --warmup 8 \
  --copy-gbps "$COPY" --device cuda --dtype bf16 --cuda-graph | tee "$RES/decode-graph.json"

step generate-graph
# The same corpus decoded eagerly and with CUDA graphs (stories260k, f32): same tokens?
for g in "" --cuda-graph; do
  "$BIN" generate --teacher $C/models/stories260k --out $W/gcorpus$g --samples 512 --max-tokens 256 \
    --batch 64 --device cuda $g --json >"$RES/gen${g:-eager}.json" || exit 1
done
python3 - "$W" "$RES" <<'PY'
import json, sys, glob, pyarrow.parquet as pq
w, res = sys.argv[1], sys.argv[2]
def toks(d):
    out = []
    for f in sorted(glob.glob(f"{d}/shard-*.parquet")):
        out += [list(t) for t in pq.read_table(f).column("tokens").to_pylist()]
    return out
a, b = toks(f"{w}/gcorpus"), toks(f"{w}/gcorpus--cuda-graph")
same = sum(x == y for x, y in zip(a, b))
json.dump({"samples": len(a), "identical_samples": same}, open(f"{res}/generate-graph-compare.json", "w"))
print("graph vs eager corpus:", same, "of", len(a), "samples identical")
PY

step generate
# A corpus for the training benchmark, made by the synthetic teacher on the GPU.
"$BIN" generate --teacher $W/tinyllama --out $W/corpus --samples 64 --max-tokens 513 \
  --shard-size 64 --batch 64 --device cuda --dtype bf16 --json | tee "$RES/generate.json"

step train
# W4A8KV4 QAT with the teacher online at batch 4 and 16 (x 512 tokens). Timed steps only: once
# the last step is logged, the run is stopped before it writes its (13 GB) checkpoint;
# checkpointing is what the kill-and-resume check below covers.
for TB in ${TRAIN_BATCHES:-4 16}; do
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$W/mem-$TB.log" &
  POLL=$!
  TRAIN_CMD="$BIN train --teacher $W/tinyllama --corpus $W/corpus --out $W/train-$TB --steps ${TRAIN_STEPS:-10} --batch $TB --seq-len 512 --log-every 1 --checkpoint-every 1000 --device cuda --dtype bf16"
  echo "$TRAIN_CMD" >"$RES/train_cmd-$TB.txt"
  $TRAIN_CMD >$W/train-$TB.log 2>&1 &
  TPID=$!
  while kill -0 $TPID 2>/dev/null && [ "$(cat $W/train-$TB/train_log.jsonl 2>/dev/null | wc -l)" -lt "${TRAIN_STEPS:-10}" ]; do sleep 0.2; done
  kill -9 $TPID 2>/dev/null
  wait $TPID 2>/dev/null
  grep -v '^ *[0-9]*: ' $W/train-$TB.log | tail -n 5
  kill $POLL
  cp $W/train-$TB/train_log.jsonl "$RES/train_log-$TB.jsonl"
  sort -n "$W/mem-$TB.log" | tail -n 1 >"$RES/train_peak_mib-$TB.txt"
done

step f16-train
# A few f16 training steps with the small teacher: finite losses, a checkpoint that loads.
"$BIN" generate --teacher $C/models/stories260k --out $W/f16corpus --samples 64 --max-tokens 256 --device cuda >/dev/null
"$BIN" train --teacher $C/models/stories260k --corpus $W/f16corpus --out $W/f16train --steps 20 --batch 8 \
  --seq-len 256 --log-every 5 --checkpoint-every 10 --device cuda --dtype f16 >/dev/null 2>&1
cp $W/f16train/train_log.jsonl "$RES/f16_train_log.jsonl"
"$BIN" eval --model $W/f16train/student --text $TEXT --json --device cuda --dtype f16 \
  --w-bits 4 --a-bits 8 --kv-bits 4 >"$RES/f16_student_eval.json"
cat "$RES/f16_train_log.jsonl" "$RES/f16_student_eval.json"

step kill-and-resume
# Small teacher: an uninterrupted run, and one killed by SIGKILL after its step-20 checkpoint.
M=$C/models/stories260k
"$BIN" generate --teacher $M --out $W/kcorpus --samples 256 --max-tokens 256 --device cuda >/dev/null
KR="--teacher $M --corpus $W/kcorpus --steps 40 --batch 8 --seq-len 256 --log-every 1 --checkpoint-every 10 --device cuda"
"$BIN" train $KR --out $W/full >/dev/null 2>&1
"$BIN" train $KR --out $W/killed >/dev/null 2>&1 &
PID=$!
while [ ! -e $W/killed/checkpoints/step-00000020/manifest.json ] && kill -0 $PID 2>/dev/null; do sleep 0.05; done
kill -9 $PID 2>/dev/null
wait $PID 2>/dev/null
ls $W/killed/checkpoints | tee "$RES/killed_checkpoints.txt"
"$BIN" train $KR --out $W/killed 2>&1 | tail -n 3

step summary
python3 - "$RES" "$W" "$OUT" <<'EOF'
import json, sys, os
out, w, final = sys.argv[1], sys.argv[2], sys.argv[3]
from safetensors.numpy import load_file
r = {"gpu": open(f"{out}/gpu.txt").read().strip()}
r["device"] = json.load(open(f"{out}/device.json"))
fix = json.load(open(".carry/fixtures/ppl.json"))
ppl = []
for line in open(f"{out}/ppl.jsonl"):
    e = json.loads(line)
    name = os.path.basename(e["model"])
    ref = fix[name][e["quant"]]["ppl"]
    ppl.append({"model": name, "quant": e["quant"], "dtype": e["dtype"], "ppl": e["ppl"],
                "fixture": ref, "rel_diff": abs(e["ppl"] - ref) / ref,
                "tokens_per_second": e["tokens_per_second"]})
r["perplexity"] = ppl
r["logits"] = [json.loads(l) for l in open(f"{out}/logits.jsonl")]
r["grads"] = [json.loads(l) for l in open(f"{out}/grads.jsonl")]
dec = json.load(open(f"{out}/decode.json"))
r["decode"] = dec
r["decode_cuda_graph"] = json.load(open(f"{out}/decode-graph.json"))
r["generate_cuda_graph"] = {
    "eager": json.load(open(f"{out}/geneager.json")),
    "graph": json.load(open(f"{out}/gen--cuda-graph.json")),
    "compare": json.load(open(f"{out}/generate-graph-compare.json")),
}
r["f16_train_log"] = [json.loads(l) for l in open(f"{out}/f16_train_log.jsonl")]
r["f16_student_eval"] = json.load(open(f"{out}/f16_student_eval.json"))
params = dec["parameters"]
peak = r["device"]["bf16_matmul_tflops"] * 1e12
# Student forward + backward (6 N) and teacher forward (2 N) per token.
flops_per_token = 8 * params
r["train"] = []
for tb in sorted(int(f[len("train_log-"):-len(".jsonl")]) for f in os.listdir(out) if f.startswith("train_log-")):
    log = [json.loads(l) for l in open(f"{out}/train_log-{tb}.jsonl")]
    steady = log[2:] or log  # the first steps include warm-up (allocations, kernel loads)
    tps = sum(l["tokens_per_second"] for l in steady) / len(steady)
    r["train"].append({"batch": tb, "seq_len": 512,
                       "command": open(f"{out}/train_cmd-{tb}.txt").read().strip(), "parameters": params,
                       "steady_tokens_per_second": tps, "steps_averaged": len(steady),
                       "flops_per_token": flops_per_token,
                       "mfu": tps * flops_per_token / peak,
                       "peak_gpu_memory_mib": float(open(f"{out}/train_peak_mib-{tb}.txt").read().strip() or 0),
                       "log": log})
a = load_file(f"{w}/full/student/model.safetensors")
b = load_file(f"{w}/killed/student/model.safetensors")
la = [json.loads(l) for l in open(f"{w}/full/train_log.jsonl")]
lb = [json.loads(l) for l in open(f"{w}/killed/train_log.jsonl")]
r["resume"] = {
    "killed_checkpoints": open(f"{out}/killed_checkpoints.txt").read().split(),
    "identical_weights": all((a[k] == b[k]).all() for k in a),
    "max_abs_weight_diff": float(max(abs(a[k] - b[k]).max() for k in a)),
    "final_loss_uninterrupted": la[-1]["loss"], "final_loss_resumed": lb[-1]["loss"],
    "max_abs_loss_diff": max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb)),
}
json.dump(r, open(f"{final}/gpu-check.json", "w"), indent=1)
s = {k: r[k] for k in ("perplexity", "resume", "generate_cuda_graph", "f16_student_eval")}
s["grads"] = [{k: g[k] for k in ("quant", "dtype", "loss_rel_diff", "grad_rel_diff_median")} | {"model": os.path.basename(g["model"])} for g in r["grads"]]
s["decode"] = [{k: x[k] for k in ("batch", "tokens_per_second", "fraction_of_bound")} for x in dec["runs"]]
s["decode_cuda_graph"] = [{k: x[k] for k in ("batch", "tokens_per_second", "fraction_of_bound")}
                          for x in r["decode_cuda_graph"]["runs"]]
s["train"] = [{k: v for k, v in t.items() if k != "log"} for t in r["train"]]
print(json.dumps(s, indent=1))
EOF
tar -czf "$OUT/raw.tar.gz" -C "$W" res
