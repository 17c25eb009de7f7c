//! `pipeline bench device`: copy bandwidth and matrix-product throughput of the device.

use crate::time_it;
use anyhow::Result;
use candle_core::{DType, Tensor};
use model::{Compute, ComputeDtype, DeviceSpec};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct Options {
    pub device: DeviceSpec,
    pub dtype: ComputeDtype,
    /// Size of the copied buffer, MiB.
    pub copy_mib: usize,
    /// Side of the square matrix products.
    pub matmul_n: usize,
}

pub fn device(a: &Options) -> Result<serde_json::Value> {
    let c = Compute::open(a.device, a.dtype)?;
    let copy = copy_gbps(&c, a.copy_mib)?;
    let mut v = json!({"device": a.device.to_string(), "copy_gb_per_s": copy});
    for dt in [DType::BF16, DType::F32] {
        v[format!("{}_matmul_tflops", dt.as_str())] = json!(matmul_tflops(&c, a.matmul_n, dt)?);
    }
    v["matmul_n"] = json!(a.matmul_n);
    Ok(v)
}

/// Device-to-device copy, counting bytes read and written.
pub fn copy_gbps(c: &Compute, mib: usize) -> Result<f64> {
    let n = mib * (1 << 20) / 4;
    let x = Tensor::zeros(n, DType::F32, &c.device)?;
    let secs = time_it(c, 3, 20, || {
        x.copy()?;
        Ok(())
    })?;
    Ok(2.0 * (n * 4) as f64 / secs / 1e9)
}

/// Square matrix products on random data.
fn matmul_tflops(c: &Compute, n: usize, dtype: DType) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), &c.device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &c.device)?.to_dtype(dtype)?;
    let secs = time_it(c, 3, 10, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(2.0 * (n as f64).powi(3) / secs / 1e12)
}
