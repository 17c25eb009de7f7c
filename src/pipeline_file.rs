//! The pipeline TOML file: typed tables for every stage, parsed and validated once at load,
//! with `--set section.key=value` overrides. Errors name the file, the line and the key.

use anyhow::{anyhow, bail, Context, Result};
use generate::GenerateConfig;
use serde::{Deserialize, Serialize};
use std::path::{Component, Path, PathBuf};
use train::{StudentConfig, TrainConfig};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunTable {
    pub name: String,
    /// The run directory this pipeline owns (relative paths are relative to the working directory).
    pub directory: PathBuf,
    #[serde(default)]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N` for generate, train and eval.
    #[serde(default)]
    pub device: model::DeviceSpec,
    /// Data-parallel training, one rank per device, e.g. `["cuda:0", "cuda:1"]`; replaces
    /// `device` for the train stage.
    #[serde(default)]
    pub devices: Option<Vec<model::DeviceSpec>>,
    /// Compute dtype of teacher and student: `f32`, `bf16` or `f16`.
    #[serde(default)]
    pub dtype: model::ComputeDtype,
}

impl RunTable {
    /// The devices of the generate and train stages: one per entry of `devices` (a teacher or a
    /// rank each), else `device` alone.
    pub fn computes(&self) -> Result<Vec<model::Compute>> {
        match &self.devices {
            Some(d) => crate::compute_args::open_devices(d, self.dtype, "[run] devices"),
            None => Ok(vec![model::Compute::open(self.device, self.dtype)?]),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherTable {
    /// Hugging Face folder of the teacher, a hub id `org/name[@revision]`, or a llama.cpp
    /// `.gguf` file.
    pub model: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalTable {
    /// Held-out text for perplexity.
    pub text: PathBuf,
    /// Window length (default: the model's context).
    #[serde(default)]
    pub ctx: Option<usize>,
    #[serde(default = "default_eval_batch")]
    pub batch: usize,
    /// Score only the first N tokens of the text (quick runs); absent = the whole text.
    #[serde(default)]
    pub max_tokens: Option<usize>,
}

fn default_eval_batch() -> usize {
    4
}

/// Block-wise quantization of a frozen base (used by LoRA-style students; see `pipeline quantize`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuantizeTable {
    #[serde(default = "default_qformat")]
    pub format: String,
    #[serde(default = "default_block")]
    pub block_size: usize,
    #[serde(default = "default_true")]
    pub double_quant: bool,
    /// `bnb` or `packed`; absent = bnb for nf4, packed otherwise (as `pipeline quantize`).
    #[serde(default)]
    pub layout: Option<String>,
    /// Modules kept in full precision.
    #[serde(default = "default_qskip")]
    pub skip: Vec<String>,
}

impl Default for QuantizeTable {
    fn default() -> Self {
        QuantizeTable {
            format: default_qformat(),
            block_size: default_block(),
            double_quant: true,
            layout: None,
            skip: default_qskip(),
        }
    }
}

impl QuantizeTable {
    /// The typed settings `pipeline quantize` uses; fails with the key and allowed values.
    pub fn settings(&self) -> Result<quantize::QuantizeSettings> {
        quantize::QuantizeSettings::new(
            &self.format,
            self.layout.as_deref(),
            self.block_size,
            self.double_quant,
            self.skip.clone(),
        )
    }
}

fn default_qskip() -> Vec<String> {
    quantize::DEFAULT_SKIP.map(String::from).to_vec()
}

fn default_qformat() -> String {
    "nf4".into()
}
fn default_block() -> usize {
    64
}
fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportTable {
    /// `safetensors`: no export stage (the student folder, f32 latent weights plus
    /// quantization.json, is the output); `gguf`, `compressed-tensors`, `packed` or `hf`: an
    /// export stage writes RUN/export (see `pipeline export`), and eval scores it.
    #[serde(default = "default_export")]
    pub format: String,
    /// hf only: f32, f16 or bf16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

fn default_export() -> String {
    "safetensors".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    pub run: RunTable,
    pub teacher: TeacherTable,
    pub generate: GenerateConfig,
    #[serde(default)]
    pub quantize: Option<QuantizeTable>,
    #[serde(default)]
    pub student: StudentConfig,
    pub train: TrainConfig,
    pub eval: EvalTable,
    #[serde(default)]
    pub export: Option<ExportTable>,
}

/// Line (1-based) of `key = ...` inside `[section]`, for error messages.
fn locate(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            current = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        } else if current == section {
            if let Some((k, _)) = l.split_once('=') {
                if k.trim() == key {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

/// Parses `value` of a `--set` as TOML (numbers, booleans, quoted strings), else as a bare string.
fn set_value(v: &str) -> toml::Value {
    let doc = format!("x = {v}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("x").unwrap_or(toml::Value::String(v.into())),
        Err(_) => toml::Value::String(v.into()),
    }
}

/// Whether a relative path stays inside its base once resolved lexically.
fn stays_inside(p: &Path) -> bool {
    let mut depth: i64 = 0;
    for c in p.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::RootDir | Component::Prefix(_) => return false,
            Component::CurDir => {}
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

impl PipelineFile {
    /// The export stage's format, when `[export]` asks for one (not `safetensors`).
    pub fn export_format(&self) -> Option<export::Format> {
        self.export
            .as_ref()
            .and_then(|e| export::Format::parse(&e.format))
    }

    /// The frozen base's quantization: the `[quantize]` table, or its defaults (NF4, blocks
    /// of 64, double quantization), as `pipeline quantize` makes it.
    /// A `loftq` student adds its LoftQ settings (rank, alpha, targets, iterations), so the
    /// stage writes its initial adapters beside the base.
    pub fn quantize_settings(&self) -> Result<quantize::QuantizeSettings> {
        let s = self.quantize.clone().unwrap_or_default().settings()?;
        match (&self.student.method, &self.student.lora) {
            (train::Method::Loftq, Some(l)) => s.with_loftq(quantize::LoftqSettings {
                rank: l.lora_rank,
                iters: l.loftq_iters.unwrap_or(5),
                alpha: l.lora_alpha,
                targets: l.lora_targets.clone(),
            }),
            _ => Ok(s),
        }
    }

    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read pipeline file {}", path.display()))?;
        Self::parse(&text, path, sets)
    }

    pub fn parse(text: &str, path: &Path, sets: &[String]) -> Result<Self> {
        let f = path.display();
        let mut table: toml::Table = text.parse().map_err(|e| anyhow!("{f}: {e}"))?;
        for s in sets {
            let Some((key, value)) = s.split_once('=') else {
                bail!("--set {s:?}: expected section.key=value, e.g. train.steps=100");
            };
            let Some((section, field)) = key.trim().split_once('.') else {
                bail!("--set {s:?}: expected section.key=value, e.g. teacher.model=../model");
            };
            let sec = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            let Some(sec) = sec.as_table_mut() else {
                bail!("--set {s:?}: `{section}` is not a table")
            };
            sec.insert(field.to_string(), set_value(value.trim()));
        }
        let merged = toml::to_string(&table)?;
        // Errors from serde carry the line of the merged document; report them against the
        // user's file when the key can be found there.
        let p: PipelineFile = match toml::from_str(&merged) {
            Ok(p) => p,
            Err(e) => {
                // The user's own text carries line numbers and the offending key; report its
                // error when it has one, else the error of the overridden document.
                if let Err(orig) = toml::from_str::<PipelineFile>(text) {
                    bail!("{f}: {}", orig.to_string().trim());
                }
                bail!("{f} (after --set overrides): {}", e.message().trim());
            }
        };
        p.validate(text, path)?;
        Ok(p)
    }

    fn validate(&self, text: &str, path: &Path) -> Result<()> {
        let f = path.display();
        let at = |section: &str, key: &str| match locate(text, section, key) {
            Some(l) => format!("{f}, line {l}"),
            None => format!("{f}"),
        };
        // Stage validators name `section.key`; attach the file and line of that key.
        let with_place = |r: Result<()>, section: &str| -> Result<()> {
            r.map_err(|e| {
                let msg = format!("{e:#}");
                let key = msg
                    .split(|c: char| c.is_whitespace() || c == '=')
                    .next()
                    .and_then(|k| k.split_once('.'))
                    .map(|(_, k)| k.to_string())
                    .unwrap_or_default();
                anyhow!("{}: [{section}] {msg}", at(section, &key))
            })
        };
        if self.run.name.trim().is_empty() {
            bail!("{}: [run] name must not be empty", at("run", "name"));
        }
        if self.run.directory.as_os_str().is_empty() {
            bail!(
                "{}: [run] directory must not be empty",
                at("run", "directory")
            );
        }
        if self.run.directory.is_file() {
            bail!(
                "{}: [run] directory = {:?} is a file, not a folder",
                at("run", "directory"),
                self.run.directory
            );
        }
        if let Some(devices) = &self.run.devices {
            if devices.is_empty() {
                bail!(
                    "{}: [run] devices = []: name at least one device, e.g. [\"cuda:0\", \"cuda:1\"]",
                    at("run", "devices")
                );
            }
            train::data::check_ranks(self.train.batch, devices.len())
                .map_err(|e| anyhow!("{}: [train] {e:#}", at("train", "batch")))?;
        }
        with_place(self.generate.validate(), "generate")?;
        with_place(
            self.student
                .validate()
                .and_then(|_| self.student.quant_config())
                .and_then(|q| q.validate()),
            "student",
        )?;
        with_place(self.train.validate(), "train")?;
        if self.eval.batch == 0 {
            bail!(
                "{}: [eval] batch = 0: must be at least 1",
                at("eval", "batch")
            );
        }
        if self.eval.ctx == Some(0) {
            bail!("{}: [eval] ctx = 0: must be at least 1", at("eval", "ctx"));
        }
        if self.eval.max_tokens.is_some_and(|n| n < 2) {
            bail!(
                "{}: [eval] max_tokens must be at least 2",
                at("eval", "max_tokens")
            );
        }
        if let Some(q) = &self.quantize {
            if let Err(e) = q.settings() {
                // The message starts with the offending key: point at its line.
                let msg = format!("{e}");
                let key = ["format", "layout", "block_size"]
                    .into_iter()
                    .find(|k| msg.starts_with(k))
                    .unwrap_or("format");
                bail!("{}: [quantize] {msg}", at("quantize", key));
            }
        }
        if let Some(e) = &self.export {
            if e.format != "safetensors" && export::Format::parse(&e.format).is_none() {
                bail!(
                    "{}: [export] format = {:?}: allowed values are \"safetensors\", \"gguf\", \"compressed-tensors\", \"packed\", \"hf\"",
                    at("export", "format"),
                    e.format
                );
            }
            if let Some(d) = &e.dtype {
                if e.format != "hf" || !["f32", "f16", "bf16"].contains(&d.as_str()) {
                    bail!(
                        "{}: [export] dtype = {d:?}: allowed only with format = \"hf\", as \"f32\", \"f16\" or \"bf16\"",
                        at("export", "dtype")
                    );
                }
            }
        }
        if !self.teacher.model.exists() && model::hub::hub_spec_of(&self.teacher.model).is_none() {
            bail!(
                "{}: [teacher] model = {:?} does not exist (and is not a hub id org/name[@revision])",
                at("teacher", "model"),
                self.teacher.model
            );
        }
        let teacher = model::ModelFolder::open(&self.teacher.model)
            .map_err(|e| anyhow!("{}: [teacher] model: {e:#}", at("teacher", "model")))?;
        let ctx = teacher.config.usable_context();
        if self.generate.max_tokens > ctx {
            bail!(
                "{}: [generate] max_tokens = {} is above the teacher's context ({ctx})",
                at("generate", "max_tokens"),
                self.generate.max_tokens
            );
        }
        self.student
            .quant_config()?
            .check_model(teacher.config.head_dim)
            .map_err(|e| anyhow!("{}: [student] {e:#}", at("student", "kv_rotation")))?;
        if self.train.seq_len > ctx {
            bail!(
                "{}: [train] seq_len = {} is above the teacher's context ({ctx})",
                at("train", "seq_len"),
                self.train.seq_len
            );
        }
        if !self.eval.text.exists() {
            bail!(
                "{}: [eval] text = {:?} does not exist",
                at("eval", "text"),
                self.eval.text
            );
        }
        if !stays_inside(Path::new(&self.run.name)) || self.run.name.contains('/') {
            bail!("{}: [run] name = {:?} must be a plain name (it must not write outside the run directory)", at("run", "name"), self.run.name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_values_are_typed() {
        assert_eq!(set_value("3"), toml::Value::Integer(3));
        assert_eq!(set_value("0.5"), toml::Value::Float(0.5));
        assert_eq!(set_value("true"), toml::Value::Boolean(true));
        assert_eq!(set_value("../a/b"), toml::Value::String("../a/b".into()));
        assert_eq!(set_value("\"x\""), toml::Value::String("x".into()));
    }

    #[test]
    fn locate_finds_keys_in_sections() {
        let t = "[run]\nname = \"a\"\n[train]\nsteps = 3\nlr = 1\n";
        assert_eq!(locate(t, "train", "lr"), Some(5));
        assert_eq!(locate(t, "run", "lr"), None);
    }

    #[test]
    fn run_devices_must_split_the_batch() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
        let (model, eval) = (
            shared.join("models/stories260k"),
            shared.join("data/tinystories-valid-64k.txt"),
        );
        let text = |devices: &str| {
            format!(
                "[run]\nname = \"a\"\ndirectory = \"r\"\ndevices = {devices}\n[teacher]\nmodel = \"{}\"\n\
                 [generate]\nsamples = 4\nmax_tokens = 8\n[train]\nsteps = 1\nbatch = 4\nseq_len = 8\n[eval]\ntext = \"{}\"\n",
                model.display(),
                eval.display()
            )
        };
        let path = Path::new("p.toml");
        let p = PipelineFile::parse(&text("[\"cpu\", \"cpu\"]"), path, &[]).unwrap();
        assert_eq!(p.run.computes().unwrap().len(), 2);
        let err = |d: &str| {
            format!(
                "{:#}",
                PipelineFile::parse(&text(d), path, &[]).unwrap_err()
            )
        };
        let e = err("[\"cpu\", \"cpu\", \"cpu\"]");
        assert!(
            e.contains("p.toml, line 12") && e.contains("train.batch = 4"),
            "{e}"
        );
        assert!(err("[]").contains("[run] devices = []"));
        assert!(err("[\"gpu\"]").contains("devices"));
    }

    #[test]
    fn paths_that_leave_are_detected() {
        assert!(stays_inside(Path::new("a/b")));
        assert!(!stays_inside(Path::new("../a")));
        assert!(!stays_inside(Path::new("a/../../b")));
        assert!(!stays_inside(Path::new("/abs")));
    }
}
