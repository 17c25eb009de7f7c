//! A K/V cache stored as low-bit codes, and attention that reads them.
//!
//! - `int8` / `int4`: one f32 scale per token across all KV heads, the codes of the trained
//!   K/V quantizer (symmetric MinMax per token, post-RoPE): code · scale is exactly the fake
//!   quantizer's value, so a KV4 student's cache holds what it was trained on. int4 codes
//!   share a byte two by two, in blocks of 32 (code j and j + 16 in byte j).
//! - `q8_0` / `q4_0`: llama.cpp's layouts, for comparison: blocks of 32 values along the
//!   token's row, each with an f16 scale; q8_0 rounds x/d with d = amax/127, q4_0 stores
//!   x/d + 8 in a nibble with d = (the value of largest magnitude) / -8.
//!
//! Attention dequantizes one token's row at a time into a small buffer; no f32 copy of the
//! cache exists.

use super::kernels::{dot_f32, pack_q4_blocks, scale_i8, unpack_q4_blocks};
use super::packed::quantize_rows;
use half::f16;

/// How a K/V cache stores its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvCacheFormat {
    /// The model's compute dtype (f32, bf16, f16).
    #[default]
    Float,
    Int8,
    Int4,
    Q8_0,
    Q4_0,
}

const QBLOCK: usize = 32;

impl KvCacheFormat {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "float" => Self::Float,
            "int8" => Self::Int8,
            "int4" => Self::Int4,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            _ => return None,
        })
    }

    pub const ALLOWED: &'static str = "float, int8, int4, q8_0, q4_0";

    pub fn name(&self) -> &'static str {
        match self {
            Self::Float => "float",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }

    /// Bits of the per-token integer formats (the trained quantizer's kind).
    pub fn token_bits(&self) -> Option<u32> {
        match self {
            Self::Int8 => Some(8),
            Self::Int4 => Some(4),
            _ => None,
        }
    }

    /// Bytes one token's K (or V) row of `width` values takes, scales included.
    pub fn row_bytes(&self, width: usize, float_bytes: usize) -> usize {
        let blocks = width.div_ceil(QBLOCK);
        match self {
            Self::Float => width * float_bytes,
            Self::Int8 => width + 4,
            Self::Int4 => blocks * QBLOCK / 2 + 4,
            Self::Q8_0 => width + 2 * blocks,
            Self::Q4_0 => width.div_ceil(2) + 2 * blocks,
        }
    }
}

/// One layer's K and V codes for one sequence.
pub struct KvCodes {
    format: KvCacheFormat,
    width: usize,
    k: Vec<u8>,
    v: Vec<u8>,
    /// Per token (int) or per block (q formats, f16 bits widened to f32 on write).
    k_scale: Vec<f32>,
    v_scale: Vec<f32>,
}

impl KvCodes {
    /// `width` = KV heads × head_dim; q formats need a multiple of 32.
    pub fn new(format: KvCacheFormat, width: usize, capacity: usize) -> candle_core::Result<Self> {
        let (code_bytes, scales) = match format {
            KvCacheFormat::Float => candle_core::bail!("KvCodes: the float cache keeps tensors"),
            KvCacheFormat::Int8 => (width, 1),
            KvCacheFormat::Int4 => (width.div_ceil(QBLOCK) * QBLOCK / 2, 1),
            KvCacheFormat::Q8_0 | KvCacheFormat::Q4_0 => {
                if !width.is_multiple_of(QBLOCK) {
                    candle_core::bail!(
                        "kv cache {}: a token's K/V row has {width} values (KV heads x head_dim), \
                         not a multiple of {QBLOCK}",
                        format.name()
                    );
                }
                let b = if format == KvCacheFormat::Q8_0 {
                    width
                } else {
                    width / 2
                };
                (b, width / QBLOCK)
            }
        };
        Ok(Self {
            format,
            width,
            k: vec![0; code_bytes * capacity],
            v: vec![0; code_bytes * capacity],
            k_scale: vec![0.0; scales * capacity],
            v_scale: vec![0.0; scales * capacity],
        })
    }

