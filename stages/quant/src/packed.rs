//! Our packed layout of integer grids (`pipeline export --format packed`): a model folder
//! whose `model.safetensors` holds, for each quantized weight `W`,
//!
//! ```text
//! W.qcodes  U8 [ceil(rows * cols * bits / 8)]  codes + 2^(bits-1), bits each, MSB first, row-major
//! W.scales  F32 [rows, ceil(cols / group)]     one scale per output channel or group
//! ```
//!
//! and every other tensor as stored; `packed.json` names the quantized weights with their
//! shape, bits and group. The value of a weight is code * scale, exactly the grid it was
//! trained on. (The quantize stage's `packed` layout stores code-book indices and block
//! absmax for NF/int code books; this one stores signed integers and per-row group scales,
//! the student's grid.)

use crate::blockwise::{pack_bits, unpack_bits};
use crate::grid::GridWeight;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const HEADER_FILE: &str = "packed.json";
pub const FORMAT: &str = "packed-grid";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackedWeight {
    pub shape: [usize; 2],
    pub bits: u32,
    pub group: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackedHeader {
    pub format: String,
    pub version: u32,
    pub weights: BTreeMap<String, PackedWeight>,
}

impl PackedHeader {
    pub fn new() -> PackedHeader {
        PackedHeader {
            format: FORMAT.into(),
            version: 1,
            weights: BTreeMap::new(),
        }
    }

    /// The header of folder `dir`, `None` when it has none.
    pub fn read(dir: &Path) -> Result<Option<PackedHeader>> {
        let path = dir.join(HEADER_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let h: PackedHeader = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a packed header", path.display()))?;
        if h.format != FORMAT || h.version != 1 {
            bail!(
                "{}: format {:?} version {}: this build reads {FORMAT:?} version 1",
                path.display(),
                h.format,
                h.version
            );
        }
        for (name, w) in &h.weights {
            let [rows, cols] = w.shape;
            if !(2..=8).contains(&w.bits) || w.group == 0 || w.group > cols.max(1) {
                bail!(
                    "{}: weights.{name}: bits {} / group {} for shape {:?}: bits must be 2..=8 and the group 1..=cols",
                    path.display(),
                    w.bits,
                    w.group,
                    w.shape
                );
            }
            // Shapes are caps on what a reader allocates: 2^40 values is far beyond a model.
            if rows.checked_mul(cols).is_none_or(|n| n > 1 << 40) {
                bail!(
                    "{}: weights.{name}: shape {:?} is too large",
                    path.display(),
                    w.shape
                );
            }
        }
        Ok(Some(h))
    }
}

impl Default for PackedHeader {
    fn default() -> Self {
        Self::new()
    }
}

/// The stored forms of a grid: packed codes and its scales.
pub fn pack(g: &GridWeight) -> (Vec<u8>, Vec<f32>) {
    let off = 1i32 << (g.bits - 1);
    let u: Vec<u8> = g.codes.iter().map(|c| (*c as i32 + off) as u8).collect();
    (pack_bits(&u, g.bits), g.scales.clone())
}

/// A packed model's `model.safetensors` and `packed.json`: `floats` (name, shape, values) as
/// F32, each grid as `W.qcodes` + `W.scales`, tensors sorted by name.
pub fn write_bytes(
    floats: &[(String, Vec<usize>, Vec<f32>)],
    grids: &[(&str, &GridWeight)],
) -> Result<(Vec<u8>, Vec<u8>)> {
    let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut data: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = floats
        .iter()
        .map(|(n, shape, v)| {
            (
                n.clone(),
                safetensors::Dtype::F32,
                shape.clone(),
                f32_bytes(v),
            )
        })
        .collect();
    let mut header = PackedHeader::new();
    for (name, g) in grids {
        let (q, sc) = pack(g);
        data.push((
            format!("{name}.qcodes"),
            safetensors::Dtype::U8,
            vec![q.len()],
            q,
        ));
        data.push((
            format!("{name}.scales"),
            safetensors::Dtype::F32,
            vec![g.rows, g.groups_per_row()],
            f32_bytes(&sc),
        ));
        header.weights.insert(
            name.to_string(),
            PackedWeight {
                shape: [g.rows, g.cols],
                bits: g.bits,
                group: g.group,
            },
        );
    }
    data.sort_by(|a, b| a.0.cmp(&b.0));
    let views = data
        .iter()
        .map(|(n, d, shape, bytes)| {
            let v = safetensors::tensor::TensorView::new(*d, shape.clone(), bytes)
                .map_err(|e| anyhow::anyhow!("tensor {n}: {e}"))?;
            Ok((n.as_str(), v))
        })
        .collect::<Result<Vec<_>>>()?;
    // One metadata entry only: a map with several would serialise in random order.
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let st = safetensors::serialize(views, Some(meta))
        .map_err(|e| anyhow::anyhow!("serialising safetensors: {e}"))?;
    Ok((st, serde_json::to_vec_pretty(&header)?))
}

/// The grid back from its stored forms; lengths are checked against the header first.
pub fn unpack(name: &str, w: &PackedWeight, qcodes: &[u8], scales: &[f32]) -> Result<GridWeight> {
    let [rows, cols] = w.shape;
    let n = rows * cols;
    let want = (n * w.bits as usize).div_ceil(8);
    if qcodes.len() != want {
        bail!(
            "{name}.qcodes has {} bytes; shape {:?} at {} bits needs {want}",
            qcodes.len(),
            w.shape,
            w.bits
        );
    }
    let per_row = cols.div_ceil(w.group);
    if scales.len() != rows * per_row {
        bail!(
            "{name}.scales has {} values; shape {:?} with groups of {} needs {}",
            scales.len(),
            w.shape,
            w.group,
            rows * per_row
        );
    }
    let off = 1i32 << (w.bits - 1);
    let codes = unpack_bits(qcodes, w.bits, n)
        .into_iter()
        .map(|u| (u as i32 - off) as i8)
        .collect();
    Ok(GridWeight {
        rows,
        cols,
        bits: w.bits,
        group: w.group,
        codes,
        scales: scales.to_vec(),
    })
}

/// Every grid weight of the packed folder `dir` (header already read) from the safetensors
/// file `file`, as its grid; tensors that are not part of a grid are left to the caller.
pub fn read_grids(h: &PackedHeader, file: &Path) -> Result<BTreeMap<String, GridWeight>> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", file.display()))?;
    let mut out = BTreeMap::new();
    for (name, w) in &h.weights {
        let get = |suffix: &str, dtype: safetensors::Dtype| -> Result<Vec<u8>> {
            let t = st.tensor(&format!("{name}.{suffix}")).map_err(|_| {
                anyhow::anyhow!("{}: missing tensor {name}.{suffix}", file.display())
            })?;
            if t.dtype() != dtype {
                bail!(
                    "{}: tensor {name}.{suffix} has dtype {:?}, expected {dtype:?}",
                    file.display(),
                    t.dtype()
                );
            }
            Ok(t.data().to_vec())
        };
        let q = get("qcodes", safetensors::Dtype::U8)?;
        let s: Vec<f32> = get("scales", safetensors::Dtype::F32)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let g = unpack(name, w, &q, &s).with_context(|| format!("{}", file.display()))?;
        out.insert(name.clone(), g);
    }
    Ok(out)
}

/// Is `name` one of the stored forms of a grid weight (`W.qcodes`, `W.scales`)?
pub fn is_grid_tensor(h: &PackedHeader, name: &str) -> bool {
    ["qcodes", "scales"].iter().any(|s| {
        name.strip_suffix(s)
            .and_then(|n| n.strip_suffix('.'))
            .is_some_and(|w| h.weights.contains_key(w))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::ScaleDtype;

    #[test]
    fn grids_round_trip_for_every_width() {
        let w: Vec<f32> = (0..5 * 24).map(|i| (i as f32 * 0.37).sin()).collect();
        for bits in 2..=8 {
            let g = GridWeight::minmax(&w, 5, 24, bits, Some(10), ScaleDtype::F32);
            let (q, s) = pack(&g);
            let info = PackedWeight {
                shape: [5, 24],
                bits,
                group: 10,
            };
            assert_eq!(unpack("w", &info, &q, &s).unwrap(), g);
            assert!(unpack("w", &info, &q[1..], &s).is_err());
            assert!(unpack("w", &info, &q, &s[1..]).is_err());
        }
    }
}
