// The pieces of a GPU training step that candle's generic ops would do in several passes, for
// train's whole-block op (model's fused_block.rs) and its optimizer:
// - fq_cast: the weight's per-channel / per-group fake quantization (f32 master in) written
//   straight in the compute dtype (one pass instead of quantize, then cast);
// - kv_quant_heads: per-token fake quantization of K or V stored [b, heads, t, d] (after the
//   RoPE transpose), across all heads of a token, in place;
// - rms_quant, swiglu_quant, heads_transpose: RMSNorm, SwiGLU and the [b, t, heads, d] <->
//   [b, heads, t, d] transposes with the per-token activation quantizer folded in (the
//   unquantized values are never stored);
// - grad_accumulate: dst = src (first write of a step) or dst += src, f32;
// - sumsq_partials: one partial sum of squares per block (global gradient norm, summed on the
//   host in a fixed order, so deterministic);
// - adamw_fused: gradient scaling (clipping), both moments and the update in one pass, with the
//   tensor-op formula's order of operations and f32 roundings (adamw.cu's three kernels).
// Fake quantization is common.cuh's `quantize`, as in fake_quant.cu.
#include "common.cuh"

// Four values rounded to T and stored together (8 bytes for bf16/f16, 16 for f32).
__device__ __forceinline__ void store4(float *p, float a, float b, float c, float d) {
  *reinterpret_cast<float4 *>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(__nv_bfloat16 *p, float a, float b, float c, float d) {
  __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
  uint2 v;
  v.x = *reinterpret_cast<uint32_t *>(&lo);
  v.y = *reinterpret_cast<uint32_t *>(&hi);
  *reinterpret_cast<uint2 *>(p) = v;
}
__device__ __forceinline__ void store4(__half *p, float a, float b, float c, float d) {
  __half2 lo = __floats2half2_rn(a, b), hi = __floats2half2_rn(c, d);
  uint2 v;
  v.x = *reinterpret_cast<uint32_t *>(&lo);
  v.y = *reinterpret_cast<uint32_t *>(&hi);
  *reinterpret_cast<uint2 *>(p) = v;
}

// One warp per group of `g` values along rows of `d` (the last group of a row may be shorter);
// qmax = 0 means no quantization (a plain cast). `vec`: every group starts 16-byte aligned and
// has a multiple of 4 values, so lanes move float4s.
template <typename T>
__device__ void fq_cast(const float *x, T *y, uint64_t groups, uint32_t d, uint32_t g, float qmax,
                        int vec) {
  const uint64_t warp = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (warp >= groups) return;
  const uint32_t per_row = (d + g - 1) / g;
  const uint64_t row = warp / per_row;
  const uint32_t start = (uint32_t)(warp % per_row) * g;
  const uint32_t len = min(g, d - start);
  const float *xs = x + row * d + start;
  T *ys = y + row * d + start;
  if (vec) {
    const float4 *x4 = reinterpret_cast<const float4 *>(xs);
    const uint32_t n4 = len / 4;
    float m = 0.0f;
    if (qmax != 0.0f) {
      for (uint32_t i = lane; i < n4; i += 32) {
        const float4 v = x4[i];
        m = fmaxf(fmaxf(m, fmaxf(fabsf(v.x), fabsf(v.y))), fmaxf(fabsf(v.z), fabsf(v.w)));
      }
    }
    const float alpha = qmax != 0.0f ? __fdiv_rn(warp_max(m), qmax) : 0.0f;
    for (uint32_t i = lane; i < n4; i += 32) {
      const float4 v = x4[i];
      if (qmax == 0.0f)
        store4(ys + 4 * i, v.x, v.y, v.z, v.w);
      else
        store4(ys + 4 * i, quantize(v.x, alpha, qmax), quantize(v.y, alpha, qmax),
               quantize(v.z, alpha, qmax), quantize(v.w, alpha, qmax));
    }
    return;
  }
  if (qmax == 0.0f) {
    for (uint32_t i = lane; i < len; i += 32) ys[i] = from_f32<T>(xs[i]);
    return;
  }
  float m = 0.0f;
  for (uint32_t i = lane; i < len; i += 32) m = fmaxf(m, fabsf(xs[i]));
  const float alpha = __fdiv_rn(warp_max(m), qmax);
  for (uint32_t i = lane; i < len; i += 32) ys[i] = from_f32<T>(quantize(xs[i], alpha, qmax));
}

// x [b, heads, t, d]: one warp per token (b, p) quantizes its heads · d values in place.
template <typename T>
__device__ void kv_quant_heads(T *x, uint32_t b, uint32_t heads, uint32_t t, uint32_t d,
                               float qmax) {
  const uint64_t warp = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (warp >= (uint64_t)b * t) return;
  const uint64_t bi = warp / t, p = warp % t;
  const uint32_t n = heads * d;
  T *base = x + bi * heads * t * d + p * d;
  float m = 0.0f;
  for (uint32_t i = lane; i < n; i += 32) m = fmaxf(m, fabsf(to_f32(base[(uint64_t)(i / d) * t * d + i % d])));
  const float alpha = __fdiv_rn(warp_max(m), qmax);
  for (uint32_t i = lane; i < n; i += 32) {
    T *e = base + (uint64_t)(i / d) * t * d + i % d;
    *e = from_f32<T>(quantize(to_f32(*e), alpha, qmax));
  }
}

// Block-wide max (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_max(float v) {
  __shared__ float part[32];
  v = warp_max(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  return warp_max(lane < warps ? part[lane] : 0.0f);
}

// RMSNorm (fused.cu's rms_fwd, the same roundings) followed by per-row fake quantization of
// its output as stored in T: one block per row writes q(y) and r; y itself is never stored.
template <typename T>
__device__ void rms_quant(const T *x, const float *w, T *y, float *r, uint32_t h, float eps,
                          float qmax) {
  const uint64_t row = blockIdx.x;
  const T *xr = x + row * h;
  float ss = 0.0f;
  for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) {
    const float v = to_f32(xr[i]);
    ss = fmaf(v, v, ss);
  }
  const float rr = 1.0f / sqrtf(block_sum(ss) / (float)h + eps);
  float m = 0.0f;
  for (uint32_t i = threadIdx.x; i < h; i += blockDim.x)
    m = fmaxf(m, fabsf(to_f32(from_f32<T>(to_f32(xr[i]) * rr * w[i]))));
  const float alpha = __fdiv_rn(block_max(m), qmax);
  for (uint32_t i = threadIdx.x; i < h; i += blockDim.x)
    y[row * h + i] = from_f32<T>(quantize(to_f32(from_f32<T>(to_f32(xr[i]) * rr * w[i])), alpha, qmax));
  if (threadIdx.x == 0) r[row] = rr;
}

