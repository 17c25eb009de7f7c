//! A projection kept as its low-bit codes and scales, multiplied from the codes.
//!
//! Up to 4 bits, two codes share a byte (`code + 8`, in blocks of 32); otherwise a byte each. Scales
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

use super::kernels::{
    dot_f32, dot_i8, pack_q4_blocks, q4_dot_f32, q4_dot_i8_rows, scale_i8, unpack_q4_blocks,
};
use quant::GridWeight;
use rayon::prelude::*;

/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 16;
/// Codes per 4-bit block (16 bytes).
const BLOCK: usize = 32;

/// How the codes lie in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Up to 4 bits with groups of whole 32-code blocks (or one group per row): each row
    /// padded to whole blocks of 16 bytes (`kernels::pack_q4_blocks`).
    Q4Blocks,
    /// One signed byte per code: 5 to 8 bits, or groups that do not fill whole blocks.
    Bytes,
}

#[derive(Clone, Debug)]
pub struct PackedLinear {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    /// Values sharing one scale along a row (`cols` = per channel).
    pub group: usize,
    layout: Layout,
    /// Row-major codes: `row_bytes` per row.
    data: Vec<u8>,
    /// [rows, groups per row].
    scales: Vec<f32>,
    /// The codes and scales uploaded to a GPU, made on first use there (`device_parts`).
    on_device: std::sync::OnceLock<(candle_core::Tensor, candle_core::Tensor)>,
}

impl PackedLinear {
    pub fn from_grid(g: &GridWeight) -> candle_core::Result<Self> {
        let (lo, hi) = g.code_range();
        if let Some(c) = g
            .codes
            .iter()
            .find(|&&c| (c as i32) < lo || (c as i32) > hi)
        {
            candle_core::bail!(
                "packed weight: code {c} outside {lo}..={hi} for {} bits",
                g.bits
            );
        }
        let layout = if g.bits <= 4 && (g.group >= g.cols || g.group.is_multiple_of(BLOCK)) {
            Layout::Q4Blocks
        } else {
            Layout::Bytes
        };
        let data = match layout {
            Layout::Q4Blocks => g.codes.chunks(g.cols).flat_map(pack_q4_blocks).collect(),
            Layout::Bytes => g.codes.iter().map(|&c| c as u8).collect(),
        };
        Ok(Self {
            rows: g.rows,
            cols: g.cols,
            bits: g.bits,
            group: g.group.min(g.cols),
            layout,
            data,
            scales: g.scales.clone(),
            on_device: std::sync::OnceLock::new(),
        })
    }

    /// Whether the GPU kernels take this weight: 4-bit blocks, rows of whole blocks.
    pub fn gpu_ready(&self) -> bool {
        self.layout == Layout::Q4Blocks && self.cols.is_multiple_of(BLOCK)
    }

