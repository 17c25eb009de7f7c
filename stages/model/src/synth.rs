//! Random-weight Llama folders of real model shapes (`pipeline synth-model`), for measuring
//! speed and memory at sizes our shared models do not reach. The weights are N(0, 0.02) (norms
//! 1), stored in bf16; the tokenizer is a plain word-level one over the shape's vocabulary.

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::json;
use std::path::Path;

/// A named architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthShape {
    /// TinyLlama 1.1B: hidden 2048, 22 layers, 32 heads, 4 KV heads, FFN 5632, vocab 32000.
    TinyLlama1_1b,
    /// Llama 2 7B's width with only 2 layers: hidden 4096, 32 heads, FFN 11008, vocab 32000.
    Llama7b2Layers,
    /// Llama 2 7B: 32 layers.
    Llama7b,
    /// A small model with llama.cpp-friendly sizes: hidden 256, 2 layers, 4 heads of 64
    /// (a quantized llama.cpp K/V cache needs head_dim a multiple of 32), 2 KV heads, FFN 768
    /// (rows of 256 and 768 tile into Q3_K / Q2_K super-blocks), vocab 2048.
    TinyHd64,
    /// SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads of 64, 3 KV heads, FFN 1536,
    /// vocab 49152, tied embeddings.
    Smollm135m,
}

pub const SHAPE_NAMES: &[&str] = &[
    "tinyllama-1.1b",
    "llama-7b-2layers",
    "llama-7b",
    "tiny-hd64",
    "smollm-135m",
];

impl std::str::FromStr for SynthShape {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tinyllama-1.1b" => Ok(SynthShape::TinyLlama1_1b),
            "llama-7b-2layers" => Ok(SynthShape::Llama7b2Layers),
            "llama-7b" => Ok(SynthShape::Llama7b),
            "tiny-hd64" => Ok(SynthShape::TinyHd64),
            "smollm-135m" => Ok(SynthShape::Smollm135m),
            o => bail!(
                "--shape {o:?}: allowed values are {}",
                SHAPE_NAMES.join(", ")
            ),
        }
    }
}

impl SynthShape {
    /// The shape's `config.json`.
    pub fn config_json(&self) -> serde_json::Value {
        // (hidden, layers, heads, kv heads, ffn, vocab, context)
        let (h, l, nh, nkv, ffn, vocab, ctx) = match self {
            SynthShape::TinyLlama1_1b => (2048, 22, 32, 4, 5632, 32000, 2048),
            SynthShape::Llama7b2Layers => (4096, 2, 32, 32, 11008, 32000, 4096),
            SynthShape::Llama7b => (4096, 32, 32, 32, 11008, 32000, 4096),
            SynthShape::TinyHd64 => (256, 2, 4, 2, 768, 2048, 512),
            SynthShape::Smollm135m => (576, 30, 9, 3, 1536, 49152, 2048),
        };
        let tied = *self == SynthShape::Smollm135m;
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": h,
            "intermediate_size": ffn,
            "num_hidden_layers": l,
            "num_attention_heads": nh,
            "num_key_value_heads": nkv,
            "vocab_size": vocab,
            "max_position_embeddings": ctx,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "attention_bias": false,
            "tie_word_embeddings": tied,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16"
        })
    }
}

/// splitmix64: a fast, seedable generator; each tensor chunk gets its own stream.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// f32 -> bf16 bits, rounding to nearest even (no NaNs occur here).
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `n` values of N(0, std) as little-endian bf16 bytes (Box-Muller), in parallel chunks.
fn normal_bf16(n: usize, std: f32, seed: u64) -> Vec<u8> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0u8; 2 * n];
    out.par_chunks_mut(2 * CHUNK)
        .enumerate()
        .for_each(|(c, bytes)| {
            let mut s = seed ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            for pair in bytes.chunks_mut(4) {
                let u1 = ((splitmix(&mut s) >> 40) as f32 + 1.0) / (1u64 << 24) as f32;
                let u2 = (splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32;
                let r = (-2.0 * u1.ln()).sqrt() * std;
                let t = std::f32::consts::TAU * u2;
                let v = [r * t.cos(), r * t.sin()];
                for (k, b) in pair.chunks_mut(2).enumerate() {
                    b.copy_from_slice(&bf16_bits(v[k]).to_le_bytes());
                }
            }
        });
    out
}

