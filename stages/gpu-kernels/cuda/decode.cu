// One step of batched decoding (model's decode.rs on a GPU): every slot of the batch advances by
// one token, so each matrix product has a handful of rows and each step reads every weight once.
// At batch 1 the step is bound by memory bandwidth, and by the launches of the many small ops
// between the products; these kernels read the weights at full speed and fold the small ops in.
//
// - `decode_gemv_*`: y[s, n] = x[s, k] · W[n, k]ᵀ for few rows s, one warp per output column with
//   16-byte weight loads, f32 sums. Optional prologue: RMSNorm of x (its weight multiplies x, the
//   1 / rms scale multiplies the finished dot product, so no normalized copy of x is stored).
//   Optional epilogues: + residual, SwiGLU over a stacked [gate; up] weight, f32 output.
// - `decode_attn_*`: from the fused qkv projection, RoPE of q and k at each slot's position, k and
//   v stored into the caches there, then the slot's query heads against its cache prefix 0..=pos
//   (pos read on the device: the launch shape stays fixed for CUDA graphs while only live keys
//   are read), online f32 softmax, the query heads of one KV head sharing each K/V tile. Long
//   caches split over blocks (`decode_attn_combine_*` merges the partial softmaxes).
//
// Programmatic dependent launch: launched with that attribute, a kernel may start once every
// block of the one before it has started (each calls `release_next` first). It reads only
// constant data (weights) before `wait_previous`, which returns once the previous kernel has
// finished, and writes only after it; so the next GEMV's weights stream in while this kernel
// ends, and no launch gap separates them. Since every kernel waits for its predecessor before
// it finishes, each wait also covers all earlier kernels. Launched without the attribute,
// `wait_previous` and `release_next` do nothing.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// The eight values of a 16-byte vector as f32.
__device__ __forceinline__ void unpack8(const uint4 &u, float *f, __nv_bfloat16) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack8(const uint4 &u, float *f, __half) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], 4);
    const float2 p = __half22float2(h);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

// Weights are read once per step: bypass L1 so that x and the caches stay there.
__device__ __forceinline__ uint4 load_weights(const void *p) {
  uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

__device__ __forceinline__ uint4 load16(const void *p) {
  return __ldg(reinterpret_cast<const uint4 *>(p));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Waits until the previous kernel in the stream has finished and its writes are visible.
__device__ __forceinline__ void wait_previous() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
// The same, once `dep` (computed from loaded values) is known: ptxas would otherwise hoist the
// wait above loads of constant data issued before it, and nothing would overlap. The wait runs
// on either branch.
__device__ __forceinline__ void wait_previous_after(uint32_t dep) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.u32 p, %0, 0;\n @p griddepcontrol.wait;\n"
      " @!p griddepcontrol.wait;\n}" ::"r"(dep)
      : "memory");
}
// Lets the next kernel in the stream start launching.
__device__ __forceinline__ void release_next() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// ---------------------------------------------------------------------------------------------
// GEMV. grid ceil(n / warps per block), any block size that is a multiple of 32. Warp c computes
// output column c for all S rows; lane i reads 16-byte chunks i, i + 32, ... of the weight row,
// U of them in flight before any is used (the first U before waiting for the previous kernel, and
// arrived before that wait ends, so that the product starts at full speed).
// W is [n, k] (SWIGLU: [2n, k], gate rows then up rows), k a multiple of 8, w, x and g 16-byte
// aligned. res may be out itself (each output reads only its own residual).
//   out[s, c] = epi(rstd_s · Σ_j W[c, j] g[j] x[s, j])   (rstd_s = 1 without NORM, g = 1 too)
//   epi: SWIGLU silu(gate) · up; then + res[s, c] when res is given.
// Each output's sum runs in the same order whatever S is, so a slot's result does not depend on
// the rest of the batch.
template <typename T, int R, int U>
__device__ __forceinline__ void load_round(uint4 (&wv)[R][U], const T *const (&rows)[R],
                                           uint32_t c0, uint32_t chunks) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const uint32_t c = c0 + 32 * u;
#pragma unroll
    for (int r = 0; r < R; ++r)
      wv[r][u] = c < chunks ? load_weights(rows[r] + 8 * c) : make_uint4(0, 0, 0, 0);
  }
}

