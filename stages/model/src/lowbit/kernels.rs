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
    let (ac, bc) = (
        a[..n].chunks_exact(F32_LANES),
        b[..n].chunks_exact(F32_LANES),
    );
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

#[inline(always)]
fn scale_i8_lanes(src: &[i8], scale: f32, dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s as f32 * scale;
    }
}

/// Σ (nibble - 8) · x over whole blocks of 32 codes: 16 bytes per block, byte j holding
/// code j (low nibble) and code j + 16 (high), so both halves unpack as contiguous lanes.
#[inline(always)]
fn q4_dot_f32_lanes(codes: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; F32_LANES];
    for (b, xb) in codes.chunks_exact(16).zip(x.chunks_exact(32)) {
        for j in 0..16 {
            acc[j] += ((b[j] & 0x0f) as f32 - 8.0) * xb[j];
        }
        for j in 0..16 {
            acc[j] += ((b[j] >> 4) as f32 - 8.0) * xb[16 + j];
        }
    }
    let mut w = F32_LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] += acc[j + w];
        }
    }
    acc[0]
}

/// Σ nibble · q over whole blocks of 32 codes (layout as `q4_dot_f32`), exactly: the caller
/// subtracts 8 · Σ q to get Σ code · q.
#[inline(always)]
fn q4_dot_i8_lanes(codes: &[u8], q: &[i8]) -> i32 {
    let mut acc = [0i32; 16];
    for (b, qb) in codes.chunks_exact(16).zip(q.chunks_exact(32)) {
        for j in 0..16 {
            acc[j] += (b[j] & 0x0f) as i32 * qb[j] as i32 + (b[j] >> 4) as i32 * qb[16 + j] as i32;
        }
    }
    acc.iter().sum()
}