/// A word-level tokenizer.json over `vocab` ids: `<unk>`, `<s>`, `</s>`, then `w3`, `w4`, ...
fn tokenizer_json(vocab: usize) -> serde_json::Value {
    let specials = ["<unk>", "<s>", "</s>"];
    let mut map = serde_json::Map::new();
    for id in 0..vocab {
        let word = specials
            .get(id)
            .map_or_else(|| format!("w{id}"), |s| s.to_string());
        map.insert(word, json!(id));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(id, s)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": map, "unk_token": "<unk>"}
    })
}

/// The vocabulary size of a tokenizer.json (largest id + 1, added tokens included).
fn tokenizer_vocab(path: &Path) -> Result<usize> {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let ids = v["model"]["vocab"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values().filter_map(|x| x.as_u64()))
        .chain(
            v["added_tokens"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["id"].as_u64()),
        );
    ids.max()
        .map(|m| m as usize + 1)
        .with_context(|| format!("{}: model.vocab is missing or empty", path.display()))
}

/// Writes `config.json`, `model.safetensors` (bf16) and `tokenizer.json` of `shape` to `out`.
/// With `tokenizer` (a model folder), its tokenizer files are copied and the vocabulary is
/// theirs (so that text, GGUF tokenizers and evaluations work as on a real model).
pub fn write_synthetic_model(
    shape: SynthShape,
    out: &Path,
    seed: u64,
    tokenizer: Option<&Path>,
) -> Result<()> {
    let mut cfg_json = shape.config_json();
    if let Some(t) = tokenizer {
        cfg_json["vocab_size"] = json!(tokenizer_vocab(&t.join("tokenizer.json"))?);
        if let Ok(text) = std::fs::read_to_string(t.join("config.json")) {
            let src: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", t.join("config.json").display()))?;
            for k in ["bos_token_id", "eos_token_id"] {
                cfg_json[k] = src[k].clone();
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cfg_path = out.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg_json)?)
        .with_context(|| format!("writing {}", cfg_path.display()))?;
    let cfg = crate::LlamaConfig::load(&cfg_path)?;
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = crate::llama::expected_tensors(&cfg)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let bytes = if name.ends_with("norm.weight") {
                bf16_bits(1.0).to_le_bytes().repeat(n)
            } else {
                normal_bf16(n, 0.02, seed.wrapping_add(i as u64) << 20)
            };
            (name, shape, bytes)
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(n, shape, bytes)| {
            let v = safetensors::tensor::TensorView::new(
                safetensors::Dtype::BF16,
                shape.clone(),
                bytes,
            )
            .map_err(|e| anyhow::anyhow!("tensor {n}: {e}"))?;
            Ok((n.as_str(), v))
        })
        .collect::<Result<Vec<_>>>()?;
    let st = out.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &st)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", st.display()))?;
    let tok = out.join("tokenizer.json");
    match tokenizer {
        Some(t) => {
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ] {
                if t.join(f).is_file() {
                    std::fs::copy(t.join(f), out.join(f))
                        .with_context(|| format!("copying {}", t.join(f).display()))?;
                }
            }
        }
        None => std::fs::write(&tok, serde_json::to_vec(&tokenizer_json(cfg.vocab_size))?)
            .with_context(|| format!("writing {}", tok.display()))?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_and_normal_statistics() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(-2.0), 0xc000);
        let bytes = normal_bf16(100_000, 0.02, 7);
        let v: Vec<f32> = bytes
            .chunks(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 1e-3, "std {}", var.sqrt());
    }

    #[test]
    fn tokenizer_loads_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("synth-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, serde_json::to_vec(&tokenizer_json(100)).unwrap()).unwrap();
        let tok = tokenizers::Tokenizer::from_file(&p).unwrap();
        assert_eq!(tok.get_vocab_size(true), 100);
        let ids = tok.encode("w5 w99 nope", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![5, 99, 0]);
        assert_eq!(tok.decode(&[5, 6], true).unwrap(), "w5 w6");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
