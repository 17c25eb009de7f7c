#!/usr/bin/env bash
# Sizes of every export format next to the f32 student, with time and peak memory of the
# export, for a student folder of stories260k and of the synthetic TinyLlama-1.1B shape
# (random weights, rounded to nearest as a W4 per-channel "student" with f16 scales; its
# vocabulary is tinystories-656k's 2048 pieces, since a GGUF needs a BPE tokenizer and the
# synthetic word-level one has none: 8.4 M embedding parameters instead of 65.5 M).
#   scripts/export_sizes.sh STORIES_STUDENT_DIR      -> benchmarks/export-sizes.json
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN=${BIN:-target/release/pipeline}
W=${WORK:-/tmp/export-sizes}
mkdir -p "$W"
ROWS=$W/rows.jsonl
: >"$ROWS"
S260=${1:?usage: $0 STORIES260K_STUDENT_DIR}

T=$W/tinyllama
[ -f "$T/model.safetensors" ] || "$BIN" synth-model --shape tinyllama-1.1b --tokenizer ../shared/models/tinystories-656k --out "$T" >/dev/null
mkdir -p "$W/tinyllama-student"
cp "$T"/* "$W/tinyllama-student/"
echo '{"w_bits": 4, "w_group": null, "a_bits": 8, "kv_bits": 4, "w_scale": "f16"}' >"$W/tinyllama-student/quantization.json"

for pair in "stories260k:$S260" "tinyllama-1.1b-shape:$W/tinyllama-student"; do
  name=${pair%%:*}
  s=${pair#*:}
  for f in gguf compressed-tensors packed hf; do
    out=$W/$name-$f
    rm -rf "$out"
    /usr/bin/time -v "$BIN" export --student "$s" --out "$out" --format $f --json >"$W/r.json" 2>"$W/time.txt"
    rss=$(grep "Maximum resident" "$W/time.txt" | awk '{print $NF}')
    python3 - "$name" "$f" "$rss" "$W/r.json" "$s" >>"$ROWS" <<'PY'
import json, sys, os
name, f, rss, r, s = sys.argv[1:6]
r = json.load(open(r))
print(json.dumps({
    "model": name, "format": f, "file_size_bytes": r["file_size_bytes"],
    "student_weights_file_bytes": os.path.getsize(os.path.join(s, "model.safetensors")),
    "bits_per_weight_projections": r["bits_per_weight"], "bits_per_parameter": r["bits_per_parameter"],
    "parameters": r["parameters"], "types": r["types"], "max_weight_change": r["max_weight_change"],
    "export_seconds": r["seconds"], "peak_rss_mb": int(rss) / 1024,
}))
PY
    tail -n 1 "$ROWS"
    [ "$name" = stories260k ] || rm -rf "$out"
  done
done
python3 - "$ROWS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
json.dump({
    "what": "pipeline export: file sizes and bits per weight of each format next to the f32 student; export time and peak RSS on 2 cores",
    "command": "scripts/export_sizes.sh runs/llmqat-short/stories260k/train/student",
    "notes": "student_weights_file_bytes: the student folder's model.safetensors (f32 for stories260k, bf16 for the synthetic shape). bits_per_weight_projections: the 7 projections as stored (codes, scales, block headers; stories260k's down_proj rows of 172 do not tile Q4_0 blocks and are F32 in the GGUF). hf is f32. The TinyLlama-1.1B shape has random weights and the 2048-piece vocabulary of tinystories-656k (GGUF needs a BPE tokenizer).",
    "rows": rows,
}, open("benchmarks/export-sizes.json", "w"), indent=1)
PY
