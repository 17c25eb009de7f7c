//! Hadamard rotation of the K/V cache quantizer (as in QuaRot): each head's K and V vectors are
//! multiplied by an orthonormal Hadamard matrix H before 4-bit rounding and by H again after
//! (H is symmetric and H·H = I). Without rounding this is the identity, so the model's
//! function is unchanged; with rounding, an outlier channel's energy is spread over the whole
//! head, so the per-token absmax no longer wastes the grid on one channel. A real cache stores
//! round(H·k) and rotates each query by H instead (q·H·round(Hk) = (Hq)·round(Hk)), and V's H
//! folds into o_proj, so nothing is rotated back at inference time.

use candle_core::{bail, DType, Device, DeviceLocation, Result, Tensor};
use std::sync::Mutex;

/// Sylvester's orthonormal Hadamard matrix of order n (a power of two), entries ±1/√n.
pub fn hadamard_values(n: usize) -> Result<Vec<f32>> {
    if n == 0 || !n.is_power_of_two() {
        bail!("a Hadamard rotation needs a power-of-two size, got {n}");
    }
    let mut m = vec![1f32];
    let mut k = 1;
    while k < n {
        let mut next = vec![0f32; 4 * k * k];
        for i in 0..k {
            for j in 0..k {
                let v = m[i * k + j];
                next[i * 2 * k + j] = v;
                next[i * 2 * k + k + j] = v;
                next[(i + k) * 2 * k + j] = v;
                next[(i + k) * 2 * k + k + j] = -v;
            }
        }
        m = next;
        k *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    Ok(m.into_iter().map(|v| v * s).collect())
}

/// The matrix as a tensor on `device` in `dtype`, built once per (device, dtype, n): a
/// host-to-device copy per layer and step would cost time and cannot run inside a CUDA-graph
/// capture (the first, eager decoding step fills this cache before capture).
pub fn hadamard(n: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    type Key = (DeviceLocation, DType, usize);
    static CACHE: Mutex<Vec<(Key, Tensor)>> = Mutex::new(Vec::new());
    let key = (device.location(), dtype, n);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, t)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(t.clone());
    }
    let t = Tensor::from_vec(hadamard_values(n)?, (n, n), device)?.to_dtype(dtype)?;
    cache.push((key, t.clone()));
    Ok(t)
}

/// Applies `f` (the per-token fake quantizer) in the rotated basis: H·f(H·x) per head of
/// `head_dim` channels. x is [..., n_kv * head_dim].
pub fn rotated(
    x: &Tensor,
    head_dim: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = *dims.last().unwrap_or(&0);
    if head_dim == 0 || !d.is_multiple_of(head_dim) {
        bail!("K/V rotation: last dim {d} is not a multiple of head_dim {head_dim}");
    }
    let rows = x.elem_count() / d;
    let h = hadamard(head_dim, x.device(), x.dtype())?;
    let per_head = (rows * d / head_dim, head_dim);
    let xr = x.reshape(per_head)?.matmul(&h)?.reshape((rows, d))?;
    f(&xr)?.reshape(per_head)?.matmul(&h)?.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hadamard_is_orthonormal_and_symmetric() {
        for n in [1, 2, 8, 64] {
            let h = hadamard_values(n).unwrap();
            for i in 0..n {
                for j in 0..n {
                    assert_eq!(h[i * n + j], h[j * n + i]);
                    let dot: f64 = (0..n).map(|k| (h[i * n + k] * h[j * n + k]) as f64).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-6, "n {n} ({i},{j}): {dot}");
                }
            }
        }
        assert!(hadamard_values(12).is_err());
    }

    #[test]
    fn rotation_without_rounding_is_the_identity_and_spreads_outliers() {
        let dev = Device::Cpu;
        // Two tokens, two heads of 8: one outlier channel per head.
        let mut v: Vec<f32> = (0..32).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
        v[3] = 20.0;
        v[24] = -15.0;
        let x = Tensor::from_vec(v, (2, 16), &dev).unwrap();
        let same = rotated(&x, 8, |t| Ok(t.clone())).unwrap();
        assert!(crate::max_abs_diff(&x, &same).unwrap() < 1e-5);
        // In the rotated basis the outlier's magnitude is spread: max |H x| = 20/√8 + small.
        let seen = std::cell::Cell::new(0f32);
        rotated(&x, 8, |t| {
            seen.set(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
            Ok(t.clone())
        })
        .unwrap();
        let seen = seen.get();
        assert!(seen < 8.0, "rotated max {seen}");
        assert!(rotated(&x, 5, |t| Ok(t.clone())).is_err());
    }
}
