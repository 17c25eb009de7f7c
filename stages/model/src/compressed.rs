//! compressed-tensors `pack-quantized` checkpoints (what llm-compressor writes and vLLM and
//! transformers load): symmetric integer weights packed into int32 words, with
//! `weight_scale` per output channel or group and `weight_shape`. Read here as f32 weights,
//! code * scale. Whatever would change the values and is not reproduced (asymmetric
//! zero points, float formats, other compression formats) is refused with the field.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The weight scheme of a `quantization_config` (one scheme for every quantized layer).
#[derive(Debug, Clone, PartialEq)]
pub struct Scheme {
    pub num_bits: u32,
}

/// A dequantized weight: name, shape, values.
pub type Dequantized = (String, Vec<usize>, Vec<f32>);

const SUFFIXES: [&str; 3] = ["weight_packed", "weight_scale", "weight_shape"];

/// Is `name` one of the stored forms of a packed weight?
pub fn is_packed_tensor(name: &str) -> bool {
    SUFFIXES
        .iter()
        .any(|s| name.strip_suffix(s).is_some_and(|p| p.ends_with('.')))
}

impl Scheme {
    /// The scheme of `config.json`'s compressed-tensors `quantization_config`; `None` when it
    /// has none (or another quant_method).
    pub fn read(config: &Path) -> Result<Option<Scheme>> {
        let Ok(text) = std::fs::read_to_string(config) else {
            return Ok(None);
        };
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", config.display()))?;
        let q = &v["quantization_config"];
        if q["quant_method"] != "compressed-tensors" {
            return Ok(None);
        }
        let at = |f: &str| format!("{}: quantization_config.{f}", config.display());
        if q["format"] != "pack-quantized" {
            bail!(
                "{} = {}: only \"pack-quantized\" checkpoints can be read",
                at("format"),
                q["format"]
            );
        }
        let groups = q["config_groups"]
            .as_object()
            .with_context(|| format!("{} is missing", at("config_groups")))?;
        let mut bits = None;
        for (g, s) in groups {
            let w = &s["weights"];
            let f = |k: &str| at(&format!("config_groups.{g}.weights.{k}"));
            if w["type"] != "int" {
                bail!(
                    "{} = {}: only \"int\" weights can be read",
                    f("type"),
                    w["type"]
                );
            }
            if w["symmetric"] != true {
                bail!(
                    "{} = {}: only symmetric weights can be read",
                    f("symmetric"),
                    w["symmetric"]
                );
            }
            if !matches!(w["strategy"].as_str(), Some("channel" | "group")) {
                bail!(
                    "{} = {}: allowed values are \"channel\" and \"group\"",
                    f("strategy"),
                    w["strategy"]
                );
            }
            let b = w["num_bits"]
                .as_u64()
                .filter(|b| (2..=8).contains(b))
                .with_context(|| {
                    format!(
                        "{} = {}: allowed values are 2..=8",
                        f("num_bits"),
                        w["num_bits"]
                    )
                })? as u32;
            if bits.is_some_and(|x| x != b) {
                bail!(
                    "{}: groups of different bit widths are not supported",
                    at("config_groups")
                );
            }
            bits = Some(b);
        }
        let num_bits = bits.with_context(|| format!("{} is empty", at("config_groups")))?;
        Ok(Some(Scheme { num_bits }))
    }

    /// Every packed weight of the safetensors file `st` (read from `file`), dequantized:
    /// (name, shape, values).
    pub fn dequantize(
        &self,
        st: &safetensors::SafeTensors,
        file: &Path,
    ) -> Result<Vec<Dequantized>> {
        let mut out = Vec::new();
        for (name, packed) in st.tensors() {
            let Some(module) = name.strip_suffix(".weight_packed") else {
                if name.ends_with(".weight_zero_point") {
                    bail!(
                        "{}: tensor {name}: asymmetric weights (zero points) cannot be read",
                        file.display()
                    );
                }
                continue;
            };
            let get = |s: &str| {
                st.tensor(&format!("{module}.{s}"))
                    .map_err(|_| anyhow::anyhow!("{}: missing tensor {module}.{s}", file.display()))
            };
            let shape_t = get("weight_shape")?;
            let dims: Vec<i64> = match shape_t.dtype() {
                safetensors::Dtype::I64 => shape_t
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I32 => shape_t
                    .data()
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                    .collect(),
                d => bail!(
                    "{}: tensor {module}.weight_shape has dtype {d:?}",
                    file.display()
                ),
            };
            let [rows, cols] = dims[..] else {
                bail!(
                    "{}: tensor {module}.weight_shape = {dims:?}: expected 2 dims",
                    file.display()
                );
            };
            if rows <= 0 || cols <= 0 || rows.checked_mul(cols).is_none_or(|n| n > 1 << 40) {
                bail!(
                    "{}: tensor {module}.weight_shape = {dims:?} is not a valid shape",
                    file.display()
                );
            }
            let (rows, cols) = (rows as usize, cols as usize);
            if packed.dtype() != safetensors::Dtype::I32 {
                bail!(
                    "{}: tensor {name} has dtype {:?}, expected I32",
                    file.display(),
                    packed.dtype()
                );
            }
            let words: Vec<i32> = packed
                .data()
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let codes = quant::compressed::unpack_int32(&words, rows, cols, self.num_bits)
                .with_context(|| {
                    format!(
                        "{}: tensor {name} has shape {:?}; {rows} x {cols} at {} bits needs [{rows}, {}]",
                        file.display(),
                        packed.shape(),
                        self.num_bits,
                        (cols * self.num_bits as usize).div_ceil(32)
                    )
                })?;
            let scale_t = get("weight_scale")?;
            let scales: Vec<f32> = match scale_t.dtype() {
                safetensors::Dtype::F32 => scale_t
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::F16 => scale_t
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::BF16 => scale_t
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                d => bail!(
                    "{}: tensor {module}.weight_scale has dtype {d:?}",
                    file.display()
                ),
            };
            let groups = match scale_t.shape() {
                [r, g] if *r == rows && *g >= 1 && cols % g == 0 => *g,
                s => bail!(
                    "{}: tensor {module}.weight_scale has shape {s:?}; expected [{rows}, groups] with groups dividing {cols}",
                    file.display()
                ),
            };
            let group = cols / groups;
            let values = codes
                .iter()
                .enumerate()
                .map(|(i, c)| *c as f32 * scales[(i / cols) * groups + (i % cols) / group])
                .collect();
            out.push((format!("{module}.weight"), vec![rows, cols], values));
        }
        Ok(out)
    }
}
