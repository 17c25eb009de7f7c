#!/usr/bin/env bash
# GGUF exports scored by llama.cpp (llama-cpp-python 0.3.36, built from its PyPI source with
# AVX2 only: see .ci/run) against our own evaluation, on ../shared/data/tinystories-valid-64k.txt
# with the same windows (ctx 512). Rows go to benchmarks/export-llama-cpp.json.
#   scripts/export_llama_cpp.sh students RUN_DIR...   llmqat students (RUN_DIR/train/student)
#   scripts/export_llama_cpp.sh rtn TEACHER_DIR...       W4A8 round-to-nearest of each teacher
#   scripts/export_llama_cpp.sh synth                  a briefly trained W4A8KV4 student of the
#       synthetic tiny-hd64 shape (head_dim 64): llama.cpp with its q4_0 / q8_0 K/V cache, and
#       W3 / W2 per-channel grids as Q3_K / Q2_K (rows of 256 and 768 tile their super-blocks)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN=${BIN:-target/release/pipeline}
TEXT=${TEXT:-../shared/data/tinystories-valid-64k.txt}
OUT=benchmarks/export-llama-cpp.json
W=${WORK:-/tmp/export-llama-cpp}
mkdir -p "$W"
ROWS=$W/rows.jsonl
touch "$ROWS"

ours() { # model quant-args... -> ppl
  local m=$1; shift
  "$BIN" eval --model "$m" --text "$TEXT" "$@" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['ppl'])"
}

row() { # name student gguf kv our-args...
  local name=$1 student=$2 gguf=$3 kv=$4; shift 4
  local lc
  lc=$(python3 scripts/export_check.py gguf --model "$gguf" --student "$student" --text "$TEXT" \
    --kv-cache "$kv" --prompt "Once upon a time" --greedy 24)
  local o g
  o=$(ours "$student" "$@")
  g=$("$BIN" sample --model "$student" --prompt "Once upon a time" --max-tokens 24 --json "$@")
  python3 - "$name" "$kv" "$o" "$lc" "$*" "$gguf" "$g" >>"$ROWS" <<'PY'
import json, sys
name, kv, ours, lc, args, gguf, g = sys.argv[1:8]
lc = json.loads(lc)
mine = json.loads(g)["model"]["ids"]
theirs = lc.get("greedy") or []
lead = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
ex = json.load(open(gguf.rsplit("/", 1)[0] + "/export.json"))
print(json.dumps({
    "student": name, "llama_cpp_kv_cache": kv, "llama_cpp_ppl": lc["ppl"],
    "ours_ppl": float(ours), "ours_eval_args": args,
    "relative_difference": lc["ppl"] / float(ours) - 1.0,
    "tokens": lc["tokens"], "tokenization_first_difference": lc["tokenization"]["first_difference"],
    "llama_cpp_greedy": theirs, "ours_greedy": mine, "greedy_leading_agreement": lead,
    "export_types": ex["types"],
    "max_weight_change": ex["max_weight_change"], "file_size_bytes": ex["file_size_bytes"],
    "bits_per_weight": ex["bits_per_weight"],
}))
PY
  tail -n 1 "$ROWS"
}

export_gguf() { # student out
  [ -f "$2/export.json" ] || "$BIN" export --student "$1" --out "$2" --format gguf >/dev/null
}

