//! The export stage: a trained student written as the real low-bit weights it was trained on,
//! in a format another tool loads (`gguf` for llama.cpp, `compressed-tensors` for vLLM and
//! transformers, our own `packed`, or plain floats as `hf`), with `export.json` saying what
//! was stored: sizes, bits per weight, the largest change against the trained grid (0 when
//! exact), the tensors kept as floats and why, and the perplexity of the export as loaded back.
//!
//! Nothing is re-rounded by another tool's rules: a grid a format cannot hold is refused
//! (naming the format and the setting), a tensor whose rows the format's blocks cannot tile
//! is stored as floats holding exactly its grid values.

pub mod formats;
pub mod gguf;
pub mod student;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
pub use student::Student;

pub const REPORT_FILE: &str = "export.json";
/// The GGUF file of a `gguf` export; the other formats write a `model/` folder.
pub const GGUF_FILE: &str = "model.gguf";
pub const MODEL_DIR: &str = "model";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Gguf,
    CompressedTensors,
    Packed,
    Hf,
}

impl Format {
    pub const ALL: [Format; 4] = [
        Format::Gguf,
        Format::CompressedTensors,
        Format::Packed,
        Format::Hf,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Format::Gguf => "gguf",
            Format::CompressedTensors => "compressed-tensors",
            Format::Packed => "packed",
            Format::Hf => "hf",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == s)
    }

    /// Where the model lands inside the export folder.
    pub fn model_path(&self, out: &Path) -> PathBuf {
        match self {
            Format::Gguf => out.join(GGUF_FILE),
            _ => out.join(MODEL_DIR),
        }
    }
}

/// Why a quantized projection is stored as floats.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AsFloat {
    pub reason: String,
    pub dtype: String,
}

/// What a format wrote, tensor by tensor, against the student's trained weights.
pub struct Written<'a> {
    student: &'a Student,
    pub max_change: f32,
    pub changed: usize,
    pub quantized_values: usize,
    pub quantized_bytes: usize,
    pub types: BTreeMap<String, usize>,
    pub as_float: BTreeMap<String, AsFloat>,
    pub notes: Vec<String>,
}

impl<'a> Written<'a> {
    fn new(student: &'a Student) -> Self {
        Written {
            student,
            max_change: 0.0,
            changed: 0,
            quantized_values: 0,
            quantized_bytes: 0,
            types: BTreeMap::new(),
            as_float: BTreeMap::new(),
            notes: Vec::new(),
        }
    }

    /// `stored` (rows in the stored order: row i is the student's row `order[i]`) against
    /// the student's trained weight `name`.
    fn compare(&mut self, name: &str, stored: &[f32], order: Option<&[usize]>, cols: usize) {
        let trained = self.student.trained(name).expect("a tensor of the student");
        for (i, v) in stored.iter().enumerate() {
            let (r, c) = (i / cols, i % cols);
            let r = order.map_or(r, |o| o[r]);
            let t = trained[r * cols + c];
            // -0.0 and +0.0 are one weight.
            if *v != t {
                self.changed += 1;
                self.max_change = self.max_change.max((v - t).abs());
            }
        }
    }

    /// A projection stored on its grid as `type_name` in `bytes` bytes.
    pub fn grid(
        &mut self,
        name: &str,
        type_name: &str,
        stored: &[f32],
        order: Option<&[usize]>,
        cols: usize,
        bytes: usize,
    ) {
        self.compare(name, stored, order, cols);
        self.quantized_values += stored.len();
        self.quantized_bytes += bytes;
        *self.types.entry(type_name.to_string()).or_default() += 1;
    }

    /// A projection stored as floats.
    pub fn float(
        &mut self,
        name: &str,
        why: AsFloat,
        stored: &[f32],
        order: Option<&[usize]>,
        cols: usize,
    ) {
        self.compare(name, stored, order, cols);
        self.quantized_values += stored.len();
        let size = match why.dtype.as_str() {
            "F32" | "float32" => 4,
            _ => 2,
        };
        self.quantized_bytes += stored.len() * size;
        *self.types.entry(why.dtype.clone()).or_default() += 1;
        self.as_float.insert(name.to_string(), why);
    }

