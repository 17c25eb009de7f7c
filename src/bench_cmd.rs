//! `pipeline bench device|decode` and `pipeline synth-model`: speed measurements that print
//! one JSON object each. `device` measures what the hardware gives through candle (copy
//! bandwidth, matrix-product peak); `decode` times the generator's own decoding step and puts it
//! next to the memory-bandwidth bound (bytes of weights and KV cache read per step / copy
//! bandwidth). Training speed comes from `pipeline train`'s own log (tokens_per_second).

use crate::compute_args::ComputeArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::{Args, Subcommand};
use model::{BatchCache, Compute, Llama, ModelFolder, QuantConfig, SeqCache};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Copy bandwidth and matrix-product throughput of the device.
    Device {
        #[command(flatten)]
        compute: ComputeArgs,
        /// Size of the copied buffer, MiB.
        #[arg(long, default_value_t = 1024)]
        copy_mib: usize,
        /// Side of the square matrix products.
        #[arg(long, default_value_t = 8192)]
        matmul_n: usize,
    },
    /// Tokens/s of the generator's decoding step at a batch size, next to the bandwidth bound.
    Decode(DecodeArgs),
    /// The fake quantizer on the device against the CPU kernel (bit-exact mismatches) and
    /// against the tensor-op formulation (speed), on deterministic pseudo-random rows.
    FakeQuant(FakeQuantArgs),
    /// The optimizer's in-place AdamW kernels against its tensor-op formula: bit-exact
    /// mismatches of w, m and v after a few steps, and time per step.
    Adamw(AdamwArgs),
    /// The fused causal attention on the device against the CPU kernel (forward and gradients)
    /// and its speed against the unfused score-matrix path.
    Attention(crate::bench_attention::AttentionArgs),
    /// One training step's loss and gradients on the device against the CPU in f32, on a real
    /// model (checks the GPU's fused training kernels together).
    Grads(crate::bench_grads::GradsArgs),
    /// The fused distillation loss (one kernel each way on a GPU) against its tensor-op
    /// formulation: differences from an f32 reference (loss, KL, agreement, gradient w.r.t. the
    /// student logits) and median time of each path.
    Distill(crate::bench_distill::DistillArgs),
    /// Logits of the full-sequence and the decoding paths against a reference file
    /// (../shared/fixtures/logits/MODEL.safetensors): max abs difference, argmax mismatches.
    Logits(LogitsArgs),
}

#[derive(Args, Debug)]
pub struct FakeQuantArgs {
    #[arg(long, default_value_t = 5632)]
    pub rows: usize,
    #[arg(long, default_value_t = 2048)]
    pub cols: usize,
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// Group size along a row (default: the whole row).
    #[arg(long)]
    pub group: Option<usize>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct AdamwArgs {
    /// Elements of the parameter tensor.
    #[arg(long, default_value_t = 16 << 20)]
    pub numel: usize,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Safetensors with `C.tokens`, `C.logits` and optionally `C.logits_w4a8kv4` for cases
    /// C = a (and b); with `a.prompt` and `a.greedy`, also checks greedy decoding.
    #[arg(long)]
    pub reference: PathBuf,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct DecodeArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Sequences decoded together; a list (1,32,128) measures each with one model load.
    #[arg(long, value_delimiter = ',', required = true)]
    pub batch: Vec<usize>,
    /// Timed decoding steps (after `--warmup` untimed ones).
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    #[arg(long, default_value_t = 8)]
    pub warmup: usize,
    /// Copy bandwidth to use for the bound, GB/s (default: measured here on a 1 GiB buffer).
    #[arg(long)]
    pub copy_gbps: Option<f64>,
    /// Replay each step as a CUDA graph (GPU only); attention then spans the whole cache.
    #[arg(long)]
    pub cuda_graph: bool,
    /// The model's quantizers (a student decodes with them).
    #[command(flatten)]
    pub quant: crate::eval_cmd::QuantArgs,
    /// Projections kept as low-bit codes (CPU, f32), as `pipeline eval --packed`.
    #[arg(long)]
    pub packed: bool,
    /// K/V cache storage: float, int8, int4, q8_0, q4_0 (as `pipeline eval --kv-cache`).
    #[arg(long, value_parser = crate::eval_cmd::kv_cache_arg, default_value = "float")]
    pub kv_cache: model::lowbit::KvCacheFormat,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// tinyllama-1.1b, llama-7b-2layers, llama-7b, tiny-hd64 or smollm-135m.
    #[arg(long)]
    pub shape: model::synth::SynthShape,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A model folder whose tokenizer (and vocabulary size) the synthetic model takes, in
    /// place of a word-level one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn synth(a: SynthArgs) -> Result<()> {
    let t0 = Instant::now();
    model::synth::write_synthetic_model(a.shape, &a.out, a.seed, a.tokenizer.as_deref())?;
    let folder = ModelFolder::open(&a.out)?;
    folder.tokenizer()?;
    let params: usize = model::llama::expected_tensors(&folder.config)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    println!(
        "{}",
        json!({"out": a.out.display().to_string(), "parameters": params,
               "seconds": t0.elapsed().as_secs_f64()})
    );
    Ok(())
}

pub fn run(c: BenchCommand) -> Result<()> {
    let v = match c {
        BenchCommand::Device {
            compute,
            copy_mib,
            matmul_n,
        } => {
            let c = compute.open()?;
            let copy = copy_gbps(&c, copy_mib)?;
            let mut v = json!({"device": compute.device.to_string(), "copy_gb_per_s": copy});
            for dt in [DType::BF16, DType::F32] {
                v[format!("{}_matmul_tflops", dt.as_str())] =
                    json!(matmul_tflops(&c, matmul_n, dt)?);
            }
            v["matmul_n"] = json!(matmul_n);
            v
        }
        BenchCommand::Decode(a) => decode(a)?,
        BenchCommand::Logits(a) => logits(a)?,
        BenchCommand::FakeQuant(a) => fake_quant(a)?,
        BenchCommand::Adamw(a) => adamw(a)?,
        BenchCommand::Distill(a) => crate::bench_distill::distill(a)?,
        BenchCommand::Attention(a) => crate::bench_attention::attention(a)?,
        BenchCommand::Grads(a) => crate::bench_grads::grads(a)?,
    };
    println!("{v}");
    Ok(())
}

/// Seconds per call of `f`, mean of `reps` after `warm` untimed calls, GPU work included.
pub fn time_it(
    c: &Compute,
    warm: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    c.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    c.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() / reps as f64)
}

