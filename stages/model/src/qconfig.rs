//! The quantization seam: which tensors of a decoder block are fake-quantized, and how.
//! Granularity follows DESIGN.md: weights per output channel (or per group of k inputs),
//! activations per token, K and V per token across all KV heads of the layer.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Where K is quantized: after RoPE (what a real low-bit cache stores) or right after k_proj.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvPoint {
    #[default]
    PostRope,
    PreRope,
}

impl std::str::FromStr for KvPoint {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "post_rope" => Ok(KvPoint::PostRope),
            "pre_rope" => Ok(KvPoint::PreRope),
            other => {
                bail!("kv_point = {other:?}: allowed values are \"post_rope\" and \"pre_rope\"")
            }
        }
    }
}

/// How K and V are rounded: in their own basis, or in each head's Hadamard basis
/// (`kv_rotation.rs`), which spreads outlier channels before the per-token absmax.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvRotation {
    #[default]
    None,
    Hadamard,
}

impl KvRotation {
    pub fn is_none(&self) -> bool {
        *self == KvRotation::None
    }
}

impl std::str::FromStr for KvRotation {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(KvRotation::None),
            "hadamard" => Ok(KvRotation::Hadamard),
            other => bail!("kv_rotation = {other:?}: allowed values are \"none\" and \"hadamard\""),
        }
    }
}

/// `None` bits mean "not quantized" (16 / none in user input).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantConfig {
    pub w_bits: Option<u32>,
    /// Per-group size along the input dimension; `None` = per output channel.
    pub w_group: Option<usize>,
    pub a_bits: Option<u32>,
    pub kv_bits: Option<u32>,
    #[serde(default)]
    pub kv_point: KvPoint,
    /// Left out of the JSON when off, so fingerprints of runs made before it existed hold.
    #[serde(default, skip_serializing_if = "KvRotation::is_none")]
    pub kv_rotation: KvRotation,
    /// The type weight scales are rounded to before codes are chosen (f16 makes a GGUF
    /// export exact); left out of the JSON when f32, as before it existed.
    #[serde(default, skip_serializing_if = "quant::ScaleDtype::is_f32")]
    pub w_scale: quant::ScaleDtype,
}

/// Parses a user's bit width: 2..=8 quantize, 16 or 32 mean "off".
pub fn parse_bits(field: &str, bits: u32) -> Result<Option<u32>> {
    match bits {
        2..=8 => Ok(Some(bits)),
        16 | 32 => Ok(None),
        _ => bail!("{field} = {bits}: allowed values are 2..=8, or 16 / none for no quantization"),
    }
}

impl QuantConfig {
    pub fn none() -> Self {
        Self::default()
    }

    pub fn validate(&self) -> Result<()> {
        for (field, bits) in [
            ("w_bits", self.w_bits),
            ("a_bits", self.a_bits),
            ("kv_bits", self.kv_bits),
        ] {
            if let Some(b) = bits {
                if !(2..=8).contains(&b) {
                    bail!(
                        "{field} = {b}: allowed values are 2..=8, or 16 / none for no quantization"
                    );
                }
            }
        }
        if self.w_group == Some(0) {
            bail!("w_group = 0: a group size must be at least 1 (or absent for per-channel)");
        }
        Ok(())
    }

    /// Checks what depends on the model's shape: a Hadamard rotation needs a power-of-two
    /// head_dim.
    pub fn check_model(&self, head_dim: usize) -> Result<()> {
        if self.kv_bits.is_some()
            && self.kv_rotation == KvRotation::Hadamard
            && !head_dim.is_power_of_two()
        {
            bail!("kv_rotation = \"hadamard\" needs the model's head_dim to be a power of two, and it is {head_dim}: use kv_rotation = \"none\"");
        }
        Ok(())
    }

    pub fn is_off(&self) -> bool {
        self.w_bits.is_none() && self.a_bits.is_none() && self.kv_bits.is_none()
    }

    /// Short label such as `w4a8kv4` or `fp`.
    pub fn label(&self) -> String {
        if self.is_off() {
            return "fp".into();
        }
        let mut s = String::new();
        if let Some(b) = self.w_bits {
            s += &format!("w{b}");
            if let Some(g) = self.w_group {
                s += &format!("g{g}");
            }
        }
        if let Some(b) = self.a_bits {
            s += &format!("a{b}");
        }
        if let Some(b) = self.kv_bits {
            s += &format!("kv{b}");
            if self.kv_point == KvPoint::PreRope {
                s += "_pre_rope";
            }
            if self.kv_rotation == KvRotation::Hadamard {
                s += "_hadamard";
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hadamard_rotation_needs_a_power_of_two_head_dim() {
        let q = QuantConfig {
            kv_bits: Some(4),
            kv_rotation: KvRotation::Hadamard,
            ..Default::default()
        };
        assert!(q.check_model(64).is_ok());
        let e = q.check_model(80).unwrap_err().to_string();
        assert!(e.contains("kv_rotation") && e.contains("80"), "{e}");
        assert_eq!(q.label(), "kv4_hadamard");
        // Off, it stays out of the serialized form (older fingerprints hold).
        let off = serde_json::to_string(&QuantConfig::none()).unwrap();
        assert!(!off.contains("kv_rotation"), "{off}");
        assert_eq!(
            "hadamard".parse::<KvRotation>().unwrap(),
            KvRotation::Hadamard
        );
        assert!("givens".parse::<KvRotation>().is_err());
    }
}
