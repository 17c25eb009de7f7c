//! What decides the bytes of a block-quantized folder (what the user asks the quantize stage
//! for, and what its quantize.json records), parsed once into types: the code book
//! (`Format`), the on-disk layout (`Layout`), the block settings and LoftQ's. Every invalid
//! value fails here with the field name and the allowed values.

use crate::CodeBook;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The code book of a block-wise quantization, as the user names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Format {
    Nf4,
    Nf3,
    Nf2,
    /// Symmetric uniform with this many bits (2, 3, 4 or 8).
    Int(u32),
}

pub const FORMATS: &str = "nf4, nf3, nf2, int8, int4, int3, int2";

impl Format {
    pub fn parse(s: &str) -> Result<Format> {
        Ok(match s {
            "nf4" => Format::Nf4,
            "nf3" => Format::Nf3,
            "nf2" => Format::Nf2,
            "int8" => Format::Int(8),
            "int4" => Format::Int(4),
            "int3" => Format::Int(3),
            "int2" => Format::Int(2),
            other => bail!("format = {other:?} is not known; allowed: {FORMATS}"),
        })
    }

    pub fn name(&self) -> String {
        match self {
            Format::Nf4 => "nf4".into(),
            Format::Nf3 => "nf3".into(),
            Format::Nf2 => "nf2".into(),
            Format::Int(k) => format!("int{k}"),
        }
    }

    pub fn codebook(&self) -> CodeBook {
        match self {
            Format::Nf4 => CodeBook::Nf4,
            Format::Nf3 => CodeBook::Nf3,
            Format::Nf2 => CodeBook::Nf2,
            Format::Int(k) => CodeBook::Int(*k),
        }
    }

    pub fn bits(&self) -> u32 {
        self.codebook().bits()
    }
}

impl TryFrom<String> for Format {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Format> {
        Format::parse(&s)
    }
}

impl From<Format> for String {
    fn from(f: Format) -> String {
        f.name()
    }
}

/// How the quantized tensors are laid out in the output safetensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Hugging Face's bitsandbytes 4-bit serialization (`Linear4bit`), NF4 only.
    Bnb,
    /// Our own: codes packed densely at k bits, scales, code book; described by quantize.json.
    Packed,
}

impl Layout {
    pub fn parse(s: &str) -> Result<Layout> {
        match s {
            "bnb" => Ok(Layout::Bnb),
            "packed" => Ok(Layout::Packed),
            other => bail!("layout = {other:?} is not known; allowed: bnb, packed"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Layout::Bnb => "bnb",
            Layout::Packed => "packed",
        }
    }
}

/// The projections the stage quantizes in every decoder layer.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Modules left in full precision by default (also what transformers must not convert).
pub const DEFAULT_SKIP: [&str; 2] = ["lm_head", "embed_tokens"];

/// Everything that decides the bytes of a quantized folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizeSettings {
    pub format: Format,
    pub layout: Layout,
    pub block_size: usize,
    pub double_quant: bool,
    /// Module names (a path component such as `down_proj` or `layers.3`) kept unquantized.
    pub skip: Vec<String>,
    /// LoftQ: the base chosen together with initial LoRA adapters (absent: plain block
    /// quantization; left out of quantize.json then, so older folders read the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loftq: Option<LoftqSettings>,
}

impl QuantizeSettings {
    /// Validated settings; `layout` None picks bnb for nf4 and packed for the rest.
    pub fn new(
        format: &str,
        layout: Option<&str>,
        block_size: usize,
        double_quant: bool,
        skip: Vec<String>,
    ) -> Result<QuantizeSettings> {
        let format = Format::parse(format)?;
        let layout = match layout {
            Some(l) => Layout::parse(l)?,
            None if format == Format::Nf4 => Layout::Bnb,
            None => Layout::Packed,
        };
        check_block_size(block_size)?;
        if layout == Layout::Bnb && format != Format::Nf4 {
            bail!(
                "layout = \"bnb\" holds only nf4 (bitsandbytes' 4-bit format); format = {:?} needs layout = \"packed\"",
                format.name()
            );
        }
        let skip: Vec<String> = skip
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        Ok(QuantizeSettings {
            format,
            layout,
            block_size,
            double_quant,
            skip,
            loftq: None,
        })
    }

    /// The same settings with LoftQ initialisation (validated).
    pub fn with_loftq(mut self, loftq: LoftqSettings) -> Result<QuantizeSettings> {
        loftq.validate()?;
        self.loftq = Some(loftq);
        Ok(self)
    }

