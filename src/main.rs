//! `pipeline`: the command line of the data-free distillation pipeline. It parses arguments
//! and hands each subcommand to the stage crate that does the work.

mod bench_cmd;
mod compute_args;
mod eval_cmd;
mod export_cmd;
mod generate_cmd;
mod pipeline_file;
mod progress;
mod quantize_cmd;
mod runner;
mod sample_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "pipeline",
    version,
    about = "Data-free distillation of LLMs into low-bit students"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Perplexity of a model folder on a text file, optionally fake-quantized.
    Eval(eval_cmd::EvalArgs),
    /// The teacher writes a synthetic corpus (Parquet shards + manifest), resumable.
    Generate(generate_cmd::GenerateArgs),
    /// Inspect, verify and merge corpora.
    #[command(subcommand)]
    Corpus(generate_cmd::CorpusCommand),
    /// Train a fake-quantized student by logit distillation on a corpus (resumable).
    Train(Box<train_cmd::TrainArgs>),
    /// Run a whole pipeline file (generate -> train -> eval), skipping and resuming stages.
    Run {
        /// Pipeline TOML, e.g. pipelines/llmqat.toml.
        pipeline: PathBuf,
        /// Override a setting: --set section.key=value (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Redo this stage and every stage after it (repeatable).
        #[arg(long)]
        force: Vec<String>,
    },
    /// Speed measurements (JSON): device copy bandwidth and matmul peak, decoding tokens/s.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
    /// Write a random-weight Llama folder of a real model's shape (for speed measurements).
    SynthModel(bench_cmd::SynthArgs),
    /// Block-wise NF4/NF3/NF2/int-k quantization of a model folder (bitsandbytes or packed layout).
    Quantize(quantize_cmd::QuantizeArgs),
    /// A trained student as another tool loads it: gguf, compressed-tensors, packed, hf, peft.
    Export(export_cmd::ExportArgs),
    /// Continuations of a prompt from a model (and its teacher beside it), with tokens/s.
    Sample(sample_cmd::SampleArgs),
    /// Memory bandwidth of a large copy (the yardstick for `quantize` throughput), as JSON.
    BenchMemcpy(quantize_cmd::MemcpyArgs),
    /// Where a run stands: each stage's state and what the next `run` would do.
    Status {
        /// A run directory or a pipeline TOML.
        target: PathBuf,
        #[arg(long = "set")]
        sets: Vec<String>,
    },
}

/// How long an idle worker of candle's CPU thread pool spins before it sleeps, unless the user
/// sets it. candle's default (25,000 spins after every parallel elementwise op) keeps a third
/// thread busy beside rayon's two on a 2-core machine: QAT training at the 135M shape ran 13%
/// slower with it (benchmarks/cpu-vs-pytorch.json, issue 22).
const CANDLE_SPIN_LIMIT: &str = "64";

/// glibc's malloc hands every block above 32 MiB (logits, embedding-sized gradients) out as a
/// fresh mmap and unmaps it on free, so each training step faulted in and zeroed gigabytes of
/// new pages (a third of the step's time was the kernel's). Large blocks come from the heap
/// instead: 135M-shape QAT 52.6 -> 61.4 tokens/s, peak RSS +2.4% (issue 22). And the heap's
/// free top is never given back: a 1 GiB limit still let eval's windows hand back and fault
/// in again about 1.5 GB each (135M-shape eval, ctx 512 x 4: 343 -> 372 tokens/s, 991k ->
/// 598k page faults, the same peak RSS). A job's process keeps its peak, which it reached
/// anyway. A user's own MALLOC_* or GLIBC_TUNABLES settings are left alone.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    let set_by_user = std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES"
    });
    if !set_by_user {
        // SAFETY: called first thing in main, before other threads allocate.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            // -1: no trimming at all (mallopt's documented value).
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        }
    }
}

fn main() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tune_allocator();
    // Before any candle op starts the pool, which reads the variable once.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
    // candle asks for its thread count at every matrix product and, when RAYON_NUM_THREADS
    // is unset, counts the physical cores by parsing /proc/cpuinfo each time: 7% of a
    // batch-16 generate's time (135M shape: 166 -> 205 tokens/s). Its count, taken once, is
    // everyone's (rayon's pools read the variable when they start).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(a) => eval_cmd::run(a),
        Command::Generate(a) => generate_cmd::run(a),
        Command::Corpus(c) => generate_cmd::corpus(c),
        Command::Train(a) => train_cmd::run(*a),
        Command::Run {
            pipeline,
            sets,
            force,
        } => runner::run(&pipeline, &sets, &force),
        Command::Status { target, sets } => runner::status(&target, &sets),
        Command::Quantize(a) => quantize_cmd::run(a),
        Command::Export(a) => export_cmd::run(a),
        Command::Sample(a) => sample_cmd::run(a),
        Command::BenchMemcpy(a) => quantize_cmd::bench_memcpy(a),
        Command::Bench(c) => bench_cmd::run(c),
        Command::SynthModel(a) => bench_cmd::synth(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
