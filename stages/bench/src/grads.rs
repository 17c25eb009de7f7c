//! `pipeline bench grads`: one training step's loss and parameter gradients on the device (with
//! the GPU's fused training blocks, gradient sinks and distillation-loss kernels) against the
//! same step on the CPU in f32, on a real model. What it checks is that the GPU trains the same
//! function: every fused op's forward and backward at once, in context.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use model::{Compute, ComputeDtype, DeviceSpec, Llama, ModelFolder, QuantConfig};
use serde_json::json;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Options {
    pub model: PathBuf,
    pub batch: usize,
    pub seq_len: usize,
    /// Student quantization (default: none, so that no rounding boundary can amplify float
    /// noise; with bits, a few values land on the other side of a boundary).
    pub w_bits: Option<u32>,
    pub a_bits: Option<u32>,
    pub kv_bits: Option<u32>,
    /// Where K is quantized: post_rope or pre_rope.
    pub kv_point: String,
    /// Weight quantization group along a row (default: per channel).
    pub w_group: Option<usize>,
    pub device: DeviceSpec,
    pub dtype: ComputeDtype,
}

/// Loss and gradients (name -> f32 CPU tensor) of one distillation step.
fn step(
    folder: &ModelFolder,
    quant: &QuantConfig,
    ids: &[u32],
    (b, t): (usize, usize),
    device: &Device,
    dtype: DType,
) -> Result<(f64, Vec<(String, Tensor)>)> {
    let init = folder.load_tensors(device)?;
    let cfg: train::config::TrainConfig =
        serde_json::from_value(json!({"steps": 1, "batch": b, "seq_len": t}))?;
    let src = folder.dir.display().to_string();
    let (mut student, params) =
        train::build_student(&folder.config, quant, &init, &cfg, &src, device)?;
    student.fused_attention = true;
    student.set_compute_dtype(dtype);
    // As in training: on a GPU the blocks run fused and weight gradients land in sinks.
    let sinks = student.attach_grad_sinks()?;
    sinks.reset();
    let teacher = Llama::from_tensors(
        folder.config.clone(),
        QuantConfig::default(),
        init,
        &src,
        device,
    )?
    .cast(dtype)?;
    let teacher = Llama {
        fused_attention: true,
        ..teacher
    };
    // The teacher reads other tokens than the student: with the same input an unquantized
    // student equals its teacher and every gradient is zero.
    let (sids, tids) = ids.split_at(b * t);
    let sids = Tensor::from_slice(sids, (b, t), device)?;
    let tids = Tensor::from_slice(tids, (b, t), device)?;
    let d = train::loss::distill_loss(
        &teacher.forward(&tids)?,
        &student.forward(&sids)?,
        None,
        1.0,
    )?;
    let loss = d.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let grads = d.loss.backward()?;
    let mut out = Vec::new();
    for p in params {
        let sunk = sinks.get(&p.name);
        let g = match sunk.as_ref().and_then(|s| s.gradient()) {
            Some(g) => Some(g),
            None => grads.get(p.var.as_tensor()),
        };
        if let Some(g) = g {
            out.push((p.name, g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?));
        }
    }
    Ok((loss, out))
}

pub fn grads(a: &Options) -> Result<serde_json::Value> {
    let c = Compute::open(a.device, a.dtype)?;
    let folder = ModelFolder::open(&a.model)?;
    let (b, t) = (a.batch, a.seq_len);
    if b == 0 || t < 2 || t > folder.config.max_position_embeddings {
        bail!(
            "--batch must be ≥ 1 and --seq-len in 2..={}",
            folder.config.max_position_embeddings
        );
    }
    let quant = QuantConfig {
        w_bits: a.w_bits,
        a_bits: a.a_bits,
        kv_bits: a.kv_bits,
        w_group: a.w_group,
        kv_point: serde_json::from_value(json!(a.kv_point)).map_err(|_| {
            anyhow::anyhow!(
                "--kv-point {}: allowed values are post_rope, pre_rope",
                a.kv_point
            )
        })?,
        ..QuantConfig::default()
    };
    quant.validate()?;
    // Token ids from a fixed xorshift stream: the student's batch, then the teacher's.
    let vocab = folder.config.vocab_size as u64;
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let ids: Vec<u32> = (0..2 * b * t)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab) as u32
        })
        .collect();
    let (want_loss, want) = step(&folder, &quant, &ids, (b, t), &Device::Cpu, DType::F32)?;
    let (got_loss, got) = step(&folder, &quant, &ids, (b, t), &c.device, c.dtype)?;
    if want.len() != got.len() {
        bail!(
            "{} gradients on the CPU, {} on the device",
            want.len(),
            got.len()
        );
    }
    // Per tensor: max |g_dev - g_cpu| / max |g_cpu|.
    let mut rel = Vec::new();
    for ((name, w), (_, g)) in want.iter().zip(&got) {
        let scale = w.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
        rel.push((model::max_abs_diff(g, w)? / scale.max(1e-30), name.clone()));
    }
    rel.sort_by(|x, y| y.0.total_cmp(&x.0));
    let mut sorted: Vec<f64> = rel.iter().map(|r| r.0).collect();
    sorted.sort_by(f64::total_cmp);
    Ok(json!({
        "model": a.model.display().to_string(), "device": a.device.to_string(),
        "dtype": c.dtype.as_str(), "batch": b, "seq_len": t, "quant": quant.label(),
        "loss_cpu_f32": want_loss, "loss_device": got_loss,
        "loss_rel_diff": (got_loss - want_loss).abs() / want_loss.abs().max(1e-30),
        "tensors": rel.len(),
        "grad_rel_diff_median": sorted[sorted.len() / 2],
        "grad_rel_diff_worst": rel.iter().take(5).map(|(d, n)| json!({"tensor": n, "rel": d})).collect::<Vec<_>>(),
    }))
}
