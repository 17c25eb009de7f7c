//! The distillation loss of DESIGN.md: per token, the cross-entropy between the teacher's
//! softmax(z_T / T) and the student's log_softmax(z_S / T), averaged over the (unmasked) tokens
//! of the batch. KL (= CE - teacher entropy) and top-1 agreement are reported beside it.
//!
//! Two formulations of the same math: candle tensor ops (the reference, for tests and `pipeline
//! bench distill`) and a fused op, `DistillRows`, that reads each row of logits once
//! (gpu-kernels' cuda/distill.cu on a GPU, rows in parallel on the CPU). Training uses the
//! fused op everywhere: the tensor ops keep about ten tensors of the logits' size alive through
//! the backward pass (the largest part of a small model's training memory), the fused op one.

use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType, D};
use gpu_kernels::distill::STATS;
use half::{bf16, f16};
use model::llama::{log_softmax_last, softmax_last};
use rayon::prelude::*;

pub struct Distill {
    /// Scalar, differentiable w.r.t. the student's logits.
    pub loss: Tensor,
    pub kl: f64,
    /// Share of tokens where the student's top-1 equals the teacher's.
    pub agreement: f64,
}

/// `teacher` and `student` are logits [b, t, vocab]; `mask` (b * t values, 1 = counted) leaves
/// padding out of every average. The fused op computes it (student logits f32, bf16 or f16;
/// teacher logits are cast to the student's dtype).
pub fn distill_loss(
    teacher: &Tensor,
    student: &Tensor,
    mask: Option<&[f32]>,
    temperature: f64,
) -> Result<Distill> {
    distill_loss_fused(teacher, student, mask, temperature)
}

/// The loss through candle tensor ops (the reference).
pub fn distill_loss_tensor_ops(
    teacher: &Tensor,
    student: &Tensor,
    mask: Option<&[f32]>,
    temperature: f64,
) -> Result<Distill> {
    let (b, t, _) = student.dims3()?;
    let (ce, entropy, agree) = token_terms_tensor_ops(teacher, student, temperature)?;
    let mean = TokenMean::new(mask, b, t, student)?;
    summarize(&mean, &ce, &entropy.detach(), &agree)
}

/// Per token [b, t]: cross-entropy (differentiable), teacher entropy and top-1 agreement (f32
/// 0 or 1), through tensor ops.
pub fn token_terms_tensor_ops(
    teacher: &Tensor,
    student: &Tensor,
    temperature: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let zt = teacher.detach().affine(1.0 / temperature, 0.0)?;
    let zs = student.affine(1.0 / temperature, 0.0)?;
    let p_t = softmax_last(&zt)?;
    let ce = (&p_t * log_softmax_last(&zs)?)?.sum(D::Minus1)?.neg()?;
    let entropy = (&p_t * log_softmax_last(&zt)?)?.sum(D::Minus1)?.neg()?;
    let agree = zt
        .argmax(D::Minus1)?
        .eq(&zs.argmax(D::Minus1)?.detach())?
        .to_dtype(DType::F32)?;
    Ok((ce, entropy, agree))
}

/// The loss through `DistillRows` (one kernel forward, one backward on a GPU; one pass over
/// the rows each way on the CPU).
pub fn distill_loss_fused(
    teacher: &Tensor,
    student: &Tensor,
    mask: Option<&[f32]>,
    temperature: f64,
) -> Result<Distill> {
    let (b, t, v) = student.dims3()?;
    if teacher.dims() != student.dims() {
        bail!(
            "distillation loss: teacher logits {:?} and student logits {:?} differ in shape",
            teacher.dims(),
            student.dims()
        );
    }
    let rows = |x: &Tensor| x.reshape((b * t, v))?.contiguous();
    let zt = rows(&teacher.detach().to_dtype(student.dtype())?)?;
    let zs = rows(student)?;
    let stats = zs.apply_op2(&zt, DistillRows { temperature })?;
    let column = |x: &Tensor, i: usize| x.narrow(1, i, 1)?.reshape((b, t));
    let ce = column(&stats, 0)?;
    let fixed = stats.detach();
    let mean = TokenMean::new(mask, b, t, student)?;
    summarize(&mean, &ce, &column(&fixed, 1)?, &column(&fixed, 2)?)
}

