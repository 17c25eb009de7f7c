#!/usr/bin/env bash
# Fuzzes every loader that reads user files with cargo fuzz (libFuzzer, nightly toolchain):
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 600 s, every target)
# Seeds come from ../shared and from our own outputs. Each target runs with a 4 GiB RSS cap
# and a 10 s per-input timeout, so unbounded allocations and hangs count as findings.
# Findings land in fuzz/artifacts/TARGET/; each becomes a regression test.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SECS=${1:-600}
shift || true
TARGETS=${*:-config_json gguf safetensors_folder packed_folder corpus train_toml checkpoint pipeline_toml tokenizer bnb_folder}
S=${SHARED:-../shared}
BIN=${BIN:-target/release/pipeline}
C=fuzz/corpus
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p $C/{config_json,gguf,safetensors_folder,packed_folder,corpus,train_toml,checkpoint,pipeline_toml,tokenizer,bnb_folder}

# Seeds.
cp "$S"/models/*/config.json $C/config_json/ 2>/dev/null || true
for m in stories260k tinystories-656k; do cp "$S/models/$m/config.json" "$C/config_json/$m.json"; done
cp "$S/models/stories260k/model.safetensors" $C/safetensors_folder/stories260k
if python3 scripts/make_gguf.py "$S/models/stories260k" "$W" >/dev/null 2>&1; then
  cp "$W"/stories260k-q8_0.gguf $C/gguf/
fi
if [ -x "$BIN" ]; then
  mkdir -p "$W/s" && cp "$S"/models/stories260k/* "$W/s/" 2>/dev/null || true
  echo '{"w_bits": 4, "w_group": 4, "a_bits": 8, "kv_bits": null}' >"$W/s/quantization.json"
  "$BIN" export --student "$W/s" --out "$W/p" --format packed >/dev/null
  "$BIN" export --student "$W/s" --out "$W/ct" --format compressed-tensors >/dev/null
  "$BIN" export --student "$W/s" --out "$W/g" --format gguf >/dev/null 2>&1 || true
  { cat "$W/p/model/packed.json"; printf '\0'; cat "$W/p/model/model.safetensors"; } >$C/packed_folder/packed
  python3 -c "import json; print(json.dumps(json.load(open('$W/ct/model/config.json'))['quantization_config']))" >"$W/q.json"
  { cat "$W/q.json"; printf '\0'; cat "$W/ct/model/model.safetensors"; } >$C/packed_folder/compressed
  "$BIN" generate --teacher "$S/models/stories260k" --out "$W/c" --samples 8 --max-tokens 16 --shard-size 8 >/dev/null
  { cat "$W/c/manifest.json"; printf '\0'; cat "$W"/c/shard-00000.parquet; } >$C/corpus/corpus
  # A real checkpoint (raw: mode byte 0; under a matching manifest: mode byte 1).
  "$BIN" train --teacher "$S/models/stories260k" --corpus "$W/c" --out "$W/t" --steps 2 --batch 2 \
    --seq-len 16 --checkpoint-every 2 >/dev/null 2>&1
  k=$(ls -d "$W"/t/checkpoints/step-* | tail -1)
  { printf '\0'; cat "$k/manifest.json"; printf '\0'; cat "$k/state.json"; printf '\0'; cat "$k/student.safetensors"; } >$C/checkpoint/raw
  { printf '\1'; cat "$k/state.json"; printf '\0'; cat "$k/student.safetensors"; printf '\0'; cat "$k/optimizer.safetensors"; } >$C/checkpoint/matched
  # A quantized base, ours (mode 0) and as bitsandbytes' quantization_config (mode 1).
  "$BIN" quantize --model "$S/models/stories260k" --out "$W/q4" --format int4 >/dev/null 2>&1
  { printf '\0'; cat "$W/q4/quantize.json"; printf '\0'; cat "$W/q4/model.safetensors"; } >$C/bnb_folder/ours
  "$BIN" quantize --model "$S/models/stories260k" --out "$W/q" --format nf4 >/dev/null 2>&1
  python3 -c "import json; print(json.dumps(json.load(open('$W/q/config.json'))['quantization_config']))" >"$W/bq.json"
  { printf '\1'; cat "$W/bq.json"; printf '\0'; cat "$W/q/model.safetensors"; } >$C/bnb_folder/bnb
fi
install -m 644 "$S/models/stories260k/tokenizer.json" $C/tokenizer/stories260k
install -m 644 "$S/models/tinystories-656k/tokenizer.json" $C/tokenizer/tinystories-656k
for p in pipelines/*.toml; do cp "$p" "$C/pipeline_toml/$(basename "$p")"; done
printf '[train]\nsteps = 10\nbatch = 2\nseq_len = 16\n' >$C/train_toml/train
printf 'steps = 10\nbatch = 2\nseq_len = 16\nlr = 1e-3\nschedule = "cosine"\n' >$C/train_toml/t1
printf 'method = "lrqat"\nw_bits = 4\nlora_rank = 4\nphi_dtype = "int8"\n' >$C/train_toml/s1
printf 'w_bits = 4\na_bits = 8\nkv_bits = 4\nscale_dtype = "f16"\nkv_rotation = "hadamard"\n' >$C/train_toml/s2

cd fuzz
for t in $TARGETS; do
  echo "== $t: $SECS s"
  cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$SECS" -rss_limit_mb=4096 -timeout=10 \
    -print_final_stats=1 2>&1 | grep -a -E "^(stat::|==|INFO: seed|Done|SUMMARY|.*deadly|.*crash-|.*leak)" || true
done
