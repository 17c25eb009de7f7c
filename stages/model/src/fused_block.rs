//! One decoder block as one differentiable op, for training the student on a GPU.
//!
//! Built from tensor ops (even fused ones), a block is about thirty graph nodes, and candle's
//! backward pass adds each node's gradient into a fresh zero tensor: two more kernels and four
//! passes over the tensor per node, which at training sizes cost more GPU time than the matrix
//! products. Here the forward pass runs the block's kernels directly and keeps what the
//! backward pass needs; the backward pass is written out by hand below, and the weights'
//! gradients go straight into their `GradSink`s (f32, accumulated by cuBLAS), so candle sees
//! one node per block and never touches a weight gradient.
//!
//! The math is `Llama::forward_probed`'s, with the same quantizers (per-token activations,
//! per-channel or per-group weights, per-token K/V before or after RoPE) and straight-through
//! gradients; `pipeline bench grads` checks loss and gradients against the CPU.

use crate::grad_sink::GradSinks;
use crate::llama::Block;
use crate::qconfig::{KvRotation, QuantConfig};
use crate::LlamaConfig;
use candle_core::{Result, Tensor};

/// Whether `block_forward` runs here: a CUDA build and device, sinks attached, and a block it
/// covers (no attention bias, no Hadamard K/V rotation, a head_dim the attention kernels take).
pub fn supported(
    x: &Tensor,
    cfg: &LlamaConfig,
    quant: &QuantConfig,
    sinks: Option<&GradSinks>,
) -> bool {
    cfg!(feature = "cuda")
        && x.device().is_cuda()
        && sinks.is_some()
        && !cfg.attention_bias
        && !cfg.qk_norm
        && quant.kv_rotation == KvRotation::None
        && quant.w_scale.is_f32()
        && imp::head_dim_ok(cfg.head_dim)
}

