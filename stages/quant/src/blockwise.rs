//! Block-wise k-bit quantization as in QLoRA / bitsandbytes (DESIGN.md, "Block-wise k-bit
//! quantization"): flatten row-major, one f32 absmax per block, nearest code of the code book
//! for x / absmax, optional double quantization of the absmax values with bitsandbytes'
//! dynamic 8-bit code.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::codebook::{dynamic8, CodeBook, DYNAMIC8_CODE};
use crate::QuantError;

/// Block size of the double quantization (one f32 absmax per 256 block scales).
pub const NESTED_BLOCK: usize = 256;

/// The per-block scales.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockScales {
    /// One f32 absmax per block.
    F32(Vec<f32>),
    /// Double quantization: block b's scale is
    /// `code[q[b]] * nested_absmax[b / nested_block] + offset`.
    Double {
        q: Vec<u8>,
        nested_absmax: Vec<f32>,
        nested_block: usize,
        offset: f32,
        code: Vec<f32>,
    },
}

impl BlockScales {
    /// The f32 scale of every block, as dequantization uses it.
    pub fn values(&self) -> Vec<f32> {
        match self {
            BlockScales::F32(v) => v.clone(),
            BlockScales::Double {
                q,
                nested_absmax,
                nested_block,
                offset,
                code,
            } => q
                .iter()
                .enumerate()
                .map(|(b, &i)| code[i as usize] * nested_absmax[b / nested_block] + offset)
                .collect(),
        }
    }

    /// Storage bits of the scales, without the per-tensor constants (offset, code table).
    fn bits(&self) -> usize {
        match self {
            BlockScales::F32(v) => 32 * v.len(),
            BlockScales::Double {
                q, nested_absmax, ..
            } => 8 * q.len() + 32 * nested_absmax.len(),
        }
    }
}

/// A tensor quantized block-wise: one code index per element (not yet packed).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockQuantized {
    pub shape: Vec<usize>,
    pub block_size: usize,
    pub codebook: CodeBook,
    pub codes: Vec<u8>,
    pub absmax: BlockScales,
}

/// Quantizes `data` (row-major, `shape`) in blocks of `block_size` with `codebook`;
/// `double_quant` quantizes the block absmax values as QLoRA does.
pub fn quantize_blockwise(
    data: &[f32],
    shape: &[usize],
    block_size: usize,
    codebook: CodeBook,
    double_quant: bool,
) -> Result<BlockQuantized, QuantError> {
    let expected: usize = shape.iter().product();
    if expected != data.len() {
        return Err(QuantError::ShapeMismatch {
            len: data.len(),
            shape: shape.to_vec(),
            expected,
        });
    }
    if block_size == 0 {
        return Err(QuantError::invalid("block_size", 0, "at least 1"));
    }
    codebook.validate()?;
    let code = codebook.values();
    // A value exactly on the f32 midpoint of two neighbouring codes goes to the lower one.
    let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();

    let mut codes = vec![0u8; data.len()];
    let absmax: Vec<f32> = codes
        .par_chunks_mut(block_size)
        .zip(data.par_chunks(block_size))
        .map(|(out, x)| {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (o, &v) in out.iter_mut().zip(x) {
                // An all-zero block has absmax 0: its values are 0.
                let normed = if amax > 0.0 { v / amax } else { 0.0 };
                *o = mids.partition_point(|&m| m < normed) as u8;
            }
            amax
        })
        .collect();

    let absmax = if double_quant {
        double_quantize(&absmax)
    } else {
        BlockScales::F32(absmax)
    };
    Ok(BlockQuantized {
        shape: shape.to_vec(),
        block_size,
        codebook,
        codes,
        absmax,
    })
}

/// QLoRA's double quantization: subtract the mean of the absmax values (computed the way
/// torch sums f32), then quantize them in blocks of 256 with the dynamic 8-bit code.
pub fn double_quantize(absmax: &[f32]) -> BlockScales {
    let offset = torch_sum_f32(absmax) / absmax.len() as f32;
    let lut = dynamic8_lut();
    let mut q = vec![0u8; absmax.len()];
    let nested_absmax: Vec<f32> = q
        .par_chunks_mut(NESTED_BLOCK)
        .zip(absmax.par_chunks(NESTED_BLOCK))
        // At least 32 blocks (8192 values, some microseconds) a task: a tensor of fewer
        // runs on the calling thread, without handing work to rayon.
        .with_min_len(32)
        .map(|(out, x)| bnb_quantize_block(x, offset, out, lut))
        .collect();
    BlockScales::Double {
        q,
        nested_absmax,
        nested_block: NESTED_BLOCK,
        offset,
        code: dynamic8(),
    }
}

