//! The `[train]` and `[student]` tables: typed, defaulted, validated once. Errors name the
//! key as the user writes it (`train.lr`, `student.w_bits`) and what would be accepted.

use anyhow::{bail, Result};
use model::{parse_bits, KvPoint, KvRotation, QuantConfig};
use quant::ScaleDtype;
use serde::{Deserialize, Deserializer, Serialize};

/// How the learning rate moves after the linear warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => bail!("train.schedule = {other:?}: allowed values are \"constant\", \"linear\", \"cosine\""),
        }
    }
}

/// How corpus samples become training rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Packing {
    /// BOS + sample, all samples concatenated and cut into blocks of `seq_len` (tail dropped).
    #[default]
    Concat,
    /// One sample per row, truncated to `seq_len`, padded; padding is masked out of the loss.
    Pad,
}

impl std::str::FromStr for Packing {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "concat" => Ok(Packing::Concat),
            "pad" => Ok(Packing::Pad),
            other => bail!("train.packing = {other:?}: allowed values are \"concat\", \"pad\""),
        }
    }
}

fn d_grad_accum() -> usize {
    1
}
fn d_lr() -> f64 {
    3e-4
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.95
}
fn d_eps() -> f64 {
    1e-8
}
fn d_grad_clip() -> f64 {
    1.0
}
fn d_temperature() -> f64 {
    1.0
}
fn d_log_every() -> u64 {
    10
}
fn d_checkpoint_every() -> u64 {
    100
}
fn d_keep() -> usize {
    3
}
fn d_true() -> bool {
    true
}

/// The `[train]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps in total (a resumed run continues up to this number).
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch: usize,
    pub seq_len: usize,
    /// Micro-batches whose gradients are averaged into one optimizer step.
    #[serde(default = "d_grad_accum")]
    pub grad_accum: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 turns clipping off.
    #[serde(default = "d_grad_clip")]
    pub grad_clip: f64,
    /// Distillation temperature T in softmax(z / T).
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    #[serde(default = "d_log_every")]
    pub log_every: u64,
    #[serde(default = "d_checkpoint_every")]
    pub checkpoint_every: u64,
    /// How many of the newest checkpoints to keep (K).
    #[serde(default = "d_keep")]
    pub keep_checkpoints: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub packing: Packing,
    #[serde(default = "d_true")]
    pub train_embeddings: bool,
    #[serde(default = "d_true")]
    pub train_norms: bool,
    /// For models with tied embeddings the LM head is the embedding.
    #[serde(default = "d_true")]
    pub train_lm_head: bool,
    /// Strength (0..=1) of the K/V equalization applied to the student's initial weights
    /// (`kv_equalize.rs`); 0 = off. Left out of the serialized config when 0, so that runs
    /// made before the setting existed keep their fingerprints.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub kv_equalize: f64,
    /// Gradient checkpointing: keep only each decoder block's input and recompute the block
    /// in the backward pass, so training holds one block's activations (and one block's
    /// materialised weights) at a time: less memory, about one more forward pass of time.
    /// Left out of the serialized config when off (fingerprints of earlier runs stay valid).
    #[serde(default, skip_serializing_if = "is_false")]
    pub checkpoint_activations: bool,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn is_false(v: &bool) -> bool {
    !*v
}

impl TrainConfig {
    /// A config with the three required values and every default.
    pub fn new(steps: u64, batch: usize, seq_len: usize) -> Self {
        TrainConfig {
            steps,
            batch,
            seq_len,
            grad_accum: d_grad_accum(),
            lr: d_lr(),
            schedule: Schedule::default(),
            warmup_steps: 0,
            min_lr: 0.0,
            beta1: d_beta1(),
            beta2: d_beta2(),
            eps: d_eps(),
            weight_decay: 0.0,
            grad_clip: d_grad_clip(),
            temperature: d_temperature(),
            log_every: d_log_every(),
            checkpoint_every: d_checkpoint_every(),
            keep_checkpoints: d_keep(),
            seed: 0,
            packing: Packing::default(),
            train_embeddings: true,
            train_norms: true,
            train_lm_head: true,
            kv_equalize: 0.0,
            checkpoint_activations: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        fn at_least_one(key: &str, v: u64) -> Result<()> {
            if v == 0 {
                bail!("train.{key} = 0: allowed values are integers >= 1");
            }
            Ok(())
        }
        at_least_one("steps", self.steps)?;
        at_least_one("batch", self.batch as u64)?;
        at_least_one("grad_accum", self.grad_accum as u64)?;
        at_least_one("log_every", self.log_every)?;
        at_least_one("checkpoint_every", self.checkpoint_every)?;
        at_least_one("keep_checkpoints", self.keep_checkpoints as u64)?;
        if self.seq_len < 2 {
            bail!(
                "train.seq_len = {}: allowed values are integers >= 2",
                self.seq_len
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!(
                "train.lr = {}: allowed values are finite numbers > 0",
                self.lr
            );
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            bail!(
                "train.min_lr = {}: allowed values are 0 <= min_lr <= train.lr ({})",
                self.min_lr,
                self.lr
            );
        }
        for (key, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("train.{key} = {v}: allowed values are 0 <= {key} < 1");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!(
                "train.eps = {}: allowed values are finite numbers > 0",
                self.eps
            );
        }
        for (key, v) in [
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("train.{key} = {v}: allowed values are finite numbers >= 0");
            }
        }
        if !(0.0..=1.0).contains(&self.kv_equalize) {
            bail!(
                "train.kv_equalize = {}: allowed values are 0 (off) to 1",
                self.kv_equalize
            );
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "train.temperature = {}: allowed values are finite numbers > 0",
                self.temperature
            );
        }
        Ok(())
    }
}

