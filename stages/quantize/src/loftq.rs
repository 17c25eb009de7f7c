//! LoftQ (Li et al., 2023): the quantized base Q and the LoRA adapters chosen together, so that
//! dequant(Q) + scale * B A approximates the original weight W better than dequant(Q) alone.
//!
//! T alternating steps (DESIGN.md, Students): Q_t = quant(W - B_{t-1} A_{t-1}) with
//! B_0 A_0 = 0; then the rank-r SVD of W - dequant(Q_t) = U S V^T gives L = U_r sqrt(S_r) and
//! R = sqrt(S_r) V_r^T (peft's orientation: A is r x in, B is out x r). peft stores A = R,
//! B = L and applies them with scale alpha / r, which reconstructs only when alpha = r; we
//! store A = R / sqrt(scale), B = L / sqrt(scale), so scale * B A = L R for every alpha (and
//! the tensors are peft's when alpha = r).
//!
//! The quantizer is the stage's own (`kernel::quantize_pack`, bitsandbytes-identical for nf4),
//! so Q_1 is plain block quantization, byte for byte. The SVD is faer's exact thin SVD in
//! f32, one matrix per thread (sequential inside), so the result does not depend on the
//! number of threads.

use crate::kernel::{quantize_pack, PackedTensor};
use anyhow::{bail, Result};
use faer::{Mat, Par};
use quant::block_folder::LoftqSettings;
use quant::{dequantize_packed, CodeBook};

/// One weight after LoftQ.
pub struct LoftqWeight {
    /// Q_T, as the stage stores it.
    pub q: PackedTensor,
    /// A (rank x cols) and B (rows x rank), row-major, scale folded out (see the module doc).
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    /// ||W - dequant(Q_T)||_F / ||W||_F: the base alone.
    pub rel_error: f64,
    /// ||W - dequant(Q_1)||_F / ||W||_F: plain block quantization.
    pub plain_rel_error: f64,
    /// ||W - (dequant(Q_T) + scale B A)||_F / ||W||_F.
    pub loftq_rel_error: f64,
}

/// The quantizer LoftQ alternates with (the stage's settings).
pub struct Quantizer {
    pub block: usize,
    pub codebook: CodeBook,
    pub double_quant: bool,
}

impl Quantizer {
    fn quantize(&self, x: &[f32]) -> (PackedTensor, Vec<f32>) {
        let q = quantize_pack(x, self.block, self.codebook, self.double_quant);
        let deq = dequantize_packed(
            &q.packed,
            x.len(),
            self.block,
            &self.codebook.values(),
            self.codebook.bits(),
            &q.scales.values(),
        );
        (q, deq)
    }
}

/// LoftQ of the row-major `rows x cols` weight `w` (rows = outputs); `step` is called after
/// each alternating step (for a progress bar).
pub fn loftq(
    w: &[f32],
    rows: usize,
    cols: usize,
    s: &LoftqSettings,
    quantizer: &Quantizer,
    step: &(dyn Fn() + Sync),
) -> Result<LoftqWeight> {
    let r = s.rank;
    if w.len() != rows * cols {
        bail!("loftq: {} values for a {rows} x {cols} matrix", w.len());
    }
    if r > rows.min(cols) {
        bail!(
            "lora_rank = {r} is larger than a {rows} x {cols} matrix allows (at most {})",
            rows.min(cols)
        );
    }
    let norm_w = frobenius(w.iter().map(|&v| v as f64));
    let mut target = w.to_vec();
    let mut plain = 0.0;
    let mut last = None;
    for t in 0..s.iters {
        let (q, deq) = quantizer.quantize(&target);
        if t == 0 {
            plain = frobenius(w.iter().zip(&deq).map(|(&a, &b)| a as f64 - b as f64))
                / norm_w.max(f64::MIN_POSITIVE);
        }
        let residual = Mat::<f32>::from_fn(rows, cols, |i, j| w[i * cols + j] - deq[i * cols + j]);
        let (l, rr) = low_rank(&residual, r)?;
        if t + 1 < s.iters {
            let lr = product(&l, &rr);
            for ((t, &x), &y) in target.iter_mut().zip(w).zip(&lr) {
                *t = x - y;
            }
        }
        last = Some((q, deq, l, rr));
        step();
    }
    let (q, deq, l, rr) = last.expect("iters >= 1");
    let lr = product(&l, &rr);
    let base = frobenius(w.iter().zip(&deq).map(|(&a, &b)| a as f64 - b as f64));
    let err = frobenius((0..rows * cols).map(|k| w[k] as f64 - deq[k] as f64 - lr[k] as f64));
    let unscale = (1.0 / s.scale().sqrt()) as f32;
    let a = (0..r * cols)
        .map(|k| rr[(k / cols, k % cols)] * unscale)
        .collect();
    let b = (0..rows * r).map(|k| l[(k / r, k % r)] * unscale).collect();
    Ok(LoftqWeight {
        q,
        a,
        b,
        rel_error: base / norm_w.max(f64::MIN_POSITIVE),
        plain_rel_error: plain,
        loftq_rel_error: err / norm_w.max(f64::MIN_POSITIVE),
    })
}