/// Device-to-device copy, counting bytes read and written.
fn copy_gbps(c: &Compute, mib: usize) -> Result<f64> {
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

/// Rows of pseudo-random values (xorshift, so every machine sees the same numbers), with an
/// outlier per row and an all-zero row (the alpha = 0 case).
fn bench_rows(rows: usize, cols: usize) -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut v: Vec<f32> = (0..rows * cols)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect();
    for r in 0..rows {
        v[r * cols + (r * 31) % cols] *= 40.0;
    }
    v[..cols].fill(0.0);
    v
}

fn fake_quant(a: FakeQuantArgs) -> Result<serde_json::Value> {
    if a.rows == 0 || a.cols == 0 {
        bail!("--rows and --cols must be at least 1");
    }
    let c = a.compute.open()?;
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
        "device": a.compute.device.to_string(), "rows": a.rows, "cols": a.cols,
        "bits": a.bits, "group": a.group, "results": out,
    }))
}

fn adamw(a: AdamwArgs) -> Result<serde_json::Value> {
    use train::optim::{adamw_in_place, adamw_tensor_ops, AdamWStep};
    let c = a.compute.open()?;
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
        "device": a.compute.device.to_string(), "numel": n, "in_place_kernels": in_place,
        "mismatches_after_5_steps": {"w": mism(&w, &kw)?, "m": mism(&m, &km)?, "v": mism(&v, &kv)?},
        "tensor_ops_ms": ops_s * 1e3, "kernels_ms": kernel_s * 1e3,
    }))
}

fn decode(a: DecodeArgs) -> Result<serde_json::Value> {
    if a.batch.contains(&0) || a.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    let c = a.compute.open()?;
    let folder = ModelFolder::open(&a.model)?;
    let quant = a.quant.to_config()?;
    let model = crate::eval_cmd::load_model(&folder, quant.clone(), a.packed, &c)?;
    let copy = match a.copy_gbps {
        Some(g) => g,
        None => copy_gbps(&c, 1024)?,
    };
    let runs = a
        .batch
        .iter()
        .map(|&b| decode_batch(&a, &c, &model, b, copy))
        .collect::<Result<Vec<_>>>()?;
    Ok(json!({
        "model": a.model.display().to_string(),
        "device": a.compute.device.to_string(),
        "dtype": a.compute.dtype.to_string(),
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
    a: &DecodeArgs,
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
    if batched && (a.packed || a.kv_cache != model::lowbit::KvCacheFormat::Float) {
        bail!("--packed and low-bit --kv-cache decode on the CPU (use --device cpu)");
    }
    if batched {
        let mut cache = BatchCache::new(model, batch, total)?;
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
    let kv_per_token = match seqs.first() {
        Some(s) => s.bytes_per_token() as f64,
        None => (2 * cfg.num_hidden_layers * cfg.kv_dim()) as f64 * bytes_per,
    };
    let kv_bytes = batch as f64 * mean_len * kv_per_token;
    let step_s = secs / a.steps as f64;
    let bound_step_s = (weight_bytes + kv_bytes) / (copy * 1e9);
    let tps = (batch * a.steps) as f64 / secs;
    Ok(json!({
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
    }))
}

fn logits(a: LogitsArgs) -> Result<serde_json::Value> {
    let c = a.compute.open()?;
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
        "device": a.compute.device.to_string(),
        "dtype": a.compute.dtype.to_string(),
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

/// The process's peak resident memory (VmHWM), in bytes; 0 where /proc is not there.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