/// Reads a bit width written as an integer, or the string "none" (= 16, no quantization).
fn bits<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Bits {
        N(u32),
        S(String),
    }
    match Bits::deserialize(d)? {
        Bits::N(n) => Ok(n),
        Bits::S(s) if s == "none" => Ok(16),
        Bits::S(s) => Err(serde::de::Error::custom(format!(
            "{s:?}: allowed values are 2..=8, 16 or \"none\""
        ))),
    }
}

fn d_w_bits() -> u32 {
    4
}
fn d_a_bits() -> u32 {
    8
}
fn d_kv_bits() -> u32 {
    4
}

/// How the student parameterises the teacher's seven projections per layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// LLM-QAT: every weight trainable, fake-quantized (`w_bits`, `w_group`).
    #[default]
    Qat,
    /// QLoRA: a frozen block-quantized base (the `[quantize]` stage's output) with LoRA
    /// adapters, the only trainable weights.
    Qlora,
    /// LoftQ: as `qlora`, but the base and the adapters' start are chosen together (the
    /// quantize stage's LoftQ, `loftq_iters` alternating steps).
    Loftq,
    /// LR-QAT: low-rank weights inside the quantizer (`lora_rank`, `lora_alpha`, `w_bits`,
    /// `w_group`, `phi_dtype`), merged into integers and scales after training.
    Lrqat,
}

/// How an `lrqat` student stores Phi0 = W0 / s0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhiStorage {
    /// One byte: b integer bits and 8 - b fraction bits (Q4.4 for 4 bits).
    #[default]
    Int8,
    Bf16,
}

/// How an `lrqat` student's start scales s0 are chosen (see `model::ScaleInit`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleInit {
    /// absmax / qmax per group: nothing clipped.
    #[default]
    Minmax,
    /// Per group, the shrink of the MinMax scale with the least squared error.
    Mse,
}

impl std::str::FromStr for ScaleInit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "minmax" => Ok(ScaleInit::Minmax),
            "mse" => Ok(ScaleInit::Mse),
            other => {
                bail!("student.scale_init = {other:?}: allowed values are \"minmax\", \"mse\"")
            }
        }
    }
}

impl ScaleInit {
    pub fn model(&self) -> model::ScaleInit {
        match self {
            ScaleInit::Minmax => model::ScaleInit::Minmax,
            ScaleInit::Mse => model::ScaleInit::Mse,
        }
    }
}

impl std::str::FromStr for PhiStorage {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "int8" => Ok(PhiStorage::Int8),
            "bf16" => Ok(PhiStorage::Bf16),
            other => bail!("student.phi_dtype = {other:?}: allowed values are \"int8\", \"bf16\""),
        }
    }
}

impl PhiStorage {
    pub fn model(&self) -> model::PhiDtype {
        match self {
            PhiStorage::Int8 => model::PhiDtype::Int8,
            PhiStorage::Bf16 => model::PhiDtype::Bf16,
        }
    }
}

impl std::str::FromStr for Method {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "qat" => Ok(Method::Qat),
            "qlora" => Ok(Method::Qlora),
            "loftq" => Ok(Method::Loftq),
            "lrqat" => Ok(Method::Lrqat),
            other => bail!(
                "student.method = {other:?}: allowed values are \"qat\", \"qlora\", \"loftq\", \"lrqat\""
            ),
        }
    }
}

