//! llama.cpp GGUF checkpoints as teachers. One `.gguf` file of the `llama` architecture is read
//! into what a Hugging Face folder gives: a config.json value (parsed by `LlamaConfig::from_json`),
//! every tensor dequantized to f32 under its Hugging Face name (q/k rows put back from llama.cpp's
//! interleaved RoPE order) and a tokenizer.json built from the vocabulary in the metadata.
//! Whatever would change the model's function and is not reproduced here (other architectures,
//! RoPE scaling other than linear, partial rotary, per-layer shapes, unknown tensors) is refused
//! with the file and the key.

use crate::config::LlamaConfig;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value as Json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tokenizers::Tokenizer;

/// `llama.*` keys this reader understands; any other key in that namespace is refused, since
/// llama.cpp may read it and compute something we do not.
const LLAMA_KEYS: &[&str] = &[
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    // Informational for linear scaling (llama.cpp reads them for YaRN only).
    "rope.scaling.original_context_length",
    "rope.scaling.finetuned",
    "vocab_size",
    // Accepted when 0 (checked below).
    "expert_count",
    "expert_used_count",
    // Written by llama.cpp's old convert.py; never read.
    "tensor_data_layout",
];

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// A path names a GGUF file when it ends in `.gguf`.
pub fn is_gguf_path(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// An opened `.gguf` file: its metadata and tensor index (the tensors stay on disk).
pub struct GgufModel {
    pub path: PathBuf,
    content: Content,
    config_json: Json,
}

impl GgufModel {
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path)
            .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        let content = Content::read(&mut f).map_err(|e| {
            anyhow!(
                "{}: cannot read the GGUF header: {}",
                path.display(),
                explain_read_error(&e.to_string())
            )
        })?;
        let config_json = config_json(&Meta::new(path, &content), &content)?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            config_json,
        })
    }

    fn meta(&self) -> Meta<'_> {
        Meta::new(&self.path, &self.content)
    }

    /// The model's settings as a Hugging Face `config.json`.
    pub fn config_json(&self) -> &Json {
        &self.config_json
    }

    pub fn config(&self) -> Result<LlamaConfig> {
        LlamaConfig::from_json(&self.config_json, &self.path)
    }

    /// Checks what the reader will trust before it reads tensor `name`: a non-empty shape of
    /// whole blocks, and data inside the file (a crafted header must fail here, not in the
    /// reader's unchecked slicing).
    fn check_extent(&self, name: &str, file_len: u64) -> Result<()> {
        let path = self.path.display();
        let info = &self.content.tensor_infos[name];
        let dims = info.shape.dims();
        let n = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .filter(|&n| n > 0)
            .with_context(|| {
                format!("{path}: tensor `{name}` has shape {dims:?}: empty or too large")
            })?;
        let (block, bytes) = (
            info.ggml_dtype.block_size() as u64,
            info.ggml_dtype.type_size() as u64,
        );
        if n % block != 0 {
            bail!("{path}: tensor `{name}` has {n} values, not whole blocks of {block}");
        }
        let end = (n / block)
            .checked_mul(bytes)
            .and_then(|size| size.checked_add(info.offset))
            .and_then(|e| e.checked_add(self.content.tensor_data_offset));
        match end {
            Some(e) if e <= file_len => Ok(()),
            _ => bail!("{path}: tensor `{name}` ends beyond the file ({file_len} bytes): truncated or corrupt"),
        }
    }

    /// Every tensor in f32 under its Hugging Face name, q/k rows in Hugging Face order.
    pub fn load_tensors(
        &self,
        cfg: &LlamaConfig,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let path = self.path.display();
        let mut f = std::fs::File::open(&self.path)
            .with_context(|| format!("cannot open GGUF file {path}"))?;
        let file_len = f
            .metadata()
            .with_context(|| format!("cannot read GGUF file {path}"))?
            .len();
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        let mut out = HashMap::new();
        for name in names {
            if name == "rope_freqs.weight" {
                bail!("{path}: tensor `{name}` (per-frequency RoPE factors, as in Llama 3.1's rope scaling) is not supported");
            }
            let hf = hf_name(name, cfg.num_hidden_layers).with_context(|| {
                format!("{path}: tensor `{name}` is not supported (not a tensor of a llama model as loaded here)")
            })?;
            self.check_extent(name, file_len)?;
            let t = self
                .content
                .tensor(&mut f, name, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| anyhow!("{path}: tensor `{name}`: {e}"))?;
            let t = if hf.contains(".q_proj.") {
                unpermute_qk(&t, cfg.num_attention_heads)
            } else if hf.contains(".k_proj.") {
                unpermute_qk(&t, cfg.num_key_value_heads)
            } else {
                Ok(t)
            }
            .with_context(|| format!("{path}: tensor `{name}`"))?;
            out.insert(hf, t.to_device(device)?);
        }
        Ok(out)
    }

    /// The tokenizer as a Hugging Face tokenizer.json (serialized deterministically: it is
    /// hashed into the teacher's fingerprint).
    pub fn tokenizer_json(&self) -> Result<String> {
        let m = self.meta();
        let key = "tokenizer.ggml.model";
        match m.string(key)? {
            Some("llama") => Ok(serde_json::to_string(&sentencepiece_tokenizer(&m)?)?),
            Some("gpt2") => self.byte_level_tokenizer_json(),
            Some(other) => Err(m.err(
                key,
                format!("= {other:?}: supported tokenizers are \"llama\" (SentencePiece) and \"gpt2\" (byte-level BPE)"),
            )),
            None => Err(m.err(key, "is missing: the file has no tokenizer")),
        }
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let json = self.tokenizer_json()?;
        crate::folder::without_panics(|| Tokenizer::from_str(&json))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| anyhow!("{}: cannot build the tokenizer: {e}", self.path.display()))
    }

    /// `gpt2` vocabularies go through candle's builder, for the pre-tokenizers it reproduces.
    fn byte_level_tokenizer_json(&self) -> Result<String> {
        let m = self.meta();
        let key = "tokenizer.ggml.pre";
        // candle's names for llama.cpp's; its fallback for any other name is the GPT-2
        // pipeline with a prefix space, right for none of them.
        let pre = match m.string(key)? {
            Some("qwen2") => "qwen2",
            Some("llama-bpe") | Some("llama3") => "llama3",
            Some("smaug-bpe") => "smaug-bpe",
            other => {
                return Err(m.err(
                    key,
                    format!("= {other:?}: for \"gpt2\" tokenizers only \"llama-bpe\", \"smaug-bpe\" and \"qwen2\" are supported"),
                ))
            }
        };
        let mut metadata = self.content.metadata.clone();
        metadata.insert(key.into(), Value::String(pre.into()));
        // llama.cpp writes `unknown_token_id`; candle reads `unk_token_id`.
        if let Some(v) = metadata.get("tokenizer.ggml.unknown_token_id").cloned() {
            metadata
                .entry("tokenizer.ggml.unk_token_id".into())
                .or_insert(v);
        }
        let c = Content {
            magic: self.content.magic,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        };
        let tok = Tokenizer::from_gguf(&c).map_err(|e| {
            anyhow!(
                "{}: cannot build the gpt2 tokenizer: {e}",
                self.path.display()
            )
        })?;
        tok.to_string(false).map_err(|e| {
            anyhow!(
                "{}: cannot serialize the tokenizer: {e}",
                self.path.display()
            )
        })
    }
}

