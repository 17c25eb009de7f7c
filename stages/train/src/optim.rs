//! AdamW over the student's `Var`s (our own, so its moments can be checkpointed and restored
//! bit for bit), the learning-rate schedule, and gradient clipping by global norm.

use crate::config::{Schedule, TrainConfig};
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
pub use gpu_kernels::adamw::AdamWStep;
use std::collections::HashMap;

/// One trainable tensor under its Hugging Face name.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// This parameter's learning rate as a multiple of the schedule's (1 for most).
    pub lr_ratio: f64,
}

impl Param {
    /// A parameter at the schedule's learning rate.
    pub fn new(name: impl Into<String>, var: Var) -> Self {
        Self {
            name: name.into(),
            var,
            lr_ratio: 1.0,
        }
    }

    /// Weight decay applies to matrices only; norm gains (and biases) are not shrunk to 0.
    fn decays(&self) -> bool {
        self.var.rank() >= 2
    }
}

/// Learning rate of optimizer step `step` (1-based): linear warmup over `warmup_steps`, then
/// constant, or a linear / cosine decay from `lr` towards `min_lr` over the remaining steps.
pub fn lr_at(cfg: &TrainConfig, step: u64) -> f64 {
    if step <= cfg.warmup_steps {
        return cfg.lr * step as f64 / cfg.warmup_steps as f64;
    }
    let span = cfg.steps.saturating_sub(cfg.warmup_steps).max(1) as f64;
    // The first step after warmup runs at the full rate.
    let progress = ((step - cfg.warmup_steps - 1) as f64 / span).clamp(0.0, 1.0);
    let factor = match cfg.schedule {
        Schedule::Constant => return cfg.lr,
        Schedule::Linear => 1.0 - progress,
        Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    };
    cfg.min_lr + (cfg.lr - cfg.min_lr) * factor
}

/// Global L2 norm of all gradients, summed in parameter order (deterministic).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    #[cfg(feature = "cuda")]
    if grads[0].device().is_cuda() && grads.iter().all(|g| g.dtype() == candle_core::DType::F32) {
        return gpu::global_norm(grads);
    }
    // One transfer for all the per-tensor sums (a GPU would otherwise wait once per tensor);
    // they are added on the host in order, in f64, as before.
    let sums = grads
        .iter()
        .map(|g| {
            let sq = g.sqr()?;
            if g.device().is_cpu() || g.rank() < 2 {
                sq.sum_all()
            } else {
                // candle's GPU `sum_all` reduces with a single thread block; rows first keeps
                // the whole GPU busy (a 1B model's norm took a tenth of a step).
                sq.sum(g.rank() - 1)?.sum_all()
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let sum: f64 = Tensor::stack(&sums, 0)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|x| x as f64)
        .sum();
    Ok(sum.sqrt())
}

/// The factor that brings a global gradient norm down to `max_norm` (0 = off), if it is above.
pub fn clip_scale(norm: f64, max_norm: f64) -> Option<f64> {
    (max_norm > 0.0 && norm > max_norm).then(|| max_norm / (norm + 1e-6))
}

/// Scales the gradients so their global norm is at most `max_norm` (0 = off); returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if let Some(scale) = clip_scale(norm, max_norm) {
        for g in grads.iter_mut() {
            *g = g.affine(scale, 0.0)?;
        }
    }
    Ok(norm)
}

/// The GPU halves of the norm and the update: one kernel per parameter each.
#[cfg(feature = "cuda")]
mod gpu {
    use super::AdamWStep;
    use anyhow::Result;
    use candle_core::{CudaStorage, Layout, Tensor};
    use gpu_kernels::train_step as ts;

