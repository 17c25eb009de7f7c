#!/usr/bin/env bash
# QLoRA students of stories260k on NF4, NF3 and NF2 bases (double quantization, blocks of 64),
# trained data-free with pipelines/qlora.toml's [student]/[train] settings on the first 1024
# samples of the llmqat corpus; writes benchmarks/qlora-stories260k.json with the perplexities
# on ../shared/data/tinystories-valid-64k.txt and the commands.
#   scripts/qlora_bases.sh [WORK_DIR] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/qlora-bases}
STEPS=${2:-300}
B=${PIPELINE:-target/release/pipeline}
T=../shared/models/stories260k
X=../shared/data/tinystories-valid-64k.txt
mkdir -p "$W"
ppl() { "$B" eval --model "$1" --text "$X" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['ppl'])"; }
[ -f "$W/corpus/manifest.json" ] || "$B" generate --teacher $T --out "$W/corpus" --samples 1024 \
    --max-tokens 256 --shard-size 512 --batch 64 --seed 1 --workers 2
echo "{\"teacher\": $(ppl $T), \"steps\": $STEPS, \"bases\": {" > "$W/result.json.tmp"
sep=""
for f in nf4 nf3 nf2; do
    [ -f "$W/base-$f/quantize.json" ] || "$B" quantize --model $T --out "$W/base-$f" --format $f --double-quant
    # qlora.toml with this base's [quantize] format (nf4 in the bnb layout, the others packed).
    sed -e "s/^format = \"nf4\"/format = \"$f\"/" -e '/^layout = /d' pipelines/qlora.toml >"$W/qlora-$f.toml"
    "$B" train --teacher $T --corpus "$W/corpus" --out "$W/train-$f" --config "$W/qlora-$f.toml" \
        --base "$W/base-$f" --steps "$STEPS"
    echo "$sep\"$f\": {\"base\": $(ppl "$W/base-$f"), \"student\": $(ppl "$W/train-$f/student")}" >> "$W/result.json.tmp"
    sep=","
done
echo "}, \"command\": \"scripts/qlora_bases.sh $W $STEPS\"}" >> "$W/result.json.tmp"
python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1])), indent=2))" "$W/result.json.tmp" > benchmarks/qlora-stories260k.json
cat benchmarks/qlora-stories260k.json
