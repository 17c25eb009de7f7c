#!/usr/bin/env bash
# LR-QAT against full QAT students of stories260k, W4 and W3 per channel, weight-only and with
# A8KV4, from the same corpus (the first 1024 samples of the llmqat corpus), the same steps and
# pipelines/llmqat.toml's [train] settings (K/V equalization off for both: lrqat refuses it),
# each at the learning rates LRS. ppl on ../shared/data/tinystories-valid-64k.txt for every
# run; the best learning rate of each (bits, activations, method) also on the full
# ../shared/data/tinystories-valid.txt. Writes benchmarks/lrqat-vs-qat-$MODEL.json.
#   [MODEL=stories260k|tinystories-656k] [BITS="4 3"] [ACTS="none a8kv4"] [LORA_RANK=16] \
#     [LORA_ALPHA=LORA_RANK] [KVEQ=0.5: kv_equalize for both methods' a8kv4 rows] \
#     scripts/lrqat_vs_qat.sh [WORK_DIR] [STEPS] ["LR LR ..."]
# Rows accumulate in WORK_DIR/rows.jsonl over invocations (a finished run is not retrained),
# so a grid can be run in parts; the table takes the last row of each setting.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/lrqat-vs-qat}
STEPS=${2:-100}
LRS=${3:-"1e-3 3e-3"}
B=${PIPELINE:-target/release/pipeline}
MODEL=${MODEL:-stories260k}
LORA_RANK=${LORA_RANK:-16}
export LORA_ALPHA=${LORA_ALPHA:-$LORA_RANK} KVEQ=${KVEQ:-0}
# RANK is torchrun's rank variable, which `pipeline train` reads: never pass it down.
unset RANK
T=../shared/models/$MODEL
X=../shared/data/tinystories-valid-64k.txt
FULL=../shared/data/tinystories-valid.txt
mkdir -p "$W"
[ -f "$W/corpus/manifest.json" ] || "$B" generate --teacher $T --out "$W/corpus" --samples 1024 \
    --max-tokens 256 --shard-size 512 --batch 64 --seed 1 --workers 2
# llmqat.toml's [train] table without kv_equalize, and no [student] (flags below). With
# KVEQ=S, the a8kv4 rows of both methods train with kv_equalize = S (train-kveq.toml).
python3 - "$W/train.toml" "${KVEQ:-0}" <<'PY'
import sys, tomllib
t = tomllib.load(open("pipelines/llmqat.toml", "rb"))["train"]
t.pop("kv_equalize", None)
for path, kveq in [(sys.argv[1], 0.0), (sys.argv[1].replace("train.toml", "train-kveq.toml"), float(sys.argv[2]))]:
    with open(path, "w") as f:
        f.write("[train]\n")
        for k, v in t.items():
            f.write(f"{k} = {v!r}\n".replace("'", '"').replace("False", "false").replace("True", "true"))
        if kveq > 0:
            f.write(f"kv_equalize = {kveq}\n")
PY
ppl() { "$B" eval --model "$1" --text "$2" "${@:3}" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['ppl'])"; }
out="$W/rows.jsonl"
touch "$out"
for bits in ${BITS:-4 3}; do
    for act in ${ACTS:-none a8kv4}; do
        aflags=(--a-bits none --kv-bits none)
        [ $act = a8kv4 ] && aflags=(--a-bits 8 --kv-bits 4)
        conf=$W/train.toml
        [ $act = a8kv4 ] && [ "${KVEQ:-0}" != 0 ] && conf=$W/train-kveq.toml
        for m in qat lrqat; do
            for lr in $LRS; do
                d="$W/train-w$bits-$act-$m-$lr"
                grep -q "\"dir\": \"$d/student\"" "$out" && continue
                [ -d "$d/student" ] || "$B" train --teacher $T --corpus "$W/corpus" --out "$d" --config "$conf" \
                    --method $m $([ $m = lrqat ] && echo --lora-rank $LORA_RANK --lora-alpha $LORA_ALPHA) --w-bits $bits "${aflags[@]}" --steps "$STEPS" --lr "$lr" --log-every 50 >/dev/null 2>"$d.log" || { cat "$d.log"; exit 1; }
                # The qat folder holds f32 masters (quantized on load); the lrqat folder holds its merged grid.
                eflags=("${aflags[@]}")
                [ $m = qat ] && eflags+=(--w-bits $bits)
                echo "{\"w_bits\": $bits, \"act\": \"$act\", \"method\": \"$m\", \"lr\": $lr, \"ppl_64k\": $(ppl "$d/student" $X "${eflags[@]}"), \"dir\": \"$d/student\", \"eval_flags\": \"${eflags[*]}\"}" >> "$out"
                tail -1 "$out"
            done
        done
    done
done
python3 - "$out" "$B" "$FULL" "$W" "$STEPS" "$LRS" "$X" "$T" "$MODEL" "$LORA_RANK" <<'PY'
import json, os, subprocess, sys
rows_path, B, full, W, steps, lrs, x64, teacher, model, rank = sys.argv[1:]
rows = list({(r["w_bits"], r["act"], r["method"], r["lr"]): r for r in map(json.loads, open(rows_path))}.values())
def ppl(d, text, flags):
    o = subprocess.run([B, "eval", "--model", d, "--text", text, "--json", *flags.split()], capture_output=True, text=True, check=True)
    return json.loads(o.stdout)["ppl"]
best = {}
for r in rows:
    k = (r["w_bits"], r["act"], r["method"])
    if k not in best or r["ppl_64k"] < best[k]["ppl_64k"]:
        best[k] = r
table = []
for (bits, act, m), r in sorted(best.items()):
    rtn_flags = r["eval_flags"] if m == "qat" else r["eval_flags"] + f" --w-bits {bits}"
    table.append({"w_bits": bits, "act": act, "method": m, "best_lr": r["lr"], "ppl_64k": r["ppl_64k"],
                  "ppl_full_valid": ppl(r["dir"], full, r["eval_flags"]),
                  "rtn_ppl_64k": ppl(teacher, x64, rtn_flags)})
res = {"command": f"scripts/lrqat_vs_qat.sh {W} {steps} \"{lrs}\" (BITS and ACTS: see grid)", "grid": sorted({(r["w_bits"], r["act"], r["lr"]) for r in rows}), "model": model, "steps": int(steps),
       "lrqat": {"lora_rank": int(rank), "lora_alpha": float(os.environ.get("LORA_ALPHA", rank)), "phi_dtype": "int8"}, "kv_equalize_a8kv4": float(os.environ.get("KVEQ", "0")),
       "teacher_ppl_64k": ppl(teacher, x64, ""), "best": table,
       "all_runs": [{k: v for k, v in r.items() if k not in ("dir", "eval_flags")} for r in rows]}
json.dump(res, open(f"benchmarks/lrqat-vs-qat-{model}.json", "w"), indent=1)
print(json.dumps(table, indent=1))
PY
