#!/usr/bin/env bash
# Builds `pipeline` with candle's CUDA backend on a machine with no GPU and no system CUDA.
#
# CUDA 13.0 comes from NVIDIA's PyPI wheels (Debian offers only 11.8), pinned to 13.0.x because
# the GPU machine's driver (580) is the CUDA 13.0 branch and cannot JIT newer PTX. The toolkit
# lands in .cuda/ and the build in target-cuda/ (both git-ignored), so CPU builds are untouched.
# Output: target-cuda/release/pipeline and its stripped, xz-compressed copy .xz/pipeline.xz
# (what travels to the GPU machine; see scripts/gpu-check.sh).
#
# usage: scripts/build-cuda.sh            (first build about 20 minutes on 2 cores)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CUDA_DIR=$ROOT/.cuda
TK=$CUDA_DIR/unpacked/nvidia/cu13 # every 13.x wheel unpacks into this one prefix

# 13.0 is the CUDA release; curand numbers itself on its own (10.4.0 ships with CUDA 13.0).
WHEELS=(
  "nvidia-cuda-nvcc==13.0.*"
  "nvidia-cuda-crt==13.0.*"
  "nvidia-nvvm==13.0.*"
  "nvidia-cuda-runtime==13.0.*"
  "nvidia-cuda-cccl==13.0.*" # nvcc stops with `nv/target: No such file` without it
  "nvidia-cuda-nvrtc==13.0.*"
  "nvidia-cublas==13.0.*"
  "nvidia-curand==10.4.0.*"
)

if [ ! -x "$TK/bin/nvcc" ]; then
  mkdir -p "$CUDA_DIR/whl" "$CUDA_DIR/unpacked"
  for w in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$CUDA_DIR/whl" "$w"
  done
  for f in "$CUDA_DIR"/whl/*.whl; do unzip -q -o "$f" -d "$CUDA_DIR/unpacked"; done
fi

# The wheels ship only versioned libraries; the linker asks for the plain names.
for lib in cublas cublasLt cudart curand nvrtc; do
  real=$(cd "$TK/lib" && ls lib$lib.so.* | grep -E "^lib$lib\.so\.[0-9]+$" | head -n1)
  ln -sf "$real" "$TK/lib/lib$lib.so"
done

# candle (through cudarc's dynamic-linking) links libcuda, the driver, at build time. The driver
# is not in any wheel, so link against a stub that exports the same symbols under the driver's
# soname; at run time the GPU machine's real libcuda.so.1 is loaded instead.
cargo fetch --manifest-path "$ROOT/Cargo.toml" >/dev/null
CUDARC_VERSION=$(awk '/^name = "cudarc"$/ {getline; gsub(/"/, "", $3); print $3}' "$ROOT/Cargo.lock")
CUDARC_SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$CUDARC_VERSION" | head -n1)
mkdir -p "$TK/lib/stubs"
grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC_SRC/src/driver/sys/mod.rs" | awk '{print $4}' |
  sort -u | sed 's/.*/void &(void) {}/' >"$CUDA_DIR/libcuda-stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TK/lib/stubs/libcuda.so" "$CUDA_DIR/libcuda-stub.c"

export CUDA_HOME=$TK CUDA_PATH=$TK CUDA_ROOT=$TK NVCC=$TK/bin/nvcc PATH=$TK/bin:$PATH
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
export CARGO_TARGET_DIR=$ROOT/target-cuda
cargo build --release --features cuda,nccl --manifest-path "$ROOT/Cargo.toml" --bin pipeline

mkdir -p "$ROOT/.xz"
strip -o "$ROOT/.xz/pipeline" "$CARGO_TARGET_DIR/release/pipeline"
xz -T0 -6 -f "$ROOT/.xz/pipeline"
ls -l "$ROOT/.xz/pipeline.xz"
