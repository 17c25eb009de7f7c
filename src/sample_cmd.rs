//! `pipeline sample`: continuations of a prompt from a model (a student, a GGUF or any
//! folder `eval` reads) and, with `--teacher`, from the teacher beside it, with tokens/s and
//! the bytes of the K/V cache, so a person can read what the student writes. Decoding runs
//! through the KV-cache decoder with the model's quantizers (`--w-bits`, `--a-bits`,
//! `--kv-bits`, as `eval`); the cache itself is stored in the compute dtype.

use crate::eval_cmd::QuantArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use model::{Llama, ModelFolder, QuantConfig};
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
}

fn continue_prompt(
    folder: &ModelFolder,
    quant: QuantConfig,
    a: &SampleArgs,
    compute: &model::Compute,
) -> Result<Continuation> {
    let tok = folder.tokenizer()?;
    let model = Llama::load(folder, quant, &compute.device)?.cast(compute.dtype)?;
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
    let mut cache = model::decode::SeqCache::new(&model, total)?;
    let params = generate::sampler::SamplingParams {
        temperature: a.temperature,
        top_k: None,
        top_p: None,
    };
    let mut rng = generate::sampler::SampleRng::new(a.seed);
    let t0 = Instant::now();
    let mut logits = None;
    for &t in &prompt_ids {
        logits = Some(model.decode_step(&[t], &mut [&mut cache])?);
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
        logits = Some(model.decode_step(&[next], &mut [&mut cache])?);
    }
    let secs = t0.elapsed().as_secs_f64();
    let c = &folder.config;
    let cache_bytes = c.num_hidden_layers
        * 2
        * c.num_key_value_heads
        * c.head_dim
        * cache.len()
        * compute.dtype.size_in_bytes();
    Ok(Continuation {
        text: tok
            .decode(&ids, true)
            .map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?,
        tokens_per_second: (prompt_ids.len() + ids.len()) as f64 / secs.max(1e-9),
        prompt_ids,
        ids,
        cache_bytes,
    })
}

pub fn run(a: SampleArgs) -> Result<()> {
    let quant = a.quant.to_config()?;
    let compute = a.compute.open()?;
    let folder = ModelFolder::open(&a.model)?;
    let mut rows = vec![(
        "model",
        a.model.display().to_string(),
        continue_prompt(&folder, quant.clone(), &a, &compute)?,
    )];
    if let Some(t) = &a.teacher {
        let tf = ModelFolder::open(t)?;
        rows.push((
            "teacher",
            t.display().to_string(),
            continue_prompt(&tf, QuantConfig::none(), &a, &compute)?,
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
                    }),
                )
            })
            .collect();
        let mut v = serde_json::Value::Object(v);
        v["quant"] = quant.label().into();
        println!("{v}");
    } else {
        for (role, path, c) in &rows {
            println!(
                "== {role} ({path}{}) {:.1} tok/s, K/V cache {} bytes",
                if *role == "model" {
                    format!(", {}", quant.label())
                } else {
                    String::new()
                },
                c.tokens_per_second,
                c.cache_bytes
            );
            println!("{}{}\n", a.prompt, c.text);
        }
    }
    Ok(())
}