/// Means over the counted tokens: sum(x * mask) / sum(mask).
struct TokenMean {
    weights: Option<Tensor>,
    count: f64,
}

impl TokenMean {
    fn new(mask: Option<&[f32]>, b: usize, t: usize, like: &Tensor) -> Result<Self> {
        Ok(match mask {
            Some(m) => Self {
                weights: Some(Tensor::from_slice(m, (b, t), like.device())?),
                count: m.iter().map(|&x| x as f64).sum(),
            },
            None => Self {
                weights: None,
                count: (b * t) as f64,
            },
        })
    }

    fn of(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = match &self.weights {
            Some(w) => (x * w)?,
            None => x.clone(),
        };
        x.sum_all()?.affine(1.0 / self.count.max(1.0), 0.0)
    }
}

/// The loss (mean CE), KL and agreement from per-token terms [b, t] (f32).
fn summarize(mean: &TokenMean, ce: &Tensor, entropy: &Tensor, agree: &Tensor) -> Result<Distill> {
    let loss = mean.of(ce)?;
    let ent = mean.of(entropy)?.to_scalar::<f32>()? as f64;
    let ce_value = loss.to_scalar::<f32>()? as f64;
    Ok(Distill {
        kl: ce_value - ent,
        agreement: mean.of(agree)?.to_scalar::<f32>()? as f64,
        loss,
    })
}

/// Per-row distillation terms of student logits [..., V] (first argument) and teacher logits
/// [..., V] of the same dtype (f32, bf16 or f16): an f32 tensor [..., 5] of (ce, entropy, agree,
/// lse_s, lse_t), lse being the log-sum-exp of z / T (cuda/distill.cu has the formulas; the
/// math is f32 for every dtype). Both inputs must be contiguous. Only the ce column carries a
/// gradient, to the student logits; the teacher gets none.
pub struct DistillRows {
    pub temperature: f64,
}

/// 1 / T rounded to f32, the factor candle's `affine(1 / T, 0)` multiplies by.
fn inv_temperature(temperature: f64) -> f32 {
    (1.0 / temperature) as f32
}

impl CustomOp2 for DistillRows {
    fn name(&self) -> &'static str {
        "distill-rows"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        s_l: &Layout,
        t: &CpuStorage,
        t_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(
            s: &CpuStorage,
            s_l: &Layout,
            t: &CpuStorage,
            t_l: &Layout,
            inv_t: f32,
        ) -> candle_core::Result<Vec<f32>> {
            let (zs, zt, v) = cpu_rows::<T>(s, s_l, t, t_l)?;
            // Each row alone, in a fixed order: the same values for any thread count.
            let mut out = vec![0f32; zs.len() / v * STATS];
            out.par_chunks_mut(STATS)
                .zip(zs.par_chunks(v).zip(zt.par_chunks(v)))
                .for_each(|(o, (zs, zt))| o.copy_from_slice(&row_stats(zs, zt, inv_t)));
            Ok(out)
        }
        let inv_t = inv_temperature(self.temperature);
        let out = match cpu_dtype(s, t)? {
            DType::F32 => run::<f32>(s, s_l, t, t_l, inv_t)?,
            DType::BF16 => run::<bf16>(s, s_l, t, t_l, inv_t)?,
            _ => run::<f16>(s, s_l, t, t_l, inv_t)?,
        };
        let mut dims = s_l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = STATS;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        s_l: &Layout,
        t: &candle_core::CudaStorage,
        t_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let inv_t = inv_temperature(self.temperature);
        gpu_kernels::distill::distill_rows(s, s_l, t, t_l, inv_t)
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Row data for the gradient kernel: the incoming gradient of ce and the two saved lse.
        let aux = Tensor::cat(
            &[
                grad_res.narrow(D::Minus1, 0, 1)?,
                res.detach().narrow(D::Minus1, 3, 2)?,
            ],
            D::Minus1,
        )?
        .to_dtype(DType::F32)?
        .contiguous()?;
        let grad = student.apply_op3_no_bwd(
            teacher,
            &aux,
            &DistillRowsGrad {
                temperature: self.temperature,
            },
        )?;
        Ok((Some(grad), None))
    }
}