template <typename T, int S, bool SWIGLU, bool NORM, int U = 8>
__device__ void gemv(const T *__restrict__ w, const T *__restrict__ x, const T *__restrict__ g,
                     const T *res, void *out, uint32_t n, uint32_t k, float eps,
                     uint32_t out_f32) {
  constexpr int R = SWIGLU ? 2 : 1;
  const uint32_t col = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (col >= n) return;
  const T *rows[R];
  rows[0] = w + (uint64_t)col * k;
  if (SWIGLU) rows[R - 1] = w + (uint64_t)(col + n) * k;
  const uint32_t chunks = k / 8;
  release_next();
  float acc[R][S], ss[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    ss[s] = 0.0f;
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r][s] = 0.0f;
  }
  uint4 wv[R][U];
  load_round<T, R, U>(wv, rows, lane, chunks);
  uint32_t dep = 0;
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int r = 0; r < R; ++r) dep |= wv[r][u].x;
  wait_previous_after(dep);
  for (uint32_t c0 = lane; c0 < chunks; c0 += 32 * U) {
    if (c0 != lane) load_round<T, R, U>(wv, rows, c0, chunks);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint32_t c = c0 + 32 * u;
      if (c >= chunks) break;
      float wf[R][8], gf[8];
#pragma unroll
      for (int r = 0; r < R; ++r) unpack8(wv[r][u], wf[r], T());
      if (NORM) unpack8(load16(g + 8 * c), gf, T());
#pragma unroll
      for (int s = 0; s < S; ++s) {
        float xf[8];
        unpack8(load16(x + (uint64_t)s * k + 8 * c), xf, T());
        if (NORM) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            ss[s] = fmaf(xf[i], xf[i], ss[s]);
            xf[i] *= gf[i];
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[r][s] = fmaf(wf[r][i], xf[i], acc[r][s]);
      }
    }
  }
#pragma unroll
  for (int s = 0; s < S; ++s) {
    if (NORM) ss[s] = warp_sum(ss[s]);
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r][s] = warp_sum(acc[r][s]);
  }
  // Lane s writes row s (compile-time indices keep acc in registers).
#pragma unroll
  for (int s = 0; s < S; ++s) {
    if (lane != s) continue;
    const float rstd = NORM ? rsqrtf(ss[s] / (float)k + eps) : 1.0f;
    float v = acc[0][s] * rstd;
    if (SWIGLU) {
      const float up = acc[R - 1][s] * rstd;
      v = v / (1.0f + expf(-v)) * up;
    }
    const uint64_t o = (uint64_t)s * n + col;
    if (res) v += to_f32(res[o]);
    if (out_f32)
      static_cast<float *>(out)[o] = v;
    else
      static_cast<T *>(out)[o] = from_f32<T>(v);
  }
}

// ---------------------------------------------------------------------------------------------
// 4-bit GEMV: as `gemv`, with W held as its codes. W is [n, k / 2] bytes in blocks of 32 codes
// (16 bytes: byte j holds code j + 8 in its low nibble and code j + 16 + 8 in its high one, the
// layout of model's lowbit::PackedLinear) and scales f32 [n, groups], one per `group_blocks`
// blocks along a row. k is a multiple of 32. Each lane takes whole blocks (16-byte loads, 32
// codes): block sums are scaled once, so a weight costs a nibble extract and an FMA.
template <typename T, int R, int U>
__device__ __forceinline__ void load_round_q4(uint4 (&wv)[R][U], const uint8_t *const (&rows)[R],
                                              uint32_t b0, uint32_t blocks) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const uint32_t b = b0 + 32 * u;
#pragma unroll
    for (int r = 0; r < R; ++r)
      wv[r][u] = b < blocks ? load_weights(rows[r] + 16 * b) : make_uint4(0, 0, 0, 0);
  }
}

// Σ_i code_i · x_i over one block of 32 codes.
__device__ __forceinline__ float q4_block_dot(const uint4 &wv, const float *xf) {
  const uint32_t w[4] = {wv.x, wv.y, wv.z, wv.w};
  float d = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int lo = (int)((w[i] >> (8 * q)) & 0xfu) - 8;
      const int hi = (int)((w[i] >> (8 * q + 4)) & 0xfu) - 8;
      d = fmaf((float)lo, xf[4 * i + q], d);
      d = fmaf((float)hi, xf[16 + 4 * i + q], d);
    }
  return d;
}

