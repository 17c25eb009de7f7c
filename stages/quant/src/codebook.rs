//! Code books for block-wise quantization: values in [-1, 1], sorted ascending.

use serde::{Deserialize, Serialize};

pub use crate::tables::{DYNAMIC8_CODE, NF2_CODE, NF3_CODE};
use crate::QuantError;

/// bitsandbytes' NF4 table (QLoRA's NormalFloat4), as in its source.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The offset of the NormalFloat construction (QLoRA / bitsandbytes / LoftQ).
pub const NF_OFFSET: f64 = 0.9677083;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CodeBook {
    /// bitsandbytes' NF4 table ([`NF4_CODE`]).
    Nf4,
    /// NormalFloat3 ([`NF3_CODE`], the reference table of the normal-quantile construction).
    Nf3,
    /// NormalFloat2 ([`NF2_CODE`], the reference table of the normal-quantile construction).
    Nf2,
    /// Symmetric uniform k-bit: i / qmax for i in -qmax..=qmax, qmax = 2^(k-1) - 1.
    Int(u32),
}

impl CodeBook {
    pub fn bits(&self) -> u32 {
        match self {
            CodeBook::Nf4 => 4,
            CodeBook::Nf3 => 3,
            CodeBook::Nf2 => 2,
            CodeBook::Int(k) => *k,
        }
    }

    pub fn validate(&self) -> Result<(), QuantError> {
        match self {
            CodeBook::Int(k) if !(2..=8).contains(k) => Err(QuantError::invalid(
                "codebook int bits",
                k,
                "2 to 8 (int-k code books)",
            )),
            _ => Ok(()),
        }
    }

    /// The code values, sorted ascending. Call [`CodeBook::validate`] first for `Int(k)`.
    pub fn values(&self) -> Vec<f32> {
        match self {
            CodeBook::Nf4 => NF4_CODE.to_vec(),
            CodeBook::Nf3 => NF3_CODE.to_vec(),
            CodeBook::Nf2 => NF2_CODE.to_vec(),
            CodeBook::Int(k) => {
                let qmax = (1i32 << (k.clamp(&2, &8) - 1)) - 1;
                (-qmax..=qmax).map(|i| i as f32 / qmax as f32).collect()
            }
        }
    }
}

/// NormalFloat-k code book (`create_normal_map` of bitsandbytes / LoftQ, asymmetric):
/// 2^(k-1) positive levels from normal quantiles of `linspace(offset, 0.5, 2^(k-1) + 1)`,
/// 2^(k-1) - 1 negative ones from `linspace(offset, 0.5, 2^(k-1))`, and zero, normalised by
/// the maximum. The linspace runs in f32 as torch's does, the quantiles in f64 as scipy's.
///
/// This reproduces the reference tables to within 1e-6 but not bit for bit (the reference
/// float rounding path is unknown), so the code books use the stored tables ([`NF2_CODE`],
/// [`NF3_CODE`], [`NF4_CODE`]); this is for other bit widths and for documentation.
pub fn normal_map(bits: u32) -> Vec<f32> {
    let half = 1usize << (bits.max(2) - 1);
    let offset = NF_OFFSET as f32;
    let mut v: Vec<f32> = Vec::with_capacity(2 * half);
    for p in &linspace_f32(offset, 0.5, half + 1)[..half] {
        v.push(norm_ppf(*p as f64) as f32);
    }
    v.push(0.0);
    for p in &linspace_f32(offset, 0.5, half)[..half - 1] {
        v.push(-norm_ppf(*p as f64) as f32);
    }
    v.sort_by(f32::total_cmp);
    let max = v.iter().fold(f32::MIN, |m, x| m.max(*x));
    v.iter().map(|x| x / max).collect()
}

/// bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map(signed=True)`), used for
/// double quantization: the stored table, bit-identical to bitsandbytes'.
pub fn dynamic8() -> Vec<f32> {
    DYNAMIC8_CODE.to_vec()
}

/// The construction behind [`dynamic8`]: for exponent i in 0..7, the midpoints of
/// `linspace(0.1, 1, 2^i + 1)` scaled by 10^(i - 6), with both signs, plus 0 and 1. Within
/// 1e-7 of the table but not bit-identical for some values (f32 rounding order), so the
/// table is what quantization uses.
pub fn dynamic8_construction() -> Vec<f32> {
    // 10 ** (i - 6) as Python evaluates it (a correctly rounded double).
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = Vec::with_capacity(256);
    for (i, scale) in SCALES.iter().enumerate() {
        let b = linspace_f32(0.1, 1.0, (1 << i) + 1);
        let scale = *scale as f32;
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data
}

/// torch.linspace on CPU in float32: the first half counts up from `start`, the second
/// half down from `end`.
pub(crate) fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// Inverse of the standard normal CDF for p in [0.5, 1), to about 1e-15 relative: Newton
/// steps on Phi(x) - p with an erf series that has no cancellation.
pub(crate) fn norm_ppf(p: f64) -> f64 {
    if p <= 0.5 {
        return 0.0;
    }
    // Phi(x) - p = erf(x / sqrt 2) / 2 - (p - 1/2); p - 1/2 is exact.
    let target = p - 0.5;
    let mut x = 0.0f64;
    for _ in 0..100 {
        let g = 0.5 * erf_series(x / std::f64::consts::SQRT_2) - target;
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let dx = g / pdf;
        x -= dx;
        if dx.abs() <= 1e-17 * x.abs() {
            break;
        }
    }
    x
}

/// erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (1 3 5 ... (2n+1)): all terms
/// positive for x >= 0, accurate for the moderate x used here (x < 3).
fn erf_series(x: f64) -> f64 {
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0f64;
    while term > 1e-18 * sum {
        n += 1.0;
        term *= 2.0 * x2 / (2.0 * n + 1.0);
        sum += term;
    }
    2.0 / std::f64::consts::PI.sqrt() * (-x2).exp() * sum
}