case "${1:-}" in
  students)
    shift
    for r in "$@"; do
      s=$r/train/student
      n=$(basename "$(dirname "$r")")-$(basename "$r")
      sd=$(python3 -c "import json; print(json.load(open('$s/quantization.json')).get('w_scale','f32'))")
      export_gguf "$s" "$W/$n-gguf"
      # llama.cpp keeps K/V in f16 (the shared models' head_dim cannot hold its q4_0 cache):
      # our side is W4A8 without the K/V quantizer, and the student as trained (W4A8KV4).
      row "$n" "$s" "$W/$n-gguf/model.gguf" f16 --w-bits 4 --a-bits 8 --scale-dtype "$sd"
      row "$n" "$s" "$W/$n-gguf/model.gguf" f16 --w-bits 4 --a-bits 8 --kv-bits 4 --scale-dtype "$sd"
      row "$n" "$s" "$W/$n-gguf/model.gguf" f16 --w-bits 4 --scale-dtype "$sd"
    done
    ;;
  rtn)
    # Round-to-nearest W4 "students" of the teachers (the baseline the trained ones beat).
    shift
    for t in "$@"; do
      n=$(basename "$t")-rtn
      d=$W/$n/student
      mkdir -p "$d" && cp "$t"/*.json "$t"/*.safetensors "$d"/
      echo '{"w_bits": 4, "w_group": null, "a_bits": 8, "kv_bits": null, "w_scale": "f16"}' >"$d/quantization.json"
      export_gguf "$d" "$W/$n-gguf"
      row "$n" "$d" "$W/$n-gguf/model.gguf" f16 --w-bits 4 --a-bits 8 --scale-dtype f16
    done
    ;;
  synth)
    T=$W/tiny-hd64
    [ -f "$T/model.safetensors" ] || "$BIN" synth-model --shape tiny-hd64 --tokenizer ../shared/models/tinystories-656k --out "$T" >/dev/null
    [ -f "$W/corpus/manifest.json" ] || "$BIN" generate --teacher "$T" --out "$W/corpus" --samples 64 --max-tokens 128 --shard-size 64 >/dev/null
    [ -f "$W/train/student/model.safetensors" ] || "$BIN" train --teacher "$T" --corpus "$W/corpus" --out "$W/train" \
      --steps 30 --batch 4 --seq-len 128 --lr 1e-3 --w-bits 4 --a-bits 8 --kv-bits 4 --scale-dtype f16 --log-every 10 >/dev/null
    s=$W/train/student
    export_gguf "$s" "$W/synth-gguf"
    for kv in f16 q8_0 q4_0; do
      row tiny-hd64-w4a8kv4 "$s" "$W/synth-gguf/model.gguf" $kv --w-bits 4 --a-bits 8 --kv-bits 4 --scale-dtype f16
    done
    row tiny-hd64-w4a8kv4 "$s" "$W/synth-gguf/model.gguf" f16 --w-bits 4 --a-bits 8 --scale-dtype f16
    for b in 3 2; do
      d=$W/w$b/student
      mkdir -p "$d" && cp "$T"/* "$d"/
      echo "{\"w_bits\": $b, \"w_group\": null, \"a_bits\": null, \"kv_bits\": null, \"w_scale\": \"f16\"}" >"$d/quantization.json"
      export_gguf "$d" "$W/w$b-gguf"
      row "tiny-hd64-w$b-rtn" "$d" "$W/w$b-gguf/model.gguf" f16 --w-bits $b --scale-dtype f16
    done
    ;;
  *) echo "usage: $0 students RUN_DIR... | rtn TEACHER_DIR... | synth" >&2; exit 2 ;;
esac

python3 - "$ROWS" "$OUT" "$*" <<'PY'
import json, sys, platform
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump({
    "what": "GGUF exports scored by llama.cpp against pipeline eval of the student, same text, same windows (ctx 512)",
    "command": "scripts/export_llama_cpp.sh students runs/llmqat-short/stories260k runs/llmqat-short/tinystories-656k; scripts/export_llama_cpp.sh rtn ../shared/models/stories260k ../shared/models/tinystories-656k; scripts/export_llama_cpp.sh synth",
    "students": "runs/llmqat-short/<model>: pipelines/llmqat.toml with --set generate.samples=1024 --set train.steps=400 --set student.scale_dtype=f16 --set export.format=gguf (CPU, 2 cores)",
    "consumer": "llama-cpp-python 0.3.36 from its PyPI source, CMAKE_ARGS=-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF",
    "machine": platform.processor() or platform.machine(),
    "threads": 2,
    "rows": rows,
}, open(sys.argv[2], "w"), indent=1)
PY