template <typename T, int S, bool SWIGLU, bool NORM, int U = 4>
__device__ void gemv_q4(const uint8_t *__restrict__ w, const float *__restrict__ scales,
                        const T *__restrict__ x, const T *__restrict__ g, const T *res, void *out,
                        uint32_t n, uint32_t k, uint32_t groups, uint32_t group_blocks, float eps,
                        uint32_t out_f32) {
  constexpr int R = SWIGLU ? 2 : 1;
  const uint32_t col = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (col >= n) return;
  const uint8_t *rows[R];
  const float *srow[R];
  rows[0] = w + (uint64_t)col * (k / 2);
  srow[0] = scales + (uint64_t)col * groups;
  if (SWIGLU) {
    rows[R - 1] = w + (uint64_t)(col + n) * (k / 2);
    srow[R - 1] = scales + (uint64_t)(col + n) * groups;
  }
  const uint32_t blocks = k / 32;
  release_next();
  float acc[R][S], ss[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    ss[s] = 0.0f;
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r][s] = 0.0f;
  }
  uint4 wv[R][U];
  load_round_q4<T, R, U>(wv, rows, lane, blocks);
  uint32_t dep = 0;
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int r = 0; r < R; ++r) dep |= wv[r][u].x;
  wait_previous_after(dep);
  for (uint32_t b0 = lane; b0 < blocks; b0 += 32 * U) {
    if (b0 != lane) load_round_q4<T, R, U>(wv, rows, b0, blocks);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint32_t b = b0 + 32 * u;
      if (b >= blocks) break;
      float sc[R], gf[32];
#pragma unroll
      for (int r = 0; r < R; ++r) sc[r] = __ldg(srow[r] + b / group_blocks);
      if (NORM)
#pragma unroll
        for (int i = 0; i < 4; ++i) unpack8(load16(g + 32 * b + 8 * i), gf + 8 * i, T());
#pragma unroll
      for (int s = 0; s < S; ++s) {
        float xf[32];
#pragma unroll
        for (int i = 0; i < 4; ++i)
          unpack8(load16(x + (uint64_t)s * k + 32 * b + 8 * i), xf + 8 * i, T());
        if (NORM) {
#pragma unroll
          for (int i = 0; i < 32; ++i) {
            ss[s] = fmaf(xf[i], xf[i], ss[s]);
            xf[i] *= gf[i];
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][s] = fmaf(sc[r], q4_block_dot(wv[r][u], xf), acc[r][s]);
      }
    }
  }
#pragma unroll
  for (int s = 0; s < S; ++s) {
    if (NORM) ss[s] = warp_sum(ss[s]);
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r][s] = warp_sum(acc[r][s]);
  }
#pragma unroll
  for (int s = 0; s < S; ++s) {
    if (lane != s) continue;
    const float rstd = NORM ? rsqrtf(ss[s] / (float)k + eps) : 1.0f;
    float v = acc[0][s] * rstd;
    if (SWIGLU) {
      const float up = acc[R - 1][s] * rstd;
      v = v / (1.0f + expf(-v)) * up;
    }
    const uint64_t o = (uint64_t)s * n + col;
    if (res) v += to_f32(res[o]);
    if (out_f32)
      static_cast<float *>(out)[o] = v;
    else
      static_cast<T *>(out)[o] = from_f32<T>(v);
  }
}

// The dense [n, k] weight of a 4-bit one (for products with more rows than the GEMV takes:
// one projection at a time goes through a scratch buffer and cuBLAS). One thread per byte.
template <typename T>
__device__ void dequant_q4(const uint8_t *__restrict__ w, const float *__restrict__ scales,
                           T *__restrict__ out, uint32_t n, uint32_t k, uint32_t groups,
                           uint32_t group_blocks) {
  release_next();
  wait_previous();
  const uint64_t half_k = k / 2, total = (uint64_t)n * half_k;
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < total;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t row = i / half_k;
    const uint32_t bi = (uint32_t)(i % half_k), b = bi / 16, j = bi % 16;
    const float s = scales[row * groups + b / group_blocks];
    const uint32_t byte = w[i];
    T *o = out + row * k + 32 * b;
    o[j] = from_f32<T>((float)((int)(byte & 0xfu) - 8) * s);
    o[16 + j] = from_f32<T>((float)((int)(byte >> 4) - 8) * s);
  }
}