impl Method {
    fn is_qat(&self) -> bool {
        *self == Method::Qat
    }

    pub fn name(&self) -> &'static str {
        match self {
            Method::Qat => "qat",
            Method::Qlora => "qlora",
            Method::Loftq => "loftq",
            Method::Lrqat => "lrqat",
        }
    }

    /// Whether the method trains adapters on a block-quantized base.
    pub fn needs_base(&self) -> bool {
        matches!(self, Method::Qlora | Method::Loftq)
    }
}

/// The projections LoRA adapters can go on, as peft's `target_modules` names them.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The `[student]` table: how the student is parameterised and fake-quantized while it
/// trains. Bit widths are integers; 16 (or "none") means not quantized. Keys of another
/// method than `method` are refused by name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawStudent")]
pub struct StudentConfig {
    /// Left out of the JSON for `qat`, so runs made before methods existed keep their
    /// fingerprints.
    #[serde(skip_serializing_if = "Method::is_qat")]
    pub method: Method,
    pub w_bits: u32,
    /// Per-group weight quantization along the input dimension; absent = per output channel.
    pub w_group: Option<usize>,
    pub a_bits: u32,
    pub kv_bits: u32,
    pub kv_point: KvPoint,
    /// "hadamard": round K and V in each head's Hadamard basis (see model::kv_rotation).
    /// Left out of the JSON when "none", so older runs keep their fingerprints.
    #[serde(skip_serializing_if = "KvRotation::is_none")]
    pub kv_rotation: KvRotation,
    /// The type weight scales are rounded to in training (`qat`): "f16" makes a GGUF export
    /// exact. Left out of the JSON when "f32", so older runs keep their fingerprints.
    #[serde(default, skip_serializing_if = "ScaleDtype::is_f32")]
    pub scale_dtype: ScaleDtype,
    /// LoRA settings (`qlora`, `loftq`; rank and alpha of `lrqat`).
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub lora: Option<LoraConfig>,
    /// Phi0's storage (`lrqat` only; absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phi_dtype: Option<PhiStorage>,
    /// The learning rate of an lrqat student's scale multipliers as a multiple of
    /// `train.lr` (absent: 1). Left out of the JSON when absent, so older runs keep their
    /// fingerprints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_lr_ratio: Option<f64>,
    /// How an lrqat student's start scales s0 are chosen (absent: MinMax). Left out of the
    /// JSON when absent, so older runs keep their fingerprints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_init: Option<ScaleInit>,
    /// The block-quantized base folder (`qlora`): given by `pipeline train --base` or
    /// `[student] base`, or the `[quantize]` stage's output in `pipeline run`. Its content
    /// hash, not its path, is part of the training fingerprint.
    #[serde(skip_serializing)]
    pub base: Option<std::path::PathBuf>,
}

/// LoRA adapters: rank r, alpha (scale alpha / r), dropout on the adapter's input, and the
/// projections that get one (peft's names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_targets: Vec<String>,
    /// LoftQ's alternating steps T (`loftq` only; absent for `qlora`, whose fingerprints
    /// then stay as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loftq_iters: Option<u32>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.lora_alpha / self.lora_rank as f64
    }
}

/// The `[student]` table as written: every key optional, so that each method's defaults and
/// each method's own keys can be told apart.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStudent {
    method: Option<Method>,
    #[serde(default, deserialize_with = "opt_bits")]
    w_bits: Option<u32>,
    w_group: Option<usize>,
    #[serde(default, deserialize_with = "opt_bits")]
    a_bits: Option<u32>,
    #[serde(default, deserialize_with = "opt_bits")]
    kv_bits: Option<u32>,
    kv_point: Option<KvPoint>,
    kv_rotation: Option<KvRotation>,
    scale_dtype: Option<ScaleDtype>,
    lora_rank: Option<usize>,
    lora_alpha: Option<f64>,
    lora_dropout: Option<f64>,
    lora_targets: Option<Vec<String>>,
    loftq_iters: Option<u32>,
    phi_dtype: Option<PhiStorage>,
    scale_lr_ratio: Option<f64>,
    scale_init: Option<ScaleInit>,
    base: Option<std::path::PathBuf>,
}

fn opt_bits<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u32>, D::Error> {
    bits(d).map(Some)
}

impl TryFrom<RawStudent> for StudentConfig {
    type Error = String;

