#!/usr/bin/env bash
# LoftQ's reconstruction error against plain block quantization (blocks of 64, double
# quantization) on both shared models: nf2, nf3, nf4 and int2, r = 8, 16, 32, T = 1 and 5.
# Writes benchmarks/loftq-reconstruction.json (parameter-weighted mean relative Frobenius
# errors over the 7 projections of every layer, from each base's quantize_report.json).
#   scripts/loftq_errors.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/loftq-errors}
B=${PIPELINE:-target/release/pipeline}
mkdir -p "$W"
rows=()
for m in stories260k tinystories-656k; do
    for f in nf2 nf3 nf4 int2; do
        for r in 8 16 32; do
            for t in 1 5; do
                d="$W/$m-$f-r$r-t$t"
                rm -rf "$d"
                "$B" quantize --model "../shared/models/$m" --out "$d" --format "$f" --double-quant \
                    --loftq-rank "$r" --loftq-iters "$t" --json >/dev/null
                rows+=("$m $f $r $t $d/quantize_report.json")
            done
        done
    done
done
printf '%s\n' "${rows[@]}" | python3 -c '
import json, sys
out = {"command": "scripts/loftq_errors.sh", "block_size": 64, "double_quant": True, "rows": []}
for line in sys.stdin:
    m, f, r, t, path = line.split()
    l = json.load(open(path))["loftq"]
    out["rows"].append({"model": m, "format": f, "rank": int(r), "iters": int(t),
        "plain_rel_error": round(l["mean_plain_rel_error"], 5),
        "loftq_rel_error": round(l["mean_loftq_rel_error"], 5),
        "ratio": round(l["error_ratio"], 4), "seconds": round(l["seconds"], 3)})
json.dump(out, open("benchmarks/loftq-reconstruction.json", "w"), indent=1)
print("| model | format | r | T | plain | LoftQ | ratio |")
print("|---|---|---:|---:|---:|---:|---:|")
for x in out["rows"]:
    print("| %(model)s | %(format)s | %(rank)d | %(iters)d | %(plain_rel_error).4f | %(loftq_rel_error).4f | %(ratio).3f |" % x)
'
