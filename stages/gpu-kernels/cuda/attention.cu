// Causal attention, forward and backward, without [t, t] score tensors (model's
// causal_attention.rs on a GPU). softmax(q kᵀ · scale + causal mask) v, math in f32 whatever the
// storage dtype.
//
// Layout (grouped-query attention): a group is one (batch, KV head); q and y are [groups, R, D]
// with R = rep · t rows, row h · t + i being query head h of the group at position i; k and v are
// [groups, t, D]. Query position i sees keys 0..=i.
//
// Work split: two adjacent threads own one row (or one key), each holding half of the D values
// in registers; a dot product is two half sums joined by one shuffle. The other operand streams
// through shared memory in tiles, converted to f32 once per block.
//
// Forward (online softmax, one pass over the visible keys) also writes each row's log-sum-exp,
// so the backward pass recomputes probabilities without a second pass:
//   p_ij = exp(s_ij - lse_i),  s_ij = scale · q_i·k_j
//   dv_j = Σ_i p_ij dy_i,  ds_ij = p_ij (dy_i·v_j - dy_i·y_i),  dq_i = scale Σ_j ds_ij k_j,
//   dk_j = scale Σ_i ds_ij q_i
// Backward runs `attn_dq` (one pair of threads per query row, also writing dy_i·y_i), then
// `attn_dkdv` (one pair per key and query head, over the rows that see the key) and
// `attn_sum_heads` (the query heads' shares of dk and dv). Sums run in a fixed order,
// with no atomics, so results are deterministic.
#include "common.cuh"

// Tile sizes: rows (or keys) per block and keys (or rows) per shared-memory tile.
template <int D> struct Tile {
  static constexpr int N = D <= 64 ? 64 : 32;
  static constexpr int H = D / 2;      // values per thread
  static constexpr int HS = H + 4;     // padded half: the two halves sit in different banks
  static constexpr int S = 2 * HS;     // floats per tile row in shared memory
};

// Both threads of a pair (lanes 2m, 2m+1) take part; the others may be elsewhere.
__device__ __forceinline__ float pair_sum(float x) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned mask = 3u << (lane & ~1u);
  return x + __shfl_xor_sync(mask, x, 1);
}

template <int H> __device__ __forceinline__ float dot(const float *a, const float *b) {
  float s = 0.0f;
#pragma unroll
  for (int c = 0; c < H; ++c) s = fmaf(a[c], b[c], s);
  return s;
}

// Copies `n` rows of D values (row stride D in global memory, starting at `src`) into a padded
// f32 tile; rows past `n` become zeros.
template <typename T, int D>
__device__ __forceinline__ void load_tile(float *dst, const T *src, uint32_t n) {
  using TL = Tile<D>;
  for (uint32_t idx = threadIdx.x; idx < TL::N * D; idx += blockDim.x) {
    const uint32_t r = idx / D, c = idx % D;
    const float v = r < n ? to_f32(src[(uint64_t)r * D + c]) : 0.0f;
    dst[r * TL::S + (c / TL::H) * TL::HS + c % TL::H] = v;
  }
}

template <typename T, int D>
__device__ __forceinline__ void load_half(float *dst, const T *row, uint32_t half) {
#pragma unroll
  for (int c = 0; c < D / 2; ++c) dst[c] = to_f32(row[half * (D / 2) + c]);
}