    /// Bytes held (codes and scales as stored: f32 per token, f16 per q block).
    pub fn bytes(&self) -> usize {
        let scale_bytes = if self.format.token_bits().is_some() {
            4
        } else {
            2
        };
        self.k.len() + self.v.len() + scale_bytes * (self.k_scale.len() + self.v_scale.len())
    }

    fn code_bytes(&self) -> usize {
        match self.format {
            KvCacheFormat::Int8 | KvCacheFormat::Q8_0 => self.width,
            _ => self.width.div_ceil(QBLOCK) * QBLOCK / 2,
        }
    }

    fn scales_per_token(&self) -> usize {
        match self.format.token_bits() {
            Some(_) => 1,
            None => self.width / QBLOCK,
        }
    }

    /// Stores token `pos`'s K and V rows (post-RoPE, `width` values each).
    pub fn write(&mut self, pos: usize, k: &[f32], v: &[f32]) {
        let (cb, sp) = (self.code_bytes(), self.scales_per_token());
        let (format, width) = (self.format, self.width);
        for (row, codes, scales) in [
            (k, &mut self.k, &mut self.k_scale),
            (v, &mut self.v, &mut self.v_scale),
        ] {
            let dst = &mut codes[pos * cb..(pos + 1) * cb];
            let sdst = &mut scales[pos * sp..(pos + 1) * sp];
            encode(format, width, row, dst, sdst);
        }
    }

    /// Token `t`'s K (or V) row, dequantized into `out`.
    fn read(&self, value: bool, t: usize, codes_buf: &mut [i8], out: &mut [f32]) {
        let (cb, sp) = (self.code_bytes(), self.scales_per_token());
        let (codes, scales) = if value {
            (&self.v, &self.v_scale)
        } else {
            (&self.k, &self.k_scale)
        };
        let src = &codes[t * cb..(t + 1) * cb];
        let s = &scales[t * sp..(t + 1) * sp];
        match self.format {
            KvCacheFormat::Int4 | KvCacheFormat::Q4_0 => unpack_q4_blocks(src, codes_buf),
            _ => codes_buf
                .iter_mut()
                .zip(src)
                .for_each(|(c, &b)| *c = b as i8),
        }
        match self.format.token_bits() {
            Some(_) => scale_i8(codes_buf, s[0], out),
            None => {
                for ((o, c), d) in out.chunks_mut(QBLOCK).zip(codes_buf.chunks(QBLOCK)).zip(s) {
                    scale_i8(c, *d, o);
                }
            }
        }
    }

    /// Attention of one token's queries `q` [nh × hd] over the first `n` cached tokens:
    /// softmax(q·k · scale) · v per query head, grouped heads sharing their KV head.
    pub fn attend(
        &self,
        q: &[f32],
        n: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
        scale: f32,
    ) -> Vec<f32> {
        let rep = nh / nkv;
        let mut codes = vec![0i8; self.width];
        let mut row = vec![0f32; self.width];
        let mut scores = vec![0f32; nh * n];
        for t in 0..n {
            self.read(false, t, &mut codes, &mut row);
            for h in 0..nh {
                let g = h / rep;
                scores[h * n + t] =
                    dot_f32(&q[h * hd..(h + 1) * hd], &row[g * hd..(g + 1) * hd]) * scale;
            }
        }
        for s in scores.chunks_mut(n) {
            let m = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0f32;
            for x in s.iter_mut() {
                *x = (*x - m).exp();
                sum += *x;
            }
            for x in s.iter_mut() {
                *x /= sum;
            }
        }
        let mut out = vec![0f32; nh * hd];
        for t in 0..n {
            self.read(true, t, &mut codes, &mut row);
            for h in 0..nh {
                let (g, p) = (h / rep, scores[h * n + t]);
                for (o, &v) in out[h * hd..(h + 1) * hd]
                    .iter_mut()
                    .zip(&row[g * hd..(g + 1) * hd])
                {
                    *o += p * v;
                }
            }
        }
        out
    }
}

