// The distillation loss of DESIGN.md ("loss") per row (token), in one pass over the vocabulary
// instead of candle's ~30 tensor ops; train's loss.rs launches it through src/distill.rs and
// holds a CPU twin (same per-element update, same merge tree) that CI tests.
//
// With xs = zs / T and xt = zt / T (student and teacher logits, math in f32 for every dtype):
//   ce_i      = -sum_v softmax(xt)_v * log_softmax(xs)_v = ln S_s - A / S_t
//   entropy_i = -sum_v softmax(xt)_v * log_softmax(xt)_v = ln S_t - B / S_t
// where, relative to the running maxima m_s and m_t,
//   S_s = sum exp(xs - m_s),  S_t = sum exp(xt - m_t),
//   A   = sum exp(xt - m_t) * (xs - m_s),  B = sum exp(xt - m_t) * (xt - m_t).
// Every term of A and B is <= 0, and moving a reference up to a larger maximum subtracts a
// further non-negative amount, so the online sums never cancel: the same accuracy as the
// max-subtracted tensor-op formula, in a single pass.
//
// Forward (distill_rows_*): one block of DISTILL_THREADS per row; thread j takes elements j,
// j + DISTILL_THREADS, ...; states merge down each warp (shuffles), then across the warps.
// Output per row, f32: [ce, entropy, agree, lse_s, lse_t] (agree = 1 when the student's and
// the teacher's argmax agree, ties to the lowest index; lse = log-sum-exp of z / T).
// Backward (distill_rows_grad_*): d ce_i / d zs_v = (softmax(xs)_v - softmax(xt)_v) / T,
// times the incoming gradient g_i, from the saved log-sum-exps; aux row = [g_i, lse_s, lse_t].
// Logits are assumed finite.
#include "common.cuh"

#define DISTILL_THREADS 256

// z / T as candle's affine(1 / T, 0) rounds it (no fused multiply-add): the argmax sees the
// same values as the tensor-op path's.
template <typename T> __device__ __forceinline__ float scaled(T z, float inv_t) {
  return __fmul_rn(to_f32(z), inv_t);
}

// Running statistics of part of a row. Empty: st == 0 (a non-empty state has st >= 1, the
// term of its teacher maximum).
struct RowStats {
  float ms, ss, mt, st, a, b;
  uint32_t is, it; // argmax of xs and xt
};

__device__ __forceinline__ RowStats empty_stats() {
  RowStats s;
  s.ms = -INFINITY;
  s.mt = -INFINITY;
  s.ss = s.st = s.a = s.b = 0.0f;
  s.is = s.it = 0xffffffffu;
  return s;
}

// Adds element i (indices arrive increasing, so a strict > keeps the lowest index on ties).
__device__ __forceinline__ void push(RowStats &s, float xs, float xt, uint32_t i) {
  if (xs > s.ms) {
    if (s.st > 0.0f) s.a -= (xs - s.ms) * s.st;
    s.ss *= expf(s.ms - xs);
    s.ms = xs;
    s.is = i;
  }
  s.ss += expf(xs - s.ms);
  if (xt > s.mt) {
    if (s.st > 0.0f) {
      const float d = xt - s.mt, r = expf(-d);
      s.b = (s.b - d * s.st) * r;
      s.a *= r;
      s.st *= r;
    }
    s.mt = xt;
    s.it = i;
  }
  const float e = expf(xt - s.mt);
  s.st += e;
  s.a += e * (xs - s.ms);
  s.b += e * (xt - s.mt);
}

__device__ __forceinline__ uint32_t arg_of(float m1, uint32_t i1, float m2, uint32_t i2) {
  return m2 > m1 ? i2 : (m1 > m2 ? i1 : min(i1, i2));
}

// s <- s + o: both re-referenced to the larger maxima.
__device__ __forceinline__ void merge(RowStats &s, const RowStats &o) {
  if (o.st == 0.0f) return;
  if (s.st == 0.0f) {
    s = o;
    return;
  }
  const float ms = fmaxf(s.ms, o.ms);
  const float a1 = s.a - (ms - s.ms) * s.st;
  const float a2 = o.a - (ms - o.ms) * o.st;
  s.ss = s.ss * expf(s.ms - ms) + o.ss * expf(o.ms - ms);
  s.is = arg_of(s.ms, s.is, o.ms, o.is);
  s.ms = ms;
  const float mt = fmaxf(s.mt, o.mt);
  const float d1 = mt - s.mt, d2 = mt - o.mt;
  const float r1 = expf(-d1), r2 = expf(-d2);
  s.b = (s.b - d1 * s.st) * r1 + (o.b - d2 * o.st) * r2;
  s.a = a1 * r1 + a2 * r2;
  s.st = s.st * r1 + o.st * r2;
  s.it = arg_of(s.mt, s.it, o.mt, o.it);
  s.mt = mt;
}

