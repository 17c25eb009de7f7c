//! Fused causal attention: softmax(q kᵀ · scale + causal mask) v, forward and backward, without
//! materialising the [t, t] score matrices. The CPU kernels are below; on a GPU the op runs
//! gpu-kernels' cuda/attention.cu (any float dtype, head_dim 8 to 128).
//!
//! Why: the model's heads are tiny (head_dim 8), so at 512 tokens the separate matmul, softmax
//! and backward ops spent most of a training step streaming [b, heads, t, t] tensors through
//! memory, half of them masked. Here each query row touches only its visible keys, and the
//! backward pass recomputes the row's probabilities instead of storing them.
//!
//! Its summation orders and its exp differ from the unfused ops by float rounding only; that is
//! enough to move 4-bit-KV perplexities by ~0.1%, so evaluation keeps the unfused path, which
//! matches the PyTorch references (see `Llama::fused_attention`).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// q [b, g, rep * t, d] (the `rep` query heads sharing KV head g, stacked along rows),
/// k and v [b, g, t, d]; row r is query position r % t.
struct CausalAttention {
    t: usize,
    scale: f32,
    /// The GPU forward's per-row log-sum-exps, kept for this op's backward pass.
    #[cfg(feature = "cuda")]
    lse: std::sync::Mutex<Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>>,
}

/// Shapes of one call, checked once.
#[derive(Clone, Copy)]
struct Dims {
    // Groups (batch x KV heads) are implied by the buffer lengths.
    /// query rows per group (rep * t).
    rows: usize,
    t: usize,
    d: usize,
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("causal-attention: {what} must be f32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("causal-attention: {what} must be contiguous")
    };
    Ok(&v[a..b])
}

impl CausalAttention {
    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
        if q.len() != 4 || k.len() != 4 || k != v || q[0] != k[0] || q[1] != k[1] || q[3] != k[3] {
            candle_core::bail!("causal-attention: shapes q {q:?}, k {k:?}, v {v:?} do not fit")
        }
        if k[2] != self.t || !q[2].is_multiple_of(self.t) {
            candle_core::bail!(
                "causal-attention: q rows {} / k rows {} vs t {}",
                q[2],
                k[2],
                self.t
            )
        }
        Ok(Dims {
            rows: q[2],
            t: self.t,
            d: q[3],
        })
    }
}

#[cfg(feature = "cuda")]
impl CausalAttention {
    fn gpu_dims(
        &self,
        q: &[usize],
        k: &[usize],
        v: &[usize],
    ) -> Result<gpu_kernels::attention::Dims> {
        let Dims { rows, t, d } = self.dims(q, k, v)?;
        Ok(gpu_kernels::attention::Dims {
            groups: q[0] * q[1],
            rows,
            t,
            d,
        })
    }

    /// dq, dk, dv from the kernels of cuda/attention.cu, with the forward's saved log-sum-exps.
    fn cuda_bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        use candle_core::op::BackpropOp;
        use candle_core::Storage;
        let dims = self.gpu_dims(q.dims(), k.dims(), v.dims())?;
        let dy = dy.to_dtype(q.dtype())?.contiguous()?;
        let wrap = |s, like: &Tensor| {
            Tensor::from_storage(Storage::Cuda(s), like.shape(), BackpropOp::none(), false)
        };
        let name = "causal-attention";
        let (dq, dk, dv) = if gpu_kernels::attention::use_scores(dims, q.dtype()) {
            crate::fused_ops::with_cuda(name, &[q, k, v, &dy], |a| {
                gpu_kernels::attention::backward_scores(a[0], a[1], a[2], a[3], dims, self.scale)
            })?
        } else {
            let saved = self.lse.lock().expect("lse lock");
            let Some(lse) = saved.as_ref() else {
                candle_core::bail!("causal-attention: backward pass without a GPU forward pass")
            };
            crate::fused_ops::with_cuda(name, &[q, k, v, y, &dy], |a| {
                gpu_kernels::attention::backward(
                    a[0], a[1], a[2], a[3], a[4], lse, dims, self.scale,
                )
            })?
        };
        Ok((wrap(dq, q), wrap(dk, k), wrap(dv, v)))
    }
}

