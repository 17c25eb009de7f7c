//! `config.json` of a Hugging Face Llama-family checkpoint, read into typed fields with
//! errors that name the file and the field.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

const KNOWN_ARCHITECTURES: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];
const KNOWN_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn get_usize(v: &Value, file: &Path, key: &str) -> Result<usize> {
    match v.get(key) {
        Some(x) => x.as_u64().map(|n| n as usize).with_context(|| {
            format!(
                "{}: field `{key}` must be a non-negative integer, found {x}",
                file.display()
            )
        }),
        None => bail!("{}: missing field `{key}`", file.display()),
    }
}

fn opt_f64(v: &Value, file: &Path, key: &str, default: f64) -> Result<f64> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_f64().with_context(|| {
            format!(
                "{}: field `{key}` must be a number, found {x}",
                file.display()
            )
        }),
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl LlamaConfig {
    /// Reads `config.json`, and `generation_config.json` beside it for extra EOS ids.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        let mut cfg = Self::from_json(&v, path)?;
        if let Some(dir) = path.parent() {
            let gen = dir.join("generation_config.json");
            if gen.exists() {
                let t = std::fs::read_to_string(&gen)
                    .with_context(|| format!("cannot read {}", gen.display()))?;
                let g: Value = serde_json::from_str(&t)
                    .with_context(|| format!("{}: not valid JSON", gen.display()))?;
                for id in token_ids(g.get("eos_token_id")) {
                    // llama2.c models list BOS as an EOS id too: they start each story with BOS.
                    if !cfg.eos_token_ids.contains(&id) {
                        cfg.eos_token_ids.push(id);
                    }
                }
            }
        }
        Ok(cfg)
    }

    pub fn from_json(v: &Value, file: &Path) -> Result<Self> {
        let archs: Vec<String> = v
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
        let arch_ok = archs
            .iter()
            .any(|a| KNOWN_ARCHITECTURES.contains(&a.as_str()));
        if !arch_ok && !KNOWN_MODEL_TYPES.contains(&model_type) {
            bail!(
                "{}: unsupported architecture {:?} (model_type {:?}); supported: {} (model_type {})",
                file.display(),
                archs,
                model_type,
                KNOWN_ARCHITECTURES.join(", "),
                KNOWN_MODEL_TYPES.join(", ")
            );
        }
        if let Some(act) = v.get("hidden_act").and_then(|x| x.as_str()) {
            if act != "silu" {
                bail!(
                    "{}: field `hidden_act` = {act:?}: only \"silu\" is supported",
                    file.display()
                );
            }
        }
        let hidden_size = get_usize(v, file, "hidden_size")?;
        let num_attention_heads = get_usize(v, file, "num_attention_heads")?;
        let num_key_value_heads = match v.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => get_usize(v, file, "num_key_value_heads")?,
        };
        let head_dim = match v.get("head_dim") {
            None | Some(Value::Null) => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    bail!(
                        "{}: `head_dim` is absent and `hidden_size` ({hidden_size}) is not a multiple of `num_attention_heads` ({num_attention_heads})",
                        file.display()
                    );
                }
                hidden_size / num_attention_heads
            }
            Some(_) => get_usize(v, file, "head_dim")?,
        };
        let cfg = LlamaConfig {
            hidden_size,
            intermediate_size: get_usize(v, file, "intermediate_size")?,
            num_hidden_layers: get_usize(v, file, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: get_usize(v, file, "vocab_size")?,
            max_position_embeddings: get_usize(v, file, "max_position_embeddings")?,
            rms_norm_eps: opt_f64(v, file, "rms_norm_eps", 1e-6)?,
            rope_theta: opt_f64(v, file, "rope_theta", 10000.0)?,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            // Qwen2 has biases on q/k/v without declaring `attention_bias`.
            attention_bias: v
                .get("attention_bias")
                .and_then(|x| x.as_bool())
                .unwrap_or(model_type == "qwen2"),
            bos_token_id: v
                .get("bos_token_id")
                .and_then(|x| x.as_u64())
                .map(|x| x as u32),
            eos_token_ids: token_ids(v.get("eos_token_id")),
        };
        if let Some(rs) = v.get("rope_scaling") {
            if !rs.is_null() {
                bail!("{}: field `rope_scaling` = {rs}: RoPE scaling is not supported yet (only null)", file.display());
            }
        }
        cfg.check(file)?;
        Ok(cfg)
    }

    fn check(&self, file: &Path) -> Result<()> {
        let f = file.display();
        for (k, x) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if x == 0 {
                bail!("{f}: field `{k}` must be positive");
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "{f}: `num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("{f}: `head_dim` ({}) must be even for RoPE", self.head_dim);
        }
        Ok(())
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
}
