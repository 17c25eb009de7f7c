//! In-place AdamW on the GPU (cuda/adamw.cu), as candle in-place ops so that candle's storage
//! locks, not raw pointers, guard the writes (a source aliasing its destination is refused by
//! candle). For f32 tensors on one CUDA device.

#[cfg(feature = "cuda")]
pub use kernels::adamw_step;

/// One AdamW step's constants for one parameter (the CPU's tensor ops and the GPU kernels
/// read the same), rounded to f32 where used, as candle's `affine` rounds its factors.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub beta1: f64,
    pub beta2: f64,
    /// Bias corrections 1 - beta^t.
    pub c1: f64,
    pub c2: f64,
    pub eps: f64,
    pub lr: f64,
    /// Decoupled weight decay for this parameter (0 = none).
    pub weight_decay: f64,
}

#[cfg(feature = "cuda")]
mod kernels {
    use super::AdamWStep;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
    const MODULE: &str = "pipeline_adamw";
    const THREADS: u32 = 256;

    fn config(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((n as u64).div_ceil(THREADS as u64) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("adamw: {what} must be contiguous")))
    }

    /// m = m*b1 + g*(1-b1) (dst m, src g) or v = v*b2 + g²*(1-b2) (dst v, src g).
    struct Moment {
        kernel: &'static str,
        beta: f32,
        one_minus_beta: f32,
    }

    fn gpu_only(name: &str) -> Result<()> {
        candle_core::bail!("{name}: a GPU kernel (the CPU keeps the tensor-op AdamW)")
    }

    impl InplaceOp2 for Moment {
        fn name(&self) -> &'static str {
            self.kernel
        }

        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<()> {
            gpu_only(self.kernel)
        }

        fn cuda_fwd(
            &self,
            dst: &mut CudaStorage,
            dst_l: &Layout,
            g: &CudaStorage,
            g_l: &Layout,
        ) -> Result<()> {
            let dev = dst.device().clone();
            let (d0, d1) = offsets(dst_l, "the moment")?;
            let (g0, g1) = offsets(g_l, "the gradient")?;
            if d1 - d0 != g1 - g0 {
                candle_core::bail!("adamw: moment and gradient sizes differ");
            }
            let n = d1 - d0;
            let func = dev.get_or_load_custom_func(self.kernel, MODULE, PTX)?;
            let g = g.as_cuda_slice::<f32>()?.slice(g0..g1);
            let mut m = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d1);
            let mut b = func.builder();
            b.arg(&mut m);
            b.arg(&g);
            candle_core::builder_arg!(b, n as u64, self.beta, self.one_minus_beta);
            // SAFETY: both views hold `n` f32 values; the kernel touches indices below `n`.
            unsafe { b.launch(config(n)) }.w()?;
            Ok(())
        }
    }

    /// w = w*decay - ((m/c1) / (sqrt(v/c2) + eps)) * lr (dst w, srcs m and v).
    struct Update {
        inv_c1: f32,
        inv_c2: f32,
        eps: f32,
        lr: f32,
        decay: f32,
        apply_decay: bool,
    }

    impl InplaceOp3 for Update {
        fn name(&self) -> &'static str {
            "adamw_update"
        }

        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<()> {
            gpu_only("adamw_update")
        }

        #[allow(clippy::too_many_arguments)]
        fn cuda_fwd(
            &self,
            dst: &mut CudaStorage,
            dst_l: &Layout,
            m: &CudaStorage,
            m_l: &Layout,
            v: &CudaStorage,
            v_l: &Layout,
        ) -> Result<()> {
            let dev = dst.device().clone();
            let (w0, w1) = offsets(dst_l, "the parameter")?;
            let (m0, m1) = offsets(m_l, "the first moment")?;
            let (v0, v1) = offsets(v_l, "the second moment")?;
            let n = w1 - w0;
            if m1 - m0 != n || v1 - v0 != n {
                candle_core::bail!("adamw: parameter and moment sizes differ");
            }
            let func = dev.get_or_load_custom_func("adamw_update", MODULE, PTX)?;
            let m = m.as_cuda_slice::<f32>()?.slice(m0..m1);
            let v = v.as_cuda_slice::<f32>()?.slice(v0..v1);
            let mut w = dst.as_cuda_slice_mut::<f32>()?.slice_mut(w0..w1);
            let mut b = func.builder();
            b.arg(&mut w);
            b.arg(&m);
            b.arg(&v);
            candle_core::builder_arg!(
                b,
                n as u64,
                self.inv_c1,
                self.inv_c2,
                self.eps,
                self.lr,
                self.decay,
                self.apply_decay as i32
            );
            // SAFETY: the three views hold `n` f32 values; the kernel touches indices below `n`.
            unsafe { b.launch(config(n)) }.w()?;
            Ok(())
        }
    }

    /// Updates `w`, `m` and `v` in place from gradient `g` (all f32, contiguous, same size).
    pub fn adamw_step(w: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, s: &AdamWStep) -> Result<()> {
        let g = g.contiguous()?;
        let moment = |kernel, beta: f64| Moment {
            kernel,
            beta: beta as f32,
            one_minus_beta: (1.0 - beta) as f32,
        };
        m.inplace_op2(&g, &moment("adamw_first_moment", s.beta1))?;
        v.inplace_op2(&g, &moment("adamw_second_moment", s.beta2))?;
        w.inplace_op3(
            m,
            v,
            &Update {
                inv_c1: (1.0 / s.c1) as f32,
                inv_c2: (1.0 / s.c2) as f32,
                eps: s.eps as f32,
                lr: s.lr as f32,
                decay: (1.0 - s.lr * s.weight_decay) as f32,
                apply_decay: s.weight_decay > 0.0,
            },
        )
    }
}
