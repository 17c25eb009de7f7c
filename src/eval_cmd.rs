//! `pipeline eval`: perplexity by the held-out protocol, for the model as stored or with
//! weight / activation / KV fake quantization.

use crate::progress::LazyBar;
use anyhow::{Context, Result};
use clap::Args;
use model::{parse_bits, KvPoint, KvRotation, ModelFolder, QuantConfig};
use std::path::PathBuf;

/// The model as asked (dense, or packed projections); `pipeline sample` loads through it too.
pub use eval::load_model;

/// Bits as the user writes them: 2..=8, or 16 / none for "not quantized".
pub fn bits_arg(s: &str) -> Result<u32, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(16);
    }
    s.parse::<u32>()
        .map_err(|_| format!("{s:?} is not a bit width: use 2..=8, 16 or none"))
}

#[derive(Args, Debug, Clone)]
pub struct QuantArgs {
    /// Weight bits (2..=8; 16 or none = off), per output channel unless --w-group.
    #[arg(long, value_parser = bits_arg, default_value = "16")]
    pub w_bits: u32,
    /// Weight group size along the input dimension (per-group quantization).
    #[arg(long)]
    pub w_group: Option<usize>,
    /// Activation bits (per token) at the input of the 7 projections.
    #[arg(long, value_parser = bits_arg, default_value = "16")]
    pub a_bits: u32,
    /// K/V cache bits (per token, across all KV heads).
    #[arg(long, value_parser = bits_arg, default_value = "16")]
    pub kv_bits: u32,
    /// Where K is quantized: post_rope (what a real cache stores) or pre_rope.
    #[arg(long, default_value = "post_rope")]
    pub kv_point: KvPoint,
    /// none, or hadamard: round K/V in each head's Hadamard basis.
    #[arg(long, default_value = "none")]
    pub kv_rotation: KvRotation,
    /// The type weight scales are rounded to before codes are chosen: f32, f16 or bf16 (as
    /// `[student] scale_dtype` trained the student).
    #[arg(long, value_parser = scale_dtype_arg, default_value = "f32")]
    pub scale_dtype: quant::ScaleDtype,
}

fn scale_dtype_arg(s: &str) -> Result<quant::ScaleDtype, String> {
    quant::ScaleDtype::parse(s).ok_or_else(|| format!("{s:?}: allowed values are f32, f16, bf16"))
}

impl QuantArgs {
    pub fn to_config(&self) -> Result<QuantConfig> {
        if self.w_group == Some(0) {
            anyhow::bail!("--w-group 0: a group size must be at least 1");
        }
        let q = QuantConfig {
            w_bits: parse_bits("--w-bits", self.w_bits)?,
            w_group: self.w_group,
            a_bits: parse_bits("--a-bits", self.a_bits)?,
            kv_bits: parse_bits("--kv-bits", self.kv_bits)?,
            kv_point: self.kv_point,
            kv_rotation: self.kv_rotation,
            w_scale: self.scale_dtype,
        };
        q.validate()?;
        Ok(q)
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face model folder (config.json, model.safetensors, tokenizer.json), a hub id
    /// org/name[@revision] resolved through the HF cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE),
    /// or a llama.cpp `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// UTF-8 text to score.
    #[arg(long)]
    pub text: PathBuf,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Window length (default: the model's max_position_embeddings, or its sliding window).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Windows scored together.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Score only the first N tokens of the text (BOS included), as `[eval] max_tokens`.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Keep the 7 projections as low-bit codes + scales and multiply from the codes (CPU, f32):
    /// a packed export's grids, or the --w-bits grid of the weights made on load.
    #[arg(long)]
    pub packed: bool,
    /// Score through the incremental decoder with a K/V cache stored as float, int8, int4
    /// (one scale per token: the trained quantizer's codes), q8_0 or q4_0 (llama.cpp's blocks).
    #[arg(long, value_parser = kv_cache_arg)]
    pub kv_cache: Option<model::lowbit::KvCacheFormat>,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: crate::compute_args::ComputeArgs,
}

pub fn kv_cache_arg(s: &str) -> Result<model::lowbit::KvCacheFormat, String> {
    model::lowbit::KvCacheFormat::parse(s).ok_or_else(|| {
        format!(
            "{s:?}: allowed values are {}",
            model::lowbit::KvCacheFormat::ALLOWED
        )
    })
}

pub fn run(a: EvalArgs) -> Result<()> {
    let quant = a.quant.to_config()?;
    let folder = ModelFolder::open(&a.model)?;
    let tokenizer = folder.tokenizer()?;
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("cannot read text file {}", a.text.display()))?;
    let compute = a.compute.open()?;
    let model = load_model(&folder, quant.clone(), a.packed, &compute)?;
    let mut ids = eval::encode_text(&tokenizer, &text, folder.config.bos_token_id)?;
    if let Some(n) = a.max_tokens {
        ids.truncate(n);
    }
    let ctx = a.ctx.unwrap_or(folder.config.usable_context());
    let mut bar = LazyBar::new(
        (ids.len() - 1) as u64,
        "eval {bar:40} {pos}/{len} tokens {per_sec} eta {eta}",
    );
    let r = match a.kv_cache {
        Some(f) => eval::perplexity_decoding(&model, &ids, ctx, a.batch, f, |n| {
            bar.set_position(n as u64)
        })?,
        None => eval::perplexity(&model, &ids, ctx, a.batch, |n| bar.set_position(n as u64))?,
    };
    bar.finish();
    let path = format!(
        "{}{}",
        if a.packed {
            "packed weights"
        } else {
            "dense weights"
        },
        a.kv_cache.map_or(String::new(), |f| format!(
            ", decoding with a {} cache",
            f.name()
        ))
    );
    if a.json {
        let mut v = serde_json::json!({
            "model": a.model.display().to_string(),
            "text": a.text.display().to_string(),
            "quant": quant.label(),
            "ctx": ctx,
            "device": a.compute.device.to_string(),
            "dtype": a.compute.dtype.to_string(),
            "ppl": r.ppl,
            "nll": r.nll,
            "tokens": r.tokens,
            "windows": r.windows,
            "seconds": r.seconds,
            "tokens_per_second": r.tokens_per_second,
            "weights": if a.packed { "packed" } else { "dense" },
            "projection_bytes": model.projection_bytes(),
            "kv_cache": a.kv_cache.map(|f| f.name()),
        });
        if let Some(h) = &folder.hub {
            v["hub_repo"] = h.repo.clone().into();
            v["hub_commit"] = h.commit.clone().into();
        }
        println!("{v}");
    } else {
        println!(
            "{}{} [{}; {path}] ppl {:.5}  nll {:.6}  tokens {}  ({:.0} tokens/s)",
            a.model.display(),
            folder
                .hub
                .as_ref()
                .map_or(String::new(), |h| format!(" (commit {})", h.commit)),
            quant.label(),
            r.ppl,
            r.nll,
            r.tokens,
            r.tokens_per_second
        );
    }
    Ok(())
}
