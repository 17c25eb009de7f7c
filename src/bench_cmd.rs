//! `pipeline bench ...` and `pipeline synth-model`: their arguments; the measurements are the
//! `bench` crate's, each printed as one JSON object.

use crate::compute_args::ComputeArgs;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

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
    Attention(AttentionArgs),
    /// One training step's loss and gradients on the device against the CPU in f32, on a real
    /// model (checks the GPU's fused training kernels together).
    Grads(GradsArgs),
    /// The fused distillation loss (one kernel each way on a GPU) against its tensor-op
    /// formulation: differences from an f32 reference (loss, KL, agreement, gradient w.r.t. the
    /// student logits) and median time of each path.
    Distill(DistillArgs),
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
pub struct AttentionArgs {
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    pub heads: usize,
    #[arg(long, default_value_t = 4)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct GradsArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Student quantization (default: none, so that no rounding boundary can amplify float
    /// noise; with bits, a few values land on the other side of a boundary).
    #[arg(long)]
    pub w_bits: Option<u32>,
    #[arg(long)]
    pub a_bits: Option<u32>,
    #[arg(long)]
    pub kv_bits: Option<u32>,
    /// Where K is quantized: post_rope or pre_rope.
    #[arg(long, default_value = "post_rope")]
    pub kv_point: String,
    /// Weight quantization group along a row (default: per channel).
    #[arg(long)]
    pub w_group: Option<usize>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct DistillArgs {
    /// Tokens, one row of logits each.
    #[arg(long, default_value_t = 2048)]
    pub rows: usize,
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Timed runs of each path (after two untimed ones); the median is reported.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// `--dtype` is the dtype of the logits both paths are given.
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
    let v = bench::synth::synth(a.shape, &a.out, a.seed, a.tokenizer.as_deref())?;
    println!("{v}");
    Ok(())
}

pub fn run(c: BenchCommand) -> Result<()> {
    let v = match c {
        BenchCommand::Device {
            compute,
            copy_mib,
            matmul_n,
        } => bench::device::device(&bench::device::Options {
            device: compute.device,
            dtype: compute.dtype,
            copy_mib,
            matmul_n,
        })?,
        BenchCommand::Decode(a) => bench::decode::decode(&bench::decode::Options {
            quant: a.quant.to_config()?,
            model: a.model,
            batch: a.batch,
            steps: a.steps,
            warmup: a.warmup,
            copy_gbps: a.copy_gbps,
            cuda_graph: a.cuda_graph,
            packed: a.packed,
            kv_cache: a.kv_cache,
            device: a.compute.device,
            dtype: a.compute.dtype,
        })?,
        BenchCommand::Logits(a) => bench::logits::logits(&bench::logits::Options {
            model: a.model,
            reference: a.reference,
            device: a.compute.device,
            dtype: a.compute.dtype,
        })?,
        BenchCommand::FakeQuant(a) => bench::fake_quant::fake_quant(&bench::fake_quant::Options {
            rows: a.rows,
            cols: a.cols,
            bits: a.bits,
            group: a.group,
            device: a.compute.device,
            dtype: a.compute.dtype,
        })?,
        BenchCommand::Adamw(a) => bench::adamw::adamw(&bench::adamw::Options {
            numel: a.numel,
            weight_decay: a.weight_decay,
            device: a.compute.device,
            dtype: a.compute.dtype,
        })?,
        BenchCommand::Distill(a) => bench::distill::distill(&bench::distill::Options {
            rows: a.rows,
            vocab: a.vocab,
            temperature: a.temperature,
            reps: a.reps,
            device: a.compute.device,
            dtype: a.compute.dtype,
        })?,
        BenchCommand::Attention(a) => bench::attention::attention(&bench::attention::Options {
            batch: a.batch,
            heads: a.heads,
            kv_heads: a.kv_heads,
            seq_len: a.seq_len,
            head_dim: a.head_dim,
            device: a.compute.device,
            dtype: a.compute.dtype,
        })?,
        BenchCommand::Grads(a) => bench::grads::grads(&bench::grads::Options {
            model: a.model,
            batch: a.batch,
            seq_len: a.seq_len,
            w_bits: a.w_bits,
            a_bits: a.a_bits,
            kv_bits: a.kv_bits,
            kv_point: a.kv_point,
            w_group: a.w_group,
            device: a.compute.device,
            dtype: a.compute.dtype,
        })?,
    };
    println!("{v}");
    Ok(())
}
