//! A projection kept as its low-bit codes and scales, multiplied from the codes.
//!
//! Up to 4 bits, two codes share a byte (`code + 8`); 5 to 8 bits take a byte each. Scales
//! are f32, one per output row and group. The product reads each weight row once for the
//! whole batch of input rows:
//!
//! ```text
//! f32 activations:  y[b, o] = Σ_g s[o, g] · Σ_{i∈g} c[o, i] · x[b, i]
//! int activations:  y[b, o] = α[b] · Σ_g s[o, g] · Σ_{i∈g} c[o, i] · q[b, i]   (exact int dot)
//! ```
//!
//! where q, α are the per-token codes and scale the activation fake quantizer computes. The
//! fake-quantized product sums (c·s)(q·α) in another order, so results agree to rounding,
//! not bit for bit.

use super::kernels::{dot_f32, dot_i8, pack_i4, scale_i8, unpack_i4};
use quant::GridWeight;
use rayon::prelude::*;

/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 8;

#[derive(Clone, Debug)]
pub struct PackedLinear {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    /// Values sharing one scale along a row (`cols` = per channel).
    pub group: usize,
    /// Row-major codes: `row_bytes` per row.
    data: Vec<u8>,
    /// [rows, groups per row].
    scales: Vec<f32>,
}

impl PackedLinear {
    pub fn from_grid(g: &GridWeight) -> candle_core::Result<Self> {
        let (lo, hi) = g.code_range();
        if let Some(c) = g.codes.iter().find(|&&c| (c as i32) < lo || (c as i32) > hi) {
            candle_core::bail!("packed weight: code {c} outside {lo}..={hi} for {} bits", g.bits);
        }
        let data = if g.bits <= 4 {
            g.codes.chunks(g.cols).flat_map(pack_i4).collect()
        } else {
            g.codes.iter().map(|&c| c as u8).collect()
        };
        Ok(Self {
            rows: g.rows,
            cols: g.cols,
            bits: g.bits,
            group: g.group,
            data,
            scales: g.scales.clone(),
        })
    }

    fn row_bytes(&self) -> usize {
        if self.bits <= 4 {
            self.cols.div_ceil(2)
        } else {
            self.cols
        }
    }

    fn groups(&self) -> usize {
        self.cols.div_ceil(self.group)
    }

    /// Bytes held: codes and scales.
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * self.scales.len()
    }

    /// Row `r`'s codes, unpacked into `out` (length `cols`).
    fn codes_into(&self, r: usize, out: &mut [i8]) {
        let rb = self.row_bytes();
        let src = &self.data[r * rb..(r + 1) * rb];
        if self.bits <= 4 {
            unpack_i4(src, out);
        } else {
            for (o, &b) in out.iter_mut().zip(src) {
                *o = b as i8;
            }
        }
    }

    /// code · scale, row-major (for the paths that need a dense matrix, and tests).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let mut codes = vec![0i8; self.cols];
        for r in 0..self.rows {
            self.codes_into(r, &mut codes);
            for (j, g) in codes.chunks(self.group).enumerate() {
                let s = self.scales[r * self.groups() + j];
                let at = r * self.cols + j * self.group;
                scale_i8(g, s, &mut out[at..at + g.len()]);
            }
        }
        out
    }

    /// The dequantized weight as a CPU tensor [rows, cols] (a copy: for the paths that need a
    /// dense matrix, such as saving or the GPU).
    pub fn dense_tensor(&self) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_vec(self.dequantize(), (self.rows, self.cols), &candle_core::Device::Cpu)
    }

    /// `x [.., cols]` (f32, CPU) times this weight transposed, plus `bias`: [.., rows].
    pub fn forward_tensor(
        &self,
        x: &candle_core::Tensor,
        a_bits: Option<u32>,
        bias: Option<&candle_core::Tensor>,
    ) -> candle_core::Result<candle_core::Tensor> {
        if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
            candle_core::bail!(
                "packed weights run on the CPU in f32; got {:?} on {:?} (use --device cpu --dtype f32)",
                x.dtype(),
                x.device()
            );
        }
        let mut dims = x.dims().to_vec();
        if dims.last() != Some(&self.cols) {
            candle_core::bail!("packed product: input {dims:?} does not end in {}", self.cols);
        }
        let n = x.elem_count() / self.cols;
        let y = self.forward(&x.flatten_all()?.to_vec1::<f32>()?, n, a_bits);
        *dims.last_mut().expect("checked above") = self.rows;
        let y = candle_core::Tensor::from_vec(y, dims, x.device())?;
        match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(candle_core::DType::F32)?),
            None => Ok(y),
        }
    }

    /// `x` [n, cols] row-major times this weight transposed: [n, rows]. With `a_bits`, each
    /// row of x is first quantized per token (the activation fake quantizer's codes).
    pub fn forward(&self, x: &[f32], n: usize, a_bits: Option<u32>) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols, "packed product: input does not fit");
        let xq = a_bits.map(|b| quantize_rows(x, n, self.cols, b));
        let groups = self.groups();
        // Transposed result [rows, n]: each task owns whole output rows.
        let mut yt = vec![0f32; self.rows * n];
        yt.par_chunks_mut(ROWS_PER_TASK * n)
            .enumerate()
            .for_each(|(task, out)| {
                let mut codes = vec![0i8; self.cols];
                let mut wf = vec![0f32; if xq.is_some() { 0 } else { self.cols }];
                for (k, yrow) in out.chunks_mut(n).enumerate() {
                    let r = task * ROWS_PER_TASK + k;
                    self.codes_into(r, &mut codes);
                    let s = &self.scales[r * groups..(r + 1) * groups];
                    match &xq {
                        Some((q, alpha)) => {
                            for (b, y) in yrow.iter_mut().enumerate() {
                                let qb = &q[b * self.cols..(b + 1) * self.cols];
                                let mut acc = 0f32;
                                for (j, (cg, qg)) in
                                    codes.chunks(self.group).zip(qb.chunks(self.group)).enumerate()
                                {
                                    acc += s[j] * dot_i8(cg, qg) as f32;
                                }
                                *y = acc * alpha[b];
                            }
                        }
                        None => {
                            for (w, &c) in wf.iter_mut().zip(&codes) {
                                *w = c as f32;
                            }
                            for (b, y) in yrow.iter_mut().enumerate() {
                                let xb = &x[b * self.cols..(b + 1) * self.cols];
                                let mut acc = 0f32;
                                for (j, (wg, xg)) in
                                    wf.chunks(self.group).zip(xb.chunks(self.group)).enumerate()
                                {
                                    acc += s[j] * dot_f32(wg, xg);
                                }
                                *y = acc;
                            }
                        }
                    }
                }
            });
        let mut y = vec![0f32; n * self.rows];
        for (r, col) in yt.chunks(n).enumerate() {
            for (b, &v) in col.iter().enumerate() {
                y[b * self.rows + r] = v;
            }
        }
        y
    }
}

