//! Differentiable single-kernel RMSNorm, RoPE and SwiGLU for training on a GPU (gpu-kernels'
//! cuda/fused.cu). Built from tensor ops, each of these is a chain of nodes; candle's backward
//! pass adds every node's gradient into a fresh zero tensor, so on a GPU the chains cost several
//! full passes over the activations per node. One custom op is one node.
//!
//! Used only where gradients flow (the student during training) on a CUDA device; evaluation
//! keeps the tensor-op formulas, whose evaluation order the PyTorch references were checked
//! against. Math in f32 whatever the activation dtype; weights and rope tables enter as f32.

use candle_core::{Result, Tensor};

/// Whether the fused ops run here: a CUDA device, in a `cuda` build.
pub fn available(x: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda()
}

/// RMSNorm of x [.., h] with weight w [h] (its gradient is computed only when w tracks one).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    imp::rms_norm(x, w, eps)
}

/// RoPE of x [b, t, heads, d] (a projection's output) into [b, heads, t, d], with f32 tables
/// cos/sin [t, d/2].
pub fn rope_transposed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    imp::rope_transposed(x, cos, sin)
}

/// silu(g) · u.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    imp::swiglu(g, u)
}

/// `fq(x) · fq(w)ᵀ` as one node: x [.., in] (per-token fake quantization with `a_bits`),
/// w [out, in] (f32 master or the compute dtype; per-channel or per-group fake quantization with
/// `w_bits`, then cast to x's dtype). Both quantizers pass gradients straight through; dw comes
/// back in w's dtype, and is computed only when w tracks a gradient (dx only when x does).
pub fn quant_linear(
    x: &Tensor,
    w: &Tensor,
    a_bits: Option<u32>,
    w_bits: Option<u32>,
    w_group: Option<usize>,
) -> Result<Tensor> {
    imp::quant_linear(x, w, a_bits, w_bits, w_group, None)
}

/// `quant_linear` whose weight gradient goes into `sink` (f32, accumulated) instead of back to
/// candle's backward pass.
pub fn quant_linear_into_sink(
    x: &Tensor,
    w: &Tensor,
    a_bits: Option<u32>,
    w_bits: Option<u32>,
    w_group: Option<usize>,
    sink: std::sync::Arc<crate::grad_sink::GradSink>,
) -> Result<Tensor> {
    imp::quant_linear(x, w, a_bits, w_bits, w_group, Some(sink))
}