/// L = U_r sqrt(S_r) (rows x r) and R = sqrt(S_r) V_r^T (r x cols) of the exact thin SVD,
/// computed sequentially (the caller runs matrices in parallel).
fn low_rank(m: &Mat<f32>, r: usize) -> Result<(Mat<f32>, Mat<f32>)> {
    use dyn_stack::{MemBuffer, MemStack};
    use faer::diag::Diag;
    use faer::linalg::svd::{svd, svd_scratch, ComputeSvdVectors};
    let (rows, cols) = m.shape();
    let size = rows.min(cols);
    let (mut u, mut v, mut sv) = (
        Mat::<f32>::zeros(rows, size),
        Mat::<f32>::zeros(cols, size),
        Diag::<f32>::zeros(size),
    );
    let thin = ComputeSvdVectors::Thin;
    let mut buf = MemBuffer::new(svd_scratch::<f32>(
        rows,
        cols,
        thin,
        thin,
        Par::Seq,
        Default::default(),
    ));
    svd(
        m.as_ref(),
        sv.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        Par::Seq,
        MemStack::new(&mut buf),
        Default::default(),
    )
    .map_err(|e| anyhow::anyhow!("loftq: the SVD did not converge ({e:?})"))?;
    let sv = sv.column_vector();
    let root: Vec<f32> = (0..r).map(|k| sv[k].max(0.0).sqrt()).collect();
    let l = Mat::<f32>::from_fn(rows, r, |i, k| u[(i, k)] * root[k]);
    let rr = Mat::<f32>::from_fn(r, cols, |k, j| root[k] * v[(j, k)]);
    Ok((l, rr))
}

/// L R, row-major, in a fixed summation order.
fn product(l: &Mat<f32>, rr: &Mat<f32>) -> Vec<f32> {
    let (rows, r, cols) = (l.nrows(), l.ncols(), rr.ncols());
    let rrow: Vec<Vec<f32>> = (0..r)
        .map(|k| (0..cols).map(|j| rr[(k, j)]).collect())
        .collect();
    let mut out = vec![0f32; rows * cols];
    for (i, o) in out.chunks_mut(cols).enumerate() {
        for (k, row) in rrow.iter().enumerate() {
            let lik = l[(i, k)];
            for (x, &y) in o.iter_mut().zip(row) {
                *x += lik * y;
            }
        }
    }
    out
}

fn frobenius(it: impl Iterator<Item = f64>) -> f64 {
    it.map(|v| v * v).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                let mut acc = 0f32;
                for _ in 0..4 {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                }
                acc
            })
            .collect()
    }

    fn settings(rank: usize, iters: u32, alpha: f64) -> LoftqSettings {
        LoftqSettings {
            rank,
            iters,
            alpha,
            targets: vec!["q_proj".into()],
        }
    }

    const NF2: Quantizer = Quantizer {
        block: 64,
        codebook: CodeBook::Nf2,
        double_quant: false,
    };

    #[test]
    fn first_step_is_plain_quantization_and_adapters_reduce_the_error() {
        let (rows, cols) = (48, 96);
        let w = sample(rows * cols, 3);
        let one = loftq(&w, rows, cols, &settings(8, 1, 8.0), &NF2, &|| {}).unwrap();
        let plain = quantize_pack(&w, 64, CodeBook::Nf2, false);
        assert_eq!(one.q.packed, plain.packed);
        assert!((one.plain_rel_error - plain.rel_error).abs() < 1e-9);
        assert!(one.loftq_rel_error < one.plain_rel_error);
        let five = loftq(&w, rows, cols, &settings(8, 5, 8.0), &NF2, &|| {}).unwrap();
        assert!(five.loftq_rel_error < one.loftq_rel_error);
    }

    #[test]
    fn adapters_reconstruct_the_residual_whatever_alpha() {
        let (rows, cols) = (32, 64);
        let w = sample(rows * cols, 5);
        let a = loftq(&w, rows, cols, &settings(4, 2, 4.0), &NF2, &|| {}).unwrap();
        let b = loftq(&w, rows, cols, &settings(4, 2, 16.0), &NF2, &|| {}).unwrap();
        assert_eq!(a.q.packed, b.q.packed);
        assert!((a.loftq_rel_error - b.loftq_rel_error).abs() < 1e-6);
        // B A scaled by alpha / r is the same product.
        let prod = |x: &LoftqWeight, scale: f32, i: usize, j: usize| -> f32 {
            (0..4)
                .map(|k| x.b[i * 4 + k] * x.a[k * cols + j])
                .sum::<f32>()
                * scale
        };
        for (i, j) in [(0, 0), (5, 17), (31, 63)] {
            assert!((prod(&a, 1.0, i, j) - prod(&b, 4.0, i, j)).abs() < 1e-5);
        }
    }

    #[test]
    fn rank_larger_than_the_matrix_is_refused() {
        let w = sample(8 * 64, 1);
        let e = loftq(&w, 8, 64, &settings(9, 1, 9.0), &NF2, &|| {})
            .err()
            .unwrap();
        assert!(e.to_string().contains("lora_rank = 9"), "{e}");
    }
}