    /// Is `name` (a checkpoint tensor) one of the projection weights this run quantizes?
    pub fn quantizes(&self, name: &str) -> bool {
        let Some(module) = name.strip_suffix(".weight") else {
            return false;
        };
        let parts: Vec<&str> = module.split('.').collect();
        let is_projection = parts.last().is_some_and(|p| PROJECTIONS.contains(p));
        let skipped = self.skip.iter().any(|s| {
            let want: Vec<&str> = s.split('.').collect();
            parts.windows(want.len()).any(|w| w == want.as_slice())
        });
        is_projection && !skipped
    }
}

/// The LoftQ part of a quantization: which projections get adapters, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoftqSettings {
    /// r, the adapters' rank.
    pub rank: usize,
    /// T, the alternating steps (1 = peft's default).
    pub iters: u32,
    /// LoRA's alpha; the adapters are applied as (alpha / r) B A.
    pub alpha: f64,
    /// Projection names (q_proj, ..., down_proj) that get adapters; the others are quantized
    /// plainly.
    pub targets: Vec<String>,
}

impl LoftqSettings {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("loftq rank = 0 is not allowed; allowed: an integer >= 1");
        }
        if self.iters == 0 {
            bail!("loftq_iters = 0 is not allowed; allowed: an integer >= 1");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!(
                "lora_alpha = {} is not allowed; allowed: a finite number > 0",
                self.alpha
            );
        }
        if self.targets.is_empty() {
            bail!(
                "lora_targets is empty; allowed: one or more of {:?}",
                PROJECTIONS
            );
        }
        for t in &self.targets {
            if !PROJECTIONS.contains(&t.as_str()) {
                bail!(
                    "lora_targets: {t:?} is not a projection; allowed: {:?}",
                    PROJECTIONS
                );
            }
        }
        Ok(())
    }

    /// alpha / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Does the weight `name` (`model.layers.3.mlp.up_proj.weight`) get adapters?
    pub fn targets_weight(&self, name: &str) -> bool {
        name.strip_suffix(".weight")
            .and_then(|m| m.rsplit('.').next())
            .is_some_and(|p| self.targets.iter().any(|t| t == p))
    }
}

/// bitsandbytes' kernels take power-of-two blocks from 32 to 4096; so does the packed
/// layout, whose blocks then always fill whole bytes (32 * k bits).
pub fn check_block_size(block_size: usize) -> Result<()> {
    if !(32..=4096).contains(&block_size) || !block_size.is_power_of_two() {
        bail!("block_size = {block_size} is not allowed; allowed: a power of two from 32 to 4096 (32, 64, 128, ..., 4096)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_defaults() {
        let s = QuantizeSettings::new("nf4", None, 64, true, vec!["lm_head".into()]).unwrap();
        assert_eq!(s.layout, Layout::Bnb);
        let s = QuantizeSettings::new("int3", None, 128, false, vec![]).unwrap();
        assert_eq!((s.layout, s.format.bits()), (Layout::Packed, 3));
        for f in ["nf4", "nf3", "nf2", "int8", "int4", "int3", "int2"] {
            assert_eq!(Format::parse(f).unwrap().name(), f);
        }
    }

    #[test]
    fn rejects_bad_values_with_the_field() {
        let e = QuantizeSettings::new("nf5", None, 64, true, vec![]).unwrap_err();
        assert!(format!("{e}").contains("format = \"nf5\""), "{e}");
        for b in [0, 16, 48, 8192] {
            let e = QuantizeSettings::new("nf4", None, b, true, vec![]).unwrap_err();
            assert!(format!("{e}").contains(&format!("block_size = {b}")), "{e}");
        }
        let e = QuantizeSettings::new("nf3", Some("bnb"), 64, true, vec![]).unwrap_err();
        assert!(format!("{e}").contains("layout = \"bnb\""), "{e}");
    }

    #[test]
    fn selects_projection_weights_minus_skipped() {
        let s = QuantizeSettings::new(
            "nf4",
            None,
            64,
            true,
            vec!["down_proj".into(), "layers.1".into()],
        )
        .unwrap();
        assert!(s.quantizes("model.layers.0.self_attn.q_proj.weight"));
        assert!(s.quantizes("model.layers.10.mlp.up_proj.weight"));
        assert!(!s.quantizes("model.layers.0.mlp.down_proj.weight"));
        assert!(!s.quantizes("model.layers.1.self_attn.q_proj.weight"));
        assert!(!s.quantizes("model.layers.0.self_attn.q_proj.bias"));
        assert!(!s.quantizes("model.embed_tokens.weight"));
        assert!(!s.quantizes("lm_head.weight"));
        assert!(!s.quantizes("model.layers.0.input_layernorm.weight"));
    }
}
