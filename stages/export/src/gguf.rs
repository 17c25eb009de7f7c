//! The student as one llama.cpp GGUF file: the `llama` architecture's metadata, the
//! tokenizer from `tokenizer.json`, each projection as the llama.cpp block type of its grid
//! (Q4_0, Q8_0, Q3_K, Q2_K; rows put in llama.cpp's q/k order) and every other tensor as F32.
//! Written with candle's GGUF writer; the file says version 3 (little-endian, the same bytes
//! as version 2 otherwise).

use crate::student::Student;
use crate::{AsFloat, Written};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::Device;
use model::config::{Architecture, RopeScaling};
use quant::ggml::{self, BlockType};
use quant::GridWeight;
use serde_json::Value as Json;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

/// llama.cpp's name of a Hugging Face tensor.
fn gguf_name(hf: &str) -> Option<String> {
    let top = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.into());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
}

/// llama.cpp's converter order of q/k rows: within each head, rows [x0..x(d/2-1), y0..]
/// become [x0, y0, x1, y1, ...]. Row i of the result is row `order[i]` of the original.
pub fn qk_order(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut order = Vec::with_capacity(rows);
    for h in 0..n_head {
        for i in 0..half {
            for t in 0..2 {
                order.push(h * hd + t * half + i);
            }
        }
    }
    order
}

fn permute_values(v: &[f32], cols: usize, order: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.len());
    for &r in order {
        out.extend_from_slice(&v[r * cols..(r + 1) * cols]);
    }
    out
}

/// The architecture metadata; anything llama.cpp's `llama` architecture would compute
/// differently is refused.
fn arch_metadata(s: &Student) -> Result<Vec<(String, Value)>> {
    let c = &s.config;
    let why = if c.architecture != Architecture::Llama {
        Some(format!("architecture {:?}", c.architecture))
    } else if c.attention_bias || c.o_proj_bias {
        Some("attention biases".into())
    } else if c.qk_norm {
        Some("q/k norms".into())
    } else if c.sliding_window.is_some() {
        Some("a sliding window".into())
    } else {
        None
    };
    if let Some(w) = why {
        bail!(
            "--format gguf: {} has {w}, which this GGUF export (llama architecture) does not write",
            s.config_path.display()
        );
    }
    let u = |v: usize| Value::U32(v as u32);
    let mut m = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(s.name.clone())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("llama.context_length".into(), u(c.max_position_embeddings)),
        ("llama.embedding_length".into(), u(c.hidden_size)),
        ("llama.block_count".into(), u(c.num_hidden_layers)),
        ("llama.feed_forward_length".into(), u(c.intermediate_size)),
        (
            "llama.attention.head_count".into(),
            u(c.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u(c.num_key_value_heads),
        ),
        ("llama.attention.key_length".into(), u(c.head_dim)),
        ("llama.attention.value_length".into(), u(c.head_dim)),
        ("llama.rope.dimension_count".into(), u(c.head_dim)),
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
        ("llama.vocab_size".into(), u(c.vocab_size)),
    ];
    match &c.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            m.push(("llama.rope.scaling.type".into(), Value::String("linear".into())));
            m.push(("llama.rope.scaling.factor".into(), Value::F32(*factor as f32)));
        }
        other => bail!(
            "--format gguf: {}: rope scaling {other:?} is not written by this export (llama.cpp stores it as a rope_freqs tensor); use --format compressed-tensors or hf",
            s.config_path.display()
        ),
    }
    Ok(m)
}

