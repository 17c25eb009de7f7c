//! A weight on its integer grid: the codes and scales a symmetric MinMax quantizer
//! ([`crate::fake`]) puts it on, so that an export can store exactly what the student was
//! trained with. `values()` is bit for bit the fake quantizer's output (signed zeros aside:
//! -0.0 and +0.0 are the same weight).
//!
//! A scale may be kept in a narrower type than f32 (`ScaleDtype`): the scale is rounded to
//! that type first and the codes are chosen against the rounded scale, so a format that
//! stores f16 scales (GGUF) holds the grid exactly.

use serde::{Deserialize, Serialize};

/// The type a quantizer's scale is rounded to before the codes are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl ScaleDtype {
    pub fn parse(s: &str) -> Option<ScaleDtype> {
        match s {
            "f32" => Some(ScaleDtype::F32),
            "f16" => Some(ScaleDtype::F16),
            "bf16" => Some(ScaleDtype::Bf16),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ScaleDtype::F32 => "f32",
            ScaleDtype::F16 => "f16",
            ScaleDtype::Bf16 => "bf16",
        }
    }

    pub fn is_f32(&self) -> bool {
        *self == ScaleDtype::F32
    }

    /// `s` rounded to nearest (ties to even) in this type, as an f32.
    pub fn round(&self, s: f32) -> f32 {
        match self {
            ScaleDtype::F32 => s,
            ScaleDtype::F16 => half::f16::from_f32(s).to_f32(),
            ScaleDtype::Bf16 => half::bf16::from_f32(s).to_f32(),
        }
    }

    /// Does `s` survive a round trip through this type unchanged?
    pub fn holds(&self, s: f32) -> bool {
        self.round(s).to_bits() == s.to_bits()
    }
}

/// The scale of one group: amax / qmax rounded to `scale`. A group of zeros has scale 0.
pub fn group_scale(amax: f32, qmax: f32, scale: ScaleDtype) -> f32 {
    scale.round(amax / qmax)
}

/// One code: round_half_even(clamp(v / alpha, -qmax, qmax)); 0 for alpha = 0.
#[inline]
pub fn code(v: f32, alpha: f32, qmax: f32) -> i8 {
    if alpha == 0.0 {
        return 0;
    }
    // Adding and subtracting 1.5 * 2^23 rounds half to even (|x| <= 127 here), exactly as
    // round_ties_even, without the libm call it compiles to on baseline x86-64.
    const MAGIC: f32 = 12_582_912.0;
    (((v / alpha).clamp(-qmax, qmax) + MAGIC) - MAGIC) as i8
}

/// A [rows, cols] weight as integer codes and one scale per (row, group).
#[derive(Debug, Clone, PartialEq)]
pub struct GridWeight {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    /// Values sharing one scale along a row; `cols` for per-channel.
    pub group: usize,
    /// Row-major codes. A MinMax grid uses -qmax..=qmax; LR-QAT's also -2^(b-1).
    pub codes: Vec<i8>,
    /// Row-major [rows, groups_per_row].
    pub scales: Vec<f32>,
}

