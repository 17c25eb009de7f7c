//! `config.json` of a Hugging Face Llama-family checkpoint, read into typed fields with
//! errors that name the file and the field.
//!
//! The rule: a key that changes what the model computes is either implemented here exactly as
//! transformers implements it, or refused with the file, the key and what is supported. Absent
//! keys take transformers' own default for the architecture (which differs: Qwen3's `head_dim`
//! is 128, Mistral's `sliding_window` 4096), never a guess of ours.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// The architectures we implement: Llama-family decoders that differ in a few details.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3/3.1/3.2, TinyLlama, SmolLM: optional bias on all four attention projections.
    #[default]
    Llama,
    /// Mistral: Llama with an optional sliding attention window.
    Mistral,
    /// Qwen2/Qwen2.5: bias on q/k/v (never on o_proj).
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k before RoPE, explicit head_dim.
    Qwen3,
}

const ARCHITECTURES: &[(&str, &str, Architecture)] = &[
    ("LlamaForCausalLM", "llama", Architecture::Llama),
    ("MistralForCausalLM", "mistral", Architecture::Mistral),
    ("Qwen2ForCausalLM", "qwen2", Architecture::Qwen2),
    ("Qwen3ForCausalLM", "qwen3", Architecture::Qwen3),
];

/// How RoPE frequencies are derived (transformers' `rope_type`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    #[default]
    Default,
    /// Positions divided by `factor` (inverse frequencies divided by it).
    Linear { factor: f64 },
    /// Llama 3.1/3.2: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN: interpolation blended with extrapolation along the frequency axis, and cos/sin
    /// multiplied by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        attention_factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
    },
}

pub const ROPE_TYPES: &str = "default, linear, llama3, yarn";

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub architecture: Architecture,
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
    #[serde(default)]
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Bias on q_proj, k_proj and v_proj.
    pub attention_bias: bool,
    /// Bias on o_proj (Llama and Qwen3 with `attention_bias`; never Qwen2).
    #[serde(default)]
    pub o_proj_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (`q_norm`, `k_norm`; Qwen3).
    #[serde(default)]
    pub qk_norm: bool,
    /// Attention window of sliding-window layers; not implemented, so a context longer than
    /// it is refused (`check_context`).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Keys that every transformers config may carry and that do not change the function.
const HARMLESS_KEYS: &[&str] = &[
    "_name_or_path",
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "finetuning_task",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "use_return_dict",
    "quantization_config",
    // Splits the matmuls during pretraining only; transformers 4 computed the same product.
    "pretraining_tp",
    // SmolLM2 writes this nanotron key, which transformers does not read (its
    // `rope_interleaved` is checked).
    "is_llama_config",
    // Dropout rates: training-time only.
    "embd_pdrop",
    "resid_pdrop",
    "attn_pdrop",
];

/// Keys read into the config above.
const READ_KEYS: &[&str] = &[
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "rope_interleaved",
    "use_mrope",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
];

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

