//! `y = x · wᵀ` for decoding, where each output element is one dot product in a fixed order.
//! A BLAS picks its blocking from the matrix sizes, so a row's result could change with the
//! batch size; generation must give a sequence the same tokens whatever shares its batch.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Dot product with eight running sums combined in a fixed tree (vectorises, stays deterministic).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

struct RowMatmul;

impl CustomOp2 for RowMatmul {
    fn name(&self) -> &'static str {
        "row-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => (x, w),
            _ => candle_core::bail!("row-matmul: f32 inputs expected"),
        };
        let (Some((xo, xe)), Some((wo, we))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("row-matmul: contiguous inputs expected")
        };
        let (b, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("row-matmul: inner dims differ ({k} vs {k2})");
        }
        let x = &x[xo..xe];
        let w = &w[wo..we];
        // Parallel over output features: each weight row is read once for the whole batch.
        let mut yt = vec![0f32; n * b];
        yt.par_chunks_mut(b).enumerate().for_each(|(o, col)| {
            let wr = &w[o * k..(o + 1) * k];
            for (i, c) in col.iter_mut().enumerate() {
                *c = dot(&x[i * k..(i + 1) * k], wr);
            }
        });
        let mut y = vec![0f32; b * n];
        for o in 0..n {
            for i in 0..b {
                y[i * n + o] = yt[o * b + i];
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((b, n))))
    }
}

/// `x [B, in] · w [out, in]ᵀ -> [B, out]`; deterministic per row on CPU, plain matmul elsewhere.
pub fn row_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &RowMatmul)
    } else {
        x.matmul(&w.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_do_not_depend_on_batch() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 29), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (9, 29), &dev)?;
        let all = row_matmul(&x, &w)?.to_vec2::<f32>()?;
        for (i, row) in all.iter().enumerate() {
            let one = row_matmul(&x.narrow(0, i, 1)?, &w)?.to_vec2::<f32>()?;
            assert_eq!(&one[0], row);
        }
        let reference = x.matmul(&w.t()?)?.to_vec2::<f32>()?;
        for (r, a) in reference.iter().zip(&all) {
            for (p, q) in r.iter().zip(a) {
                assert!((p - q).abs() < 1e-4);
            }
        }
        Ok(())
    }
}
