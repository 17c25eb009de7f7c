//! The block kernel with AVX2 (and FMA, F16C) for code books of at most 16 codes (NF4, NF3,
//! NF2, int2 to int4), for CPUs without AVX-512. Values go 8 to a vector in their own
//! order; bf16 and f16 inputs are widened in registers (exactly), so no f32 copy of the
//! tensor is made.
//!
//! The code search: the library's code is the number of midpoints below x / absmax (its
//! partition point). With the 15 midpoints padded to 16 with +inf (which no value is
//! below), a binary search of four comparisons finds that count, each comparison the
//! library's own (`m < n`, false for NaN): ties and NaN come out the same. Each step's
//! midpoints sit in one register and are picked per lane by the prefix found so far.

use super::BlockSums;
use super::Values;
use std::arch::x86_64::*;

/// Whether this CPU can run the kernel.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// A code book as the kernel reads it.
#[derive(Clone)]
pub(super) struct Tables {
    /// The code values (0 past the last).
    code: [f32; 16],
    /// The midpoints each step of the search compares with, by the prefix j found so far:
    /// step 1 mids[7]; step 2 mids[3 + 8j]; step 3 mids[1 + 4j]; step 4 mids[2j] (padded
    /// with +inf).
    step: [[f32; 8]; 4],
    bits: usize,
}

impl Tables {
    /// None where the kernel does not apply: more than 16 codes, a bit width it does not
    /// pack, or midpoints that are not sorted finite numbers.
    pub(super) fn new(code: &[f32], mids: &[f32], bits: usize) -> Option<Tables> {
        if code.len() > 16 || !matches!(bits, 2..=4) || !mids.is_sorted() {
            return None;
        }
        if mids.iter().any(|m| !m.is_finite()) {
            return None;
        }
        let mut m = [f32::INFINITY; 16];
        m[..mids.len()].copy_from_slice(mids);
        let mut c = [0f32; 16];
        c[..code.len()].copy_from_slice(code);
        let pick = |f: fn(usize) -> usize| std::array::from_fn(|j| m[f(j).min(15)]);
        Some(Tables {
            code: c,
            step: [
                pick(|_| 7),
                pick(|j| 3 + 8 * j),
                pick(|j| 1 + 4 * j),
                pick(|j| 2 * j),
            ],
            bits,
        })
    }
}

/// Quantizes the blocks of one task: `x` holds whole blocks except perhaps a short last
/// one, `out` their packed codes. Returns (sum of x^2, sum of r^2); `sums` gets each
/// block's (r c, c c) when `double_quant` (see `BlockSums`).
pub(super) fn run(
    t: &Tables,
    x: Values,
    block: usize,
    double_quant: bool,
    out: &mut [u8],
    amax: &mut [f32],
    sums: &mut [BlockSums],
) -> (f64, f64) {
    assert!(available(), "the AVX2 kernel needs AVX2, FMA and F16C");
    assert!(block.is_multiple_of(32));
    assert!(x.len().div_ceil(block) <= amax.len().min(sums.len()));
    assert!(out.len() >= (x.len() * t.bits).div_ceil(8));
    let (p, n) = match x {
        Values::F32(v) => (v.as_ptr().cast::<u8>(), v.len()),
        Values::Bf16(b) | Values::F16(b) => (b.as_ptr(), b.len() / 2),
    };
    let a = (t, p, n, block);
    // Safety: the CPU features are checked just above; every block's reads stay inside `x`
    // (a short tail is copied) and its writes inside `out` (the asserts above).
    unsafe {
        match (x, double_quant) {
            (Values::F32(_), false) => run_typed::<F32, false>(a, out, amax, sums),
            (Values::F32(_), true) => run_typed::<F32, true>(a, out, amax, sums),
            (Values::Bf16(_), false) => run_typed::<BF16, false>(a, out, amax, sums),
            (Values::Bf16(_), true) => run_typed::<BF16, true>(a, out, amax, sums),
            (Values::F16(_), false) => run_typed::<F16, false>(a, out, amax, sums),
            (Values::F16(_), true) => run_typed::<F16, true>(a, out, amax, sums),
        }
    }
}

/// The input's element type, a const parameter so each kernel is compiled for one.
const F32: u8 = 0;
const BF16: u8 = 1;
const F16: u8 = 2;

/// The tables in registers.
#[derive(Clone, Copy)]
struct Regs {
    code_lo: __m256,
    code_hi: __m256,
    step: [__m256; 4],
}

/// Running sums of x^2 and r^2 over blocks.
struct Totals {
    xx: __m256,
    rr: __m256,
}