/// Number of bins of bitsandbytes' 8-bit quantization lookup table.
const LUT_SIZE: usize = 65536;

/// The lookup table of the dynamic 8-bit code ([`DYNAMIC8_CODE`], a constant), built on
/// first use and shared by every later call.
fn dynamic8_lut() -> &'static [u8; LUT_SIZE] {
    static LUT: OnceLock<Box<[u8; LUT_SIZE]>> = OnceLock::new();
    LUT.get_or_init(|| build_quantize_lut(&DYNAMIC8_CODE))
}

/// bitsandbytes' 8-bit lookup table (`build_quantize_lut` in csrc/cpu_ops.cpp): bin i stands
/// for the f32 value -1 + 2i / 65535 and holds the first code whose f32 midpoint with its
/// upper neighbour is not below that value.
fn build_quantize_lut(code: &[f32]) -> Box<[u8; LUT_SIZE]> {
    let mids: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut lut = Box::new([0u8; LUT_SIZE]);
    let mut c = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
        while c < mids.len() && mids[c] < val {
            c += 1;
        }
        *slot = c as u8;
    }
    lut
}

/// One block of bitsandbytes' 8-bit CPU quantization (`quantize_cpu_impl` and
/// `avx2_quantize_8bit_block` in csrc/cpu_ops.cpp): x * (1 / absmax) is clamped to [-1, 1],
/// mapped to a bin of the lookup table by truncating ((v + 1) * 0.5) * 65535 + 0.5, and the
/// bin's code is taken. The 1/65535 resolution of the bins is why a few values get the
/// farther of two neighbouring codes. Returns the block's absmax (an all-zero block gets
/// code index 0, as in bitsandbytes). The block's values are `x - offset`, centred here
/// rather than in a copy.
fn bnb_quantize_block(x: &[f32], offset: f32, out: &mut [u8], lut: &[u8; LUT_SIZE]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max((v - offset).abs()));
    if amax == 0.0 {
        out.fill(0);
        return amax;
    }
    let inv = 1.0f32 / amax;
    // The bins first (a loop the compiler vectorizes), then the table look-ups. max/min
    // clamp to [-1, 1] as `clamp` does, and take NaN to -1, whose bin 0 is the one a NaN
    // gets in bitsandbytes' truncation; so the bin is the truncation of a value in
    // [0.5, 65535.5], and the mask changes nothing.
    let mut bins = [0u32; NESTED_BLOCK];
    for (out, x) in out.chunks_mut(NESTED_BLOCK).zip(x.chunks(NESTED_BLOCK)) {
        let bins = &mut bins[..x.len()];
        for (b, &v) in bins.iter_mut().zip(x) {
            // Not `clamp`, which keeps NaN.
            #[allow(clippy::manual_clamp)]
            let v = ((v - offset) * inv).max(-1.0).min(1.0);
            let f = (v + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5;
            // SAFETY: f is finite and in [0.5, 65535.5] (above), so it fits an i32.
            *b = unsafe { f.to_int_unchecked::<i32>() } as u32;
        }
        for (o, &b) in out.iter_mut().zip(bins.iter()) {
            *o = lut[b as usize & (LUT_SIZE - 1)];
        }
    }
    amax
}

/// torch's CPU sum of a contiguous f32 vector (`cascade_sum` in
/// aten/src/ATen/native/cpu/SumKernel.cpp): lanes of `LANES` floats (AVX2 vectors), four
/// interleaved accumulators with a multi-level cascade, then the scalar tail and the lanes
/// added in order.
fn torch_sum_f32(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    let n = x.len();
    if n < LANES {
        return row_sum::<1>(x, n)[0];
    }
    let n_vec = n / LANES;
    let lanes = row_sum::<LANES>(x, n_vec);
    let mut acc = 0f32;
    for v in &x[n_vec * LANES..] {
        acc += v;
    }
    for l in lanes {
        acc += l;
    }
    acc
}

/// Number of interleaved accumulators of SumKernel.cpp's `row_sum`.
const ILP: usize = 4;