    pub fn note(&mut self, s: &str) {
        self.notes.push(s.to_string());
    }
}

/// The perplexities of the student (fake-quantized, as trained) and of the export as loaded
/// back (its stored weights, the student's activation and K/V quantizers), on one text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExportPpl {
    pub text: String,
    pub tokens: usize,
    pub ctx: usize,
    pub student: f64,
    pub export: f64,
    pub relative_change: f64,
    /// The quantizers applied on top of the export's weights (activations, K/V).
    pub runtime_quant: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExportReport {
    pub format: Format,
    pub student: String,
    /// sha256 of the student's model.safetensors and quantization.json: what was exported.
    pub student_sha256: String,
    /// The student's quantizers (e.g. w4a8kv4) and scale type.
    pub quant: String,
    pub scale_dtype: String,
    /// The file or folder of the model.
    pub model: String,
    pub file_size_bytes: u64,
    /// Bits per weight of the 7 projections as stored (codes, scales and block headers).
    pub bits_per_weight: f64,
    /// Bits per parameter of the whole file or folder.
    pub bits_per_parameter: f64,
    pub parameters: usize,
    /// The largest |stored - trained| over the projections' weights: 0 when exact.
    pub max_weight_change: f32,
    pub weights_changed: usize,
    /// How many projections were stored as each type.
    pub types: BTreeMap<String, usize>,
    /// Projections stored as floats (exactly their grid values), with the reason.
    pub as_float: BTreeMap<String, AsFloat>,
    pub notes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppl: Option<ExportPpl>,
    pub seconds: f64,
}

/// What to export and how.
pub struct ExportSpec {
    pub format: Format,
    /// hf only: f32, f16 or bf16.
    pub dtype: String,
    /// Score the student and the export on this text (export.json `ppl`).
    pub text: Option<PathBuf>,
    /// Score only the first N tokens.
    pub max_tokens: Option<usize>,
}

fn student_sha256(s: &Student) -> Result<String> {
    let mut h = Sha256::new();
    for p in [&s.weights_path, &s.quant_path] {
        h.update(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?);
    }
    Ok(hex::encode(h.finalize()))
}

/// An export folder may be written into when it is new, empty, or holds only what an
/// interrupted export of the same kind leaves; one holding another export is refused.
fn check_out(out: &Path, spec: &ExportSpec, sha: &str) -> Result<Option<ExportReport>> {
    if !out.exists() {
        return Ok(None);
    }
    let report = out.join(REPORT_FILE);
    if report.is_file() {
        let r: ExportReport = serde_json::from_str(&std::fs::read_to_string(&report)?)
            .with_context(|| format!("{}: not an export report", report.display()))?;
        if r.format == spec.format
            && r.student_sha256 == sha
            && (spec.text.is_none() || r.ppl.is_some())
        {
            return Ok(Some(r));
        }
        bail!(
            "--out {}: holds another export ({} of the student {}, sha256 {}); export into a new folder",
            out.display(),
            r.format.name(),
            r.student,
            &r.student_sha256[..12.min(r.student_sha256.len())]
        );
    }
    // stage.json: `pipeline run`'s marker of its export stage folder.
    let ours = [GGUF_FILE, MODEL_DIR, "stage.json"];
    for e in std::fs::read_dir(out).with_context(|| format!("cannot read {}", out.display()))? {
        let n = e?.file_name().to_string_lossy().into_owned();
        if !ours.contains(&n.as_str()) && !n.starts_with('.') {
            bail!(
                "--out {}: holds {n}, which is not part of an export; export into a new folder",
                out.display()
            );
        }
    }
    Ok(None)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    corpus::fsio::write_atomic(path, bytes)
}

fn size_of(p: &Path) -> Result<u64> {
    if p.is_file() {
        return Ok(std::fs::metadata(p)?.len());
    }
    let mut n = 0;
    for e in std::fs::read_dir(p)? {
        n += e?.metadata()?.len();
    }
    Ok(n)
}