/// Blocks summed in f32 lanes before the lanes go to f64.
const FLUSH_BLOCKS: usize = 16;

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_typed<const DT: u8, const DQ: bool>(
    (t, x, len, block): (&Tables, *const u8, usize, usize),
    out: &mut [u8],
    amax: &mut [f32],
    sums: &mut [BlockSums],
) -> (f64, f64) {
    let r = Regs {
        code_lo: _mm256_loadu_ps(t.code.as_ptr()),
        code_hi: _mm256_loadu_ps(t.code[8..].as_ptr()),
        step: t.step.map(|s| _mm256_loadu_ps(s.as_ptr())),
    };
    let size = if DT == F32 { 4 } else { 2 };
    let out_block = block * t.bits / 8;
    let zero = _mm256_setzero_ps();
    let mut tot = Totals { xx: zero, rr: zero };
    let (mut sxx, mut srr) = (0f64, 0f64);
    let mut start = 0;
    let mut b = 0;
    while start < len {
        let n = block.min(len - start);
        let out_b = out.as_mut_ptr().add(b * out_block);
        let (a, s) = quantize_block::<DT, DQ>(&r, x.add(start * size), n, t.bits, out_b, &mut tot);
        amax[b] = a;
        sums[b] = BlockSums { rc: s[0], cc: s[1] };
        start += n;
        b += 1;
        if b % FLUSH_BLOCKS == 0 || start >= len {
            sxx += sum_f64(tot.xx);
            srr += sum_f64(tot.rr);
            tot = Totals { xx: zero, rr: zero };
        }
    }
    (sxx, srr)
}

/// Values `i..i + 8` widened to f32 (all 8 must lie inside the input).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const DT: u8>(x: *const u8, i: usize) -> __m256 {
    match DT {
        F32 => _mm256_loadu_ps(x.cast::<f32>().add(i)),
        BF16 => {
            // A bf16 is the top half of an f32.
            let h = _mm_loadu_si128(x.add(2 * i).cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
        _ => _mm256_cvtph_ps(_mm_loadu_si128(x.add(2 * i).cast())),
    }
}

/// 32 values from `i` widened to f32: four vectors; past `len` they read as 0 (a short
/// last chunk is copied to a zeroed buffer first, so no read leaves the input).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32<const DT: u8>(x: *const u8, i: usize, len: usize) -> [__m256; 4] {
    if i + 32 <= len {
        return std::array::from_fn(|v| load8::<DT>(x, i + 8 * v));
    }
    let size = if DT == F32 { 4 } else { 2 };
    let mut buf = [0u8; 128];
    std::ptr::copy_nonoverlapping(x.add(i * size), buf.as_mut_ptr(), (len - i) * size);
    std::array::from_fn(|v| load8::<DT>(buf.as_ptr(), 8 * v))
}

/// One block of `len` (1..=4096) values: its codes packed at `out`, its x^2 and r^2 added
/// to `tot`. Returns the absmax and, with `DQ`, the block's (r c, c c) sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block<const DT: u8, const DQ: bool>(
    r: &Regs,
    x: *const u8,
    len: usize,
    bits: usize,
    out: *mut u8,
    tot: &mut Totals,
) -> (f32, [f32; 2]) {
    // max |x|: vmaxps returns its second operand when either is NaN, so a NaN value leaves
    // the running maximum as it is, as f32::max does in the library's fold.
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let zero = _mm256_setzero_ps();
    let mut m = [zero; 4];
    let mut i = 0;
    while i < len {
        let xs = load32::<DT>(x, i, len);
        for v in 0..4 {
            m[v] = _mm256_max_ps(_mm256_and_ps(xs[v], abs), m[v]);
        }
        i += 32;
    }
    let amax_s = max_all(_mm256_max_ps(
        _mm256_max_ps(m[0], m[1]),
        _mm256_max_ps(m[2], m[3]),
    ));
    let mut acc = Sums { rc: zero, cc: zero };
    let mut i = 0;
    while i + 32 <= len {
        let xs = load32::<DT>(x, i, len);
        chunk::<DQ, false>(
            r,
            xs,
            amax_s,
            32,
            bits,
            out.add(i * bits / 8),
            tot,
            &mut acc,
        );
        i += 32;
    }
    if i < len {
        let xs = load32::<DT>(x, i, len);
        chunk::<DQ, true>(
            r,
            xs,
            amax_s,
            len - i,
            bits,
            out.add(i * bits / 8),
            tot,
            &mut acc,
        );
    }
    let (rc, cc) = (acc.rc, acc.cc);
    let s = if DQ { [sum8(rc), sum8(cc)] } else { [0.0; 2] };
    (amax_s, s)
}

/// A block's running (r c, c c) sums.
struct Sums {
    rc: __m256,
    cc: __m256,
}

