//! `pipeline bench adamw`: the optimizer's in-place AdamW kernels against its tensor-op
//! formula: bit-exact mismatches of w, m and v after a few steps, and time per step.

use crate::{bench_rows, time_it};
use anyhow::Result;
use candle_core::Tensor;
use model::{Compute, ComputeDtype, DeviceSpec};
use serde_json::json;
use train::optim::{adamw_in_place, adamw_tensor_ops, AdamWStep};

#[derive(Debug, Clone)]
pub struct Options {
    /// Elements of the parameter tensor.
    pub numel: usize,
    pub weight_decay: f64,
    pub device: DeviceSpec,
    pub dtype: ComputeDtype,
}

pub fn adamw(a: &Options) -> Result<serde_json::Value> {
    let c = Compute::open(a.device, a.dtype)?;
    let n = a.numel.max(1);
    let rows = bench_rows(1, n);
    let t = |shift: usize, scale: f64| -> Result<Tensor> {
        let v: Vec<f32> = (0..n).map(|i| rows[(i + shift) % n]).collect();
        Ok(Tensor::from_vec(v, n, &c.device)?.affine(scale, 0.0)?)
    };
    let (w0, g0) = (t(0, 1.0)?, t(7, 0.5)?);
    let step = |k: u64| AdamWStep {
        beta1: 0.9,
        beta2: 0.95,
        c1: 1.0 - 0.9f64.powi(k as i32),
        c2: 1.0 - 0.95f64.powi(k as i32),
        eps: 1e-8,
        lr: 2e-3,
        weight_decay: a.weight_decay,
    };
    // Five steps each way from the same start; the gradient changes every step.
    let (mut w, mut m, mut v) = (w0.clone(), w0.zeros_like()?, w0.zeros_like()?);
    let (kw, km, kv) = (w0.copy()?, w0.zeros_like()?, w0.zeros_like()?);
    let mut in_place = true;
    for k in 1..=5u64 {
        let g = g0.affine(1.0 / k as f64, 0.0)?;
        (w, m, v) = adamw_tensor_ops(&w, &m, &v, &g, &step(k))?;
        in_place &= adamw_in_place(&kw, &km, &kv, &g, &step(k))?;
    }
    let bits = |x: &Tensor| -> Result<Vec<u32>> {
        Ok(x.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    };
    let mism = |a: &Tensor, b: &Tensor| -> Result<usize> {
        Ok(bits(a)?
            .iter()
            .zip(bits(b)?)
            .filter(|(p, q)| **p != *q)
            .count())
    };
    let g = g0.clone();
    let ops_s = time_it(&c, 2, 10, || {
        adamw_tensor_ops(&w, &m, &v, &g, &step(6))?;
        Ok(())
    })?;
    let kernel_s = time_it(&c, 2, 10, || {
        adamw_in_place(&kw, &km, &kv, &g, &step(6))?;
        Ok(())
    })?;
    Ok(json!({
        "device": a.device.to_string(), "numel": n, "in_place_kernels": in_place,
        "mismatches_after_5_steps": {"w": mism(&w, &kw)?, "m": mism(&m, &km)?, "v": mism(&v, &kv)?},
        "tensor_ops_ms": ops_s * 1e3, "kernels_ms": kernel_s * 1e3,
    }))
}
