//! The streaming form of `quant::quantize_blockwise`: one pass over the input that finds each
//! block's absmax, picks the codes, packs them straight into the output bytes and gathers
//! the sums the reconstruction error needs, so nothing of the tensor's size is allocated
//! besides the packed output. The code choice is the library's (nearest code, a value on a
//! float32 midpoint goes to the lower code, x / absmax by division); the tests check
//! equality with the library, which matches bitsandbytes bit for bit. For code books of up
//! to 16 codes, [`avx512`] runs the blocks where the CPU has AVX-512 and [`avx2`] where it
//! has AVX2 only; the portable code below runs the others (and everything elsewhere).

use quant::{double_quantize, BlockScales, CodeBook};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// Blocks handed to one rayon task: large enough that scheduling costs nothing.
const BLOCKS_PER_TASK: usize = 256;

/// A tensor's values as stored: f32, or the little-endian bytes of f16 / bf16 values, which
/// the kernel widens (exactly) block by block instead of copying the tensor to f32 first.
#[derive(Clone, Copy)]
pub enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [u8]),
    Bf16(&'a [u8]),
}

impl<'a> Values<'a> {
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(b) | Values::Bf16(b) => b.len() / 2,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `start..end`.
    fn slice(&self, start: usize, end: usize) -> Values<'a> {
        match *self {
            Values::F32(v) => Values::F32(&v[start..end]),
            Values::F16(b) => Values::F16(&b[2 * start..2 * end]),
            Values::Bf16(b) => Values::Bf16(&b[2 * start..2 * end]),
        }
    }

    /// The values as f32 in `out` (of the same length).
    fn widen(&self, out: &mut [f32]) {
        match self {
            Values::F32(v) => out.copy_from_slice(v),
            Values::Bf16(b) => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            Values::F16(b) => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                }
            }
        }
    }
}

/// IEEE half to single precision (exact: every f16 is an f32).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match exp {
        // Zero or subnormal: man * 2^-24, exact in f32.
        0 => (man as f32 * (1.0 / 16_777_216.0)).to_bits() | sign,
        31 => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// A tensor quantized block-wise, codes already packed MSB first (pack_bits' layout).
pub struct PackedTensor {
    pub packed: Vec<u8>,
    pub scales: BlockScales,
    /// Relative Frobenius error ||W - dequant(Q)|| / ||W|| with the scales as stored.
    pub rel_error: f64,
}

/// Per-block sums for the error with double quantization: r = x - code * absmax (the f32
/// absmax), c = code. The sums of x^2 and r^2 only matter per tensor.
#[derive(Clone, Copy, Default)]
struct BlockSums {
    rc: f32,
    cc: f32,
}

/// Quantizes `x` in blocks of `block` values (a power of two of at least 32, so every whole
/// block fills whole bytes at any bit width).
pub fn quantize_pack(
    x: &[f32],
    block: usize,
    codebook: CodeBook,
    double_quant: bool,
) -> PackedTensor {
    quantize_values(Values::F32(x), block, codebook, double_quant)
}

/// [`quantize_pack`] for values as stored (f32, f16 or bf16).
pub fn quantize_values(
    x: Values,
    block: usize,
    codebook: CodeBook,
    double_quant: bool,
) -> PackedTensor {
    quantize_with(x, block, codebook, double_quant, Kernel::best())
}

/// Which implementation runs the blocks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    /// Plain Rust (vectorized by the compiler; recompiled for AVX2 where the CPU has it).
    Portable,
    /// Explicit AVX-512, for code books of at most 16 codes.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// Explicit AVX2 (with FMA and F16C), for code books of at most 16 codes.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            return Kernel::Avx512;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }
}

/// A vector kernel's tables, where one applies to the code book.
#[cfg(target_arch = "x86_64")]
enum Simd {
    Avx512(avx512::Tables),
    Avx2(avx2::Tables),
}

