//! Launches cuda/attention.cu (compiled to PTX by build.rs): causal attention forward and
//! backward for the model crate's `causal_attention` on a GPU.
//!
//! Shapes: a group is one (batch, KV head); q, y, dy are [groups, rows, d] with rows = rep · t
//! (query head h of the group at position i is row h · t + i), k and v [groups, t, d]. Every
//! buffer must be contiguous; the math is f32 whatever the storage dtype.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, CudaDType, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{DType, Layout, Result, WithDType};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const MODULE: &str = "pipeline_attention";

/// Head sizes the kernels are compiled for.
pub const HEAD_DIMS: [usize; 5] = [8, 16, 32, 64, 128];

/// One call's sizes.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub groups: usize,
    /// Query rows per group (rep · t).
    pub rows: usize,
    pub t: usize,
    pub d: usize,
}

impl Dims {
    /// Rows per block and keys per shared-memory tile (as `Tile<D>::N` in the kernel file).
    fn tile(&self) -> usize {
        if self.d <= 64 {
            64
        } else {
            32
        }
    }

    fn check(&self) -> Result<()> {
        if !HEAD_DIMS.contains(&self.d) {
            candle_core::bail!(
                "causal-attention (cuda): head_dim {} is not one of {HEAD_DIMS:?}",
                self.d
            )
        }
        if self.t == 0 || !self.rows.is_multiple_of(self.t) {
            candle_core::bail!(
                "causal-attention (cuda): {} rows are not a multiple of t = {}",
                self.rows,
                self.t
            )
        }
        if self.groups * self.rows > u32::MAX as usize {
            candle_core::bail!("causal-attention (cuda): too many rows")
        }
        Ok(())
    }

    fn rep(&self) -> usize {
        self.rows / self.t
    }

    /// Grid of the row kernels (forward, dq): (rep · row tiles, groups).
    fn row_grid(&self) -> LaunchConfig {
        let n = self.tile();
        LaunchConfig {
            grid_dim: (
                (self.rep() * self.t.div_ceil(n)) as u32,
                self.groups as u32,
                1,
            ),
            block_dim: (2 * n as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, n: usize, what: &str) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("causal-attention (cuda): {what} must be contiguous")
    };
    if b - a != n {
        candle_core::bail!(
            "causal-attention (cuda): {what} has {} values, expected {n}",
            b - a
        )
    }
    Ok(s.slice(a..b))
}

/// Kernel names carry the head size and the dtype: `attn_fwd_d64_bf16`.
fn name(base: &str, d: usize, dtype: DType) -> String {
    format!("{base}_d{d}_{}", dtype.as_str())
}

/// A tensor argument: storage and layout.
pub type Arg<'a> = (&'a CudaStorage, &'a Layout);

fn slice<'a, T: CudaDType>((s, _): Arg<'a>) -> Result<&'a CudaSlice<T>> {
    s.as_cuda_slice::<T>()
}

/// Forward: returns y (q's dtype, [groups, rows, d]) and each row's log-sum-exp of the scaled
/// scores (f32, [groups, rows]), which the backward pass needs.
pub fn forward(
    q: Arg,
    k: Arg,
    v: Arg,
    dims: Dims,
    scale: f32,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    dims.check()?;
    match &q.0.slice {
        CudaStorageSlice::F32(_) => forward_t::<f32>(q, k, v, dims, scale),
        CudaStorageSlice::BF16(_) => forward_t::<half::bf16>(q, k, v, dims, scale),
        CudaStorageSlice::F16(_) => forward_t::<half::f16>(q, k, v, dims, scale),
        _ => candle_core::bail!("causal-attention (cuda): q must be f32, bf16 or f16"),
    }
}