// silu(g) · u (fused.cu's swiglu_fwd, rounded to T) fake-quantized per row of n values.
template <typename T>
__device__ void swiglu_quant(const T *g, const T *u, T *y, uint32_t n, float qmax) {
  const uint64_t row = blockIdx.x;
  const T *gr = g + row * n, *ur = u + row * n;
  float m = 0.0f;
  for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float gv = to_f32(gr[i]);
    m = fmaxf(m, fabsf(to_f32(from_f32<T>(gv / (1.0f + expf(-gv)) * to_f32(ur[i])))));
  }
  const float alpha = __fdiv_rn(block_max(m), qmax);
  for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float gv = to_f32(gr[i]);
    const float s = to_f32(from_f32<T>(gv / (1.0f + expf(-gv)) * to_f32(ur[i])));
    y[row * n + i] = from_f32<T>(quantize(s, alpha, qmax));
  }
}

// rms_quant and swiglu_quant with the row in registers: each thread owns up to C 16-byte chunks
// (the row a multiple of 16 / sizeof(T) values), so x (or g and u) is read once.
template <typename T> __device__ __forceinline__ void load_chunk(const T *p, float *out) {
  constexpr uint32_t N = 16 / sizeof(T);
  const uint4 u = *reinterpret_cast<const uint4 *>(p);
  const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
  for (uint32_t j = 0; j < N; ++j) out[j] = to_f32(e[j]);
}
template <typename T> __device__ __forceinline__ void store_chunk(T *p, const float *in) {
  constexpr uint32_t N = 16 / sizeof(T);
  uint4 u;
  T *e = reinterpret_cast<T *>(&u);
#pragma unroll
  for (uint32_t j = 0; j < N; ++j) e[j] = from_f32<T>(in[j]);
  *reinterpret_cast<uint4 *>(p) = u;
}

// A thread's chunks of a row (as rms_quant_reg and swiglu_quant_reg hold them), quantized and
// stored at row y.
template <typename T, int C>
__device__ __forceinline__ void store_quantized(float (&v)[C][16 / sizeof(T)], T *y, uint32_t chunks,
                                                float alpha, float qmax) {
  constexpr uint32_t N = 16 / sizeof(T);
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t c = threadIdx.x + blockDim.x * k;
    if (c < chunks) {
#pragma unroll
      for (uint32_t j = 0; j < N; ++j) v[k][j] = quantize(v[k][j], alpha, qmax);
      store_chunk<T>(y + c * N, v[k]);
    }
  }
}

