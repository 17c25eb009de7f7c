//! `pipeline synth-model`: a random-weight Llama folder of a real model's shape, for speed
//! measurements.

use anyhow::Result;
use model::ModelFolder;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// Writes the folder, checks that it opens with its tokenizer, and returns what was written.
pub fn synth(
    shape: model::synth::SynthShape,
    out: &Path,
    seed: u64,
    tokenizer: Option<&Path>,
) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    model::synth::write_synthetic_model(shape, out, seed, tokenizer)?;
    let folder = ModelFolder::open(out)?;
    folder.tokenizer()?;
    let params: usize = model::llama::expected_tensors(&folder.config)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    Ok(
        json!({"out": out.display().to_string(), "parameters": params,
              "seconds": t0.elapsed().as_secs_f64()}),
    )
}
