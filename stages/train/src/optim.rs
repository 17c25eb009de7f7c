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
}

impl Param {
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

    #[test]
    fn adamw_first_step_moves_by_lr() -> Result<()> {
        // With bias correction the first update is lr * g / (|g| + eps) = lr * sign(g).
        let dev = Device::Cpu;
        let p = Param {
            name: "w".into(),
            var: Var::from_vec(vec![1f32, -2.0, 3.0, 0.5], (2, 2), &dev)?,
        };
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