#[cfg(feature = "cuda")]
pub(crate) use imp::with_cuda;

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::{Result, Tensor};

    fn no_gpu() -> Result<Tensor> {
        candle_core::bail!("fused training ops need a CUDA device and a `cuda` build")
    }

    pub fn rms_norm(_: &Tensor, _: &Tensor, _: f64) -> Result<Tensor> {
        no_gpu()
    }

    pub fn rope_transposed(_: &Tensor, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        no_gpu()
    }

    pub fn swiglu(_: &Tensor, _: &Tensor) -> Result<Tensor> {
        no_gpu()
    }

    pub fn quant_linear(
        _: &Tensor,
        _: &Tensor,
        _: Option<u32>,
        _: Option<u32>,
        _: Option<usize>,
        _: Option<std::sync::Arc<crate::grad_sink::GradSink>>,
    ) -> Result<Tensor> {
        no_gpu()
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::op::BackpropOp;
    use candle_core::{
        CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
        Tensor,
    };
    use gpu_kernels::fused as k;
    use std::sync::Mutex;

    fn gpu_only(name: &str) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{name}: this fused op runs on CUDA devices only")
    }

    pub(crate) use gpu_kernels::with_cuda;

    fn wrap(s: CudaStorage, shape: &Shape) -> Tensor {
        Tensor::from_storage(Storage::Cuda(s), shape.clone(), BackpropOp::none(), false)
    }

    struct RmsNorm {
        eps: f32,
        /// 1/rms of each row from the forward pass, for the backward pass.
        r: Mutex<Option<CudaSlice<f32>>>,
    }

    impl CustomOp2 for RmsNorm {
        fn name(&self) -> &'static str {
            "fused-rms-norm"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            gpu_only(self.name())
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let h = xl.dims().last().copied().unwrap_or(0);
            if wl.shape().elem_count() != h {
                candle_core::bail!(
                    "fused-rms-norm: weight of {} values for rows of {h}",
                    wl.shape().elem_count()
                )
            }
            let (y, r) = k::rms_forward((x, xl), (w, wl), h, self.eps)?;
            *self.r.lock().expect("rms lock") = Some(r);
            Ok((y, xl.shape().clone()))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _y: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let saved = self.r.lock().expect("rms lock");
            let Some(r) = saved.as_ref() else {
                candle_core::bail!("fused-rms-norm: backward pass without a forward pass")
            };
            let dy = dy.to_dtype(x.dtype())?.contiguous()?;
            let h = w.elem_count();
            let (dx, dw) = with_cuda(self.name(), &[x, w, &dy], |a| {
                k::rms_backward(a[0], a[1], r, a[2], h, w.track_op())
            })?;
            Ok((Some(wrap(dx, x.shape())), dw.map(|dw| wrap(dw, w.shape()))))
        }
    }

    pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        x.contiguous()?.apply_op2(
            &w.to_dtype(DType::F32)?.contiguous()?,
            RmsNorm {
                eps: eps as f32,
                r: Mutex::new(None),
            },
        )
    }

    /// `forward`: [b, t, heads, d] -> [b, heads, t, d]; else the backward direction.
    struct Rope {
        forward: bool,
    }

    impl Rope {
        /// (heads, t, d) from the input's shape.
        fn sizes(&self, x: &[usize]) -> Result<(usize, usize, usize)> {
            let [_, a, b, d] = x else {
                candle_core::bail!("fused-rope: rank-4 input expected, got {x:?}")
            };
            Ok(if self.forward {
                (*b, *a, *d)
            } else {
                (*a, *b, *d)
            })
        }
    }

    impl CustomOp3 for Rope {
        fn name(&self) -> &'static str {
            "fused-rope"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            gpu_only(self.name())
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            c: &CudaStorage,
            cl: &Layout,
            s: &CudaStorage,
            sl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (heads, t, d) = self.sizes(xl.dims())?;
            let y = k::rope((x, xl), (c, cl), (s, sl), heads, t, d, self.forward)?;
            let b = xl.dims()[0];
            let shape = if self.forward {
                (b, heads, t, d)
            } else {
                (b, t, heads, d)
            };
            Ok((y, shape.into()))
        }

        fn bwd(
            &self,
            _x: &Tensor,
            c: &Tensor,
            s: &Tensor,
            _y: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let back = Rope {
                forward: !self.forward,
            };
            let dx = dy.contiguous()?.apply_op3(c, s, back)?;
            Ok((Some(dx), None, None))
        }
    }

    pub fn rope_transposed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let f32c = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
        x.contiguous()?
            .apply_op3(&f32c(cos)?, &f32c(sin)?, Rope { forward: true })
    }

    struct SwiGlu;

    impl CustomOp2 for SwiGlu {
        fn name(&self) -> &'static str {
            "fused-swiglu"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            gpu_only(self.name())
        }

        fn cuda_fwd(
            &self,
            g: &CudaStorage,
            gl: &Layout,
            u: &CudaStorage,
            ul: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            if gl.dims() != ul.dims() {
                candle_core::bail!(
                    "fused-swiglu: gate {:?} and up {:?} differ",
                    gl.dims(),
                    ul.dims()
                )
            }
            Ok((k::swiglu_forward((g, gl), (u, ul))?, gl.shape().clone()))
        }

        fn bwd(
            &self,
            g: &Tensor,
            u: &Tensor,
            _y: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let dy = dy.to_dtype(g.dtype())?.contiguous()?;
            let (dg, du) = with_cuda(self.name(), &[g, u, &dy], |a| {
                k::swiglu_backward(a[0], a[1], a[2])
            })?;
            Ok((Some(wrap(dg, g.shape())), Some(wrap(du, u.shape()))))
        }
    }

    pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
        g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
    }

    struct QuantLinear {
        /// qmax of the per-token activation quantizer.
        a_qmax: Option<f32>,
        /// qmax and group of the weight quantizer.
        w_q: Option<(f32, Option<usize>)>,
        /// The forward pass's fq(x) and fq(w) (cast), for the backward pass: the unfused graph
        /// kept the same two tensors alive.
        operands: Mutex<Option<(CudaStorage, CudaStorage)>>,
        /// Where dw goes, if not back to candle.
        sink: Option<std::sync::Arc<crate::grad_sink::GradSink>>,
    }

    impl QuantLinear {
        /// fq(x) in x's dtype, contiguous from offset 0 (a copy of x without quantization).
        fn x_operand(&self, x: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
            match self.a_qmax {
                Some(qmax) => Ok(gpu_kernels::fake_quant::fake_quant(x, xl, qmax, None)?.0),
                None => x.try_clone(xl),
            }
        }

        /// fq(w) cast to `dtype`, [out, in] contiguous.
        fn w_operand(&self, w: &CudaStorage, wl: &Layout, dtype: DType) -> Result<CudaStorage> {
            let (qmax, group) = match self.w_q {
                Some((qmax, group)) => (Some(qmax), group),
                None => (None, None),
            };
            if w.dtype() == DType::F32 {
                // The f32 master: quantized and cast in one pass, as the fused block does.
                return gpu_kernels::train_step::fq_cast((w, wl), dtype, qmax, group);
            }
            let q = match qmax {
                Some(qmax) => gpu_kernels::fake_quant::fake_quant(w, wl, qmax, group)?.0,
                None => w.try_clone(wl)?,
            };
            if q.dtype() == dtype {
                Ok(q)
            } else {
                q.to_dtype(&Layout::contiguous(wl.shape()), dtype)
            }
        }

        /// (rows, in, out) of x [.., in] and w [out, in].
        fn sizes(xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize)> {
            let (&inner, wd) = (xl.dims().last().unwrap_or(&0), wl.dims());
            if wd.len() != 2 || wd[1] != inner || inner == 0 {
                candle_core::bail!(
                    "fused-quant-linear: x {:?} and weight {wd:?} do not fit",
                    xl.dims()
                )
            }
            Ok((xl.shape().elem_count() / inner, inner, wd[0]))
        }
    }

    impl CustomOp2 for QuantLinear {
        fn name(&self) -> &'static str {
            "fused-quant-linear"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            gpu_only(self.name())
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (rows, inner, out) = Self::sizes(xl, wl)?;
            let xq = self.x_operand(x, xl)?;
            let wq = self.w_operand(w, wl, x.dtype())?;
            // fq(x) [rows, in] · fq(w)ᵀ, the weight read transposed in place.
            let wt = Layout::contiguous((out, inner)).transpose(0, 1)?;
            let y = xq.matmul(
                &wq,
                (1, rows, out, inner),
                &Layout::contiguous((rows, inner)),
                &wt,
            )?;
            *self.operands.lock().expect("operands lock") = Some((xq, wq));
            let mut dims = xl.dims().to_vec();
            *dims.last_mut().expect("rank ≥ 1") = out;
            Ok((y, dims.into()))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _y: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (want_dx, want_dw) = (x.track_op(), w.track_op());
            let dy = dy.to_dtype(x.dtype())?.contiguous()?;
            let saved = self.operands.lock().expect("operands lock").take();
            let (dx, dw) = with_cuda(self.name(), &[x, w, &dy], |a| {
                let [(xs, xl), (ws, wl), (dys, dyl)] = [a[0], a[1], a[2]];
                let (rows, inner, out) = Self::sizes(xl, wl)?;
                let (xq, wq) = match saved {
                    Some(o) => o,
                    None => (self.x_operand(xs, xl)?, self.w_operand(ws, wl, xs.dtype())?),
                };
                let dyl = Layout::contiguous_with_offset((rows, out), dyl.start_offset());
                // dx = dy · fq(w) (straight through both quantizers).
                let dx = if want_dx {
                    Some(dys.matmul(
                        &wq,
                        (1, rows, inner, out),
                        &dyl,
                        &Layout::contiguous((out, inner)),
                    )?)
                } else {
                    None
                };
                // dw = dyᵀ · fq(x): into the sink in f32, or in w's dtype back to candle.
                let dw = if let (true, Some(sink)) = (want_dw, &self.sink) {
                    use gpu_kernels::train_step as ts;
                    let beta = if sink.begin_write() { 0.0 } else { 1.0 };
                    let dst = with_cuda(self.name(), &[sink.buffer()], |s| {
                        ts::address(s[0], "gradient sink")
                    })?
                    .0;
                    let (dyp, dyd) = ts::address((dys, &dyl), "dy")?;
                    let (xp, xd) = ts::address((&xq, &Layout::contiguous((rows, inner))), "x")?;
                    ts::gemm(
                        &dys.device,
                        (out, inner, rows),
                        ts::Operand {
                            ptr: dyp,
                            dtype: dyd,
                            ld: out,
                            t: true,
                        },
                        ts::Operand {
                            ptr: xp,
                            dtype: xd,
                            ld: inner,
                            t: false,
                        },
                        dst,
                        DType::F32,
                        beta,
                    )?;
                    None
                } else if want_dw {
                    let dyt = dyl.transpose(0, 1)?;
                    let g = dyt_matmul(dys, &xq, &dyt, (out, inner, rows))?;
                    Some(if g.dtype() == ws.dtype() {
                        g
                    } else {
                        g.to_dtype(&Layout::contiguous((out, inner)), ws.dtype())?
                    })
                } else {
                    None
                };
                Ok((dx, dw))
            })?;
            Ok((
                dx.map(|s| wrap(s, x.shape())),
                dw.map(|s| wrap(s, w.shape())),
            ))
        }
    }

    /// dyᵀ [out, rows] · xq [rows, in] with dy read transposed in place.
    fn dyt_matmul(
        dy: &CudaStorage,
        xq: &CudaStorage,
        dyt: &Layout,
        (out, inner, rows): (usize, usize, usize),
    ) -> Result<CudaStorage> {
        dy.matmul(
            xq,
            (1, out, inner, rows),
            dyt,
            &Layout::contiguous((rows, inner)),
        )
    }

    pub fn quant_linear(
        x: &Tensor,
        w: &Tensor,
        a_bits: Option<u32>,
        w_bits: Option<u32>,
        w_group: Option<usize>,
        sink: Option<std::sync::Arc<crate::grad_sink::GradSink>>,
    ) -> Result<Tensor> {
        let op = QuantLinear {
            a_qmax: a_bits
                .map(|b| quant::fake::check_args(b, None))
                .transpose()?,
            w_q: match w_bits {
                Some(b) => Some((quant::fake::check_args(b, w_group)?, w_group)),
                None => None,
            },
            operands: Mutex::new(None),
            sink,
        };
        x.contiguous()?.apply_op2(&w.contiguous()?, op)
    }
}