/// tokenizer.json as llama.cpp's tokenizer metadata: SentencePiece-style BPE (`llama`: "▁"
/// for spaces, byte fallback) with scores = minus the rank of the merge that makes a piece,
/// so that llama.cpp's highest-score-first merging is BPE's lowest-rank-first; or byte-level
/// BPE (`gpt2`) with its merges.
fn tokenizer_metadata(s: &Student) -> Result<Vec<(String, Value)>> {
    let path = s.dir.join("tokenizer.json");
    let at = |f: &str| format!("{}: {f}", path.display());
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let t: Json = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let model = &t["model"];
    if model["type"] != "BPE" {
        bail!(
            "{} = {}: only BPE tokenizers are written to GGUF",
            at("model.type"),
            model["type"]
        );
    }
    let vocab = model["vocab"]
        .as_object()
        .with_context(|| format!("{} is missing", at("model.vocab")))?;
    let n = s.config.vocab_size;
    let mut tokens = vec![None; n];
    for (piece, id) in vocab {
        let id = id
            .as_u64()
            .with_context(|| at("model.vocab: an id is not a number"))? as usize;
        if id >= n {
            bail!(
                "{}: id {id} of {piece:?} is beyond vocab_size {n}",
                at("model.vocab")
            );
        }
        tokens[id] = Some(piece.clone());
    }
    let mut types = vec![NORMAL; n];
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let id = a["id"]
            .as_u64()
            .with_context(|| at("added_tokens: an id is missing"))? as usize;
        let content = a["content"].as_str().unwrap_or_default().to_string();
        if id >= n {
            bail!("{}: id {id} is beyond vocab_size {n}", at("added_tokens"));
        }
        tokens[id] = Some(content);
        types[id] = if a["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
    }
    // Ids the tokenizer never produces still need a row: llama.cpp reads one piece per id.
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            p.unwrap_or_else(|| {
                types[i] = USER_DEFINED;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<(String, String)> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| at(&format!("model.merges: {s:?} is not \"left right\""))),
            Json::Array(p) if p.len() == 2 => Ok((
                p[0].as_str().unwrap_or_default().to_string(),
                p[1].as_str().unwrap_or_default().to_string(),
            )),
            other => bail!("{}: {other} is not a merge", at("model.merges")),
        })
        .collect::<Result<_>>()?;
    let unk = model["unk_token"]
        .as_str()
        .and_then(|u| tokens.iter().position(|t| t == u));
    let byte_level = json_contains(&t["pre_tokenizer"], "ByteLevel")
        || json_contains(&t["decoder"], "ByteLevel");
    let spm = model["byte_fallback"] == true
        || json_contains(&t["normalizer"], "\u{2581}")
        || json_contains(&t["pre_tokenizer"], "Metaspace");
    let mut m: Vec<(String, Value)> = Vec::new();
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    if spm && !byte_level {
        let mut scores = vec![0f32; n];
        for (rank, (a, b)) in merges.iter().enumerate() {
            if let Some(id) = vocab.get(&format!("{a}{b}")).and_then(|v| v.as_u64()) {
                let id = id as usize;
                if scores[id] == 0.0 {
                    scores[id] = -(rank as f32) - 1.0;
                }
            }
        }
        for (i, tok) in tokens.iter().enumerate() {
            if tok.len() == 6 && tok.starts_with("<0x") && tok.ends_with('>') {
                types[i] = BYTE;
            }
        }
        if let Some(u) = unk {
            types[u] = UNKNOWN;
        }
        m.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        m.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
        m.push(("tokenizer.ggml.tokens".into(), strings(&tokens)));
        m.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ));
    } else if byte_level && !spm {
        let pre = gpt2_pre(&t["pre_tokenizer"]).with_context(|| {
            format!(
                "{}: this byte-level pre-tokenizer is not one llama.cpp knows by name (gpt2, llama-bpe); the GGUF export cannot say how to split text",
                at("pre_tokenizer")
            )
        })?;
        m.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        m.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        m.push(("tokenizer.ggml.tokens".into(), strings(&tokens)));
        let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        m.push(("tokenizer.ggml.merges".into(), strings(&merges)));
    } else {
        bail!(
            "{}: neither a SentencePiece-style BPE (byte fallback, \"\u{2581}\" spaces) nor a byte-level BPE; the GGUF export writes only those",
            path.display()
        );
    }
    m.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    let c = &s.config;
    if let Some(b) = c.bos_token_id {
        m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = c.eos_token_ids.first() {
        m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(*e)));
    }
    if let Some(u) = unk {
        m.push((
            "tokenizer.ggml.unknown_token_id".into(),
            Value::U32(u as u32),
        ));
    }
    // Our evaluation and generation start every text with BOS when the model has one.
    m.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(c.bos_token_id.is_some()),
    ));
    m.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    Ok(m)
}

fn json_contains(v: &Json, needle: &str) -> bool {
    match v {
        Json::String(s) => s.contains(needle),
        Json::Array(a) => a.iter().any(|x| json_contains(x, needle)),
        Json::Object(o) => o.values().any(|x| json_contains(x, needle)),
        _ => false,
    }
}

/// llama.cpp's name of a byte-level pre-tokenizer: GPT-2's own (ByteLevel with its regex and
/// nothing else) or Llama 3's split pattern.
fn gpt2_pre(p: &Json) -> Option<&'static str> {
    const LLAMA3: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    if p["type"] == "ByteLevel" && p["use_regex"] != false {
        return Some("gpt2");
    }
    if p["type"] == "Sequence" {
        let steps = p["pretokenizers"].as_array()?;
        if steps.len() == 2
            && steps[0]["type"] == "Split"
            && steps[0]["pattern"]["Regex"] == LLAMA3
            && steps[1]["type"] == "ByteLevel"
            && steps[1]["use_regex"] == false
        {
            return Some("llama-bpe");
        }
    }
    None
}