// ---------------------------------------------------------------------------------------------
// Attention of one decoding step, with RoPE and the cache write. qkv [s, (nh + 2 nkv) · HD] (q
// heads, k heads, v heads); cos, sin [positions, HD / 2] f32; caches [s, nkv, cap, HD]; slot i
// sees keys 0..=pos[i].
// grid (splits, nkv, s), block rep · 32 threads (rep = nh / nkv ≤ 32): warp r is query head
// kv_head · rep + r. Block (c, ·, ·) covers keys [c · chunk, (c + 1) · chunk), chunk a multiple
// of 32; the block whose range holds pos first stores the slot's new k (rotated) and v there.
// Keys go in tiles of 32 shared by the block's warps: lane j scores key j of the tile, then the
// warp folds the tile into its running max, sum and output (lanes over dims).
// One split writes out [s, nh · HD] directly; several write (output sum, max, sum of exps) per
// split to part [s, nh, splits, HD + 2] for `attn_combine`.
template <int HD> struct AttnTile {
  static constexpr int K = 32;                        // keys per tile
  static constexpr int VECS = HD / 8;                 // 16-byte vectors per row
  static constexpr int ROW = HD + 8;                  // padded shared row: no bank conflicts
  static constexpr int PER = HD >= 32 ? HD / 32 : 1;  // output dims per lane
};

// The rotated (a, b) = (x1 cos - x2 sin, x2 cos + x1 sin) of the pair (j, j + HD / 2).
__device__ __forceinline__ float2 rotate(float x1, float x2, float c, float s) {
  return make_float2(x1 * c - x2 * s, x2 * c + x1 * s);
}

// Low-bit caches (KVB = 8 or 4 bits; 0: the compute dtype): each token's K row (all KV heads,
// post-RoPE) and V row hold codes with one f32 scale per token and row, the trained K/V fake
// quantizer's (symmetric MinMax per token: scale = amax / qmax, code = round-half-even of
// clamp(x / scale, ±qmax)), so code · scale is what the student was trained to see. Caches
// [s, cap, nkv · HD · KVB / 8] bytes; 4-bit rows (nkv · HD a multiple of 32) pack blocks of 32
// codes as the weights do (byte j: code j + 8 low, code j + 16 + 8 high); scales [s, cap].
template <int KVB> struct KvCodes {
  static constexpr float QMAX = KVB == 8 ? 127.0f : 7.0f;
  // Byte offset of value i of a token row, and whether it sits in the high nibble.
  __device__ static __forceinline__ uint32_t byte_of(uint32_t i) {
    return KVB == 8 ? i : (i / 32) * 16 + (i % 16);
  }
  __device__ static __forceinline__ float code(float x, float scale) {
    return scale == 0.0f ? 0.0f : rintf(fminf(fmaxf(x / scale, -QMAX), QMAX));
  }
  // The 8 values 8c .. 8c + 7 of a row (8c a multiple of 8) times `scale`.
  __device__ static __forceinline__ void load8(const uint8_t *row, uint32_t i0, float scale,
                                               float *f) {
    const uint2 u = *reinterpret_cast<const uint2 *>(row + byte_of(i0));
    const uint32_t w[2] = {u.x, u.y};
    const bool high = KVB == 4 && (i0 % 32) >= 16;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t byte = (w[i / 4] >> (8 * (i % 4))) & 0xffu;
      const int c = KVB == 8 ? (int)(int8_t)byte : (int)((high ? byte >> 4 : byte) & 0xfu) - 8;
      f[i] = (float)c * scale;
    }
  }
};

// The rotated value at dim d of a head row (RoPE pairs (j, j + HD / 2)), rounded to T as the
// float cache stores it.
template <typename T, int HD>
__device__ __forceinline__ float rotated_at(const T *r, uint32_t d, const float *cp,
                                            const float *sp) {
  constexpr uint32_t HALF = HD / 2;
  const uint32_t j = d < HALF ? d : d - HALF;
  const float2 v = rotate(to_f32(r[j]), to_f32(r[j + HALF]), cp[j], sp[j]);
  return to_f32(from_f32<T>(d < HALF ? v.x : v.y));
}

