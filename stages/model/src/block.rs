//! The decoder block, written once for the reference paths: a full sequence (training,
//! evaluation, calibration) and one decoding step over per-sequence caches. The fused GPU paths
//! (`fused_block` for training, `decode::StepKernels` for batched decoding) implement the same
//! block in kernels. What differs between the reference paths comes in through `BlockPath`: how
//! a projection multiplies, the tensor layout around RoPE, and where attention reads its keys
//! and values. The quantization points are here and in `KvQuant`, nowhere else: weights and
//! activations (per token) inside each projection, V per token before it is stored, K per token
//! before or after RoPE (`kv_point`).

use crate::llama::{quant_kv, rms_norm, Attention, Block, Linear};
use crate::qconfig::{KvPoint, QuantConfig};
use candle_core::{Result, Tensor};

/// Where the K/V quantizer acts. `stored` is set where the cache itself stores the quantizer's
/// codes (a per-token integer cache of the model's own K/V bits): V and post-RoPE K are then
/// quantized once, into the cache, not also before it.
pub(crate) struct KvQuant<'a> {
    pub q: &'a QuantConfig,
    pub head_dim: usize,
    pub stored: bool,
}

impl KvQuant<'_> {
    /// V [.., n_kv · head_dim] as the cache receives it.
    pub fn value(&self, v: &Tensor) -> Result<Tensor> {
        if self.stored {
            return Ok(v.clone());
        }
        quant_kv(v, self.q, self.head_dim)
    }

    /// K [.., n_kv · head_dim] before RoPE.
    pub fn key_before_rope(&self, k: Tensor) -> Result<Tensor> {
        match self.q.kv_point {
            KvPoint::PreRope => quant_kv(&k, self.q, self.head_dim),
            KvPoint::PostRope => Ok(k),
        }
    }

    /// Whether K is quantized after RoPE (by `key_after_rope`).
    pub fn after_rope(&self) -> bool {
        self.q.kv_point == KvPoint::PostRope && self.q.kv_bits.is_some() && !self.stored
    }

    /// Rotated K, one token per row [.., n_kv · head_dim].
    pub fn key_after_rope(&self, k: &Tensor) -> Result<Tensor> {
        quant_kv(k, self.q, self.head_dim)
    }
}

/// What a reference path supplies to `decoder_block`.
pub(crate) trait BlockPath {
    /// `lin`'s product with x [.., in] (activation and weight quantization included); `which`
    /// is the projection's place in `Block::projections`.
    fn project(&self, lin: &Linear, which: usize, x: &Tensor) -> Result<Tensor>;
    /// A projection's output [.., heads · head_dim] rotated, in the path's layout.
    fn rope(&self, x: &Tensor, heads: usize) -> Result<Tensor>;
    /// `f` applied to rotated K seen one token per row ([.., n_kv · head_dim]), back in the
    /// path's layout.
    fn per_token(&self, k: &Tensor, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor>;
    /// Stores this layer's K/V and attends: rotated q and K (path layout), V [.., n_kv ·
    /// head_dim] -> [.., heads · head_dim].
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;
    /// silu(g) · u.
    fn swiglu(&self, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        g.silu()? * u
    }
}

/// Decoder block `layer` on the residual stream x [.., hidden]: RMSNorm, GQA attention with
/// RoPE, residual; RMSNorm, SwiGLU MLP, residual.
pub(crate) fn decoder_block(
    blk: &Block,
    layer: usize,
    x: &Tensor,
    eps: f64,
    kv: &KvQuant,
    path: &mut dyn BlockPath,
) -> Result<Tensor> {
    let (a, m) = (&blk.attn, &blk.mlp);
    let hd = kv.head_dim;
    let h = rms_norm(x, &blk.input_layernorm, eps)?;
    let qs = Attention::norm_heads(&path.project(&a.q_proj, 0, &h)?, a.q_norm.as_ref(), hd, eps)?;
    let k = Attention::norm_heads(&path.project(&a.k_proj, 1, &h)?, a.k_norm.as_ref(), hd, eps)?;
    let v = kv.value(&path.project(&a.v_proj, 2, &h)?)?;
    let k = kv.key_before_rope(k)?;
    let heads = qs.dim(candle_core::D::Minus1)? / hd;
    let kv_heads = k.dim(candle_core::D::Minus1)? / hd;
    let qs = path.rope(&qs, heads)?;
    let mut k = path.rope(&k, kv_heads)?;
    if kv.after_rope() {
        k = path.per_token(&k, &|t| kv.key_after_rope(t))?;
    }
    let y = path.attend(layer, &qs, &k, &v)?;
    let x = (x + path.project(&a.o_proj, 3, &y)?)?;
    let h = rms_norm(&x, &blk.post_attention_layernorm, eps)?;
    let g = path.project(&m.gate_proj, 4, &h)?;
    let u = path.project(&m.up_proj, 5, &h)?;
    x + path.project(&m.down_proj, 6, &path.swiglu(&g, &u)?)?
}
