//! The block kernel with AVX-512 (F, BW, VL) for code books of at most 16 codes (NF4, NF3,
//! NF2, int2 to int4). Values go 32 at a time as two vectors, the even and the odd
//! elements (how bf16 pairs sit in 32-bit lanes), which makes widening bf16 two bit
//! operations and packing two codes to a byte one shift and one or. bf16 and f16 inputs
//! are widened in registers (exactly), so no f32 copy of the tensor is made.
//!
//! The code search: the library's code is the number of midpoints below x / absmax (its
//! partition point). A table indexed by a 1/15.5-wide cell of [-1, 1] gives the number of
//! midpoints below the cell, and the cells are narrower than any gap between midpoints
//! (checked when the table is built, with room for the rounding of the cell index), so at
//! most one midpoint is left to compare with, with the library's own comparison: ties and
//! NaN (a NaN falls in cell 0, whose count is 0, and compares false) come out the same.

use super::BlockSums;
use super::Values;
use std::arch::x86_64::*;

/// Whether this CPU can run the kernel.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

/// x / absmax in [-1, 1] maps to cell floor(n * CELL_SCALE + 16) in 0..=31.
const CELL_SCALE: f32 = 15.5;

/// A code book as the kernel reads it.
#[derive(Clone)]
pub(super) struct Tables {
    /// The code values, then the midpoints padded with +inf (which no value is below).
    code: [f32; 16],
    mids: [f32; 16],
    /// The number of midpoints below each cell (less a margin for rounding).
    below: [i32; 32],
    bits: usize,
}

impl Tables {
    /// None where the kernel does not apply: more than 16 codes, a bit width it does not
    /// pack, or midpoints closer than a cell.
    pub(super) fn new(code: &[f32], mids: &[f32], bits: usize) -> Option<Tables> {
        if code.len() > 16 || !matches!(bits, 2..=4) || !mids.is_sorted() {
            return None;
        }
        if mids.iter().any(|m| !m.is_finite()) {
            return None;
        }
        // fma(n, 15.5, 16) is within 2^-20 of the exact value, so n lies within 1e-7 of its
        // cell; the margin covers that many times over.
        let margin = 1e-5;
        let mut below = [0i32; 32];
        for (j, b) in below.iter_mut().enumerate() {
            let lo = (j as f64 - 16.0) / CELL_SCALE as f64 - margin;
            let hi = (j as f64 - 15.0) / CELL_SCALE as f64 + margin;
            let inside = mids
                .iter()
                .filter(|&&m| (m as f64) >= lo && (m as f64) < hi)
                .count();
            if inside > 1 {
                return None;
            }
            *b = mids.iter().filter(|&&m| (m as f64) < lo).count() as i32;
        }
        let mut c = [0f32; 16];
        c[..code.len()].copy_from_slice(code);
        let mut m = [f32::INFINITY; 16];
        m[..mids.len()].copy_from_slice(mids);
        Some(Tables {
            code: c,
            mids: m,
            below,
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
    assert!(available(), "the AVX-512 kernel needs AVX-512 F, BW and VL");
    assert!(block.is_multiple_of(32));
    assert!(x.len().div_ceil(block) <= amax.len().min(sums.len()));
    assert!(out.len() >= (x.len() * t.bits).div_ceil(8));
    let (p, n) = match x {
        Values::F32(v) => (v.as_ptr().cast::<u8>(), v.len()),
        Values::Bf16(b) | Values::F16(b) => (b.as_ptr(), b.len() / 2),
    };
    let a = (t, p, n, block);
    // Safety: the CPU features are checked just above; every block's reads stay inside `x`
    // (masked at its end) and its writes inside `out` (the asserts above).
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

/// The tables and constants in registers.
#[derive(Clone, Copy)]
struct Regs {
    code: __m512,
    mids: __m512,
    below_lo: __m512i,
    below_hi: __m512i,
    scale: __m512,
    offset: __m512,
    even: __m512i,
    odd: __m512i,
}

/// Running sums of x^2 and r^2 over blocks (two sets of lanes: two dependency chains).
struct Totals {
    xx: [__m512; 2],
    rr: [__m512; 2],
}

/// Blocks summed in f32 lanes before the lanes go to f64.
const FLUSH_BLOCKS: usize = 16;

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn run_typed<const DT: u8, const DQ: bool>(
    (t, x, len, block): (&Tables, *const u8, usize, usize),
    out: &mut [u8],
    amax: &mut [f32],
    sums: &mut [BlockSums],
) -> (f64, f64) {
    let r = Regs {
        code: _mm512_loadu_ps(t.code.as_ptr()),
        mids: _mm512_loadu_ps(t.mids.as_ptr()),
        below_lo: _mm512_loadu_si512(t.below.as_ptr().cast()),
        below_hi: _mm512_loadu_si512(t.below[16..].as_ptr().cast()),
        scale: _mm512_set1_ps(CELL_SCALE),
        offset: _mm512_set1_ps(16.0),
        even: _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
        odd: _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31),
    };
    let size = if DT == F32 { 4 } else { 2 };
    let out_block = block * t.bits / 8;
    let zero = _mm512_setzero_ps();
    let mut tot = Totals {
        xx: [zero; 2],
        rr: [zero; 2],
    };
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
            sxx += sum_f64(_mm512_add_ps(tot.xx[0], tot.xx[1]));
            srr += sum_f64(_mm512_add_ps(tot.rr[0], tot.rr[1]));
            tot = Totals {
                xx: [zero; 2],
                rr: [zero; 2],
            };
        }
    }
    (sxx, srr)
}

/// Values `i..i + 32` (fewer where `rem` < 32 are left; the rest read as 0), widened to
/// f32: the even elements, then the odd ones.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load_pair<const DT: u8>(r: &Regs, x: *const u8, i: usize, rem: usize) -> [__m512; 2] {
    if DT == F32 {
        let p = x.add(4 * i).cast::<f32>();
        let (a, b) = if rem >= 32 {
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
        } else {
            (
                _mm512_maskz_loadu_ps(low_bits16(rem), p),
                _mm512_maskz_loadu_ps(low_bits16(rem.saturating_sub(16)), p.add(16)),
            )
        };
        [
            _mm512_permutex2var_ps(a, r.even, b),
            _mm512_permutex2var_ps(a, r.odd, b),
        ]
    } else {
        let p = x.add(2 * i);
        let v = if rem >= 32 {
            _mm512_loadu_si512(p.cast())
        } else {
            _mm512_maskz_loadu_epi16(((1u64 << rem) - 1) as __mmask32, p.cast())
        };
        if DT == BF16 {
            // A bf16 is the top half of an f32.
            [
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536))),
            ]
        } else {
            [
                _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)),
                _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(v))),
            ]
        }
    }
}