    /// The CUDA storages of `tensors`, read-locked for `f` (the kernels write through raw
    /// device pointers in stream order).
    fn with_cuda<R>(
        tensors: &[&Tensor],
        f: impl FnOnce(&[(&CudaStorage, &Layout)]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        gpu_kernels::with_cuda("optimizer", tensors, f)
    }

    /// Partial sums of squares of every gradient into one buffer, one transfer, summed on the
    /// host in f64 in parameter and block order.
    pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
        let dev = grads[0].device();
        let buf = Tensor::zeros(grads.len() * ts::SUMSQ_BLOCKS, candle_core::DType::F32, dev)?;
        let base = with_cuda(&[&buf], |a| ts::address(a[0], "norm buffer"))?.0;
        for (i, g) in grads.iter().enumerate() {
            let g = g.contiguous()?;
            with_cuda(&[&g], |a| {
                ts::sumsq_partials(a[0], base + (i * ts::SUMSQ_BLOCKS * 4) as u64)
            })?;
        }
        let sum: f64 = buf.to_vec1::<f32>()?.into_iter().map(|x| x as f64).sum();
        Ok(sum.sqrt())
    }

    /// One AdamW step of one parameter in place, the gradient scaled by `gscale`.
    pub fn adamw(
        w: &Tensor,
        m: &Tensor,
        v: &Tensor,
        g: &Tensor,
        gscale: Option<f64>,
        s: &AdamWStep,
    ) -> Result<()> {
        let g = g.contiguous()?;
        with_cuda(&[w, m, v, &g], |a| {
            ts::adamw_fused(a[0], a[1], a[2], a[3], gscale.map(|x| x as f32), s)
        })?;
        Ok(())
    }
}

/// The CPU update in place: three passes (m, v, then w) over f32 slices, no new tensors. The
/// tensor-op update allocated about ten temporaries of each parameter's size per step, and
/// their fresh pages (faults, zeroing) were most of a step's optimizer time at 135M
/// parameters. The arithmetic is that of `adamw_tensor_ops` operation by operation (candle's
/// `affine(mul, add)` is `x * mul + add` in f32), so weights and moments are bit-identical.
mod cpu {
    use super::AdamWStep;
    use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor};
    use rayon::prelude::*;

    /// Values per rayon task: elementwise, so any split gives the same bits.
    const CHUNK: usize = 64 * 1024;

    /// Updates (w, m, v) in place when all four tensors are contiguous f32 on the CPU;
    /// returns false (touching nothing) otherwise.
    pub fn adamw(
        w: &Tensor,
        m: &Tensor,
        v: &Tensor,
        g: &Tensor,
        gscale: Option<f64>,
        s: &AdamWStep,
    ) -> candle_core::Result<bool> {
        let all = [w, m, v, g];
        if !all.iter().all(|t| {
            t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
        }) || !all.iter().all(|t| t.dims() == w.dims())
        {
            return Ok(false);
        }
        let gscale = gscale.map(|c| c as f32);
        m.inplace_op2(g, &Moment::new(s.beta1, gscale, false))?;
        v.inplace_op2(g, &Moment::new(s.beta2, gscale, true))?;
        w.inplace_op3(m, v, &Update(*s))?;
        Ok(true)
    }

    /// The contiguous f32 slice of a storage.
    fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: tensor not contiguous".into()))?;
        Ok(&s.as_slice::<f32>()?[a..b])
    }

    fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: tensor not contiguous".into()))?;
        match s {
            CpuStorage::F32(x) => Ok(&mut x[a..b]),
            _ => Err(candle_core::Error::Msg("adamw: tensor not f32".into())),
        }
    }

    /// m = beta m + (1 - beta) g, or v = beta v + (1 - beta) g^2; g first scaled by `gscale`.
    struct Moment {
        beta: f32,
        /// 1 - beta, computed in f64 and then rounded, as the tensor ops pass it to affine.
        one_minus_beta: f32,
        gscale: Option<f32>,
        square: bool,
    }

    impl Moment {
        fn new(beta: f64, gscale: Option<f32>, square: bool) -> Moment {
            Moment {
                beta: beta as f32,
                one_minus_beta: (1.0 - beta) as f32,
                gscale,
                square,
            }
        }
    }

    impl InplaceOp2 for Moment {
        fn name(&self) -> &'static str {
            "adamw-moment"
        }

        fn cpu_fwd(
            &self,
            dst: &mut CpuStorage,
            dst_l: &Layout,
            g: &CpuStorage,
            gl: &Layout,
        ) -> candle_core::Result<()> {
            let (g, out) = (slice(g, gl)?, slice_mut(dst, dst_l)?);
            let (b, nb) = (self.beta, self.one_minus_beta);
            let (gscale, square) = (self.gscale, self.square);
            out.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .for_each(|(o, g)| {
                    for (o, &g) in o.iter_mut().zip(g) {
                        let g = match gscale {
                            Some(c) => g * c + 0.0,
                            None => g,
                        };
                        let g = if square { g * g } else { g };
                        *o = (*o * b + 0.0) + (g * nb + 0.0);
                    }
                });
            Ok(())
        }
    }

    /// w = w (1 - lr wd) - lr (m / c1) / (sqrt(v / c2) + eps).
    struct Update(AdamWStep);

    impl InplaceOp3 for Update {
        fn name(&self) -> &'static str {
            "adamw-update"
        }

        fn cpu_fwd(
            &self,
            dst: &mut CpuStorage,
            dst_l: &Layout,
            m: &CpuStorage,
            ml: &Layout,
            v: &CpuStorage,
            vl: &Layout,
        ) -> candle_core::Result<()> {
            let s = &self.0;
            let (m, v, out) = (slice(m, ml)?, slice(v, vl)?, slice_mut(dst, dst_l)?);
            let (ic1, ic2) = ((1.0 / s.c1) as f32, (1.0 / s.c2) as f32);
            let (eps, lr) = (s.eps as f32, s.lr as f32);
            let decay = (s.weight_decay > 0.0).then_some((1.0 - s.lr * s.weight_decay) as f32);
            out.par_chunks_mut(CHUNK)
                .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
                .for_each(|(o, (m, v))| {
                    for ((w, &m), &v) in o.iter_mut().zip(m).zip(v) {
                        let denom = (v * ic2 + 0.0).sqrt() * 1.0 + eps;
                        let update = (m * ic1 + 0.0) / denom;
                        let w0 = match decay {
                            Some(d) => *w * d + 0.0,
                            None => *w,
                        };
                        *w = w0 - (update * lr + 0.0);
                    }
                });
            Ok(())
        }
    }
}