fn forward_t<T: CudaDType + DeviceRepr + WithDType>(
    q: Arg,
    k: Arg,
    v: Arg,
    dims: Dims,
    scale: f32,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let dev = q.0.device.clone();
    let (nq, nk) = (
        dims.groups * dims.rows * dims.d,
        dims.groups * dims.t * dims.d,
    );
    let qv = view(slice::<T>(q)?, q.1, nq, "q")?;
    let kv = view(slice::<T>(k)?, k.1, nk, "k")?;
    let vv = view(slice::<T>(v)?, v.1, nk, "v")?;
    // SAFETY: the kernel writes every row of y and every lse value.
    let y = unsafe { dev.alloc::<T>(nq)? };
    let lse = unsafe { dev.alloc::<f32>(dims.groups * dims.rows)? };
    let f = dev.get_or_load_custom_func(&name("attn_fwd", dims.d, T::DTYPE), MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&qv);
    b.arg(&kv);
    b.arg(&vv);
    b.arg(&y);
    b.arg(&lse);
    candle_core::builder_arg!(b, dims.t as u32, dims.rows as u32, scale);
    // SAFETY: buffer sizes checked above match the kernel's indexing.
    unsafe { b.launch(dims.row_grid()) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), lse))
}

/// Backward: (dq, dk, dv) in q's dtype, from q, k, v, the forward's y and lse, and dy.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: Arg,
    k: Arg,
    v: Arg,
    y: Arg,
    dy: Arg,
    lse: &CudaSlice<f32>,
    dims: Dims,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    dims.check()?;
    match &q.0.slice {
        CudaStorageSlice::F32(_) => backward_t::<f32>(q, k, v, y, dy, lse, dims, scale),
        CudaStorageSlice::BF16(_) => backward_t::<half::bf16>(q, k, v, y, dy, lse, dims, scale),
        CudaStorageSlice::F16(_) => backward_t::<half::f16>(q, k, v, y, dy, lse, dims, scale),
        _ => candle_core::bail!("causal-attention (cuda): q must be f32, bf16 or f16"),
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_t<T: CudaDType + DeviceRepr + WithDType>(
    q: Arg,
    k: Arg,
    v: Arg,
    y: Arg,
    dy: Arg,
    lse: &CudaSlice<f32>,
    dims: Dims,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    let dev = q.0.device.clone();
    let (nq, nk) = (
        dims.groups * dims.rows * dims.d,
        dims.groups * dims.t * dims.d,
    );
    let nrows = dims.groups * dims.rows;
    if lse.len() != nrows {
        candle_core::bail!(
            "causal-attention (cuda): {} saved log-sum-exps for {nrows} rows",
            lse.len()
        )
    }
    let qv = view(slice::<T>(q)?, q.1, nq, "q")?;
    let kv = view(slice::<T>(k)?, k.1, nk, "k")?;
    let vv = view(slice::<T>(v)?, v.1, nk, "v")?;
    let yv = view(slice::<T>(y)?, y.1, nq, "y")?;
    let dyv = view(slice::<T>(dy)?, dy.1, nq, "dy")?;
    let rep = dims.rep();
    // SAFETY: each buffer is fully written by the kernel that produces it, before it is read.
    let (delta, dq, dkp, dvp, dk, dv) = unsafe {
        (
            dev.alloc::<f32>(nrows)?,
            dev.alloc::<T>(nq)?,
            dev.alloc::<f32>(rep * nk)?,
            dev.alloc::<f32>(rep * nk)?,
            dev.alloc::<T>(nk)?,
            dev.alloc::<T>(nk)?,
        )
    };
    let (t, rows) = (dims.t as u32, dims.rows as u32);

    let f = dev.get_or_load_custom_func(&name("attn_dq", dims.d, T::DTYPE), MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&qv);
    b.arg(&kv);
    b.arg(&vv);
    b.arg(&yv);
    b.arg(&dyv);
    b.arg(lse);
    b.arg(&delta);
    b.arg(&dq);
    candle_core::builder_arg!(b, t, rows, scale);
    // SAFETY: sizes checked above.
    unsafe { b.launch(dims.row_grid()) }.w()?;

    let n = dims.tile();
    let f = dev.get_or_load_custom_func(&name("attn_dkdv", dims.d, T::DTYPE), MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&qv);
    b.arg(&kv);
    b.arg(&vv);
    b.arg(&dyv);
    b.arg(lse);
    b.arg(&delta);
    b.arg(&dkp);
    b.arg(&dvp);
    candle_core::builder_arg!(b, t, rows, scale);
    let cfg = LaunchConfig {
        grid_dim: (dims.t.div_ceil(n) as u32, dims.groups as u32, rep as u32),
        block_dim: (2 * n as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: sizes checked above; dkp and dvp hold rep · nk values.
    unsafe { b.launch(cfg) }.w()?;

    let f = dev.get_or_load_custom_func(&kernel_name::<T>("attn_sum_heads"), MODULE, PTX)?;
    let cfg = LaunchConfig::for_num_elems(nk as u32);
    for (part, out) in [(&dkp, &dk), (&dvp, &dv)] {
        let mut b = f.builder();
        b.arg(part);
        b.arg(out);
        candle_core::builder_arg!(b, nk as u64, rep as u32);
        // SAFETY: part holds rep · nk values, out nk.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(dq, dev.clone()),
        CudaStorage::wrap_cuda_slice(dk, dev.clone()),
        CudaStorage::wrap_cuda_slice(dv, dev),
    ))
}

// ---- The score-matrix variant: cuBLAS (tensor cores) for the four products, two row kernels
// for the causal softmax and its gradient. Its [groups · rows, t] score buffers live only inside
// one call (they never become graph nodes), so it is the faster variant while they fit.

/// Largest score buffer (bytes) for which `use_scores` picks the score-matrix variant.
const SCORE_BYTES_MAX: usize = 512 << 20;

/// Whether `forward_scores` / `backward_scores` are used for these sizes (else the
/// flash-style kernels above, whose memory does not grow with t²).
/// `PIPELINE_ATTENTION=flash` forces the flash-style kernels (for benchmarks).
pub fn use_scores(dims: Dims, dtype: DType) -> bool {
    static FLASH: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let flash =
        *FLASH.get_or_init(|| std::env::var("PIPELINE_ATTENTION").is_ok_and(|v| v == "flash"));
    !flash && dims.groups * dims.rows * dims.t * dtype.size_in_bytes() <= SCORE_BYTES_MAX
}

/// [groups, n, m] contiguous from `offset`.
fn layout3(a: usize, b: usize, c: usize, offset: usize) -> Layout {
    Layout::contiguous_with_offset((a, b, c), offset)
}

fn contiguous_offset(l: &Layout, n: usize, what: &str) -> Result<usize> {
    match l.contiguous_offsets() {
        Some((a, b)) if b - a == n => Ok(a),
        _ => {
            candle_core::bail!("causal-attention (cuda): {what} must be contiguous with {n} values")
        }
    }
}

/// Runs one of the row kernels over the [groups · rows, t] buffer `s` (in place).
fn rows_kernel(
    base: &str,
    s: &mut CudaStorage,
    p: Option<&CudaStorage>,
    dims: Dims,
    scale: f32,
) -> Result<()> {
    use candle_core::backend::BackendStorage;
    let nrows = (dims.groups * dims.rows) as u64;
    let dev = s.device.clone();
    // The register-resident kernels when a row is whole 16-byte chunks, at most 4 per lane.
    let per_chunk = 16 / s.dtype().size_in_bytes();
    let reg = dims.t.is_multiple_of(per_chunk) && dims.t <= 128 * per_chunk;
    let name = if reg {
        format!("{base}_reg_{}", s.dtype().as_str())
    } else {
        format!("{base}_{}", s.dtype().as_str())
    };
    let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let cfg = LaunchConfig {
        grid_dim: (nrows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! launch {
        ($t:ty) => {{
            let mut b = f.builder();
            let pv = match p {
                Some(p) => Some(p.as_cuda_slice::<$t>()?),
                None => None,
            };
            if let Some(pv) = &pv {
                b.arg(*pv);
            }
            let sv = s.as_cuda_slice_mut::<$t>()?;
            b.arg(sv);
            candle_core::builder_arg!(b, nrows, dims.t as u32, scale);
            // SAFETY: s (and p) hold nrows · t values.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match s.dtype() {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(half::bf16),
        DType::F16 => launch!(half::f16),
        d => candle_core::bail!("causal-attention (cuda): {d:?} scores"),
    }
    Ok(())
}

/// The causal softmax probabilities P [groups, rows, t] of q and k.
fn probabilities(q: Arg, k: Arg, dims: Dims, scale: f32) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    let Dims {
        groups: g,
        rows: r,
        t,
        d,
    } = dims;
    let oq = contiguous_offset(q.1, g * r * d, "q")?;
    let ok = contiguous_offset(k.1, g * t * d, "k")?;
    let kt = layout3(g, t, d, ok).transpose(1, 2)?;
    let mut s = q.0.matmul(k.0, (g, r, t, d), &layout3(g, r, d, oq), &kt)?;
    rows_kernel("attn_softmax_rows", &mut s, None, dims, scale)?;
    Ok(s)
}

/// Forward, score-matrix variant: y [groups, rows, d] in q's dtype.
pub fn forward_scores(q: Arg, k: Arg, v: Arg, dims: Dims, scale: f32) -> Result<CudaStorage> {
    Ok(forward_scores_keep(q, k, v, dims, scale)?.0)
}

/// `forward_scores` that also returns the probabilities P [groups, rows, t], which
/// `backward_scores_with` can reuse instead of recomputing them.
pub fn forward_scores_keep(
    q: Arg,
    k: Arg,
    v: Arg,
    dims: Dims,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage)> {
    use candle_core::backend::BackendStorage;
    let Dims {
        groups: g,
        rows: r,
        t,
        d,
    } = dims;
    let p = probabilities(q, k, dims, scale)?;
    let ov = contiguous_offset(v.1, g * t * d, "v")?;
    let y = p.matmul(
        v.0,
        (g, r, d, t),
        &layout3(g, r, t, 0),
        &layout3(g, t, d, ov),
    )?;
    Ok((y, p))
}

/// Backward, score-matrix variant (recomputes P): (dq, dk, dv) in q's dtype.
pub fn backward_scores(
    q: Arg,
    k: Arg,
    v: Arg,
    dy: Arg,
    dims: Dims,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    backward_scores_with(None, q, k, v, dy, dims, scale)
}

/// `backward_scores` with the forward pass's P when kept (`forward_scores_keep`).
pub fn backward_scores_with(
    p: Option<CudaStorage>,
    q: Arg,
    k: Arg,
    v: Arg,
    dy: Arg,
    dims: Dims,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    use candle_core::backend::BackendStorage;
    let Dims {
        groups: g,
        rows: r,
        t,
        d,
    } = dims;
    let p = match p {
        Some(p) => p,
        None => probabilities(q, k, dims, scale)?,
    };
    let (oq, ok) = (
        contiguous_offset(q.1, g * r * d, "q")?,
        contiguous_offset(k.1, g * t * d, "k")?,
    );
    let (ov, ody) = (
        contiguous_offset(v.1, g * t * d, "v")?,
        contiguous_offset(dy.1, g * r * d, "dy")?,
    );
    let pl = layout3(g, r, t, 0);
    let pt = pl.transpose(1, 2)?;
    let dyl = layout3(g, r, d, ody);
    // dv = Pᵀ dy: the sum over all `rep` query heads of the group comes with the product.
    let dv = p.matmul(dy.0, (g, t, d, r), &pt, &dyl)?;
    // dS = P ∘ (dy vᵀ - rowsum) · scale, in place in the dP buffer.
    let mut ds = dy.0.matmul(
        v.0,
        (g, r, t, d),
        &dyl,
        &layout3(g, t, d, ov).transpose(1, 2)?,
    )?;
    rows_kernel("attn_softmax_grad_rows", &mut ds, Some(&p), dims, scale)?;
    drop(p);
    let dq = ds.matmul(k.0, (g, r, d, t), &pl, &layout3(g, t, d, ok))?;
    let dk = ds.matmul(q.0, (g, t, d, r), &pt, &layout3(g, r, d, oq))?;
    Ok((dq, dk, dv))
}