/// The `n` (0..=16) lowest lanes.
#[inline(always)]
fn low_bits16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// One block of `len` (1..=4096) values: its codes packed at `out`, its x^2 and r^2 added
/// to `tot`. Returns the absmax and, with `DQ`, the block's (r c, c c) sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
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
    let zero = _mm512_setzero_ps();
    let (mut m0, mut m1) = (zero, zero);
    let mut i = 0;
    while i < len {
        let [e, o] = load_pair::<DT>(r, x, i, len - i);
        m0 = _mm512_max_ps(_mm512_abs_ps(e), m0);
        m1 = _mm512_max_ps(_mm512_abs_ps(o), m1);
        i += 32;
    }
    let amax = max_all(_mm512_max_ps(m0, m1));
    let amax_s = _mm512_cvtss_f32(amax);
    // An all-zero block (absmax 0) has its values count as 0 (the library's rule): the
    // masked division leaves them 0.
    let nonzero: __mmask16 = if amax_s == 0.0 { 0 } else { 0xFFFF };
    let (mut rc, mut cc) = ([zero; 2], [zero; 2]);
    let mut i = 0;
    while i < len {
        let rem = len - i;
        let xs = load_pair::<DT>(r, x, i, rem);
        // Lanes past the end get code 0 and code value 0 (r = 0).
        let valid = if rem >= 32 {
            [0xFFFF, 0xFFFF]
        } else {
            [low_bits16(rem.div_ceil(2)), low_bits16(rem / 2)]
        };
        let mut k = [_mm512_setzero_si512(); 2];
        for h in 0..2 {
            // Division, not a reciprocal, as the library and bitsandbytes do.
            let n = _mm512_maskz_div_ps(nonzero, xs[h], amax);
            k[h] = _mm512_maskz_mov_epi32(valid[h], search(r, n).0);
            let cv = _mm512_maskz_permutexvar_ps(valid[h], k[h], r.code);
            let res = _mm512_sub_ps(xs[h], _mm512_mul_ps(cv, amax));
            tot.xx[h] = _mm512_fmadd_ps(xs[h], xs[h], tot.xx[h]);
            tot.rr[h] = _mm512_fmadd_ps(res, res, tot.rr[h]);
            if DQ {
                rc[h] = _mm512_fmadd_ps(res, cv, rc[h]);
                cc[h] = _mm512_fmadd_ps(cv, cv, cc[h]);
            }
        }
        pack(k, bits, rem.min(32), out.add(i * bits / 8));
        i += 32;
    }
    let s = if DQ {
        sum2(_mm512_add_ps(rc[0], rc[1]), _mm512_add_ps(cc[0], cc[1]))
    } else {
        [0.0; 2]
    };
    (amax_s, s)
}