// Largest |value| over the block's threads (every thread gets it).
__device__ __forceinline__ float block_max(float v, float *red) {
  v = warp_max(v);
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = lane < warps ? red[lane] : 0.0f;
  return warp_max(m);
}

// The caches are written and read by the same kernel: plain loads (not the read-only path).
template <typename T, int HD, int KVB>
__device__ void attn(const T *__restrict__ qkv, const float *__restrict__ cos,
                     const float *__restrict__ sin, const uint32_t *__restrict__ pos,
                     void *k_cache, void *v_cache, float *k_scale, float *v_scale,
                     T *__restrict__ out, float *__restrict__ part, uint32_t nh, uint32_t nkv,
                     uint32_t cap, uint32_t chunk) {
  using TL = AttnTile<HD>;
  constexpr int HALF = HD / 2;
  __shared__ __align__(16) T ks[TL::K * TL::ROW];
  __shared__ __align__(16) T vs[TL::K * TL::ROW];
  __shared__ __align__(16) float qs[32][HD];
  __shared__ float red[32];
  const uint32_t split = blockIdx.x, kvh = blockIdx.y, slot = blockIdx.z;
  const uint32_t rep = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t head = kvh * rep + warp;
  release_next();
  wait_previous();
  const uint32_t p = pos[slot];
  const uint32_t len = p + 1, start = split * chunk;
  if (start >= len) return;  // the whole block: this split lies past the slot's position
  const uint32_t end = min(start + chunk, len);
  const float *cp = cos + (uint64_t)p * HALF, *sp = sin + (uint64_t)p * HALF;
  const T *row = qkv + (uint64_t)slot * (nh + 2 * nkv) * HD;
  const float scale = rsqrtf((float)HD);
  for (uint32_t j = lane; j < HALF; j += 32) {
    const T *qr = row + (uint64_t)head * HD;
    const float2 r = rotate(to_f32(qr[j]), to_f32(qr[j + HALF]), cp[j], sp[j]);
    qs[warp][j] = r.x * scale;
    qs[warp][j + HALF] = r.y * scale;
  }
  // Float caches: [s, nkv, cap, HD] in T. Code caches: see KvCodes.
  const uint64_t base = ((uint64_t)slot * nkv + kvh) * cap * HD;
  T *kb = static_cast<T *>(k_cache) + base, *vb = static_cast<T *>(v_cache) + base;
  const uint32_t row_bytes = nkv * HD * (KVB == 0 ? 8 : KVB) / 8;
  uint8_t *kc = static_cast<uint8_t *>(k_cache) + (uint64_t)slot * cap * row_bytes;
  uint8_t *vc = static_cast<uint8_t *>(v_cache) + (uint64_t)slot * cap * row_bytes;
  const T *kr = row + (uint64_t)(nh + kvh) * HD, *vr = row + (uint64_t)(nh + nkv + kvh) * HD;
  if (KVB == 0 && p < end) {
    // This block's range holds the new position: store k (warp 0) and v (the last warp).
    for (uint32_t j = lane; j < HALF; j += 32) {
      if (warp == 0) {
        const float2 r = rotate(to_f32(kr[j]), to_f32(kr[j + HALF]), cp[j], sp[j]);
        kb[(uint64_t)p * HD + j] = from_f32<T>(r.x);
        kb[(uint64_t)p * HD + j + HALF] = from_f32<T>(r.y);
      }
      if (warp == rep - 1) {
        vb[(uint64_t)p * HD + j] = vr[j];
        vb[(uint64_t)p * HD + j + HALF] = vr[j + HALF];
      }
    }
  }
  if (KVB != 0 && p < end) {
    // The token's scales span every KV head: each block holding p finds them (the same
    // values), and stores its own head's codes.
    float ka = 0.0f, va = 0.0f;
    for (uint32_t i = threadIdx.x; i < nkv * HD; i += blockDim.x) {
      const uint32_t h = i / HD, d = i % HD;
      ka = fmaxf(ka, fabsf(rotated_at<T, HD>(row + (uint64_t)(nh + h) * HD, d, cp, sp)));
      va = fmaxf(va, fabsf(to_f32(row[(uint64_t)(nh + nkv + h) * HD + d])));
    }
    const float k_s = block_max(ka, red) / KvCodes<KVB>::QMAX;
    const float v_s = block_max(va, red) / KvCodes<KVB>::QMAX;
    // Every block holding p writes the whole row, all heads (the same bytes): 4-bit bytes pair
    // values 16 apart, which span two heads when HD < 32.
    uint8_t *kp = kc + (uint64_t)p * row_bytes, *vp = vc + (uint64_t)p * row_bytes;
    const T *krow = row + (uint64_t)nh * HD, *vrow = row + (uint64_t)(nh + nkv) * HD;
    auto kval = [&](uint32_t i) {
      return rotated_at<T, HD>(krow + (uint64_t)(i / HD) * HD, i % HD, cp, sp);
    };
    if (KVB == 8) {
      for (uint32_t i = threadIdx.x; i < nkv * HD; i += blockDim.x) {
        kp[i] = (uint8_t)(int8_t)KvCodes<KVB>::code(kval(i), k_s);
        vp[i] = (uint8_t)(int8_t)KvCodes<KVB>::code(to_f32(vrow[i]), v_s);
      }
    } else {
      for (uint32_t at = threadIdx.x; at < row_bytes; at += blockDim.x) {
        const uint32_t i = (at / 16) * 32 + at % 16;  // byte `at` holds values i and i + 16
        const int k0 = (int)KvCodes<KVB>::code(kval(i), k_s) + 8;
        const int k1 = (int)KvCodes<KVB>::code(kval(i + 16), k_s) + 8;
        const int v0 = (int)KvCodes<KVB>::code(to_f32(vrow[i]), v_s) + 8;
        const int v1 = (int)KvCodes<KVB>::code(to_f32(vrow[i + 16]), v_s) + 8;
        kp[at] = (uint8_t)(k0 | (k1 << 4));
        vp[at] = (uint8_t)(v0 | (v1 << 4));
      }
    }
    if (threadIdx.x == 0) {
      k_scale[(uint64_t)slot * cap + p] = k_s;
      v_scale[(uint64_t)slot * cap + p] = v_s;
    }
  }

  float m = -INFINITY, l = 0.0f, acc[TL::PER];
#pragma unroll
  for (int i = 0; i < TL::PER; ++i) acc[i] = 0.0f;
  for (uint32_t t0 = start; t0 < end; t0 += TL::K) {
    const uint32_t n = min((uint32_t)TL::K, end - t0);
    // The previous tile is consumed; the first time, qs and the new cache row are written.
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < TL::K * TL::VECS; i += blockDim.x) {
      const uint32_t r = i / TL::VECS, c = i % TL::VECS;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = kv;
      if (r < n && KVB == 0) {
        const uint64_t o = (uint64_t)(t0 + r) * HD + 8 * c;
        kv = *reinterpret_cast<const uint4 *>(kb + o);
        vv = *reinterpret_cast<const uint4 *>(vb + o);
      }
      if (r < n && KVB != 0) {
        // Dequantized into the tile in T, as the float cache holds values.
        const uint64_t t = t0 + r;
        float kf[8], vf[8];
        KvCodes<KVB>::load8(kc + t * row_bytes, kvh * HD + 8 * c, k_scale[slot * cap + t], kf);
        KvCodes<KVB>::load8(vc + t * row_bytes, kvh * HD + 8 * c, v_scale[slot * cap + t], vf);
        T kt[8], vt[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          kt[e] = from_f32<T>(kf[e]);
          vt[e] = from_f32<T>(vf[e]);
        }
        memcpy(&kv, kt, 16);
        memcpy(&vv, vt, 16);
      }
      *reinterpret_cast<uint4 *>(&ks[r * TL::ROW + 8 * c]) = kv;
      *reinterpret_cast<uint4 *>(&vs[r * TL::ROW + 8 * c]) = vv;
    }
    __syncthreads();
    float sc = -INFINITY;
    if (lane < n) {
      sc = 0.0f;
#pragma unroll
      for (int c = 0; c < TL::VECS; ++c) {
        float kf[8];
        unpack8(*reinterpret_cast<const uint4 *>(&ks[lane * TL::ROW + 8 * c]), kf, T());
#pragma unroll
        for (int i = 0; i < 8; ++i) sc = fmaf(qs[warp][8 * c + i], kf[i], sc);
      }
    }
    const float m_new = fmaxf(m, warp_max(sc));  // finite: key 0 of the tile is live
    const float e = lane < n ? expf(sc - m_new) : 0.0f;
    const float corr = expf(m - m_new);
    l = l * corr + warp_sum(e);
#pragma unroll
    for (int i = 0; i < TL::PER; ++i) acc[i] *= corr;
    for (uint32_t j = 0; j < n; ++j) {
      const float ej = __shfl_sync(0xffffffffu, e, j);
#pragma unroll
      for (int i = 0; i < TL::PER; ++i) {
        const uint32_t d = lane + 32 * i;
        if (d < HD) acc[i] = fmaf(ej, to_f32(vs[j * TL::ROW + d]), acc[i]);
      }
    }
    m = m_new;
  }
  if (gridDim.x == 1) {
    T *o = out + ((uint64_t)slot * nh + head) * HD;
#pragma unroll
    for (int i = 0; i < TL::PER; ++i) {
      const uint32_t d = lane + 32 * i;
      if (d < HD) o[d] = from_f32<T>(acc[i] / l);
    }
  } else {
    float *o = part + (((uint64_t)slot * nh + head) * gridDim.x + split) * (HD + 2);
#pragma unroll
    for (int i = 0; i < TL::PER; ++i) {
      const uint32_t d = lane + 32 * i;
      if (d < HD) o[d] = acc[i];
    }
    if (lane == 0) {
      o[HD] = m;
      o[HD + 1] = l;
    }
  }
}