template <typename T, int C>
__device__ void rms_quant_reg(const T *x, const float *w, T *y, float *r, uint32_t h, float eps,
                              float qmax) {
  constexpr uint32_t N = 16 / sizeof(T);
  const uint64_t row = blockIdx.x;
  const uint32_t chunks = h / N;
  float v[C][N];
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t c = threadIdx.x + blockDim.x * k;
    if (c < chunks) {
      load_chunk<T>(x + row * h + c * N, v[k]);
#pragma unroll
      for (uint32_t j = 0; j < N; ++j) ss = fmaf(v[k][j], v[k][j], ss);
    }
  }
  const float rr = 1.0f / sqrtf(block_sum(ss) / (float)h + eps);
  float m = 0.0f;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t c = threadIdx.x + blockDim.x * k;
    if (c < chunks) {
#pragma unroll
      for (uint32_t j = 0; j < N; ++j) {
        v[k][j] = to_f32(from_f32<T>(v[k][j] * rr * w[c * N + j]));
        m = fmaxf(m, fabsf(v[k][j]));
      }
    }
  }
  store_quantized<T, C>(v, y + row * h, chunks, __fdiv_rn(block_max(m), qmax), qmax);
  if (threadIdx.x == 0) r[row] = rr;
}

template <typename T, int C>
__device__ void swiglu_quant_reg(const T *g, const T *u, T *y, uint32_t n, float qmax) {
  constexpr uint32_t N = 16 / sizeof(T);
  const uint64_t row = blockIdx.x;
  const uint32_t chunks = n / N;
  float v[C][N];
  float m = 0.0f;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t c = threadIdx.x + blockDim.x * k;
    if (c < chunks) {
      float uv[N];
      load_chunk<T>(g + row * n + c * N, v[k]);
      load_chunk<T>(u + row * n + c * N, uv);
#pragma unroll
      for (uint32_t j = 0; j < N; ++j) {
        const float gv = v[k][j];
        v[k][j] = to_f32(from_f32<T>(gv / (1.0f + expf(-gv)) * uv[j]));
        m = fmaxf(m, fabsf(v[k][j]));
      }
    }
  }
  store_quantized<T, C>(v, y + row * n, chunks, __fdiv_rn(block_max(m), qmax), qmax);
}

// Between the token-major layout [b, t, heads, d] and the head-major one [b, heads, t, d]:
// `gather` reads head-major and writes token-major, else the reverse. One warp per token
// (its heads · d values), optionally fake-quantized per token (qmax = 0: a plain transpose).
// Lanes move 16-byte chunks (d a multiple of 16 / sizeof(T), both buffers 16-byte aligned).
template <typename T>
__device__ void heads_transpose(const T *src, T *dst, uint32_t b, uint32_t heads, uint32_t t,
                                uint32_t d, float qmax, int gather) {
  constexpr uint32_t N = 16 / sizeof(T);
  const uint64_t warp = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (warp >= (uint64_t)b * t) return;
  const uint64_t bi = warp / t, p = warp % t;
  const uint32_t n = heads * d, chunks = n / N;
  // Element i of the token: token-major at tm + i, head-major at hm + (i / d) * t * d + i % d.
  const uint64_t tm = warp * n, hm = bi * n * t + p * d;
  auto head_major = [&](uint32_t i) { return hm + (uint64_t)(i / d) * t * d + i % d; };
  auto src_at = [&](uint32_t c) { return gather ? head_major(c * N) : tm + c * N; };
  auto dst_at = [&](uint32_t c) { return gather ? tm + c * N : head_major(c * N); };
  float alpha = 0.0f;
  if (qmax != 0.0f) {
    float m = 0.0f;
    for (uint32_t c = lane; c < chunks; c += 32) {
      const uint4 u = *reinterpret_cast<const uint4 *>(src + src_at(c));
      const T *v = reinterpret_cast<const T *>(&u);
#pragma unroll
      for (uint32_t j = 0; j < N; ++j) m = fmaxf(m, fabsf(to_f32(v[j])));
    }
    alpha = __fdiv_rn(warp_max(m), qmax);
  }
  for (uint32_t c = lane; c < chunks; c += 32) {
    uint4 u = *reinterpret_cast<const uint4 *>(src + src_at(c));
    if (qmax != 0.0f) {
      T *v = reinterpret_cast<T *>(&u);
#pragma unroll
      for (uint32_t j = 0; j < N; ++j) v[j] = from_f32<T>(quantize(to_f32(v[j]), alpha, qmax));
    }
    *reinterpret_cast<uint4 *>(dst + dst_at(c)) = u;
  }
}

