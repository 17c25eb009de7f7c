//! Launches cuda/fused.cu: RMSNorm, RoPE and SwiGLU, forward and backward, one kernel each,
//! for the model crate's training ops on a GPU. Inputs must be contiguous; `x`-like tensors are
//! f32, bf16 or f16, weights and rope tables f32.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, CudaDType, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{Layout, Result, WithDType};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "pipeline_fused";

/// A tensor argument: storage and layout.
pub type Arg<'a> = (&'a CudaStorage, &'a Layout);

fn view<'a, T: CudaDType>(a: Arg<'a>, what: &str) -> Result<CudaView<'a, T>> {
    let Some((o1, o2)) = a.1.contiguous_offsets() else {
        candle_core::bail!("fused op: {what} must be contiguous")
    };
    Ok(a.0.as_cuda_slice::<T>()?.slice(o1..o2))
}

/// Calls `$f::<T>(...)` with T the element type of `$arg`'s storage.
macro_rules! by_dtype {
    ($arg:expr, $f:ident ( $($a:expr),* )) => {
        match &$arg.0.slice {
            CudaStorageSlice::F32(_) => $f::<f32>($($a),*),
            CudaStorageSlice::BF16(_) => $f::<half::bf16>($($a),*),
            CudaStorageSlice::F16(_) => $f::<half::f16>($($a),*),
            _ => candle_core::bail!("fused op: f32, bf16 or f16 expected"),
        }
    };
}

/// Threads per block of the row kernels (a multiple of 32).
fn row_threads(h: usize) -> u32 {
    (h.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// RMSNorm over the last dim (`h` values): y (x's dtype) and the per-row 1/rms (f32).
pub fn rms_forward(x: Arg, w: Arg, h: usize, eps: f32) -> Result<(CudaStorage, CudaSlice<f32>)> {
    by_dtype!(x, rms_forward_t(x, w, h, eps))
}

fn rms_forward_t<T: CudaDType + DeviceRepr + WithDType>(
    x: Arg,
    w: Arg,
    h: usize,
    eps: f32,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let dev = x.0.device.clone();
    let n = x.1.shape().elem_count();
    let rows = n / h.max(1);
    let (xv, wv) = (view::<T>(x, "x")?, view::<f32>(w, "weight")?);
    // SAFETY: the kernel writes every value of y and r.
    let (y, r) = unsafe { (dev.alloc::<T>(n)?, dev.alloc::<f32>(rows)?) };
    if rows == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(y, dev), r));
    }
    let f = dev.get_or_load_custom_func(&kernel_name::<T>("rms_fwd"), MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&xv);
    b.arg(&wv);
    b.arg(&y);
    b.arg(&r);
    candle_core::builder_arg!(b, h as u32, eps);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_threads(h), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: rows · h values in x and y, h weights, rows values of r.
    unsafe { b.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), r))
}

/// RMSNorm backward: dx (x's dtype) and, when asked, dw (f32 [h]).
pub fn rms_backward(
    x: Arg,
    w: Arg,
    r: &CudaSlice<f32>,
    dy: Arg,
    h: usize,
    want_dw: bool,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    by_dtype!(x, rms_backward_t(x, w, r, dy, None, h, want_dw))
}

/// `rms_backward` whose dx also has `res` (the residual branch's gradient, same shape and
/// dtype as x) added in, before the one rounding.
pub fn rms_backward_add(
    x: Arg,
    w: Arg,
    r: &CudaSlice<f32>,
    dy: Arg,
    res: Arg,
    h: usize,
    want_dw: bool,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    by_dtype!(x, rms_backward_t(x, w, r, dy, Some(res), h, want_dw))
}

fn rms_backward_t<T: CudaDType + DeviceRepr + WithDType>(
    x: Arg,
    w: Arg,
    r: &CudaSlice<f32>,
    dy: Arg,
    res: Option<Arg>,
    h: usize,
    want_dw: bool,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    let dev = x.0.device.clone();
    let n = x.1.shape().elem_count();
    let rows = n / h.max(1);
    if r.len() != rows || dy.1.shape().elem_count() != n {
        candle_core::bail!("fused rms-norm backward: sizes do not match the forward pass")
    }
    let (xv, wv, dyv) = (
        view::<T>(x, "x")?,
        view::<f32>(w, "weight")?,
        view::<T>(dy, "dy")?,
    );
    // SAFETY: written in full by the kernel below.
    let dx = unsafe { dev.alloc::<T>(n)? };
    let f = dev.get_or_load_custom_func(&kernel_name::<T>("rms_dx"), MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&xv);
    b.arg(&wv);
    b.arg(r);
    b.arg(&dyv);
    let resv = match res {
        Some(a) => {
            if a.1.shape().elem_count() != n {
                candle_core::bail!("fused rms-norm backward: the residual gradient's size differs")
            }
            Some(view::<T>(a, "residual gradient")?)
        }
        None => None,
    };
    let null = 0u64;
    match &resv {
        Some(v) => b.arg(v),
        None => b.arg(&null),
    };
    b.arg(&dx);
    candle_core::builder_arg!(b, h as u32);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_threads(h), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as in the forward pass.
    unsafe { b.launch(cfg) }.w()?;
    let dw = if want_dw {
        // Row chunks: enough blocks to fill the GPU, summed in chunk order afterwards.
        let chunks = rows.div_ceil(8).clamp(1, 64);
        // SAFETY: every (chunk, column) is written by rms_dw, every column by rms_dw_sum.
        let (part, dw) = unsafe { (dev.alloc::<f32>(chunks * h)?, dev.alloc::<f32>(h)?) };
        let f = dev.get_or_load_custom_func(&kernel_name::<T>("rms_dw"), MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&xv);
        b.arg(r);
        b.arg(&dyv);
        b.arg(&part);
        candle_core::builder_arg!(b, rows as u32, h as u32);
        let cfg = LaunchConfig {
            grid_dim: (h.div_ceil(32) as u32, chunks as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: part holds chunks · h values.
        unsafe { b.launch(cfg) }.w()?;
        let f = dev.get_or_load_custom_func("rms_dw_sum", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&part);
        b.arg(&dw);
        candle_core::builder_arg!(b, chunks as u32, h as u32);
        // SAFETY: dw holds h values.
        unsafe { b.launch(LaunchConfig::for_num_elems(h as u32)) }.w()?;
        Some(CudaStorage::wrap_cuda_slice(dw, dev.clone()))
    } else {
        None
    };
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), dw))
}