// grid (nh, s), block 32 threads: merges the live splits (those starting at or before pos).
template <typename T, int HD>
__device__ void attn_combine(const float *__restrict__ part, const uint32_t *__restrict__ pos,
                             T *__restrict__ out, uint32_t nh, uint32_t splits, uint32_t chunk) {
  constexpr int PER = AttnTile<HD>::PER;
  const uint32_t head = blockIdx.x, slot = blockIdx.y, lane = threadIdx.x;
  release_next();
  wait_previous();
  const uint32_t live = min(pos[slot] / chunk + 1, splits);
  const float *p = part + ((uint64_t)slot * nh + head) * splits * (HD + 2);
  float m = -INFINITY;
  for (uint32_t c = 0; c < live; ++c) m = fmaxf(m, p[c * (HD + 2) + HD]);
  float l = 0.0f, acc[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) acc[i] = 0.0f;
  for (uint32_t c = 0; c < live; ++c) {
    const float *pc = p + c * (HD + 2);
    const float f = expf(pc[HD] - m);
    l = fmaf(pc[HD + 1], f, l);
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const uint32_t d = lane + 32 * i;
      if (d < HD) acc[i] = fmaf(pc[d], f, acc[i]);
    }
  }
  T *o = out + ((uint64_t)slot * nh + head) * HD;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const uint32_t d = lane + 32 * i;
    if (d < HD) o[d] = from_f32<T>(acc[i] / l);
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points. GEMV names: decode_gemv_{plain|swiglu}_{norm|bare}_s{S}_{dtype}.

