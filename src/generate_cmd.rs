//! `pipeline generate` and `pipeline corpus merge|verify|stats`.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use generate::{Event, FirstToken, GenerateConfig, PrefixRange, ShardOf};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Teacher model folder (Hugging Face format), or a hub id org/name[@revision].
    #[arg(long)]
    pub teacher: PathBuf,
    /// Corpus folder (Parquet shards + manifest.json).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub samples: u64,
    /// Maximum tokens per sample, counting the first token.
    #[arg(long)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 1024)]
    pub shard_size: u64,
    /// Sequences decoded together (does not change the corpus).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Greedy prefix length range, counting the first token.
    #[arg(long, default_value = "3..5")]
    pub greedy_prefix: PrefixRange,
    #[arg(long, default_value = "random")]
    pub first_token: FirstToken,
    /// Store the decoded text beside the tokens.
    #[arg(long)]
    pub text: bool,
    /// Decoding threads (does not change the corpus).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// On a GPU, replay each decoding step as one CUDA graph (needs --workers 1).
    #[arg(long)]
    pub cuda_graph: bool,
    /// Make only shards A..B (end exclusive), e.g. to split the work across machines.
    #[arg(long, conflicts_with = "shard_of")]
    pub shards: Option<String>,
    /// Make slice K (from 0) of N contiguous, balanced slices of the shards, as job K of an
    /// array of N. `env/N` reads K from SLURM_ARRAY_TASK_ID, else from a Kubernetes Indexed
    /// Job's JOB_COMPLETION_INDEX. Join the parts with `pipeline corpus merge`.
    #[arg(long, value_name = "K/N")]
    pub shard_of: Option<ShardOf>,
    /// One teacher per device, e.g. cuda:0,cuda:1 (or cpu,cpu), each making a contiguous
    /// slice of this invocation's shards; replaces --device. Does not change the corpus.
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    pub devices: Option<Vec<model::DeviceSpec>>,
    /// Replace an existing corpus made with other settings.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: crate::compute_args::ComputeArgs,
}

pub fn parse_range(s: &str) -> Result<std::ops::Range<usize>> {
    let Some((a, b)) = s.split_once("..") else {
        bail!("--shards {s:?}: expected A..B, e.g. 0..4")
    };
    let a: usize = a
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("--shards {s:?}: expected A..B"))?;
    let b: usize = b
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("--shards {s:?}: expected A..B"))?;
    if a >= b {
        bail!("--shards {s:?}: A must be less than B");
    }
    Ok(a..b)
}

impl GenerateArgs {
    pub fn config(&self) -> GenerateConfig {
        GenerateConfig {
            samples: self.samples,
            max_tokens: self.max_tokens,
            shard_size: self.shard_size,
            batch: self.batch,
            seed: self.seed,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            greedy_prefix: self.greedy_prefix,
            first_token: self.first_token,
            text: self.text,
            workers: self.workers,
            cuda_graph: self.cuda_graph,
        }
    }
}

/// Runs the generate stage with a progress bar on stderr, one teacher per device (shared with
/// `pipeline run`).
pub fn generate_on_devices_with_progress(
    computes: &[model::Compute],
    teacher: &Path,
    out: &Path,
    cfg: &GenerateConfig,
    range: Option<std::ops::Range<usize>>,
    force: bool,
) -> Result<generate::GenerateReport> {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if let Ok(s) =
        ProgressStyle::with_template("generate {bar:30} {pos}/{len} samples  {msg}  eta {eta}")
    {
        bar.set_style(s);
    }
    let t0 = std::time::Instant::now();
    let mut tokens = 0u64;
    let r = generate::generate_on_devices(computes, teacher, out, cfg, range, force, |e| match e {
        Event::Start {
            samples_to_make,
            shards_kept,
        } => {
            bar.set_length(samples_to_make);
            if shards_kept > 0 {
                bar.suspend(|| {
                    eprintln!(
                        "keeping {shards_kept} finished shard(s) in {}",
                        out.display()
                    )
                });
            }
        }
        Event::Sample { tokens: n } => {
            tokens += n as u64;
            bar.inc(1);
            let s = t0.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("{:.0} tokens/s", tokens as f64 / s));
        }
        Event::ShardWritten { .. } => {}
        Event::Note(n) => bar.suspend(|| eprintln!("{n}")),
    });
    bar.finish_and_clear();
    r
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let cfg = a.config();
    let range = match (&a.shards, a.shard_of) {
        (Some(s), _) => Some(parse_range(s)?),
        (None, Some(of)) => {
            let r = of.range(cfg.num_shards(), |v| std::env::var(v).ok())?;
            eprintln!(
                "--shard-of: making shards {}..{} of {}",
                r.start,
                r.end,
                cfg.num_shards()
            );
            Some(r)
        }
        (None, None) => None,
    };
    let computes = a.compute.open_each(a.devices.as_deref())?;
    let r = generate_on_devices_with_progress(&computes, &a.teacher, &a.out, &cfg, range, a.force)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: {} shard(s) written, {} kept, {} tokens in {:.1}s ({:.0} tokens/s){}",
            r.out.display(),
            r.shards_written,
            r.shards_kept,
            r.tokens_made,
            r.seconds,
            r.tokens_per_second,
            if r.complete { ", corpus complete" } else { "" }
        );
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum CorpusCommand {
    /// Join the manifests (and shards) of corpora made in parts into one corpus.
    Merge {
        /// Corpus folders to join.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Output folder (may be one of the inputs).
        #[arg(long)]
        out: PathBuf,
    },
    /// Re-hash every shard against the manifest.
    Verify { dir: PathBuf },
    /// Samples, tokens, length histogram, finish reasons, distinct-token share.
    Stats {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn corpus(c: CorpusCommand) -> Result<()> {
    match c {
        CorpusCommand::Merge { dirs, out } => {
            let m = corpus::merge(&dirs, &out)?;
            let (rows, tokens) = m.totals();
            println!(
                "{}: {} of {} shard(s), {rows} samples, {tokens} tokens{}",
                out.display(),
                m.shards.len(),
                m.num_shards(),
                if m.is_complete() { ", complete" } else { "" }
            );
        }
        CorpusCommand::Verify { dir } => {
            let r = corpus::verify(&dir)?;
            println!("{r}");
            if !r.is_ok() {
                bail!("corpus {} failed verification", dir.display());
            }
        }
        CorpusCommand::Stats { dir, json } => {
            let s = corpus::stats(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("{s}");
            }
        }
    }
    Ok(())
}