impl GridWeight {
    /// The symmetric MinMax grid of `w` ([rows, cols] row-major) with `bits` bits and groups
    /// of `group` values (`None` = per channel), scales rounded to `scale`: the codes the fake
    /// quantizer rounds to.
    pub fn minmax(
        w: &[f32],
        rows: usize,
        cols: usize,
        bits: u32,
        group: Option<usize>,
        scale: ScaleDtype,
    ) -> GridWeight {
        assert_eq!(w.len(), rows * cols, "grid: data does not match its shape");
        let qmax = ((1u32 << (bits - 1)) - 1) as f32;
        let g = group.unwrap_or(cols).min(cols).max(1);
        let per_row = cols.div_ceil(g);
        let mut codes = vec![0i8; w.len()];
        let mut scales = vec![0f32; rows * per_row];
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            for (j, chunk) in row.chunks(g).enumerate() {
                let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let alpha = group_scale(amax, qmax, scale);
                scales[r * per_row + j] = alpha;
                let out = &mut codes[r * cols + j * g..r * cols + j * g + chunk.len()];
                for (c, &v) in out.iter_mut().zip(chunk) {
                    *c = code(v, alpha, qmax);
                }
            }
        }
        GridWeight {
            rows,
            cols,
            bits,
            group: g,
            codes,
            scales,
        }
    }

    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group)
    }

    /// The scale of value (r, c).
    pub fn scale_at(&self, r: usize, c: usize) -> f32 {
        self.scales[r * self.groups_per_row() + c / self.group]
    }

    /// code * scale, row-major: the weights the student computes with.
    pub fn values(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.codes.len());
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.push(self.codes[r * self.cols + c] as f32 * self.scale_at(r, c));
            }
        }
        out
    }

    /// The smallest and largest code this grid may hold.
    pub fn code_range(&self) -> (i32, i32) {
        let half = 1i32 << (self.bits - 1);
        (-half, half - 1)
    }

    /// The rows in a new order: row i of the result is row `order[i]` of this grid.
    pub fn permute_rows(&self, order: &[usize]) -> GridWeight {
        assert_eq!(order.len(), self.rows);
        let per_row = self.groups_per_row();
        let mut codes = Vec::with_capacity(self.codes.len());
        let mut scales = Vec::with_capacity(self.scales.len());
        for &r in order {
            codes.extend_from_slice(&self.codes[r * self.cols..(r + 1) * self.cols]);
            scales.extend_from_slice(&self.scales[r * per_row..(r + 1) * per_row]);
        }
        GridWeight {
            codes,
            scales,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod code_tests {
    #[test]
    fn codes_round_half_to_even() {
        for (v, want) in [
            (0.5f32, 0i8),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (6.49, 6),
            (100.0, 7),
            (-9.0, -7),
        ] {
            assert_eq!(super::code(v, 1.0, 7.0), want, "{v}");
        }
        for i in -2000..2000 {
            let x = i as f32 * 0.0137;
            assert_eq!(
                super::code(x, 0.1, 127.0),
                (x / 0.1).clamp(-127.0, 127.0).round_ties_even() as i8
            );
        }
    }
}

/// The largest |a - b| over two equally long weight lists (0 when they hold the same
/// weights; -0.0 equals +0.0).
pub fn max_abs_change(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(
        0f32,
        |m, (x, y)| if x == y { m } else { m.max((x - y).abs()) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn weights(n: usize, seed: u32) -> Vec<f32> {
        // A small deterministic spread with exact ties and zeros in it.
        let mut s = seed.wrapping_mul(2654435761) | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                if i % 17 == 0 {
                    0.0
                } else {
                    (s % 2001) as f32 / 1000.0 - 1.0
                }
            })
            .collect()
    }

    #[test]
    fn values_are_the_fake_quantizers_bit_for_bit() {
        let (rows, cols) = (6, 40);
        let w = weights(rows * cols, 3);
        let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
        for bits in [2, 3, 4, 8] {
            for group in [None, Some(8), Some(7)] {
                for scale in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::Bf16] {
                    let g = GridWeight::minmax(&w, rows, cols, bits, group, scale);
                    let fq = crate::fake::fake_quant_scaled(&t, bits, group, scale)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    assert_eq!(max_abs_change(&g.values(), &fq), 0.0, "{bits} {group:?}");
                    assert!(g.scales.iter().all(|s| scale.holds(*s)));
                    let qmax = (1i32 << (bits - 1)) - 1;
                    assert!(g.codes.iter().all(|c| (*c as i32).abs() <= qmax));
                }
            }
        }
    }

    #[test]
    fn f16_scales_round_before_the_codes_are_chosen() {
        // amax / 7 = 0.1 is not an f16 value; 0.34995 is 3.4995 steps of 0.1 but 3.5004
        // steps of f16(0.1) = 0.0999756, so its code depends on which scale it is chosen for.
        let w = vec![0.7f32, 0.34995, -0.05, 0.0];
        let g = GridWeight::minmax(&w, 1, 4, 4, None, ScaleDtype::F16);
        assert_eq!(g.scales[0], half::f16::from_f32(0.1).to_f32());
        assert_eq!(g.codes, vec![7, 4, -1, 0]);
        let g = GridWeight::minmax(&w, 1, 4, 4, None, ScaleDtype::F32);
        assert_eq!(g.codes, vec![7, 3, 0, 0]);
    }

    #[test]
    fn permuted_rows_keep_their_scales() {
        let w = weights(3 * 8, 1);
        let g = GridWeight::minmax(&w, 3, 8, 4, Some(4), ScaleDtype::F32);
        let p = g.permute_rows(&[2, 0, 1]);
        assert_eq!(p.values()[..8], g.values()[16..24]);
        assert_eq!(p.scales[..2], g.scales[4..6]);
    }
}
