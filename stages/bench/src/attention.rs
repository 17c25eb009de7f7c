//! `pipeline bench attention`: the fused causal attention (model's `causal_attention`) on the
//! device against the CPU kernel in f32 (forward and the three gradients), and its speed
//! against the unfused path (score matrix, causal softmax, second product) that it replaces.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use model::attention_softmax::causal_softmax;
use model::causal_attention::{causal_attention, supported};
use model::{Compute, ComputeDtype, DeviceSpec};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct Options {
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    pub kv_heads: usize,
    pub seq_len: usize,
    pub head_dim: usize,
    pub device: DeviceSpec,
    pub dtype: ComputeDtype,
}

/// Pseudo-random values in [-1, 1) from a seed (the same on every machine).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// (y, dq, dk, dv) of `sum(attention(q, k, v) * w)`, all as f32 on the CPU.
fn run_once(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    w: &Tensor,
    t: usize,
    scale: f64,
    fused: bool,
) -> Result<[Tensor; 4]> {
    let (q, k, v) = (
        Var::from_tensor(q)?,
        Var::from_tensor(k)?,
        Var::from_tensor(v)?,
    );
    let y = attend(q.as_tensor(), k.as_tensor(), v.as_tensor(), t, scale, fused)?;
    let grads = (y.to_dtype(DType::F32)? * w)?.sum_all()?.backward()?;
    let f32_cpu = |x: &Tensor| x.to_dtype(DType::F32)?.to_device(&Device::Cpu);
    let g = |x: &Var| -> Result<Tensor> {
        match grads.get(x.as_tensor()) {
            Some(g) => Ok(f32_cpu(g)?),
            None => bail!("no gradient"),
        }
    };
    Ok([f32_cpu(&y)?, g(&q)?, g(&k)?, g(&v)?])
}

fn attend(q: &Tensor, k: &Tensor, v: &Tensor, t: usize, scale: f64, fused: bool) -> Result<Tensor> {
    Ok(if fused {
        causal_attention(q, k, v, t, scale)?
    } else {
        causal_softmax(&q.matmul(&k.t()?)?, t, scale)?.matmul(v)?
    })
}

/// max |a - b| / max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    Ok(model::max_abs_diff(a, b)? / scale.max(1e-30))
}

pub fn attention(a: &Options) -> Result<serde_json::Value> {
    if a.heads == 0 || a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        bail!(
            "--heads ({}) must be a positive multiple of --kv-heads ({})",
            a.heads,
            a.kv_heads
        );
    }
    if a.batch == 0 || a.seq_len == 0 {
        bail!("--batch and --seq-len must be at least 1");
    }
    let c = Compute::open(a.device, a.dtype)?;
    let dtype = c.dtype;
    let (b, g, t, d) = (a.batch, a.kv_heads, a.seq_len, a.head_dim);
    let rows = a.heads / g * t;
    let cpu = Device::Cpu;
    let host = |shape: (usize, usize, usize, usize), seed| {
        Tensor::from_vec(
            values(shape.0 * shape.1 * shape.2 * shape.3, seed),
            shape,
            &cpu,
        )
    };
    let (q, k, v) = (
        host((b, g, rows, d), 1)?,
        host((b, g, t, d), 2)?,
        host((b, g, t, d), 3)?,
    );
    let w = host((b, g, rows, d), 4)?;
    let scale = 1.0 / (d as f64).sqrt();
    let on_dev = |x: &Tensor| x.to_dtype(dtype)?.to_device(&c.device);
    let (qd, kd, vd, wd) = (
        on_dev(&q)?,
        on_dev(&k)?,
        on_dev(&v)?,
        w.to_device(&c.device)?,
    );
    if !supported(&qd) {
        bail!(
            "the fused attention does not run on {} in {} with head_dim {d}",
            a.device,
            dtype.as_str()
        );
    }
    // Reference: the CPU kernel in f32 on the same (dtype-rounded) inputs.
    let back = |x: &Tensor| x.to_dtype(DType::F32)?.to_device(&cpu);
    let want = run_once(&back(&qd)?, &back(&kd)?, &back(&vd)?, &w, t, scale, true)?;
    let got = run_once(&qd, &kd, &vd, &wd, t, scale, true)?;
    let unfused = run_once(&qd, &kd, &vd, &wd, t, scale, false)?;
    let mut diffs = serde_json::Map::new();
    for (i, name) in ["y", "dq", "dk", "dv"].iter().enumerate() {
        diffs.insert(
            name.to_string(),
            json!({"fused_rel": rel_diff(&got[i], &want[i])?, "unfused_rel": rel_diff(&unfused[i], &want[i])?}),
        );
    }
    let time = |fused: bool, backward: bool| -> Result<f64> {
        let (qv, kv, vv) = (
            Var::from_tensor(&qd)?,
            Var::from_tensor(&kd)?,
            Var::from_tensor(&vd)?,
        );
        crate::time_it(&c, 2, 10, || {
            let y = attend(
                qv.as_tensor(),
                kv.as_tensor(),
                vv.as_tensor(),
                t,
                scale,
                fused,
            )?;
            if backward {
                (y.to_dtype(DType::F32)? * &wd)?.sum_all()?.backward()?;
            }
            Ok(())
        })
    };
    let (ff, fb, uf, ub) = (
        time(true, false)?,
        time(true, true)?,
        time(false, false)?,
        time(false, true)?,
    );
    // Causal matrix-product work: q·kᵀ and p·v over the visible half, forward only.
    let flops = 4.0 * (b * a.heads) as f64 * (t * (t + 1) / 2) as f64 * d as f64;
    Ok(json!({
        "device": a.device.to_string(), "dtype": dtype.as_str(),
        "batch": b, "heads": a.heads, "kv_heads": g, "seq_len": t, "head_dim": d,
        "max_rel_diff_vs_cpu_f32": diffs,
        "fused_forward_ms": ff * 1e3, "fused_forward_backward_ms": fb * 1e3,
        "unfused_forward_ms": uf * 1e3, "unfused_forward_backward_ms": ub * 1e3,
        "fused_forward_tflops": flops / ff / 1e12,
    }))
}