/// Packs codes in -8..=7 into blocks of 32 (16 bytes each, see `q4_dot_f32`); a last partial
/// block is padded with code 0.
pub fn pack_q4_blocks(codes: &[i8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(codes.len().div_ceil(32) * 16);
    for blk in codes.chunks(32) {
        let c = |i: usize| (blk.get(i).copied().unwrap_or(0) + 8) as u8 & 0x0f;
        out.extend((0..16).map(|j| c(j) | (c(j + 16) << 4)));
    }
    out
}

/// The codes of `pack_q4_blocks`, the first `dst.len()` of them.
pub fn unpack_q4_blocks(src: &[u8], dst: &mut [i8]) {
    for (b, d) in src.chunks_exact(16).zip(dst.chunks_mut(32)) {
        for (i, o) in d.iter_mut().enumerate() {
            let nib = if i < 16 { b[i] & 0x0f } else { b[i - 16] >> 4 };
            *o = nib as i8 - 8;
        }
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
/// Σ code · x of 4-bit blocks (`pack_q4_blocks`) against f32 values: the W4 product with
/// float activations. Explicit AVX-512 / AVX2 code with the portable loop's 16 lanes, its
/// separate multiply and add (no FMA) and its reduction tree, so every path gives the same
/// bits.
pub fn q4_dot_f32(codes: &[u8], x: &[f32]) -> f32 {
    assert!(
        codes.len() * 2 == x.len() && codes.len().is_multiple_of(16),
        "q4_dot_f32: blocks do not fit"
    );
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY: features checked by `isa()`; the loads stay inside the slices (checked above).
        Isa::Avx512 => return unsafe { x86::q4_dot_f32_avx512(codes, x) },
        Isa::Avx2 => return unsafe { x86::q4_dot_f32_avx2(codes, x) },
        Isa::Base => {}
    }
    q4_dot_f32_lanes(codes, x)
}

/// The portable reduction of 16 lanes, shared by the vector paths.
fn reduce16(mut acc: [f32; F32_LANES]) -> f32 {
    let mut w = F32_LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] += acc[j + w];
        }
    }
    acc[0]
}
/// Σ (code + 8) · q of 4-bit blocks against int8 codes, exactly: the hot loop of a W4A8
/// student's decoding. `out[r][b]` is that sum for weight row `rows[r]` (`len` code bytes)
/// and the token whose codes are `q[b * stride..][..2 * len]`, for two rows and the
/// `out[r].len()` tokens.
/// The vector path works in tiles of 2 rows x 4 tokens: each row's nibbles are unpacked
/// once per 4 tokens and each token's codes read once per 2 rows. The sums are exact, so
/// they equal the single dots whatever the tiling.
pub fn q4_dot_i8_rows(rows: [&[u8]; 2], q: &[i8], stride: usize, out: [&mut [i32]; 2]) {
    let (len, n) = (rows[0].len(), out[0].len());
    assert!(
        len.is_multiple_of(16)
            && rows[1].len() == len
            && out[1].len() == n
            && (n == 0 || (n - 1) * stride + 2 * len <= q.len()),
        "q4_dot_i8_rows: blocks do not fit"
    );
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Base {
        // SAFETY: AVX2 is part of both vector instruction sets `isa()` returns, checked at
        // run time; every load stays inside the slices (lengths checked above).
        return unsafe { x86::q4_dot_i8_rows_avx2(rows, q, stride, out) };
    }
    let [o0, o1] = out;
    for (b, (y0, y1)) in o0.iter_mut().zip(o1.iter_mut()).enumerate() {
        let x = &q[b * stride..b * stride + 2 * len];
        *y0 = q4_dot_i8_lanes(rows[0], x);
        *y1 = q4_dot_i8_lanes(rows[1], x);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The four i32 sums of four registers of 8 lanes each.
    #[inline(always)]
    unsafe fn sum4(a: [__m256i; 4]) -> [i32; 4] {
        // Within each 128-bit half: [a0, a1, a2, a3] partial sums, then both halves added.
        let s = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
        let r = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let mut out = [0i32; 4];
        _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, r);
        out
    }

    /// Two rows' 4-bit codes against T tokens' int8 codes: the i32 sums of each pair.
    #[inline(always)]
    unsafe fn tile<const T: usize>(
        c: [*const u8; 2],
        x: [*const i8; T],
        blocks: usize,
    ) -> [[__m256i; T]; 2] {
        let ones = _mm256_set1_epi16(1);
        let m = _mm_set1_epi8(0x0f);
        let unpack = |c: *const u8| {
            let b = _mm_loadu_si128(c as *const __m128i);
            _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m))
        };
        let mut acc = [[_mm256_setzero_si256(); T]; 2];
        // Two blocks at a time: u <= 15 and |x| <= 128, so each pair sum of `maddubs` is at
        // most 3840 in size and two of them add in i16 without overflow; one widening
        // `madd` per two blocks.
        let mut k = 0;
        while k + 2 <= blocks {
            let u = [unpack(c[0].add(16 * k)), unpack(c[1].add(16 * k))];
            let v = [unpack(c[0].add(16 * k + 16)), unpack(c[1].add(16 * k + 16))];
            for t in 0..T {
                let x0 = _mm256_loadu_si256(x[t].add(32 * k) as *const __m256i);
                let x1 = _mm256_loadu_si256(x[t].add(32 * k + 32) as *const __m256i);
                for r in 0..2 {
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(u[r], x0),
                        _mm256_maddubs_epi16(v[r], x1),
                    );
                    acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(p, ones));
                }
            }
            k += 2;
        }
        if k < blocks {
            let u = [unpack(c[0].add(16 * k)), unpack(c[1].add(16 * k))];
            for t in 0..T {
                let x = _mm256_loadu_si256(x[t].add(32 * k) as *const __m256i);
                for r in 0..2 {
                    acc[r][t] = _mm256_add_epi32(
                        acc[r][t],
                        _mm256_madd_epi16(_mm256_maddubs_epi16(u[r], x), ones),
                    );
                }
            }
        }
        acc
    }

    /// The sum of one register's 8 lanes.
    #[inline(always)]
    unsafe fn sum8(a: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q4_dot_i8_rows_avx2(
        rows: [&[u8]; 2],
        q: &[i8],
        stride: usize,
        out: [&mut [i32]; 2],
    ) {
        let (blocks, n) = (rows[0].len() / 16, out[0].len());
        let c = [rows[0].as_ptr(), rows[1].as_ptr()];
        let x = |b: usize| q.as_ptr().add(b * stride);
        let [o0, o1] = out;
        let mut b = 0;
        while b + 4 <= n {
            let acc = tile::<4>(c, [x(b), x(b + 1), x(b + 2), x(b + 3)], blocks);
            let s0 = sum4(acc[0]);
            let s1 = sum4(acc[1]);
            o0[b..b + 4].copy_from_slice(&s0);
            o1[b..b + 4].copy_from_slice(&s1);
            b += 4;
        }
        while b < n {
            let acc = tile::<1>(c, [x(b)], blocks);
            o0[b] = sum8(acc[0][0]);
            o1[b] = sum8(acc[1][0]);
            b += 1;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub unsafe fn q4_dot_f32_avx512(codes: &[u8], x: &[f32]) -> f32 {
        let m = _mm_set1_epi8(0x0f);
        let eight = _mm512_set1_ps(8.0);
        let mut acc = _mm512_setzero_ps();
        for k in 0..codes.len() / 16 {
            let b = _mm_loadu_si128(codes.as_ptr().add(16 * k) as *const __m128i);
            let f = |v: __m128i| _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)), eight);
            let lo = f(_mm_and_si128(b, m));
            let hi = f(_mm_and_si128(_mm_srli_epi16(b, 4), m));
            let xp = x.as_ptr().add(32 * k);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(lo, _mm512_loadu_ps(xp)));
            acc = _mm512_add_ps(acc, _mm512_mul_ps(hi, _mm512_loadu_ps(xp.add(16))));
        }
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
        super::reduce16(lanes)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q4_dot_f32_avx2(codes: &[u8], x: &[f32]) -> f32 {
        let m = _mm_set1_epi8(0x0f);
        let eight = _mm256_set1_ps(8.0);
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for k in 0..codes.len() / 16 {
            let f = |v: __m128i| _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), eight);
            let b = _mm_loadu_si128(codes.as_ptr().add(16 * k) as *const __m128i);
            let lo = _mm_and_si128(b, m);
            let hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
            let xp = x.as_ptr().add(32 * k);
            // Lanes 0..8 and 8..16 of the 16: codes j (low nibbles), then j + 16 (high).
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(f(lo), _mm256_loadu_ps(xp)));
            a1 = _mm256_add_ps(
                a1,
                _mm256_mul_ps(f(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xp.add(8))),
            );
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(f(hi), _mm256_loadu_ps(xp.add(16))));
            a1 = _mm256_add_ps(
                a1,
                _mm256_mul_ps(f(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xp.add(24))),
            );
        }
        let mut lanes = [0f32; 16];
        _mm256_storeu_ps(lanes.as_mut_ptr(), a0);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), a1);
        super::reduce16(lanes)
    }
}