/// d ce / d z_s of `DistillRows`, in the student's dtype: g / T * (softmax(zs / T) -
/// softmax(zt / T)) per row, from (student, teacher, row data [rows, 3] = (g, lse_s, lse_t)).
struct DistillRowsGrad {
    temperature: f64,
}

impl CustomOp3 for DistillRowsGrad {
    fn name(&self) -> &'static str {
        "distill-rows-grad"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        s_l: &Layout,
        t: &CpuStorage,
        t_l: &Layout,
        aux: &CpuStorage,
        aux_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(
            s: &CpuStorage,
            s_l: &Layout,
            t: &CpuStorage,
            t_l: &Layout,
            aux: &[f32],
            inv_t: f32,
        ) -> candle_core::Result<CpuStorage> {
            let (zs, zt, v) = cpu_rows::<T>(s, s_l, t, t_l)?;
            if aux.len() != zs.len() / v * 3 {
                candle_core::bail!(
                    "distill: row data holds {} values, want 3 for each of {} rows",
                    aux.len(),
                    zs.len() / v
                );
            }
            let mut grad = vec![T::zero(); zs.len()];
            grad.par_chunks_mut(v)
                .zip(zs.par_chunks(v).zip(zt.par_chunks(v)))
                .zip(aux.par_chunks(3))
                .for_each(|((g, (zs, zt)), r)| {
                    let (scale, lse_s, lse_t) = (r[0] * inv_t, r[1], r[2]);
                    for ((g, &s), &t) in g.iter_mut().zip(zs).zip(zt) {
                        let ps = (to_f32(s) * inv_t - lse_s).exp();
                        let pt = (to_f32(t) * inv_t - lse_t).exp();
                        *g = T::from_f64((scale * (ps - pt)) as f64);
                    }
                });
            Ok(T::to_cpu_storage_owned(grad))
        }
        let inv_t = inv_temperature(self.temperature);
        let aux = contiguous::<f32>(aux, aux_l, "row data (g, lse_s, lse_t)")?;
        let grad = match cpu_dtype(s, t)? {
            DType::F32 => run::<f32>(s, s_l, t, t_l, aux, inv_t)?,
            DType::BF16 => run::<bf16>(s, s_l, t, t_l, aux, inv_t)?,
            _ => run::<f16>(s, s_l, t, t_l, aux, inv_t)?,
        };
        Ok((grad, s_l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        s_l: &Layout,
        t: &candle_core::CudaStorage,
        t_l: &Layout,
        aux: &candle_core::CudaStorage,
        aux_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let inv_t = inv_temperature(self.temperature);
        gpu_kernels::distill::distill_rows_grad(s, s_l, t, t_l, aux, aux_l, inv_t)
    }
}

/// The common dtype of student and teacher logits: f32, bf16 or f16.
fn cpu_dtype(s: &CpuStorage, t: &CpuStorage) -> candle_core::Result<DType> {
    let (ds, dt) = (s.dtype(), t.dtype());
    if ds != dt {
        candle_core::bail!("distill: student logits are {ds:?} but teacher logits {dt:?}");
    }
    if !matches!(ds, DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!("distill: logits of dtype {ds:?} (f32, bf16 or f16 accepted)");
    }
    Ok(ds)
}

fn contiguous<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let Some((o1, o2)) = l.contiguous_offsets() else {
        candle_core::bail!(
            "distill: the {what} must be contiguous (got shape {:?}, stride {:?})",
            l.dims(),
            l.stride()
        );
    };
    Ok(&T::cpu_storage_as_slice(s)?[o1..o2])
}