    /// The codes u8 [rows, cols / 2] and scales f32 [rows, groups] on `device` (for
    /// `gpu_ready` weights), uploaded once: the GPU holds the codes, never a dense copy.
    pub fn device_parts(
        &self,
        device: &candle_core::Device,
    ) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor)> {
        if !self.gpu_ready() {
            candle_core::bail!(
                "packed weight [{}, {}] with {} bits: the GPU kernels take 4-bit codes in rows of whole 32-value blocks",
                self.rows,
                self.cols,
                self.bits
            );
        }
        let upload = || -> candle_core::Result<_> {
            let codes =
                candle_core::Tensor::from_slice(&self.data, (self.rows, self.cols / 2), device)?;
            let scales =
                candle_core::Tensor::from_slice(&self.scales, (self.rows, self.groups()), device)?;
            Ok((codes, scales))
        };
        if let Some(p) = self.on_device.get() {
            if p.0.device().same_device(device) {
                return Ok(p.clone());
            }
            return upload();
        }
        let p = upload()?;
        Ok(self.on_device.get_or_init(|| p).clone())
    }

    /// The codes and scales of `ps` (`gpu_ready`, with one width and group) stacked along the
    /// rows and uploaded to `device`: projections that share their input multiply as one.
    pub fn stacked_parts(
        ps: &[&PackedLinear],
        device: &candle_core::Device,
    ) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor)> {
        let Some(first) = ps.first() else {
            candle_core::bail!("packed weight: nothing to stack")
        };
        if let Some(p) = ps
            .iter()
            .find(|p| !p.gpu_ready() || p.cols != first.cols || p.group != first.group)
        {
            candle_core::bail!(
                "packed weights [{}, {}] (group {}) and [{}, {}] (group {}) cannot be stacked for the GPU",
                first.rows,
                first.cols,
                first.group,
                p.rows,
                p.cols,
                p.group
            );
        }
        let rows: usize = ps.iter().map(|p| p.rows).sum();
        let data: Vec<u8> = ps.iter().flat_map(|p| p.data.iter().copied()).collect();
        let scales: Vec<f32> = ps.iter().flat_map(|p| p.scales.iter().copied()).collect();
        Ok((
            candle_core::Tensor::from_vec(data, (rows, first.cols / 2), device)?,
            candle_core::Tensor::from_vec(scales, (rows, first.groups()), device)?,
        ))
    }

    /// Values per scale along a row (`cols` when per channel).
    pub fn group(&self) -> usize {
        self.group
    }

    /// The dense weight [rows, cols] in `dtype` on `device`: on a GPU dequantized there from
    /// the codes (a transient copy for one product), elsewhere from the host codes.
    pub fn dense_on(
        &self,
        device: &candle_core::Device,
        dtype: candle_core::DType,
    ) -> candle_core::Result<candle_core::Tensor> {
        #[cfg(feature = "cuda")]
        if device.is_cuda()
            && self.gpu_ready()
            && matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16)
        {
            let (codes, scales) = self.device_parts(device)?;
            return gpu::dequantize(&codes, &scales, self.group, dtype);
        }
        self.dense_tensor()?.to_device(device)?.to_dtype(dtype)
    }

    /// Columns rounded up to whole blocks (the 4-bit layout's padded row).
    fn padded_cols(&self) -> usize {
        self.cols.div_ceil(BLOCK) * BLOCK
    }

    fn row_bytes(&self) -> usize {
        match self.layout {
            Layout::Q4Blocks => self.padded_cols() / 2,
            Layout::Bytes => self.cols,
        }
    }

    fn groups(&self) -> usize {
        self.cols.div_ceil(self.group)
    }

    /// Bytes held: codes and scales.
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * self.scales.len()
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// code · scale, row-major (for the paths that need a dense matrix, and tests).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let mut codes = vec![0i8; self.cols];
        for r in 0..self.rows {
            match self.layout {
                Layout::Q4Blocks => unpack_q4_blocks(self.row(r), &mut codes),
                Layout::Bytes => codes
                    .iter_mut()
                    .zip(self.row(r))
                    .for_each(|(c, &b)| *c = b as i8),
            }
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
        candle_core::Tensor::from_vec(
            self.dequantize(),
            (self.rows, self.cols),
            &candle_core::Device::Cpu,
        )
    }

    /// `x [.., cols]` (f32, CPU) times this weight transposed, plus `bias`: [.., rows].
    pub fn forward_tensor(
        &self,
        x: &candle_core::Tensor,
        a_bits: Option<u32>,
        bias: Option<&candle_core::Tensor>,
    ) -> candle_core::Result<candle_core::Tensor> {
        if !x.device().is_cpu() {
            // A GPU: the weight dequantized per product (the decoding step reads the codes
            // directly), activations fake-quantized as in training.
            let x = match a_bits {
                Some(b) => quant::fake_quant(x, b, None)?,
                None => x.clone(),
            };
            let w = self.dense_on(x.device(), x.dtype())?;
            let y = crate::llama::matmul_t(&x, &w)?;
            return match bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                None => Ok(y),
            };
        }
        if x.dtype() != candle_core::DType::F32 {
            candle_core::bail!(
                "packed weights run on the CPU in f32; got {:?} (use --dtype f32)",
                x.dtype()
            );
        }
        let mut dims = x.dims().to_vec();
        if dims.last() != Some(&self.cols) {
            candle_core::bail!(
                "packed product: input {dims:?} does not end in {}",
                self.cols
            );
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
        let (cols, group, groups) = (self.cols, self.group, self.groups());
        // The 4-bit layout reads rows padded to whole blocks: pad x with zeros to match.
        let width = match self.layout {
            Layout::Q4Blocks => self.padded_cols(),
            Layout::Bytes => cols,
        };
        let pad = |v: &[f32]| -> Vec<f32> {
            if width == cols {
                return v.to_vec();
            }
            let mut out = vec![0f32; n * width];
            for b in 0..n {
                out[b * width..b * width + cols].copy_from_slice(&v[b * cols..(b + 1) * cols]);
            }
            out
        };
        let acts = match a_bits {
            Some(bits) => {
                let (q, alpha) = quantize_rows(x, n, cols, bits);
                let mut qp = vec![0i8; n * width];
                for b in 0..n {
                    qp[b * width..b * width + cols].copy_from_slice(&q[b * cols..(b + 1) * cols]);
                }
                // Σ q per (token, group): the 4-bit kernel's offset correction.
                let qsum: Vec<i32> = (0..n)
                    .flat_map(|b| {
                        let row = &q[b * cols..(b + 1) * cols];
                        row.chunks(group)
                            .map(|g| g.iter().map(|&v| v as i32).sum::<i32>())
                            .collect::<Vec<_>>()
                    })
                    .collect();
                Acts::Int { q: qp, alpha, qsum }
            }
            None => Acts::Float(pad(x)),
        };
        // A group's span in the padded row: whole blocks, the last group running to the end.
        let span = |j: usize| {
            (
                j * group,
                if j + 1 == groups {
                    width
                } else {
                    (j + 1) * group
                },
            )
        };
        // Transposed result [rows, n]: each task owns whole output rows.
        let mut yt = vec![0f32; self.rows * n];
        // Few, large tasks: a product is microseconds of work at batch 1, and each task
        // costs a wake-up.
        let per_task = ROWS_PER_TASK.max(self.rows.div_ceil(2 * rayon::current_num_threads()));
        yt.par_chunks_mut(per_task * n)
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * per_task;
                match (self.layout, &acts) {
                    (Layout::Q4Blocks, Acts::Int { q, alpha, qsum }) => {
                        self.q4_int_rows(first, out, n, width, q, alpha, qsum)
                    }
                    (Layout::Q4Blocks, Acts::Float(xp)) => {
                        for (row, s, yrow) in self.out_rows(first, out, n) {
                            for (b, y) in yrow.iter_mut().enumerate() {
                                let xb = &xp[b * width..(b + 1) * width];
                                let mut acc = 0f32;
                                for (j, sj) in s.iter().enumerate() {
                                    let (lo, hi) = span(j);
                                    acc += sj * q4_dot_f32(&row[lo / 2..hi / 2], &xb[lo..hi]);
                                }
                                *y = acc;
                            }
                        }
                    }
                    (Layout::Bytes, Acts::Int { q, alpha, .. }) => {
                        for (row, s, yrow) in self.out_rows(first, out, n) {
                            // SAFETY-free reinterpretation: the bytes are the i8 codes.
                            let codes: Vec<i8> = row.iter().map(|&b| b as i8).collect();
                            for (b, y) in yrow.iter_mut().enumerate() {
                                let qb = &q[b * width..(b + 1) * width];
                                let mut acc = 0f32;
                                for (j, (cg, qg)) in
                                    codes.chunks(group).zip(qb.chunks(group)).enumerate()
                                {
                                    acc += s[j] * dot_i8(cg, qg) as f32;
                                }
                                *y = acc * alpha[b];
                            }
                        }
                    }
                    (Layout::Bytes, Acts::Float(xp)) => {
                        let mut wf = vec![0f32; cols];
                        for (row, s, yrow) in self.out_rows(first, out, n) {
                            for (w, &c) in wf.iter_mut().zip(row) {
                                *w = c as i8 as f32;
                            }
                            for (b, y) in yrow.iter_mut().enumerate() {
                                let xb = &xp[b * width..(b + 1) * width];
                                let mut acc = 0f32;
                                for (j, (wg, xg)) in
                                    wf.chunks(group).zip(xb.chunks(group)).enumerate()
                                {
                                    acc += s[j] * dot_f32(wg, xg);
                                }
                                *y = acc;
                            }
                        }
                    }
                }
            });
        // [rows, n] -> [n, rows], 16 tokens at a time: one cache line of yt per row read,
        // 16 rows of y written.
        let mut y = vec![0f32; n * self.rows];
        for b0 in (0..n).step_by(16) {
            let b1 = (b0 + 16).min(n);
            for (r, col) in yt.chunks(n).enumerate() {
                for (b, &v) in col[b0..b1].iter().enumerate() {
                    y[(b0 + b) * self.rows + r] = v;
                }
            }
        }
        y
    }

    /// Output rows `first..` of a task's share `out` ([rows here, n]): each row's codes, its
    /// scales and its n outputs.
    fn out_rows<'a>(
        &'a self,
        first: usize,
        out: &'a mut [f32],
        n: usize,
    ) -> impl Iterator<Item = (&'a [u8], &'a [f32], &'a mut [f32])> {
        let groups = self.groups();
        out.chunks_mut(n).enumerate().map(move |(k, yrow)| {
            let r = first + k;
            (
                self.row(r),
                &self.scales[r * groups..(r + 1) * groups],
                yrow,
            )
        })
    }

    /// Output rows `first..` of the W4A8 product into `out` ([rows here, n], transposed):
    /// two weight rows at a time over all tokens, with the same integers and the same f32
    /// steps per output as one row and token at a time.
    #[allow(clippy::too_many_arguments)]
    fn q4_int_rows(
        &self,
        first: usize,
        out: &mut [f32],
        n: usize,
        width: usize,
        q: &[i8],
        alpha: &[f32],
        qsum: &[i32],
    ) {
        let (group, groups) = (self.group, self.groups());
        let rows_here = out.len() / n;
        let mut d = [vec![0i32; n], vec![0i32; n]];
        for r0 in (0..rows_here).step_by(2) {
            // A last odd row is computed twice and written once.
            let rr = [r0, (r0 + 1).min(rows_here - 1)].map(|k| first + k);
            for j in 0..groups {
                // The group's span in the padded row: the last group runs to the end.
                let (lo, hi) = (
                    j * group,
                    if j + 1 == groups {
                        width
                    } else {
                        (j + 1) * group
                    },
                );
                let [d0, d1] = &mut d;
                q4_dot_i8_rows(
                    rr.map(|r| &self.row(r)[lo / 2..hi / 2]),
                    &q[lo..],
                    width,
                    [d0, d1],
                );
                for (i, &r) in rr.iter().enumerate().take(rows_here - r0) {
                    let sj = self.scales[r * groups + j];
                    let acc = &mut out[(r0 + i) * n..(r0 + i + 1) * n];
                    for (b, (a, &dot)) in acc.iter_mut().zip(&d[i]).enumerate() {
                        *a += sj * (dot - 8 * qsum[b * groups + j]) as f32;
                    }
                }
            }
            for i in 0..(rows_here - r0).min(2) {
                let acc = &mut out[(r0 + i) * n..(r0 + i + 1) * n];
                for (a, &al) in acc.iter_mut().zip(alpha) {
                    *a *= al;
                }
            }
        }
    }
}