/// Quantizes one row into `codes` and `scales` in `format`.
fn encode(format: KvCacheFormat, width: usize, row: &[f32], codes: &mut [u8], scales: &mut [f32]) {
    match format {
        KvCacheFormat::Int8 | KvCacheFormat::Int4 => {
            let bits = format.token_bits().unwrap_or(8);
            let (q, a) = quantize_rows(row, 1, width, bits);
            scales[0] = a[0];
            if bits == 4 {
                codes.copy_from_slice(&pack_q4_blocks(&q));
            } else {
                codes.iter_mut().zip(&q).for_each(|(c, &x)| *c = x as u8);
            }
        }
        KvCacheFormat::Q8_0 => {
            for ((blk, out), s) in row
                .chunks(QBLOCK)
                .zip(codes.chunks_mut(QBLOCK))
                .zip(scales.iter_mut())
            {
                let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for (o, &x) in out.iter_mut().zip(blk) {
                    *o = (x * id).round() as i8 as u8;
                }
                *s = f16::from_f32(d).to_f32();
            }
        }
        KvCacheFormat::Q4_0 => {
            let mut q = [0i8; QBLOCK];
            for ((blk, out), s) in row
                .chunks(QBLOCK)
                .zip(codes.chunks_mut(QBLOCK / 2))
                .zip(scales.iter_mut())
            {
                let max = blk
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for (c, &x) in q.iter_mut().zip(blk) {
                    *c = ((x * id + 8.5) as u8).min(15) as i8 - 8;
                }
                out.copy_from_slice(&pack_q4_blocks(&q));
                *s = f16::from_f32(d).to_f32();
            }
        }
        KvCacheFormat::Float => unreachable!("the float cache keeps tensors"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(width: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..width)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5) * 3.0
            })
            .collect()
    }

    #[test]
    fn int_formats_hold_exactly_the_fake_quantizers_values() {
        let width = 48;
        for (f, bits) in [(KvCacheFormat::Int8, 8), (KvCacheFormat::Int4, 4)] {
            let mut c = KvCodes::new(f, width, 3).unwrap();
            let (k, v) = (row(width, 1), row(width, 2));
            c.write(1, &k, &v);
            let t = candle_core::Tensor::from_vec(k.clone(), (1, width), &candle_core::Device::Cpu)
                .unwrap();
            let want: Vec<f32> = quant::fake_quant(&t, bits, None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (mut codes, mut got) = (vec![0i8; width], vec![0f32; width]);
            c.read(false, 1, &mut codes, &mut got);
            assert_eq!(got, want, "{f:?}");
        }
    }

    #[test]
    fn q_formats_round_within_their_step() {
        let width = 64;
        // q8_0 rounds to the nearest of its steps; q4_0's -8..=7 codes clip a value opposite
        // the block's extreme by up to one whole step.
        for (f, step) in [
            (KvCacheFormat::Q8_0, 0.51 / 127.0),
            (KvCacheFormat::Q4_0, 1.01 / 8.0),
        ] {
            let mut c = KvCodes::new(f, width, 1).unwrap();
            let k = row(width, 3);
            c.write(0, &k, &k);
            let (mut codes, mut got) = (vec![0i8; width], vec![0f32; width]);
            c.read(true, 0, &mut codes, &mut got);
            for (blk, gb) in k.chunks(32).zip(got.chunks(32)) {
                let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in blk.iter().zip(gb) {
                    assert!((a - b).abs() <= amax * step + 1e-3, "{f:?}: {a} vs {b}");
                }
            }
        }
        assert!(KvCodes::new(KvCacheFormat::Q4_0, 40, 1).is_err());
    }

    #[test]
    fn int4_takes_about_a_quarter_of_bf16() {
        let (w, bf16) = (192, 2);
        let r = KvCacheFormat::Int4.row_bytes(w, bf16) as f64
            / KvCacheFormat::Float.row_bytes(w, bf16) as f64;
        assert!(r < 0.3, "{r}");
        let c = KvCodes::new(KvCacheFormat::Int4, w, 10).unwrap();
        assert_eq!(c.bytes(), 2 * 10 * KvCacheFormat::Int4.row_bytes(w, bf16));
    }
}
