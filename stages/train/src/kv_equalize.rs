//! K/V equalization of the student's initial weights, before QAT.
//!
//! The K and V caches are quantized per token, with one scale for all of a token's channels,
//! so a few channels of large magnitude set the scale and the rest lose most of their 4 bits.
//! Two rescalings leave the teacher's function unchanged and even the channels out:
//! - K: channels c and c + head_dim/2 of a KV head are one RoPE pair; scaling both K rows of the
//!   pair by s and the matching Q rows of every query head of the group by 1/s leaves every
//!   q·k unchanged (RoPE rotates within the pair, so it commutes with the common scale).
//! - V: scaling V channel c by s and the `o_proj` input columns that read it (one per query
//!   head of the group) by 1/s leaves the attention output unchanged.
//!
//! Each pair or channel gets s = (target / m)^alpha, with m its largest magnitude on a few
//! corpus batches and target the geometric mean of m over the layer. Weights stay per-output-
//! channel quantized, which is blind to row scales; `o_proj` columns are not, which is why the
//! strength alpha is a setting.

use anyhow::Result;
use candle_core::{Tensor, D};
use model::{Llama, LlamaConfig};
use std::collections::HashMap;

/// Largest |K| (after RoPE) and |V| per layer, per KV channel (n_kv * head_dim).
pub struct KvRanges {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

/// Runs the (unquantized) teacher over `batches` and records the K/V channel ranges.
pub fn measure(teacher: &Llama, batches: &[Tensor]) -> Result<KvRanges> {
    let layers = teacher.cfg.num_hidden_layers;
    let kv = teacher.cfg.kv_dim();
    let mut r = KvRanges {
        k: vec![vec![0f32; kv]; layers],
        v: vec![vec![0f32; kv]; layers],
    };
    for ids in batches {
        teacher.forward_probed(ids, &mut |l, k, v| {
            // [b, n_kv, t, hd] -> max over b and t -> [n_kv * hd]
            let range = |x: &Tensor| -> candle_core::Result<Vec<f32>> {
                x.abs()?
                    .to_dtype(candle_core::DType::F32)?
                    .max(0)?
                    .max(D::Minus2)?
                    .flatten_all()?
                    .to_vec1::<f32>()
            };
            for (acc, m) in [(&mut r.k[l], range(k)?), (&mut r.v[l], range(v)?)] {
                for (a, b) in acc.iter_mut().zip(m) {
                    *a = a.max(b);
                }
            }
            Ok(())
        })?;
    }
    Ok(r)
}

/// s = (target / m)^alpha with target the geometric mean of `m`; channels that never moved
/// (m = 0) keep scale 1. Scales are kept within [1/64, 64].
fn scales(m: &[f32], alpha: f64) -> Vec<f64> {
    let live: Vec<f64> = m.iter().filter(|&&x| x > 0.0).map(|&x| x as f64).collect();
    if live.is_empty() {
        return vec![1.0; m.len()];
    }
    let target = (live.iter().map(|x| x.ln()).sum::<f64>() / live.len() as f64).exp();
    m.iter()
        .map(|&x| {
            if x > 0.0 {
                (target / x as f64).powf(alpha).clamp(1.0 / 64.0, 64.0)
            } else {
                1.0
            }
        })
        .collect()
}

/// Multiplies rows (dim 0) or columns (dim 1) of `name` (and rows of its bias) by `s`.
fn scale(t: &mut HashMap<String, Tensor>, name: &str, s: &[f64], columns: bool) -> Result<()> {
    let s32: Vec<f32> = s.iter().map(|&x| x as f32).collect();
    for key in [format!("{name}.weight"), format!("{name}.bias")] {
        let Some(w) = t.get(&key) else { continue };
        let dev = w.device();
        let v = if columns {
            if key.ends_with("bias") {
                continue;
            }
            Tensor::from_vec(s32.clone(), (1, s.len()), dev)?
        } else if w.rank() == 1 {
            Tensor::from_vec(s32.clone(), s.len(), dev)?
        } else {
            Tensor::from_vec(s32.clone(), (s.len(), 1), dev)?
        };
        let scaled = w.broadcast_mul(&v.to_dtype(w.dtype())?)?;
        t.insert(key, scaled);
    }
    Ok(())
}

/// Rescales the attention weights in `t` (Hugging Face names) by strength `alpha`.
pub fn apply(
    t: &mut HashMap<String, Tensor>,
    cfg: &LlamaConfig,
    r: &KvRanges,
    alpha: f64,
) -> Result<()> {
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    if cfg.qk_norm {
        // Rescaled K channels would be undone by the per-head norm after k_proj.
        anyhow::bail!(
            "train.kv_equalize: not supported for models with q/k norms ({:?}); set kv_equalize = 0",
            cfg.architecture
        );
    }
    let (rep, half) = (nh / nkv, hd / 2);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}.self_attn");
        // K: one scale per RoPE pair, from the pair's larger range.
        let pair_max: Vec<f32> = (0..nkv * half)
            .map(|i| {
                let (g, c) = (i / half, i % half);
                r.k[l][g * hd + c].max(r.k[l][g * hd + c + half])
            })
            .collect();
        let ps = scales(&pair_max, alpha);
        let k_rows: Vec<f64> = (0..nkv * hd)
            .map(|j| ps[(j / hd) * half + (j % hd) % half])
            .collect();
        let q_rows: Vec<f64> = (0..nh * hd)
            .map(|j| 1.0 / k_rows[(j / hd / rep) * hd + j % hd])
            .collect();
        scale(t, &format!("{p}.k_proj"), &k_rows, false)?;
        scale(t, &format!("{p}.q_proj"), &q_rows, false)?;
        // V: one scale per channel; o_proj reads channel c of group g in every query head of g.
        let vs = scales(&r.v[l], alpha);
        let o_cols: Vec<f64> = (0..nh * hd)
            .map(|j| 1.0 / vs[(j / hd / rep) * hd + j % hd])
            .collect();
        scale(t, &format!("{p}.v_proj"), &vs, false)?;
        scale(t, &format!("{p}.o_proj"), &o_cols, true)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use model::QuantConfig;

