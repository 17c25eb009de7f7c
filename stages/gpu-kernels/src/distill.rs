//! Launches cuda/distill.cu (compiled to PTX by build.rs): the GPU half of train's fused
//! distillation loss (`loss::DistillRows` and its gradient). Rows run along the last dimension
//! of contiguous student and teacher logits of one dtype (f32, bf16 or f16); the math is f32.
//! The constants exist without the `cuda` feature too: train's CPU twin of the kernel uses them.

#[cfg(feature = "cuda")]
pub use kernels::{distill_rows, distill_rows_grad};

/// Threads per row; must equal DISTILL_THREADS in cuda/distill.cu (the reduction tree, which
/// train's CPU twin of the kernel mirrors, depends on it).
pub const THREADS: u32 = 256;
/// Columns of the forward output: ce, entropy, agree, lse of the student, lse of the teacher.
pub const STATS: usize = 5;

#[cfg(feature = "cuda")]
mod kernels {
    use super::{STATS, THREADS};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{kernel_name, CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result, Shape, WithDType};
    use half::{bf16, f16};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/distill.ptx"));
    const MODULE: &str = "pipeline_distill";

    fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
        l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "distill: the {what} must be contiguous (got shape {:?}, stride {:?})",
                l.dims(),
                l.stride()
            ))
        })
    }

    /// Rows and row length of logits [..., V], which must match between student and teacher.
    fn rows(student: &Layout, teacher: &Layout) -> Result<(usize, usize)> {
        if student.shape() != teacher.shape() {
            candle_core::bail!(
                "distill: student logits {:?} and teacher logits {:?} differ in shape",
                student.dims(),
                teacher.dims()
            );
        }
        let v = student.dims().last().copied().unwrap_or(0);
        let n = student.shape().elem_count() / v.max(1);
        if n > i32::MAX as usize {
            candle_core::bail!("distill: {n} rows (at most {} per launch)", i32::MAX);
        }
        if v == 0 || v > u32::MAX as usize {
            candle_core::bail!("distill: rows of {v} logits (1 to {} accepted)", u32::MAX);
        }
        Ok((n, v))
    }

    fn same_dtype(student: &CudaStorage, teacher: &CudaStorage) -> Result<DType> {
        let (s, t) = (student.dtype(), teacher.dtype());
        if s != t {
            candle_core::bail!("distill: student logits are {s:?} but teacher logits {t:?}");
        }
        Ok(s)
    }

    fn unsupported(dtype: DType) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "distill: logits of dtype {dtype:?} (f32, bf16 or f16 accepted)"
        ))
    }

    fn config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Per-row statistics of logits [..., V]: an f32 tensor [..., 5] of (ce, entropy, agree,
    /// lse_s, lse_t) with `inv_temperature` = 1 / T (cuda/distill.cu has the formulas).
    pub fn distill_rows(
        student: &CudaStorage,
        student_l: &Layout,
        teacher: &CudaStorage,
        teacher_l: &Layout,
        inv_temperature: f32,
    ) -> Result<(CudaStorage, Shape)> {
        fn launch<T: CudaDType + DeviceRepr + WithDType>(
            s: &CudaStorage,
            s_l: &Layout,
            t: &CudaStorage,
            t_l: &Layout,
            inv_t: f32,
        ) -> Result<CudaStorage> {
            let dev = s.device().clone();
            let (n, v) = rows(s_l, t_l)?;
            let (s0, s1) = offsets(s_l, "student logits")?;
            let (t0, t1) = offsets(t_l, "teacher logits")?;
            // SAFETY: the kernel writes all STATS values of each of the `n` rows.
            let out = unsafe { dev.alloc::<f32>(n * STATS)? };
            if n > 0 {
                let func =
                    dev.get_or_load_custom_func(&kernel_name::<T>("distill_rows"), MODULE, PTX)?;
                let zs = s.as_cuda_slice::<T>()?.slice(s0..s1);
                let zt = t.as_cuda_slice::<T>()?.slice(t0..t1);
                let mut b = func.builder();
                b.arg(&zs);
                b.arg(&zt);
                b.arg(&out);
                candle_core::builder_arg!(b, v as u32, inv_t);
                // SAFETY: block r reads the `v` logits of row r of each input (n * v values) and
                // writes out[5r..5r + 5].
                unsafe { b.launch(config(n)) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        let out = match same_dtype(student, teacher)? {
            DType::F32 => launch::<f32>(student, student_l, teacher, teacher_l, inv_temperature)?,
            DType::BF16 => launch::<bf16>(student, student_l, teacher, teacher_l, inv_temperature)?,
            DType::F16 => launch::<f16>(student, student_l, teacher, teacher_l, inv_temperature)?,
            d => return Err(unsupported(d)),
        };
        let mut dims = student_l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = STATS;
        }
        Ok((out, Shape::from(dims)))
    }

    /// Gradient of each row's ce w.r.t. the student logits [..., V], in their dtype:
    /// g / T * (softmax(zs / T) - softmax(zt / T)), with `aux` an f32 tensor [rows, 3] of
    /// (g, lse_s, lse_t) per row (lse from `distill_rows`).
    pub fn distill_rows_grad(
        student: &CudaStorage,
        student_l: &Layout,
        teacher: &CudaStorage,
        teacher_l: &Layout,
        aux: &CudaStorage,
        aux_l: &Layout,
        inv_temperature: f32,
    ) -> Result<(CudaStorage, Shape)> {
        fn launch<T: CudaDType + DeviceRepr + WithDType>(
            s: &CudaStorage,
            s_l: &Layout,
            t: &CudaStorage,
            t_l: &Layout,
            aux: &CudaStorage,
            aux_l: &Layout,
            inv_t: f32,
        ) -> Result<CudaStorage> {
            let dev = s.device().clone();
            let (n, v) = rows(s_l, t_l)?;
            let (s0, s1) = offsets(s_l, "student logits")?;
            let (t0, t1) = offsets(t_l, "teacher logits")?;
            let (a0, a1) = offsets(aux_l, "row data (g, lse_s, lse_t)")?;
            if a1 - a0 != n * 3 {
                candle_core::bail!(
                    "distill: row data holds {} values, want 3 for each of {n} rows",
                    a1 - a0
                );
            }
            // SAFETY: the kernel writes every one of the n * v gradient values.
            let grad = unsafe { dev.alloc::<T>(n * v)? };
            if n > 0 {
                let func = dev.get_or_load_custom_func(
                    &kernel_name::<T>("distill_rows_grad"),
                    MODULE,
                    PTX,
                )?;
                let zs = s.as_cuda_slice::<T>()?.slice(s0..s1);
                let zt = t.as_cuda_slice::<T>()?.slice(t0..t1);
                let aux = aux.as_cuda_slice::<f32>()?.slice(a0..a1);
                let mut b = func.builder();
                b.arg(&zs);
                b.arg(&zt);
                b.arg(&aux);
                b.arg(&grad);
                candle_core::builder_arg!(b, v as u32, inv_t);
                // SAFETY: block r reads row r of each input and aux[3r..3r + 3], writes row r of grad.
                unsafe { b.launch(config(n)) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(grad, dev))
        }
        if aux.dtype() != DType::F32 {
            candle_core::bail!("distill: row data must be f32, got {:?}", aux.dtype());
        }
        let (s, s_l, t, t_l, inv_t) = (student, student_l, teacher, teacher_l, inv_temperature);
        let grad = match same_dtype(s, t)? {
            DType::F32 => launch::<f32>(s, s_l, t, t_l, aux, aux_l, inv_t)?,
            DType::BF16 => launch::<bf16>(s, s_l, t, t_l, aux, aux_l, inv_t)?,
            DType::F16 => launch::<f16>(s, s_l, t, t_l, aux, aux_l, inv_t)?,
            d => return Err(unsupported(d)),
        };
        Ok((grad, student_l.shape().clone()))
    }
}