/// The block `layer` applied to x [b, t, hidden] (compute dtype); `rope` holds the f32 cos and
/// sin tables narrowed to t.
pub fn block_forward(
    x: &Tensor,
    blk: &Block,
    layer: usize,
    cfg: &LlamaConfig,
    quant: &QuantConfig,
    sinks: &GradSinks,
    rope: (&Tensor, &Tensor),
) -> Result<Tensor> {
    imp::block_forward(x, blk, layer, cfg, quant, sinks, rope)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub fn head_dim_ok(_: usize) -> bool {
        false
    }

    pub fn block_forward(
        _: &Tensor,
        _: &Block,
        _: usize,
        _: &LlamaConfig,
        _: &QuantConfig,
        _: &GradSinks,
        _: (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        candle_core::bail!("the fused training block needs a CUDA device and a `cuda` build")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use crate::grad_sink::GradSink;
    use crate::qconfig::KvPoint;
    use candle_core::backend::{BackendDevice, BackendStorage};
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::op::BackpropOp;
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Storage};
    use gpu_kernels::attention as attn;
    use gpu_kernels::train_step::{self as ts, Operand};
    use std::sync::{Arc, Mutex};

    pub fn head_dim_ok(d: usize) -> bool {
        attn::HEAD_DIMS.contains(&d)
    }

    /// Weights in block order.
    const LN1: usize = 0;
    const Q: usize = 1;
    const K: usize = 2;
    const V: usize = 3;
    const O: usize = 4;
    const LN2: usize = 5;
    const GATE: usize = 6;
    const UP: usize = 7;
    const DOWN: usize = 8;
    const NAMES: [&str; 9] = [
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];

    #[derive(Clone, Copy)]
    struct Sizes {
        b: usize,
        t: usize,
        h: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
        inter: usize,
    }

    impl Sizes {
        fn rows(&self) -> usize {
            self.b * self.t
        }
        fn dims(&self) -> attn::Dims {
            attn::Dims {
                groups: self.b * self.nkv,
                rows: self.nh / self.nkv * self.t,
                t: self.t,
                d: self.hd,
            }
        }
    }

    /// What the backward pass needs from the forward pass.
    struct Saved {
        r1: CudaSlice<f32>,
        hq: CudaStorage,
        /// Fake-quantized weights in the compute dtype (index as `NAMES`; norms are None).
        wq: Vec<Option<CudaStorage>>,
        q: CudaStorage,
        k: CudaStorage,
        v: CudaStorage,
        /// Attention probabilities (score-matrix variant).
        p: Option<CudaStorage>,
        /// Attention output [b, nh, t, hd] and log-sum-exps, for the flash-style backward only.
        flash: Option<(CudaStorage, CudaSlice<f32>)>,
        yq: CudaStorage,
        x2: CudaStorage,
        r2: CudaSlice<f32>,
        h2q: CudaStorage,
        g: CudaStorage,
        u: CudaStorage,
        sq: CudaStorage,
    }

    struct BlockOp {
        s: Sizes,
        eps: f32,
        scale: f32,
        a_qmax: Option<f32>,
        w_qmax: Option<f32>,
        w_group: Option<usize>,
        kv_qmax: Option<f32>,
        kv_point: KvPoint,
        /// f32 master weights, `NAMES` order.
        w: Vec<Tensor>,
        sinks: Vec<Option<Arc<GradSink>>>,
        cos: Tensor,
        sin: Tensor,
        saved: Mutex<Option<Saved>>,
    }

    fn lay(dims: &[usize]) -> Layout {
        Layout::contiguous(Shape::from(dims.to_vec()))
    }

    fn wrap(s: CudaStorage, shape: &Shape) -> Tensor {
        Tensor::from_storage(Storage::Cuda(s), shape.clone(), BackpropOp::none(), false)
    }

    /// Runs `f` on the CUDA storages of `tensors`, read-locked for the call.
    fn with_storages<R>(
        tensors: &[&Tensor],
        f: impl FnOnce(&[(&CudaStorage, &Layout)]) -> Result<R>,
    ) -> Result<R> {
        crate::fused_ops::with_cuda("fused-block", tensors, f)
    }

    fn operand(s: &CudaStorage, ld: usize, t: bool) -> Result<Operand> {
        let (ptr, dtype) = ts::address((s, &Layout::contiguous(s_len(s))), "operand")?;
        Ok(Operand { ptr, dtype, ld, t })
    }

    /// Element count of a storage (its whole buffer: every storage here is made by this op or
    /// is contiguous from offset 0).
    fn s_len(s: &CudaStorage) -> usize {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        match &s.slice {
            S::F32(x) => x.len(),
            S::BF16(x) => x.len(),
            S::F16(x) => x.len(),
            _ => 0,
        }
    }

    /// y [rows, out] = x [rows, in] · wᵀ (w [out, in]), both in the compute dtype.
    fn linear(
        x: &CudaStorage,
        w: &CudaStorage,
        rows: usize,
        inn: usize,
        out: usize,
    ) -> Result<CudaStorage> {
        // SAFETY: the product writes every value.
        let y = unsafe {
            x.device
                .alloc_uninit(&Shape::from((rows, out)), x.dtype())?
        };
        linear_into(&y, x, w, rows, inn, out, 0.0)?;
        Ok(y)
    }

    /// c [rows, out] (+)= x [rows, in] · wᵀ into an existing buffer.
    fn linear_into(
        c: &CudaStorage,
        x: &CudaStorage,
        w: &CudaStorage,
        rows: usize,
        inn: usize,
        out: usize,
        beta: f32,
    ) -> Result<()> {
        let (cp, cd) = ts::address((c, &lay(&[rows, out])), "c")?;
        ts::gemm(
            &c.device,
            (rows, out, inn),
            operand(x, inn, false)?,
            operand(w, inn, true)?,
            cp,
            cd,
            beta,
        )
    }

    /// dx [rows, in] (+)= dy [rows, out] · w [out, in] into an existing buffer.
    fn linear_dx_into(
        c: &CudaStorage,
        dy: &CudaStorage,
        w: &CudaStorage,
        rows: usize,
        inn: usize,
        out: usize,
        beta: f32,
    ) -> Result<()> {
        let (cp, cd) = ts::address((c, &lay(&[rows, inn])), "dx")?;
        ts::gemm(
            &c.device,
            (rows, inn, out),
            operand(dy, out, false)?,
            operand(w, inn, false)?,
            cp,
            cd,
            beta,
        )
    }

    fn linear_dx(
        dy: &CudaStorage,
        w: &CudaStorage,
        rows: usize,
        inn: usize,
        out: usize,
    ) -> Result<CudaStorage> {
        // SAFETY: the product writes every value.
        let c = unsafe {
            dy.device
                .alloc_uninit(&Shape::from((rows, inn)), dy.dtype())?
        };
        linear_dx_into(&c, dy, w, rows, inn, out, 0.0)?;
        Ok(c)
    }

    /// The weight gradient dyᵀ [out, rows] · x [rows, in] into the weight's sink (f32).
    fn linear_dw(
        sink: &Option<Arc<GradSink>>,
        dy: &CudaStorage,
        x: &CudaStorage,
        rows: usize,
        inn: usize,
        out: usize,
    ) -> Result<()> {
        let Some(sink) = sink else { return Ok(()) };
        let beta = if sink.begin_write() { 0.0 } else { 1.0 };
        let dst = with_storages(&[sink.buffer()], |a| ts::address(a[0], "gradient sink"))?.0;
        ts::gemm(
            &dy.device,
            (out, inn, rows),
            operand(dy, out, true)?,
            operand(x, inn, false)?,
            dst,
            DType::F32,
            beta,
        )
    }

    /// A small gradient (norm weights) added into its sink.
    fn accumulate(sink: &Option<Arc<GradSink>>, g: Option<CudaStorage>) -> Result<()> {
        let (Some(sink), Some(g)) = (sink, g) else {
            return Ok(());
        };
        let overwrite = sink.begin_write();
        let n = s_len(&g);
        let dst = with_storages(&[sink.buffer()], |a| ts::address(a[0], "gradient sink"))?.0;
        ts::grad_accumulate(&g.device.clone(), dst, (&g, &lay(&[n])), overwrite)
    }

    /// Per-token fake quantization of rows of `d` values (a copy), or the input when off.
    fn quant_rows(x: CudaStorage, rows: usize, d: usize, qmax: Option<f32>) -> Result<CudaStorage> {
        match qmax {
            Some(q) => Ok(gpu_kernels::fake_quant::fake_quant(&x, &lay(&[rows, d]), q, None)?.0),
            None => Ok(x),
        }
    }

    impl BlockOp {
        /// RMSNorm with the activation quantizer folded in (one kernel), or RMSNorm alone.
        fn norm_quant(
            &self,
            x: (&CudaStorage, &Layout),
            w: (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, CudaSlice<f32>)> {
            match self.a_qmax {
                Some(qmax) => ts::rms_quant(x, w, self.s.h, self.eps, qmax),
                None => gpu_kernels::fused::rms_forward(x, w, self.s.h, self.eps),
            }
        }
    }

    impl CustomOp2 for BlockOp {
        fn name(&self) -> &'static str {
            "fused-block"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("fused-block: CUDA devices only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            wq_s: &CudaStorage,
            wq_l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let Sizes {
                b,
                t,
                h,
                nh,
                nkv,
                hd,
                inter,
            } = self.s;
            let rows = self.s.rows();
            if xl.dims() != [b, t, h] || xl.contiguous_offsets().is_none() {
                candle_core::bail!(
                    "fused-block: x {:?} is not a contiguous [{b}, {t}, {h}]",
                    xl.dims()
                )
            }
            let dtype = x.dtype();
            // The q weight is locked by candle already (the op's second argument).
            let w: Vec<_> = (0..9)
                .map(|i| (i != Q).then(|| self.w[i].storage_and_layout()))
                .collect();
            let mut wargs: Vec<(&CudaStorage, &Layout)> = Vec::with_capacity(9);
            for g in &w {
                match g {
                    None => wargs.push((wq_s, wq_l)),
                    Some((st, l)) => match &**st {
                        Storage::Cuda(s) => wargs.push((s, *l)),
                        _ => candle_core::bail!("fused-block: weights must be on the GPU"),
                    },
                }
            }
            let wq = (0..9)
                .map(|i| {
                    if i == LN1 || i == LN2 {
                        Ok(None)
                    } else {
                        ts::fq_cast(wargs[i], dtype, self.w_qmax, self.w_group).map(Some)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let wc = |i: usize| wq[i].as_ref().expect("projection weight");
            let (cs, cl) = (self.cos.storage_and_layout(), self.sin.storage_and_layout());
            let (Storage::Cuda(cos), Storage::Cuda(sin)) = (&*cs.0, &*cl.0) else {
                candle_core::bail!("fused-block: RoPE tables must be on the GPU")
            };
            let (cos, sin) = ((cos, cs.1), (sin, cl.1));

            // Attention half.
            let (hq, r1) = self.norm_quant((x, xl), wargs[LN1])?;
            let q = linear(&hq, wc(Q), rows, h, nh * hd)?;
            let mut k = linear(&hq, wc(K), rows, h, nkv * hd)?;
            let v = linear(&hq, wc(V), rows, h, nkv * hd)?;
            // V quantized per token on its way into the attention layout.
            let v = ts::heads_transpose(&v, (b, nkv, t, hd), self.kv_qmax, false)?;
            if self.kv_point == KvPoint::PreRope {
                k = quant_rows(k, rows, nkv * hd, self.kv_qmax)?;
            }
            let q =
                gpu_kernels::fused::rope((&q, &lay(&[b, t, nh, hd])), cos, sin, nh, t, hd, true)?;
            let k =
                gpu_kernels::fused::rope((&k, &lay(&[b, t, nkv, hd])), cos, sin, nkv, t, hd, true)?;
            if let (KvPoint::PostRope, Some(qmax)) = (self.kv_point, self.kv_qmax) {
                ts::kv_quant_heads(&k, (b, nkv, t, hd), qmax)?;
            }
            let dims = self.s.dims();
            let (ql, kl) = (lay(&[b * nkv, dims.rows, hd]), lay(&[b * nkv, t, hd]));
            // The score-matrix variant keeps P for the backward pass (no recomputation).
            let (y, p, lse) = if attn::use_scores(dims, dtype) {
                let (y, p) =
                    attn::forward_scores_keep((&q, &ql), (&k, &kl), (&v, &kl), dims, self.scale)?;
                (y, Some(p), None)
            } else {
                let (y, lse) = attn::forward((&q, &ql), (&k, &kl), (&v, &kl), dims, self.scale)?;
                (y, None, Some(lse))
            };
            let yq = ts::heads_transpose(&y, (b, nh, t, hd), self.a_qmax, true)?;
            let flash = lse.map(|lse| (y, lse));
            let x2 = x.try_clone(xl)?;
            linear_into(&x2, &yq, wc(O), rows, nh * hd, h, 1.0)?;

            // MLP half.
            let (h2q, r2) = self.norm_quant((&x2, &lay(&[b, t, h])), wargs[LN2])?;
            let g = linear(&h2q, wc(GATE), rows, h, inter)?;
            let u = linear(&h2q, wc(UP), rows, h, inter)?;
            let il = lay(&[rows, inter]);
            let sq = match self.a_qmax {
                Some(qmax) => ts::swiglu_quant((&g, &il), (&u, &il), inter, qmax)?,
                None => gpu_kernels::fused::swiglu_forward((&g, &il), (&u, &il))?,
            };
            let out = x2.try_clone(&lay(&[rows * h]))?;
            linear_into(&out, &sq, wc(DOWN), rows, inter, h, 1.0)?;

            drop(wargs);
            drop(w);
            *self.saved.lock().expect("fused-block lock") = Some(Saved {
                r1,
                hq,
                wq,
                q,
                k,
                v,
                p,
                flash,
                yq,
                x2,
                r2,
                h2q,
                g,
                u,
                sq,
            });
            Ok((out, xl.shape().clone()))
        }

        fn bwd(
            &self,
            x: &Tensor,
            _wq: &Tensor,
            _y: &Tensor,
            dout: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let Some(sv) = self.saved.lock().expect("fused-block lock").take() else {
                candle_core::bail!("fused-block: backward pass without a forward pass")
            };
            let Sizes {
                b,
                t,
                h,
                nh,
                nkv,
                hd,
                inter,
            } = self.s;
            let rows = self.s.rows();
            let dout = dout.to_dtype(x.dtype())?.contiguous()?;
            let sinks = &self.sinks;
            let dx = with_storages(
                &[x, &dout, &self.w[LN1], &self.w[LN2], &self.cos, &self.sin],
                |a| {
                    let [xa, da, ln1, ln2, cos, sin] = [a[0], a[1], a[2], a[3], a[4], a[5]];
                    // dout as it is when it fills its own buffer (the usual case), else a copy.
                    let copied;
                    let d_out = if da.1.start_offset() == 0 && s_len(da.0) == rows * h {
                        da.0
                    } else {
                        copied = da.0.try_clone(da.1)?;
                        &copied
                    };
                    let wc = |i: usize| sv.wq[i].as_ref().expect("projection weight");

                    // MLP half.
                    let dsq = linear_dx(d_out, wc(DOWN), rows, inter, h)?;
                    linear_dw(&sinks[DOWN], d_out, &sv.sq, rows, inter, h)?;
                    drop(sv.sq);
                    let il = lay(&[rows, inter]);
                    let (dg, du) = gpu_kernels::fused::swiglu_backward(
                        (&sv.g, &il),
                        (&sv.u, &il),
                        (&dsq, &il),
                    )?;
                    drop((dsq, sv.g, sv.u));
                    let dh2 = linear_dx(&dg, wc(GATE), rows, h, inter)?;
                    linear_dx_into(&dh2, &du, wc(UP), rows, h, inter, 1.0)?;
                    linear_dw(&sinks[GATE], &dg, &sv.h2q, rows, h, inter)?;
                    linear_dw(&sinks[UP], &du, &sv.h2q, rows, h, inter)?;
                    drop((dg, du, sv.h2q));
                    let xl = lay(&[b, t, h]);
                    // dx2 = dout (residual) + the norm's dx, in one kernel.
                    let (dx2, dln2) = gpu_kernels::fused::rms_backward_add(
                        (&sv.x2, &xl),
                        ln2,
                        &sv.r2,
                        (&dh2, &xl),
                        (d_out, &xl),
                        h,
                        sinks[LN2].is_some(),
                    )?;
                    accumulate(&sinks[LN2], dln2)?;
                    drop((dh2, sv.x2));

                    // Attention half.
                    let dyq = linear_dx(&dx2, wc(O), rows, nh * hd, h)?;
                    linear_dw(&sinks[O], &dx2, &sv.yq, rows, nh * hd, h)?;
                    drop(sv.yq);
                    let dy = ts::heads_transpose(&dyq, (b, nh, t, hd), None, false)?;
                    drop(dyq);
                    let dims = self.s.dims();
                    let (ql, kl) = (lay(&[b * nkv, dims.rows, hd]), lay(&[b * nkv, t, hd]));
                    let (dq, dk, dv) = match &sv.flash {
                        None => attn::backward_scores_with(
                            sv.p,
                            (&sv.q, &ql),
                            (&sv.k, &kl),
                            (&sv.v, &kl),
                            (&dy, &ql),
                            dims,
                            self.scale,
                        )?,
                        Some((y, lse)) => attn::backward(
                            (&sv.q, &ql),
                            (&sv.k, &kl),
                            (&sv.v, &kl),
                            (y, &ql),
                            (&dy, &ql),
                            lse,
                            dims,
                            self.scale,
                        )?,
                    };
                    drop((dy, sv.q, sv.k, sv.v, sv.flash));
                    // Straight through the K/V quantizers; RoPE and the transposes backwards.
                    let dq = gpu_kernels::fused::rope(
                        (&dq, &lay(&[b, nh, t, hd])),
                        cos,
                        sin,
                        nh,
                        t,
                        hd,
                        false,
                    )?;
                    let dk = gpu_kernels::fused::rope(
                        (&dk, &lay(&[b, nkv, t, hd])),
                        cos,
                        sin,
                        nkv,
                        t,
                        hd,
                        false,
                    )?;
                    let dv = ts::heads_transpose(&dv, (b, nkv, t, hd), None, true)?;
                    let dh1 = linear_dx(&dq, wc(Q), rows, h, nh * hd)?;
                    linear_dx_into(&dh1, &dk, wc(K), rows, h, nkv * hd, 1.0)?;
                    linear_dx_into(&dh1, &dv, wc(V), rows, h, nkv * hd, 1.0)?;
                    linear_dw(&sinks[Q], &dq, &sv.hq, rows, h, nh * hd)?;
                    linear_dw(&sinks[K], &dk, &sv.hq, rows, h, nkv * hd)?;
                    linear_dw(&sinks[V], &dv, &sv.hq, rows, h, nkv * hd)?;
                    drop((dq, dk, dv, sv.hq));
                    let (dx, dln1) = gpu_kernels::fused::rms_backward_add(
                        xa,
                        ln1,
                        &sv.r1,
                        (&dh1, &xl),
                        (&dx2, &xl),
                        h,
                        sinks[LN1].is_some(),
                    )?;
                    accumulate(&sinks[LN1], dln1)?;
                    Ok(dx)
                },
            )?;
            let dx = x.track_op().then(|| wrap(dx, x.shape()));
            Ok((dx, None))
        }
    }

    pub fn block_forward(
        x: &Tensor,
        blk: &Block,
        layer: usize,
        cfg: &LlamaConfig,
        quant: &QuantConfig,
        sinks: &GradSinks,
        (cos, sin): (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let f32c = |w: &Tensor| w.to_dtype(DType::F32)?.contiguous();
        let dense = |l: &crate::llama::Linear| -> Result<Tensor> {
            match l.dense_weight() {
                Some(w) => Ok(w.clone()),
                None => candle_core::bail!("fused block: a LoRA projection (see `supported`)"),
            }
        };
        let q_w = dense(&blk.attn.q_proj)?;
        let w = [
            blk.input_layernorm.clone(),
            q_w.clone(),
            dense(&blk.attn.k_proj)?,
            dense(&blk.attn.v_proj)?,
            dense(&blk.attn.o_proj)?,
            blk.post_attention_layernorm.clone(),
            dense(&blk.mlp.gate_proj)?,
            dense(&blk.mlp.up_proj)?,
            dense(&blk.mlp.down_proj)?,
        ]
        .iter()
        .map(f32c)
        .collect::<Result<Vec<_>>>()?;
        let sinks = NAMES
            .iter()
            .map(|n| sinks.get(&format!("model.layers.{layer}.{n}.weight")))
            .collect();
        let qmax = |bits: Option<u32>, group| -> Result<Option<f32>> {
            bits.map(|b| quant::fake::check_args(b, group)).transpose()
        };
        let op = BlockOp {
            s: Sizes {
                b,
                t,
                h,
                nh: cfg.num_attention_heads,
                nkv: cfg.num_key_value_heads,
                hd: cfg.head_dim,
                inter: cfg.intermediate_size,
            },
            eps: cfg.rms_norm_eps as f32,
            scale: (1.0 / (cfg.head_dim as f64).sqrt()) as f32,
            a_qmax: qmax(quant.a_bits, None)?,
            w_qmax: qmax(quant.w_bits, quant.w_group)?,
            w_group: quant.w_group,
            kv_qmax: qmax(quant.kv_bits, None)?,
            kv_point: quant.kv_point,
            w,
            sinks,
            cos: f32c(cos)?,
            sin: f32c(sin)?,
            saved: Mutex::new(None),
        };
        // The q projection's weight is the second argument so that candle records the node even
        // when x carries no gradient (frozen embeddings); its gradient goes to the sink.
        x.contiguous()?.apply_op2(&q_w, op)
    }
}
