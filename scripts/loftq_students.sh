#!/usr/bin/env bash
# LoftQ against QLoRA students of stories260k on NF2, NF3 and NF4 bases (blocks of 64, double
# quantization; r = 16, alpha = 16 on all 7 projections; LoftQ with T = 5), trained data-free
# with pipelines/qlora.toml's [train] settings on the first 1024 samples of the llmqat corpus,
# STEPS steps, each at learning rates LRS. Every student is scored on
# ../shared/data/tinystories-valid-64k.txt; the best learning rate of each (method, format) by
# that perplexity is also scored on the full ../shared/data/tinystories-valid.txt.
# Writes benchmarks/loftq-students-stories260k.json.
#   scripts/loftq_students.sh [WORK_DIR] [STEPS] ["LR LR ..."]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/loftq-students}
STEPS=${2:-300}
LRS=${3:-"1e-3 2e-3 4e-3"}
B=${PIPELINE:-target/release/pipeline}
T=../shared/models/stories260k
X=../shared/data/tinystories-valid-64k.txt
FULL=../shared/data/tinystories-valid.txt
mkdir -p "$W"
ppl() { "$B" eval --model "$1" --text "$2" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['ppl'])"; }
[ -f "$W/corpus/manifest.json" ] || "$B" generate --teacher $T --out "$W/corpus" --samples 1024 \
    --max-tokens 256 --shard-size 512 --batch 64 --seed 1 --workers 2
out="$W/rows.jsonl"
: > "$out"
for f in nf2 nf3 nf4; do
    for m in qlora loftq; do
        base="$W/base-$f-$m"
        if [ ! -f "$base/quantize.json" ]; then
            extra=()
            [ "$m" = loftq ] && extra=(--loftq-rank 16 --loftq-iters 5 --lora-alpha 16)
            "$B" quantize --model $T --out "$base" --format $f --double-quant "${extra[@]}" >/dev/null
        fi
        sed -e "s/^format = \"nf4\"/format = \"$f\"/" -e '/^layout = /d' \
            -e "s/^method = \"qlora\"/method = \"$m\"/" pipelines/qlora.toml >"$W/$m-$f.toml"
        [ "$m" = loftq ] && sed -i 's/^lora_targets = /loftq_iters = 5\nlora_targets = /' "$W/$m-$f.toml"
        for lr in $LRS; do
            d="$W/train-$f-$m-$lr"
            [ -d "$d/student" ] || "$B" train --teacher $T --corpus "$W/corpus" --out "$d" \
                --config "$W/$m-$f.toml" --base "$base" --steps "$STEPS" --lr "$lr" --log-every 100 >/dev/null 2>"$d.log" || { cat "$d.log"; exit 1; }
            echo "{\"format\": \"$f\", \"method\": \"$m\", \"lr\": $lr, \"base\": $(ppl "$base" $X), \"ppl_64k\": $(ppl "$d/student" $X), \"dir\": \"$d/student\"}" >> "$out"
            tail -1 "$out"
        done
    done
done
python3 - "$out" "$B" "$FULL" "$W" "$STEPS" "$LRS" "$(ppl $T $X)" "$(ppl $T $FULL)" <<'PY'
import json, subprocess, sys
rows_path, B, full, W, steps, lrs, t64, tfull = sys.argv[1:]
rows = [json.loads(l) for l in open(rows_path)]
def ppl(d):
    o = subprocess.run([B, "eval", "--model", d, "--text", full, "--json"], capture_output=True, text=True, check=True)
    return json.loads(o.stdout)["ppl"]
best = {}
for r in rows:
    k = (r["format"], r["method"])
    if k not in best or r["ppl_64k"] < best[k]["ppl_64k"]:
        best[k] = r
table = []
for (f, m), r in sorted(best.items()):
    table.append({"format": f, "method": m, "best_lr": r["lr"], "base_ppl_64k": r["base"],
                  "ppl_64k": r["ppl_64k"], "ppl_full_valid": ppl(r["dir"])})
res = {"command": f"scripts/loftq_students.sh {W} {steps} \"{lrs}\"", "model": "stories260k", "steps": int(steps),
       "lora_rank": 16, "lora_alpha": 16, "loftq_iters": 5, "teacher_ppl_64k": float(t64), "teacher_ppl_full_valid": float(tfull),
       "best": table, "all_runs": [{k: v for k, v in r.items() if k != "dir"} for r in rows]}
json.dump(res, open("benchmarks/loftq-students-stories260k.json", "w"), indent=1)
print(json.dumps(table, indent=1))
PY