/// `row_sum` of SumKernel.cpp over `count` vectors of `W` lanes (vector i = x[i*W..(i+1)*W]).
fn row_sum<const W: usize>(x: &[f32], count: usize) -> [f32; W] {
    let size = count / ILP;
    let partial = multi_row_sum::<W>(x, size);
    let mut first = partial[0];
    for i in size * ILP..count {
        add_lanes(&mut first, lanes(x, i));
    }
    for p in &partial[1..] {
        add_lanes(&mut first, p);
    }
    first
}

/// `multi_row_sum` of SumKernel.cpp: `ILP` interleaved accumulators, each a cascade of 4
/// levels that flushes every 2^level_power rows.
fn multi_row_sum<const W: usize>(x: &[f32], size: usize) -> [[f32; W]; ILP] {
    const LEVELS: usize = 4;
    let ceil_log2 = if size <= 2 {
        1
    } else {
        64 - (size as u64 - 1).leading_zeros() as usize
    };
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; W]; ILP]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add_lanes(a, lanes(x, i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            // Level j - 1 flushes into level j and restarts from zero.
            let (lower, upper) = acc.split_at_mut(j);
            for (a, l) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add_lanes(a, l);
                *l = [0f32; W];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add_lanes(a, lanes(x, i * ILP + k));
        }
        i += 1;
    }
    let mut out = acc[0];
    for level in &acc[1..] {
        for (o, l) in out.iter_mut().zip(level) {
            add_lanes(o, l);
        }
    }
    out
}

/// Vector i of `W` lanes: x[i*W..(i+1)*W].
fn lanes<const W: usize>(x: &[f32], i: usize) -> &[f32; W] {
    x[i * W..(i + 1) * W].try_into().unwrap()
}