fn block_dtype(t: BlockType) -> GgmlDType {
    match t {
        BlockType::Q4_0 => GgmlDType::Q4_0,
        BlockType::Q8_0 => GgmlDType::Q8_0,
        BlockType::Q3K => GgmlDType::Q3K,
        BlockType::Q2K => GgmlDType::Q2K,
    }
}

/// llama.cpp's `general.file_type` for a model whose projections are of type `t`.
fn file_type(t: Option<BlockType>) -> u32 {
    match t {
        None => 0,
        Some(BlockType::Q4_0) => 2,
        Some(BlockType::Q8_0) => 7,
        Some(BlockType::Q2K) => 10,
        Some(BlockType::Q3K) => 11,
    }
}

/// Writes `s` as GGUF bytes; `written` records every projection's stored values.
pub fn write(s: &Student, written: &mut Written) -> Result<Vec<u8>> {
    let bits = s.require_grid("gguf")?;
    let btype = BlockType::for_bits(bits).with_context(|| {
        format!(
            "--format gguf: {}: w_bits = {bits} has no llama.cpp block type (Q2_K, Q3_K, Q4_0 and Q8_0 hold 2, 3, 4 and 8 bits)",
            s.quant_path.display()
        )
    })?;
    let mut meta = arch_metadata(s)?;
    meta.extend(tokenizer_metadata(s)?);
    meta.push((
        "general.file_type".into(),
        Value::U32(file_type(Some(btype))),
    ));

    let c = &s.config;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, shape, values) in &s.tensors {
        let gname = gguf_name(name).with_context(|| {
            format!(
                "--format gguf: {}: tensor {name} has no llama.cpp name",
                s.weights_path.display()
            )
        })?;
        if name == "lm_head.weight" && c.tie_word_embeddings {
            continue;
        }
        let order = if name.ends_with("self_attn.q_proj.weight") {
            Some(qk_order(shape[0], c.num_attention_heads))
        } else if name.ends_with("self_attn.k_proj.weight") {
            Some(qk_order(shape[0], c.num_key_value_heads))
        } else {
            None
        };
        let q = match s.grids.get(name) {
            Some(g) => {
                let g: GridWeight = match &order {
                    Some(o) => g.permute_rows(o),
                    None => g.clone(),
                };
                if !g.cols.is_multiple_of(btype.block()) {
                    // The rows do not tile into blocks: floats holding exactly the grid.
                    let v = g.values();
                    written.float(
                        name,
                        AsFloat {
                            reason: btype.tiling_problem(g.cols).unwrap_or_default(),
                            dtype: "F32".into(),
                        },
                        &v,
                        order.as_deref(),
                        g.cols,
                    );
                    f32_tensor(&v, shape)?
                } else {
                    btype.check_grid(&g).map_err(|e| {
                        anyhow::anyhow!(
                            "--format gguf cannot hold the grid of {name} as {}: {e} (student.w_group = {}); use --format compressed-tensors or packed",
                            btype.name(),
                            if g.group == g.cols { "none".to_string() } else { g.group.to_string() }
                        )
                    })?;
                    let bytes = ggml::encode(&g, btype).map_err(anyhow::Error::msg)?;
                    let back =
                        ggml::decode(&bytes, btype, g.rows * g.cols).map_err(anyhow::Error::msg)?;
                    written.grid(
                        name,
                        btype.name(),
                        &back,
                        order.as_deref(),
                        g.cols,
                        bytes.len(),
                    );
                    qtensor_from_ggml(block_dtype(btype), &bytes, shape.clone(), &Device::Cpu)?
                }
            }
            None => {
                let v = match &order {
                    Some(o) => permute_values(values, shape[1], o),
                    None => values.clone(),
                };
                f32_tensor(&v, shape)?
            }
        };
        tensors.push((gname, q));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut cur = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut cur, &meta_refs, &tensor_refs)?;
    let mut bytes = cur.into_inner();
    // Version 3 adds big-endian files only; a little-endian v2 file is a v3 file.
    bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
    Ok(bytes)
}

fn f32_tensor(v: &[f32], shape: &[usize]) -> Result<QTensor> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(qtensor_from_ggml(
        GgmlDType::F32,
        &bytes,
        shape.to_vec(),
        &Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qk_order_interleaves_the_halves_of_each_head() {
        assert_eq!(qk_order(8, 2), vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.3.mlp.down_proj.weight").as_deref(),
            Some("blk.3.ffn_down.weight")
        );
        assert_eq!(gguf_name("model.layers.0.self_attn.rotary.inv_freq"), None);
    }
}