/// The number of midpoints below each lane of `n` (see the module doc), and the midpoint
/// each lane was compared with.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn search(r: &Regs, n: __m512) -> (__m512i, __m512) {
    // Truncation is floor here (the cell is in [0.5, 31.5]); NaN becomes 0x80000000,
    // whose low five bits, all the lookup reads, are cell 0.
    let cell = _mm512_cvttps_epi32(_mm512_fmadd_ps(n, r.scale, r.offset));
    let below = _mm512_permutex2var_epi32(r.below_lo, cell, r.below_hi);
    let next = _mm512_permutexvar_ps(below, r.mids);
    let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(next, n);
    (
        _mm512_mask_add_epi32(below, lt, below, _mm512_set1_epi32(1)),
        next,
    )
}

/// Packs 32 codes (even elements, then odd ones; unused lanes 0) MSB first into
/// `codes * bits / 8` bytes (rounded up: a last partial byte is padded with zeros) at `out`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack(k: [__m512i; 2], bits: usize, codes: usize, out: *mut u8) {
    let n = (codes * bits).div_ceil(8);
    let mask = (((1u64 << n) - 1) as u32) as __mmask16;
    match bits {
        4 => {
            // Byte j: element 2j in the high nibble, 2j + 1 in the low one.
            let b = _mm512_or_si512(_mm512_slli_epi32::<4>(k[0]), k[1]);
            _mm_mask_storeu_epi8(out.cast(), mask, _mm512_cvtepi32_epi8(b));
        }
        2 => {
            // Nibbles of two codes, then two nibbles to a byte.
            let t = _mm512_or_si512(_mm512_slli_epi32::<2>(k[0]), k[1]);
            let b = _mm512_or_si512(_mm512_slli_epi64::<4>(t), _mm512_srli_epi64::<32>(t));
            _mm_mask_storeu_epi8(out.cast(), mask, _mm512_cvtepi64_epi8(b));
        }
        _ => {
            // 3 bits: six bits of two codes per lane, four lanes to three bytes.
            let t = _mm512_or_si512(_mm512_slli_epi32::<3>(k[0]), k[1]);
            let mut six = [0u8; 16];
            _mm_storeu_si128(six.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(t));
            let out = std::slice::from_raw_parts_mut(out, n);
            for (o, s) in out.chunks_mut(3).zip(six.chunks_exact(4)) {
                let w = s.iter().fold(0u32, |w, &c| (w << 6) | c as u32);
                o.copy_from_slice(&w.to_be_bytes()[1..1 + o.len()]);
            }
        }
    }
}

/// The maximum of the lanes of `m` (no NaN), in every lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn max_all(m: __m512) -> __m512 {
    let m = _mm512_max_ps(m, _mm512_shuffle_f32x4::<0b01_00_11_10>(m, m));
    let m = _mm512_max_ps(m, _mm512_shuffle_f32x4::<0b10_11_00_01>(m, m));
    let m = _mm512_max_ps(m, _mm512_permute_ps::<0b01_00_11_10>(m));
    _mm512_max_ps(m, _mm512_permute_ps::<0b10_11_00_01>(m))
}

/// The lane sums of two vectors.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn sum2(a: __m512, b: __m512) -> [f32; 2] {
    // Halves added: [a (8 lanes), b (8 lanes)], then within each half.
    let s = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
        _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
    );
    let s = _mm512_add_ps(s, _mm512_shuffle_f32x4::<0b10_11_00_01>(s, s));
    let s = _mm512_add_ps(s, _mm512_permute_ps::<0b01_00_11_10>(s));
    let s = _mm512_add_ps(s, _mm512_permute_ps::<0b10_11_00_01>(s));
    [
        _mm512_cvtss_f32(s),
        _mm512_cvtss_f32(_mm512_shuffle_f32x4::<0b00_00_00_10>(s, s)),
    ]
}

/// The lane sum of `v` in f64.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn sum_f64(v: __m512) -> f64 {
    let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
        _mm512_castps_pd(v),
    )));
    _mm512_reduce_add_pd(_mm512_add_pd(lo, hi))
}