/// An optional integer: `Ok(None)` when absent, `Ok(Some(None))` when null.
fn opt_usize(v: &Value, file: &Path, key: &str) -> Result<Option<Option<usize>>> {
    match v.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(_) => Ok(Some(Some(get_usize(v, file, key)?))),
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

fn opt_bool(v: &Value, file: &Path, key: &str, default: bool) -> Result<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_bool().with_context(|| {
            format!(
                "{}: field `{key}` must be true or false, found {x}",
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
        let f = file.display();
        let obj = v
            .as_object()
            .with_context(|| format!("{f}: expected a JSON object"))?;
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
        // `architectures` names the class transformers instantiates; `model_type` is the
        // fallback of configs written without it.
        let arch = archs
            .iter()
            .find_map(|a| ARCHITECTURES.iter().find(|(c, _, _)| c == a))
            .or_else(|| ARCHITECTURES.iter().find(|(_, t, _)| *t == model_type))
            .map(|(_, _, a)| *a);
        let Some(arch) = arch else {
            bail!(
                "{f}: unsupported architecture {archs:?} (model_type {model_type:?}); supported: {}",
                ARCHITECTURES
                    .iter()
                    .map(|(c, t, _)| format!("{c} (model_type {t})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        if let Some(act) = v.get("hidden_act").and_then(|x| x.as_str()) {
            if act != "silu" {
                bail!("{f}: field `hidden_act` = {act:?}: only \"silu\" is supported");
            }
        }
        if opt_bool(v, file, "mlp_bias", false)? {
            bail!("{f}: field `mlp_bias` = true: biases on the MLP projections are not supported");
        }
        if opt_bool(v, file, "rope_interleaved", false)? {
            bail!(
                "{f}: field `rope_interleaved` = true: only the rotate-half RoPE layout that transformers uses is supported"
            );
        }
        if opt_bool(v, file, "use_mrope", false)? {
            bail!("{f}: field `use_mrope` = true: multimodal RoPE is not supported");
        }
        Self::warn_unknown_keys(obj, file, arch);

        let hidden_size = get_usize(v, file, "hidden_size")?;
        let num_attention_heads = get_usize(v, file, "num_attention_heads")?;
        // Absent: the class default; null: transformers' `__post_init__` fallback.
        let num_key_value_heads = match opt_usize(v, file, "num_key_value_heads")? {
            Some(Some(n)) => n,
            Some(None) => num_attention_heads,
            None => match arch {
                Architecture::Llama => num_attention_heads,
                Architecture::Mistral => 8,
                Architecture::Qwen2 | Architecture::Qwen3 => 32,
            },
        };
        let derived_head_dim = || -> Result<usize> {
            if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                bail!(
                    "{f}: `head_dim` is absent and `hidden_size` ({hidden_size}) is not a multiple of `num_attention_heads` ({num_attention_heads})"
                );
            }
            Ok(hidden_size / num_attention_heads)
        };
        let head_dim = match opt_usize(v, file, "head_dim")? {
            Some(Some(n)) => n,
            None if arch == Architecture::Qwen3 => 128,
            _ => derived_head_dim()?,
        };
        let (rope_theta, rope_scaling) = Self::read_rope(v, file)?;
        let attention_bias = match arch {
            Architecture::Qwen2 => true,
            Architecture::Mistral => false,
            Architecture::Llama | Architecture::Qwen3 => {
                opt_bool(v, file, "attention_bias", false)?
            }
        };
        let cfg = LlamaConfig {
            architecture: arch,
            hidden_size,
            intermediate_size: get_usize(v, file, "intermediate_size")?,
            num_hidden_layers: get_usize(v, file, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: get_usize(v, file, "vocab_size")?,
            max_position_embeddings: get_usize(v, file, "max_position_embeddings")?,
            rms_norm_eps: opt_f64(v, file, "rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: opt_bool(v, file, "tie_word_embeddings", false)?,
            attention_bias,
            o_proj_bias: attention_bias && arch != Architecture::Qwen2,
            qk_norm: arch == Architecture::Qwen3,
            sliding_window: Self::read_sliding_window(v, file, arch)?,
            bos_token_id: v
                .get("bos_token_id")
                .and_then(|x| x.as_u64())
                .map(|x| x as u32),
            eos_token_ids: token_ids(v.get("eos_token_id")),
        };
        cfg.check(file)?;
        Ok(cfg)
    }

    /// Keys transformers does not read for this architecture cannot change its function; they
    /// are accepted, but named on stderr so that a misspelt key is noticed.
    fn warn_unknown_keys(obj: &Map<String, Value>, file: &Path, arch: Architecture) {
        let unknown: Vec<&str> = obj
            .keys()
            .map(|k| k.as_str())
            .filter(|k| !HARMLESS_KEYS.contains(k) && !READ_KEYS.contains(k))
            .collect();
        if !unknown.is_empty() {
            eprintln!(
                "note: {}: keys not used by {arch:?} models (ignored, as transformers does): {}",
                file.display(),
                unknown.join(", ")
            );
        }
    }

    /// `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5,
    /// where `rope_theta` moved inside): one path, as transformers merges them.
    fn read_rope(v: &Value, file: &Path) -> Result<(f64, RopeScaling)> {
        let f = file.display();
        let params = match (v.get("rope_parameters"), v.get("rope_scaling")) {
            (Some(p), Some(s)) if !p.is_null() && !s.is_null() && p != s => {
                bail!("{f}: both `rope_parameters` and `rope_scaling` are set and differ; keep one")
            }
            (Some(p), _) if !p.is_null() => Some(("rope_parameters", p)),
            (_, Some(s)) if !s.is_null() => Some(("rope_scaling", s)),
            _ => None,
        };
        let top_theta = opt_f64(v, file, "rope_theta", 10000.0)?;
        let top_partial = opt_f64(v, file, "partial_rotary_factor", 1.0)?;
        let Some((key, p)) = params else {
            Self::check_partial(top_partial, file, "partial_rotary_factor")?;
            return Ok((top_theta, RopeScaling::Default));
        };
        let p = p
            .as_object()
            .with_context(|| format!("{f}: field `{key}` must be an object, found {p}"))?;
        if p.keys().any(|k| {
            matches!(
                k.as_str(),
                "full_attention" | "sliding_attention" | "chunked_attention"
            )
        }) {
            bail!("{f}: field `{key}` holds RoPE settings per layer type; only one RoPE for all layers is supported");
        }
        let num = |k: &str| -> Result<Option<f64>> {
            match p.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .with_context(|| format!("{f}: field `{key}.{k}` must be a number, found {x}")),
            }
        };
        let need = |k: &str| -> Result<f64> {
            num(k)?.with_context(|| format!("{f}: field `{key}` lacks `{k}`"))
        };
        let theta = num("rope_theta")?.unwrap_or(top_theta);
        let partial = num("partial_rotary_factor")?.unwrap_or(top_partial);
        Self::check_partial(partial, file, &format!("{key}.partial_rotary_factor"))?;
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .map(|t| {
                t.as_str()
                    .with_context(|| format!("{f}: field `{key}.rope_type` must be a string"))
            })
            .transpose()?
            .unwrap_or("default");
        let max_pos = get_usize(v, file, "max_position_embeddings")? as f64;
        let original =
            || -> Result<f64> { Ok(num("original_max_position_embeddings")?.unwrap_or(max_pos)) };
        let positive = |k: &str, x: f64| -> Result<f64> {
            if x.is_finite() && x > 0.0 {
                Ok(x)
            } else {
                bail!("{f}: field `{key}.{k}` must be a positive number, found {x}")
            }
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: positive("factor", need("factor")?)?,
            },
            "llama3" => {
                let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
                if high == low {
                    bail!(
                        "{f}: field `{key}`: `high_freq_factor` must differ from `low_freq_factor`"
                    );
                }
                RopeScaling::Llama3 {
                    factor: positive("factor", need("factor")?)?,
                    low_freq_factor: positive("low_freq_factor", low)?,
                    high_freq_factor: positive("high_freq_factor", high)?,
                    original_max_position_embeddings: positive(
                        "original_max_position_embeddings",
                        original()?,
                    )?,
                }
            }
            "yarn" => {
                let orig = positive("original_max_position_embeddings", original()?)?;
                let factor = positive("factor", num("factor")?.unwrap_or(max_pos / orig))?;
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                // transformers' rules: an explicit factor, else the ratio of two mscales when
                // both are set (and non-zero), else mscale(factor).
                let attention_factor = match num("attention_factor")? {
                    Some(a) => a,
                    None => match (num("mscale")?, num("mscale_all_dim")?) {
                        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                            get_mscale(factor, m) / get_mscale(factor, a)
                        }
                        _ => get_mscale(factor, 1.0),
                    },
                };
                let nonzero_or = |x: Option<f64>, d: f64| match x {
                    Some(x) if x != 0.0 => x,
                    _ => d,
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: orig,
                    attention_factor,
                    beta_fast: nonzero_or(num("beta_fast")?, 32.0),
                    beta_slow: nonzero_or(num("beta_slow")?, 1.0),
                    truncate: match p.get("truncate") {
                        None | Some(Value::Null) => true,
                        Some(x) => x.as_bool().with_context(|| {
                            format!("{f}: field `{key}.truncate` must be true or false")
                        })?,
                    },
                }
            }
            other => bail!(
                "{f}: field `{key}.rope_type` = {other:?} is not supported; supported: {ROPE_TYPES}"
            ),
        };
        Ok((positive("rope_theta", theta)?, scaling))
    }

    fn check_partial(x: f64, file: &Path, key: &str) -> Result<()> {
        if x != 1.0 {
            bail!(
                "{}: field `{key}` = {x}: partial rotary embeddings are not supported (only 1.0)",
                file.display()
            );
        }
        Ok(())
    }

    /// The window of sliding-window layers, if any layer has one (as transformers decides).
    fn read_sliding_window(v: &Value, file: &Path, arch: Architecture) -> Result<Option<usize>> {
        let window = opt_usize(v, file, "sliding_window")?;
        Ok(match arch {
            // Mistral applies `sliding_window` (class default 4096) to every layer.
            Architecture::Mistral => window.unwrap_or(Some(4096)),
            Architecture::Llama => None,
            // Qwen: only with `use_sliding_window`, and only on layers marked (or numbered
            // from `max_window_layers`) as sliding.
            Architecture::Qwen2 | Architecture::Qwen3 => {
                if !opt_bool(v, file, "use_sliding_window", false)? {
                    return Ok(None);
                }
                let Some(w) = window.unwrap_or(Some(4096)) else {
                    return Ok(None);
                };
                let layers = get_usize(v, file, "num_hidden_layers")?;
                let any_sliding = match v.get("layer_types") {
                    Some(Value::Array(a)) => {
                        a.iter().any(|t| t.as_str() == Some("sliding_attention"))
                    }
                    _ => {
                        let first = opt_usize(v, file, "max_window_layers")?
                            .flatten()
                            .unwrap_or(28);
                        first < layers
                    }
                };
                any_sliding.then_some(w)
            }
        })
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
        if self.sliding_window == Some(0) {
            bail!("{f}: field `sliding_window` must be positive");
        }
        Ok(())
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// The longest context the model can be run with: `max_position_embeddings`, or the
    /// sliding window where one is set (sliding-window attention is not implemented).
    pub fn usable_context(&self) -> usize {
        self.sliding_window
            .map_or(self.max_position_embeddings, |w| {
                w.min(self.max_position_embeddings)
            })
    }

    /// What limits `usable_context`, for error messages.
    pub fn context_limit(&self) -> &'static str {
        if self.usable_context() < self.max_position_embeddings {
            "sliding_window (sliding-window attention is not implemented)"
        } else {
            "max_position_embeddings"
        }
    }

    /// Refuses a context of `tokens` that sliding-window attention would see differently from
    /// full attention (the window is not implemented; within it the two are the same).
    pub fn check_context(&self, tokens: usize) -> std::result::Result<(), String> {
        match self.sliding_window {
            Some(w) if tokens > w => Err(format!(
                "the model's config.json sets `sliding_window` = {w} and {tokens} tokens of context were asked for: sliding-window attention is not implemented, so at most {w} tokens can be used (shorten the context: --ctx, seq_len, max_tokens)"
            )),
            _ => Ok(()),
        }
    }

    /// RoPE inverse frequencies (head_dim / 2 of them) and the factor cos and sin are multiplied
    /// by, as transformers' `ROPE_INIT_FUNCTIONS` define them (computed here in f64).
    pub fn rope_frequencies(&self) -> (Vec<f64>, f64) {
        let dim = self.head_dim as f64;
        let base = self.rope_theta;
        let inv: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim))
            .collect();
        match &self.rope_scaling {
            RopeScaling::Default => (inv, 1.0),
            RopeScaling::Linear { factor } => (inv.iter().map(|x| x / factor).collect(), 1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let out = inv
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (out, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig,
                attention_factor,
                beta_fast,
                beta_slow,
                truncate,
            } => {
                let correction_dim = |rot: f64| {
                    dim * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                let out = inv
                    .iter()
                    .enumerate()
                    .map(|(i, &extrapolation)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        extrapolation / factor * (1.0 - keep) + extrapolation * keep
                    })
                    .collect();
                (out, *attention_factor)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "max_position_embeddings": 256
        })
    }

    fn with(mut v: Value, k: &str, x: Value) -> Value {
        v.as_object_mut().unwrap().insert(k.into(), x);
        v
    }

    fn err(v: &Value) -> String {
        format!(
            "{:#}",
            LlamaConfig::from_json(v, Path::new("m/config.json")).unwrap_err()
        )
    }

    fn ok(v: &Value) -> LlamaConfig {
        LlamaConfig::from_json(v, Path::new("m/config.json")).unwrap()
    }

    #[test]
    fn transformers_5_rope_parameters_set_theta() {
        let v = with(
            base(),
            "rope_parameters",
            json!({"rope_theta": 100000.0, "rope_type": "default"}),
        );
        let c = ok(&v);
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        // The transformers 4 form gives the same config.
        let v4 = with(base(), "rope_theta", json!(100000.0));
        assert_eq!(ok(&v4), c);
    }

    #[test]
    fn llama3_scaling_keeps_short_wavelengths_and_divides_long_ones() {
        let v = with(
            with(base(), "rope_theta", json!(500000.0)),
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        );
        let c = ok(&v);
        let (inv, att) = c.rope_frequencies();
        let plain = LlamaConfig {
            rope_scaling: RopeScaling::Default,
            ..c.clone()
        }
        .rope_frequencies()
        .0;
        assert_eq!(att, 1.0);
        assert_eq!(inv[0], plain[0]); // wavelength 2 pi < 8192 / 4
        assert_eq!(*inv.last().unwrap(), plain.last().unwrap() / 32.0);
    }

    #[test]
    fn refused_configs_name_the_file_and_key() {
        let cases: Vec<(Value, &str)> = vec![
            (
                with(base(), "rope_scaling", json!({"rope_type": "dynamic", "factor": 2.0})),
                "`rope_scaling.rope_type` = \"dynamic\" is not supported; supported: default, linear, llama3, yarn",
            ),
            (
                with(base(), "rope_parameters", json!({"rope_type": "longrope", "rope_theta": 1e4})),
                "`rope_parameters.rope_type` = \"longrope\"",
            ),
            (with(base(), "partial_rotary_factor", json!(0.5)), "`partial_rotary_factor` = 0.5"),
            (
                with(base(), "rope_parameters", json!({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25})),
                "`rope_parameters.partial_rotary_factor` = 0.25",
            ),
            (with(base(), "mlp_bias", json!(true)), "`mlp_bias` = true"),
            (with(base(), "hidden_act", json!("gelu")), "`hidden_act` = \"gelu\""),
            (with(base(), "rope_interleaved", json!(true)), "`rope_interleaved` = true"),
            (
                with(with(base(), "architectures", json!(["GemmaForCausalLM"])), "model_type", json!("gemma")),
                "unsupported architecture [\"GemmaForCausalLM\"]",
            ),
            (
                with(base(), "rope_scaling", json!({"rope_type": "linear"})),
                "`rope_scaling` lacks `factor`",
            ),
        ];
        for (v, want) in cases {
            let e = err(&v);
            assert!(
                e.contains("m/config.json") && e.contains(want),
                "{e}\nwanted: {want}"
            );
        }
    }

    #[test]
    fn architecture_defaults_follow_transformers() {
        let qwen3 = json!({
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "max_position_embeddings": 256
        });
        let c = ok(&qwen3);
        assert_eq!(
            (c.head_dim, c.qk_norm, c.attention_bias),
            (128, true, false)
        );
        let qwen2 = with(
            with(qwen3.clone(), "architectures", json!(["Qwen2ForCausalLM"])),
            "model_type",
            json!("qwen2"),
        );
        let c = ok(&qwen2);
        assert_eq!(
            (c.head_dim, c.attention_bias, c.o_proj_bias),
            (16, true, false)
        );
        let llama = with(base(), "attention_bias", json!(true));
        assert!(ok(&llama).o_proj_bias);
        let mistral = with(base(), "architectures", json!(["MistralForCausalLM"]));
        assert_eq!(ok(&mistral).sliding_window, Some(4096));
        assert_eq!(
            ok(&with(mistral, "sliding_window", json!(null))).sliding_window,
            None
        );
        let qwen_sliding = with(
            with(
                with(qwen2, "use_sliding_window", json!(true)),
                "sliding_window",
                json!(32),
            ),
            "max_window_layers",
            json!(1),
        );
        let c = ok(&qwen_sliding);
        assert_eq!(c.sliding_window, Some(32));
        assert!(c.check_context(32).is_ok());
        assert!(c
            .check_context(33)
            .unwrap_err()
            .contains("`sliding_window` = 32"));
    }
}