/// Per-token symmetric MinMax codes of `x` [n, cols] with `bits` bits and their scales: the
/// activation fake quantizer's (`quant::fake_quant` per token), so q·α is its output exactly.
pub fn quantize_rows(x: &[f32], n: usize, cols: usize, bits: u32) -> (Vec<i8>, Vec<f32>) {
    let qmax = ((1u32 << (bits - 1)) - 1) as f32;
    let mut q = vec![0i8; n * cols];
    let mut alpha = vec![0f32; n];
    for b in 0..n {
        let row = &x[b * cols..(b + 1) * cols];
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let a = quant::grid::group_scale(amax, qmax, quant::ScaleDtype::F32);
        alpha[b] = a;
        for (c, &v) in q[b * cols..(b + 1) * cols].iter_mut().zip(row) {
            *c = quant::grid::code(v, a, qmax);
        }
    }
    (q, alpha)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..rows * cols)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn products_from_codes_match_the_fake_quantized_weights() {
        for (bits, group) in [(4, None), (4, Some(32)), (3, Some(16)), (8, None)] {
            let (rows, cols, n) = (37, 96, 5);
            let w = weights(rows, cols, 1);
            let x = weights(n, cols, 2);
            let g = GridWeight::minmax(&w, rows, cols, bits, group, quant::ScaleDtype::F32);
            let p = PackedLinear::from_grid(&g).unwrap();
            let dense = g.values();
            assert_eq!(p.dequantize(), dense, "{bits} bits, group {group:?}");
            for a_bits in [None, Some(8)] {
                let xs = match a_bits {
                    Some(b) => {
                        let (q, a) = quantize_rows(&x, n, cols, b);
                        q.iter().enumerate().map(|(i, &c)| c as f32 * a[i / cols]).collect()
                    }
                    None => x.clone(),
                };
                let y = p.forward(&x, n, a_bits);
                for b in 0..n {
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|i| xs[b * cols + i] as f64 * dense[r * cols + i] as f64)
                            .sum();
                        let got = y[b * rows + r] as f64;
                        assert!((got - want).abs() < 1e-5 * (1.0 + want.abs()), "{got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn activation_codes_are_the_fake_quantizers() {
        let (n, cols) = (3, 40);
        let x = weights(n, cols, 3);
        let t = candle_core::Tensor::from_vec(x.clone(), (n, cols), &candle_core::Device::Cpu).unwrap();
        let fq: Vec<f32> = quant::fake_quant(&t, 8, None).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let (q, a) = quantize_rows(&x, n, cols, 8);
        let back: Vec<f32> = q.iter().enumerate().map(|(i, &c)| c as f32 * a[i / cols]).collect();
        assert_eq!(back, fq);
    }
}