__device__ __forceinline__ RowStats shfl_down(const RowStats &s, int o) {
  RowStats r;
  r.ms = __shfl_down_sync(0xffffffffu, s.ms, o);
  r.ss = __shfl_down_sync(0xffffffffu, s.ss, o);
  r.mt = __shfl_down_sync(0xffffffffu, s.mt, o);
  r.st = __shfl_down_sync(0xffffffffu, s.st, o);
  r.a = __shfl_down_sync(0xffffffffu, s.a, o);
  r.b = __shfl_down_sync(0xffffffffu, s.b, o);
  r.is = __shfl_down_sync(0xffffffffu, s.is, o);
  r.it = __shfl_down_sync(0xffffffffu, s.it, o);
  return r;
}

// Lane 0 ends with lanes 0..31 merged (lane i takes lane i + o, o = 16, 8, 4, 2, 1).
__device__ __forceinline__ void warp_merge(RowStats &s) {
  for (int o = 16; o > 0; o >>= 1) {
    const RowStats other = shfl_down(s, o);
    merge(s, other);
  }
}

template <typename T>
__device__ void distill_rows(const T *__restrict__ zs, const T *__restrict__ zt,
                             float *__restrict__ out, uint32_t v, float inv_t) {
  __shared__ RowStats warps[DISTILL_THREADS / 32];
  const uint64_t row = blockIdx.x;
  const T *s_row = zs + row * v;
  const T *t_row = zt + row * v;
  RowStats s = empty_stats();
  // Four loads in flight before the dependent updates; the element order stays j, j + 256, ...
  constexpr uint32_t U = 4;
  uint32_t i = threadIdx.x;
  for (; i + (U - 1) * DISTILL_THREADS < v; i += U * DISTILL_THREADS) {
    float xs[U], xt[U];
#pragma unroll
    for (uint32_t k = 0; k < U; k++) {
      xs[k] = scaled(s_row[i + k * DISTILL_THREADS], inv_t);
      xt[k] = scaled(t_row[i + k * DISTILL_THREADS], inv_t);
    }
#pragma unroll
    for (uint32_t k = 0; k < U; k++) push(s, xs[k], xt[k], i + k * DISTILL_THREADS);
  }
  for (; i < v; i += DISTILL_THREADS) push(s, scaled(s_row[i], inv_t), scaled(t_row[i], inv_t), i);
  warp_merge(s);
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warps[warp] = s;
  __syncthreads();
  if (warp != 0) return;
  s = lane < DISTILL_THREADS / 32 ? warps[lane] : empty_stats();
  warp_merge(s);
  if (lane == 0) {
    const float ls = logf(s.ss), lt = logf(s.st);
    float *o = out + row * 5;
    o[0] = ls - s.a / s.st;
    o[1] = lt - s.b / s.st;
    o[2] = s.is == s.it ? 1.0f : 0.0f;
    o[3] = s.ms + ls;
    o[4] = s.mt + lt;
  }
}

template <typename T>
__device__ void distill_rows_grad(const T *__restrict__ zs, const T *__restrict__ zt,
                                  const float *__restrict__ aux, T *__restrict__ grad, uint32_t v,
                                  float inv_t) {
  const uint64_t row = blockIdx.x;
  const float scale = aux[row * 3] * inv_t, lse_s = aux[row * 3 + 1], lse_t = aux[row * 3 + 2];
  const T *s_row = zs + row * v;
  const T *t_row = zt + row * v;
  T *g_row = grad + row * v;
  for (uint32_t i = threadIdx.x; i < v; i += blockDim.x) {
    const float ps = expf(scaled(s_row[i], inv_t) - lse_s);
    const float pt = expf(scaled(t_row[i], inv_t) - lse_t);
    g_row[i] = from_f32<T>(scale * (ps - pt));
  }
}

#define DISTILL(SUFFIX, T)                                                                        \
  extern "C" __global__ void __launch_bounds__(DISTILL_THREADS, 8)                               \
      distill_rows_##SUFFIX(const T *zs, const T *zt, float *out, uint32_t v, float inv_t) {      \
    distill_rows<T>(zs, zt, out, v, inv_t);                                                       \
  }                                                                                               \
  extern "C" __global__ void distill_rows_grad_##SUFFIX(const T *zs, const T *zt,                 \
                                                         const float *aux, T *grad, uint32_t v,   \
                                                         float inv_t) {                           \
    distill_rows_grad<T>(zs, zt, aux, grad, v, inv_t);                                            \
  }

DISTILL(f32, float)
DISTILL(bf16, __nv_bfloat16)
DISTILL(f16, __half)