extern "C" __global__ void grad_accumulate(float *dst, const float *src, uint64_t n, int overwrite) {
  const uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  if (i < n) dst[i] = overwrite ? src[i] : dst[i] + src[i];
}

// Block b writes out[b], its share of a grid-stride pass over n values (blockDim.x = 256): the
// first 4 * n4 values as float4 (the caller sets n4 = 0 unless g is 16-byte aligned), the rest
// one by one. Four accumulators keep loads in flight.
extern "C" __global__ void sumsq_partials(const float *g, uint64_t n, uint64_t n4, float *out) {
  __shared__ float part[8];
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  const float4 *g4 = reinterpret_cast<const float4 *>(g);
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n4; i += stride) {
    const float4 v = g4[i];
    s0 = fmaf(v.x, v.x, s0);
    s1 = fmaf(v.y, v.y, s1);
    s2 = fmaf(v.z, v.z, s2);
    s3 = fmaf(v.w, v.w, s3);
  }
  for (uint64_t i = 4 * n4 + blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += stride)
    s0 = fmaf(g[i], g[i], s0);
  float s = (s0 + s1) + (s2 + s3);
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.0f;
    for (int w = 0; w < 8; ++w) t += part[w];
    out[blockIdx.x] = t;
  }
}

// g' = g * gscale (gscale = 1: unclipped);  m = m*b1 + g'*(1-b1);  v = v*b2 + (g'*g')*(1-b2);
// w = w*decay - ((m*inv_c1) / (sqrt(v*inv_c2) + eps)) * lr.
extern "C" __global__ void adamw_fused(float *w, float *m, float *v, const float *g, uint64_t n,
                                       float gscale, int scale_grad, float b1, float omb1,
                                       float b2, float omb2, float inv_c1, float inv_c2, float eps,
                                       float lr, float decay, int apply_decay) {
  const uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float gi = scale_grad ? __fmul_rn(g[i], gscale) : g[i];
  const float mi = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(gi, omb1));
  const float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gi, gi), omb2));
  m[i] = mi;
  v[i] = vi;
  const float denom = __fadd_rn(__fsqrt_rn(__fmul_rn(vi, inv_c2)), eps);
  const float update = __fdiv_rn(__fmul_rn(mi, inv_c1), denom);
  const float wi = apply_decay ? __fmul_rn(w[i], decay) : w[i];
  w[i] = __fsub_rn(wi, __fmul_rn(update, lr));
}

#define BY_TYPE(SUFFIX, T)                                                                       \
  extern "C" __global__ void fq_cast_##SUFFIX(const float *x, T *y, uint64_t groups, uint32_t d, \
                                              uint32_t g, float qmax, int vec) {                 \
    fq_cast<T>(x, y, groups, d, g, qmax, vec);                                                   \
  }                                                                                              \
  extern "C" __global__ void rms_quant_##SUFFIX(const T *x, const float *w, T *y, float *r,      \
                                                uint32_t h, float eps, float qmax) {             \
    rms_quant<T>(x, w, y, r, h, eps, qmax);                                                      \
  }                                                                                              \
  extern "C" __global__ void swiglu_quant_##SUFFIX(const T *g, const T *u, T *y, uint32_t n,     \
                                                   float qmax) {                                 \
    swiglu_quant<T>(g, u, y, n, qmax);                                                           \
  }                                                                                              \
  extern "C" __global__ void rms_quant_reg_##SUFFIX(const T *x, const float *w, T *y, float *r,  \
                                                    uint32_t h, float eps, float qmax) {         \
    rms_quant_reg<T, 4>(x, w, y, r, h, eps, qmax);                                               \
  }                                                                                              \
  extern "C" __global__ void swiglu_quant_reg_##SUFFIX(const T *g, const T *u, T *y, uint32_t n, \
                                                       float qmax) {                             \
    swiglu_quant_reg<T, 4>(g, u, y, n, qmax);                                                    \
  }                                                                                              \
  extern "C" __global__ void heads_transpose_##SUFFIX(const T *src, T *dst, uint32_t b,          \
                                                      uint32_t heads, uint32_t t, uint32_t d,    \
                                                      float qmax, int gather) {                  \
    heads_transpose<T>(src, dst, b, heads, t, d, qmax, gather);                                  \
  }                                                                                              \
  extern "C" __global__ void kv_quant_heads_##SUFFIX(T *x, uint32_t b, uint32_t heads,          \
                                                     uint32_t t, uint32_t d, float qmax) {       \
    kv_quant_heads<T>(x, b, heads, t, d, qmax);                                                  \
  }

BY_TYPE(f32, float)
BY_TYPE(bf16, __nv_bfloat16)
BY_TYPE(f16, __half)