/// [groups, t, d] -> [groups, d, t]: the row kernels run along the key index j, which is long
/// and contiguous after this, instead of along the tiny head dim. (With t and d swapped it
/// transposes back.)
fn transpose_groups(x: &[f32], t: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x.chunks(t * d).zip(out.chunks_mut(t * d)) {
        for j in 0..t {
            for c in 0..d {
                dst[c * t + j] = src[j * d + c];
            }
        }
    }
    out
}

/// The two reductions of the row kernels, in a fixed lane order so that the plain and the AVX2
/// versions give the same bits: lane l takes the elements j ≡ l (mod 8), the lanes are combined
/// pairwise, and the tail is added last, in order.
trait Lanes {
    /// Σ a_j b_j.
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// p_j <- exp(p_j - max), returning Σ p_j.
    fn exp_sum(p: &mut [f32], max: f32) -> f32;
}

#[inline(always)]
fn combine(l: &[f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// Portable lanes (what the compiler makes of arrays of eight).
struct Plain;

impl Lanes for Plain {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let body = n / 8 * 8;
        let mut acc = [0f32; 8];
        for (ca, cb) in a[..body].chunks_exact(8).zip(b[..body].chunks_exact(8)) {
            for l in 0..8 {
                acc[l] += ca[l] * cb[l];
            }
        }
        let mut s = combine(&acc);
        for j in body..n {
            s += a[j] * b[j];
        }
        s
    }

    #[inline(always)]
    fn exp_sum(p: &mut [f32], max: f32) -> f32 {
        let body = p.len() / 8 * 8;
        let mut acc = [0f32; 8];
        for ch in p[..body].chunks_exact_mut(8) {
            for l in 0..8 {
                ch[l] = exp_nonpositive(ch[l] - max);
                acc[l] += ch[l];
            }
        }
        let mut s = combine(&acc);
        for v in p[body..].iter_mut() {
            *v = exp_nonpositive(*v - max);
            s += *v;
        }
        s
    }
}

// exp(x) for x <= 0 (see `exp_nonpositive`).
const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n * LN2_HI is exact for |n| < 2^8.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
// Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;
// Below this exp underflows past the smallest normal; softmax weights that small are 0.
const EXP_FLOOR: f32 = -87.0;
// Taylor coefficients of exp, highest first.
const EXP_POLY: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// exp(x) for x <= 0, within 3e-7 relative of the exact value, in plain f32 arithmetic (libm's
/// expf was a third of the kernel's time). Range reduction x = n ln2 + r with |r| <= ln2 / 2,
/// a degree-7 Taylor polynomial, and 2^n built from bits.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let x = if EXP_FLOOR > x { EXP_FLOOR } else { x };
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut q = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        q = q * r + c;
    }
    q * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// Probabilities of query row `qr` (position i) over keys 0..=i into `p[..=i]`, with kt the
/// group's keys as [d, t]. Each score is the sequential dot over the head dim, then
/// max, exp(s - max), sum and division.
#[inline(always)]
fn probs<L: Lanes>(qr: &[f32], kt: &[f32], t: usize, i: usize, scale: f32, p: &mut [f32]) {
    let p = &mut p[..=i];
    p.fill(0.0);
    for (c, &qc) in qr.iter().enumerate() {
        for (s, &k) in p.iter_mut().zip(&kt[c * t..c * t + i + 1]) {
            *s += qc * k;
        }
    }
    let mut max = f32::NEG_INFINITY;
    for s in p.iter_mut() {
        *s *= scale;
        max = if *s > max { *s } else { max };
    }
    let sum = L::exp_sum(p, max);
    for s in p.iter_mut() {
        *s /= sum;
    }
}

/// Shared inputs of the row kernels: one group's transposed keys and values.
struct Group<'a> {
    kt: &'a [f32],
    vt: &'a [f32],
    t: usize,
    d: usize,
    scale: f32,
}

/// y_r = Σ_j p_j v_j for one query row.
#[inline(always)]
fn forward_row<L: Lanes>(g: &Group, qr: &[f32], i: usize, p: &mut [f32], yr: &mut [f32]) {
    probs::<L>(qr, g.kt, g.t, i, g.scale, p);
    for (c, y) in yr.iter_mut().enumerate() {
        *y = L::dot(&p[..=i], &g.vt[c * g.t..c * g.t + i + 1]);
    }
}