fn quantize_with(
    x: Values,
    block: usize,
    codebook: CodeBook,
    double_quant: bool,
    kernel: Kernel,
) -> PackedTensor {
    let bits = codebook.bits() as usize;
    let code = codebook.values();
    let uniform_qmax = match codebook {
        CodeBook::Int(k) => Some(((1u32 << (k - 1)) - 1) as f32),
        _ => None,
    };
    assert!(block <= MAX_BLOCK, "block size {block} above {MAX_BLOCK}");
    let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    debug_assert!(block >= 8 && (block * bits).is_multiple_of(8));
    #[cfg(target_arch = "x86_64")]
    let simd = match kernel {
        Kernel::Avx512 => avx512::Tables::new(&code, &mids, bits).map(Simd::Avx512),
        Kernel::Avx2 => avx2::Tables::new(&code, &mids, bits).map(Simd::Avx2),
        Kernel::Portable => None,
    };
    let n = x.len();
    let n_blocks = n.div_ceil(block);
    let mut packed = vec![0u8; (n * bits).div_ceil(8)];
    let mut absmax = vec![0f32; n_blocks];
    let mut sums = vec![BlockSums::default(); n_blocks];
    let task_vals = BLOCKS_PER_TASK * block;
    let task_bytes = task_vals * bits / 8;
    let task = Task {
        block,
        bits,
        code: &code,
        mids: &mids,
        uniform_qmax,
    };

    // Per-task sums added in task order, so the error does not depend on rayon's splits.
    let totals: Vec<(f64, f64)> = packed
        .par_chunks_mut(task_bytes)
        .zip(absmax.par_chunks_mut(BLOCKS_PER_TASK))
        .zip(sums.par_chunks_mut(BLOCKS_PER_TASK))
        .enumerate()
        .map(|(i, ((out, amax), sums))| {
            let x = x.slice(i * task_vals, n.min((i + 1) * task_vals));
            #[cfg(target_arch = "x86_64")]
            match &simd {
                Some(Simd::Avx512(t)) => {
                    return avx512::run(t, x, block, double_quant, out, amax, sums)
                }
                Some(Simd::Avx2(t)) => {
                    return avx2::run(t, x, block, double_quant, out, amax, sums)
                }
                None => {}
            }
            task.run_dispatch(out, x, amax, sums)
        })
        .collect();
    let sxx: f64 = totals.iter().map(|t| t.0).sum();
    let mut err: f64 = totals.iter().map(|t| t.1).sum();

    let scales = if double_quant {
        let scales = double_quantize(&absmax);
        err += scale_error(&scales, &absmax, &sums);
        scales
    } else {
        BlockScales::F32(absmax)
    };
    let rel_error = if sxx > 0.0 {
        (err.max(0.0) / sxx).sqrt()
    } else {
        0.0
    };
    PackedTensor {
        packed,
        scales,
        rel_error,
    }
}

/// What the stored scales s add to the error over the absmax a: with x - c s = r + c (a - s),
/// the sum over blocks of 2 (a - s) sum(r c) + (a - s)^2 sum(c c).
fn scale_error(scales: &BlockScales, absmax: &[f32], sums: &[BlockSums]) -> f64 {
    let BlockScales::Double {
        q,
        nested_absmax,
        nested_block,
        offset,
        code,
    } = scales
    else {
        return 0.0;
    };
    // Per task, then added in order (deterministic).
    let parts: Vec<f64> = (0..absmax.len().div_ceil(BLOCKS_PER_TASK))
        .into_par_iter()
        .map(|t| {
            let range = t * BLOCKS_PER_TASK..absmax.len().min((t + 1) * BLOCKS_PER_TASK);
            range
                .map(|b| {
                    // The stored scale, as BlockScales::values computes it.
                    let s = code[q[b] as usize] * nested_absmax[b / nested_block] + offset;
                    let d = absmax[b] as f64 - s as f64;
                    2.0 * d * sums[b].rc as f64 + d * d * sums[b].cc as f64
                })
                .sum::<f64>()
        })
        .collect();
    parts.iter().sum()
}

/// Independent accumulators, so the reductions below vectorize and do not wait on one
/// another; their order only touches the error sums, never the codes.
const LANES: usize = 8;

/// The largest block (settings allow 4096): the per-block scratch lives on the stack.
const MAX_BLOCK: usize = 4096;