#define GEMV(S, EPI, SWIGLU, NRM, NORM, SUFFIX, T)                                               \
  extern "C" __global__ void decode_gemv_##EPI##_##NRM##_s##S##_##SUFFIX(                        \
      const T *w, const T *x, const T *g, const T *res, void *out, uint32_t n, uint32_t k,       \
      float eps, uint32_t out_f32) {                                                             \
    gemv<T, S, SWIGLU, NORM>(w, x, g, res, out, n, k, eps, out_f32);                             \
  }

#define GEMV_ROWS(S, SUFFIX, T)                                                                  \
  GEMV(S, plain, false, bare, false, SUFFIX, T)                                                  \
  GEMV(S, plain, false, norm, true, SUFFIX, T)                                                   \
  GEMV(S, swiglu, true, bare, false, SUFFIX, T)                                                  \
  GEMV(S, swiglu, true, norm, true, SUFFIX, T)

#define GEMV_ALL(SUFFIX, T)                                                                      \
  GEMV_ROWS(1, SUFFIX, T)                                                                        \
  GEMV_ROWS(2, SUFFIX, T)                                                                        \
  GEMV_ROWS(3, SUFFIX, T)                                                                        \
  GEMV_ROWS(4, SUFFIX, T)                                                                        \
  GEMV_ROWS(5, SUFFIX, T)                                                                        \
  GEMV_ROWS(6, SUFFIX, T)                                                                        \
  GEMV_ROWS(7, SUFFIX, T)                                                                        \
  GEMV_ROWS(8, SUFFIX, T)

