//! `pipeline bench fake-quant`: the fake quantizer on the device against the CPU kernel
//! (bit-exact mismatches) and against the tensor-op formulation (speed), on deterministic
//! pseudo-random rows.

use crate::{bench_rows, time_it};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use model::{Compute, ComputeDtype, DeviceSpec};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct Options {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    /// Group size along a row (`None`: the whole row).
    pub group: Option<usize>,
    pub device: DeviceSpec,
    pub dtype: ComputeDtype,
}

pub fn fake_quant(a: &Options) -> Result<serde_json::Value> {
    if a.rows == 0 || a.cols == 0 {
        bail!("--rows and --cols must be at least 1");
    }
    let c = Compute::open(a.device, a.dtype)?;
    let host = Tensor::from_vec(
        bench_rows(a.rows, a.cols),
        (a.rows, a.cols),
        &candle_core::Device::Cpu,
    )?;
    let bytes = (a.rows * a.cols) as f64;
    let mut out = serde_json::Map::new();
    for dt in [DType::F32, DType::BF16] {
        let want = quant::fake::fake_quant(&host.to_dtype(dt)?, a.bits, a.group)?;
        let x = host.to_dtype(dt)?.to_device(&c.device)?;
        let got = quant::fake::fake_quant(&x, a.bits, a.group)?;
        let ops = quant::fake::fake_quant_tensor_ops(&x, a.bits, a.group)?;
        // Bit patterns (bf16 widens to f32 exactly), so -0.0 against +0.0 is a mismatch too.
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(v.iter().map(|v| v.to_bits()).collect())
        };
        let (w, g, o) = (bits(&want)?, bits(&got)?, bits(&ops)?);
        let mism = |x: &[u32]| x.iter().zip(&w).filter(|(p, q)| p != q).count();
        let kernel_s = time_it(&c, 3, 20, || {
            quant::fake::fake_quant(&x, a.bits, a.group)?;
            Ok(())
        })?;
        let ops_s = time_it(&c, 2, 5, || {
            quant::fake::fake_quant_tensor_ops(&x, a.bits, a.group)?;
            Ok(())
        })?;
        let io = 2.0 * bytes * dt.size_in_bytes() as f64;
        out.insert(
            dt.as_str().into(),
            json!({
                "kernel_mismatches_vs_cpu": mism(&g),
                "tensor_ops_mismatches_vs_cpu": mism(&o),
                "kernel_ms": kernel_s * 1e3,
                "tensor_ops_ms": ops_s * 1e3,
                "kernel_gb_per_s": io / kernel_s / 1e9,
            }),
        );
    }
    Ok(json!({
        "device": a.device.to_string(), "rows": a.rows, "cols": a.cols,
        "bits": a.bits, "group": a.group, "results": out,
    }))
}