fn add_lanes<const W: usize>(acc: &mut [f32; W], v: &[f32; W]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

impl BlockQuantized {
    pub fn numel(&self) -> usize {
        self.codes.len()
    }

    /// The codes packed densely, MSB first: for 4 bits, element 2j in the high nibble and
    /// 2j+1 in the low one (bitsandbytes' layout); an odd count pads the last low nibble with 0.
    pub fn packed(&self) -> Vec<u8> {
        pack_bits(&self.codes, self.codebook.bits())
    }

    /// The f32 values: code * block scale.
    pub fn dequantize(&self) -> Vec<f32> {
        let code = self.codebook.values();
        let scales = self.absmax.values();
        let mut out = vec![0f32; self.codes.len()];
        out.par_chunks_mut(self.block_size)
            .zip(self.codes.par_chunks(self.block_size))
            .zip(scales.par_iter())
            .for_each(|((o, c), &s)| {
                for (v, &i) in o.iter_mut().zip(c) {
                    *v = code[i as usize] * s;
                }
            });
        out
    }

    /// Storage per parameter: the codes plus the per-block scales.
    pub fn bits_per_param(&self) -> f64 {
        let n = self.codes.len().max(1);
        (self.codebook.bits() as usize * self.codes.len() + self.absmax.bits()) as f64 / n as f64
    }
}

/// Packs `bits`-bit values (1 to 8) into bytes, MSB first; the last byte is padded with 0.
/// Values must fit in `bits` bits (higher bits are dropped).
pub fn pack_bits(values: &[u8], bits: u32) -> Vec<u8> {
    let bits = bits.clamp(1, 8) as usize;
    let mask = ((1u16 << bits) - 1) as u8;
    let mut out = vec![0u8; (values.len() * bits).div_ceil(8)];
    for (i, &v) in values.iter().enumerate() {
        let v = (v & mask) as u16;
        let pos = i * bits;
        let (byte, off) = (pos / 8, pos % 8);
        // Place the value in a 16-bit window starting at `byte`, MSB first.
        let shifted = v << (16 - bits - off);
        out[byte] |= (shifted >> 8) as u8;
        if off + bits > 8 {
            out[byte + 1] |= shifted as u8;
        }
    }
    out
}

/// Inverse of [`pack_bits`]: the first `n` values (fewer if `packed` is too short).
pub fn unpack_bits(packed: &[u8], bits: u32, n: usize) -> Vec<u8> {
    let bits = bits.clamp(1, 8) as usize;
    let mask = (1u16 << bits) - 1;
    let n = n.min(packed.len() * 8 / bits);
    (0..n)
        .map(|i| {
            let pos = i * bits;
            let (byte, off) = (pos / 8, pos % 8);
            let hi = (packed[byte] as u16) << 8;
            let lo = packed.get(byte + 1).copied().unwrap_or(0) as u16;
            (((hi | lo) >> (16 - bits - off)) & mask) as u8
        })
        .collect()
}

/// Dequantizes packed codes with their block scales: `code[c] * scale[block]`.
pub fn dequantize_packed(
    packed: &[u8],
    n: usize,
    block: usize,
    code: &[f32],
    bits: u32,
    scales: &[f32],
) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let bits = bits as usize;
    if bits == 4 {
        // The common case, one byte holds two values.
        out.par_chunks_mut(block)
            .zip(scales.par_iter())
            .enumerate()
            .for_each(|(b, (o, &s))| {
                let base = b * block;
                for (j, v) in o.iter_mut().enumerate() {
                    let i = base + j;
                    let byte = packed[i / 2];
                    let c = if i.is_multiple_of(2) {
                        byte >> 4
                    } else {
                        byte & 15
                    };
                    *v = code[c as usize] * s;
                }
            });
        return out;
    }
    out.par_chunks_mut(block)
        .zip(scales.par_iter())
        .enumerate()
        .for_each(|(b, (o, &s))| {
            let start_bit = b * block * bits;
            let bytes = &packed[start_bit / 8..(start_bit + o.len() * bits).div_ceil(8)];
            let codes = unpack_bits(bytes, bits as u32, o.len());
            for (v, c) in o.iter_mut().zip(codes) {
                *v = code[c as usize] * s;
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_lut_is_the_dynamic8_lut_built_once() {
        let a = dynamic8_lut();
        assert_eq!(a, &*build_quantize_lut(&dynamic8()));
        assert!(std::ptr::eq(a, dynamic8_lut()));
    }

    #[test]
    fn block_bins_match_the_scalar_formula() {
        // bitsandbytes' scalar steps, NaN and infinities included.
        let reference = |x: &[f32], offset: f32, lut: &[u8; LUT_SIZE]| -> Vec<u8> {
            let amax = x.iter().fold(0f32, |m, v| m.max((v - offset).abs()));
            if amax == 0.0 {
                return vec![0; x.len()];
            }
            let inv = 1.0f32 / amax;
            x.iter()
                .map(|&v| {
                    let v = ((v - offset) * inv).clamp(-1.0, 1.0);
                    let bin = ((v + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5) as usize;
                    lut[bin.min(LUT_SIZE - 1)]
                })
                .collect()
        };
        let lut = dynamic8_lut();
        let mut x: Vec<f32> = (0..700)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        x.extend([f32::NAN, -0.0, 0.0, 1.0, -1.0, 1e-7, -1e-7]);
        let mut with_inf = x.clone();
        with_inf.push(f32::INFINITY);
        for (x, offset) in [
            (&x, 0.0),
            (&x, 0.3),
            (&with_inf, 0.0),
            (&vec![f32::NAN; 5], 0.0),
        ] {
            let mut got = vec![0u8; x.len()];
            for (o, c) in got.chunks_mut(NESTED_BLOCK).zip(x.chunks(NESTED_BLOCK)) {
                bnb_quantize_block(c, offset, o, lut);
            }
            let want: Vec<u8> = x
                .chunks(NESTED_BLOCK)
                .flat_map(|c| reference(c, offset, lut))
                .collect();
            assert_eq!(got, want, "offset {offset}");
        }
    }

    #[test]
    fn dequantize_packed_equals_dequantize() {
        // 1_003 values: the last block is partial.
        let x: Vec<f32> = (0..1_003)
            .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
            .collect();
        for cb in [
            CodeBook::Nf4,
            CodeBook::Nf3,
            CodeBook::Nf2,
            CodeBook::Int(8),
            CodeBook::Int(3),
        ] {
            for (block, dq) in [(64, true), (32, false)] {
                let q = quantize_blockwise(&x, &[x.len()], block, cb, dq).unwrap();
                let got = dequantize_packed(
                    &q.packed(),
                    x.len(),
                    block,
                    &cb.values(),
                    cb.bits(),
                    &q.absmax.values(),
                );
                assert_eq!(got, q.dequantize(), "{cb:?} block {block}");
            }
        }
    }
}