    fn try_from(r: RawStudent) -> std::result::Result<Self, String> {
        let method = r.method.unwrap_or_default();
        let m = method.name();
        let other = |key: &str, owner: &str| {
            format!("student.{key} is a key of method \"{owner}\", but student.method = \"{m}\"")
        };
        if r.scale_dtype.is_some() && method != Method::Qat {
            return Err(other("scale_dtype", "qat"));
        }
        if r.scale_lr_ratio.is_some() && method != Method::Lrqat {
            return Err(other("scale_lr_ratio", "lrqat"));
        }
        if r.scale_init.is_some() && method != Method::Lrqat {
            return Err(other("scale_init", "lrqat"));
        }
        let lora = match method {
            Method::Qat => {
                for (key, set) in [
                    ("lora_rank", r.lora_rank.is_some()),
                    ("lora_alpha", r.lora_alpha.is_some()),
                    ("lora_dropout", r.lora_dropout.is_some()),
                    ("lora_targets", r.lora_targets.is_some()),
                    ("base", r.base.is_some()),
                ] {
                    if set {
                        return Err(other(key, "qlora"));
                    }
                }
                if r.loftq_iters.is_some() {
                    return Err(other("loftq_iters", "loftq"));
                }
                if r.phi_dtype.is_some() {
                    return Err(other("phi_dtype", "lrqat"));
                }
                None
            }
            Method::Lrqat => {
                for (key, set, owner) in [
                    ("lora_dropout", r.lora_dropout.is_some(), "qlora"),
                    ("lora_targets", r.lora_targets.is_some(), "qlora"),
                    ("base", r.base.is_some(), "qlora"),
                    ("loftq_iters", r.loftq_iters.is_some(), "loftq"),
                ] {
                    if set {
                        return Err(other(key, owner));
                    }
                }
                // Every projection: the student is integers + scales after the merge.
                Some(LoraConfig {
                    lora_rank: r.lora_rank.unwrap_or(16),
                    lora_alpha: r.lora_alpha.unwrap_or(16.0),
                    lora_dropout: 0.0,
                    lora_targets: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
                    loftq_iters: None,
                })
            }
            Method::Qlora | Method::Loftq => {
                if method == Method::Qlora && r.loftq_iters.is_some() {
                    return Err(other("loftq_iters", "loftq"));
                }
                if r.phi_dtype.is_some() {
                    return Err(other("phi_dtype", "lrqat"));
                }
                // The base's block quantization is the weight quantization.
                if r.w_bits.is_some_and(|b| b != 16) {
                    return Err(format!("student.w_bits is a key of method \"qat\" (a {m} student's weights are quantized by its base, [quantize] format)"));
                }
                if r.w_group.is_some() {
                    return Err(other("w_group", "qat"));
                }
                let targets = r
                    .lora_targets
                    .unwrap_or_else(|| PROJECTIONS.iter().map(|s| s.to_string()).collect());
                Some(LoraConfig {
                    lora_rank: r.lora_rank.unwrap_or(16),
                    lora_alpha: r.lora_alpha.unwrap_or(16.0),
                    lora_dropout: r.lora_dropout.unwrap_or(0.0),
                    lora_targets: targets,
                    loftq_iters: (method == Method::Loftq).then(|| r.loftq_iters.unwrap_or(5)),
                })
            }
        };
        // QLoRA is weight-only unless activation / K/V quantization is asked for.
        let (w, a, kv) = match method {
            Method::Qat => (d_w_bits(), d_a_bits(), d_kv_bits()),
            Method::Qlora | Method::Loftq => (16, 16, 16),
            // Weight-only unless a_bits / kv_bits are set, as LR-QAT is published.
            Method::Lrqat => (d_w_bits(), 16, 16),
        };
        Ok(StudentConfig {
            method,
            w_bits: r.w_bits.unwrap_or(w),
            w_group: r.w_group,
            a_bits: r.a_bits.unwrap_or(a),
            kv_bits: r.kv_bits.unwrap_or(kv),
            kv_point: r.kv_point.unwrap_or_default(),
            kv_rotation: r.kv_rotation.unwrap_or_default(),
            scale_dtype: r.scale_dtype.unwrap_or_default(),
            lora,
            phi_dtype: (method == Method::Lrqat).then(|| r.phi_dtype.unwrap_or_default()),
            scale_lr_ratio: r.scale_lr_ratio,
            scale_init: r.scale_init,
            base: r.base,
        })
    }
}