    fn tiny(t: HashMap<String, Tensor>, cfg: &LlamaConfig, q: QuantConfig) -> Llama {
        Llama::from_tensors(cfg.clone(), q, t, "test", &Device::Cpu).unwrap()
    }

    /// Equalized weights compute the same function, with flatter K/V channel ranges. (That KV4
    /// then costs less is a measurement on real models, not a property of every model: see
    /// pipelines/llmqat.toml.)
    #[test]
    fn equalization_preserves_the_function_and_flattens_ranges() {
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 64, "max_position_embeddings": 64, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2
        });
        let cfg = LlamaConfig::from_json(&v, std::path::Path::new("test")).unwrap();
        let dev = Device::Cpu;
        // Deterministic weights (candle's randn is unseeded): a multiplicative hash per element.
        let mut t: HashMap<String, Tensor> = model::llama::expected_tensors(&cfg)
            .into_iter()
            .enumerate()
            .map(|(k, (n, s))| {
                let len: usize = s.iter().product();
                let vals: Vec<f32> = (0..len)
                    .map(|i| {
                        if n.ends_with("norm.weight") {
                            return 1.0;
                        }
                        let h = (i as u32 ^ ((k as u32) << 20)).wrapping_mul(2654435761);
                        (h >> 8) as f32 / 16777216.0 - 0.5
                    })
                    .collect();
                (n, Tensor::from_vec(vals, s, &dev).unwrap())
            })
            .collect();
        // Outlier K and V channels, as trained models have.
        for l in 0..2 {
            for proj in ["k_proj", "v_proj"] {
                let name = format!("model.layers.{l}.self_attn.{proj}.weight");
                let mut rows = vec![1f32; cfg.kv_dim()];
                rows[3] = 12.0;
                rows[cfg.head_dim + 5] = 8.0;
                let s = Tensor::from_vec(rows, (cfg.kv_dim(), 1), &dev).unwrap();
                let w = t[&name].broadcast_mul(&s).unwrap();
                t.insert(name, w);
            }
        }
        let ids = Tensor::from_vec(
            (0..64u32).map(|i| (i * 7 + 3) % 64).collect(),
            (2, 32),
            &dev,
        )
        .unwrap();
        let before = tiny(t.clone(), &cfg, QuantConfig::none());
        let ranges = measure(&before, std::slice::from_ref(&ids)).unwrap();
        let mut eq = t.clone();
        apply(&mut eq, &cfg, &ranges, 1.0).unwrap();
        let after = tiny(eq.clone(), &cfg, QuantConfig::none());
        let (a, b) = (before.forward(&ids).unwrap(), after.forward(&ids).unwrap());
        let d = model::max_abs_diff(&a, &b).unwrap();
        assert!(d < 1e-4, "logits moved by {d}");
        // The ranges after equalization are flat (within the clamp) where they were not.
        let flat = measure(&after, std::slice::from_ref(&ids)).unwrap();
        let spread = |v: &[f32]| {
            v.iter().cloned().fold(0f32, f32::max) / v.iter().cloned().fold(f32::MAX, f32::min)
        };
        assert!(spread(&flat.v[0]) < spread(&ranges.v[0]) / 4.0);
    }

    #[test]
    fn scales_pull_ranges_to_their_geometric_mean() {
        let s = scales(&[1.0, 4.0, 0.0], 1.0);
        assert!((s[0] - 2.0).abs() < 1e-12 && (s[1] - 0.5).abs() < 1e-12 && s[2] == 1.0);
        let h = scales(&[1.0, 4.0], 0.5);
        assert!((h[0] - 2f64.sqrt()).abs() < 1e-12);
    }
}
