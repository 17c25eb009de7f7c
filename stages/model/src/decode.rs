//! Incremental decoding: a batch of sequences, each at its own position with its own KV cache,
//! advances by one token. Projections run batched through `row_matmul`, attention runs per
//! sequence, so a sequence's logits never depend on which other sequences share the batch.

use crate::llama::{quant_kv, rms_norm, softmax_last, Linear, Llama, Rope};
use crate::qconfig::{KvPoint, QuantConfig};
use crate::rowmatmul::row_matmul;
use candle_core::{bail, Result, Tensor};

/// One sequence's KV cache: per layer, K and V buffers [n_kv, capacity, head_dim].
pub struct SeqCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl SeqCache {
    pub fn new(model: &Llama, capacity: usize) -> Result<Self> {
        let c = &model.cfg;
        let capacity = capacity.min(c.max_position_embeddings);
        let shape = (c.num_key_value_heads, capacity, c.head_dim);
        let mut k = Vec::with_capacity(c.num_hidden_layers);
        let mut v = Vec::with_capacity(c.num_hidden_layers);
        for _ in 0..c.num_hidden_layers {
            k.push(Tensor::zeros(shape, model.dtype(), &model.device)?);
            v.push(Tensor::zeros(shape, model.dtype(), &model.device)?);
        }
        Ok(Self {
            k,
            v,
            len: 0,
            capacity,
        })
    }

    /// Number of tokens already in the cache (= position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget the contents so the buffers can serve a new sequence.
    pub fn reset(&mut self) {
        self.len = 0;
    }
}

impl Linear {
    /// Decoding form of `forward`: x is [B, in], one token per row.
    fn forward_rows(&self, x: &Tensor, q: &QuantConfig) -> Result<Tensor> {
        let x = match q.a_bits {
            Some(b) => quant::fake_quant(x, b, None)?,
            None => x.clone(),
        };
        let w = self.effective_weight(q)?.detach();
        let y = row_matmul(&x, &w)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Llama {
    /// Feeds `tokens[i]` to sequence `caches[i]` at position `caches[i].len()` and returns the
    /// next-token logits, [B, vocab]. Each cache grows by one.
    pub fn decode_step(&self, tokens: &[u32], caches: &mut [&mut SeqCache]) -> Result<Tensor> {
        let bsz = tokens.len();
        if bsz != caches.len() {
            bail!("decode_step: {} tokens for {} caches", bsz, caches.len());
        }
        let cfg = &self.cfg;
        let q = &self.quant;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let rep = nh / nkv;
        let half = hd / 2;
        for c in caches.iter() {
            if c.len >= c.capacity {
                bail!("decode_step: KV cache full ({} tokens)", c.capacity);
            }
        }
        let ids = Tensor::from_slice(tokens, bsz, &self.device)?;
        let pos: Vec<u32> = caches.iter().map(|c| c.len as u32).collect();
        let pos = Tensor::from_slice(&pos, bsz, &self.device)?;
        let cos = self
            .rope
            .cos
            .index_select(&pos, 0)?
            .reshape((bsz, 1, half))?;
        let sin = self
            .rope
            .sin
            .index_select(&pos, 0)?
            .reshape((bsz, 1, half))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = self.embed_tokens.index_select(&ids, 0)?;
        for (l, blk) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &blk.input_layernorm, cfg.rms_norm_eps)?;
            let qs = blk.attn.q_proj.forward_rows(&h, q)?;
            let mut k = blk.attn.k_proj.forward_rows(&h, q)?;
            let v = quant_kv(&blk.attn.v_proj.forward_rows(&h, q)?, q)?;
            if q.kv_point == KvPoint::PreRope {
                k = quant_kv(&k, q)?;
            }
            let qs = Rope::apply(&qs.reshape((bsz, nh, hd))?, &cos, &sin)?;
            let mut k = Rope::apply(&k.reshape((bsz, nkv, hd))?, &cos, &sin)?;
            if q.kv_point == KvPoint::PostRope {
                k = quant_kv(&k.reshape((bsz, nkv * hd))?, q)?.reshape((bsz, nkv, hd))?;
            }
            let v = v.reshape((bsz, nkv, hd))?;
            let mut ys = Vec::with_capacity(bsz);
            for (i, c) in caches.iter_mut().enumerate() {
                let n = c.len;
                c.k[l].slice_set(&k.get(i)?.reshape((nkv, 1, hd))?.contiguous()?, 1, n)?;
                c.v[l].slice_set(&v.get(i)?.reshape((nkv, 1, hd))?.contiguous()?, 1, n)?;
                let kc = c.k[l].narrow(1, 0, n + 1)?;
                let vc = c.v[l].narrow(1, 0, n + 1)?;
                let qi = qs.get(i)?.reshape((nkv, rep, hd))?;
                let att = softmax_last(&(qi.matmul(&kc.t()?)? * scale)?)?;
                ys.push(att.matmul(&vc)?.reshape((1, nh * hd))?);
            }
            let y = Tensor::cat(&ys, 0)?;
            x = (x + blk.attn.o_proj.forward_rows(&y, q)?)?;
            let h = rms_norm(&x, &blk.post_attention_layernorm, cfg.rms_norm_eps)?;
            let g = blk.mlp.gate_proj.forward_rows(&h, q)?.silu()?;
            let u = blk.mlp.up_proj.forward_rows(&h, q)?;
            x = (x + blk.mlp.down_proj.forward_rows(&(g * u)?, q)?)?;
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        let x = rms_norm(&x, &self.norm, cfg.rms_norm_eps)?;
        row_matmul(&x, &self.lm_head)
    }
}