impl Default for StudentConfig {
    fn default() -> Self {
        StudentConfig {
            method: Method::Qat,
            w_bits: d_w_bits(),
            w_group: None,
            a_bits: d_a_bits(),
            kv_bits: d_kv_bits(),
            kv_point: KvPoint::default(),
            kv_rotation: KvRotation::None,
            scale_dtype: ScaleDtype::F32,
            lora: None,
            phi_dtype: None,
            scale_lr_ratio: None,
            scale_init: None,
            base: None,
        }
    }
}

impl StudentConfig {
    pub fn validate(&self) -> Result<()> {
        self.quant_config()?;
        if self.method == Method::Lrqat && !(2..=8).contains(&self.w_bits) {
            bail!(
                "student.w_bits = {}: an lrqat student's weights are integers of 2 to 8 bits",
                self.w_bits
            );
        }
        if let Some(r) = self.scale_lr_ratio {
            if !(r.is_finite() && r >= 0.0) {
                bail!("student.scale_lr_ratio = {r}: allowed values are finite numbers >= 0 (0 keeps the scales at their MinMax start)");
            }
        }
        if let Some(l) = &self.lora {
            if l.lora_rank == 0 {
                bail!("student.lora_rank = 0: allowed values are integers >= 1 (at most the smaller dimension of each target projection)");
            }
            if !(l.lora_alpha.is_finite() && l.lora_alpha > 0.0) {
                bail!(
                    "student.lora_alpha = {}: allowed values are finite numbers > 0",
                    l.lora_alpha
                );
            }
            if !(0.0..1.0).contains(&l.lora_dropout) {
                bail!(
                    "student.lora_dropout = {}: allowed values are numbers in [0, 1)",
                    l.lora_dropout
                );
            }
            if l.lora_targets.is_empty() {
                bail!(
                    "student.lora_targets is empty: allowed values are a list of {}",
                    PROJECTIONS.join(", ")
                );
            }
            if l.loftq_iters == Some(0) {
                bail!("student.loftq_iters = 0: allowed values are integers >= 1");
            }
            for t in &l.lora_targets {
                if !PROJECTIONS.contains(&t.as_str()) {
                    bail!(
                        "student.lora_targets: {t:?} is not a projection of the model; allowed values are {}",
                        PROJECTIONS.join(", ")
                    );
                }
            }
        }
        Ok(())
    }

    /// The model crate's quantization seam for this student.
    pub fn quant_config(&self) -> Result<QuantConfig> {
        if self.w_group == Some(0) {
            bail!("student.w_group = 0: allowed values are group sizes >= 1, or absent for per-channel");
        }
        let q = QuantConfig {
            w_bits: parse_bits("student.w_bits", self.w_bits)?,
            w_group: self.w_group,
            a_bits: parse_bits("student.a_bits", self.a_bits)?,
            kv_bits: parse_bits("student.kv_bits", self.kv_bits)?,
            kv_point: self.kv_point,
            kv_rotation: self.kv_rotation,
            w_scale: self.scale_dtype,
        };
        q.validate()?;
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c: TrainConfig =
            serde_json::from_str(r#"{"steps": 10, "batch": 2, "seq_len": 16}"#).unwrap();
        assert_eq!(c, TrainConfig::new(10, 2, 16));
        c.validate().unwrap();
        assert_eq!(c.keep_checkpoints, 3);
        assert_eq!(c.schedule, Schedule::Constant);

        let mut bad = c.clone();
        bad.lr = -1.0;
        assert!(bad.validate().unwrap_err().to_string().contains("train.lr"));
        let mut bad = c.clone();
        bad.keep_checkpoints = 0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("train.keep_checkpoints"));

        let err = serde_json::from_str::<TrainConfig>(
            r#"{"steps": 1, "batch": 1, "seq_len": 4, "lr_max": 1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("lr_max"), "{err}");
        let err = serde_json::from_str::<TrainConfig>(
            r#"{"steps": 1, "batch": 1, "seq_len": 4, "schedule": "step"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cosine"), "{err}");
        assert!("exp"
            .parse::<Schedule>()
            .unwrap_err()
            .to_string()
            .contains("train.schedule"));
    }

    #[test]
    fn student_bits() {
        let s: StudentConfig =
            serde_json::from_str(r#"{"a_bits": "none", "kv_bits": 16}"#).unwrap();
        let q = s.quant_config().unwrap();
        assert_eq!(q.w_bits, Some(4));
        assert_eq!(q.a_bits, None);
        assert_eq!(q.kv_bits, None);
        assert_eq!(
            StudentConfig::default().quant_config().unwrap().label(),
            "w4a8kv4"
        );
        let bad = StudentConfig {
            w_bits: 12,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("student.w_bits"));
    }
}