/// max |x|, as the library's sequential fold gives it (max is exact in any order).
#[inline(always)]
fn absmax(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j].abs());
        }
    }
    let m = acc.iter().fold(0f32, |m, v| m.max(*v));
    rest.iter().fold(m, |m, v| m.max(v.abs()))
}

/// The code of each value of a block: the partition point of the sorted midpoints for
/// x / absmax (a value on a midpoint goes to the lower code). Small code books count the
/// midpoints below the value, eight values at a time held in registers; int-k code books (up
/// to 254 midpoints) start from the uniform grid's guess and step to the exact partition
/// point.
#[inline(always)]
fn pick_codes(x: &[f32], amax: f32, codes: &mut [u32], mids: &[f32], uniform_qmax: Option<f32>) {
    if amax == 0.0 {
        // An all-zero block has absmax 0: its values are 0.
        let zero = mids.partition_point(|&m| m < 0.0) as u32;
        codes.fill(zero);
        return;
    }
    match uniform_qmax {
        Some(qmax) if mids.len() > 16 => {
            let last = mids.len();
            for (c, &v) in codes.iter_mut().zip(x) {
                let n = v / amax;
                // |n| <= 1, so the grid's guess is within one code of the partition point
                // (f32 rounding near a midpoint); one step each way makes it exact.
                // Truncation is floor here (negatives clamp to 0): no libm call.
                let guess = n * qmax + qmax + 0.5;
                let mut i = if guess >= 0.0 {
                    (guess as usize).min(last)
                } else {
                    0
                };
                i -= (i > 0 && !below(mids[i - 1], n)) as usize;
                i += (i < last && below(mids[i], n)) as usize;
                *c = i as u32;
            }
        }
        _ => {
            let mut padded = [f32::INFINITY; 16];
            padded[..mids.len()].copy_from_slice(mids);
            let mids16 = &padded;
            let count = |n: f32| mids.iter().map(|&m| (m < n) as u32).sum::<u32>();
            // 32 values at a time: 4 vectors of values and 4 of counters stay in registers
            // while each midpoint is broadcast once.
            const CHUNK: usize = 4 * LANES;
            let mut xs = x.chunks_exact(CHUNK);
            let mut cs = codes.chunks_exact_mut(CHUNK);
            for (xc, cc) in (&mut xs).zip(&mut cs) {
                // Division, not a reciprocal, as the library and bitsandbytes do.
                let mut n = [0f32; CHUNK];
                for j in 0..CHUNK {
                    n[j] = xc[j] / amax;
                }
                let mut acc = [0u32; CHUNK];
                // A fixed count of midpoints (padded with +inf, which no value is below) so
                // the loop unrolls.
                for &m in mids16 {
                    for j in 0..CHUNK {
                        // wrapping: no overflow check in the hot loop (at most 16 midpoints).
                        acc[j] = acc[j].wrapping_add((m < n[j]) as u32);
                    }
                }
                cc.copy_from_slice(&acc);
            }
            for (c, &v) in cs.into_remainder().iter_mut().zip(xs.remainder()) {
                *c = count(v / amax);
            }
        }
    }
}

/// The partition predicate: midpoint `m` lies below `n` (false for a NaN `n`).
#[inline(always)]
fn below(m: f32, n: f32) -> bool {
    m < n
}

/// Packs codes MSB first into whole bytes (the generic path also pads a last partial byte).
#[inline(always)]
fn pack(codes: &[u32], out: &mut [u8], bits: usize) {
    match bits {
        8 if out.len() == codes.len() => {
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = c as u8;
            }
        }
        4 if codes.len().is_multiple_of(2) => {
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(2)) {
                *o = ((c[0] << 4) | c[1]) as u8;
            }
        }
        2 if codes.len().is_multiple_of(4) => {
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(4)) {
                *o = ((c[0] << 6) | (c[1] << 4) | (c[2] << 2) | c[3]) as u8;
            }
        }
        _ => {
            let (mut acc, mut nbits, mut k) = (0u32, 0usize, 0usize);
            for &c in codes {
                acc = (acc << bits) | c;
                nbits += bits;
                if nbits >= 8 {
                    out[k] = (acc >> (nbits - 8)) as u8;
                    k += 1;
                    nbits -= 8;
                }
            }
            if nbits > 0 {
                // Only the last block of a tensor can end inside a byte: pad with zeros.
                out[k] = (acc << (8 - nbits)) as u8;
            }
        }
    }
}

