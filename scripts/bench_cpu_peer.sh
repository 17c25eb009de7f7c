#!/usr/bin/env bash
# The CPU side by side of issue 22: the pipeline against PyTorch eager + transformers (f32,
# 2 threads each) on the same 135M-class model folder, the same work, in one run:
#   scripts/bench_cpu_peer.sh [OUT_JSON]        (default benchmarks/cpu-vs-pytorch.json)
# Builds nothing: runs $BIN (default target/release/pipeline, copied into the work dir first so
# that a rebuild during the run cannot change it). The PyTorch side is benchmarks/cpu_peer.py.
# Work: generate (batch 1 x 64 new tokens, batch 16 x 128), eval (ctx 512, 4 windows at a time,
# the first EVAL_TOKENS ids of the 64k TinyStories text), W4A8KV4 QAT with the teacher online at
# batch 2 x 128 (tokens/s over the steps after the first, peak RSS), NF4 + double quant.
# Writes one JSON with both sides, the ratio project / PyTorch of each row and the issue's goal.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${1:-benchmarks/cpu-vs-pytorch.json}
S=${SHARED:-../shared}
TEXT=$S/data/tinystories-valid-64k.txt
W=${WORK:-/tmp/bench-cpu-peer}
EVAL_TOKENS=${EVAL_TOKENS:-8193}
TRAIN_STEPS=${TRAIN_STEPS:-8}
LOAD=$(cut -d' ' -f1 /proc/loadavg)
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 HF_HUB_DISABLE_PROGRESS_BARS=1
mkdir -p "$W"
cp "${BIN:-target/release/pipeline}" "$W/pipeline"
BIN=$W/pipeline
M=$W/smollm-135m
[ -f "$M/config.json" ] || "$BIN" synth-model --shape smollm-135m --out "$M" >/dev/null

echo "PyTorch side ..." >&2
python3 benchmarks/cpu_peer.py --model "$M" --text "$TEXT" --eval-tokens "$EVAL_TOKENS" \
  --train-steps $((TRAIN_STEPS - 1)) >"$W/pytorch.json"

# The machine's ceiling for matrix products: PyTorch's f32 GEMM at 2 threads on square
# matrices (what either side could reach if nothing but products ran).
python3 - >"$W/gemm.json" <<'PY'
import json, time, torch
torch.set_num_threads(2)
best = 0.0
for n in (1024, 2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    best = max(best, 2 * n**3 * 5 / (time.perf_counter() - t) / 1e9)
print(json.dumps({"sgemm_gflop_per_s": best}))
PY

echo "pipeline side ..." >&2
rm -rf "$W/gen-b1" "$W/gen-b16" "$W/train" "$W/nf4"
"$BIN" generate --teacher "$M" --out "$W/gen-b1" --samples 1 --max-tokens 65 --json >"$W/gen-b1.json"
"$BIN" generate --teacher "$M" --out "$W/gen-b16" --samples 16 --batch 16 --max-tokens 129 --json >"$W/gen-b16.json"
"$BIN" eval --model "$M" --text "$TEXT" --ctx 512 --batch 4 --max-tokens "$EVAL_TOKENS" --json >"$W/eval.json"
# The batch-16 corpus (16 x 129 tokens of the teacher) is the training corpus: enough for
# TRAIN_STEPS steps of 2 x 128 without a second generate.
/usr/bin/time -v -o "$W/train.time" "$BIN" train --teacher "$M" --corpus "$W/gen-b16" --out "$W/train" \
  --w-bits 4 --a-bits 8 --kv-bits 4 --batch 2 --seq-len 128 --steps "$TRAIN_STEPS" --log-every 1 \
  --checkpoint-every "$TRAIN_STEPS" >/dev/null 2>"$W/train.err"
cp "$W/train/train_log.jsonl" "$W/train_log.jsonl"
# The same training with each decoder block recomputed in the backward pass (the issue allows
# it for memory): its peak RSS and tokens/s are reported beside the plain run's.
rm -rf "$W/train"
/usr/bin/time -v -o "$W/train-ckpt.time" "$BIN" train --teacher "$M" --corpus "$W/gen-b16" --out "$W/train" \
  --w-bits 4 --a-bits 8 --kv-bits 4 --batch 2 --seq-len 128 --steps "$TRAIN_STEPS" --log-every 1 \
  --checkpoint-every "$TRAIN_STEPS" --checkpoint-activations >/dev/null 2>"$W/train-ckpt.err"
cp "$W/train/train_log.jsonl" "$W/train_log_ckpt.jsonl"
"$BIN" quantize --model "$M" --out "$W/nf4" --format nf4 --double-quant --json >"$W/nf4.json"
"$BIN" bench-memcpy --mib 512 >"$W/memcpy.json"
rm -rf "$W/train" "$W/nf4"

python3 - "$W" "$OUT" "$LOAD" "$EVAL_TOKENS" "$*" <<'EOF'
import datetime, json, os, re, sys
w, out, load, eval_tokens, args = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rd = lambda n: json.load(open(os.path.join(w, n)))
pt = rd("pytorch.json")
g1, g16, ev, nf4, memcpy = rd("gen-b1.json"), rd("gen-b16.json"), rd("eval.json"), rd("nf4.json"), rd("memcpy.json")
tokens_per_step = 2 * 128

def train_run(log_name, time_name):
    log = [json.loads(l) for l in open(os.path.join(w, log_name))]
    timed = log[1:]  # the first step is the warmup, as on the PyTorch side
    tps = len(timed) * tokens_per_step / sum(tokens_per_step / l["tokens_per_second"] for l in timed)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(os.path.join(w, time_name)).read()).group(1))
    return log, tps, rss