// grid (rep · ceil(t / N), groups), block 2N threads.
template <typename T, int D>
__device__ void attn_fwd(const T *q, const T *k, const T *v, T *y, float *lse, uint32_t t,
                         uint32_t rows, float scale) {
  using TL = Tile<D>;
  constexpr int N = TL::N, H = TL::H;
  __shared__ __align__(16) float ks[N * TL::S];
  __shared__ __align__(16) float vs[N * TL::S];
  const uint32_t g = blockIdx.y, tiles = (t + N - 1) / N;
  const uint32_t head = blockIdx.x / tiles, p0 = (blockIdx.x % tiles) * N;
  const uint32_t half = threadIdx.x % 2, pos = p0 + threadIdx.x / 2;
  const bool valid = pos < t;
  const uint64_t row = (uint64_t)g * rows + (uint64_t)head * t + pos;
  const T *kg = k + (uint64_t)g * t * D, *vg = v + (uint64_t)g * t * D;
  float qr[H], acc[H];
#pragma unroll
  for (int c = 0; c < H; ++c) acc[c] = 0.0f;
  if (valid) load_half<T, D>(qr, q + row * D, half);
  float m = -INFINITY, l = 0.0f;
  const uint32_t last = min(t - 1, p0 + N - 1);
  for (uint32_t j0 = 0; j0 <= last; j0 += N) {
    __syncthreads();
    load_tile<T, D>(ks, kg + (uint64_t)j0 * D, min((uint32_t)N, t - j0));
    load_tile<T, D>(vs, vg + (uint64_t)j0 * D, min((uint32_t)N, t - j0));
    __syncthreads();
    if (!valid || pos < j0) continue;
    const uint32_t n = min((uint32_t)N, pos - j0 + 1);
    for (uint32_t j = 0; j < n; ++j) {
      const float s = pair_sum(dot<H>(qr, ks + j * TL::S + half * TL::HS)) * scale;
      if (s > m) {
        const float c = expf(m - s);
        l *= c;
#pragma unroll
        for (int i = 0; i < H; ++i) acc[i] *= c;
        m = s;
      }
      const float p = expf(s - m);
      l += p;
      const float *vr = vs + j * TL::S + half * TL::HS;
#pragma unroll
      for (int i = 0; i < H; ++i) acc[i] = fmaf(p, vr[i], acc[i]);
    }
  }
  if (!valid) return;
  const float inv = 1.0f / l;
#pragma unroll
  for (int c = 0; c < H; ++c) y[row * D + half * H + c] = from_f32<T>(acc[c] * inv);
  if (half == 0) lse[row] = m + logf(l);
}

// dq and delta_i = dy_i·y_i. Same grid as the forward.
template <typename T, int D>
__device__ void attn_dq(const T *q, const T *k, const T *v, const T *y, const T *dy,
                        const float *lse, float *delta, T *dq, uint32_t t, uint32_t rows,
                        float scale) {
  using TL = Tile<D>;
  constexpr int N = TL::N, H = TL::H;
  __shared__ __align__(16) float ks[N * TL::S];
  __shared__ __align__(16) float vs[N * TL::S];
  const uint32_t g = blockIdx.y, tiles = (t + N - 1) / N;
  const uint32_t head = blockIdx.x / tiles, p0 = (blockIdx.x % tiles) * N;
  const uint32_t half = threadIdx.x % 2, pos = p0 + threadIdx.x / 2;
  const bool valid = pos < t;
  const uint64_t row = (uint64_t)g * rows + (uint64_t)head * t + pos;
  const T *kg = k + (uint64_t)g * t * D, *vg = v + (uint64_t)g * t * D;
  float qr[H], dyr[H], acc[H];
  float li = 0.0f, di = 0.0f;
#pragma unroll
  for (int c = 0; c < H; ++c) acc[c] = 0.0f;
  if (valid) {
    load_half<T, D>(qr, q + row * D, half);
    load_half<T, D>(dyr, dy + row * D, half);
    float yr[H];
    load_half<T, D>(yr, y + row * D, half);
    di = pair_sum(dot<H>(dyr, yr));
    li = lse[row];
    if (half == 0) delta[row] = di;
  }
  const uint32_t last = min(t - 1, p0 + N - 1);
  for (uint32_t j0 = 0; j0 <= last; j0 += N) {
    __syncthreads();
    load_tile<T, D>(ks, kg + (uint64_t)j0 * D, min((uint32_t)N, t - j0));
    load_tile<T, D>(vs, vg + (uint64_t)j0 * D, min((uint32_t)N, t - j0));
    __syncthreads();
    if (!valid || pos < j0) continue;
    const uint32_t n = min((uint32_t)N, pos - j0 + 1);
    for (uint32_t j = 0; j < n; ++j) {
      const float *kr = ks + j * TL::S + half * TL::HS;
      const float s = pair_sum(dot<H>(qr, kr)) * scale;
      const float p = expf(s - li);
      const float dp = pair_sum(dot<H>(dyr, vs + j * TL::S + half * TL::HS));
      const float ds = p * (dp - di);
#pragma unroll
      for (int c = 0; c < H; ++c) acc[c] = fmaf(ds, kr[c], acc[c]);
    }
  }
  if (!valid) return;
#pragma unroll
  for (int c = 0; c < H; ++c) dq[row * D + half * H + c] = from_f32<T>(acc[c] * scale);
}

