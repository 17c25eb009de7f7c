//! llama.cpp's quantized blocks written from a [`GridWeight`], without re-rounding a code:
//!
//! ```text
//! Q4_0  32 values: f16 d, 16 bytes; value = d * (q - 8), q = c + 8 in 0..15
//!       (byte j: element j in the low nibble, element j + 16 in the high one)
//! Q8_0  32 values: f16 d, 32 x i8; value = d * q
//! Q3_K  256 values: hmask[32], qs[64], scales[12], f16 d; value = d * (s - 32) * (u - 4),
//!       u = c + 4 (2 low bits in qs, the high bit in hmask), every 6-bit s = 33
//! Q2_K  256 values: scales[16], qs[64], f16 d, f16 dmin; value = d * (s & 15) * u
//!       - dmin * (s >> 4), u = c + 2, every s = 0x21, d = dmin = the grid's scale
//! ```
//!
//! One scale of the grid covers whole blocks (a group a multiple of the block), so every
//! block has one d. Scales are stored as f16: exact when the grid's scales are f16 values
//! (`ScaleDtype::F16` in training); [`decode`] gives what llama.cpp reads back.

use crate::grid::GridWeight;
use half::f16;

/// The llama.cpp block types an integer grid can be written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    Q4_0,
    Q8_0,
    Q3K,
    Q2K,
}