log, train_tps, rss_kib = train_run("train_log.jsonl", "train.time")
log_ckpt, train_tps_ckpt, rss_kib_ckpt = train_run("train_log_ckpt.jsonl", "train-ckpt.time")

def gen(v, samples):
    new = v["tokens_made"] - samples  # the first token of each sample is the prompt, not decoded
    # Model load excluded, as on the PyTorch side (decoding and the shard write remain).
    secs = v["seconds"] - v["load_seconds"]
    return {"new_tokens": new, "seconds": secs, "load_seconds": v["load_seconds"],
            "tokens_per_second": new / secs, "tool_tokens_per_second": v["tokens_per_second"]}

def row(work, unit, p, q, goal, better="higher"):
    return {"work": work, "unit": unit, "pytorch": p, "project": q, "ratio": q / p, "goal": goal, "better": better}

p_train = pt["train"]["train"]
rows = [
    row("generate, sampling, batch 1 (64 new tokens)", "tok/s",
        pt["generate"]["generate"]["batch1"]["tokens_per_second"], gen(g1, 1)["tokens_per_second"], ">= 2x"),
    row("generate, batch 16 (128 new tokens)", "tok/s",
        pt["generate"]["generate"]["batch16"]["tokens_per_second"], gen(g16, 16)["tokens_per_second"], ">= 2x"),
    row("QAT W4A8KV4 + teacher online, batch 2 x 128", "tok/s", p_train["tokens_per_second"], train_tps, ">= 1.5x"),
    row("same, peak RSS", "GB", p_train["peak_rss_bytes"] / 1e9, rss_kib * 1024 / 1e9, "<= 0.6x", "lower"),
    row("same with --checkpoint-activations (project only; PyTorch keeps activations)", "tok/s",
        p_train["tokens_per_second"], train_tps_ckpt, ">= 1.5x"),
    row("same with --checkpoint-activations, peak RSS", "GB", p_train["peak_rss_bytes"] / 1e9,
        rss_kib_ckpt * 1024 / 1e9, "<= 0.6x", "lower"),
    row(f"eval fp, ctx 512, 4 windows at a time (first {eval_tokens} ids of the 64k text)", "tok/s",
        pt["eval"]["eval"]["tokens_per_second"], ev["tokens_per_second"], ">= 1.5x"),
]
if pt["nf4"].get("nf4"):
    r = row("NF4 + double quant, quantize (project: end to end; bitsandbytes: kernel on in-memory tensors)", "GB/s",
            pt["nf4"]["nf4"]["gb_per_s"], nf4["end_to_end_gb_per_s"], ">= 50% of memcpy")
    r["project_kernel_gb_per_s"] = nf4["quantize_gb_per_s"]
    r["memcpy_gb_per_s"] = memcpy["all_threads_gb_per_s"]
    r["project_share_of_memcpy"] = nf4["end_to_end_gb_per_s"] / memcpy["all_threads_gb_per_s"]
    rows.append(r)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
