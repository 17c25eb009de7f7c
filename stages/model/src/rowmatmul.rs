//! `y = x · wᵀ` for decoding, where each output element is one dot product in a fixed order.
//! A BLAS picks its blocking from the matrix sizes, so a row's result could change with the
//! batch size; generation must give a sequence the same tokens whatever shares its batch.
//!
//! The order, for every output element: lane j of eight running sums adds the products of
//! elements j, j + 8, j + 16, ... in turn (a multiply, then an add: no FMA, which rounds once),
//! the lanes combine in a fixed tree, then the last `k % 8` products are added one by one. The
//! SIMD kernels keep that order exactly and only compute many elements at once: a tile of
//! weight rows times batch rows, each weight chunk loaded once for the whole tile.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A weight element: f32, or a bf16 held as its bits (widened to f32 exactly).
trait Elem: Copy + Send + Sync {
    fn f32(self) -> f32;

    /// Eight elements from `p` as f32 lanes.
    ///
    /// SAFETY: AVX2; `p` points at eight readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Elem for u16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
}

/// Combines the eight running sums in the fixed tree, then adds the tail products in order.
#[inline(always)]
fn finish<W: Elem>(acc: &[f32; 8], a_tail: &[f32], b_tail: &[W]) -> f32 {
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a_tail.iter().zip(b_tail) {
        s += x * y.f32();
    }
    s
}

/// The portable dot product (the reference the SIMD kernels match bit for bit).
fn dot<W: Elem>(a: &[f32], b: &[W]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j].f32();
        }
    }
    finish(&acc, ra, rb)
}

/// Which kernel this CPU runs (detected once).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
    {
        return Kernel::Avx512;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return Kernel::Avx2;
    }
    Kernel::Portable
}

/// The output buffer [b, n], written by several threads at disjoint elements.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    n: usize,
}
// SAFETY: each thread writes only the columns of its own weight rows.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// SAFETY: `i < b`, `o < n`, and no other thread writes column `o`.
    unsafe fn set(self, i: usize, o: usize, v: f32) {
        *self.ptr.add(i * self.n + o) = v;
    }
}

