//! Launches cuda/train_step.cu, and cuBLAS products written straight into f32 gradient
//! buffers: the pieces of the whole-block training op (model's fused_block.rs) and of the fused
//! optimizer (train's optim.rs). Gradient buffers and optimizer state are addressed by raw
//! device pointers: they are written in place on the device's one stream, in stream order.

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys as bsys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, CudaDType, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{DType, Layout, Result, WithDType};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train_step.ptx"));
const MODULE: &str = "pipeline_train_step";

/// A tensor argument: storage and layout.
pub type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// Device address of the first element of a contiguous tensor argument, and its dtype.
pub fn address(a: Arg, what: &str) -> Result<(u64, DType)> {
    let Some((o, _)) = a.1.contiguous_offsets() else {
        candle_core::bail!("train step: {what} must be contiguous")
    };
    let stream = a.0.device.cuda_stream();
    let (ptr, dtype) = match &a.0.slice {
        CudaStorageSlice::F32(s) => (s.device_ptr(&stream).0, DType::F32),
        CudaStorageSlice::BF16(s) => (s.device_ptr(&stream).0, DType::BF16),
        CudaStorageSlice::F16(s) => (s.device_ptr(&stream).0, DType::F16),
        _ => candle_core::bail!("train step: {what} must be f32, bf16 or f16"),
    };
    Ok((ptr + (o * dtype.size_in_bytes()) as u64, dtype))
}

fn blas_type(d: DType) -> Result<bsys::cudaDataType> {
    Ok(match d {
        DType::F32 => bsys::cudaDataType::CUDA_R_32F,
        DType::BF16 => bsys::cudaDataType::CUDA_R_16BF,
        DType::F16 => bsys::cudaDataType::CUDA_R_16F,
        d => candle_core::bail!("train step: no cuBLAS product for {d:?}"),
    })
}

/// One operand of `gemm`: a row-major matrix at a device address with its row stride, read
/// transposed when `t`.
#[derive(Clone, Copy)]
pub struct Operand {
    pub ptr: u64,
    pub dtype: DType,
    pub ld: usize,
    pub t: bool,
}

impl Operand {
    pub fn of(a: Arg, ld: usize, t: bool, what: &str) -> Result<Self> {
        let (ptr, dtype) = address(a, what)?;
        Ok(Self { ptr, dtype, ld, t })
    }
}

