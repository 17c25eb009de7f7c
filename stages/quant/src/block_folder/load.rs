//! Reading a quantized folder back as plain tensors: every quantized weight is dequantized
//! to f32 (code * block scale, the scales double-dequantized exactly as bitsandbytes does),
//! every other tensor is handed back as stored. Both layouts are read: ours (`packed`,
//! described by quantize.json) and bitsandbytes' 4-bit serialization, also when another
//! tool (transformers' `save_pretrained`) wrote it.

use super::bnb::BNB_STATE_SUFFIX;
use super::header::{QuantizeHeader, HEADER_FILE};
use super::settings::Layout;
use crate::blockwise::{dequantize_packed, unpack_bits, BlockScales};
use crate::safetensors_file::{Dtype, SafetensorsFile, TensorEntry};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// One tensor of the loaded model.
pub enum LoadedTensor {
    /// A quantized weight, dequantized.
    F32 {
        name: String,
        shape: Vec<usize>,
        data: Vec<f32>,
    },
    /// A quantized weight kept quantized (`load_blockwise`): value i is
    /// `code[codes[i]] * scales[i / block]`, one code index per value.
    Blockwise {
        name: String,
        shape: Vec<usize>,
        codes: Vec<u8>,
        block: usize,
        code: Vec<f32>,
        scales: Vec<f32>,
    },
    /// A tensor that was stored as is (raw little-endian bytes).
    Raw {
        name: String,
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    },
}

/// Does `dir` hold quantized weights (ours, or a bitsandbytes 4-bit checkpoint)?
pub fn is_quantized_folder(dir: &Path) -> bool {
    if dir.join(HEADER_FILE).exists() {
        return true;
    }
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    let Ok(cfg) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let q = &cfg["quantization_config"];
    q["quant_method"] == "bitsandbytes" && (q["load_in_4bit"] == true || q["_load_in_4bit"] == true)
}

/// Every tensor of the quantized folder `dir` (weights in `files`), quantized ones
/// dequantized to f32.
pub fn load_dequantized(dir: &Path, files: &[PathBuf]) -> Result<Vec<LoadedTensor>> {
    load(dir, files, false)
}

/// Every tensor of the quantized folder `dir`, quantized ones kept as code indices and block
/// scales (a frozen base that stays 4-bit in memory).
pub fn load_blockwise(dir: &Path, files: &[PathBuf]) -> Result<Vec<LoadedTensor>> {
    load(dir, files, true)
}

fn load(dir: &Path, files: &[PathBuf], keep: bool) -> Result<Vec<LoadedTensor>> {
    let header = QuantizeHeader::read(dir)?;
    let layout = header
        .as_ref()
        .map(|h| h.settings.layout)
        .unwrap_or(Layout::Bnb);
    let mut out = Vec::new();
    for f in files {
        let st = SafetensorsFile::open(f)?;
        let mut consumed: HashSet<String> = HashSet::new();
        match layout {
            Layout::Bnb => {
                for t in &st.tensors {
                    if let Some(w) = t.name.strip_suffix(BNB_STATE_SUFFIX) {
                        out.push(load_bnb(&st, w, &mut consumed, keep)?);
                    } else if t.name.contains(".quant_state.bitsandbytes__") {
                        bail!(
                            "{}: tensor {}: only NF4 bitsandbytes checkpoints can be read (not FP4)",
                            f.display(),
                            t.name
                        );
                    }
                }
            }
            Layout::Packed => {
                let h = header.as_ref().expect("packed layout comes from a header");
                let fname = f.file_name().map(|n| n.to_string_lossy().into_owned());
                for (name, info) in &h.weights {
                    if Some(&info.file) != fname.as_ref() {
                        continue;
                    }
                    out.push(load_packed(&st, h, name, &info.shape, &mut consumed, keep)?);
                }
            }
        }
        for t in &st.tensors {
            if !consumed.contains(&t.name) {
                out.push(LoadedTensor::Raw {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    bytes: st.bytes(t).to_vec(),
                });
            }
        }
    }
    Ok(out)
}

fn take<'a>(
    st: &'a SafetensorsFile,
    name: &str,
    dtype: Option<Dtype>,
    consumed: &mut HashSet<String>,
) -> Result<&'a TensorEntry> {
    let t = st
        .get(name)
        .with_context(|| format!("{}: missing tensor {name}", st.path.display()))?;
    if let Some(d) = dtype {
        if t.dtype != d {
            bail!(
                "{}: tensor {name} has dtype {}, expected {}",
                st.path.display(),
                t.dtype.name(),
                d.name()
            );
        }
    }
    consumed.insert(name.to_string());
    Ok(t)
}

fn f32s(st: &SafetensorsFile, t: &TensorEntry) -> Result<Vec<f32>> {
    Ok(st.f32_values(t)?.into_owned())
}

/// The block scales: f32 absmax, or 8-bit codes with their nested absmax and offset.
fn scales(
    st: &SafetensorsFile,
    w: &str,
    offset: Option<f32>,
    nested_block: usize,
    consumed: &mut HashSet<String>,
) -> Result<Vec<f32>> {
    let absmax = take(st, &format!("{w}.absmax"), None, consumed)?;
    Ok(match offset {
        None => f32s(st, absmax)?,
        Some(offset) => {
            if absmax.dtype != Dtype::U8 {
                bail!(
                    "{}: tensor {w}.absmax must be U8 with double quantization",
                    st.path.display()
                );
            }
            let nested = take(
                st,
                &format!("{w}.nested_absmax"),
                Some(Dtype::F32),
                consumed,
            )?;
            let code = take(
                st,
                &format!("{w}.nested_quant_map"),
                Some(Dtype::F32),
                consumed,
            )?;
            let s = BlockScales::Double {
                q: st.bytes(absmax).to_vec(),
                nested_absmax: f32s(st, nested)?,
                nested_block,
                offset,
                code: f32s(st, code)?,
            };
            check_lengths(st, w, &s, nested_block)?;
            s.values()
        }
    })
}