#define GEMV_Q4(S, EPI, SWIGLU, NRM, NORM, SUFFIX, T)                                            \
  extern "C" __global__ void decode_gemv_q4_##EPI##_##NRM##_s##S##_##SUFFIX(                     \
      const uint8_t *w, const float *scales, const T *x, const T *g, const T *res, void *out,    \
      uint32_t n, uint32_t k, uint32_t groups, uint32_t group_blocks, float eps,                 \
      uint32_t out_f32) {                                                                        \
    gemv_q4<T, S, SWIGLU, NORM>(w, scales, x, g, res, out, n, k, groups, group_blocks, eps,      \
                                out_f32);                                                        \
  }

#define GEMV_Q4_ROWS(S, SUFFIX, T)                                                               \
  GEMV_Q4(S, plain, false, bare, false, SUFFIX, T)                                               \
  GEMV_Q4(S, plain, false, norm, true, SUFFIX, T)                                                \
  GEMV_Q4(S, swiglu, true, bare, false, SUFFIX, T)                                               \
  GEMV_Q4(S, swiglu, true, norm, true, SUFFIX, T)

#define GEMV_Q4_ALL(SUFFIX, T)                                                                   \
  GEMV_Q4_ROWS(1, SUFFIX, T)                                                                     \
  GEMV_Q4_ROWS(2, SUFFIX, T)                                                                     \
  GEMV_Q4_ROWS(3, SUFFIX, T)                                                                     \
  GEMV_Q4_ROWS(4, SUFFIX, T)                                                                     \
  GEMV_Q4_ROWS(5, SUFFIX, T)                                                                     \
  GEMV_Q4_ROWS(6, SUFFIX, T)                                                                     \
  GEMV_Q4_ROWS(7, SUFFIX, T)                                                                     \
  GEMV_Q4_ROWS(8, SUFFIX, T)                                                                     \
  extern "C" __global__ void decode_dequant_q4_##SUFFIX(const uint8_t *w, const float *scales,  \
                                                        T *out, uint32_t n, uint32_t k,          \
                                                        uint32_t groups, uint32_t group_blocks) { \
    dequant_q4<T>(w, scales, out, n, k, groups, group_blocks);                                   \
  }

#define ATTN_KV(HD, NAME, KVB, SUFFIX, T)                                                        \
  extern "C" __global__ void decode_attn_##NAME##d##HD##_##SUFFIX(                               \
      const T *qkv, const float *cos, const float *sin, const uint32_t *pos, void *k_cache,      \
      void *v_cache, float *k_scale, float *v_scale, T *out, float *part, uint32_t nh,           \
      uint32_t nkv, uint32_t cap, uint32_t chunk) {                                              \
    attn<T, HD, KVB>(qkv, cos, sin, pos, k_cache, v_cache, k_scale, v_scale, out, part, nh, nkv, \
                     cap, chunk);                                                                \
  }

#define ATTN(HD, SUFFIX, T)                                                                      \
  ATTN_KV(HD, , 0, SUFFIX, T)                                                                    \
  ATTN_KV(HD, kv8_, 8, SUFFIX, T)                                                                \
  ATTN_KV(HD, kv4_, 4, SUFFIX, T)                                                                \
  extern "C" __global__ void decode_attn_combine_d##HD##_##SUFFIX(                               \
      const float *part, const uint32_t *pos, T *out, uint32_t nh, uint32_t splits,              \
      uint32_t chunk) {                                                                          \
    attn_combine<T, HD>(part, pos, out, nh, splits, chunk);                                      \
  }

#define DTYPE(SUFFIX, T)                                                                         \
  GEMV_ALL(SUFFIX, T)                                                                            \
  GEMV_Q4_ALL(SUFFIX, T)                                                                         \
  ATTN(8, SUFFIX, T)                                                                             \
  ATTN(16, SUFFIX, T)                                                                            \
  ATTN(32, SUFFIX, T)                                                                            \
  ATTN(64, SUFFIX, T)                                                                            \
  ATTN(128, SUFFIX, T)

DTYPE(bf16, __nv_bfloat16)
DTYPE(f16, __half)