// dk and dv of one query head: one pair of threads per key; grid (ceil(t / N), groups, rep),
// block 2N threads. Rows of head blockIdx.z stream through shared memory, positions from the
// block's first key on. Each head writes its own f32 partial sums (dkp, dvp: [rep, groups, t, D]),
// which `attn_sum_heads` adds in head order: splitting by head gives the GPU rep times more
// blocks than one block per key tile would.
template <typename T, int D>
__device__ void attn_dkdv(const T *q, const T *k, const T *v, const T *dy, const float *lse,
                          const float *delta, float *dkp, float *dvp, uint32_t t, uint32_t rows,
                          float scale) {
  using TL = Tile<D>;
  constexpr int N = TL::N, H = TL::H;
  __shared__ __align__(16) float qs[N * TL::S];
  __shared__ __align__(16) float dys[N * TL::S];
  __shared__ float ls[N], deltas[N];
  const uint32_t g = blockIdx.y, j0 = blockIdx.x * N, head = blockIdx.z;
  const uint32_t half = threadIdx.x % 2, j = j0 + threadIdx.x / 2;
  const bool valid = j < t;
  const uint64_t key = (uint64_t)g * t + j;
  float kr[H], vr[H], dka[H], dva[H];
#pragma unroll
  for (int c = 0; c < H; ++c) dka[c] = dva[c] = 0.0f;
  if (valid) {
    load_half<T, D>(kr, k + key * D, half);
    load_half<T, D>(vr, v + key * D, half);
  }
  for (uint32_t p0 = j0; p0 < t; p0 += N) {
    const uint32_t n = min((uint32_t)N, t - p0);
    const uint64_t r0 = (uint64_t)g * rows + (uint64_t)head * t + p0;
    __syncthreads();
    load_tile<T, D>(qs, q + r0 * D, n);
    load_tile<T, D>(dys, dy + r0 * D, n);
    for (uint32_t i = threadIdx.x; i < N; i += blockDim.x) {
      ls[i] = i < n ? lse[r0 + i] : 0.0f;
      deltas[i] = i < n ? delta[r0 + i] : 0.0f;
    }
    __syncthreads();
    if (!valid) continue;
    // Rows before position j do not see key j.
    const uint32_t first = j > p0 ? j - p0 : 0;
    for (uint32_t i = first; i < n; ++i) {
      const float *qi = qs + i * TL::S + half * TL::HS;
      const float *dyi = dys + i * TL::S + half * TL::HS;
      const float s = pair_sum(dot<H>(qi, kr)) * scale;
      const float p = expf(s - ls[i]);
      const float dp = pair_sum(dot<H>(dyi, vr));
      const float dsv = p * (dp - deltas[i]);
#pragma unroll
      for (int c = 0; c < H; ++c) {
        dva[c] = fmaf(p, dyi[c], dva[c]);
        dka[c] = fmaf(dsv, qi[c], dka[c]);
      }
    }
  }
  if (!valid) return;
  const uint64_t base = (uint64_t)head * gridDim.y * t * D + key * D + half * H;
#pragma unroll
  for (int c = 0; c < H; ++c) {
    dkp[base + c] = dka[c] * scale;
    dvp[base + c] = dva[c];
  }
}

// out[i] = Σ_h part[h · n + i], heads in order.
template <typename T>
__device__ void attn_sum_heads(const float *part, T *out, uint64_t n, uint32_t rep) {
  const uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  float s = 0.0f;
  for (uint32_t h = 0; h < rep; ++h) s += part[h * n + i];
  out[i] = from_f32<T>(s);
}

#define ATTN(D, SUFFIX, T)                                                                       \
  extern "C" __global__ void attn_fwd_d##D##_##SUFFIX(const T *q, const T *k, const T *v, T *y, \
                                                      float *lse, uint32_t t, uint32_t rows,    \
                                                      float scale) {                            \
    attn_fwd<T, D>(q, k, v, y, lse, t, rows, scale);                                            \
  }                                                                                              \
  extern "C" __global__ void attn_dq_d##D##_##SUFFIX(                                           \
      const T *q, const T *k, const T *v, const T *y, const T *dy, const float *lse,            \
      float *delta, T *dq, uint32_t t, uint32_t rows, float scale) {                            \
    attn_dq<T, D>(q, k, v, y, dy, lse, delta, dq, t, rows, scale);                              \
  }                                                                                              \
  extern "C" __global__ void attn_dkdv_d##D##_##SUFFIX(                                         \
      const T *q, const T *k, const T *v, const T *dy, const float *lse, const float *delta,    \
      float *dkp, float *dvp, uint32_t t, uint32_t rows, float scale) {                         \
    attn_dkdv<T, D>(q, k, v, dy, lse, delta, dkp, dvp, t, rows, scale);                         \
  }