/// `y[i, o] = dot(x[i], w[o])` for all `i < b` and the weight rows `rows`.
fn rows_portable<W: Elem>(
    x: &[f32],
    w: &[W],
    b: usize,
    k: usize,
    rows: std::ops::Range<usize>,
    y: Out,
) {
    for o in rows {
        let wr = &w[o * k..(o + 1) * k];
        for i in 0..b {
            // SAFETY: o belongs to this call's rows only.
            unsafe { y.set(i, o, dot(&x[i * k..(i + 1) * k], wr)) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{finish, Elem, Out};
    use std::arch::x86_64::*;

    /// One tile: the `R` weight rows at the start of `w` against batch rows `i..i + C`, into
    /// output columns `col..col + R`. With `ahead`, the cache lines of the `R` rows after the
    /// tile's are fetched as the tile goes (the next tile's weights arrive while this one
    /// computes).
    #[inline(always)]
    unsafe fn tile<W: Elem, const R: usize, const C: usize>(
        x: &[f32],
        w: &[W],
        k: usize,
        i: usize,
        col: usize,
        y: Out,
        ahead: bool,
    ) {
        let chunks = k / 8;
        let xp = x.as_ptr().add(i * k);
        let wp = w.as_ptr();
        // Chunks per 64-byte line.
        let line = 64 / (8 * std::mem::size_of::<W>());
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for c in 0..chunks {
            if ahead && c % line == 0 {
                for r in 0..R {
                    let p = wp.wrapping_add((R + r) * k + c * 8);
                    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                }
            }
            let mut xv = [_mm256_setzero_ps(); C];
            for (ci, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(xp.add(ci * k + c * 8));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let wv = W::load8(wp.add(r * k + c * 8));
                for (a, xv) in row.iter_mut().zip(&xv) {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(*xv, wv));
                }
            }
        }
        let tail = chunks * 8;
        for (r, row) in acc.iter().enumerate() {
            let wr = &w[r * k..(r + 1) * k];
            for (ci, a) in row.iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                let xr = &x[(i + ci) * k..(i + ci + 1) * k];
                y.set(i + ci, col + r, finish(&lanes, &xr[tail..], &wr[tail..]));
            }
        }
    }

    /// All batch rows against the `R` weight rows at the start of `w`, `C` batch rows at a time,
    /// into output columns `col..col + R`.
    #[inline(always)]
    unsafe fn rows_of<W: Elem, const R: usize, const C: usize>(
        x: &[f32],
        w: &[W],
        b: usize,
        k: usize,
        col: usize,
        y: Out,
        ahead: bool,
    ) {
        let mut i = 0;
        while i + C <= b {
            tile::<W, R, C>(x, w, k, i, col, y, ahead && i == 0);
            i += C;
        }
        let ahead = ahead && i == 0;
        match b - i {
            3 => tile::<W, R, 3>(x, w, k, i, col, y, ahead),
            2 => tile::<W, R, 2>(x, w, k, i, col, y, ahead),
            1 => tile::<W, R, 1>(x, w, k, i, col, y, ahead),
            _ => {}
        }
    }

    /// `y[i, o] = dot(x[i], w[o])` for all `i < b` and the weight rows `rows`: tiles of `R`
    /// weight rows by `C` batch rows, or at batch 1 of `R1` weight rows. Narrow weights
    /// (bf16) shared by several tiles are widened once into f32 rows first.
    #[inline(always)]
    unsafe fn rows_tiled<W: Elem, const R: usize, const C: usize, const R1: usize>(
        x: &[f32],
        w: &[W],
        b: usize,
        k: usize,
        rows: std::ops::Range<usize>,
        y: Out,
    ) {
        let mut o = rows.start;
        if b == 1 {
            while o + R1 <= rows.end {
                tile::<W, R1, 1>(x, &w[o * k..], k, 0, o, y, true);
                o += R1;
            }
        }
        let widen = std::mem::size_of::<W>() < 4 && b > C;
        let mut wide = vec![0f32; if widen { R * k } else { 0 }];
        while o + R <= rows.end {
            let wr = &w[o * k..];
            if widen {
                for (d, s) in wide.iter_mut().zip(&wr[..R * k]) {
                    *d = s.f32();
                }
                // The widening streamed these rows; fetch the next ones meanwhile.
                for r in 0..R {
                    for c in (0..k).step_by(64 / std::mem::size_of::<W>()) {
                        let p = wr.as_ptr().wrapping_add((R + r) * k + c);
                        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                    }
                }
                rows_of::<f32, R, C>(x, &wide, b, k, o, y, false);
            } else {
                rows_of::<W, R, C>(x, wr, b, k, o, y, true);
            }
            o += R;
        }
        while o < rows.end {
            rows_of::<W, 1, C>(x, &w[o * k..], b, k, o, y, false);
            o += 1;
        }
    }

    /// AVX2: 16 ymm registers hold 12 sums, 3 inputs and a weight chunk.
    ///
    /// SAFETY: the CPU has AVX2; `x` is [b, k], `w` holds `rows`, `y` is [b, n] with no other
    /// thread writing these rows' columns.
    #[target_feature(enable = "avx2")]
    pub unsafe fn rows<W: Elem>(
        x: &[f32],
        w: &[W],
        b: usize,
        k: usize,
        rows: std::ops::Range<usize>,
        y: Out,
    ) {
        rows_tiled::<W, 4, 3, 8>(x, w, b, k, rows, y)
    }

    /// The same ymm code with AVX-512VL's 32 registers: 16 sums, 4 inputs, a weight chunk (on
    /// Zen 4, which splits zmm work in two, ymm tiles run as fast as zmm ones).
    ///
    /// SAFETY: as `rows`, with AVX-512F and VL.
    #[target_feature(enable = "avx2,avx512f,avx512vl")]
    pub unsafe fn rows_512<W: Elem>(
        x: &[f32],
        w: &[W],
        b: usize,
        k: usize,
        rows: std::ops::Range<usize>,
        y: Out,
    ) {
        rows_tiled::<W, 4, 4, 8>(x, w, b, k, rows, y)
    }
}

/// `x [b, k] · w [n, k]ᵀ -> [b, n]`, parallel over weight rows, each read once for the batch.
fn matmul_rows<W: Elem>(
    x: &[f32],
    w: &[W],
    b: usize,
    n: usize,
    k: usize,
    kernel: Kernel,
) -> Vec<f32> {
    let mut y = vec![0f32; b * n];
    let out = Out {
        ptr: y.as_mut_ptr(),
        n,
    };
    // Tasks of a few dozen weight rows: big enough to amortise a task, small enough to balance.
    let block = 32;
    let run = |rows: std::ops::Range<usize>| match kernel {
        Kernel::Portable => rows_portable(x, w, b, k, rows, out),
        // SAFETY: `kernel()` saw AVX2; shapes are checked by the caller; tasks own disjoint rows.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { avx::rows(x, w, b, k, rows, out) },
        // SAFETY: as above, with AVX-512F and VL seen.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { avx::rows_512(x, w, b, k, rows, out) },
    };
    let tasks = n.div_ceil(block);
    if tasks <= 1 {
        run(0..n);
    } else {
        (0..tasks)
            .into_par_iter()
            .for_each(|t| run(t * block..((t + 1) * block).min(n)));
    }
    y
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
        let y = matmul_rows(&x[xo..xe], &w[wo..we], b, n, k, kernel());
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

/// A weight [n, k] whose f32 values are all bf16 values (a bf16 checkpoint upcast), held as
/// bf16: `matmul` gives `row_matmul`'s bits (the widening is exact) from half the bytes.
pub struct Bf16Rows {
    bits: Vec<u16>,
    n: usize,
    k: usize,
}

impl Bf16Rows {
    /// `w` [n, k] f32 on the CPU as bf16, or `None` when a value would not survive (or `w` is
    /// elsewhere or another dtype).
    pub fn exact(w: &Tensor) -> Result<Option<Self>> {
        if !w.device().is_cpu() || w.dtype() != candle_core::DType::F32 {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        let v = &v[start..end];
        let bits: Option<Vec<u16>> = v
            .par_iter()
            .map(|x| (x.to_bits() & 0xffff == 0).then_some((x.to_bits() >> 16) as u16))
            .collect();
        Ok(bits.map(|bits| Self { bits, n, k }))
    }

    /// Whether `w` still holds exactly these values.
    pub fn same_as(&self, w: &Tensor) -> Result<bool> {
        Ok(match Self::exact(w)? {
            Some(o) => o.n == self.n && o.k == self.k && o.bits == self.bits,
            None => false,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bits.len() * 2
    }

    /// `x [B, k] · selfᵀ -> [B, n]` (f32, CPU).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for Bf16Rows {
    fn name(&self) -> &'static str {
        "row-matmul-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("row-matmul-bf16: f32 input expected")
        };
        let Some((xo, xe)) = l.contiguous_offsets() else {
            candle_core::bail!("row-matmul-bf16: contiguous input expected")
        };
        let (b, k) = l.shape().dims2()?;
        if k != self.k {
            candle_core::bail!("row-matmul-bf16: inner dims differ ({k} vs {})", self.k);
        }
        let y = matmul_rows(&x[xo..xe], &self.bits, b, self.n, k, kernel());
        Ok((CpuStorage::F32(y), Shape::from((b, self.n))))
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

    /// The kernels this CPU can run.
    fn kernels() -> Vec<Kernel> {
        let mut ks = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                ks.push(Kernel::Avx2);
            }
            if kernel() == Kernel::Avx512 {
                ks.push(Kernel::Avx512);
            }
        }
        ks
    }

    /// Every kernel gives the portable dot product's bits, at every tile remainder.
    #[test]
    fn kernels_match_the_portable_dot() {
        let mut seed = 1u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 4.0
        };
        for &(b, n, k) in &[
            (1, 70, 64),
            (16, 37, 576),
            (5, 9, 29),
            (2, 33, 7),
            (7, 8, 1537),
        ] {
            let x: Vec<f32> = (0..b * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let want: Vec<u32> = (0..b * n)
                .map(|e| dot(&x[(e / n) * k..][..k], &w[(e % n) * k..][..k]).to_bits())
                .collect();
            for kern in kernels() {
                let got: Vec<u32> = matmul_rows(&x, &w, b, n, k, kern)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                assert_eq!(got, want, "{kern:?} at b {b}, n {n}, k {k}");
            }
        }
    }

    /// A bf16-exact weight gives the f32 weight's bits; any other is refused.
    #[test]
    fn bf16_rows_match_f32() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, n, k) in &[(1, 40, 64), (16, 37, 576), (5, 9, 29)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?
                .to_dtype(candle_core::DType::BF16)?
                .to_dtype(candle_core::DType::F32)?;
            let x = Tensor::randn(0f32, 1.0, (b, k), &dev)?;
            let h = Bf16Rows::exact(&w)?.expect("bf16 values");
            let bits = |t: Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect())
            };
            assert_eq!(bits(h.matmul(&x)?)?, bits(row_matmul(&x, &w)?)?);
            let wb: Vec<u16> = w
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| (v.to_bits() >> 16) as u16)
                .collect();
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let want = bits(row_matmul(&x, &w)?)?;
            for kern in kernels() {
                let got: Vec<u32> = matmul_rows(&xv, &wb, b, n, k, kern)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                assert_eq!(got, want, "{kern:?}");
            }
        }
        let w = Tensor::randn(0f32, 1.0, (4, 8), &dev)?;
        assert!(Bf16Rows::exact(&w)?.is_none());
        Ok(())
    }

    /// Speed of the kernels at the 135M-class shapes (run with `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn speed() {
        // The best of several runs (other work on the machine only slows a run down).
        fn best(mut f: impl FnMut()) -> f64 {
            (0..15)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        }
        for &(b, n, k) in &[
            (16, 1536, 576),
            (16, 576, 1536),
            (1, 1536, 576),
            (16, 49152, 576),
            (1, 49152, 576),
        ] {
            let x = vec![0.5f32; b * k];
            let w = vec![0.25f32; n * k];
            let wb = vec![0x3e80u16; n * k];
            for kern in kernels() {
                let f = best(|| drop(std::hint::black_box(matmul_rows(&x, &w, b, n, k, kern))));
                let h = best(|| drop(std::hint::black_box(matmul_rows(&x, &wb, b, n, k, kern))));
                let gflops = 2.0 * (b * n * k) as f64 / f / 1e9;
                println!(
                    "{kern:?} b {b} n {n} k {k}: f32 {:.3} ms ({gflops:.1} GFLOP/s), bf16 {:.3} ms",
                    f * 1e3,
                    h * 1e3
                );
            }
        }
    }
}