/// Gradients of one group's rows, accumulated in row order into dq and the transposed dkt, dvt.
#[inline(always)]
fn backward_group<L: Lanes>(
    g: &Group,
    q: &[f32],
    dy: &[f32],
    dq: &mut [f32],
    dkt: &mut [f32],
    dvt: &mut [f32],
) {
    let (t, d) = (g.t, g.d);
    let rows = q.len() / d;
    let mut p = vec![0f32; t];
    let mut dp = vec![0f32; t];
    for r in 0..rows {
        let i = r % t;
        let qr = &q[r * d..(r + 1) * d];
        let dyr = &dy[r * d..(r + 1) * d];
        probs::<L>(qr, g.kt, t, i, g.scale, &mut p);
        let (p, dp) = (&p[..=i], &mut dp[..=i]);
        // dp_j = dy · v_j (sequential over the head dim); dv_j += p_j dy.
        dp.fill(0.0);
        for (c, &gc) in dyr.iter().enumerate() {
            for (s, &v) in dp.iter_mut().zip(&g.vt[c * t..c * t + i + 1]) {
                *s += gc * v;
            }
            for (dv, &pj) in dvt[c * t..c * t + i + 1].iter_mut().zip(p) {
                *dv += pj * gc;
            }
        }
        // ds_j = p_j (dp_j - Σ p dp) · scale, in place of dp.
        let pdp = L::dot(p, dp);
        for (s, &pj) in dp.iter_mut().zip(p) {
            *s = pj * (*s - pdp) * g.scale;
        }
        // dq_r = Σ_j ds_j k_j; dk_j += ds_j q_r.
        for (c, &qc) in qr.iter().enumerate() {
            dq[r * d + c] = L::dot(dp, &g.kt[c * t..c * t + i + 1]);
            for (dk, &s) in dkt[c * t..c * t + i + 1].iter_mut().zip(dp.iter()) {
                *dk += s * qc;
            }
        }
    }
}