#define ATTN_ALL(D)                                                                              \
  ATTN(D, f32, float)                                                                            \
  ATTN(D, bf16, __nv_bfloat16)                                                                   \
  ATTN(D, f16, __half)

#define SUM_HEADS(SUFFIX, T)                                                                     \
  extern "C" __global__ void attn_sum_heads_##SUFFIX(const float *part, T *out, uint64_t n,      \
                                                     uint32_t rep) {                             \
    attn_sum_heads<T>(part, out, n, rep);                                                        \
  }

SUM_HEADS(f32, float)
SUM_HEADS(bf16, __nv_bfloat16)
SUM_HEADS(f16, __half)

ATTN_ALL(8)
ATTN_ALL(16)
ATTN_ALL(32)
ATTN_ALL(64)
ATTN_ALL(128)

// ---- The score-matrix variant: cuBLAS products around two row kernels (attention.rs,
// `forward_gemm` / `backward_gemm`), for lengths where [rows, t] scores fit in memory. Scores
// are [groups · rows, t]; global row r is at position r % t (rows = rep · t per group).

// In place: s <- softmax(scale · s) over the visible columns 0..=i, zeros after. One warp per row.
template <typename T>
__device__ void softmax_rows(T *s, uint64_t nrows, uint32_t t, float scale) {
  const uint64_t row = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (row >= nrows) return;
  const uint32_t i = (uint32_t)(row % t);
  T *sr = s + row * t;
  float m = -INFINITY;
  for (uint32_t j = lane; j <= i; j += 32) m = fmaxf(m, to_f32(sr[j]) * scale);
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float sum = 0.0f;
  for (uint32_t j = lane; j <= i; j += 32) sum += expf(to_f32(sr[j]) * scale - m);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float inv = 1.0f / sum;
  for (uint32_t j = lane; j < t; j += 32)
    sr[j] = from_f32<T>(j <= i ? expf(to_f32(sr[j]) * scale - m) * inv : 0.0f);
}

// In place: dp <- p ∘ (dp - Σ_j p_j dp_j) · scale, the gradient w.r.t. the unscaled scores.
template <typename T>
__device__ void softmax_grad_rows(const T *p, T *dp, uint64_t nrows, uint32_t t, float scale) {
  const uint64_t row = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (row >= nrows) return;
  const uint32_t i = (uint32_t)(row % t);
  const T *pr = p + row * t;
  T *dr = dp + row * t;
  float delta = 0.0f;
  for (uint32_t j = lane; j <= i; j += 32) delta = fmaf(to_f32(pr[j]), to_f32(dr[j]), delta);
  for (int o = 16; o > 0; o >>= 1) delta += __shfl_xor_sync(0xffffffffu, delta, o);
  for (uint32_t j = lane; j < t; j += 32)
    dr[j] = from_f32<T>(j <= i ? to_f32(pr[j]) * (to_f32(dr[j]) - delta) * scale : 0.0f);
}