/// candle names an unknown tensor type by number only; give llama.cpp's name and what we read.
fn explain_read_error(msg: &str) -> String {
    const NAMES: &[(u32, &str)] = &[
        (4, "Q4_2 (removed)"),
        (5, "Q4_3 (removed)"),
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (21, "IQ3_S"),
        (22, "IQ2_S"),
        (23, "IQ4_XS"),
        (24, "I8"),
        (25, "I16"),
        (26, "I32"),
        (27, "I64"),
        (28, "F64"),
        (29, "IQ1_M"),
        (34, "TQ1_0"),
        (35, "TQ2_0"),
        (39, "MXFP4"),
    ];
    // (With RUST_BACKTRACE set, candle appends a backtrace to the message.)
    let number = msg.strip_prefix("unknown dtype for tensor ").and_then(|n| {
        let digits: String = n.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse::<u32>().ok()
    });
    match number {
        Some(n) => {
            let name = NAMES
                .iter()
                .find(|(k, _)| *k == n)
                .map_or("unknown", |(_, s)| s);
            format!("a tensor has ggml type {n} ({name}), which is not supported; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K")
        }
        None => msg.to_string(),
    }
}

/// llama.cpp tensor name -> Hugging Face name (None for anything a llama model does not have).
fn hf_name(name: &str, n_layers: usize) -> Option<String> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let (layer, part) = name.strip_prefix("blk.")?.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    if layer >= n_layers {
        return None;
    }
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes `LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py, which reorders the rows
/// of q_proj (with the number of heads) and k_proj (with the number of KV heads) for llama.cpp's
/// interleaved RoPE: within each head, Hugging Face rows `[x0 .. x(d/2-1), y0 .. y(d/2-1)]` are
/// stored as `[x0, y0, x1, y1, ...]`. Works on weights `[rows, in]` and biases `[rows]`.
pub fn unpermute_qk(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if n_head == 0 || rows % (2 * n_head) != 0 {
        bail!("{rows} rows cannot be split into {n_head} heads of an even size (shape {dims:?})");
    }
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((n_head, rows / n_head / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Typed access to the metadata, with errors that name the file and the key.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl<'a> Meta<'a> {
    fn new(path: &'a Path, content: &'a Content) -> Self {
        Self {
            path,
            md: &content.metadata,
        }
    }

    fn err(&self, key: &str, what: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: GGUF key `{key}` {what}", self.path.display())
    }

    fn uint(&self, key: &str) -> Result<Option<u64>> {
        Ok(match self.md.get(key) {
            None => None,
            Some(Value::Array(_)) => {
                return Err(self.err(
                    key,
                    "holds one value per layer; only one value for all layers is supported",
                ))
            }
            Some(v) => Some(as_u64(v).ok_or_else(|| {
                self.err(key, format!("must be a non-negative integer, found {v:?}"))
            })?),
        })
    }

    fn required(&self, key: &str) -> Result<u64> {
        self.uint(key)?.ok_or_else(|| self.err(key, "is missing"))
    }

    /// f32 values become the shortest decimal that reads back as them (1e-5, not
    /// 9.99999974e-6), as the Hugging Face config.json they were written from said.
    fn float(&self, key: &str) -> Result<Option<f64>> {
        Ok(match self.md.get(key) {
            None => None,
            Some(Value::F32(x)) => Some(format!("{x}").parse().unwrap_or(*x as f64)),
            Some(Value::F64(x)) => Some(*x),
            Some(v) => Some(
                as_u64(v).ok_or_else(|| self.err(key, format!("must be a number, found {v:?}")))?
                    as f64,
            ),
        })
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        Ok(match self.md.get(key) {
            None => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(v) => return Err(self.err(key, format!("must be a string, found {v:?}"))),
        })
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>> {
        Ok(match self.md.get(key) {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => return Err(self.err(key, format!("must be a boolean, found {v:?}"))),
        })
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        Ok(match self.md.get(key) {
            None => None,
            Some(Value::Array(a)) => Some(a.as_slice()),
            Some(v) => return Err(self.err(key, format!("must be an array, found {v:?}"))),
        })
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// The Hugging Face config.json equivalent of the metadata (checked by `LlamaConfig::from_json`).
fn config_json(m: &Meta, content: &Content) -> Result<Json> {
    let key = "general.architecture";
    match m.string(key)? {
        Some("llama") => {}
        Some(other) => return Err(m.err(key, format!("= {other:?}: only \"llama\" is supported"))),
        None => return Err(m.err(key, "is missing")),
    }
    if let Some(t) = m.string("general.type")? {
        if t != "model" {
            return Err(m.err(
                "general.type",
                format!("= {t:?}: only whole models (\"model\") can be loaded"),
            ));
        }
    }
    if let Some(n) = m.uint("split.count")? {
        if n > 1 {
            return Err(m.err(
                "split.count",
                format!("= {n}: split GGUF files are not supported (merge them with llama-gguf-split --merge)"),
            ));
        }
    }
    let mut keys: Vec<&String> = m.md.keys().collect();
    keys.sort();
    for k in keys {
        if let Some(rest) = k.strip_prefix("llama.") {
            if !LLAMA_KEYS.contains(&rest) {
                return Err(m.err(k, "is not supported (llama.cpp may use it to compute something this reader does not)"));
            }
        }
    }
    for k in ["llama.expert_count", "llama.expert_used_count"] {
        if let Some(n) = m.uint(k)?.filter(|&n| n != 0) {
            return Err(m.err(
                k,
                format!("= {n}: mixture-of-experts models are not supported"),
            ));
        }
    }

    let hidden = m.required("llama.embedding_length")?;
    let n_head = m.required("llama.attention.head_count")?;
    if n_head == 0 {
        return Err(m.err("llama.attention.head_count", "must be positive"));
    }
    let n_kv = m.uint("llama.attention.head_count_kv")?.unwrap_or(n_head);
    let head_dim = match m.uint("llama.attention.key_length")? {
        Some(k) => k,
        None if hidden % n_head == 0 => hidden / n_head,
        None => {
            return Err(m.err(
                "llama.attention.key_length",
                format!("is missing and `llama.embedding_length` ({hidden}) is not a multiple of `llama.attention.head_count` ({n_head})"),
            ))
        }
    };
    if let Some(v) = m.uint("llama.attention.value_length")? {
        if v != head_dim {
            return Err(m.err(
                "llama.attention.value_length",
                format!("= {v}, but the key length is {head_dim}: different K and V head sizes are not supported"),
            ));
        }
    }
    if let Some(r) = m.uint("llama.rope.dimension_count")? {
        if r != head_dim {
            return Err(m.err(
                "llama.rope.dimension_count",
                format!("= {r}, but the head dimension is {head_dim}: partial rotary embeddings are not supported"),
            ));
        }
    }
    // llama.cpp's reading: the type defaults to linear, the factor to none (0 or 1).
    let factor = match m.float("llama.rope.scaling.factor")? {
        Some(f) => Some(f),
        None => m.float("llama.rope.scale_linear")?,
    }
    .filter(|&f| f != 0.0 && f != 1.0);
    let rope_scaling = match m.string("llama.rope.scaling.type")?.unwrap_or("linear") {
        "none" => None,
        "linear" => factor.map(|f| json!({"rope_type": "linear", "type": "linear", "factor": f})),
        other => {
            return Err(m.err(
                "llama.rope.scaling.type",
                format!("= {other:?}: only \"none\" and \"linear\" are supported"),
            ))
        }
    };

    let tokens = m.array("tokenizer.ggml.tokens")?.map_or(0, |a| a.len()) as u64;
    let embd_rows = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims().first().copied())
        .map(|n| n as u64);
    let vocab_size = match m.uint("llama.vocab_size")? {
        Some(n) => n,
        None if tokens > 0 => tokens,
        None => embd_rows.unwrap_or(0),
    };
    let mut eos = vec![];
    for k in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = m.uint(k)? {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let mut cfg = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": m.required("llama.feed_forward_length")?,
        "num_hidden_layers": m.required("llama.block_count")?,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": m.required("llama.context_length")?,
        "rms_norm_eps": m.float("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| m.err("llama.attention.layer_norm_rms_epsilon", "is missing"))?,
        "rope_theta": m.float("llama.rope.freq_base")?.unwrap_or(10000.0),
        // No `output.weight`: llama.cpp uses the embedding as the LM head.
        "tie_word_embeddings": !content.tensor_infos.contains_key("output.weight"),
        "attention_bias": content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        "bos_token_id": m.uint("tokenizer.ggml.bos_token_id")?,
        "eos_token_id": eos,
    });
    if let Some(rs) = rope_scaling {
        cfg["rope_scaling"] = rs;
    }
    Ok(cfg)
}

/// `tokenizer.ggml.model = "llama"`: the tokenizer.json transformers writes for a SentencePiece
/// BPE vocabulary (LlamaTokenizerFast, legacy normalizer). llama.cpp merges the adjacent pair
/// whose joined piece scores highest; as BPE that is one merge per split of each piece into two
/// pieces, ranked by the joined piece's score (stable: ties keep vocabulary order), which is
/// how transformers derives the merges from tokenizer.model.
fn sentencepiece_tokenizer(m: &Meta) -> Result<Json> {
    let strings = |key: &str| -> Result<Vec<&str>> {
        let a = m.array(key)?.ok_or_else(|| m.err(key, "is missing"))?;
        a.iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(m.err(key, format!("must hold strings, found {v:?}"))),
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let key = "tokenizer.ggml.scores";
    let scores: Vec<f32> = m
        .array(key)?
        .ok_or_else(|| m.err(key, "is missing"))?
        .iter()
        .map(|v| match *v {
            Value::F32(x) => Ok(x),
            Value::F64(x) => Ok(x as f32),
            ref v => Err(m.err(key, format!("must hold numbers, found {v:?}"))),
        })
        .collect::<Result<_>>()?;
    let key = "tokenizer.ggml.token_type";
    let types: Vec<i64> = match m.array(key)? {
        None => vec![1; n],
        Some(a) => a
            .iter()
            .map(|v| match *v {
                Value::I32(x) => Ok(x as i64),
                ref v => as_u64(v)
                    .map(|x| x as i64)
                    .ok_or_else(|| m.err(key, format!("must hold integers, found {v:?}"))),
            })
            .collect::<Result<_>>()?,
    };
    for (key, len) in [
        ("tokenizer.ggml.scores", scores.len()),
        ("tokenizer.ggml.token_type", types.len()),
    ] {
        if len != n {
            return Err(m.err(
                key,
                format!("has {len} entries for {n} tokens in `tokenizer.ggml.tokens`"),
            ));
        }
    }
    let key = "tokenizer.ggml.remove_extra_whitespaces";
    if m.boolean(key)? == Some(true) {
        return Err(m.err(key, "= true is not supported"));
    }
    let space_prefix = m
        .boolean("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let add_bos = m.boolean("tokenizer.ggml.add_bos_token")?.unwrap_or(true);
    let add_eos = m.boolean("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(n);
    for (id, t) in tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(t, id as u32) {
            return Err(m.err(
                "tokenizer.ggml.tokens",
                format!("lists {t:?} twice (ids {first} and {id})"),
            ));
        }
    }
    let token_at = |key: &str| -> Result<Option<(u32, &str)>> {
        match m.uint(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id as usize)
                .map(|t| Some((id as u32, *t)))
                .ok_or_else(|| m.err(key, format!("= {id} is not a token id (0..{n})"))),
        }
    };
    let unk = match token_at("tokenizer.ggml.unknown_token_id")? {
        Some((_, t)) => Some(t),
        None => types
            .iter()
            .position(|&t| t == TOKEN_UNKNOWN)
            .map(|i| tokens[i]),
    };
    let bos = token_at("tokenizer.ggml.bos_token_id")?;
    let eos = token_at("tokenizer.ggml.eos_token_id")?;

    let mut merges: Vec<(u32, u32, f32)> = vec![];
    for (id, piece) in tokens.iter().enumerate() {
        let mut local: Vec<(u32, u32)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(k, _)| {
                let (l, r) = piece.split_at(k);
                Some((*vocab.get(l)?, *vocab.get(r)?))
            })
            .collect();
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (l, r, scores[id])));
    }
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    let merges: Vec<[&str; 2]> = merges
        .iter()
        .map(|&(l, r, _)| [tokens[l as usize], tokens[r as usize]])
        .collect();

    let added_tokens: Vec<Json> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| matches!(t, TOKEN_UNKNOWN | TOKEN_CONTROL | TOKEN_USER_DEFINED))
        .map(|(id, &t)| {
            json!({
                "id": id, "content": tokens[id], "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": t != TOKEN_USER_DEFINED,
            })
        })
        .collect();
    let replace_space = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
    let normalizer = if space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace_space]})
    } else {
        replace_space
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let specials: Vec<(u32, &str)> = [add_bos.then_some(bos), add_eos.then_some(eos)]
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    if add_bos && bos.is_none() {
        return Err(m.err(
            "tokenizer.ggml.add_bos_token",
            "is true but `tokenizer.ggml.bos_token_id` is missing",
        ));
    }
    if add_eos && eos.is_none() {
        return Err(m.err(
            "tokenizer.ggml.add_eos_token",
            "is true but `tokenizer.ggml.eos_token_id` is missing",
        ));
    }
    let post_processor = if specials.is_empty() {
        Json::Null
    } else {
        let special =
            |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
        let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
        let wrap = |type_id: u32, seq_id: &str| -> Vec<Json> {
            let mut v = vec![];
            if add_bos {
                v.extend(bos.map(|(_, t)| special(t, type_id)));
            }
            v.push(seq(seq_id, type_id));
            if add_eos {
                v.extend(eos.map(|(_, t)| special(t, type_id)));
            }
            v
        };
        let single = wrap(0, "A");
        let mut pair = single.clone();
        pair.extend(wrap(1, "B"));
        let special_tokens: serde_json::Map<String, Json> = specials
            .iter()
            .map(|&(id, t)| (t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]})))
            .collect();
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens})
    };
    let vocab_json: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.to_string(), json!(id)))
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab_json,
            "merges": merges,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::folder::ModelFolder;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};

    /// llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), written out independently:
    /// `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`.
    fn permute(w: &Tensor, n_head: usize) -> Tensor {
        let dims = w.dims().to_vec();
        let rest: usize = dims[1..].iter().product();
        w.reshape((n_head, 2, dims[0] / n_head / 2, rest))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape(dims)
            .unwrap()
    }

    #[test]
    fn unpermute_puts_q_and_k_rows_back_in_hugging_face_order() {
        let dev = Device::Cpu;
        // One head of 8 rotary rows: llama.cpp stores Hugging Face rows 0 4 1 5 2 6 3 7.
        let stored = Tensor::new(&[0f32, 4., 1., 5., 2., 6., 3., 7.], &dev).unwrap();
        let hf = unpermute_qk(&stored, 1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(hf, [0., 1., 2., 3., 4., 5., 6., 7.]);
        // Two heads of 4 rows: each head on its own.
        let stored = Tensor::new(&[0f32, 2., 1., 3., 4., 6., 5., 7.], &dev).unwrap();
        let hf = unpermute_qk(&stored, 2).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(hf, [0., 1., 2., 3., 4., 5., 6., 7.]);
        // Weights [rows, in]: whole rows move; the inverse of llama.cpp's permute for q (8
        // heads) and k (4 KV heads) of stories260k's shape.
        let w = Tensor::arange(0f32, 64. * 5., &dev)
            .unwrap()
            .reshape((64, 5))
            .unwrap();
        for (rows, n_head) in [(64, 8), (32, 4)] {
            let w = w.narrow(0, 0, rows).unwrap();
            let stored = permute(&w, n_head);
            assert_ne!(
                stored.to_vec2::<f32>().unwrap(),
                w.to_vec2::<f32>().unwrap()
            );
            let back = unpermute_qk(&stored, n_head).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        }
        let e = unpermute_qk(&Tensor::zeros((6, 2), DType::F32, &dev).unwrap(), 2).unwrap_err();
        assert!(e.to_string().contains("6 rows"), "{e}");
    }

    /// A one-layer llama (hidden 8, 2 heads of 4, 1 KV head, FFN 12) with a 9-piece
    /// SentencePiece vocabulary, in Hugging Face layout; `write` stores it as llama.cpp does.
    struct Tiny {
        meta: Vec<(String, Value)>,
        tensors: Vec<(String, Tensor)>,
    }

    const TOKENS: &[&str] = &["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab", "▁ab"];

    impl Tiny {
        fn new() -> Self {
            let s = |x: &str| Value::String(x.into());
            let meta = vec![
                ("general.architecture", s("llama")),
                ("general.name", s("tiny")),
                ("llama.block_count", Value::U32(1)),
                ("llama.context_length", Value::U32(16)),
                ("llama.embedding_length", Value::U32(8)),
                ("llama.feed_forward_length", Value::U32(12)),
                ("llama.attention.head_count", Value::U32(2)),
                ("llama.attention.head_count_kv", Value::U32(1)),
                ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
                ("llama.rope.dimension_count", Value::U32(4)),
                ("llama.rope.freq_base", Value::F32(10000.0)),
                ("tokenizer.ggml.model", s("llama")),
                (
                    "tokenizer.ggml.tokens",
                    Value::Array(TOKENS.iter().map(|t| s(t)).collect()),
                ),
                (
                    "tokenizer.ggml.scores",
                    Value::Array(
                        [0., 0., 0., -1., -2., -3., -4., -5., -6.]
                            .into_iter()
                            .map(Value::F32)
                            .collect(),
                    ),
                ),
                (
                    "tokenizer.ggml.token_type",
                    Value::Array(
                        [2, 3, 3, 1, 1, 1, 1, 1, 1]
                            .into_iter()
                            .map(Value::I32)
                            .collect(),
                    ),
                ),
                ("tokenizer.ggml.bos_token_id", Value::U32(1)),
                ("tokenizer.ggml.eos_token_id", Value::U32(2)),
                ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
                ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
            ];
            let dev = Device::Cpu;
            let mut seed = 0u32;
            let mut t = |name: &str, shape: &[usize]| {
                seed += 1;
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|i| ((i as f32 * 0.37 + seed as f32 * 1.3).sin()) * 0.5)
                    .collect();
                (name.to_string(), Tensor::from_vec(v, shape, &dev).unwrap())
            };
            let tensors = vec![
                t("token_embd.weight", &[9, 8]),
                t("output_norm.weight", &[8]),
                t("blk.0.attn_norm.weight", &[8]),
                t("blk.0.attn_q.weight", &[8, 8]),
                t("blk.0.attn_k.weight", &[4, 8]),
                t("blk.0.attn_v.weight", &[4, 8]),
                t("blk.0.attn_output.weight", &[8, 8]),
                t("blk.0.ffn_norm.weight", &[8]),
                t("blk.0.ffn_gate.weight", &[12, 8]),
                t("blk.0.ffn_up.weight", &[12, 8]),
                t("blk.0.ffn_down.weight", &[8, 12]),
            ];
            Tiny {
                meta: meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                tensors,
            }
        }

        fn set(mut self, key: &str, v: Value) -> Self {
            self.meta.retain(|(k, _)| k != key);
            self.meta.push((key.to_string(), v));
            self
        }

        fn without(mut self, key: &str) -> Self {
            self.meta.retain(|(k, _)| k != key);
            self
        }

        fn with_tensor(mut self, name: &str, shape: &[usize]) -> Self {
            let t = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
            self.tensors.push((name.to_string(), t));
            self
        }

        /// Writes `<name>.gguf` in a fresh temp folder; q/k permuted as llama.cpp's converter does.
        fn write(&self, name: &str) -> PathBuf {
            let dir = std::env::temp_dir().join(format!("gguf-unit-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{name}.gguf"));
            let q: Vec<(String, QTensor)> = self
                .tensors
                .iter()
                .map(|(n, t)| {
                    let t = match n.as_str() {
                        "blk.0.attn_q.weight" => permute(t, 2),
                        "blk.0.attn_k.weight" => permute(t, 1),
                        _ => t.clone(),
                    };
                    (n.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
                })
                .collect();
            let meta: Vec<(&str, &Value)> =
                self.meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let tensors: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let mut f = std::fs::File::create(&path).unwrap();
            gguf_file::write(&mut f, &meta, &tensors).unwrap();
            path
        }
    }

    fn open_err(path: &Path) -> String {
        match ModelFolder::open(path) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    fn assert_names(msg: &str, path: &Path, key: &str) {
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(key),
            "the error should name {} and {key}: {msg}",
            path.display()
        );
    }

    #[test]
    fn tiny_model_loads_under_hugging_face_names_and_runs() {
        let tiny = Tiny::new();
        let path = tiny.write("ok");
        let f = ModelFolder::open(&path).unwrap();
        let c = &f.config;
        assert_eq!(
            (
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim
            ),
            (8, 2, 1, 4)
        );
        assert_eq!((c.vocab_size, c.max_position_embeddings), (9, 16));
        assert_eq!(c.rms_norm_eps, 1e-5, "the f32 1e-5 reads back as 1e-5");
        assert!(c.tie_word_embeddings, "no output.weight: tied");
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(1), vec![2])
        );
        let got = f.load_tensors(&Device::Cpu).unwrap();
        assert_eq!(got.len(), tiny.tensors.len());
        for (name, want) in &tiny.tensors {
            let hf = hf_name(name, 1).unwrap();
            assert_eq!(got[&hf].dims(), want.dims(), "{hf}");
            let d = crate::max_abs_diff(&got[&hf], want).unwrap();
            assert_eq!(d, 0.0, "{name} -> {hf}");
        }
        let m = crate::Llama::load(&f, crate::QuantConfig::none(), &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[1u32, 6, 5, 8]], &Device::Cpu).unwrap();
        assert_eq!(m.forward(&ids).unwrap().dims(), [1, 4, 9]);
        let fp = f.fingerprint().unwrap();
        assert_eq!(fp, ModelFolder::open(&path).unwrap().fingerprint().unwrap());
    }

    #[test]
    fn crafted_tensor_extents_are_refused_before_reading() {
        // Found by fuzzing: an empty tensor reached candle's reader, whose slice over no data
        // had a misaligned pointer (undefined behaviour, caught as an abort).
        let mut tiny = Tiny::new();
        for (n, t) in tiny.tensors.iter_mut() {
            if n == "output_norm.weight" {
                *t = Tensor::zeros((0,), DType::F32, &Device::Cpu).unwrap();
            }
        }
        let path = tiny.write("empty_tensor");
        let err = match ModelFolder::open(&path).and_then(|f| f.load_tensors(&Device::Cpu)) {
            Ok(_) => panic!("an empty tensor loaded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("output_norm.weight") && err.contains("empty"),
            "{err}"
        );

        // A file cut short: the last tensor's data ends beyond it.
        let path = Tiny::new().write("truncated");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 64]).unwrap();
        let f = ModelFolder::open(&path).unwrap();
        let err = format!("{:#}", f.load_tensors(&Device::Cpu).unwrap_err());
        assert!(err.contains("beyond the file"), "{err}");
    }

    #[test]
    fn sentencepiece_merges_follow_the_scores() {
        let path = Tiny::new().write("spm");
        let f = ModelFolder::open(&path).unwrap();
        let tok = f.tokenizer().unwrap();
        let json: Json =
            serde_json::from_str(&f.gguf.as_ref().unwrap().tokenizer_json().unwrap()).unwrap();
        // "▁a" (-1), "ab" (-2), then "▁ab" (-3) by its two splits in id order.
        assert_eq!(
            json["model"]["merges"],
            json!([["▁", "a"], ["a", "b"], ["▁", "ab"], ["▁a", "b"]])
        );
        let ids = |s: &str, special: bool| tok.encode(s, special).unwrap().get_ids().to_vec();
        assert_eq!(ids("ab", false), [8], "▁ a b -> ▁a b -> ▁ab");
        assert_eq!(ids("b a", false), [3, 5, 6], "no (▁, b) merge");
        assert_eq!(ids("ab", true), [1, 8], "add_bos_token");
        assert_eq!(ids("c", false), [3, 0], "no byte pieces: ▁ then unknown");
        assert_eq!(
            ids("a</s>", false),
            [6, 2],
            "control pieces are special tokens"
        );
        assert_eq!(tok.decode(&[1, 8, 6], true).unwrap(), "ab a");
    }

    #[test]
    fn refuses_what_it_does_not_reproduce_naming_file_and_key() {
        let s = |x: &str| Value::String(x.into());
        let cases: Vec<(&str, Tiny, &str)> = vec![
            (
                "arch",
                Tiny::new().set("general.architecture", s("qwen2")),
                "general.architecture",
            ),
            (
                "yarn",
                Tiny::new().set("llama.rope.scaling.type", s("yarn")),
                "llama.rope.scaling.type",
            ),
            (
                "rope_dim",
                Tiny::new().set("llama.rope.dimension_count", Value::U32(2)),
                "llama.rope.dimension_count",
            ),
            (
                "unknown_key",
                Tiny::new().set("llama.attention.clamp_kqv", Value::F32(8.0)),
                "llama.attention.clamp_kqv",
            ),
            (
                "moe",
                Tiny::new().set("llama.expert_count", Value::U32(8)),
                "llama.expert_count",
            ),
            (
                "per_layer",
                Tiny::new().set(
                    "llama.feed_forward_length",
                    Value::Array(vec![Value::U32(12)]),
                ),
                "llama.feed_forward_length",
            ),
        ];
        for (name, tiny, key) in cases {
            let path = tiny.write(name);
            assert_names(&open_err(&path), &path, key);
        }
        // Linear RoPE scaling goes to the config (which refuses it until it implements it);
        // type "none" ignores the factor, as llama.cpp does.
        let path = Tiny::new()
            .set("llama.rope.scaling.type", s("none"))
            .set("llama.rope.scaling.factor", Value::F32(4.0))
            .write("rope_none");
        ModelFolder::open(&path).unwrap();
        let path = Tiny::new()
            .set("llama.rope.scaling.factor", Value::F32(4.0))
            .write("rope_linear");
        let g = GgufModel::open(&path).unwrap();
        assert_eq!(
            g.config_json()["rope_scaling"],
            json!({"rope_type": "linear", "type": "linear", "factor": 4.0})
        );

        let tensor_cases = [
            ("rope_freqs", "rope_freqs.weight", vec![2]),
            ("o_bias", "blk.0.attn_output.bias", vec![8]),
            ("layer_out_of_range", "blk.1.attn_q.weight", vec![8, 8]),
        ];
        for (name, tensor, shape) in tensor_cases {
            let path = Tiny::new().with_tensor(tensor, &shape).write(name);
            let e = ModelFolder::open(&path)
                .unwrap()
                .load_tensors(&Device::Cpu)
                .unwrap_err();
            assert_names(&format!("{e:#}"), &path, tensor);
        }

        for (name, key, v) in [
            ("tok_bert", "tokenizer.ggml.model", s("bert")),
            (
                "tok_ws",
                "tokenizer.ggml.remove_extra_whitespaces",
                Value::Bool(true),
            ),
        ] {
            let path = Tiny::new().set(key, v).write(name);
            let e = ModelFolder::open(&path).unwrap().tokenizer().unwrap_err();
            assert_names(&format!("{e:#}"), &path, key);
        }

        // A tensor type candle cannot read (IQ4_NL = 20): patch the type of `output_norm.weight`
        // (after its name: n_dims u32 = 1, one u64 dim, then the type).
        let path = Tiny::new().write("iq4_nl");
        let mut bytes = std::fs::read(&path).unwrap();
        let name = b"output_norm.weight";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 8;
        assert_eq!(
            bytes[at..at + 4],
            0u32.to_le_bytes(),
            "F32 before the patch"
        );
        bytes[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
        let e = open_err(&path);
        assert!(
            e.contains(&path.display().to_string()) && e.contains("IQ4_NL"),
            "{e}"
        );
    }

    #[test]
    fn gpt2_vocabularies_go_through_candle_with_llama3_pre_tokenization() {
        let s = |x: &str| Value::String(x.into());
        let tokens = [
            "H", "e", "l", "o", "Ġ", "w", "r", "d", "He", "ll", "Hell", "Hello", "Ġw", "or",
            "Ġwor", "ld", "Ġworld", "<|end|>",
        ];
        let merges = [
            "H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
        ];
        let arr = |v: &[&str]| Value::Array(v.iter().map(|t| s(t)).collect());
        let gpt2 = |pre: &str| {
            Tiny::new()
                .set("tokenizer.ggml.model", s("gpt2"))
                .set("tokenizer.ggml.pre", s(pre))
                .set("tokenizer.ggml.tokens", arr(&tokens))
                .set("tokenizer.ggml.merges", arr(&merges))
                .set("tokenizer.ggml.add_bos_token", Value::Bool(false))
                .set("tokenizer.ggml.eos_token_id", Value::U32(17))
                .without("tokenizer.ggml.bos_token_id")
                .without("tokenizer.ggml.unknown_token_id")
                .set(
                    "tokenizer.ggml.token_type",
                    Value::Array(vec![Value::I32(1); tokens.len()]),
                )
        };
        let path = gpt2("llama-bpe").write("gpt2_llama_bpe");
        let g = GgufModel::open(&path).unwrap();
        let tok = g.tokenizer().unwrap();
        // Llama 3's pre-tokenizer adds no prefix space: "Hello" stays one piece.
        let ids = tok.encode("Hello world", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, [11, 16]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "Hello world");
        // GPT-2's own pre-tokenizer (with a prefix space) is not what candle builds for it.
        let path = gpt2("gpt-2").write("gpt2_gpt2");
        let e = GgufModel::open(&path).unwrap().tokenizer().unwrap_err();
        assert_names(&format!("{e:#}"), &path, "tokenizer.ggml.pre");
    }
}
