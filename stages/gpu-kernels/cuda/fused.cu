// Element-wise and row-wise pieces of the Llama block, forward and backward, each one kernel
// instead of a chain of tensor ops (and their gradient nodes) during GPU training. Math in f32
// whatever the storage dtype T; outputs round to nearest even.
//
// RMSNorm (rows of h values, weight w in f32):
//   r = 1 / sqrt(mean(x²) + eps),  y = (x · r) · w
//   dx = r · (dy · w) - x · r³ · Σ(dy · w · x) / h (+ a residual gradient, when given),
//   dw = Σ_rows dy · x · r
// RoPE ("rotate half"), fused with the [b, t, h, d] <-> [b, h, t, d] transpose:
//   y_i = x_i c - x_{i+d/2} s,  y_{i+d/2} = x_{i+d/2} c + x_i s; the backward is the same
//   rotation with -s, transposed back.
// SwiGLU: y = silu(g) · u;  dg = dy · u · σ(g) (1 + g (1 - σ(g))),  du = dy · silu(g).
#include "common.cuh"

// One block per row; writes y and r (for the backward).
template <typename T>
__device__ void rms_fwd(const T *x, const float *w, T *y, float *r, uint32_t h, float eps) {
  const uint64_t row = blockIdx.x;
  const T *xr = x + row * h;
  float ss = 0.0f;
  for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) {
    const float v = to_f32(xr[i]);
    ss = fmaf(v, v, ss);
  }
  const float rr = 1.0f / sqrtf(block_sum(ss) / (float)h + eps);
  for (uint32_t i = threadIdx.x; i < h; i += blockDim.x)
    y[row * h + i] = from_f32<T>(to_f32(xr[i]) * rr * w[i]);
  if (threadIdx.x == 0) r[row] = rr;
}

template <typename T>
__device__ void rms_dx(const T *x, const float *w, const float *r, const T *dy, const T *res, T *dx,
                       uint32_t h) {
  const uint64_t row = blockIdx.x;
  const T *xr = x + row * h, *dyr = dy + row * h;
  float s = 0.0f;
  for (uint32_t i = threadIdx.x; i < h; i += blockDim.x)
    s = fmaf(to_f32(dyr[i]) * w[i], to_f32(xr[i]), s);
  s = block_sum(s);
  const float rr = r[row];
  const float c = rr * rr * rr * s / (float)h;
  for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) {
    float v = rr * to_f32(dyr[i]) * w[i] - to_f32(xr[i]) * c;
    // The residual branch's gradient, added before the one rounding (fused_block.rs).
    if (res) v += to_f32(res[row * h + i]);
    dx[row * h + i] = from_f32<T>(v);
  }
}

// dw partial sums: block (32, 8) covers 32 columns; blockIdx.y takes every gridDim.y-th chunk of
// rows. part is [gridDim.y, h]; rms_dw_sum adds the chunks in order.
template <typename T>
__device__ void rms_dw(const T *x, const float *r, const T *dy, float *part, uint32_t rows, uint32_t h) {
  __shared__ float acc[8][33];
  const uint32_t col = blockIdx.x * 32 + threadIdx.x;
  float s = 0.0f;
  if (col < h) {
    for (uint32_t row = blockIdx.y * 8 + threadIdx.y; row < rows; row += gridDim.y * 8)
      s = fmaf(to_f32(dy[(uint64_t)row * h + col]) * to_f32(x[(uint64_t)row * h + col]), r[row], s);
  }
  acc[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < h) {
    float t = 0.0f;
    for (int k = 0; k < 8; ++k) t += acc[k][threadIdx.x];
    part[(uint64_t)blockIdx.y * h + col] = t;
  }
}

extern "C" __global__ void rms_dw_sum(const float *part, float *dw, uint32_t chunks, uint32_t h) {
  const uint32_t col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= h) return;
  float s = 0.0f;
  for (uint32_t c = 0; c < chunks; ++c) s += part[(uint64_t)c * h + col];
  dw[col] = s;
}