/// 32 values of a block (`rem` of them real, fewer only with `TAIL`): their codes packed at
/// `out`, their sums added.
#[allow(clippy::too_many_arguments)] // the hot path: plain arguments, nothing to unpack
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunk<const DQ: bool, const TAIL: bool>(
    r: &Regs,
    xs: [__m256; 4],
    amax_s: f32,
    rem: usize,
    bits: usize,
    out: *mut u8,
    tot: &mut Totals,
    acc: &mut Sums,
) {
    let amax = _mm256_set1_ps(amax_s);
    let mut k = [_mm256_setzero_si256(); 4];
    for v in 0..4 {
        // Division, not a reciprocal, as the library and bitsandbytes do; an all-zero block
        // (absmax 0) has its values count as 0 (the library's rule).
        let n = if amax_s == 0.0 {
            _mm256_setzero_ps()
        } else {
            _mm256_div_ps(xs[v], amax)
        };
        let mut code = search(r, n);
        let mut cv = code_value(r, code);
        if TAIL {
            // Lanes past the end get code 0 and code value 0 (r = 0).
            let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem as i32 - 8 * v as i32), iota);
            code = _mm256_and_si256(code, valid);
            cv = _mm256_and_ps(cv, _mm256_castsi256_ps(valid));
        }
        k[v] = code;
        let res = _mm256_sub_ps(xs[v], _mm256_mul_ps(cv, amax));
        tot.xx = _mm256_fmadd_ps(xs[v], xs[v], tot.xx);
        tot.rr = _mm256_fmadd_ps(res, res, tot.rr);
        if DQ {
            acc.rc = _mm256_fmadd_ps(res, cv, acc.rc);
            acc.cc = _mm256_fmadd_ps(cv, cv, acc.cc);
        }
    }
    pack(k, bits, rem, out);
}

/// The number of midpoints below each lane of `n` (see the module doc): its four bits found
/// highest first, each step's prefix picking the midpoint of the next.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn search(r: &Regs, n: __m256) -> __m256i {
    // A comparison's mask is -1 where the midpoint is below: subtracting it appends a 1 bit.
    let below = |m: __m256| _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(m, n));
    let mut lo = _mm256_sub_epi32(_mm256_setzero_si256(), below(r.step[0]));
    for step in &r.step[1..] {
        let m = _mm256_permutevar8x32_ps(*step, lo);
        lo = _mm256_sub_epi32(_mm256_slli_epi32::<1>(lo), below(m));
    }
    lo
}

/// The code values of `code` (0..16) per lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn code_value(r: &Regs, code: __m256i) -> __m256 {
    // permutevar reads the low three bits; bit 3 (moved to the sign) picks the half.
    let lo = _mm256_permutevar8x32_ps(r.code_lo, code);
    let hi = _mm256_permutevar8x32_ps(r.code_hi, code);
    _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(code)))
}

/// Packs 32 codes (four vectors in order; unused lanes 0) MSB first into
/// `codes * bits / 8` bytes (rounded up: a last partial byte is padded with zeros) at `out`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack(k: [__m256i; 4], bits: usize, codes: usize, out: *mut u8) {
    let n = (codes * bits).div_ceil(8);
    // The 32 codes as bytes, in order: the packs interleave 128-bit lanes, the permutation
    // puts the four-byte groups back.
    let b = _mm256_packus_epi16(
        _mm256_packus_epi32(k[0], k[1]),
        _mm256_packus_epi32(k[2], k[3]),
    );
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    if bits == 4 {
        // Byte j: code 2j in the high nibble, 2j + 1 in the low one.
        let t = _mm256_or_si256(_mm256_slli_epi16::<4>(b), _mm256_srli_epi16::<8>(b));
        let t = _mm256_and_si256(t, _mm256_set1_epi16(0xff));
        let t = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi16(t, t));
        let bytes = _mm256_castsi256_si128(t);
        if n == 16 {
            _mm_storeu_si128(out.cast(), bytes);
        } else {
            let mut buf = [0u8; 16];
            _mm_storeu_si128(buf.as_mut_ptr().cast(), bytes);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), out, n);
        }
        return;
    }
    // 2 and 3 bits: the portable packer, on the codes as stored.
    let mut c = [0u8; 32];
    _mm256_storeu_si256(c.as_mut_ptr().cast(), b);
    let wide = c.map(u32::from);
    super::pack(&wide[..codes], std::slice::from_raw_parts_mut(out, n), bits);
}

/// The maximum of the lanes of `m` (no NaN).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn max_all(m: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
    _mm_cvtss_f32(m)
}

/// The lane sum of `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// The lane sum of `v` in f64.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sum_f64(v: __m256) -> f64 {
    let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
    let s = _mm256_add_pd(lo, hi);
    let s = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd::<1>(s));
    _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
}