/// One AdamW update with candle tensor ops (any device): the new (w, m, v). The GPU kernels
/// (gpu-kernels' cuda/adamw.cu) compute the same, in place.
pub fn adamw_tensor_ops(
    w: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    s: &AdamWStep,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let m = (m.affine(s.beta1, 0.0)? + g.affine(1.0 - s.beta1, 0.0)?)?;
    let v = (v.affine(s.beta2, 0.0)? + g.sqr()?.affine(1.0 - s.beta2, 0.0)?)?;
    let denom = (v.affine(1.0 / s.c2, 0.0)?.sqrt()? + s.eps)?;
    let update = m.affine(1.0 / s.c1, 0.0)?.div(&denom)?;
    let w = if s.weight_decay > 0.0 {
        w.affine(1.0 - s.lr * s.weight_decay, 0.0)?
    } else {
        w.clone()
    };
    Ok(((w - update.affine(s.lr, 0.0)?)?, m, v))
}

/// The same update in place with the GPU kernels, for f32 tensors on a CUDA device in a
/// `cuda` build: three kernels instead of about twelve tensor ops and three new tensors
/// (`pipeline bench adamw` checks them; training uses the one-pass `gpu::adamw`).
/// Returns false (and touches nothing) where they do not apply.
pub fn adamw_in_place(
    w: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    s: &AdamWStep,
) -> candle_core::Result<bool> {
    #[cfg(feature = "cuda")]
    if w.device().is_cuda() && w.dtype() == candle_core::DType::F32 {
        gpu_kernels::adamw::adamw_step(w, m, v, g, s)?;
        return Ok(true);
    }
    let _ = (w, m, v, g, s);
    Ok(false)
}

