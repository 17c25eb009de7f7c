#!/usr/bin/env bash
# The NCCL collective on ONE GPU (issue 20), in one call on the GPU machine:
#   - a torchrun-style launch of WORLD_SIZE = 1 (RANK=0 WORLD_SIZE=1 MASTER_ADDR/PORT) trains
#     through NcclRanks; its log and student must equal the plain --device cuda run's bit for
#     bit, in f32 and bf16 (a sum over one rank is a copy);
#   - two processes (RANK 0 and 1, WORLD_SIZE 2, LOCAL_RANK 0 both) on the same GPU: NCCL may
#     refuse a GPU shared by two ranks; the outcome and the exact error are recorded;
#   - a launch with libnccl not findable stops with the error that says where to find it.
# libnccl.so.2 comes from the python package nvidia-nccl-cu13 there (LD_LIBRARY_PATH).
#
#   here:  scripts/build-cuda.sh   (.xz/pipeline.xz, built with the nccl feature)
#          mkdir -p .carry/models && cp -r ../shared/models/stories260k .carry/models/
#          target/release/pipeline generate --teacher .carry/models/stories260k \
#            --out .carry/corpus --samples 128 --max-tokens 129 --batch 64
#   there: scripts/gpu-nccl.sh     (carry .xz and .carry; writes $OUT/gpu-nccl.json, gpu-nccl-logs.tar.gz)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu-nccl}
W=/tmp/gpu-nccl-work
rm -rf "$W" && mkdir -p "$OUT" "$W"
export NCCL_NVLS_ENABLE=0 # NVLink multicast stays off
CUDA_LIB=/usr/local/cuda-13.0/targets/x86_64-linux/lib
NCCL_LIB=$(python3 -c "import nvidia.nccl as n; print(list(n.__path__)[0] + '/lib')" 2>/dev/null)
if [ ! -e "$NCCL_LIB/libnccl.so.2" ]; then
  NCCL_LIB=$(dirname "$(find / -name libnccl.so.2 -not -path '/proc/*' 2>/dev/null | head -n1)")
fi
echo "libnccl.so.2 in $NCCL_LIB" >&2
export LD_LIBRARY_PATH=$NCCL_LIB:$CUDA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
B=$W/pipeline
xz -dc .xz/pipeline.xz >"$B" && chmod +x "$B"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2

M=.carry/models/stories260k
C=.carry/corpus
train() { # out log dtype
  timeout "${TO:-120}" "$B" train --teacher $M --corpus $C --out "$W/$1" --steps 30 --batch 8 --seq-len 128 \
    --lr 2e-3 --log-every 1 --checkpoint-every 10 --device cuda --dtype "$3" >"$W/$2.log" 2>&1
}
launch() { # rank world out dtype
  RANK=$1 WORLD_SIZE=$2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 train "$3" "$3-r$1" "$4"
}

for dt in f32 bf16; do
  train plain-$dt plain-$dt $dt
  echo "plain $dt rc $?" >&2
  launch 0 1 nccl1-$dt $dt
  echo "nccl world 1 $dt rc $?" >&2
done

# Two processes on one GPU.
TO=60 launch 0 2 dup f32 &
p0=$!
TO=60 launch 1 2 dup f32
rc1=$?
wait $p0
rc0=$?
echo "two processes on one GPU: rc $rc0 (rank 0), $rc1 (rank 1)" >&2

# libnccl not on the path.
RANK=0 WORLD_SIZE=1 LD_LIBRARY_PATH=$CUDA_LIB timeout 30 "$B" train --teacher $M --corpus $C \
  --out "$W/nolib" --steps 1 --batch 8 --seq-len 128 --device cuda >"$W/nolib.log" 2>&1
echo "without libnccl: rc $?" >&2

(cd "$W" && tar czf "$OUT/gpu-nccl-logs.tar.gz" ./*.log)
python3 - "$W" "$OUT/gpu-nccl.json" "$rc0" "$rc1" <<'EOF'
import json, os, sys
w, dst, rc0, rc1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def log(run):
    p = f"{w}/{run}/train_log.jsonl"
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []

def student(run):
    p = f"{w}/{run}/student/model.safetensors"
    return open(p, "rb").read() if os.path.exists(p) else None

def tail(name, n=6):
    p = f"{w}/{name}.log"
    return open(p).read().strip().splitlines()[-n:] if os.path.exists(p) else []

res = {"runs": {}}
for dt in ["f32", "bf16"]:
    a, b = log(f"plain-{dt}"), log(f"nccl1-{dt}")
    keys = ["loss", "kl", "agreement", "grad_norm"]
    res["runs"][dt] = {
        "steps": [len(a), len(b)],
        "plain_loss": [x["loss"] for x in a],
        "nccl_world1_loss": [x["loss"] for x in b],
        "bit_identical_log": len(a) == 30 and [[x[k] for k in keys] for x in a] == [[x[k] for k in keys] for x in b],
        "bit_identical_student": student(f"plain-{dt}") is not None and student(f"plain-{dt}") == student(f"nccl1-{dt}"),
        "nccl_log_tail": tail(f"nccl1-{dt}-r0", 3),
    }
dup = log("dup")
res["two_processes_one_gpu"] = {
    "rc_rank0": rc0, "rc_rank1": rc1,
    "loss": [x["loss"] for x in dup],
    "plain_f32_loss": [x["loss"] for x in log("plain-f32")][: len(dup)],
    "log_tail_rank0": tail("dup-r0", 8),
    "log_tail_rank1": tail("dup-r1", 8),
}
res["without_libnccl"] = tail("nolib", 2)
json.dump(res, open(dst, "w"), indent=1)
for dt, r in res["runs"].items():
    print(f"{dt}: steps {r['steps']}, bit-identical log {r['bit_identical_log']}, student {r['bit_identical_student']}")
    print(f"  plain loss  {r['plain_loss'][:3]} ... {r['plain_loss'][-1:]}")
    print(f"  nccl1 loss  {r['nccl_world1_loss'][:3]} ... {r['nccl_world1_loss'][-1:]}")
d = res["two_processes_one_gpu"]
print(f"two processes on one GPU: rc {d['rc_rank0']}/{d['rc_rank1']}, {len(d['loss'])} steps logged")
print("rank 0:", "\n  ".join(d["log_tail_rank0"]))
print("rank 1:", "\n  ".join(d["log_tail_rank1"]))
print("without libnccl:", res["without_libnccl"])
EOF
