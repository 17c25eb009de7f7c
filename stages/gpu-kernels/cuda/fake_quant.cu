// Symmetric MinMax fake quantization on the GPU, the same math as the CPU kernel in
// src/fake.rs (DESIGN.md, "Quantizers"), bit for bit:
//   alpha = max |x| over the group / qmax            (alpha = 0 -> output +0)
//   q(x)  = clamp(round_half_even(x / alpha), -qmax, qmax) * alpha
// One warp per group: lanes stride over the group for max |x|, a shuffle reduction shares it,
// then each lane writes its values. Groups run along the last dimension; a row of `d` values
// has ceil(d / g) groups, the last one possibly shorter. Input and output have the same dtype;
// the math is in f32 (bf16/f16 inputs are exact in f32, outputs round to nearest even, as
// candle's casts do), so a bf16 tensor gives what cast-to-f32, quantize, cast-back gives.
#include "common.cuh"

template <typename T>
__device__ void fake_quant(const T *x, T *y, uint64_t groups, uint32_t d, uint32_t g, float qmax) {
  const uint64_t warp = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (warp >= groups) return;
  const uint32_t per_row = (d + g - 1) / g;
  const uint64_t row = warp / per_row;
  const uint32_t start = (uint32_t)(warp % per_row) * g;
  const uint32_t len = min(g, d - start);
  const T *xs = x + row * d + start;
  T *ys = y + row * d + start;
  float m = 0.0f;
  for (uint32_t i = lane; i < len; i += 32) m = fmaxf(m, fabsf(to_f32(xs[i])));
  const float alpha = __fdiv_rn(warp_max(m), qmax);
  for (uint32_t i = lane; i < len; i += 32) ys[i] = from_f32<T>(quantize(to_f32(xs[i]), alpha, qmax));
}

#define FAKE_QUANT(NAME, T)                                                                      \
  extern "C" __global__ void NAME(const T *x, T *y, uint64_t groups, uint32_t d, uint32_t g,     \
                                  float qmax) {                                                  \
    fake_quant<T>(x, y, groups, d, g, qmax);                                                     \
  }

FAKE_QUANT(fake_quant_f32, float)
FAKE_QUANT(fake_quant_bf16, __nv_bfloat16)
FAKE_QUANT(fake_quant_f16, __half)