/// RoPE with the head transpose, f32 cos/sin [t, d/2]. `forward`: x [b, t, heads, d] ->
/// rotated [b, heads, t, d]; otherwise (the backward pass) [b, heads, t, d] -> rotated back
/// [b, t, heads, d].
pub fn rope(
    x: Arg,
    cos: Arg,
    sin: Arg,
    heads: usize,
    t: usize,
    d: usize,
    forward: bool,
) -> Result<CudaStorage> {
    by_dtype!(x, rope_t(x, cos, sin, heads, t, d, forward))
}

fn rope_t<T: CudaDType + DeviceRepr + WithDType>(
    x: Arg,
    cos: Arg,
    sin: Arg,
    heads: usize,
    t: usize,
    d: usize,
    forward: bool,
) -> Result<CudaStorage> {
    let dev = x.0.device.clone();
    let n = x.1.shape().elem_count();
    if d == 0
        || d % 2 == 1
        || !n.is_multiple_of(heads * t * d)
        || cos.1.shape().elem_count() < t * d / 2
    {
        candle_core::bail!(
            "fused rope: x of {n} values, head_dim {d}, tables for {t} positions do not fit"
        )
    }
    let (xv, cv, sv) = (
        view::<T>(x, "x")?,
        view::<f32>(cos, "cos")?,
        view::<f32>(sin, "sin")?,
    );
    // SAFETY: every pair (so every value) of y is written.
    let y = unsafe { dev.alloc::<T>(n)? };
    let pairs = (n / 2) as u64;
    if pairs == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(y, dev));
    }
    let f = dev.get_or_load_custom_func(&kernel_name::<T>("rope"), MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&xv);
    b.arg(&cv);
    b.arg(&sv);
    b.arg(&y);
    let sign = if forward { 1f32 } else { -1f32 };
    candle_core::builder_arg!(b, pairs, d as u32, heads as u32, t as u32, sign);
    // SAFETY: sizes checked above.
    unsafe { b.launch(LaunchConfig::for_num_elems(pairs as u32)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// silu(g) · u, element-wise.
pub fn swiglu_forward(g: Arg, u: Arg) -> Result<CudaStorage> {
    by_dtype!(g, swiglu_forward_t(g, u))
}

fn swiglu_forward_t<T: CudaDType + DeviceRepr + WithDType>(g: Arg, u: Arg) -> Result<CudaStorage> {
    let dev = g.0.device.clone();
    let n = g.1.shape().elem_count();
    if u.1.shape().elem_count() != n {
        candle_core::bail!("fused swiglu: gate and up differ in size")
    }
    let (gv, uv) = (view::<T>(g, "gate")?, view::<T>(u, "up")?);
    // SAFETY: written in full below.
    let y = unsafe { dev.alloc::<T>(n)? };
    if n == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(y, dev));
    }
    let f = dev.get_or_load_custom_func(&kernel_name::<T>("swiglu_fwd"), MODULE, PTX)?;
    let mut b = f.builder();
    b.arg(&gv);
    b.arg(&uv);
    b.arg(&y);
    candle_core::builder_arg!(b, n as u64);
    // SAFETY: n values each.
    unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// (d gate, d up) of silu(g) · u.
pub fn swiglu_backward(g: Arg, u: Arg, dy: Arg) -> Result<(CudaStorage, CudaStorage)> {
    by_dtype!(g, swiglu_backward_t(g, u, dy))
}

fn swiglu_backward_t<T: CudaDType + DeviceRepr + WithDType>(
    g: Arg,
    u: Arg,
    dy: Arg,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = g.0.device.clone();
    let n = g.1.shape().elem_count();
    if u.1.shape().elem_count() != n || dy.1.shape().elem_count() != n {
        candle_core::bail!("fused swiglu backward: sizes differ")
    }
    let (gv, uv, dyv) = (
        view::<T>(g, "gate")?,
        view::<T>(u, "up")?,
        view::<T>(dy, "dy")?,
    );
    // SAFETY: written in full below.
    let (dg, du) = unsafe { (dev.alloc::<T>(n)?, dev.alloc::<T>(n)?) };
    if n > 0 {
        let f = dev.get_or_load_custom_func(&kernel_name::<T>("swiglu_bwd"), MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&gv);
        b.arg(&uv);
        b.arg(&dyv);
        b.arg(&dg);
        b.arg(&du);
        candle_core::builder_arg!(b, n as u64);
        // SAFETY: n values each.
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.w()?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(dg, dev.clone()),
        CudaStorage::wrap_cuda_slice(du, dev),
    ))
}