/// Row-major C [m, n] = op(A) [m, k] · op(B) [k, n] + beta · C, products in f32 (tensor cores
/// for bf16/f16), C in its own dtype (f32 for gradient buffers). `dev` gives the cuBLAS handle
/// and stream; every address must hold the sizes given.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    dev: &candle_core::CudaDevice,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: u64,
    c_dtype: DType,
    beta: f32,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let blas_handle = dev.cublas_handle();
    let op = |t: bool| {
        if t {
            bsys::cublasOperation_t::CUBLAS_OP_T
        } else {
            bsys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let compute =
        if a.dtype == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32() {
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
    let alpha = 1.0f32;
    // Column-major view of the row-major product: Cᵀ [n, m] = op(B)ᵀ · op(A)ᵀ.
    // SAFETY: the caller guarantees the addresses and sizes; alpha and beta outlive the call.
    unsafe {
        blas::gemm_ex(
            *blas_handle.handle(),
            op(b.t),
            op(a.t),
            n as i32,
            m as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            b.ptr as *const _,
            blas_type(b.dtype)?,
            b.ld as i32,
            a.ptr as *const _,
            blas_type(a.dtype)?,
            a.ld as i32,
            &beta as *const f32 as *const _,
            c as *mut _,
            blas_type(c_dtype)?,
            n as i32,
            compute,
            bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .w()?;
    }
    Ok(())
}

fn warp_grid(warps: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (warps.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn elem_grid(n: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The f32 master weight [out, in] fake-quantized per channel (`group` None) or per group with
/// `qmax` (None: a plain cast), written in `dtype`.
pub fn fq_cast(
    w: Arg,
    dtype: DType,
    qmax: Option<f32>,
    group: Option<usize>,
) -> Result<CudaStorage> {
    match dtype {
        DType::F32 => fq_cast_t::<f32>(w, qmax, group),
        DType::BF16 => fq_cast_t::<half::bf16>(w, qmax, group),
        DType::F16 => fq_cast_t::<half::f16>(w, qmax, group),
        d => candle_core::bail!("fq-cast: no {d:?} output"),
    }
}

fn fq_cast_t<T: CudaDType + WithDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    w: Arg,
    qmax: Option<f32>,
    group: Option<usize>,
) -> Result<CudaStorage> {
    let dev = w.0.device.clone();
    let Some((o1, o2)) = w.1.contiguous_offsets() else {
        candle_core::bail!("fq-cast: the weight must be contiguous")
    };
    let src = w.0.as_cuda_slice::<f32>()?.slice(o1..o2);
    let n = o2 - o1;
    let d = w.1.dims().last().copied().unwrap_or(1).max(1);
    let g = group.unwrap_or(d).min(d);
    let groups = (n / d * d.div_ceil(g)) as u64;
    // float4 lanes when every group starts 16-byte aligned and holds a multiple of 4 values.
    let vec = d % 4 == 0 && g % 4 == 0 && address(w, "weight")?.0 % 16 == 0;
    // SAFETY: the kernel writes all n values.
    let dst = unsafe { dev.alloc::<T>(n)? };
    if n > 0 {
        let f = dev.get_or_load_custom_func(&kernel_name::<T>("fq_cast"), MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&src);
        b.arg(&dst);
        candle_core::builder_arg!(
            b,
            groups,
            d as u32,
            g as u32,
            qmax.unwrap_or(0.0),
            vec as i32
        );
        // SAFETY: n values in and out.
        unsafe { b.launch(warp_grid(groups)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(dst, dev))
}

/// Per-token fake quantization, in place, of x stored [b, heads, t, d] contiguous from offset 0
/// (K after the RoPE transpose): each token's heads · d values share one scale.
pub fn kv_quant_heads(
    x: &CudaStorage,
    dims: (usize, usize, usize, usize),
    qmax: f32,
) -> Result<()> {
    let (b, heads, t, d) = dims;
    let dev = x.device.clone();
    let (ptr, dtype) = address((x, &Layout::contiguous((b, heads, t, d))), "K")?;
    let f =
        dev.get_or_load_custom_func(&format!("kv_quant_heads_{}", dtype.as_str()), MODULE, PTX)?;
    let mut bld = f.builder();
    candle_core::builder_arg!(bld, ptr, b as u32, heads as u32, t as u32, d as u32, qmax);
    // SAFETY: x holds b · heads · t · d values of `dtype`; each token's are touched by one warp.
    unsafe { bld.launch(warp_grid((b * t) as u64)) }.w()?;
    Ok(())
}

/// dst (f32, n values at a device address) = src, or += src when `!overwrite`.
pub fn grad_accumulate(
    dev: &candle_core::CudaDevice,
    dst: u64,
    src: Arg,
    overwrite: bool,
) -> Result<()> {
    let n = src.1.shape().elem_count() as u64;
    let (sp, dtype) = address(src, "gradient")?;
    if dtype != DType::F32 {
        candle_core::bail!("grad-accumulate: f32 gradients expected, got {dtype:?}")
    }
    if n == 0 {
        return Ok(());
    }
    let f = dev.get_or_load_custom_func("grad_accumulate", MODULE, PTX)?;
    let mut b = f.builder();
    candle_core::builder_arg!(b, dst, sp, n, overwrite as i32);
    // SAFETY: both addresses hold n f32 values.
    unsafe { b.launch(elem_grid(n)) }.w()?;
    Ok(())
}

/// Blocks of `sumsq_partials` (8 per multiprocessor of an H100/H200): each writes one partial.
pub const SUMSQ_BLOCKS: usize = 1056;

/// Σ g² of an f32 gradient as SUMSQ_BLOCKS partial sums written at `out` (f32).
pub fn sumsq_partials(g: Arg, out: u64) -> Result<()> {
    let dev = g.0.device.clone();
    let n = g.1.shape().elem_count() as u64;
    let (gp, dtype) = address(g, "gradient")?;
    if dtype != DType::F32 {
        candle_core::bail!("sumsq: f32 gradients expected, got {dtype:?}")
    }
    // float4 loads need a 16-byte aligned start.
    let n4 = if gp % 16 == 0 { n / 4 } else { 0 };
    let f = dev.get_or_load_custom_func("sumsq_partials", MODULE, PTX)?;
    let mut b = f.builder();
    candle_core::builder_arg!(b, gp, n, n4, out);
    let cfg = LaunchConfig {
        grid_dim: (SUMSQ_BLOCKS as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: g holds n values, out SUMSQ_BLOCKS.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// One AdamW step in a single pass, in place on w, m, v (f32, contiguous, equal sizes), from
/// gradient g scaled by `gscale` (clipping; None = unscaled).
pub fn adamw_fused(
    w: Arg,
    m: Arg,
    v: Arg,
    g: Arg,
    gscale: Option<f32>,
    s: &crate::adamw::AdamWStep,
) -> Result<()> {
    let dev = w.0.device.clone();
    let n = w.1.shape().elem_count();
    for (a, what) in [(m, "first moment"), (v, "second moment"), (g, "gradient")] {
        if a.1.shape().elem_count() != n {
            candle_core::bail!(
                "adamw: the {what} has {} values, the parameter {n}",
                a.1.shape().elem_count()
            )
        }
    }
    let mut ptrs = [0u64; 4];
    for (i, (a, what)) in [
        (w, "parameter"),
        (m, "first moment"),
        (v, "second moment"),
        (g, "gradient"),
    ]
    .into_iter()
    .enumerate()
    {
        let (p, dtype) = address(a, what)?;
        if dtype != DType::F32 {
            candle_core::bail!("adamw: the {what} must be f32, not {dtype:?}")
        }
        ptrs[i] = p;
    }
    if n == 0 {
        return Ok(());
    }
    let f = dev.get_or_load_custom_func("adamw_fused", MODULE, PTX)?;
    let mut b = f.builder();
    candle_core::builder_arg!(
        b,
        ptrs[0],
        ptrs[1],
        ptrs[2],
        ptrs[3],
        n as u64,
        gscale.unwrap_or(1.0),
        gscale.is_some() as i32,
        s.beta1 as f32,
        (1.0 - s.beta1) as f32,
        s.beta2 as f32,
        (1.0 - s.beta2) as f32,
        (1.0 / s.c1) as f32,
        (1.0 / s.c2) as f32,
        s.eps as f32,
        s.lr as f32,
        (1.0 - s.lr * s.weight_decay) as f32,
        (s.weight_decay > 0.0) as i32
    );
    // SAFETY: the four addresses hold n f32 values each.
    unsafe { b.launch(elem_grid(n as u64)) }.w()?;
    Ok(())
}

/// Chunks per thread of the register-resident row kernels (`C` in train_step.cu).
const REG_CHUNKS: usize = 4;

/// For a row of `n` values of `dtype` at 16-byte aligned addresses: the `_reg` kernel's block
/// size when the row fits its registers (a multiple of whole 16-byte chunks, at most 4 a thread).
fn reg_threads(n: usize, dtype: DType, aligned: bool) -> Option<u32> {
    let per = 16 / dtype.size_in_bytes();
    let chunks = n / per;
    let threads = (chunks.div_ceil(REG_CHUNKS).div_ceil(32) * 32).clamp(32, 1024);
    (aligned && n.is_multiple_of(per) && chunks <= threads * REG_CHUNKS).then_some(threads as u32)
}

fn row_grid(rows: usize, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: ((n.div_ceil(32) * 32).clamp(32, 1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// RMSNorm of x [rows, h] (f32 weight) with the per-token quantizer applied to its output:
/// (q(y), 1/rms per row). fused.cu's `rms_fwd` followed by fake quantization, in one kernel.
pub fn rms_quant(
    x: Arg,
    w: Arg,
    h: usize,
    eps: f32,
    qmax: f32,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let dev = x.0.device.clone();
    let n = x.1.shape().elem_count();
    let rows = n / h.max(1);
    let (xp, dtype) = address(x, "x")?;
    let (wp, wd) = address(w, "weight")?;
    if wd != DType::F32 || w.1.shape().elem_count() != h {
        candle_core::bail!("rms-quant: the weight must be {h} f32 values")
    }
    // SAFETY: the kernel writes every value of y and r.
    let y = unsafe { dev.alloc_uninit(x.1.shape(), dtype)? };
    let r = unsafe { dev.alloc::<f32>(rows)? };
    let yp = address((&y, &Layout::contiguous(n)), "y")?.0;
    let reg = reg_threads(h, dtype, xp % 16 == 0 && wp % 16 == 0);
    let name = if reg.is_some() {
        "rms_quant_reg"
    } else {
        "rms_quant"
    };
    let f = dev.get_or_load_custom_func(&format!("{name}_{}", dtype.as_str()), MODULE, PTX)?;
    let mut b = f.builder();
    candle_core::builder_arg!(b, xp, wp, yp);
    b.arg(&r);
    candle_core::builder_arg!(b, h as u32, eps, qmax);
    let mut cfg = row_grid(rows, h);
    if let Some(threads) = reg {
        cfg.block_dim = (threads, 1, 1);
    }
    // SAFETY: rows · h values of x and y, h weights, rows values of r.
    unsafe { b.launch(cfg) }.w()?;
    Ok((y, r))
}

/// q(silu(g) · u) per row of n values (g, u contiguous [rows, n]).
pub fn swiglu_quant(g: Arg, u: Arg, n: usize, qmax: f32) -> Result<CudaStorage> {
    let dev = g.0.device.clone();
    let total = g.1.shape().elem_count();
    if u.1.shape().elem_count() != total {
        candle_core::bail!("swiglu-quant: gate and up differ in size")
    }
    let (gp, dtype) = address(g, "gate")?;
    let up = address(u, "up")?.0;
    // SAFETY: written in full below.
    let y = unsafe { dev.alloc_uninit(g.1.shape(), dtype)? };
    let yp = address((&y, &Layout::contiguous(total)), "y")?.0;
    let reg = reg_threads(n, dtype, gp % 16 == 0 && up % 16 == 0);
    let name = if reg.is_some() {
        "swiglu_quant_reg"
    } else {
        "swiglu_quant"
    };
    let f = dev.get_or_load_custom_func(&format!("{name}_{}", dtype.as_str()), MODULE, PTX)?;
    let mut b = f.builder();
    candle_core::builder_arg!(b, gp, up, yp, n as u32, qmax);
    let mut cfg = row_grid(total / n.max(1), n);
    if let Some(threads) = reg {
        cfg.block_dim = (threads, 1, 1);
    }
    // SAFETY: rows · n values each.
    unsafe { b.launch(cfg) }.w()?;
    Ok(y)
}

/// [b, t, heads, d] <-> [b, heads, t, d] (`gather`: head-major in, token-major out), with the
/// per-token quantizer applied on the way when `qmax` is given. `src` holds the values
/// contiguous from offset 0.
pub fn heads_transpose(
    src: &CudaStorage,
    (b, heads, t, d): (usize, usize, usize, usize),
    qmax: Option<f32>,
    gather: bool,
) -> Result<CudaStorage> {
    let dev = src.device.clone();
    let n = b * heads * t * d;
    let (sp, dtype) = address((src, &Layout::contiguous(n)), "src")?;
    if d % (16 / dtype.size_in_bytes()) != 0 || sp % 16 != 0 {
        candle_core::bail!(
            "heads-transpose: head_dim {d} does not fill 16-byte chunks of {dtype:?}"
        )
    }
    // SAFETY: every value is written below.
    let y = unsafe { dev.alloc_uninit(&candle_core::Shape::from(n), dtype)? };
    let yp = address((&y, &Layout::contiguous(n)), "dst")?.0;
    let f =
        dev.get_or_load_custom_func(&format!("heads_transpose_{}", dtype.as_str()), MODULE, PTX)?;
    let mut bld = f.builder();
    candle_core::builder_arg!(
        bld,
        sp,
        yp,
        b as u32,
        heads as u32,
        t as u32,
        d as u32,
        qmax.unwrap_or(0.0),
        gather as i32
    );
    // SAFETY: n values each; one warp per token.
    unsafe { bld.launch(warp_grid((b * t) as u64)) }.w()?;
    Ok(y)
}