multiversion! {
    /// `dst[i] = src[i] * scale` (the dequantized value, exactly as the fake quantizer's).
    pub fn scale_i8(src: &[i8], scale: f32, dst: &mut [f32]) => scale_i8_lanes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
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
    fn two_rows_of_tokens_equal_their_single_dots() {
        for blocks in [1, 2, 5, 18] {
            let row = |s: usize| -> Vec<u8> {
                (0..16 * blocks)
                    .map(|i| (i * 37 + 11 + s * 101) as u8)
                    .collect()
            };
            let rows = [row(0), row(1)];
            for n in [0, 1, 3, 4, 7, 9] {
                // Tokens every `stride` bytes, with junk between them.
                let stride = 32 * blocks + 5;
                let mut q: Vec<i8> = (0..n * stride).map(|i| (i * 53 + 7) as i8).collect();
                if n > 2 {
                    q[2 * stride] = -128;
                    q[stride..stride + 32].iter_mut().for_each(|v| *v = 127);
                }
                let (mut y0, mut y1) = (vec![0; n], vec![0; n]);
                q4_dot_i8_rows([&rows[0], &rows[1]], &q, stride, [&mut y0, &mut y1]);
                for (b, (g0, g1)) in y0.iter().zip(&y1).enumerate() {
                    let x = &q[b * stride..b * stride + 32 * blocks];
                    assert_eq!(*g0, q4_dot_i8_lanes(&rows[0], x), "{blocks} blocks, n {n}");
                    assert_eq!(*g1, q4_dot_i8_lanes(&rows[1], x), "{blocks} blocks, n {n}");
                }
            }
        }
    }

    #[test]
    fn blocked_nibbles_dot_exactly_as_their_codes() {
        let mut s = 11;
        let codes: Vec<i8> = (0..70).map(|i| ((i * 7 + 3) % 16) as i8 - 8).collect();
        let packed = pack_q4_blocks(&codes);
        assert_eq!(packed.len(), 3 * 16);
        let mut back = vec![0i8; codes.len()];
        unpack_q4_blocks(&packed, &mut back);
        assert_eq!(back, codes);
        let mut x: Vec<f32> = (0..96).map(|_| lcg(&mut s)).collect();
        x[70..].iter_mut().for_each(|v| *v = 0.0);
        let q: Vec<i8> = x.iter().map(|v| (v * 250.0) as i8).collect();
        let exact: i32 = codes
            .iter()
            .zip(&q)
            .map(|(c, q)| *c as i32 * *q as i32)
            .sum();
        let qsum: i32 = q.iter().map(|&v| v as i32).sum();
        let (mut y0, mut y1) = ([0], [0]);
        q4_dot_i8_rows([&packed, &packed], &q, 0, [&mut y0, &mut y1]);
        assert_eq!(y0[0] - 8 * qsum, exact);
        assert_eq!(y1[0], q4_dot_i8_lanes(&packed, &q));
        #[cfg(target_arch = "x86_64")]
        for blocks in [1, 2, 3, 8] {
            let c: Vec<u8> = (0..16 * blocks).map(|i| (i * 37 + 11) as u8).collect();
            let xf: Vec<f32> = (0..32 * blocks)
                .map(|i| ((i * 29 + 3) % 61) as f32 * 0.173 - 5.1)
                .collect();
            let wantf = q4_dot_f32_lanes(&c, &xf).to_bits();
            if is_x86_feature_detected!("avx2") {
                let got = unsafe { x86::q4_dot_f32_avx2(&c, &xf) };
                assert_eq!(got.to_bits(), wantf, "avx2 f32, {blocks} blocks");
            }
            if detect() == Isa::Avx512 {
                let got = unsafe { x86::q4_dot_f32_avx512(&c, &xf) };
                assert_eq!(got.to_bits(), wantf, "avx512 f32, {blocks} blocks");
            }
        }
        let f = q4_dot_f32(&packed, &x);
        assert_eq!(f.to_bits(), q4_dot_f32_lanes(&packed, &x).to_bits());
        let want: f64 = codes
            .iter()
            .zip(&x)
            .map(|(c, v)| *c as f64 * *v as f64)
            .sum();
        assert!((f as f64 - want).abs() < 1e-4, "{f} vs {want}");
    }
}