// The same two row kernels with the row in registers: one warp per row, lanes own 16-byte
// chunks (t a multiple of 16 / sizeof(T), at most 32 * C chunks), one read and one write of the
// row instead of three passes. Chunks past the causal limit are never read.
template <typename T, int C>
__device__ void softmax_rows_reg(T *s, uint64_t nrows, uint32_t t, float scale) {
  constexpr uint32_t N = 16 / sizeof(T);
  const uint64_t row = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (row >= nrows) return;
  const uint32_t i = (uint32_t)(row % t), chunks = t / N;
  T *sr = s + row * t;
  float v[C][N];
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t c = lane + 32 * k;
    if (c < chunks && c * N <= i) {
      const uint4 u = *reinterpret_cast<const uint4 *>(sr + c * N);
      const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
      for (uint32_t j = 0; j < N; ++j) {
        v[k][j] = to_f32(e[j]) * scale;
        if (c * N + j <= i) m = fmaxf(m, v[k][j]);
      }
    }
  }
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t c = lane + 32 * k;
    if (c < chunks && c * N <= i) {
#pragma unroll
      for (uint32_t j = 0; j < N; ++j) {
        v[k][j] = c * N + j <= i ? expf(v[k][j] - m) : 0.0f;
        sum += v[k][j];
      }
    }
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float inv = 1.0f / sum;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t c = lane + 32 * k;
    if (c < chunks) {
      uint4 u;
      T *e = reinterpret_cast<T *>(&u);
      const bool live = c * N <= i;
#pragma unroll
      for (uint32_t j = 0; j < N; ++j) e[j] = from_f32<T>(live ? v[k][j] * inv : 0.0f);
      *reinterpret_cast<uint4 *>(sr + c * N) = u;
    }
  }
}

template <typename T, int C>
__device__ void softmax_grad_rows_reg(const T *p, T *dp, uint64_t nrows, uint32_t t, float scale) {
  constexpr uint32_t N = 16 / sizeof(T);
  const uint64_t row = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (row >= nrows) return;
  const uint32_t i = (uint32_t)(row % t), chunks = t / N;
  const T *pr = p + row * t;
  T *dr = dp + row * t;
  float pv[C][N], dv[C][N];
  float delta = 0.0f;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t c = lane + 32 * k;
    if (c < chunks && c * N <= i) {
      const uint4 a = *reinterpret_cast<const uint4 *>(pr + c * N);
      const uint4 b = *reinterpret_cast<const uint4 *>(dr + c * N);
      const T *ea = reinterpret_cast<const T *>(&a), *eb = reinterpret_cast<const T *>(&b);
#pragma unroll
      for (uint32_t j = 0; j < N; ++j) {
        pv[k][j] = to_f32(ea[j]);
        dv[k][j] = to_f32(eb[j]);
        if (c * N + j <= i) delta = fmaf(pv[k][j], dv[k][j], delta);
      }
    }
  }
  for (int o = 16; o > 0; o >>= 1) delta += __shfl_xor_sync(0xffffffffu, delta, o);
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const uint32_t c = lane + 32 * k;
    if (c < chunks) {
      uint4 u;
      T *e = reinterpret_cast<T *>(&u);
      const bool live = c * N <= i;
#pragma unroll
      for (uint32_t j = 0; j < N; ++j)
        e[j] = from_f32<T>(live && c * N + j <= i ? pv[k][j] * (dv[k][j] - delta) * scale : 0.0f);
      *reinterpret_cast<uint4 *>(dr + c * N) = u;
    }
  }
}

#define SOFTMAX_ROWS_REG(SUFFIX, T)                                                              \
  extern "C" __global__ void attn_softmax_rows_reg_##SUFFIX(T *s, uint64_t nrows, uint32_t t,    \
                                                            float scale) {                       \
    softmax_rows_reg<T, 4>(s, nrows, t, scale);                                                  \
  }                                                                                              \
  extern "C" __global__ void attn_softmax_grad_rows_reg_##SUFFIX(                                \
      const T *p, T *dp, uint64_t nrows, uint32_t t, float scale) {                              \
    softmax_grad_rows_reg<T, 4>(p, dp, nrows, t, scale);                                         \
  }

SOFTMAX_ROWS_REG(f32, float)
SOFTMAX_ROWS_REG(bf16, __nv_bfloat16)
SOFTMAX_ROWS_REG(f16, __half)

#define SOFTMAX_ROWS(SUFFIX, T)                                                                  \
  extern "C" __global__ void attn_softmax_rows_##SUFFIX(T *s, uint64_t nrows, uint32_t t,        \
                                                        float scale) {                           \
    softmax_rows<T>(s, nrows, t, scale);                                                         \
  }                                                                                              \
  extern "C" __global__ void attn_softmax_grad_rows_##SUFFIX(const T *p, T *dp, uint64_t nrows,  \
                                                             uint32_t t, float scale) {          \
    softmax_grad_rows<T>(p, dp, nrows, t, scale);                                                \
  }

SOFTMAX_ROWS(f32, float)
SOFTMAX_ROWS(bf16, __nv_bfloat16)
SOFTMAX_ROWS(f16, __half)
