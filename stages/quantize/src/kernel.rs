//! The streaming form of `quant::quantize_blockwise`: one pass over the input that finds each
//! block's absmax, picks the codes, packs them straight into the output bytes and gathers
//! the sums the reconstruction error needs, so nothing of the tensor's size is allocated
//! besides the packed output. The code choice is the library's (nearest code, a value on a
//! float32 midpoint goes to the lower code, x / absmax by division); the tests check
//! equality with the library, which matches bitsandbytes bit for bit.

use quant::{double_quantize, BlockScales, CodeBook};
use rayon::prelude::*;

/// Blocks handed to one rayon task: large enough that scheduling costs nothing.
const BLOCKS_PER_TASK: usize = 256;

/// A tensor quantized block-wise, codes already packed MSB first (pack_bits' layout).
pub struct PackedTensor {
    pub packed: Vec<u8>,
    pub scales: BlockScales,
    /// Relative Frobenius error ||W - dequant(Q)|| / ||W|| with the scales as stored.
    pub rel_error: f64,
}

/// Per-block sums for the error: r = x - code * absmax (the f32 absmax), c = code.
#[derive(Clone, Copy, Default)]
struct BlockSums {
    rr: f64,
    rc: f64,
    cc: f64,
}

/// Quantizes `x` in blocks of `block` values (a power of two of at least 32, so every whole
/// block fills whole bytes at any bit width).
pub fn quantize_pack(
    x: &[f32],
    block: usize,
    codebook: CodeBook,
    double_quant: bool,
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
    let n_blocks = x.len().div_ceil(block);
    let mut packed = vec![0u8; (x.len() * bits).div_ceil(8)];
    let mut absmax = vec![0f32; n_blocks];
    let mut sums = vec![BlockSums::default(); n_blocks];
    let task_vals = BLOCKS_PER_TASK * block;
    let task_bytes = task_vals * bits / 8;

    let sxx: f64 = packed
        .par_chunks_mut(task_bytes)
        .zip(x.par_chunks(task_vals))
        .zip(absmax.par_chunks_mut(BLOCKS_PER_TASK))
        .zip(sums.par_chunks_mut(BLOCKS_PER_TASK))
        .map(|(((out, x), amax), sums)| {
            let task = Task {
                block,
                bits,
                code: &code,
                mids: &mids,
                uniform_qmax,
            };
            task.run_dispatch(out, x, amax, sums)
        })
        .sum();

    let scales = if double_quant {
        double_quantize(&absmax)
    } else {
        BlockScales::F32(absmax.clone())
    };
    // With stored scale s instead of the absmax a: x - c s = r + c (a - s).
    let stored = scales.values();
    let err: f64 = sums
        .par_iter()
        .zip(absmax.par_iter().zip(stored.par_iter()))
        .map(|(b, (&a, &s))| {
            let d = a as f64 - s as f64;
            b.rr + 2.0 * d * b.rc + d * d * b.cc
        })
        .sum();
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

/// Per-task buffers for one block's codes and code values.
struct Scratch {
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
    fn run(&self, out: &mut [u8], x: &[f32], amax: &mut [f32], sums: &mut [BlockSums]) -> f64 {
        let mut sxx = 0f64;
        let out_block = self.block * self.bits / 8;
        let mut scratch = Scratch {
            codes: vec![0u32; self.block],
            values: vec![0f32; self.block],
        };
        for (((o, xb), a), s) in out
            .chunks_mut(out_block)
            .zip(x.chunks(self.block))
            .zip(amax.iter_mut())
            .zip(sums.iter_mut())
        {
            let (blk_sxx, blk) = quantize_block(
                xb,
                o,
                self.code,
                self.mids,
                self.uniform_qmax,
                self.bits,
                a,
                &mut scratch,
            );
            sxx += blk_sxx;
            *s = blk;
        }
        sxx
    }

    /// [`Task::run`] compiled a second time for AVX2 (twice the vector width, and
    /// hardware gathers for the code lookups), chosen at run time. AVX2 changes no result:
    /// the same IEEE operations in the same order (no FMA contraction).
    fn run_dispatch(
        &self,
        out: &mut [u8],
        x: &[f32],
        amax: &mut [f32],
        sums: &mut [BlockSums],
    ) -> f64 {
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
        x: &[f32],
        amax: &mut [f32],
        sums: &mut [BlockSums],
    ) -> f64 {
        self.run(out, x, amax, sums)
    }
}

/// One block: absmax, codes packed into `out`, error sums. Returns (sum x^2, sums).
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
    scratch: &mut Scratch,
) -> (f64, BlockSums) {
    let amax = absmax(x);
    *amax_out = amax;
    let codes = &mut scratch.codes[..x.len()];
    pick_codes(x, amax, codes, mids, uniform_qmax);
    pack(codes, out, bits);

    // The code values first (a gather), then sums that stay in vector registers.
    let cvals = &mut scratch.values[..x.len()];
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
        BlockSums {
            rr: sum(rr),
            rc: sum(rc),
            cc: sum(cc),
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
