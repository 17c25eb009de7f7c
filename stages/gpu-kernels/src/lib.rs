//! The project's own CUDA kernels, for what candle's generic ops do in many passes:
//! - `fake_quant`: symmetric MinMax fake quantization in one pass (quant's `FakeQuantOp` on a
//!   GPU), bit-identical to the CPU kernel;
//! - `attention`: causal attention forward and backward without [t, t] score tensors;
//! - `fused`: RMSNorm, RoPE (with the head transpose) and SwiGLU, forward and backward;
//! - `adamw`: the AdamW update in place, three kernels per parameter instead of about twelve
//!   tensor ops, with the CPU formula's order of operations;
//! - `distill`: the distillation loss per token (cross-entropy, teacher entropy, top-1
//!   agreement) in one pass over the vocabulary, and its gradient w.r.t. the student logits in
//!   another, for train's fused loss instead of about thirty tensor ops;
//! - `decode`: one step of batched decoding: few-row products at full memory bandwidth (with the
//!   RMSNorm, residual add and SwiGLU folded in), RoPE with the KV cache write, and attention over
//!   each slot's cache prefix, for CUDA-graph replay;
//! - `train_step`: cuBLAS products into f32 gradient buffers, the weight fake quantizer fused
//!   with the cast, K/V quantization after the RoPE transpose, and the one-pass clipped AdamW,
//!   for the whole-block training op and its optimizer.
//!
//! The kernels exist only with the `cuda` feature; `adamw::AdamWStep` (plain data shared with
//! the CPU formula) and `distill`'s constants (shared with its CPU twin) always do.

pub mod adamw;
#[cfg(feature = "cuda")]
pub mod attention;
#[cfg(feature = "cuda")]
pub mod decode;
pub mod distill;
#[cfg(feature = "cuda")]
pub mod fake_quant;
#[cfg(feature = "cuda")]
pub mod fused;
#[cfg(feature = "cuda")]
pub mod train_step;

/// Runs `f` on the CUDA storages of `tensors` (each read-locked for the call); `name` says in an
/// error which op found a tensor elsewhere.
#[cfg(feature = "cuda")]
pub fn with_cuda<R>(
    name: &str,
    tensors: &[&candle_core::Tensor],
    f: impl FnOnce(&[(&candle_core::CudaStorage, &candle_core::Layout)]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut args = Vec::with_capacity(guards.len());
    for g in &guards {
        match &*g.0 {
            candle_core::Storage::Cuda(s) => args.push((s, g.1)),
            _ => candle_core::bail!("{name}: every input must be on the GPU"),
        }
    }
    f(&args)
}