fn check_lengths(
    st: &SafetensorsFile,
    w: &str,
    s: &BlockScales,
    nested_block: usize,
) -> Result<()> {
    if let BlockScales::Double {
        q,
        nested_absmax,
        code,
        ..
    } = s
    {
        if nested_absmax.len() != q.len().div_ceil(nested_block) || code.len() != 256 {
            bail!(
                "{}: {w}: {} block codes need {} nested absmax values and a 256-entry code, found {} and {}",
                st.path.display(),
                q.len(),
                q.len().div_ceil(nested_block),
                nested_absmax.len(),
                code.len()
            );
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // the stored pieces of one weight, checked together
fn dequant(
    st: &SafetensorsFile,
    w: &str,
    packed: &[u8],
    shape: &[usize],
    block: usize,
    code: &[f32],
    bits: u32,
    scales: &[f32],
    keep: bool,
) -> Result<LoadedTensor> {
    let n: usize = shape.iter().product();
    if block == 0
        || scales.len() != n.div_ceil(block)
        || packed.len() != (n * bits as usize).div_ceil(8)
        || code.len() > 1 << bits
    {
        bail!(
            "{}: {w}: shape {shape:?} at {bits} bits in blocks of {block} does not match the stored sizes ({} code bytes, {} scales, {} codes)",
            st.path.display(),
            packed.len(),
            scales.len(),
            code.len()
        );
    }
    // A code book shorter than 2^bits (int4's 15 values) leaves code indices with no value;
    // a corrupt file must not index past it (found by fuzz/fuzz_targets/bnb_folder.rs).
    if code.len() < 1 << bits {
        if let Some(c) = unpack_bits(packed, bits, n)
            .into_iter()
            .find(|&c| c as usize >= code.len())
        {
            bail!(
                "{}: {w}: code index {c} is outside its code book of {} values (corrupt file)",
                st.path.display(),
                code.len()
            );
        }
    }
    if keep {
        return Ok(LoadedTensor::Blockwise {
            name: w.to_string(),
            shape: shape.to_vec(),
            codes: unpack_bits(packed, bits, n),
            block,
            code: code.to_vec(),
            scales: scales.to_vec(),
        });
    }
    Ok(LoadedTensor::F32 {
        name: w.to_string(),
        shape: shape.to_vec(),
        data: dequantize_packed(packed, n, block, code, bits, scales),
    })
}

fn load_bnb(
    st: &SafetensorsFile,
    w: &str,
    consumed: &mut HashSet<String>,
    keep: bool,
) -> Result<LoadedTensor> {
    let state_name = format!("{w}{BNB_STATE_SUFFIX}");
    let state = take(st, &state_name, Some(Dtype::U8), consumed)?;
    let at = || format!("{}: tensor {state_name}", st.path.display());
    let js: serde_json::Value =
        serde_json::from_slice(st.bytes(state)).with_context(|| format!("{}: not JSON", at()))?;
    let shape: Vec<usize> = js["shape"]
        .as_array()
        .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
        .with_context(|| format!("{}: field `shape` is not a list of sizes", at()))?;
    let block = js["blocksize"]
        .as_u64()
        .with_context(|| format!("{}: missing number field `blocksize`", at()))?
        as usize;
    let offset = match js.get("nested_offset") {
        Some(v) => Some(
            v.as_f64()
                .with_context(|| format!("{}: field `nested_offset` is not a number", at()))?
                as f32,
        ),
        None => None,
    };
    let nested_block = js["nested_blocksize"].as_u64().unwrap_or(256) as usize;
    let weight = take(st, w, Some(Dtype::U8), consumed)?;
    let code = f32s(
        st,
        take(st, &format!("{w}.quant_map"), Some(Dtype::F32), consumed)?,
    )?;
    let sc = scales(st, w, offset, nested_block, consumed)?;
    dequant(st, w, st.bytes(weight), &shape, block, &code, 4, &sc, keep)
}

fn load_packed(
    st: &SafetensorsFile,
    h: &QuantizeHeader,
    w: &str,
    shape: &[usize],
    consumed: &mut HashSet<String>,
    keep: bool,
) -> Result<LoadedTensor> {
    let offset = if h.settings.double_quant {
        let t = take(
            st,
            &format!("{w}.nested_offset"),
            Some(Dtype::F32),
            consumed,
        )?;
        Some(f32s(st, t)?.first().copied().unwrap_or(0.0))
    } else {
        None
    };
    let codes = take(st, &format!("{w}.qcodes"), Some(Dtype::U8), consumed)?;
    let code = f32s(
        st,
        take(st, &format!("{w}.quant_map"), Some(Dtype::F32), consumed)?,
    )?;
    let sc = scales(st, w, offset, h.nested_block_size, consumed)?;
    dequant(
        st,
        w,
        st.bytes(codes),
        shape,
        h.settings.block_size,
        &code,
        h.bits,
        &sc,
        keep,
    )
}
