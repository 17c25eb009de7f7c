#!/usr/bin/env bash
# Decoding speed and memory of the student as it runs deployed (projections as 4-bit codes,
# K/V cache as int4/int8 codes) against the teacher in f32 and bf16, on this CPU:
#   scripts/bench_lowbit.sh [OUT_JSON]        (default benchmarks/lowbit-decode-cpu.json)
# Models: ../shared/models/stories260k and the 135M-class synthetic shape (smollm-135m).
# Every configuration runs REPEATS times, interleaved, one process per (config, batch) so
# each peak RSS is its own; the JSON keeps the median tokens/s and every sample. The packed
# configurations load a `pipeline export --format packed` folder of the model's W4 per-channel
# grid (what a deployed student ships), so their peak memory is the deployed one.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${1:-benchmarks/lowbit-decode-cpu.json}
S=${SHARED:-../shared}
BIN=${BIN:-target/release/pipeline}
REPEATS=${REPEATS:-3}
STEPS=${STEPS:-32}
W=${WORK:-runs/bench-lowbit}
mkdir -p "$W"
[ -f "$W/smollm-135m/config.json" ] || "$BIN" synth-model --shape smollm-135m --out "$W/smollm-135m" >/dev/null
COPY=$("$BIN" bench device --copy-mib 512 --matmul-n 64 | python3 -c "import json,sys; print(json.load(sys.stdin)['copy_gb_per_s'])")

# name | source (the model folder, or its packed export) | batches | extra flags
# (bf16 and fake quantization are slow paths on this CPU: batch 1 only)
CONFIGS=(
  "teacher-f32|model|1 64|"
  "teacher-bf16|model|1|--dtype bf16"
  "fake-quant-w4a8kv4|model|1|--w-bits 4 --a-bits 8 --kv-bits 4"
  "packed-w4a8-int4|packed|1 64|--a-bits 8 --kv-bits 4 --packed --kv-cache int4"
  "packed-w4a8-int8|packed|1 64|--a-bits 8 --kv-bits 8 --packed --kv-cache int8"
  "packed-w4-int4|packed|1 64|--kv-bits 4 --packed --kv-cache int4"
  "packed-w4a8-q4_0|packed|1|--a-bits 8 --packed --kv-cache q4_0"
)
# The packed export of each model's W4 per-channel grid.
for model in "$S/models/stories260k" "$W/smollm-135m"; do
  n=$(basename "$model")
  if [ ! -f "$W/$n-packed/model/packed.json" ]; then
    rm -rf "$W/$n-student" "$W/$n-packed"
    mkdir -p "$W/$n-student"
    cp "$model"/config.json "$model"/tokenizer.json "$model"/model.safetensors "$W/$n-student/"
    echo '{"w_bits": 4, "w_group": null, "a_bits": 8, "kv_bits": 4}' >"$W/$n-student/quantization.json"
    "$BIN" export --student "$W/$n-student" --out "$W/$n-packed" --format packed >/dev/null
  fi
done
RAW="$W/raw.jsonl"
: >"$RAW"
for model in "$S/models/stories260k" "$W/smollm-135m"; do
  for r in $(seq "$REPEATS"); do
    for c in "${CONFIGS[@]}"; do
      IFS='|' read -r name source batches flags <<<"$c"
      m=$model
      [ "$source" = packed ] && m=$W/$(basename "$model")-packed/model
      for b in $batches; do
        # shellcheck disable=SC2086
        "$BIN" bench decode --model "$m" --batch "$b" --steps "$STEPS" --warmup 4 \
          --copy-gbps "$COPY" $flags 2>/dev/null |
          python3 -c "import json,sys; v=json.load(sys.stdin); v['config']='$name'; v['flags']='$flags'; v['repeat']=$r; v['model_name']='$(basename "$model")'; print(json.dumps(v))" >>"$RAW"
      done
    done
  done
done

python3 - "$RAW" "$OUT" "$COPY" "$*" <<'EOF'
import json, statistics, sys, platform, os
raw, out, copy = sys.argv[1], sys.argv[2], float(sys.argv[3])
rows = [json.loads(l) for l in open(raw)]
groups = {}
for v in rows:
    r = v["runs"][0]
    key = (v["model_name"], v["config"], r["batch"])
    g = groups.setdefault(key, {"samples": [], "rss": [], "v": v, "r": r})
    g["samples"].append(r["tokens_per_second"])
    g["rss"].append(v["peak_rss_bytes"])
results = []
for (model, config, batch), g in sorted(groups.items()):
    v, r = g["v"], g["r"]
    results.append({
        "model": model, "config": config, "flags": v["flags"], "batch": batch,
        "tokens_per_second": statistics.median(g["samples"]), "samples": g["samples"],
        "projection_bytes": v["projection_bytes"],
        "weight_bytes_per_step": r["weight_bytes_per_step"],
        "kv_cache_bytes_per_token": r["kv_cache_bytes_per_token"],
        "peak_rss_bytes": max(g["rss"]),
        "bound_tokens_per_second": r["bound_tokens_per_second"],
        "kernels_isa": v["kernels_isa"],
    })
for x in results:
    ref = next(y for y in results if y["model"] == x["model"] and y["batch"] == x["batch"] and y["config"] == "teacher-f32")
    bf = next(y for y in results if y["model"] == x["model"] and y["batch"] == 1 and y["config"] == "teacher-bf16")
    x["speed_vs_teacher_f32"] = x["tokens_per_second"] / ref["tokens_per_second"]
    x["kv_bytes_vs_bf16"] = x["kv_cache_bytes_per_token"] / bf["kv_cache_bytes_per_token"]
    x["share_of_bandwidth_bound"] = x["tokens_per_second"] / x["bound_tokens_per_second"]
json.dump({
    "command": "scripts/bench_lowbit.sh " + sys.argv[4],
    "machine": {"cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor()),
                "threads": os.cpu_count(), "copy_gb_per_s": copy},
    "note": "median of the repeats; one process per (config, batch); peak_rss includes loading (a quantized-on-load student reads the f32 weights first)",
    "results": results,
}, open(out, "w"), indent=1)
for x in results:
    print(f'{x["model"]:14} {x["config"]:20} b{x["batch"]:<3} {x["tokens_per_second"]:8.1f} tok/s  x{x["speed_vs_teacher_f32"]:.2f}  kv {x["kv_cache_bytes_per_token"]:7.0f} B/tok ({x["kv_bytes_vs_bf16"]:.2f} of bf16)  proj {x["projection_bytes"]/1e6:6.1f} MB  rss {x["peak_rss_bytes"]/2**20:6.0f} MiB')
EOF