/// Per-task buffers for one block's values (widened from f16 / bf16), codes and code values.
struct Scratch {
    x: Vec<f32>,
    codes: Vec<u32>,
    values: Vec<f32>,
}

/// What every block of a tensor shares.
struct Task<'a> {
    block: usize,
    bits: usize,
    code: &'a [f32],
    mids: &'a [f32],
    uniform_qmax: Option<f32>,
}

impl Task<'_> {
    /// The blocks of one rayon task; returns their sum of x^2.
    #[inline(always)]
    fn run(
        &self,
        out: &mut [u8],
        x: Values,
        amax: &mut [f32],
        sums: &mut [BlockSums],
    ) -> (f64, f64) {
        let (mut sxx, mut srr) = (0f64, 0f64);
        let out_block = self.block * self.bits / 8;
        let mut scratch = Scratch {
            x: vec![0f32; self.block],
            codes: vec![0u32; self.block],
            values: vec![0f32; self.block],
        };
        let n = x.len();
        for (b, ((o, a), s)) in out
            .chunks_mut(out_block)
            .zip(amax.iter_mut())
            .zip(sums.iter_mut())
            .enumerate()
            .take(n.div_ceil(self.block))
        {
            let xb = x.slice(b * self.block, n.min((b + 1) * self.block));
            let xb = match xb {
                Values::F32(v) => v,
                other => {
                    let buf = &mut scratch.x[..other.len()];
                    other.widen(buf);
                    &*buf
                }
            };
            let (xx, rr, blk) = quantize_block(
                xb,
                o,
                self.code,
                self.mids,
                self.uniform_qmax,
                self.bits,
                a,
                &mut scratch.codes,
                &mut scratch.values,
            );
            sxx += xx;
            srr += rr;
            *s = blk;
        }
        (sxx, srr)
    }

    /// [`Task::run`] compiled a second time for AVX2 (twice the vector width, and
    /// hardware gathers for the code lookups), chosen at run time. AVX2 changes no result:
    /// the same IEEE operations in the same order (no FMA contraction).
    fn run_dispatch(
        &self,
        out: &mut [u8],
        x: Values,
        amax: &mut [f32],
        sums: &mut [BlockSums],
    ) -> (f64, f64) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // Safety: the CPU supports AVX2, checked just above.
            return unsafe { self.run_avx2(out, x, amax, sums) };
        }
        self.run(out, x, amax, sums)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(
        &self,
        out: &mut [u8],
        x: Values,
        amax: &mut [f32],
        sums: &mut [BlockSums],
    ) -> (f64, f64) {
        self.run(out, x, amax, sums)
    }
}

