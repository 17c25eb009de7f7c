//! The inner loops of the low-bit decoder: f32 and int8 dot products and nibble unpacking.
//!
//! Each is plain Rust with a fixed number of independent lanes, compiled three times (the
//! portable baseline, AVX2 + FMA, AVX-512 with BW and VNNI) and chosen once per process by
//! run-time feature detection (`PIPELINE_ISA=base|avx2|avx512` forces one, for tests and
//! benchmarks). The lanes make the summation order part of the source, so every build gives
//! the same f32 result bit for bit; integer dots are exact anyway.

use std::sync::OnceLock;

/// Lanes of the f32 dot: two AVX2 registers, one AVX-512 register.
const F32_LANES: usize = 16;
/// Lanes of the int8 dot (i32 accumulators).
const I8_LANES: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Base,
    Avx2,
    Avx512,
}

impl Isa {
    pub fn name(&self) -> &'static str {
        match self {
            Isa::Base => "base",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// The instruction set the kernels use in this process.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detect();
        match std::env::var("PIPELINE_ISA").as_deref() {
            Ok("base") => Isa::Base,
            Ok("avx2") if best != Isa::Base => Isa::Avx2,
            _ => best,
        }
    })
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("fma")
        {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Base
}

#[inline(always)]
fn dot_f32_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0f32; F32_LANES];
    let (ac, bc) = (a[..n].chunks_exact(F32_LANES), b[..n].chunks_exact(F32_LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for j in 0..F32_LANES {
            acc[j] += x[j] * y[j];
        }
    }
    for (j, (x, y)) in ar.iter().zip(br).enumerate() {
        acc[j] += x * y;
    }
    // A fixed pairwise tree.
    let mut w = F32_LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] += acc[j + w];
        }
    }
    acc[0]
}

#[inline(always)]
fn dot_i8_lanes(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let mut acc = [0i32; I8_LANES];
    let (ac, bc) = (a[..n].chunks_exact(I8_LANES), b[..n].chunks_exact(I8_LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for j in 0..I8_LANES {
            acc[j] += x[j] as i32 * y[j] as i32;
        }
    }
    for (j, (x, y)) in ar.iter().zip(br).enumerate() {
        acc[j] += *x as i32 * *y as i32;
    }
    acc.iter().sum()
}

/// `dst[i] = nibble i of src - 8`: two codes per byte, the even index in the low nibble.
#[inline(always)]
fn unpack_i4_lanes(src: &[u8], dst: &mut [i8]) {
    for (pair, &byte) in dst.chunks_mut(2).zip(src) {
        pair[0] = (byte & 0x0f) as i8 - 8;
        if pair.len() > 1 {
            pair[1] = (byte >> 4) as i8 - 8;
        }
    }
}

#[inline(always)]
fn scale_i8_lanes(src: &[i8], scale: f32, dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s as f32 * scale;
    }
}

macro_rules! multiversion {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $body:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match isa() {
                    // SAFETY: `isa()` returns these only when the CPU has the features.
                    Isa::Avx512 => return unsafe { wide($($arg),*) },
                    Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    Isa::Base => {}
                }
            }
            $body($($arg),*)
        }
    };
}

multiversion! {
    /// Σ a[i] b[i] in f32, the same bits on every instruction set.
    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 => dot_f32_lanes
}
multiversion! {
    /// Σ a[i] b[i] of int8 codes, exactly, in i32.
    pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 => dot_i8_lanes
}
multiversion! {
    /// Unpacks 4-bit codes stored as `code + 8`, two per byte (even index low).
    pub fn unpack_i4(src: &[u8], dst: &mut [i8]) => unpack_i4_lanes
}
multiversion! {
    /// `dst[i] = src[i] * scale` (the dequantized value, exactly as the fake quantizer's).
    pub fn scale_i8(src: &[i8], scale: f32, dst: &mut [f32]) => scale_i8_lanes
}

/// Packs codes in -8..=7 as `code + 8`, two per byte (even index low); odd lengths end with a
/// half-used byte.
pub fn pack_i4(codes: &[i8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|p| {
            let lo = (p[0] + 8) as u8 & 0x0f;
            let hi = p.get(1).map_or(0, |&c| ((c + 8) as u8 & 0x0f) << 4);
            lo | hi
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let mut s = 7;
        for n in [1, 7, 16, 33, 64, 577, 1536] {
            let a: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
            let ia: Vec<i8> = a.iter().map(|x| (x * 250.0) as i8).collect();
            let ib: Vec<i8> = b.iter().map(|x| (x * 250.0) as i8).collect();
            let base = dot_f32_lanes(&a, &b);
            assert_eq!(dot_f32(&a, &b).to_bits(), base.to_bits(), "n = {n}");
            let exact: i32 = ia.iter().zip(&ib).map(|(x, y)| *x as i32 * *y as i32).sum();
            assert_eq!(dot_i8(&ia, &ib), exact);
            let close: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((base as f64 - close).abs() < 1e-4, "{base} vs {close}");
        }
    }

    #[test]
    fn nibbles_round_trip() {
        let codes: Vec<i8> = (0..31).map(|i| (i % 16) as i8 - 8).collect();
        let mut back = vec![0i8; codes.len()];
        unpack_i4(&pack_i4(&codes), &mut back);
        assert_eq!(back, codes);
    }
}
