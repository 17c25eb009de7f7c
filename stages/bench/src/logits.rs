//! `pipeline bench logits`: logits of the full-sequence and the decoding paths against a
//! reference file (../shared/fixtures/logits/MODEL.safetensors): max abs difference, argmax
//! mismatches, and greedy decoding against the reference's tokens.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use model::{
    BatchCache, Compute, ComputeDtype, DeviceSpec, Llama, ModelFolder, QuantConfig, SeqCache,
};
use serde_json::json;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Options {
    pub model: PathBuf,
    /// Safetensors with `C.tokens`, `C.logits` and optionally `C.logits_w4a8kv4` for cases
    /// C = a (and b); with `a.prompt` and `a.greedy`, also checks greedy decoding.
    pub reference: PathBuf,
    pub device: DeviceSpec,
    pub dtype: ComputeDtype,
}

pub fn logits(a: &Options) -> Result<serde_json::Value> {
    let c = Compute::open(a.device, a.dtype)?;
    let folder = ModelFolder::open(&a.model)?;
    let reference = candle_core::safetensors::load(&a.reference, &candle_core::Device::Cpu)
        .with_context(|| format!("reading {}", a.reference.display()))?;
    let get = |k: &str| {
        reference
            .get(k)
            .with_context(|| format!("{}: no tensor `{k}`", a.reference.display()))
    };
    let ids_of = |k: &str| -> Result<Vec<u32>> { Ok(get(k)?.to_dtype(DType::U32)?.to_vec1()?) };
    let w4a8kv4 = QuantConfig {
        w_bits: Some(4),
        a_bits: Some(8),
        kv_bits: Some(4),
        ..Default::default()
    };
    // Cases `a`, `b`, ... as the reference holds them; the quantized logits are optional.
    let cases: Vec<&str> = ["a", "b"]
        .into_iter()
        .filter(|c| reference.contains_key(&format!("{c}.tokens")))
        .collect();
    if cases.is_empty() {
        anyhow::bail!("{}: no tensor `a.tokens`", a.reference.display());
    }
    let mut out = serde_json::Map::new();
    for (label, q, key) in [
        ("fp", QuantConfig::none(), "logits"),
        ("w4a8kv4", w4a8kv4, "logits_w4a8kv4"),
    ] {
        if !reference.contains_key(&format!("{}.{key}", cases[0])) {
            continue;
        }
        let m = Llama::load(&folder, q, &c.device)?.cast(c.dtype)?;
        for &case in &cases {
            let tokens = ids_of(&format!("{case}.tokens"))?;
            let want = get(&format!("{case}.{key}"))?.to_dtype(DType::F32)?;
            let ids = Tensor::new(tokens.as_slice(), &c.device)?.unsqueeze(0)?;
            let full = m
                .forward(&ids)?
                .squeeze(0)?
                .to_device(&candle_core::Device::Cpu)?;
            let mut step = Decoder::new(&m, tokens.len())?;
            let rows = tokens
                .iter()
                .map(|&t| step.next(&m, t))
                .collect::<Result<Vec<_>>>()?;
            let inc = Tensor::cat(&rows, 0)?.to_device(&candle_core::Device::Cpu)?;
            // The batched cache's path (the GPU generator's) on any device, in a 2-slot cache
            // with the other slot idle.
            let mut batch = BatchCache::new(&m, 2, tokens.len())?;
            let rows = tokens
                .iter()
                .map(|&t| {
                    Ok(m.decode_slots(&[Some(t), None], &mut batch)?
                        .narrow(0, 0, 1)?)
                })
                .collect::<Result<Vec<_>>>()?;
            let batched = Tensor::cat(&rows, 0)?.to_device(&candle_core::Device::Cpu)?;
            for (path, got) in [
                ("forward", &full),
                ("decode", &inc),
                ("decode_batch", &batched),
            ] {
                out.insert(
                    format!("{label}.{case}.{path}"),
                    json!({
                        "max_abs_diff": (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?,
                        "argmax_mismatch": argmax_mismatch(got, &want)?,
                        // Positions whose logits differ by more than 1e-4 anywhere (a 4-bit
                        // rounding flip moves one position, a wrong quantizer all of them).
                        "positions_over_1e-4": (got - &want)?.abs()?.max(1)?.gt(1e-4)?
                            .to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()?,
                        "positions": tokens.len(),
                    }),
                );
            }
        }
        // Greedy continuation of `a.prompt` through the KV-cache decoder, against the
        // reference's tokens (transformers' `generate(do_sample=False)`).
        if label == "fp" && reference.contains_key("a.greedy") {
            let prompt = ids_of("a.prompt")?;
            let want = ids_of("a.greedy")?;
            let mut step = Decoder::new(&m, prompt.len() + want.len())?;
            let mut logits = None;
            for &t in &prompt {
                logits = Some(step.next(&m, t)?);
            }
            let mut got = Vec::with_capacity(want.len());
            while got.len() < want.len() {
                let l = logits.take().context("empty prompt")?;
                let t = l.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
                got.push(t);
                if got.len() < want.len() {
                    logits = Some(step.next(&m, t)?);
                }
            }
            let first_mismatch = got.iter().zip(&want).position(|(x, y)| x != y);
            out.insert(
                "fp.greedy".into(),
                json!({"tokens": got.len(), "first_mismatch": first_mismatch, "got": got, "want": want}),
            );
        }
    }
    Ok(json!({
        "model": a.model.display().to_string(),
        "device": a.device.to_string(),
        "dtype": a.dtype.to_string(),
        "cases": out,
    }))
}

/// The decoding path one token at a time, through the cache the generator uses on this device.
enum Decoder {
    Seq(SeqCache),
    Batch(BatchCache),
}

impl Decoder {
    fn new(m: &Llama, capacity: usize) -> Result<Self> {
        Ok(if m.device.is_cpu() {
            Decoder::Seq(SeqCache::new(m, capacity)?)
        } else {
            Decoder::Batch(BatchCache::new(m, 1, capacity)?)
        })
    }

    /// Feeds one token; returns the next-token logits [1, vocab].
    fn next(&mut self, m: &Llama, t: u32) -> Result<Tensor> {
        Ok(match self {
            Decoder::Seq(c) => m.decode_step(&[t], &mut [c])?,
            Decoder::Batch(c) => m.decode_slots(&[Some(t)], c)?,
        })
    }
}

/// Share of positions whose top-1 token differs.
fn argmax_mismatch(a: &Tensor, b: &Tensor) -> Result<f64> {
    let x: Vec<u32> = a.argmax(candle_core::D::Minus1)?.to_vec1()?;
    let y: Vec<u32> = b.argmax(candle_core::D::Minus1)?.to_vec1()?;
    let n = x.iter().zip(&y).filter(|(p, q)| p != q).count();
    Ok(n as f64 / x.len().max(1) as f64)
}
