//! A finished student as the export reads it: its folder (`train/student/`: config,
//! tokenizer, latent f32 weights) and its quantizers (`quantization.json`), with each
//! projection put on the integer grid it was trained on.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use model::{ModelFolder, QuantConfig};
use quant::GridWeight;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The projections whose weights are quantized (DESIGN.md: the 7 linear layers of a block).
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

pub fn is_projection(name: &str) -> bool {
    name.starts_with("model.layers.") && PROJECTIONS.iter().any(|p| name.ends_with(p))
}

pub struct Student {
    /// The student folder (config.json, tokenizer.json, model.safetensors, quantization.json).
    pub dir: PathBuf,
    pub name: String,
    pub config: model::config::LlamaConfig,
    pub config_path: PathBuf,
    pub quant: QuantConfig,
    pub quant_path: PathBuf,
    pub weights_path: PathBuf,
    /// Every tensor (name, shape, f32 values), sorted by name.
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// Each projection's trained grid (empty when the student has no weight quantizer).
    pub grids: BTreeMap<String, GridWeight>,
}

impl Student {
    /// `path` is a train output folder (its `student/` is read) or a student folder itself.
    pub fn open(path: &Path) -> Result<Student> {
        let dir = if path.join("student").join("model.safetensors").is_file() {
            path.join("student")
        } else {
            path.to_path_buf()
        };
        let weights_path = dir.join("model.safetensors");
        if !weights_path.is_file() {
            bail!(
                "--student {}: no finished student ({} is missing); train to the last step first",
                path.display(),
                path.join("student").join("model.safetensors").display()
            );
        }
        let quant_path = dir.join("quantization.json");
        let text = std::fs::read_to_string(&quant_path).with_context(|| {
            format!(
                "--student {}: {} is missing: without the quantizers it was trained with, its grid is unknown",
                path.display(),
                quant_path.display()
            )
        })?;
        let quant: QuantConfig = serde_json::from_str(&text).with_context(|| {
            format!("{}: not a quantization settings file", quant_path.display())
        })?;
        quant
            .validate()
            .with_context(|| format!("{}", quant_path.display()))?;
        let folder = ModelFolder::open(&dir)?;
        let mut tensors: Vec<_> = folder
            .load_tensors(&Device::Cpu)?
            .into_iter()
            .map(|(n, t)| -> Result<_> {
                let shape = t.dims().to_vec();
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                Ok((n, shape, v))
            })
            .collect::<Result<_>>()?;
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut grids = BTreeMap::new();
        // A student stored on its grid (an LR-QAT student: packed integers and scales).
        if let Some(h) = quant::packed::PackedHeader::read(&dir)? {
            grids = quant::packed::read_grids(&h, &weights_path)?;
        } else if let Some(bits) = quant.w_bits {
            for (name, shape, v) in &tensors {
                if is_projection(name) {
                    let [rows, cols] = shape[..] else {
                        bail!(
                            "{}: {name} has shape {shape:?}, expected 2 dims",
                            weights_path.display()
                        );
                    };
                    let g = GridWeight::minmax(v, rows, cols, bits, quant.w_group, quant.w_scale);
                    grids.insert(name.clone(), g);
                }
            }
        }
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| {
                let d = if d.file_name().is_some_and(|n| n == "student") {
                    d.parent()?.parent()?.to_path_buf()
                } else {
                    d
                };
                d.file_name().map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "student".into());
        Ok(Student {
            config_path: dir.join("config.json"),
            config: folder.config,
            dir,
            name,
            quant,
            quant_path,
            weights_path,
            tensors,
            grids,
        })
    }

    /// The weights the student computes with: a projection's grid values, else as stored.
    pub fn trained(&self, name: &str) -> Option<Vec<f32>> {
        if let Some(g) = self.grids.get(name) {
            return Some(g.values());
        }
        self.tensors
            .iter()
            .find(|t| t.0 == name)
            .map(|t| t.2.clone())
    }

    /// The grids' bit width; refuses a student with no weight grid for a low-bit format.
    pub fn require_grid(&self, format: &str) -> Result<u32> {
        if let Some(g) = self.grids.values().next() {
            if let Some(o) = self.grids.iter().find(|(_, o)| o.bits != g.bits) {
                bail!("--format {format}: {} has grids of {} and {} bits; one width per model is supported", o.0, g.bits, o.1.bits);
            }
            return Ok(g.bits);
        }
        self.quant.w_bits.with_context(|| {
            format!(
                "--format {format}: {} says w_bits none: this student's weights are not on an integer grid (a qlora or loftq student's folder holds its base and adapters merged); use --format hf",
                self.quant_path.display()
            )
        })
    }
}