/// One block: absmax, codes packed into `out`, error sums. Returns (sum x^2, sum r^2, sums).
#[allow(clippy::too_many_arguments)] // the hot path: plain arguments, nothing to unpack
#[inline(always)]
fn quantize_block(
    x: &[f32],
    out: &mut [u8],
    code: &[f32],
    mids: &[f32],
    uniform_qmax: Option<f32>,
    bits: usize,
    amax_out: &mut f32,
    codes: &mut [u32],
    values: &mut [f32],
) -> (f64, f64, BlockSums) {
    let amax = absmax(x);
    *amax_out = amax;
    let codes = &mut codes[..x.len()];
    pick_codes(x, amax, codes, mids, uniform_qmax);
    pack(codes, out, bits);

    // The code values first (a gather), then sums that stay in vector registers.
    let cvals = &mut values[..x.len()];
    for (cv, &c) in cvals.iter_mut().zip(codes.iter()) {
        *cv = code[c as usize];
    }
    let (mut xx, mut rr, mut rc, mut cc) =
        ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let xs = x.chunks_exact(LANES);
    let rest = xs.remainder();
    for (xc, vc) in xs.zip(cvals.chunks_exact(LANES)) {
        for j in 0..LANES {
            let r = xc[j] - vc[j] * amax;
            xx[j] += xc[j] * xc[j];
            rr[j] += r * r;
            rc[j] += r * vc[j];
            cc[j] += vc[j] * vc[j];
        }
    }
    for (j, (&v, &cv)) in rest.iter().zip(&cvals[x.len() - rest.len()..]).enumerate() {
        let r = v - cv * amax;
        xx[j] += v * v;
        rr[j] += r * r;
        rc[j] += r * cv;
        cc[j] += cv * cv;
    }
    let sum = |a: [f32; LANES]| a.iter().map(|&v| v as f64).sum::<f64>();
    (
        sum(xx),
        sum(rr),
        BlockSums {
            rc: sum(rc) as f32,
            cc: sum(cc) as f32,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use quant::{dequantize_packed, quantize_blockwise};

    /// Deterministic normal-ish values with some exact zeros and a zero block.
    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut v: Vec<f32> = (0..n)
            .map(|_| {
                let mut acc = 0f32;
                for _ in 0..4 {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                }
                acc * 0.05
            })
            .collect();
        for x in v.iter_mut().take(64) {
            *x = 0.0;
        }
        v
    }

    #[test]
    fn equals_the_library_for_every_codebook() {
        // 70_003 values: not a multiple of any block, so the last block is partial.
        let x = sample(70_003, 7);
        for cb in [
            CodeBook::Nf4,
            CodeBook::Nf3,
            CodeBook::Nf2,
            CodeBook::Int(8),
            CodeBook::Int(4),
            CodeBook::Int(3),
            CodeBook::Int(2),
        ] {
            for (block, dq) in [(64, true), (32, false), (256, true)] {
                let lib = quantize_blockwise(&x, &[x.len()], block, cb, dq).unwrap();
                let ours = quantize_pack(&x, block, cb, dq);
                assert_eq!(ours.packed, lib.packed(), "{cb:?} block {block}");
                assert_eq!(ours.scales, lib.absmax, "{cb:?} block {block}");
                let deq = dequantize_packed(
                    &ours.packed,
                    x.len(),
                    block,
                    &cb.values(),
                    cb.bits(),
                    &ours.scales.values(),
                );
                assert_eq!(deq, lib.dequantize(), "{cb:?} block {block}");
                let num: f64 = x
                    .iter()
                    .zip(&deq)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                let den: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
                let want = (num / den).sqrt();
                assert!(
                    (ours.rel_error - want).abs() < 1e-4 * want,
                    "{cb:?} block {block}: error {} vs {want}",
                    ours.rel_error
                );
            }
        }
    }

    #[test]
    fn error_grows_as_bits_shrink() {
        let x = sample(1 << 16, 3);
        let e = |cb| quantize_pack(&x, 64, cb, true).rel_error;
        let (e8, e4, nf4, nf2) = (
            e(CodeBook::Int(8)),
            e(CodeBook::Int(4)),
            e(CodeBook::Nf4),
            e(CodeBook::Nf2),
        );
        // Uniform int8 over a block is about 1/127 of absmax per step.
        assert!(e8 < 0.01, "int8 {e8}");
        assert!(
            nf4 < e4,
            "nf4 {nf4} should beat int4 {e4} on bell-shaped data"
        );
        assert!(nf2 > nf4 && nf2 < 1.0, "nf2 {nf2}");
    }
}

/// The kernels against a plain scalar reference on inputs built to break them.
#[cfg(test)]
mod adversarial {
    use super::*;
    use quant::pack_bits;

    const BOOKS: [CodeBook; 7] = [
        CodeBook::Nf4,
        CodeBook::Nf3,
        CodeBook::Nf2,
        CodeBook::Int(8),
        CodeBook::Int(4),
        CodeBook::Int(3),
        CodeBook::Int(2),
    ];

    /// The rule written out: absmax by f32::max, x / absmax (0 for an all-zero block), the
    /// number of midpoints below it.
    fn reference(x: &[f32], block: usize, cb: CodeBook) -> (Vec<u8>, Vec<f32>) {
        let code = cb.values();
        let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let mut codes = Vec::with_capacity(x.len());
        let mut absmax = Vec::new();
        for b in x.chunks(block) {
            let a = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax.push(a);
            for &v in b {
                let n = if a > 0.0 { v / a } else { 0.0 };
                codes.push(mids.iter().filter(|&&m| m < n).count() as u8);
            }
        }
        (pack_bits(&codes, cb.bits()), absmax)
    }

    fn kernels() -> Vec<Kernel> {
        let mut k = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            k.push(Kernel::Avx512);
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            k.push(Kernel::Avx2);
        }
        k
    }

    /// Deterministic pseudo-random bits.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Blocks of 64 built around one absmax each: values exactly on every midpoint (and
    /// one ulp either side), on every code, ±0, ±absmax, NaN, inf, subnormals, all-zero,
    /// all -0, all-NaN blocks; then random values.
    fn nasty(cb: CodeBook) -> Vec<f32> {
        let code = cb.values();
        let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let mut next = rng(99);
        let mut x = Vec::new();
        // Powers of two keep m * absmax exact, so x / absmax lands on the midpoint itself.
        for amax in [
            1.0f32,
            0.5,
            2.0,
            1.0 / 1024.0,
            0.37,
            3.0e-3,
            1.0e30,
            1.0e-38,
            1.0e-40,
        ] {
            let mut b = vec![amax, -amax, 0.0, -0.0];
            for &m in mids.iter().chain(&code) {
                let v = m * amax;
                b.extend([v, -v, v.next_up(), v.next_down(), (-v).next_up()]);
            }
            for chunk in b.chunks(63) {
                let mut blk = chunk.to_vec();
                blk.push(amax);
                while blk.len() < 64 {
                    let r = (next() >> 40) as f32 / (1u64 << 24) as f32;
                    blk.push((2.0 * r - 1.0) * amax);
                }
                x.extend(blk);
            }
        }
        let special = |f: &dyn Fn(usize) -> f32| (0..64).map(f).collect::<Vec<f32>>();
        x.extend(special(&|_| 0.0));
        x.extend(special(&|_| -0.0));
        x.extend(special(&|_| f32::NAN));
        x.extend(special(&|i| if i % 3 == 0 { f32::NAN } else { 0.0 }));
        x.extend(special(&|i| {
            if i == 7 {
                f32::NAN
            } else {
                i as f32 / 63.0
            }
        }));
        x.extend(special(&|i| if i == 5 { f32::INFINITY } else { i as f32 }));
        x.extend(special(&|i| {
            if i == 5 {
                f32::NEG_INFINITY
            } else {
                -(i as f32)
            }
        }));
        x.extend(special(&|i| f32::from_bits(i as u32 * 997)));
        x.extend(special(&|i| {
            f32::MAX * if i % 2 == 0 { 1.0 } else { -0.75 }
        }));
        for _ in 0..64 * 40 {
            let r = (next() >> 40) as f32 / (1u64 << 24) as f32;
            x.push((r - 0.5) * 0.1);
        }
        x
    }

    #[test]
    fn every_kernel_equals_the_reference_on_nasty_values() {
        for cb in BOOKS {
            let x = nasty(cb);
            for block in [32, 64, 128, 4096] {
                // Whole blocks, and a short last block of every length mod 32 and more.
                for cut in [0, 1, 2, 15, 16, 17, 31, 33, 63, 95] {
                    let x = &x[..x.len() - cut];
                    let (want, want_amax) = reference(x, block, cb);
                    let mut errors = Vec::new();
                    for k in kernels() {
                        let q = quantize_with(Values::F32(x), block, cb, false, k);
                        assert_eq!(q.packed, want, "{k:?} {cb:?} block {block} cut {cut}");
                        let BlockScales::F32(a) = &q.scales else {
                            panic!("plain scales")
                        };
                        let same = a
                            .iter()
                            .zip(&want_amax)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{k:?} {cb:?} block {block} cut {cut}: absmax");
                        errors.push(q.rel_error);
                    }
                    // The error sums differ only in rounding order (NaN where the input has
                    // NaN or inf).
                    let e0 = errors[0];
                    for e in &errors[1..] {
                        assert!(
                            (e.is_nan() && e0.is_nan()) || (e - e0).abs() <= 1e-5 * e0,
                            "{cb:?} block {block} cut {cut}: error {e} vs {e0}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn double_quantized_kernels_agree() {
        let x: Vec<f32> = nasty(CodeBook::Nf4)
            .into_iter()
            .filter(|v| v.is_finite() && v.abs() < 1e3)
            .collect();
        for cb in BOOKS {
            let lib = quant::quantize_blockwise(&x, &[x.len()], 64, cb, true).unwrap();
            let mut errors = Vec::new();
            for k in kernels() {
                let q = quantize_with(Values::F32(&x), 64, cb, true, k);
                assert_eq!(q.packed, lib.packed(), "{k:?} {cb:?}");
                assert_eq!(q.scales, lib.absmax, "{k:?} {cb:?}");
                errors.push(q.rel_error);
            }
            for e in &errors[1..] {
                assert!(
                    (e - errors[0]).abs() <= 1e-5 * errors[0],
                    "{cb:?}: {errors:?}"
                );
            }
        }
    }

    /// Every bf16 and f16 bit pattern, read as stored, quantizes as its f32 value does.
    #[test]
    fn half_inputs_widen_exactly() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let bf16: Vec<f32> = bits
            .iter()
            .map(|&b| f32::from_bits((b as u32) << 16))
            .collect();
        let f16: Vec<f32> = bits.iter().map(|&b| f16_to_f32(b)).collect();
        for k in kernels() {
            for cb in [CodeBook::Nf4, CodeBook::Int(3), CodeBook::Int(8)] {
                for (half, wide) in [(Values::Bf16(&bytes), &bf16), (Values::F16(&bytes), &f16)] {
                    // Odd lengths too, so the masked tail reads of the half inputs run.
                    for len in [bits.len(), 1000, 999, 17] {
                        let a = quantize_with(half.slice(0, len), 64, cb, false, k);
                        let b = quantize_with(Values::F32(&wide[..len]), 64, cb, false, k);
                        assert_eq!(a.packed, b.packed, "{k:?} {cb:?} len {len}");
                        assert_eq!(a.scales, b.scales, "{k:?} {cb:?} len {len}");
                    }
                }
            }
        }
    }

    #[test]
    fn f16_widening_spot_checks() {
        assert_eq!(f16_to_f32(0x3C00), 1.0);
        assert_eq!(f16_to_f32(0xC000), -2.0);
        assert_eq!(f16_to_f32(0x7BFF), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03FF), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f16_to_f32(0x7C00), f32::INFINITY);
        assert!(f16_to_f32(0x7E00).is_nan());
    }

    /// The AVX-512 and AVX2 kernels take every code book of up to 16 codes (for AVX-512:
    /// the cells of its search table fit between their midpoints).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_kernels_cover_the_small_code_books() {
        for cb in BOOKS {
            let code = cb.values();
            let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
            let t = avx512::Tables::new(&code, &mids, cb.bits() as usize);
            assert_eq!(t.is_some(), code.len() <= 16, "{cb:?}");
            let t = avx2::Tables::new(&code, &mids, cb.bits() as usize);
            assert_eq!(t.is_some(), code.len() <= 16, "{cb:?}");
        }
    }

    /// Speed of each kernel on an in-memory bf16 and f32 matrix of the 135M-class shape
    /// (run with `cargo test --release -p quantize --lib -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn speed() {
        let x = nasty(CodeBook::Nf4);
        let x: Vec<f32> = x.iter().cycle().take(1536 * 576 * 4).copied().collect();
        let x: Vec<f32> = x
            .iter()
            .map(|v| if v.is_finite() { *v } else { 0.5 })
            .collect();
        let bf16: Vec<u8> = x
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        for k in kernels() {
            for (name, v, bytes) in [
                ("bf16", Values::Bf16(&bf16), bf16.len()),
                ("f32", Values::F32(&x), 4 * x.len()),
            ] {
                let best = (0..10)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        std::hint::black_box(quantize_with(v, 64, CodeBook::Nf4, true, k));
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min);
                println!(
                    "{k:?} NF4 + double quant, {name}: {:.2} GB/s of input, {:.2} G values/s",
                    bytes as f64 / best / 1e9,
                    x.len() as f64 / best / 1e9
                );
            }
        }
    }
}