/// Student and teacher logits as slices of whole rows, and the row length.
fn cpu_rows<'a, T: WithDType>(
    s: &'a CpuStorage,
    s_l: &Layout,
    t: &'a CpuStorage,
    t_l: &Layout,
) -> candle_core::Result<(&'a [T], &'a [T], usize)> {
    if s_l.shape() != t_l.shape() {
        candle_core::bail!(
            "distill: student logits {:?} and teacher logits {:?} differ in shape",
            s_l.dims(),
            t_l.dims()
        );
    }
    let v = s_l.dims().last().copied().unwrap_or(0);
    if v == 0 {
        candle_core::bail!("distill: rows of 0 logits");
    }
    let zs = contiguous::<T>(s, s_l, "student logits")?;
    let zt = contiguous::<T>(t, t_l, "teacher logits")?;
    Ok((zs, zt, v))
}

fn to_f32<T: WithDType>(x: T) -> f32 {
    // Exact for f32, bf16 and f16.
    x.to_f64() as f32
}

/// One row's (ce, entropy, agree, lse_s, lse_t) at x = z / T, in two passes: the maxima
/// (ties to the lowest index, as the kernel's), then with e_t = exp(x_t - m_t) the sums
/// s_s = Σ exp(x_s - m_s), s_t = Σ e_t, a = Σ e_t (x_s - m_s) and b = Σ e_t (x_t - m_t), in
/// f64: ce = ln s_s - a / s_t, entropy = ln s_t - b / s_t (the formulas of cuda/distill.cu).
fn row_stats<T: WithDType>(zs: &[T], zt: &[T], inv_t: f32) -> [f32; STATS] {
    let (mut ms, mut mt) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    let (mut is, mut it) = (0usize, 0usize);
    for (i, (&s, &t)) in zs.iter().zip(zt).enumerate() {
        let (xs, xt) = (to_f32(s) * inv_t, to_f32(t) * inv_t);
        if xs > ms {
            (ms, is) = (xs, i);
        }
        if xt > mt {
            (mt, it) = (xt, i);
        }
    }
    let (mut ss, mut st, mut a, mut b) = (0f64, 0f64, 0f64, 0f64);
    for (&s, &t) in zs.iter().zip(zt) {
        let (ds, dt) = (to_f32(s) * inv_t - ms, to_f32(t) * inv_t - mt);
        let et = dt.exp() as f64;
        ss += ds.exp() as f64;
        st += et;
        a += et * ds as f64;
        b += et * dt as f64;
    }
    let (ls, lt) = (ss.ln(), st.ln());
    [
        (ls - a / st) as f32,
        (lt - b / st) as f32,
        if is == it { 1.0 } else { 0.0 },
        (ms as f64 + ls) as f32,
        (mt as f64 + lt) as f32,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use gpu_kernels::distill::THREADS;

    #[test]
    fn equal_logits_have_zero_kl_and_full_agreement() -> Result<()> {
        let dev = Device::Cpu;
        for loss in [distill_loss_tensor_ops, distill_loss_fused] {
            let z = Tensor::from_vec(vec![1f32, 2.0, 0.5, -1.0, 0.0, 3.0], (1, 2, 3), &dev)?;
            let d = loss(&z, &z, None, 1.0)?;
            assert!(d.kl.abs() < 1e-6);
            assert_eq!(d.agreement, 1.0);
            // CE of equal distributions is the entropy, > 0 here.
            assert!(d.loss.to_scalar::<f32>()? > 0.1);

            // A masked-out token does not count.
            let s = Tensor::from_vec(vec![1f32, 2.0, 0.5, 5.0, 0.0, -3.0], (1, 2, 3), &dev)?;
            let masked = loss(&z, &s, Some(&[1.0, 0.0]), 1.0)?;
            assert!(masked.kl.abs() < 1e-6);
            assert_eq!(masked.agreement, 1.0);
            let full = loss(&z, &s, None, 2.0)?;
            assert!(full.kl > 0.1 && full.agreement == 0.5);
        }
        Ok(())
    }

    /// Deterministic logits [b, t, v] (teacher, student): the teacher's uniform in
    /// [-scale, scale], the student's a noisy copy. In token 1 the student's maximum is a tie
    /// at 1, 1 + THREADS and v - 1 and the teacher's is at 1; in token 2 the same tie, the
    /// teacher's at v - 1 (so ties to the lowest index give agreement 1 and 0 there).
    fn logits(b: usize, t: usize, v: usize, scale: f32, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut teacher: Vec<f32> = (0..b * t * v).map(|_| next() * scale).collect();
        let mut student: Vec<f32> = teacher.iter().map(|&z| 0.7 * z + next() * scale).collect();
        let top = 4.0 * scale;
        for (token, teacher_top) in [(1, 1), (2, v - 1)] {
            let r = token * v;
            // 1 and 1 + THREADS fall to one kernel thread, v - 1 to another (for v = 1000).
            for i in [1, 1 + THREADS as usize, v - 1] {
                if i < v {
                    student[r + i] = top;
                }
            }
            teacher[r + teacher_top] = top;
        }
        (teacher, student)
    }

    /// max |got - want| / max |want|. Relative to the largest value, not each one's: gradients
    /// have entries near zero, and a near-one-hot teacher row (tokens 1 and 2) has an entropy
    /// near 0.009 that f32 gets only to about 1e-5 of itself, in either formulation (measured
    /// against f64: 6e-6 for tensor ops, 1e-5 for the fused op).
    fn rel_to_max(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        let diff = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        diff / want
            .iter()
            .map(|w| w.abs())
            .fold(f32::MIN_POSITIVE, f32::max)
    }

    fn values(x: &Tensor) -> Result<Vec<f32>> {
        Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The fused op (in `dtype`) against the tensor ops on the same logits in f32: per-token
    /// terms, loss, KL, agreement and the gradient w.r.t. the student logits. `grad_tol` is
    /// relative to the largest gradient entry; everything else must agree within 1e-5.
    fn check_against_tensor_ops(
        v: usize,
        temperature: f64,
        dtype: DType,
        grad_tol: f32,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let (b, t) = (2, 5);
        let case = format!("v={v} T={temperature} {dtype:?}");
        let (zt, zs) = logits(b, t, v, 3.0, v as u64 + temperature as u64);
        // Logits exactly representable in `dtype`, so the f32 reference sees the same numbers.
        let teacher = Tensor::from_vec(zt, (b, t, v), &dev)?.to_dtype(dtype)?;
        let student = Tensor::from_vec(zs, (b, t, v), &dev)?.to_dtype(dtype)?;
        let (teacher32, student32) = (teacher.to_dtype(DType::F32)?, student.to_dtype(DType::F32)?);
        let mask: Vec<f32> = (0..b * t)
            .map(|i| if i % 4 == 3 { 0.0 } else { 1.0 })
            .collect();

        let (ce, entropy, agree) = token_terms_tensor_ops(&teacher32, &student32, temperature)?;
        let rows = |x: &Tensor| x.reshape((b * t, v));
        let stats =
            rows(&student)?.apply_op2_no_bwd(&rows(&teacher)?, &DistillRows { temperature })?;
        assert_eq!(stats.dims(), &[b * t, STATS]);
        let column = |i: usize| values(&stats.narrow(1, i, 1)?);
        let lse = |z: &Tensor| values(&z.affine(1.0 / temperature, 0.0)?.log_sum_exp(D::Minus1)?);
        for (name, got, want) in [
            ("ce", column(0)?, values(&ce)?),
            ("entropy", column(1)?, values(&entropy)?),
            ("lse of the student", column(3)?, lse(&student32)?),
            ("lse of the teacher", column(4)?, lse(&teacher32)?),
        ] {
            let e = rel_to_max(&got, &want);
            assert!(e < 1e-5, "{case}: {name} differs by {e:e} (relative)");
        }
        let agree = values(&agree)?;
        assert_eq!(column(2)?, agree, "{case}: agreement per token");
        assert_eq!(
            (agree[1], agree[2]),
            (1.0, 0.0),
            "{case}: ties go to the lowest index"
        );

        let want_var = Var::from_tensor(&student32)?;
        let got_var = Var::from_tensor(&student)?;
        let want = distill_loss_tensor_ops(&teacher32, &want_var, Some(&mask), temperature)?;
        let got = distill_loss_fused(&teacher, &got_var, Some(&mask), temperature)?;
        let scalar = |d: &Distill| -> Result<f32> { Ok(d.loss.to_scalar::<f32>()?) };
        let (lg, lw) = (scalar(&got)?, scalar(&want)?);
        assert!(
            (lg - lw).abs() <= 1e-5 * lw.abs(),
            "{case}: loss {lg} vs {lw}"
        );
        assert!(
            want.kl > 0.1,
            "{case}: a test with KL {} checks little",
            want.kl
        );
        assert!(
            (got.kl - want.kl).abs() <= 1e-5 * want.kl.abs(),
            "{case}: kl {} vs {}",
            got.kl,
            want.kl
        );
        assert_eq!(got.agreement, want.agreement, "{case}: agreement");

        let grad = |d: &Distill, var: &Var| -> Result<Tensor> {
            let g = d.loss.backward()?;
            let g = g.get(var).expect("a gradient for the student logits");
            Ok(g.clone())
        };
        let (gg, gw) = (grad(&got, &got_var)?, grad(&want, &want_var)?);
        assert_eq!(gg.dtype(), dtype, "{case}: gradient dtype");
        assert_eq!(gg.dims(), &[b, t, v]);
        let e = rel_to_max(&values(&gg)?, &values(&gw)?);
        assert!(
            e < grad_tol,
            "{case}: gradient differs by {e:e} of its largest entry"
        );
        Ok(())
    }

    #[test]
    fn fused_op_matches_tensor_ops() -> Result<()> {
        for v in [1000, 37] {
            for temperature in [1.0, 2.0] {
                check_against_tensor_ops(v, temperature, DType::F32, 1e-5)?;
            }
        }
        Ok(())
    }

    /// bf16 logits: the forward math is f32 on exact values, so it matches the f32 reference
    /// as closely; the gradient comes back rounded to bf16 (2^-9 relative).
    #[test]
    fn fused_op_on_bf16_matches_f32_tensor_ops() -> Result<()> {
        for temperature in [1.0, 2.0] {
            check_against_tensor_ops(1000, temperature, DType::BF16, 4e-3)?;
        }
        Ok(())
    }

    /// The CPU op splits rows over threads: loss and gradient are the same bytes on 1 and on 3.
    #[test]
    fn fused_op_is_the_same_for_any_thread_count() -> Result<()> {
        let (b, t, v) = (3, 7, 301);
        let (zt, zs) = logits(b, t, v, 4.0, 11);
        let run = |threads: usize| -> Result<(Vec<f32>, Vec<f32>)> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()?;
            pool.install(|| {
                let teacher = Tensor::from_vec(zt.clone(), (b, t, v), &Device::Cpu)?;
                let var = Var::from_vec(zs.clone(), (b, t, v), &Device::Cpu)?;
                let d = distill_loss_fused(&teacher, &var, None, 1.5)?;
                let g = d.loss.backward()?;
                let g = g.get(&var).expect("a gradient for the student logits");
                Ok((vec![d.loss.to_scalar::<f32>()?], values(g)?))
            })
        };
        let (one, three) = (run(1)?, run(3)?);
        assert!(
            one.1.iter().any(|&g| g != 0.0),
            "a zero gradient checks nothing"
        );
        assert_eq!(one.0[0].to_bits(), three.0[0].to_bits(), "loss");
        assert!(
            one.1
                .iter()
                .zip(&three.1)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "gradient"
        );
        Ok(())
    }

    #[test]
    fn fused_op_rejects_strided_logits() -> Result<()> {
        let z = Tensor::zeros((7, 3), DType::F32, &Device::Cpu)?.t()?;
        let err = z.apply_op2_no_bwd(&z, &DistillRows { temperature: 1.0 });
        assert!(err.is_err_and(|e| e.to_string().contains("contiguous")));
        Ok(())
    }
}
