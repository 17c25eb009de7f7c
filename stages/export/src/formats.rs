//! The folder formats: compressed-tensors (`pack-quantized`), our `packed` layout, and a
//! plain Hugging Face folder. Each returns the files of a model folder.

use crate::student::Student;
use crate::{AsFloat, Written};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Files copied from the student folder beside the weights (the tokenizer and configs).
const COPIED: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
];

fn copied_files(s: &Student) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for f in COPIED {
        let p = s.dir.join(f);
        if p.is_file() {
            out.push((
                f.to_string(),
                std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?,
            ));
        }
    }
    Ok(out)
}

fn config_json(s: &Student) -> Result<Value> {
    let text = std::fs::read_to_string(&s.config_path)
        .with_context(|| format!("cannot read {}", s.config_path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", s.config_path.display()))
}

/// One safetensors tensor: dtype, shape, little-endian bytes.
type Entry = (safetensors::Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn safetensors_bytes(
    tensors: &BTreeMap<String, Entry>,
    meta: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b)?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(safetensors::tensor::serialize(views, meta)?)
}

/// The model's dtype as config.json names it (the dtype compressed-tensors' scales are in).
fn model_dtype(cfg: &Value) -> &str {
    cfg.get("torch_dtype")
        .or_else(|| cfg.get("dtype"))
        .and_then(|v| v.as_str())
        .unwrap_or("float32")
}

/// compressed-tensors `pack-quantized`: int32 words, `weight_scale` in the model's dtype,
/// `weight_shape`; the quantization_config declares the student's weight scheme and, when it
/// quantizes activations, 8-bit (or a_bits) dynamic per-token input activations.
pub fn compressed_tensors(s: &Student, written: &mut Written) -> Result<Vec<(String, Vec<u8>)>> {
    let bits = s.require_grid("compressed-tensors")?;
    let mut cfg = config_json(s)?;
    let dtype = model_dtype(&cfg).to_string();
    let (scale_dt, round): (safetensors::Dtype, fn(f32) -> Vec<u8>) = match dtype.as_str() {
        "float32" => (safetensors::Dtype::F32, |x| x.to_le_bytes().to_vec()),
        "float16" => (safetensors::Dtype::F16, |x| {
            half::f16::from_f32(x).to_le_bytes().to_vec()
        }),
        "bfloat16" => (safetensors::Dtype::BF16, |x| {
            half::bf16::from_f32(x).to_le_bytes().to_vec()
        }),
        other => bail!(
            "{}: torch_dtype = {other:?}: expected float32, float16 or bfloat16",
            s.config_path.display()
        ),
    };
    let mut tensors: BTreeMap<String, Entry> = BTreeMap::new();
    let mut group = None;
    for (name, shape, values) in &s.tensors {
        if name == "lm_head.weight" && s.config.tie_word_embeddings {
            continue;
        }
        let Some(g) = s.grids.get(name) else {
            tensors.insert(
                name.clone(),
                (safetensors::Dtype::F32, shape.clone(), f32_bytes(values)),
            );
            continue;
        };
        if g.cols % g.group != 0 {
            bail!(
                "--format compressed-tensors cannot hold the grid of {name}: student.w_group = {} does not divide its {} inputs (compressed-tensors groups tile the row)",
                g.group,
                g.cols
            );
        }
        group = Some(g.group);
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let words = quant::compressed::pack_int32(&g.codes, g.rows, g.cols, bits);
        let scales_bytes: Vec<u8> = g.scales.iter().flat_map(|x| round(*x)).collect();
        let stored_scales: Vec<f32> = match scale_dt {
            safetensors::Dtype::F16 => scales_bytes
                .chunks(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => scales_bytes
                .chunks(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => g.scales.clone(),
        };
        let back = quant::GridWeight {
            scales: stored_scales,
            ..g.clone()
        }
        .values();
        let bytes = words.len() * 4 + scales_bytes.len();
        written.grid(name, &format!("int{bits}"), &back, None, g.cols, bytes);
        tensors.insert(
            format!("{module}.weight_packed"),
            (
                safetensors::Dtype::I32,
                vec![g.rows, (g.cols * bits as usize).div_ceil(32)],
                words.iter().flat_map(|w| w.to_le_bytes()).collect(),
            ),
        );
        tensors.insert(
            format!("{module}.weight_scale"),
            (scale_dt, vec![g.rows, g.groups_per_row()], scales_bytes),
        );
        tensors.insert(
            format!("{module}.weight_shape"),
            (
                safetensors::Dtype::I64,
                vec![2],
                [g.rows as i64, g.cols as i64]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        );
    }
    let per_channel = s.grids.values().all(|g| g.group == g.cols);
    let weights = json!({
        "num_bits": bits,
        "type": "int",
        "symmetric": true,
        "strategy": if per_channel { "channel" } else { "group" },
        "group_size": if per_channel { Value::Null } else { json!(group) },
        "dynamic": false,
        "actorder": null,
        "observer": "minmax",
        "observer_kwargs": {},
    });
    let inputs = match s.quant.a_bits {
        Some(a) => json!({
            "num_bits": a,
            "type": "int",
            "symmetric": true,
            "strategy": "token",
            "dynamic": true,
            "observer": null,
            "observer_kwargs": {},
        }),
        None => Value::Null,
    };
    let targets: Vec<&str> = vec!["Linear"];
    cfg["quantization_config"] = json!({
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": targets,
            "weights": weights,
            "input_activations": inputs,
            "output_activations": null,
            "format": "pack-quantized",
        }},
        "ignore": ["lm_head"],
        "kv_cache_scheme": null,
    });
    if s.quant.kv_bits.is_some() {
        written.note(
            "the student's K/V cache quantizer (per token, integer) has no compressed-tensors scheme (its kv_cache_scheme is per-tensor and static); the export leaves the cache unquantized",
        );
    }
    if !per_channel && group.is_none() {
        bail!("the student has no quantized projection");
    }
    let mut files = vec![
        ("config.json".to_string(), serde_json::to_vec_pretty(&cfg)?),
        (
            "model.safetensors".to_string(),
            safetensors_bytes(
                &tensors,
                Some(std::collections::HashMap::from([(
                    "format".to_string(),
                    "pt".to_string(),
                )])),
            )?,
        ),
    ];
    files.extend(copied_files(s)?);
    Ok(files)
}

/// Our packed layout (`quant::packed`): codes packed at their width, f32 scales; the
/// activation and K/V quantizers stay in `quantization.json` (weights none: they are on
/// their grid already) for whoever runs it.
pub fn packed(s: &Student, written: &mut Written) -> Result<Vec<(String, Vec<u8>)>> {
    s.require_grid("packed")?;
    let mut floats = Vec::new();
    let mut grids = Vec::new();
    for (name, shape, values) in &s.tensors {
        if name == "lm_head.weight" && s.config.tie_word_embeddings {
            continue;
        }
        match s.grids.get(name) {
            Some(g) => {
                // Stored bytes: the codes at their width, and f32 scales.
                let (q, sc) = (
                    (g.codes.len() * g.bits as usize).div_ceil(8),
                    g.scales.len(),
                );
                written.grid(
                    name,
                    &format!("int{}", g.bits),
                    &g.values(),
                    None,
                    g.cols,
                    q + 4 * sc,
                );
                grids.push((name.as_str(), g));
            }
            None => floats.push((name.clone(), shape.clone(), values.clone())),
        }
    }
    let (weights, header) = quant::packed::write_bytes(&floats, &grids)?;
    let runtime = model::QuantConfig {
        w_bits: None,
        w_group: None,
        ..s.quant.clone()
    };
    let mut files = vec![
        (
            "config.json".to_string(),
            serde_json::to_vec_pretty(&config_json(s)?)?,
        ),
        ("model.safetensors".to_string(), weights),
        (quant::packed::HEADER_FILE.to_string(), header),
        (
            "quantization.json".to_string(),
            serde_json::to_vec_pretty(&runtime)?,
        ),
    ];
    files.extend(copied_files(s)?);
    Ok(files)
}

/// A plain Hugging Face folder in `dtype`: a quantized student's projections as their grid
/// values (so the floats are the student's weights), everything else as trained.
pub fn hf(s: &Student, dtype: &str, written: &mut Written) -> Result<Vec<(String, Vec<u8>)>> {
    type Conv = fn(f32) -> (Vec<u8>, f32);
    let (dt, conv, torch): (safetensors::Dtype, Conv, &str) = match dtype {
        "f32" => (
            safetensors::Dtype::F32,
            |x| (x.to_le_bytes().to_vec(), x),
            "float32",
        ),
        "f16" => (
            safetensors::Dtype::F16,
            |x| {
                let h = half::f16::from_f32(x);
                (h.to_le_bytes().to_vec(), h.to_f32())
            },
            "float16",
        ),
        "bf16" => (
            safetensors::Dtype::BF16,
            |x| {
                let h = half::bf16::from_f32(x);
                (h.to_le_bytes().to_vec(), h.to_f32())
            },
            "bfloat16",
        ),
        other => bail!("--dtype {other:?}: allowed values are f32, f16, bf16"),
    };
    let mut tensors: BTreeMap<String, Entry> = BTreeMap::new();
    for (name, shape, values) in &s.tensors {
        let trained = s.trained(name).unwrap_or_else(|| values.clone());
        let mut bytes = Vec::with_capacity(trained.len() * 4);
        let mut back = Vec::with_capacity(trained.len());
        for x in &trained {
            let (b, y) = conv(*x);
            bytes.extend(b);
            back.push(y);
        }
        if s.grids.contains_key(name) {
            written.float(
                name,
                AsFloat {
                    reason: "the hf format stores floats".into(),
                    dtype: torch.into(),
                },
                &back,
                None,
                shape[1],
            );
        }
        tensors.insert(name.clone(), (dt, shape.clone(), bytes));
    }
    let mut cfg = config_json(s)?;
    cfg["torch_dtype"] = json!(torch);
    let mut files = vec![
        ("config.json".to_string(), serde_json::to_vec_pretty(&cfg)?),
        (
            "model.safetensors".to_string(),
            safetensors_bytes(
                &tensors,
                Some(std::collections::HashMap::from([(
                    "format".to_string(),
                    "pt".to_string(),
                )])),
            )?,
        ),
    ];
    files.extend(copied_files(s)?);
    Ok(files)
}