simd = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
# Work in floating-point operations, for the share of the machine each side reaches: a matrix
# product of n weights costs 2 n flops per token forward and 4 n backward (attention at these
# lengths adds under 3%). Training: teacher forward + student forward and backward = 8 n (a
# recomputed forward is not counted: this is the useful work).
n_matmul = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 49152 * 576
for r in rows:
    per_token = {"tok/s": 8 * n_matmul if r["work"].startswith(("QAT", "same with --checkpoint-activations (")) else 2 * n_matmul}
    if r["unit"] == "tok/s":
        r["gflop_per_s"] = {"pytorch": r["pytorch"] * per_token["tok/s"] / 1e9, "project": r["project"] * per_token["tok/s"] / 1e9}
result = {
    "command": ("scripts/bench_cpu_peer.sh " + args).strip(),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": load, "simd": simd,
                "sgemm_gflop_per_s_2_threads": rd("gemm.json")["sgemm_gflop_per_s"]},
    "threads": {"pipeline": "RAYON_NUM_THREADS=2", "pytorch": "torch.set_num_threads(2), OMP_NUM_THREADS=2"},
    "model": "pipeline synth-model --shape smollm-135m (30 layers, hidden 576, 9/3 heads, vocab 49152; f32 compute)",
    "rows": rows,
    "timing": {
        "generate": "project: seconds of `pipeline generate --json` less its load_seconds (model load excluded, "
                    "decoding and the shard write included), tokens/s counting new tokens only (tokens_made - samples; tool_tokens_per_second counts the first token too); "
                    "pytorch: " + pt["generate"]["timing"],
        "eval": "project: tokens_per_second of `pipeline eval --json` (the scoring loop); pytorch: " + pt["eval"]["timing"],
        "train": f"project: train_log.jsonl tokens_per_second of steps 2..{len(log)} (step 1 is the warmup), "
                 "combined as total tokens / total seconds; peak RSS of the whole process by /usr/bin/time -v; "
                 "corpus: the batch-16 generate output; pytorch: " + pt["train"]["timing"],
        "nf4": "project: end_to_end_gb_per_s of `pipeline quantize --format nf4 --double-quant --json` (file read and "
               "write included; quantize_gb_per_s is the kernel); pytorch: " + (pt["nf4"].get("timing") or pt["nf4"].get("skipped", "")),
    },
    "pipeline": {"generate_batch1": gen(g1, 1), "generate_batch16": gen(g16, 16),
                 "eval": {k: ev[k] for k in ("tokens", "windows", "seconds", "tokens_per_second", "nll") if k in ev},
                 "train_log": log, "train_peak_rss_bytes": rss_kib * 1024,
                 "train_log_checkpointed": log_ckpt, "train_checkpointed_peak_rss_bytes": rss_kib_ckpt * 1024,
                 "nf4": {k: nf4[k] for k in ("quantize_gb_per_s", "end_to_end_gb_per_s", "seconds")},
                 "memcpy": memcpy},
    "pytorch": pt,
}
if load > 2:
    result["note"] = (f"the machine was shared with other work during this run (1-minute load average {load} at the "
                      "start on 2 cores): absolute figures are low and noisy on both sides; the ratios are of the same run")
json.dump(result, open(out, "w"), indent=1)
for r in rows:
    print(f'{r["work"][:60]:60} {r["pytorch"]:9.2f} {r["project"]:9.2f} {r["unit"]:5} x{r["ratio"]:.2f}  goal {r["goal"]}')
EOF
