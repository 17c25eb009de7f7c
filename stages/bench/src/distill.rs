//! `pipeline bench distill`: train's fused distillation loss (`DistillRows`: one kernel forward,
//! one backward on a GPU) against its tensor-op formulation on the same logits. Loss, KL,
//! agreement and the gradient w.r.t. the student logits are compared with an f32 reference
//! (tensor ops on the inputs upcast to f32), and each path is timed, forward alone and with the
//! backward (median of `reps` runs, the device synchronised around each). The tensor-op path
//! needs f32 logits, so for bf16 and f16 its time includes the upcasts.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use model::{Compute, ComputeDtype, DeviceSpec};
use serde_json::{json, Value};
use std::time::Instant;
use train::loss::{distill_loss_fused, distill_loss_tensor_ops, Distill};

#[derive(Debug, Clone)]
pub struct Options {
    /// Tokens, one row of logits each.
    pub rows: usize,
    pub vocab: usize,
    pub temperature: f64,
    /// Timed runs of each path (after two untimed ones); the median is reported.
    pub reps: usize,
    pub device: DeviceSpec,
    /// The dtype of the logits both paths are given.
    pub dtype: ComputeDtype,
}

type LossFn = fn(&Tensor, &Tensor, Option<&[f32]>, f64) -> Result<Distill>;

struct Outcome {
    loss: f64,
    kl: f64,
    agreement: f64,
    /// d loss / d student logits, as f32.
    grad: Tensor,
}

pub fn distill(a: &Options) -> Result<Value> {
    if a.rows == 0 || a.vocab == 0 || a.reps == 0 {
        bail!("--rows, --vocab and --reps must be at least 1");
    }
    if a.temperature.is_nan() || a.temperature <= 0.0 {
        bail!("--temperature must be above 0 (got {})", a.temperature);
    }
    let c = Compute::open(a.device, a.dtype)?;
    let (zt, zs) = logits(a.rows, a.vocab);
    let on_device = |v: Vec<f32>| -> Result<Tensor> {
        let t = Tensor::from_vec(v, (1, a.rows, a.vocab), &Device::Cpu)?;
        Ok(t.to_dtype(c.dtype)?.to_device(&c.device)?)
    };
    let (teacher, student) = (on_device(zt)?, on_device(zs)?);
    // Every 8th token is padding, so the masked means are exercised too.
    let mask: Vec<f32> = (0..a.rows)
        .map(|i| if i % 8 == 7 { 0.0 } else { 1.0 })
        .collect();
    let run = |f: LossFn, teacher: &Tensor, student: &Var| -> Result<Outcome> {
        let d = f(teacher, student.as_tensor(), Some(&mask), a.temperature)?;
        let grads = d.loss.backward()?;
        let grad = grads
            .get(student)
            .context("no gradient reached the student logits")?
            .to_dtype(DType::F32)?;
        Ok(Outcome {
            loss: d.loss.to_scalar::<f32>()? as f64,
            kl: d.kl,
            agreement: d.agreement,
            grad,
        })
    };

    let student_var = Var::from_tensor(&student)?;
    let reference = run(
        distill_loss_tensor_ops,
        &teacher.to_dtype(DType::F32)?,
        &Var::from_tensor(&student.to_dtype(DType::F32)?)?,
    )?;
    let fused = run(distill_loss_fused, &teacher, &student_var)?;
    let mut out = json!({
        "device": a.device.to_string(),
        "dtype": c.dtype.as_str(),
        "rows": a.rows,
        "vocab": a.vocab,
        "temperature": a.temperature,
        "reference_f32_tensor_ops": {
            "loss": reference.loss, "kl": reference.kl, "agreement": reference.agreement,
        },
        "fused_vs_reference": differences(&fused, &reference)?,
    });
    let time = |f: LossFn, backward: bool| {
        median_ms(&c, a.reps, || {
            let d = f(
                &teacher,
                student_var.as_tensor(),
                Some(&mask),
                a.temperature,
            )?;
            if backward {
                d.loss.backward()?;
            }
            Ok(())
        })
    };
    let (fused_fwd, fused_both) = (
        time(distill_loss_fused, false)?,
        time(distill_loss_fused, true)?,
    );
    let (ops_fwd, ops_both) = (time(tensor_ops_f32, false)?, time(tensor_ops_f32, true)?);
    out["median_ms"] = json!({
        "fused": {"forward": fused_fwd, "forward_backward": fused_both},
        "tensor_ops": {"forward": ops_fwd, "forward_backward": ops_both},
    });
    out["tensor_ops_time_includes_upcast"] = json!(c.dtype != DType::F32);
    out["speedup_forward_backward"] = json!(ops_both / fused_both);
    out["timed_runs"] = json!(a.reps);
    Ok(out)
}

/// The tensor-op path as training would run it on logits of any dtype: it needs f32 logits
/// (its masked means and scalars are f32), so the casts are part of its cost.
fn tensor_ops_f32(
    teacher: &Tensor,
    student: &Tensor,
    mask: Option<&[f32]>,
    temperature: f64,
) -> Result<Distill> {
    let (teacher, student) = (teacher.to_dtype(DType::F32)?, student.to_dtype(DType::F32)?);
    distill_loss_tensor_ops(&teacher, &student, mask, temperature)
}

/// Absolute and relative differences from the reference; the gradient's relative difference
/// is to its largest entry (many entries are near zero).
fn differences(got: &Outcome, want: &Outcome) -> Result<Value> {
    let max_abs =
        |t: &Tensor| -> Result<f32> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?) };
    let grad_diff = max_abs(&(&got.grad - &want.grad)?)?;
    let grad_scale = max_abs(&want.grad)?;
    let rel = |g: f64, w: f64| (g - w).abs() / w.abs().max(f64::MIN_POSITIVE);
    Ok(json!({
        "loss_abs_diff": (got.loss - want.loss).abs(),
        "loss_rel_diff": rel(got.loss, want.loss),
        "kl_abs_diff": (got.kl - want.kl).abs(),
        "kl_rel_diff": rel(got.kl, want.kl),
        "agreement_diff": (got.agreement - want.agreement).abs(),
        "grad_max_abs_diff": grad_diff,
        "grad_max_rel_diff": grad_diff / grad_scale.max(f32::MIN_POSITIVE),
    }))
}

/// Milliseconds of one call of `f`: the median of `reps` runs after two untimed ones, each run
/// between two device synchronisations.
fn median_ms(c: &Compute, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        c.synchronize()?;
        let t0 = Instant::now();
        f()?;
        c.synchronize()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[reps / 2])
}

/// Deterministic logits (teacher, student) of `rows` x `vocab` (xorshift, so every machine sees
/// the same numbers): spread over a few units with one peak per row, as a language model's;
/// the student is a noisy copy whose peak matches the teacher's in 7 rows of 8.
fn logits(rows: usize, vocab: usize) -> (Vec<f32>, Vec<f32>) {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let mut teacher = Vec::with_capacity(rows * vocab);
    let mut student = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let peak = (r * 7919) % vocab;
        let student_peak = if r % 8 == 3 { (peak + 1) % vocab } else { peak };
        for i in 0..vocab {
            let t = 3.0 * next() + if i == peak { 8.0 } else { 0.0 };
            teacher.push(t);
            student.push(0.8 * t + 1.5 * next() + if i == student_peak { 6.0 } else { 0.0 });
        }
    }
    (teacher, student)
}