/// The same kernels with AVX2 (no FMA: the same roundings as `Plain`), picked at run time.
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::*;
    use std::arch::x86_64::*;

    /// Only constructed after AVX2 was detected (see `has_avx2`).
    pub struct Avx2(());

    impl Lanes for Avx2 {
        #[inline(always)]
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            // SAFETY: an `Avx2` exists only on a CPU with AVX2.
            unsafe { dot(a, b) }
        }

        #[inline(always)]
        fn exp_sum(p: &mut [f32], max: f32) -> f32 {
            // SAFETY: as above.
            unsafe { exp_sum(p, max) }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn lanes(v: __m256) -> [f32; 8] {
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), v);
        l
    }

    #[target_feature(enable = "avx2")]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let body = n / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        for j in (0..body).step_by(8) {
            let x = _mm256_loadu_ps(a.as_ptr().add(j));
            let y = _mm256_loadu_ps(b.as_ptr().add(j));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
        }
        let mut s = combine(&lanes(acc));
        for j in body..n {
            s += a[j] * b[j];
        }
        s
    }

    /// `exp_nonpositive` on eight lanes, operation for operation.
    #[target_feature(enable = "avx2")]
    unsafe fn exp8(x: __m256) -> __m256 {
        // max(floor, x) keeps a NaN x, as the scalar comparison does.
        let x = _mm256_max_ps(_mm256_set1_ps(EXP_FLOOR), x);
        let round = _mm256_set1_ps(ROUND);
        let shifted = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), round);
        let n = _mm256_sub_ps(shifted, round);
        let n_int = _mm256_sub_epi32(
            _mm256_castps_si256(shifted),
            _mm256_set1_epi32(ROUND.to_bits() as i32),
        );
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
            _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
        );
        let mut q = _mm256_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            q = _mm256_add_ps(_mm256_mul_ps(q, r), _mm256_set1_ps(c));
        }
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(n_int, _mm256_set1_epi32(127)));
        _mm256_mul_ps(q, _mm256_castsi256_ps(pow2))
    }

    #[target_feature(enable = "avx2")]
    unsafe fn exp_sum(p: &mut [f32], max: f32) -> f32 {
        let body = p.len() / 8 * 8;
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        for j in (0..body).step_by(8) {
            let ptr = p.as_mut_ptr().add(j);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(ptr), m));
            _mm256_storeu_ps(ptr, e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut s = combine(&lanes(acc));
        for v in p[body..].iter_mut() {
            *v = exp_nonpositive(*v - max);
            s += *v;
        }
        s
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn forward_row(g: &Group, qr: &[f32], i: usize, p: &mut [f32], yr: &mut [f32]) {
        super::forward_row::<Avx2>(g, qr, i, p, yr)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn backward_group(
        g: &Group,
        q: &[f32],
        dy: &[f32],
        dq: &mut [f32],
        dkt: &mut [f32],
        dvt: &mut [f32],
    ) {
        super::backward_group::<Avx2>(g, q, dy, dq, dkt, dvt)
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn forward_row_dispatch(
    avx2: bool,
    g: &Group,
    qr: &[f32],
    i: usize,
    p: &mut [f32],
    yr: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is `has_avx2()`.
        return unsafe { wide::forward_row(g, qr, i, p, yr) };
    }
    let _ = avx2;
    forward_row::<Plain>(g, qr, i, p, yr)
}

fn backward_group_dispatch(
    avx2: bool,
    g: &Group,
    q: &[f32],
    dy: &[f32],
    dq: &mut [f32],
    dkt: &mut [f32],
    dvt: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is `has_avx2()`.
        return unsafe { wide::backward_group(g, q, dy, dq, dkt, dvt) };
    }
    let _ = avx2;
    backward_group::<Plain>(g, q, dy, dq, dkt, dvt)
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Dims { rows, t, d } = self.dims(ql.dims(), kl.dims(), vl.dims())?;
        let q = contiguous(qs, ql, "q")?;
        let kt = transpose_groups(contiguous(ks, kl, "k")?, t, d);
        let vt = transpose_groups(contiguous(vs, vl, "v")?, t, d);
        let avx2 = has_avx2();
        let mut y = vec![0f32; q.len()];
        // One task per query row; rows of a group share that group's keys and values.
        y.par_chunks_mut(d).enumerate().for_each_init(
            || vec![0f32; t],
            |p, (r, yr)| {
                let g = r / rows;
                let grp = Group {
                    kt: &kt[g * t * d..(g + 1) * t * d],
                    vt: &vt[g * t * d..(g + 1) * t * d],
                    t,
                    d,
                    scale: self.scale,
                };
                let i = (r % rows) % t;
                forward_row_dispatch(avx2, &grp, &q[r * d..(r + 1) * d], i, p, yr);
            },
        );
        Ok((CpuStorage::F32(y), ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use gpu_kernels::attention as k;
        let dims = self.gpu_dims(ql.dims(), kl.dims(), vl.dims())?;
        if k::use_scores(dims, qs.dtype()) {
            let y = k::forward_scores((qs, ql), (ks, kl), (vs, vl), dims, self.scale)?;
            return Ok((y, ql.shape().clone()));
        }
        let (y, lse) = k::forward((qs, ql), (ks, kl), (vs, vl), dims, self.scale)?;
        *self.lse.lock().expect("lse lock") = Some(lse);
        Ok((y, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let (dq, dk, dv) = self.cuda_bwd(q, k, v, y, dy)?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let _ = y;
        let Dims { rows, t, d } = self.dims(q.dims(), k.dims(), v.dims())?;
        let flat = |x: &Tensor| x.flatten_all()?.to_vec1::<f32>();
        let (qv, dyv) = (flat(q)?, flat(dy)?);
        let kt = transpose_groups(&flat(k)?, t, d);
        let vt = transpose_groups(&flat(v)?, t, d);
        let (qn, kn) = (rows * d, t * d);
        let avx2 = has_avx2();
        let mut dq = vec![0f32; qv.len()];
        let mut dkt = vec![0f32; kt.len()];
        let mut dvt = vec![0f32; vt.len()];
        // One task per (batch, KV head): its rows accumulate into its own dk and dv in a fixed
        // order, so the result does not depend on the thread count.
        dq.par_chunks_mut(qn)
            .zip(dkt.par_chunks_mut(kn))
            .zip(dvt.par_chunks_mut(kn))
            .enumerate()
            .for_each(|(g, ((dqg, dkg), dvg))| {
                let grp = Group {
                    kt: &kt[g * kn..(g + 1) * kn],
                    vt: &vt[g * kn..(g + 1) * kn],
                    t,
                    d,
                    scale: self.scale,
                };
                let (qg, dyg) = (&qv[g * qn..(g + 1) * qn], &dyv[g * qn..(g + 1) * qn]);
                backward_group_dispatch(avx2, &grp, qg, dyg, dqg, dkg, dvg);
            });
        let dk = transpose_groups(&dkt, d, t);
        let dv = transpose_groups(&dvt, d, t);
        let dq = Tensor::from_vec(dq, q.shape(), q.device())?;
        let dk = Tensor::from_vec(dk, k.shape(), k.device())?;
        let dv = Tensor::from_vec(dv, v.shape(), v.device())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// softmax(q kᵀ · scale + causal mask) v: f32 on the CPU, f32/bf16/f16 on a GPU (see
/// `supported`). q [b, g, rep * t, d], k and v [b, g, t, d] -> [b, g, rep * t, d].
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    t: usize,
    scale: f64,
) -> Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        CausalAttention {
            t,
            scale: scale as f32,
            #[cfg(feature = "cuda")]
            lse: std::sync::Mutex::new(None),
        },
    )
}

/// Whether `causal_attention` can run on these tensors: f32 on the CPU; with the `cuda`
/// feature, any float dtype on a GPU for the head sizes the kernels are compiled for.
pub fn supported(q: &Tensor) -> bool {
    use candle_core::DType;
    if q.device().is_cpu() {
        return q.dtype() == DType::F32;
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16)
            && q.rank() == 4
            && gpu_kernels::attention::HEAD_DIMS.contains(&q.dims()[3]);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention_softmax::causal_softmax;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::max_abs_diff(a, b).unwrap()
    }

    /// Same values and gradients as matmul + causal softmax + matmul.
    #[test]
    fn matches_unfused_attention() {
        let dev = Device::Cpu;
        let (b, g, rep, t, d) = (2, 3, 2, 9, 8);
        let q = Var::randn(0f32, 1.0, (b, g, rep * t, d), &dev).unwrap();
        let k = Var::randn(0f32, 1.0, (b, g, t, d), &dev).unwrap();
        let v = Var::randn(0f32, 1.0, (b, g, t, d), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (b, g, rep * t, d), &dev).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let got = causal_attention(&q, &k, &v, t, scale).unwrap();
        let att = causal_softmax(&q.matmul(&k.t().unwrap()).unwrap(), t, scale).unwrap();
        let want = att.matmul(&v).unwrap();
        assert!(
            max_diff(&got, &want) < 1e-5,
            "forward {}",
            max_diff(&got, &want)
        );
        let ga = (got * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let dd = max_diff(ga.get(x).unwrap(), gb.get(x).unwrap());
            assert!(dd < 1e-5, "d{name} differs by {dd}");
        }
    }

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -90.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            if want > 1e-37 {
                worst = worst.max((got - want).abs() / want);
            }
            x += 0.001;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1000.0) < 1e-37);
    }

    /// The AVX2 build of the kernels gives the same bits as the plain one.
    #[test]
    fn wide_and_plain_kernels_agree_bitwise() {
        if !has_avx2() {
            return;
        }
        let (t, d, rows) = (37, 8, 74);
        let v = |n: usize, s: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761).wrapping_add(s) >> 8) as f32 / 16777216.0)
                        - 0.5
                })
                .collect()
        };
        let (q, kt, vt, dy) = (v(rows * d, 1), v(t * d, 2), v(t * d, 3), v(rows * d, 4));
        let g = Group {
            kt: &kt,
            vt: &vt,
            t,
            d,
            scale: 0.35,
        };
        let run = |avx2: bool| {
            let (mut dq, mut dk, mut dv) =
                (vec![0f32; rows * d], vec![0f32; t * d], vec![0f32; t * d]);
            backward_group_dispatch(avx2, &g, &q, &dy, &mut dq, &mut dk, &mut dv);
            let mut y = vec![0f32; rows * d];
            let mut p = vec![0f32; t];
            for r in 0..rows {
                forward_row_dispatch(
                    avx2,
                    &g,
                    &q[r * d..(r + 1) * d],
                    r % t,
                    &mut p,
                    &mut y[r * d..(r + 1) * d],
                );
            }
            (y, dq, dk, dv)
        };
        let (a, b) = (run(true), run(false));
        let bits = |x: &Vec<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.0), bits(&b.0));
        assert_eq!(bits(&a.1), bits(&b.1));
        assert_eq!(bits(&a.2), bits(&b.2));
        assert_eq!(bits(&a.3), bits(&b.3));
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 8, 4), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 5, 4), candle_core::DType::F32, &dev).unwrap();
        let err = causal_attention(&q, &k, &k, 4, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("causal-attention"), "{err}");
    }
}
