//! `pipeline bench decode`: tokens/s of the generator's decoding step at a batch size, next to
//! the memory-bandwidth bound (bytes of weights and KV cache read per step / copy bandwidth).

use crate::device::copy_gbps;
use crate::peak_rss_bytes;
use anyhow::{bail, Result};
use model::lowbit::KvCacheFormat;
use model::{
    BatchCache, Compute, ComputeDtype, DeviceSpec, Llama, ModelFolder, QuantConfig, SeqCache,
};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct Options {
    pub model: PathBuf,
    /// Sequences decoded together; each is measured with one model load.
    pub batch: Vec<usize>,
    /// Timed decoding steps (after `warmup` untimed ones).
    pub steps: usize,
    pub warmup: usize,
    /// Copy bandwidth to use for the bound, GB/s (`None`: measured here on a 1 GiB buffer).
    pub copy_gbps: Option<f64>,
    /// Replay each step as a CUDA graph (GPU only); attention then spans the whole cache.
    pub cuda_graph: bool,
    /// The model's quantizers (a student decodes with them).
    pub quant: QuantConfig,
    /// Projections kept as low-bit codes (CPU, f32).
    pub packed: bool,
    /// K/V cache storage.
    pub kv_cache: KvCacheFormat,
    pub device: DeviceSpec,
    pub dtype: ComputeDtype,
}

pub fn decode(a: &Options) -> Result<serde_json::Value> {
    if a.batch.contains(&0) || a.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    let c = Compute::open(a.device, a.dtype)?;
    let folder = ModelFolder::open(&a.model)?;
    let quant = a.quant.clone();
    let model = eval::load_model(&folder, quant.clone(), a.packed, &c)?;
    let copy = match a.copy_gbps {
        Some(g) => g,
        None => copy_gbps(&c, 1024)?,
    };
    let runs = a
        .batch
        .iter()
        .map(|&b| decode_batch(a, &c, &model, b, copy))
        .collect::<Result<Vec<_>>>()?;
    Ok(json!({
        "model": a.model.display().to_string(),
        "device": a.device.to_string(),
        "dtype": a.dtype.to_string(),
        "quant": quant.label(),
        "weights": if a.packed { "packed" } else { "dense" },
        "kv_cache": a.kv_cache.name(),
        "kernels_isa": model::lowbit::kernels::isa().name(),
        "projection_bytes": model.projection_bytes(),
        "peak_rss_bytes": peak_rss_bytes(),
        "parameters": model::llama::expected_tensors(&model.cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>(),
        "copy_gb_per_s": copy,
        "runs": runs,
    }))
}

/// One batch size: `warmup` untimed steps, then `steps` timed ones.
fn decode_batch(
    a: &Options,
    c: &Compute,
    model: &Llama,
    batch: usize,
    copy: f64,
) -> Result<serde_json::Value> {
    let cfg = model.cfg.clone();
    let total = a.warmup + a.steps + 1;
    if total > cfg.max_position_embeddings {
        bail!(
            "--warmup + --steps = {} is beyond the model's context ({})",
            total - 1,
            cfg.max_position_embeddings
        );
    }
    // The generator's cache choice: per-sequence caches on the CPU, one batch cache elsewhere.
    let batched = !c.device.is_cpu();
    let mut seqs = Vec::new();
    let mut slots = None;
    if batched {
        let mut cache = BatchCache::with_format(model, batch, total, a.kv_cache)?;
        if a.cuda_graph {
            cache.enable_cuda_graph()?;
        }
        slots = Some(cache);
    } else {
        if a.cuda_graph {
            bail!("--cuda-graph needs --device cuda");
        }
        for _ in 0..batch {
            seqs.push(SeqCache::with_format(model, total, a.kv_cache)?);
        }
    }
    // Distinct first tokens, then greedy. As in the generator, the logits come to the host
    // every step (it samples there).
    let mut tokens: Vec<u32> = (0..batch as u32)
        .map(|i| 3 + i % (cfg.vocab_size as u32 - 3))
        .collect();
    let mut step = |tokens: &mut Vec<u32>| -> Result<()> {
        let logits = match &mut slots {
            Some(b) => {
                let t: Vec<Option<u32>> = tokens.iter().map(|&t| Some(t)).collect();
                model.decode_slots(&t, b)?
            }
            None => {
                let mut refs: Vec<&mut SeqCache> = seqs.iter_mut().collect();
                model.decode_step(tokens, &mut refs)?
            }
        };
        *tokens = logits
            .to_vec2::<f32>()?
            .iter()
            .map(|row| generate::sampler::argmax(row))
            .collect();
        Ok(())
    };
    for _ in 0..a.warmup {
        step(&mut tokens)?;
    }
    c.synchronize()?;
    model::decode::profile::reset();
    let t0 = Instant::now();
    for _ in 0..a.steps {
        step(&mut tokens)?;
    }
    c.synchronize()?;
    let secs = t0.elapsed().as_secs_f64();

    // Bytes read per step: the projections as held (codes + scales when packed), every other
    // matrix but the embedding table (only B rows of it are read) in the compute dtype, plus
    // each sequence's K and V over its mean length in the timed steps, as stored.
    let bytes_per = c.dtype.size_in_bytes() as f64;
    let others: usize = model::llama::expected_tensors(&cfg)
        .iter()
        .filter(|(n, _)| n != "model.embed_tokens.weight" && !model::llama::is_projection_weight(n))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let lm_head_tied = if cfg.tie_word_embeddings {
        cfg.vocab_size * cfg.hidden_size
    } else {
        0
    };
    let weight_bytes = (others + lm_head_tied) as f64 * bytes_per + model.projection_bytes() as f64;
    let mean_len = a.warmup as f64 + (a.steps as f64 + 1.0) / 2.0;
    let kv_per_token = match (seqs.first(), &slots) {
        (Some(s), _) => s.bytes_per_token() as f64,
        (None, Some(b)) => b.bytes_per_token() as f64,
        (None, None) => (2 * cfg.num_hidden_layers * cfg.kv_dim()) as f64 * bytes_per,
    };
    let kv_bytes = batch as f64 * mean_len * kv_per_token;
    let step_s = secs / a.steps as f64;
    let bound_step_s = (weight_bytes + kv_bytes) / (copy * 1e9);
    let tps = (batch * a.steps) as f64 / secs;
    // PIPELINE_PROFILE=1 on a GPU without --cuda-graph: milliseconds per step of each piece.
    let profile: serde_json::Map<String, serde_json::Value> = model::decode::profile::totals()
        .into_iter()
        .map(|(piece, ms, _)| (piece.to_string(), json!(ms / a.steps as f64)))
        .collect();
    let mut out = json!({
        "batch": batch,
        "batched_cache": batched,
        "cuda_graph": a.cuda_graph,
        "steps": a.steps,
        "mean_context": mean_len,
        "tokens_per_second": tps,
        "ms_per_step": 1e3 * step_s,
        "weight_bytes_per_step": weight_bytes,
        "kv_bytes_per_step": kv_bytes,
        "kv_cache_bytes_per_token": kv_per_token,
        "copy_gb_per_s": copy,
        "bound_ms_per_step": 1e3 * bound_step_s,
        "bound_tokens_per_second": batch as f64 / bound_step_s,
        "fraction_of_bound": bound_step_s / step_s,
    });
    if !profile.is_empty() {
        out["gpu_ms_per_step_by_piece"] = profile.into();
    }
    Ok(out)
}
