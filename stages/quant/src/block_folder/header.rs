//! `quantize.json`: the small JSON header of a quantized folder. It says how the folder was
//! made (settings, source) and, for the packed layout, the shape and original dtype of each
//! quantized weight. It is written last, so its presence means the folder is complete, and
//! it is what a second `pipeline quantize` into the same folder compares against.

use super::settings::QuantizeSettings;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const HEADER_FILE: &str = "quantize.json";
/// LoftQ's initial adapters, beside the base they were chosen with.
pub const LOFTQ_FILE: &str = "loftq_adapters.safetensors";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightInfo {
    pub shape: Vec<usize>,
    /// The weight's dtype before quantization (torch name: float32, bfloat16, float16).
    pub dtype: String,
    /// The safetensors file (of the folder) holding it.
    pub file: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizeHeader {
    pub version: u32,
    #[serde(flatten)]
    pub settings: QuantizeSettings,
    pub bits: u32,
    pub nested_block_size: usize,
    /// The model folder it was made from, as given.
    pub source: String,
    pub weights: BTreeMap<String, WeightInfo>,
}

impl QuantizeHeader {
    pub fn read(dir: &Path) -> Result<Option<QuantizeHeader>> {
        let path = dir.join(HEADER_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let h = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a quantize header", path.display()))?;
        Ok(Some(h))
    }
}
