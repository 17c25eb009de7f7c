//! Causal softmax of attention scores in one pass: scale, mask and normalise each row.
//! The separate tensor ops (scale, add mask, max, sub, exp, sum, div) dominated the forward
//! pass of small-head models; this op does the same math once per element.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Scores are [.., rows, t] where row r is query position r % t (query heads that share a KV
/// head are stacked along rows); column j is visible when j <= r % t.
struct CausalSoftmax {
    t: usize,
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(src) = s else {
            candle_core::bail!("causal-softmax: f32 expected")
        };
        let Some((o1, o2)) = l.contiguous_offsets() else {
            candle_core::bail!("causal-softmax: contiguous input expected")
        };
        let src = &src[o1..o2];
        let t = self.t;
        if l.dims().last() != Some(&t) {
            candle_core::bail!("causal-softmax: last dim must be {t}");
        }
        let rows_per_block = l.dims()[l.dims().len() - 2];
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(t)
            .zip(src.par_chunks(t))
            .enumerate()
            .for_each(|(r, (d, x))| {
                let i = (r % rows_per_block) % t;
                let vis = &x[..=i];
                let mut max = f32::NEG_INFINITY;
                for &v in vis {
                    max = max.max(v * self.scale);
                }
                let mut sum = 0f32;
                for (dv, &v) in d[..=i].iter_mut().zip(vis) {
                    let e = (v * self.scale - max).exp();
                    *dv = e;
                    sum += e;
                }
                for dv in d[..=i].iter_mut() {
                    *dv /= sum;
                }
            });
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d softmax: s * (g - sum(g * s)); masked entries have s = 0.
        let gs = (grad * res)?.sum_keepdim(D::Minus1)?;
        let g = (res * grad.broadcast_sub(&gs)?)?;
        Ok(Some((g * self.scale as f64)?))
    }
}

/// softmax(scores * scale + causal mask) over the last dim; scores [.., rep * t, t].
pub fn causal_softmax(scores: &Tensor, t: usize, scale: f64) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == candle_core::DType::F32 {
        return scores.contiguous()?.apply_op1(CausalSoftmax {
            t,
            scale: scale as f32,
        });
    }
    // Elsewhere (GPU, or not f32): a causal mask built on the device and candle's fused softmax
    // (it accumulates in f32 whatever the dtype). Rows are `rep` stacked blocks of t query
    // positions, so the mask is [t, t] per block.
    let dtype = scores.dtype();
    let dims = scores.dims().to_vec();
    let rows = dims[dims.len() - 2];
    let mut grouped = dims[..dims.len() - 2].to_vec();
    grouped.extend([rows / t, t, t]);
    let dev = scores.device();
    let pos = Tensor::arange(0u32, t as u32, dev)?;
    let visible = pos.reshape((1, t))?.broadcast_le(&pos.reshape((t, 1))?)?;
    let mask = visible
        .where_cond(
            &Tensor::zeros((t, t), DType::F32, dev)?,
            &Tensor::full(f32::NEG_INFINITY, (t, t), dev)?,
        )?
        .to_dtype(dtype)?;
    let s = (scores.reshape(grouped)? * scale)?.broadcast_add(&mask)?;
    let p = candle_nn::ops::softmax_last_dim(&s.detach())?;
    // The fused kernel has no backward: attach the softmax gradient to s. This also keeps
    // fewer [.., t, t] tensors alive for the backward pass than the separate ops would.
    let p = if s.track_op() {
        s.apply_op2(&p, SoftmaxGrad)?
    } else {
        p
    };
    p.reshape(dims)
}

/// `apply_op2(s, p)` returns p = softmax(s) (computed outside) with softmax's gradient w.r.t. s.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        p: &CpuStorage,
        lp: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((p.try_clone(lp)?, lp.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        p: &candle_core::CudaStorage,
        lp: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((p.try_clone(lp)?, lp.shape().clone()))
    }

    fn bwd(
        &self,
        _s: &Tensor,
        _p: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d softmax: p * (g - sum(g * p)), in f32 (the row sum is too coarse in bf16).
        let dtype = res.dtype();
        let (p, g) = (res.to_dtype(DType::F32)?, grad.to_dtype(DType::F32)?);
        let gs = (&g * &p)?.sum_keepdim(D::Minus1)?;
        let ds = (p * g.broadcast_sub(&gs)?)?.to_dtype(dtype)?;
        Ok((Some(ds), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn reference(x: &Tensor, t: usize, scale: f64) -> Tensor {
        let rows = x.dim(D::Minus2).unwrap();
        let mask: Vec<f32> = (0..rows)
            .flat_map(|r| (0..t).map(move |j| if j <= r % t { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (rows, t), x.device())
            .unwrap()
            .to_dtype(x.dtype())
            .unwrap();
        crate::llama::softmax_last(&(x * scale).unwrap().broadcast_add(&mask).unwrap()).unwrap()
    }

    #[test]
    fn matches_masked_softmax_forward_and_backward() {
        let dev = Device::Cpu;
        let (t, rep) = (7, 3);
        let x = Var::randn(0f32, 1.0, (2, 2, rep * t, t), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 2, rep * t, t), &dev).unwrap();
        let a = causal_softmax(x.as_tensor(), t, 0.35).unwrap();
        let b = reference(x.as_tensor(), t, 0.35);
        let d = crate::max_abs_diff(&a, &b).unwrap();
        assert!(d < 1e-6, "forward differs by {d}");
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (ga.get(&x).unwrap(), gb.get(&x).unwrap());
        let d = crate::max_abs_diff(ga, gb).unwrap();
        assert!(d < 1e-6, "gradient differs by {d}");
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::max_abs_diff(a, b).unwrap()
    }

    /// The path GPUs take (fused softmax + attached gradient), exercised on the CPU via f64.
    #[test]
    fn fused_path_matches_forward_and_backward() {
        let dev = Device::Cpu;
        let (t, rep) = (5, 2);
        let x = Var::randn(0f64, 1.0, (2, 3, rep * t, t), &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, (2, 3, rep * t, t), &dev).unwrap();
        let want = reference(x.as_tensor(), t, 0.5);
        let got = causal_softmax(&x.as_tensor().detach(), t, 0.5).unwrap();
        assert!(max_diff(&got, &want) < 1e-12);
        let got = causal_softmax(x.as_tensor(), t, 0.5).unwrap();
        assert_eq!(got.dtype(), DType::F64);
        assert!(max_diff(&got, &want) < 1e-12);
        let ga = (got * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap());
        assert!(d < 1e-6, "gradient differs by {d}");
    }
}
