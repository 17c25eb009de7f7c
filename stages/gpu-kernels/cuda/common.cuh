// Helpers every kernel file shares (each .cu is its own PTX module and includes this):
// conversions between the storage dtypes and f32 (outputs round to nearest even, as candle's
// casts do), the fake quantizer's rounding rule, and warp- and block-wide reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float block_sum(float v) {
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  float s = lane < warps ? part[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

// Symmetric MinMax fake quantization of one value with scale alpha = max|x| / qmax
// (DESIGN.md, "Quantizers"): clamp(round_half_even(x / alpha), -qmax, qmax) * alpha, 0 when
// alpha = 0. The sign is restored after rounding |v|: small negatives give -0.0, as in PyTorch.
__device__ __forceinline__ float quantize(float x, float alpha, float qmax) {
  if (alpha == 0.0f) return 0.0f;
  const float v = fminf(fmaxf(__fdiv_rn(x, alpha), -qmax), qmax);
  const float r = rintf(fabsf(v));
  return __fmul_rn(v < 0.0f ? -r : r, alpha);
}

__device__ __forceinline__ float warp_max(float m) {
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  return m;
}