/// Exports the student of `student` (a train output folder or a student folder) into `out`.
/// Rerunning after an interruption finishes it; a finished identical export is left as is.
pub fn export(student: &Path, out: &Path, spec: &ExportSpec) -> Result<ExportReport> {
    let t0 = std::time::Instant::now();
    let s = Student::open(student)?;
    let sha = student_sha256(&s)?;
    if let Some(done) = check_out(out, spec, &sha)? {
        return Ok(done);
    }
    corpus::fsio::create_out_dir(out)?;
    let mut w = Written::new(&s);
    let model_path = spec.format.model_path(out);
    match spec.format {
        Format::Gguf => {
            s.require_grid("gguf")?;
            let bytes = gguf::write(&s, &mut w)?;
            write_file(&model_path, &bytes)?;
        }
        f => {
            let files = match f {
                Format::CompressedTensors => formats::compressed_tensors(&s, &mut w)?,
                Format::Packed => formats::packed(&s, &mut w)?,
                _ => formats::hf(&s, &spec.dtype, &mut w)?,
            };
            train::checkpoint::write_folder(&model_path, &files)?;
        }
    }
    let parameters: usize = s
        .tensors
        .iter()
        .filter(|t| !(t.0 == "lm_head.weight" && s.config.tie_word_embeddings))
        .map(|t| t.2.len())
        .sum();
    let file_size_bytes = size_of(&model_path)?;
    let ppl = match &spec.text {
        Some(text) => Some(score(&s, &model_path, text, spec.max_tokens)?),
        None => None,
    };
    let report = ExportReport {
        format: spec.format,
        student: s.dir.display().to_string(),
        student_sha256: sha,
        quant: s.quant.label(),
        scale_dtype: s.quant.w_scale.name().into(),
        model: model_path.display().to_string(),
        file_size_bytes,
        bits_per_weight: if w.quantized_values > 0 {
            w.quantized_bytes as f64 * 8.0 / w.quantized_values as f64
        } else {
            0.0
        },
        bits_per_parameter: file_size_bytes as f64 * 8.0 / parameters.max(1) as f64,
        parameters,
        max_weight_change: w.max_change,
        weights_changed: w.changed,
        types: w.types,
        as_float: w.as_float,
        notes: w.notes,
        ppl,
        seconds: t0.elapsed().as_secs_f64(),
    };
    write_file(&out.join(REPORT_FILE), &serde_json::to_vec_pretty(&report)?)?;
    Ok(report)
}

/// Perplexity of the student (its own quantizers on its latent weights) and of the export as
/// loaded back by our loaders (stored weights, the student's activation / K/V quantizers).
fn score(
    s: &Student,
    model_path: &Path,
    text: &Path,
    max_tokens: Option<usize>,
) -> Result<ExportPpl> {
    let dev = candle_core::Device::Cpu;
    let folder = model::ModelFolder::open(&s.dir)?;
    let content = std::fs::read_to_string(text)
        .with_context(|| format!("cannot read text file {}", text.display()))?;
    let mut ids = eval::encode_text(&folder.tokenizer()?, &content, folder.config.bos_token_id)?;
    if let Some(n) = max_tokens {
        ids.truncate(n);
    }
    let ctx = folder.config.usable_context();
    let student = model::Llama::load(&folder, s.quant.clone(), &dev)?;
    let p_student = eval::perplexity(&student, &ids, ctx, 4, |_| {})?;
    drop(student);
    let runtime = model::QuantConfig {
        w_bits: None,
        w_group: None,
        w_scale: Default::default(),
        ..s.quant.clone()
    };
    let exported = model::ModelFolder::open(model_path)?;
    let m = model::Llama::load(&exported, runtime.clone(), &dev)?;
    let p_export = eval::perplexity(&m, &ids, ctx, 4, |_| {})?;
    Ok(ExportPpl {
        text: text.display().to_string(),
        tokens: p_export.tokens,
        ctx,
        student: p_student.ppl,
        export: p_export.ppl,
        relative_change: p_export.ppl / p_student.ppl - 1.0,
        runtime_quant: runtime.label(),
    })
}
