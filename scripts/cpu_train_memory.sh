#!/usr/bin/env bash
# Peak RSS and tokens/s of the student methods on the CPU (f32, teacher online, W4A8KV4 where
# the method has weight bits): qat, qlora (NF4 + double quantization base, A8KV4) and lrqat
# (rank 16), each with and without `--checkpoint-activations`, on stories260k (batch 16 x 256)
# and the synthetic 135M-class shape (smollm-135m, batch 2 x 128). 2 steps each, peak RSS from
# /usr/bin/time, one checkpoint written at the end (as a run writes them):
#   scripts/cpu_train_memory.sh [OUT_JSON]      (default benchmarks/cpu-train-memory.json)
# Builds nothing: copies $BIN (default target/release/pipeline) into the work dir first.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${1:-benchmarks/cpu-train-memory.json}
S=${SHARED:-../shared}
W=${WORK:-/tmp/cpu-train-memory}
STEPS=${STEPS:-2}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
mkdir -p "$W"
cp "${BIN:-target/release/pipeline}" "$W/pipeline"
BIN=$W/pipeline
R=$W/rows.jsonl
: >"$R"
[ -f "$W/smollm-135m/config.json" ] || "$BIN" synth-model --shape smollm-135m --out "$W/smollm-135m" >/dev/null
for model in stories260k smollm-135m; do
  if [ $model = stories260k ]; then M=$S/models/stories260k; B="--batch 16 --seq-len 256"; else M=$W/smollm-135m; B="--batch 2 --seq-len 128"; fi
  C=$W/corpus-$model
  [ -f "$C/manifest.json" ] || "$BIN" generate --teacher "$M" --out "$C" --samples 32 --batch 16 --max-tokens 257 >/dev/null
  [ -f "$W/nf4-$model/model/config.json" ] || [ -d "$W/nf4-$model" ] || "$BIN" quantize --model "$M" --out "$W/nf4-$model" --format nf4 --double-quant >/dev/null
  for c in "qat|--w-bits 4 --a-bits 8 --kv-bits 4" "qlora|--method qlora --base $W/nf4-$model --a-bits 8 --kv-bits 4" \
    "lrqat|--method lrqat --lora-rank 16 --w-bits 4 --a-bits 8 --kv-bits 4"; do
    method=${c%%|*}
    flags=${c#*|}
    for ck in "" "--checkpoint-activations"; do
      rm -rf "$W/train"
      # shellcheck disable=SC2086
      /usr/bin/time -f "%M" -o "$W/time" "$BIN" train --teacher "$M" --corpus "$C" --out "$W/train" $B \
        --steps "$STEPS" --log-every 1 --checkpoint-every "$STEPS" $flags $ck >/dev/null 2>"$W/err"
      python3 - "$model" "$method" "$ck" "$(cat "$W/time")" "$W/train/train_log.jsonl" "$B" >>"$R" <<'PY'
import json, sys
model, method, ck, kb, log, batch = sys.argv[1:7]
lines = [json.loads(l) for l in open(log)]
print(json.dumps({"model": model, "method": method, "checkpoint_activations": bool(ck),
                  "batch": batch, "peak_rss_mb": round(int(kb) / 1024, 1),
                  "tokens_per_second_last": lines[-1].get("tokens_per_second"),
                  "loss": [l["loss"] for l in lines]}))
PY
      tail -n 1 "$R" >&2
    done
  done
done
rm -rf "$W/train"
python3 - "$R" "$OUT" "$STEPS" <<'PY'
import json, subprocess, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
for r in rows:
    qat = next(q for q in rows if q["model"] == r["model"] and q["method"] == "qat" and not q["checkpoint_activations"])
    r["of_qat_peak"] = round(r["peak_rss_mb"] / qat["peak_rss_mb"], 3)
json.dump({"command": "scripts/cpu_train_memory.sh", "commit": commit, "steps": int(sys.argv[3]),
           "threads": 2, "rows": rows}, open(sys.argv[2], "w"), indent=1)
PY
echo "wrote $OUT" >&2
