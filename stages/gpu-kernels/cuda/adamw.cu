// The AdamW update (train's optim.rs) in place, as three elementwise kernels with the tensor-op
// formula's order of operations and f32 roundings (no FMA contraction), so a step gives the
// same bits as the tensor ops did:
//   m = m*b1 + g*(1-b1);  v = v*b2 + (g*g)*(1-b2)
//   w = w*decay - ((m*inv_c1) / (sqrt(v*inv_c2) + eps)) * lr
#include <stdint.h>

__device__ __forceinline__ uint64_t index() { return blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; }

extern "C" __global__ void adamw_first_moment(float *m, const float *g, uint64_t n, float b1,
                                              float omb1) {
  const uint64_t i = index();
  if (i < n) m[i] = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(g[i], omb1));
}

extern "C" __global__ void adamw_second_moment(float *v, const float *g, uint64_t n, float b2,
                                               float omb2) {
  const uint64_t i = index();
  if (i < n) v[i] = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(g[i], g[i]), omb2));
}

extern "C" __global__ void adamw_update(float *w, const float *m, const float *v, uint64_t n,
                                        float inv_c1, float inv_c2, float eps, float lr,
                                        float decay, int apply_decay) {
  const uint64_t i = index();
  if (i >= n) return;
  const float denom = __fadd_rn(__fsqrt_rn(__fmul_rn(v[i], inv_c2)), eps);
  const float update = __fdiv_rn(__fmul_rn(m[i], inv_c1), denom);
  const float wi = apply_decay ? __fmul_rn(w[i], decay) : w[i];
  w[i] = __fsub_rn(wi, __fmul_rn(update, lr));
}