impl BlockType {
    pub fn name(&self) -> &'static str {
        match self {
            BlockType::Q4_0 => "Q4_0",
            BlockType::Q8_0 => "Q8_0",
            BlockType::Q3K => "Q3_K",
            BlockType::Q2K => "Q2_K",
        }
    }

    /// The block type for a grid of `bits` bits, if llama.cpp has one that holds it.
    pub fn for_bits(bits: u32) -> Option<BlockType> {
        match bits {
            4 => Some(BlockType::Q4_0),
            8 => Some(BlockType::Q8_0),
            3 => Some(BlockType::Q3K),
            2 => Some(BlockType::Q2K),
            _ => None,
        }
    }

    pub fn bits(&self) -> u32 {
        match self {
            BlockType::Q4_0 => 4,
            BlockType::Q8_0 => 8,
            BlockType::Q3K => 3,
            BlockType::Q2K => 2,
        }
    }

    /// Values per block.
    pub fn block(&self) -> usize {
        match self {
            BlockType::Q4_0 | BlockType::Q8_0 => 32,
            BlockType::Q3K | BlockType::Q2K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(&self) -> usize {
        match self {
            BlockType::Q4_0 => 18,
            BlockType::Q8_0 => 34,
            BlockType::Q3K => 110,
            BlockType::Q2K => 84,
        }
    }

    /// Why a grid's rows cannot be written as this type as they are (the rows do not tile
    /// into blocks); `None` when they can. A grid that tiles but whose scales cover parts of
    /// a block is refused by [`BlockType::check_grid`] instead.
    pub fn tiling_problem(&self, cols: usize) -> Option<String> {
        (!cols.is_multiple_of(self.block())).then(|| {
            format!(
                "rows of {cols} values do not tile into {} blocks of {}",
                self.name(),
                self.block()
            )
        })
    }

    /// Why this grid (bits, group, codes) cannot be held by this type exactly, if so.
    pub fn check_grid(&self, g: &GridWeight) -> Result<(), String> {
        if g.bits != self.bits() {
            return Err(format!(
                "{} holds {}-bit codes, the grid has {} bits",
                self.name(),
                self.bits(),
                g.bits
            ));
        }
        if !g.group.is_multiple_of(self.block()) && g.group != g.cols {
            return Err(format!(
                "{} has one scale per {} values; a group of {} values is not a multiple of it",
                self.name(),
                self.block(),
                g.group
            ));
        }
        if !g.group.is_multiple_of(self.block()) {
            // Per channel, but the row does not tile: the caller stores floats.
            return Err(self.tiling_problem(g.cols).unwrap_or_default());
        }
        let (lo, hi) = g.code_range();
        if let Some(c) = g
            .codes
            .iter()
            .find(|c| (**c as i32) < lo || (**c as i32) > hi)
        {
            return Err(format!("code {c} is outside {lo}..={hi}"));
        }
        Ok(())
    }
}

fn put_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn get_f16(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// The blocks of `g` as llama.cpp stores them (row after row). The grid must pass
/// [`BlockType::check_grid`].
pub fn encode(g: &GridWeight, t: BlockType) -> Result<Vec<u8>, String> {
    t.check_grid(g)?;
    let bs = t.block();
    let mut out = Vec::with_capacity(g.rows * g.cols / bs * t.block_bytes());
    for r in 0..g.rows {
        for b in 0..g.cols / bs {
            let c0 = b * bs;
            let codes = &g.codes[r * g.cols + c0..r * g.cols + c0 + bs];
            let d = g.scale_at(r, c0);
            match t {
                BlockType::Q4_0 => {
                    put_f16(&mut out, d);
                    for j in 0..16 {
                        let lo = (codes[j] as i32 + 8) as u8;
                        let hi = (codes[j + 16] as i32 + 8) as u8;
                        out.push(lo | (hi << 4));
                    }
                }
                BlockType::Q8_0 => {
                    put_f16(&mut out, d);
                    out.extend(codes.iter().map(|c| *c as u8));
                }
                BlockType::Q3K => {
                    let mut hmask = [0u8; 32];
                    let mut qs = [0u8; 64];
                    for (e, c) in codes.iter().enumerate() {
                        let u = (*c as i32 + 4) as u8;
                        let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                        qs[n * 32 + l] |= (u & 3) << (2 * j);
                        hmask[l] |= (u >> 2) << (n * 4 + j);
                    }
                    out.extend_from_slice(&hmask);
                    out.extend_from_slice(&qs);
                    // Sixteen 6-bit scales of 33 (low nibbles 1, high pairs 2).
                    out.extend_from_slice(&[0x11; 8]);
                    out.extend_from_slice(&[0xAA; 4]);
                    put_f16(&mut out, d);
                }
                BlockType::Q2K => {
                    let mut qs = [0u8; 64];
                    for (e, c) in codes.iter().enumerate() {
                        let u = (*c as i32 + 2) as u8;
                        let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                        qs[n * 32 + l] |= u << (2 * j);
                    }
                    out.extend_from_slice(&[0x21; 16]);
                    out.extend_from_slice(&qs);
                    put_f16(&mut out, d);
                    put_f16(&mut out, d);
                }
            }
        }
    }
    Ok(out)
}

/// The values llama.cpp reads from `bytes` (its dequantization, written out here), row-major.
pub fn decode(bytes: &[u8], t: BlockType, n: usize) -> Result<Vec<f32>, String> {
    let bs = t.block();
    if !n.is_multiple_of(bs) || bytes.len() != n / bs * t.block_bytes() {
        return Err(format!(
            "{} data of {} bytes cannot hold {n} values",
            t.name(),
            bytes.len()
        ));
    }
    let mut y = Vec::with_capacity(n);
    for blk in bytes.chunks(t.block_bytes()) {
        match t {
            BlockType::Q4_0 => {
                let d = get_f16(&blk[..2]);
                let qs = &blk[2..];
                let mut v = [0f32; 32];
                for j in 0..16 {
                    v[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
                    v[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
                y.extend_from_slice(&v);
            }
            BlockType::Q8_0 => {
                let d = get_f16(&blk[..2]);
                y.extend(blk[2..].iter().map(|q| (*q as i8) as f32 * d));
            }
            BlockType::Q3K => {
                let (hmask, qs, sc, d) = (&blk[..32], &blk[32..96], &blk[96..108], &blk[108..]);
                let d = get_f16(d);
                let scale = |i: usize| -> i32 {
                    let low = if i < 8 { sc[i] & 0xF } else { sc[i - 8] >> 4 };
                    let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
                    (low | (high << 4)) as i32 - 32
                };
                for e in 0..256 {
                    let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                    let q2 = (qs[n * 32 + l] >> (2 * j)) & 3;
                    let h = (hmask[l] >> (n * 4 + j)) & 1;
                    let u = q2 as i32 - if h == 1 { 0 } else { 4 };
                    let dl = d * scale(e / 16) as f32;
                    y.push(dl * u as f32);
                }
            }
            BlockType::Q2K => {
                let (sc, qs) = (&blk[..16], &blk[16..80]);
                let (d, dmin) = (get_f16(&blk[80..82]), get_f16(&blk[82..84]));
                for e in 0..256 {
                    let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                    let s = sc[e / 16];
                    let u = (qs[n * 32 + l] >> (2 * j)) & 3;
                    let dl = d * (s & 0xF) as f32;
                    let ml = dmin * (s >> 4) as f32;
                    y.push(dl * u as f32 - ml);
                }
            }
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::{max_abs_change, ScaleDtype};
    use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
    use candle_core::Device;

    fn weights(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1013) as f32 / 506.0 - 1.0) * (1.0 + (i % 5) as f32))
            .collect()
    }

    #[test]
    fn blocks_hold_the_grid_exactly_and_candle_reads_them_alike() {
        let (rows, cols) = (3, 512);
        let w = weights(rows * cols);
        for (t, ct) in [
            (BlockType::Q4_0, GgmlDType::Q4_0),
            (BlockType::Q8_0, GgmlDType::Q8_0),
            (BlockType::Q3K, GgmlDType::Q3K),
            (BlockType::Q2K, GgmlDType::Q2K),
        ] {
            for group in [None, Some(256)] {
                let g = GridWeight::minmax(&w, rows, cols, t.bits(), group, ScaleDtype::F16);
                let bytes = encode(&g, t).unwrap();
                let back = decode(&bytes, t, rows * cols).unwrap();
                assert_eq!(max_abs_change(&back, &g.values()), 0.0, "{}", t.name());
                // candle's own dequantization (llama.cpp's, ported) of the same bytes.
                let q = qtensor_from_ggml(ct, &bytes, vec![rows, cols], &Device::Cpu).unwrap();
                let c = q
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert_eq!(max_abs_change(&c, &g.values()), 0.0, "candle {}", t.name());
            }
        }
    }

    #[test]
    fn lrqat_codes_use_the_lowest_code_too() {
        // LR-QAT's grid reaches -2^(b-1); every type holds it.
        for t in [
            BlockType::Q4_0,
            BlockType::Q8_0,
            BlockType::Q3K,
            BlockType::Q2K,
        ] {
            let lo = -(1i32 << (t.bits() - 1));
            let cols = 256;
            let codes: Vec<i8> = (0..cols)
                .map(|i| (lo + (i as i32 % -lo * 2)) as i8)
                .collect();
            let g = GridWeight {
                rows: 1,
                cols,
                bits: t.bits(),
                group: cols,
                codes,
                scales: vec![0.25],
            };
            let back = decode(&encode(&g, t).unwrap(), t, cols).unwrap();
            assert_eq!(max_abs_change(&back, &g.values()), 0.0, "{}", t.name());
        }
    }

    #[test]
    fn grids_a_type_cannot_hold_are_refused() {
        let w = weights(64);
        let g = GridWeight::minmax(&w, 1, 64, 4, Some(16), ScaleDtype::F32);
        assert!(BlockType::Q4_0.check_grid(&g).unwrap_err().contains("16"));
        let g = GridWeight::minmax(&w, 1, 64, 3, None, ScaleDtype::F32);
        assert!(BlockType::Q3K.check_grid(&g).unwrap_err().contains("tile"));
        let g = GridWeight::minmax(&w, 1, 64, 3, None, ScaleDtype::F32);
        assert!(BlockType::Q4_0.check_grid(&g).unwrap_err().contains("bits"));
    }
}
