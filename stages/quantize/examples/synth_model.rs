//! A random-weight Llama folder of a chosen size, for measuring the quantize stage's speed
//! and memory on something larger than the test models (about 1.1 GB with the defaults).
//!
//! cargo run --example synth_model -p quantize -- OUT [hidden] [intermediate] [layers] [vocab]

use quant::safetensors_file::Dtype;
use quantize::writer::{OutTensor, StreamingWriter};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(
        args.first()
            .expect("usage: synth_model OUT [h] [i] [layers] [vocab]"),
    );
    let num = |i: usize, d: usize| args.get(i).map(|s| s.parse().unwrap()).unwrap_or(d);
    let (h, inter, layers, vocab) = (num(1, 2048), num(2, 5632), num(3, 3), num(4, 32000));
    let heads = h / 128;
    std::fs::create_dir_all(&out)?;
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![vocab, h])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("self_attn.q_proj", vec![h, h]),
            ("self_attn.k_proj", vec![h, h]),
            ("self_attn.v_proj", vec![h, h]),
            ("self_attn.o_proj", vec![h, h]),
            ("mlp.gate_proj", vec![inter, h]),
            ("mlp.up_proj", vec![inter, h]),
            ("mlp.down_proj", vec![h, inter]),
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
        ] {
            shapes.push((format!("{p}.{n}.weight"), s));
        }
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    shapes.push(("lm_head.weight".into(), vec![vocab, h]));
    let planned = shapes
        .iter()
        .map(|(n, s)| OutTensor::new(n, Dtype::F32, s.clone()))
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut w = StreamingWriter::create(&out.join("model.safetensors"), planned, vec![], meta)?;
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let norm = shape.len() == 1;
        let mut bytes = vec![0u8; n * 4];
        bytes
            .par_chunks_mut(4 << 16)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut s = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (c as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
                for v in chunk.chunks_exact_mut(4) {
                    // Sum of four uniforms: close enough to normal, std 0.02.
                    let mut acc = 0f32;
                    for _ in 0..4 {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    }
                    let x = if norm { 1.0 } else { acc * 0.0346 };
                    v.copy_from_slice(&x.to_le_bytes());
                }
            });
        w.write(name, &bytes)?;
    }
    let size = w.finish()?;
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": 128,
        "vocab_size": vocab, "max_position_embeddings": 2048, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
    });
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    println!("{}: {size} bytes", out.display());
    Ok(())
}
