//! `pipeline quantize` (block-wise NF/int-k quantization of a model folder) and
//! `pipeline bench-memcpy` (the memory bandwidth its throughput is measured against).

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use quantize::{quantize_folder, QuantizeSettings, DEFAULT_SKIP};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Hugging Face model folder to quantize, or a hub id org/name[@revision].
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder (created; refused if it holds another model or quantization).
    #[arg(long)]
    pub out: PathBuf,
    /// Code book: nf4, nf3, nf2, int8, int4, int3, int2.
    #[arg(long)]
    pub format: String,
    /// bnb (bitsandbytes / transformers 4-bit, nf4 only) or packed; default bnb for nf4,
    /// packed otherwise.
    #[arg(long)]
    pub layout: Option<String>,
    /// Values per block sharing one absmax: a power of two from 32 to 4096.
    #[arg(long, default_value_t = 64)]
    pub block_size: usize,
    /// Quantize the block absmax values too (8-bit, blocks of 256), as QLoRA does.
    #[arg(long)]
    pub double_quant: bool,
    /// Modules kept in full precision, comma-separated (e.g. lm_head,embed_tokens,down_proj).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_SKIP.map(String::from))]
    pub skip: Vec<String>,
    /// LoftQ: choose the base together with rank-r LoRA adapters (written beside it as
    /// loftq_adapters.safetensors, the initial adapters of a `loftq` student).
    #[arg(long)]
    pub loftq_rank: Option<usize>,
    /// LoftQ's alternating steps T.
    #[arg(long, default_value_t = 5, requires = "loftq_rank")]
    pub loftq_iters: u32,
    /// LoRA's alpha (adapters applied as alpha / r * B A); default: the rank.
    #[arg(long, requires = "loftq_rank")]
    pub lora_alpha: Option<f64>,
    /// Projections that get LoftQ adapters, comma-separated; default all 7.
    #[arg(long, value_delimiter = ',', requires = "loftq_rank")]
    pub lora_targets: Option<Vec<String>>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let s = QuantizeSettings::new(
        &a.format,
        a.layout.as_deref(),
        a.block_size,
        a.double_quant,
        a.skip.clone(),
    )?;
    let s = match a.loftq_rank {
        None => s,
        Some(rank) => s.with_loftq(quantize::LoftqSettings {
            rank,
            iters: a.loftq_iters,
            alpha: a.lora_alpha.unwrap_or(rank as f64),
            targets: a
                .lora_targets
                .clone()
                .unwrap_or_else(|| quantize::settings::PROJECTIONS.map(String::from).to_vec()),
        })?,
    };
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "quantize {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} tensor {msg}",
    ) {
        bar.set_style(style);
    }
    // A hub id becomes its snapshot folder in the Hugging Face cache (downloaded if needed).
    let (input, hub) = model::hub::resolve(&a.model)?;
    let report = quantize_folder(&input, &a.out, &s, &mut |p| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        let loftq = if p.loftq_steps_total > 0 {
            format!(
                " LoftQ {}/{} steps",
                p.loftq_steps_done, p.loftq_steps_total
            )
        } else {
            String::new()
        };
        bar.set_message(format!(
            "{}/{} {}{loftq}",
            p.tensors_done, p.tensors_total, p.tensor
        ));
    })?;
    bar.finish_and_clear();
    if a.json {
        match &hub {
            Some(h) => {
                let mut v = serde_json::to_value(&report)?;
                v["hub_repo"] = h.repo.clone().into();
                v["hub_commit"] = h.commit.clone().into();
                println!("{v}");
            }
            None => println!("{}", serde_json::to_string(&report)?),
        }
    } else {
        println!(
            "{}{} -> {} [{} {} block {}{}]: {} weights, {:.3} bits/param, {:.1} MB -> {:.1} MB ({:.1}%), rel. error mean {:.4} max {:.4}, {:.2} GB/s quantizing, {:.1} s",
            a.model.display(),
            hub.as_ref()
                .map_or(String::new(), |h| format!(" (commit {})", h.commit)),
            a.out.display(),
            report.format,
            report.layout,
            report.block_size,
            if report.double_quant { " +dq" } else { "" },
            report.quantized_tensors,
            report.bits_per_param,
            report.input_file_bytes as f64 / 1e6,
            report.output_file_bytes as f64 / 1e6,
            100.0 * report.size_ratio,
            report.mean_rel_error,
            report.max_rel_error,
            report.quantize_gb_per_s,
            report.seconds
        );
        if let Some(l) = &report.loftq {
            println!(
                "LoftQ r = {} T = {} on {} matrices: rel. error {:.4} (plain {:.4}, ratio {:.3}), {:.1} s",
                l.rank,
                l.iters,
                l.matrices,
                l.mean_loftq_rel_error,
                l.mean_plain_rel_error,
                l.error_ratio,
                l.seconds
            );
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct MemcpyArgs {
    /// Buffer size in MiB (each of source and destination).
    #[arg(long, default_value_t = 1024)]
    pub mib: usize,
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
}

pub fn bench_memcpy(a: MemcpyArgs) -> Result<()> {
    let b = quantize::bandwidth::memcpy_bandwidth(a.mib << 20, a.repeats);
    println!("{}", serde_json::to_string(&b)?);
    Ok(())
}