// RoPE fused with the head transpose. Forward (sign +1): x [b, t, h, d] (the projection's
// output) -> y [b, h, t, d] (attention's layout), rotated. Backward (sign -1): dy [b, h, t, d] ->
// dx [b, t, h, d], rotated back. cos/sin [t, d/2] f32; one thread per output pair (i, i + d/2).
template <typename T>
__device__ void rope(const T *x, const float *cs, const float *sn, T *y, uint64_t pairs, uint32_t d,
                     uint32_t heads, uint32_t t, float sign) {
  const uint64_t k = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  if (k >= pairs) return;
  const uint32_t half = d / 2;
  const uint64_t out_row = k / half;
  const uint32_t i = k % half;
  // Output row -> (batch, head, position) in the output's layout, then the input row.
  uint64_t bb, hh, tt, in_row;
  if (sign > 0.0f) {
    tt = out_row % t;
    hh = (out_row / t) % heads;
    bb = out_row / ((uint64_t)t * heads);
    in_row = (bb * t + tt) * heads + hh;
  } else {
    hh = out_row % heads;
    tt = (out_row / heads) % t;
    bb = out_row / ((uint64_t)t * heads);
    in_row = (bb * heads + hh) * t + tt;
  }
  const float c = cs[tt * half + i], s = sign * sn[tt * half + i];
  const float a = to_f32(x[in_row * d + i]), b = to_f32(x[in_row * d + half + i]);
  y[out_row * d + i] = from_f32<T>(a * c - b * s);
  y[out_row * d + half + i] = from_f32<T>(b * c + a * s);
}

template <typename T>
__device__ void swiglu_fwd(const T *g, const T *u, T *y, uint64_t n) {
  const uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float gv = to_f32(g[i]);
  y[i] = from_f32<T>(gv / (1.0f + expf(-gv)) * to_f32(u[i]));
}

template <typename T>
__device__ void swiglu_bwd(const T *g, const T *u, const T *dy, T *dg, T *du, uint64_t n) {
  const uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float gv = to_f32(g[i]), uv = to_f32(u[i]), d = to_f32(dy[i]);
  const float sg = 1.0f / (1.0f + expf(-gv));
  dg[i] = from_f32<T>(d * uv * sg * (1.0f + gv * (1.0f - sg)));
  du[i] = from_f32<T>(d * gv * sg);
}

#define FUSED(SUFFIX, T)                                                                         \
  extern "C" __global__ void rms_fwd_##SUFFIX(const T *x, const float *w, T *y, float *r,        \
                                              uint32_t h, float eps) {                           \
    rms_fwd<T>(x, w, y, r, h, eps);                                                              \
  }                                                                                              \
  extern "C" __global__ void rms_dx_##SUFFIX(const T *x, const float *w, const float *r,         \
                                             const T *dy, const T *res, T *dx, uint32_t h) {     \
    rms_dx<T>(x, w, r, dy, res, dx, h);                                                          \
  }                                                                                              \
  extern "C" __global__ void rms_dw_##SUFFIX(const T *x, const float *r, const T *dy,            \
                                             float *part, uint32_t rows, uint32_t h) {           \
    rms_dw<T>(x, r, dy, part, rows, h);                                                          \
  }                                                                                              \
  extern "C" __global__ void rope_##SUFFIX(const T *x, const float *c, const float *s, T *y,     \
                                           uint64_t pairs, uint32_t d, uint32_t heads,           \
                                           uint32_t t, float sign) {                             \
    rope<T>(x, c, s, y, pairs, d, heads, t, sign);                                               \
  }                                                                                              \
  extern "C" __global__ void swiglu_fwd_##SUFFIX(const T *g, const T *u, T *y, uint64_t n) {     \
    swiglu_fwd<T>(g, u, y, n);                                                                   \
  }                                                                                              \
  extern "C" __global__ void swiglu_bwd_##SUFFIX(const T *g, const T *u, const T *dy, T *dg,     \
                                                 T *du, uint64_t n) {                            \
    swiglu_bwd<T>(g, u, dy, dg, du, n);                                                          \
  }

FUSED(f32, float)
FUSED(bf16, __nv_bfloat16)
FUSED(f16, __half)