/// The GPU side: gpu-kernels' dequantization on candle tensors.
#[cfg(feature = "cuda")]
pub(crate) mod gpu {
    use candle_core::{bail, DType, Result, Storage, Tensor};

    pub fn dequantize(
        codes: &Tensor,
        scales: &Tensor,
        group: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        let (rows, half) = codes.dims2()?;
        let out = Tensor::zeros((rows, 2 * half), dtype, codes.device())?;
        {
            let (gc, gs, go) = (
                codes.storage_and_layout(),
                scales.storage_and_layout(),
                out.storage_and_layout(),
            );
            let (Storage::Cuda(c), Storage::Cuda(s), Storage::Cuda(o)) = (&*gc.0, &*gs.0, &*go.0)
            else {
                bail!("packed weight: dequantizing on a GPU needs CUDA tensors")
            };
            gpu_kernels::decode::dequant_q4_into((c, gc.1), (s, gs.1), group, (o, go.1))?;
        }
        Ok(out)
    }
}

/// The activations of one product, as the kernels read them (rows padded to the layout).
enum Acts {
    Float(Vec<f32>),
    Int {
        q: Vec<i8>,
        alpha: Vec<f32>,
        qsum: Vec<i32>,
    },
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
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn products_from_codes_match_the_fake_quantized_weights() {
        for (bits, group) in [
            (4, None),
            (4, Some(32)),
            (4, Some(64)),
            (3, Some(16)),
            (8, None),
            (2, Some(128)),
        ] {
            for cols in [96, 100] {
                let (rows, n) = (37, 5);
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
                            q.iter()
                                .enumerate()
                                .map(|(i, &c)| c as f32 * a[i / cols])
                                .collect()
                        }
                        None => x.clone(),
                    };
                    let y = p.forward(&x, n, a_bits);
                    if let Some(b) = a_bits {
                        // Bit for bit the per-(row, token) sum: exact integer dots per group,
                        // then the f32 steps in group order, whatever the tiling.
                        let (q, a) = quantize_rows(&x, n, cols, b);
                        let groups = cols.div_ceil(g.group);
                        for t in 0..n {
                            for r in 0..rows {
                                let mut acc = 0f32;
                                for j in 0..groups {
                                    let d: i32 = (j * g.group..((j + 1) * g.group).min(cols))
                                        .map(|i| {
                                            g.codes[r * cols + i] as i32 * q[t * cols + i] as i32
                                        })
                                        .sum();
                                    acc += g.scales[r * groups + j] * d as f32;
                                }
                                let want = acc * a[t];
                                assert_eq!(
                                    y[t * rows + r].to_bits(),
                                    want.to_bits(),
                                    "{bits} bits, group {group:?}, cols {cols}, row {r}, token {t}"
                                );
                            }
                        }
                    }
                    for b in 0..n {
                        for r in 0..rows {
                            let want: f64 = (0..cols)
                                .map(|i| xs[b * cols + i] as f64 * dense[r * cols + i] as f64)
                                .sum();
                            let got = y[b * rows + r] as f64;
                            assert!(
                                (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                                "{got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn activation_codes_are_the_fake_quantizers() {
        let (n, cols) = (3, 40);
        let x = weights(n, cols, 3);
        let t =
            candle_core::Tensor::from_vec(x.clone(), (n, cols), &candle_core::Device::Cpu).unwrap();
        let fq: Vec<f32> = quant::fake_quant(&t, 8, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (q, a) = quantize_rows(&x, n, cols, 8);
        let back: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(i, &c)| c as f32 * a[i / cols])
            .collect();
        assert_eq!(back, fq);
    }
}