/// AdamW (Loshchilov & Hutter) with bias correction and decoupled weight decay.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// First and second moments, one per parameter, in parameter order.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(cfg: &TrainConfig, params: &[Param]) -> Result<Self> {
        let zeros = |p: &Param| p.var.zeros_like();
        Ok(AdamW {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            m: params
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
            v: params
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// Applies optimizer step `t` (1-based, for the bias correction) with learning rate `lr`,
    /// the gradients first multiplied by `gscale` (clipping) if given.
    pub fn step(
        &mut self,
        params: &[Param],
        grads: &[Tensor],
        lr: f64,
        t: u64,
        gscale: Option<f64>,
    ) -> Result<()> {
        let (b1, b2) = (self.beta1, self.beta2);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            // A gradient that carries its graph would chain every step's graph into the
            // moments (memory growing each step).
            debug_assert!(!g.track_op(), "{}: gradient carries a graph", p.name);
            let lr = lr * p.lr_ratio;
            let s = AdamWStep {
                beta1: b1,
                beta2: b2,
                c1: 1.0 - b1.powi(t as i32),
                c2: 1.0 - b2.powi(t as i32),
                eps: self.eps,
                lr,
                weight_decay: if p.decays() { self.weight_decay } else { 0.0 },
            };
            #[cfg(feature = "cuda")]
            if p.var.device().is_cuda() && p.var.dtype() == candle_core::DType::F32 {
                // Scaling, both moments and the update in one pass.
                gpu::adamw(p.var.as_tensor(), &self.m[i], &self.v[i], g, gscale, &s)
                    .with_context(|| format!("updating {}", p.name))?;
                continue;
            }
            if cpu::adamw(p.var.as_tensor(), &self.m[i], &self.v[i], g, gscale, &s)
                .with_context(|| format!("updating {}", p.name))?
            {
                continue;
            }
            let scaled;
            let g = match gscale {
                Some(c) => {
                    scaled = g.affine(c, 0.0)?;
                    &scaled
                }
                None => g,
            };
            let (w, m, v) = adamw_tensor_ops(p.var.as_tensor(), &self.m[i], &self.v[i], g, &s)?;
            p.var
                .set(&w)
                .with_context(|| format!("updating {}", p.name))?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`) for the checkpoint.
    pub fn named_moments(&self, params: &[Param]) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * params.len());
        for (i, p) in params.iter().enumerate() {
            out.push((format!("m.{}", p.name), self.m[i].clone()));
            out.push((format!("v.{}", p.name), self.v[i].clone()));
        }
        out
    }

    /// Restores the moments saved by `named_moments`; every parameter must be present.
    pub fn load_moments(
        &mut self,
        params: &[Param],
        mut t: HashMap<String, Tensor>,
        source: &str,
    ) -> Result<()> {
        for (i, p) in params.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{kind}.{}", p.name);
                let x = t
                    .remove(&key)
                    .with_context(|| format!("{source}: missing tensor `{key}`"))?;
                if x.dims() != p.var.dims() {
                    bail!(
                        "{source}: tensor `{key}` has shape {:?}, expected {:?}",
                        x.dims(),
                        p.var.dims()
                    );
                }
                // Contiguous and owned: the GPU update writes the moments in place.
                *slot = x.contiguous()?;
            }
        }
        if let Some(extra) = t.keys().next() {
            bail!("{source}: unexpected tensor `{extra}` (the checkpoint trains other parameters)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules() {
        let mut c = TrainConfig::new(110, 1, 4);
        c.warmup_steps = 10;
        c.lr = 1.0;
        c.min_lr = 0.1;
        assert!((lr_at(&c, 5) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(&c, 10), 1.0);
        assert_eq!(lr_at(&c, 60), 1.0);
        c.schedule = Schedule::Linear;
        assert_eq!(lr_at(&c, 11), 1.0);
        assert!((lr_at(&c, 61) - 0.55).abs() < 1e-12);
        c.schedule = Schedule::Cosine;
        assert_eq!(lr_at(&c, 11), 1.0);
        assert!((lr_at(&c, 61) - 0.55).abs() < 1e-12);
        assert!(lr_at(&c, 110) > 0.1 && lr_at(&c, 110) < 0.11);
    }

    /// The CPU update in place gives the tensor-op update's bits, with and without clipping
    /// and weight decay, over several steps (so the moments are not zero).
    #[test]
    fn cpu_in_place_update_is_bit_identical_to_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let n = 150_001; // several rayon chunks and a short last one
        let vals = |seed: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| {
                    let h = (i ^ seed).wrapping_mul(2_654_435_761).rotate_left(13);
                    match h % 11 {
                        0 => 0.0,
                        1 => -0.0,
                        _ => (h as f32 / u32::MAX as f32 - 0.5) * 3e-2,
                    }
                })
                .collect()
        };
        for (gscale, wd) in [(None, 0.0), (Some(0.37), 0.1), (None, 0.01)] {
            let w = Tensor::from_vec(vals(1), n, &dev)?;
            let (m, v) = (w.zeros_like()?, w.zeros_like()?);
            let (mut rw, mut rm, mut rv) = (w.copy()?, m.copy()?, v.copy()?);
            for t in 1..=3u64 {
                let g = Tensor::from_vec(vals(7 * t as u32), n, &dev)?;
                let s = AdamWStep {
                    beta1: 0.9,
                    beta2: 0.95,
                    c1: 1.0 - 0.9f64.powi(t as i32),
                    c2: 1.0 - 0.95f64.powi(t as i32),
                    eps: 1e-8,
                    lr: 3e-4,
                    weight_decay: wd,
                };
                assert!(cpu::adamw(&w, &m, &v, &g, gscale, &s)?);
                let gs = match gscale {
                    Some(c) => g.affine(c, 0.0)?,
                    None => g,
                };
                (rw, rm, rv) = adamw_tensor_ops(&rw, &rm, &rv, &gs, &s)?;
                for (a, b, what) in [(&w, &rw, "w"), (&m, &rm, "m"), (&v, &rv, "v")] {
                    let (a, b) = (a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
                    let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{what} differs at step {t} ({gscale:?}, wd {wd})");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn adamw_first_step_moves_by_lr() -> Result<()> {
        // With bias correction the first update is lr * g / (|g| + eps) = lr * sign(g).
        let dev = Device::Cpu;
        let p = Param::new(
            "w",
            Var::from_vec(vec![1f32, -2.0, 3.0, 0.5], (2, 2), &dev)?,
        );
        let g = Tensor::from_vec(vec![0.3f32, -0.01, 5.0, 0.0], (2, 2), &dev)?;
        let mut c = TrainConfig::new(1, 1, 4);
        c.weight_decay = 0.5;
        let mut opt = AdamW::new(&c, std::slice::from_ref(&p))?;
        opt.step(std::slice::from_ref(&p), &[g], 0.1, 1, None)?;
        let w: Vec<f32> = p.var.flatten_all()?.to_vec1()?;
        let want = [
            1.0 * 0.95 - 0.1,
            -2.0 * 0.95 + 0.1,
            3.0 * 0.95 - 0.1,
            0.5 * 0.95,
        ];
        for (a, b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{w:?} vs {want:?}");
        }
        Ok(())
    }

    #[test]
    fn clipping() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = vec![Tensor::new(&[3f32], &dev)?, Tensor::new(&[4f32], &dev)?];
        let n = clip_grad_norm(&mut g, 1.0)?;
        assert!((n - 5.0).abs() < 1e-6);
        assert!((global_norm(&g)? - 1.0).abs() < 1e-5);
        Ok(())
    }
}
