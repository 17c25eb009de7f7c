//! `pipeline sample`: continuations of a prompt from a model (a student, a GGUF or any
//! folder `eval` reads) and, with `--teacher`, from the teacher beside it, with tokens/s and
//! the bytes of the K/V cache, so a person can read what the student writes. Decoding runs
//! through the KV-cache decoder with the model's quantizers (`--w-bits`, `--a-bits`,
//! `--kv-bits`, as `eval`). `--packed` keeps the projections as codes and `--kv-cache int4`
//! (or int8, q8_0, q4_0) the cache: the student as it runs deployed.

use crate::eval_cmd::QuantArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use model::{ModelFolder, QuantConfig};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// The model to sample (a folder, hub id or `.gguf` file).
    #[arg(long)]
    pub model: PathBuf,
    /// A teacher to sample beside it (full precision).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// New tokens to write.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 = greedy (argmax).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Keep the model's projections as low-bit codes + scales (CPU, f32): a packed export's
    /// grids, or the --w-bits grid made on load. The teacher stays dense.
    #[arg(long)]
    pub packed: bool,
    /// How the model's K/V cache is stored: float (the compute dtype), int8, int4, q8_0, q4_0.
    /// The teacher's cache stays float.
    #[arg(long, value_parser = crate::eval_cmd::kv_cache_arg, default_value = "float")]
    pub kv_cache: model::lowbit::KvCacheFormat,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: crate::compute_args::ComputeArgs,
}

struct Continuation {
    prompt_ids: Vec<u32>,
    ids: Vec<u32>,
    text: String,
    tokens_per_second: f64,
    cache_bytes: usize,
    cache_bytes_per_token: usize,
    weight_bytes: usize,
}

fn continue_prompt(
    folder: &ModelFolder,
    quant: QuantConfig,
    deployed: Option<(bool, model::lowbit::KvCacheFormat)>,
    a: &SampleArgs,
    compute: &model::Compute,
) -> Result<Continuation> {
    let tok = folder.tokenizer()?;
    let (packed, format) = deployed.unwrap_or((false, model::lowbit::KvCacheFormat::Float));
    let model = crate::eval_cmd::load_model(folder, quant, packed, compute)?;
    let prompt_ids = eval::encode_text(&tok, &a.prompt, folder.config.bos_token_id)?;
    let total = prompt_ids.len() + a.max_tokens;
    if total > folder.config.usable_context() {
        bail!(
            "--prompt ({} tokens) + --max-tokens {} exceed the model's context of {}",
            prompt_ids.len(),
            a.max_tokens,
            folder.config.usable_context()
        );
    }
    let mut cache = Cache::new(&model, total, format)?;
    let params = generate::sampler::SamplingParams {
        temperature: a.temperature,
        top_k: None,
        top_p: None,
    };
    let mut rng = generate::sampler::SampleRng::new(a.seed);
    let t0 = Instant::now();
    let mut logits = None;
    for &t in &prompt_ids {
        logits = Some(cache.step(&model, t)?);
    }
    let mut ids = Vec::with_capacity(a.max_tokens);
    for _ in 0..a.max_tokens {
        let l: Vec<f32> = logits
            .take()
            .context("an empty prompt")?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        let next = generate::sampler::sample(&l, &params, &mut rng);
        ids.push(next);
        if folder.config.eos_token_ids.contains(&next) || ids.len() == a.max_tokens {
            break;
        }
        logits = Some(cache.step(&model, next)?);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cache_bytes_per_token = cache.bytes_per_token();
    Ok(Continuation {
        cache_bytes: cache_bytes_per_token * cache.len(),
        cache_bytes_per_token,
        weight_bytes: model.projection_bytes(),
        text: tok
            .decode(&ids, true)
            .map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?,
        tokens_per_second: (prompt_ids.len() + ids.len()) as f64 / secs.max(1e-9),
        prompt_ids,
        ids,
    })
}

/// One sequence's cache: the CPU's per-sequence decoder, or on a GPU a one-slot batch cache
/// (whose kernels read low-bit caches and 4-bit weights).
enum Cache {
    Seq(model::decode::SeqCache),
    Slot(Box<model::BatchCache>, usize),
}

impl Cache {
    fn new(
        model: &model::Llama,
        total: usize,
        format: model::lowbit::KvCacheFormat,
    ) -> Result<Self> {
        Ok(if model.device.is_cpu() {
            Cache::Seq(model::decode::SeqCache::with_format(model, total, format)?)
        } else {
            Cache::Slot(
                Box::new(model::BatchCache::with_format(model, 1, total, format)?),
                0,
            )
        })
    }

    /// Logits [1, vocab] after feeding `t`.
    fn step(&mut self, model: &model::Llama, t: u32) -> Result<candle_core::Tensor> {
        Ok(match self {
            Cache::Seq(c) => model.decode_step(&[t], &mut [c])?,
            Cache::Slot(c, n) => {
                *n += 1;
                model.decode_slots(&[Some(t)], c)?
            }
        })
    }

    fn bytes_per_token(&self) -> usize {
        match self {
            Cache::Seq(c) => c.bytes_per_token(),
            Cache::Slot(c, _) => c.bytes_per_token(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Cache::Seq(c) => c.len(),
            Cache::Slot(_, n) => *n,
        }
    }
}

pub fn run(a: SampleArgs) -> Result<()> {
    let quant = a.quant.to_config()?;
    let compute = a.compute.open()?;
    let folder = ModelFolder::open(&a.model)?;
    let mut rows = vec![(
        "model",
        a.model.display().to_string(),
        continue_prompt(
            &folder,
            quant.clone(),
            Some((a.packed, a.kv_cache)),
            &a,
            &compute,
        )?,
    )];
    if let Some(t) = &a.teacher {
        let tf = ModelFolder::open(t)?;
        rows.push((
            "teacher",
            t.display().to_string(),
            continue_prompt(&tf, QuantConfig::none(), None, &a, &compute)?,
        ));
    }
    if a.json {
        let v: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(role, path, c)| {
                (
                    role.to_string(),
                    serde_json::json!({
                        "path": path, "prompt_ids": c.prompt_ids, "ids": c.ids, "text": c.text,
                        "tokens_per_second": c.tokens_per_second, "kv_cache_bytes": c.cache_bytes,
                        "kv_cache_bytes_per_token": c.cache_bytes_per_token,
                        "projection_bytes": c.weight_bytes,
                    }),
                )
            })
            .collect();
        let mut v = serde_json::Value::Object(v);
        v["quant"] = quant.label().into();
        v["weights"] = if a.packed { "packed" } else { "dense" }.into();
        v["kv_cache"] = a.kv_cache.name().into();
        println!("{v}");
    } else {
        for (role, path, c) in &rows {
            println!(
                "== {role} ({path}{}) {:.1} tok/s, K/V cache {} bytes ({} per token), projections {} bytes",
                if *role == "model" {
                    format!(
                        ", {}, {} weights, {} cache",
                        quant.label(),
                        if a.packed { "packed" } else { "dense" },
                        a.kv_cache.name()
                    )
                } else {
                    String::new()
                },
                c.tokens_per_second,
                c.cache_bytes,
                c.cache_bytes_per_token,
                c.weight_bytes
            );
            println!("{}{}\n", a.prompt, c.text);
        }
    }
    Ok(())
}
