//! The `[train]` and `[student]` tables: typed, defaulted, validated once. Errors name the
//! key as the user writes it (`train.lr`, `student.w_bits`) and what would be accepted.

use anyhow::{bail, Result};
use model::{parse_bits, KvPoint, KvRotation, QuantConfig};
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
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
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

/// The `[student]` table: how the student is fake-quantized while it trains.
/// Bit widths are integers; 16 (or "none") means not quantized.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    #[serde(default = "d_w_bits", deserialize_with = "bits")]
    pub w_bits: u32,
    /// Per-group weight quantization along the input dimension; absent = per output channel.
    #[serde(default)]
    pub w_group: Option<usize>,
    #[serde(default = "d_a_bits", deserialize_with = "bits")]
    pub a_bits: u32,
    #[serde(default = "d_kv_bits", deserialize_with = "bits")]
    pub kv_bits: u32,
    #[serde(default)]
    pub kv_point: KvPoint,
    /// "hadamard": round K and V in each head's Hadamard basis (see model::kv_rotation).
    /// Left out of the JSON when "none", so older runs keep their fingerprints.
    #[serde(default, skip_serializing_if = "KvRotation::is_none")]
    pub kv_rotation: KvRotation,
}

impl Default for StudentConfig {
    fn default() -> Self {
        StudentConfig {
            w_bits: d_w_bits(),
            w_group: None,
            a_bits: d_a_bits(),
            kv_bits: d_kv_bits(),
            kv_point: KvPoint::default(),
            kv_rotation: KvRotation::None,
        }
    }
}

impl StudentConfig {
    pub fn validate(&self) -> Result<()> {
        self.quant_config().map(|_| ())
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
