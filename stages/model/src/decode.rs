//! Incremental decoding: a batch of sequences, each at its own position with its own KV cache,
//! advances by one token. Projections run batched through `row_matmul`, attention runs per
//! sequence, so a sequence's logits never depend on which other sequences share the batch.
//!
//! On a GPU, per-sequence attention costs a handful of kernel launches per sequence and layer;
//! `BatchCache` + `decode_slots` keep all sequences' K/V in one tensor per layer and run the
//! whole batch's attention with a few kernels (a length mask hides each slot's unused tail).

use crate::llama::{quant_kv, rms_norm, softmax_last, Linear, Llama, Rope};
use crate::qconfig::{KvPoint, QuantConfig};
use crate::rowmatmul::row_matmul;
use candle_core::{bail, DType, Result, Tensor};

pub(crate) mod graph;

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
            k.push(Tensor::zeros(shape, model.compute, &model.device)?);
            v.push(Tensor::zeros(shape, model.compute, &model.device)?);
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
        let w = self.effective_weight(q)?.detach().to_dtype(x.dtype())?;
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.to_dtype(x.dtype()))
            .transpose()?;
        project(x, &w, bias.as_ref(), q)
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
            .reshape((bsz, 1, half))?
            .to_dtype(self.compute)?;
        let sin = self
            .rope
            .sin
            .index_select(&pos, 0)?
            .reshape((bsz, 1, half))?
            .to_dtype(self.compute)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = self
            .embed_tokens
            .index_select(&ids, 0)?
            .to_dtype(self.compute)?;
        for (l, blk) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &blk.input_layernorm, cfg.rms_norm_eps)?;
            let qs = blk.attn.q_proj.forward_rows(&h, q)?;
            let mut k = blk.attn.k_proj.forward_rows(&h, q)?;
            let v = quant_kv(&blk.attn.v_proj.forward_rows(&h, q)?, q, hd)?;
            if q.kv_point == KvPoint::PreRope {
                k = quant_kv(&k, q, hd)?;
            }
            let qs = Rope::apply(&qs.reshape((bsz, nh, hd))?, &cos, &sin)?;
            let mut k = Rope::apply(&k.reshape((bsz, nkv, hd))?, &cos, &sin)?;
            if q.kv_point == KvPoint::PostRope {
                k = quant_kv(&k.reshape((bsz, nkv * hd))?, q, hd)?.reshape((bsz, nkv, hd))?;
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
                let att = attention_probs(&(qi.matmul(&kc.t()?)? * scale)?)?;
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
        row_matmul(&x, &self.lm_head.to_dtype(self.compute)?)?.to_dtype(DType::F32)
    }
}

/// Softmax of one sequence's scores: our exact f32 ops on the CPU (bit-stable), candle's fused
/// kernel (in f32) elsewhere.
fn attention_probs(scores: &Tensor) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == DType::F32 {
        return softmax_last(scores);
    }
    let dtype = scores.dtype();
    candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// One layer's projections as batched decoding uses them. The weights are frozen while
/// decoding, so each is fake-quantized once here rather than at every step, and cast to the
/// compute dtype. Q/K/V and gate/up are stacked along the output dim so that each group is one
/// matrix product: per-output-channel weight quantization and per-token activation quantization
/// of the shared input give the same values stacked or apart.
struct LayerWeights {
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    o: Tensor,
    gate_up: Tensor,
    down: Tensor,
}

impl LayerWeights {
    fn new(blk: &crate::llama::Block, q: &QuantConfig, dtype: DType) -> Result<Self> {
        let w = |l: &Linear| -> Result<Tensor> { l.effective_weight(q)?.detach().to_dtype(dtype) };
        let a = &blk.attn;
        let qkv_bias = match (&a.q_proj.bias, &a.k_proj.bias, &a.v_proj.bias) {
            (Some(bq), Some(bk), Some(bv)) => Some(Tensor::cat(&[bq, bk, bv], 0)?.to_dtype(dtype)?),
            _ => None,
        };
        Ok(Self {
            qkv: Tensor::cat(&[w(&a.q_proj)?, w(&a.k_proj)?, w(&a.v_proj)?], 0)?,
            qkv_bias,
            o: w(&a.o_proj)?,
            gate_up: Tensor::cat(&[w(&blk.mlp.gate_proj)?, w(&blk.mlp.up_proj)?], 0)?,
            down: w(&blk.mlp.down_proj)?,
        })
    }
}

/// `x [B, in]`, fake-quantized per token when activations are quantized, times `w [out, in]`ᵀ.
fn project(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, q: &QuantConfig) -> Result<Tensor> {
    let x = match q.a_bits {
        Some(b) => quant::fake_quant(x, b, None)?,
        None => x.clone(),
    };
    let y = row_matmul(&x, w)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// The host side of one batched step.
struct StepData {
    ids: Vec<u32>,
    pos: Vec<u32>,
    /// Rows of the flattened cache [slots * n_kv * capacity, head_dim] that this step writes,
    /// repeated across head_dim (scatter's index has the source's shape).
    write_rows: Vec<u32>,
    /// [slots, span]: 0 where a slot may attend, -inf elsewhere.
    mask: Vec<f32>,
    span: usize,
    nkv: usize,
    hd: usize,
}

impl StepData {
    fn new(tokens: &[Option<u32>], cache: &BatchCache, nkv: usize, hd: usize, span: usize) -> Self {
        let cap = cache.capacity;
        // An idle slot writes at its own next position (or the last one): never into live data.
        let pos: Vec<usize> = cache.lens.iter().map(|&n| n.min(cap - 1)).collect();
        let write_rows = (0..pos.len() * nkv)
            .flat_map(|r| std::iter::repeat_n((r * cap + pos[r / nkv]) as u32, hd))
            .collect();
        let mask = pos
            .iter()
            .flat_map(|&p| (0..span).map(move |j| if j <= p { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        Self {
            ids: tokens.iter().map(|t| t.unwrap_or(0)).collect(),
            pos: pos.iter().map(|&p| p as u32).collect(),
            write_rows,
            mask,
            span,
            nkv,
            hd,
        }
    }

    fn upload(self, dev: &candle_core::Device) -> Result<StepInputs> {
        let s = self.ids.len();
        Ok(StepInputs {
            ids: Tensor::from_vec(self.ids, s, dev)?,
            pos: Tensor::from_vec(self.pos, s, dev)?,
            write_rows: Tensor::from_vec(self.write_rows, (s * self.nkv, self.hd), dev)?,
            mask: Tensor::from_vec(self.mask, (s, 1, 1, self.span), dev)?,
        })
    }
}

/// The device side of one batched step.
struct StepInputs {
    ids: Tensor,
    pos: Tensor,
    write_rows: Tensor,
    mask: Tensor,
}

impl StepInputs {
    /// Overwrites these tensors in place (a CUDA graph reads them at fixed addresses).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn store(&self, data: StepData, dev: &candle_core::Device) -> Result<()> {
        let new = data.upload(dev)?;
        self.ids.slice_set(&new.ids, 0, 0)?;
        self.pos.slice_set(&new.pos, 0, 0)?;
        self.write_rows.slice_set(&new.write_rows, 0, 0)?;
        self.mask.slice_set(&new.mask, 0, 0)
    }
}

/// The K/V caches of `slots` sequences, per layer one tensor [slots, n_kv, capacity, head_dim],
/// with a snapshot of the model's decoding weights (a second copy of the projections: make a
/// new cache after changing the model).
pub struct BatchCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    lens: Vec<usize>,
    capacity: usize,
    layers: Vec<LayerWeights>,
    lm_head: Tensor,
    /// Replays the step as one CUDA graph (see `enable_cuda_graph`).
    graph: Option<graph::GraphState>,
}

impl BatchCache {
    pub fn new(model: &Llama, slots: usize, capacity: usize) -> Result<Self> {
        let c = &model.cfg;
        let capacity = capacity.min(c.max_position_embeddings);
        let shape = (slots, c.num_key_value_heads, capacity, c.head_dim);
        let zeros = || Tensor::zeros(shape, model.compute, &model.device);
        Ok(Self {
            k: (0..c.num_hidden_layers)
                .map(|_| zeros())
                .collect::<Result<_>>()?,
            v: (0..c.num_hidden_layers)
                .map(|_| zeros())
                .collect::<Result<_>>()?,
            lens: vec![0; slots],
            capacity,
            layers: model
                .blocks
                .iter()
                .map(|b| LayerWeights::new(b, &model.quant, model.compute))
                .collect::<Result<_>>()?,
            lm_head: model.lm_head.detach().to_dtype(model.compute)?,
            graph: None,
        })
    }

    /// Runs each later step as one CUDA graph launch instead of hundreds of kernel launches.
    /// Attention then spans the whole capacity (masked), since a graph's shapes are fixed.
    /// Fails on a device without CUDA graphs (the CPU).
    pub fn enable_cuda_graph(&mut self) -> Result<()> {
        self.graph = Some(graph::GraphState::new(&self.k[0].device().clone())?);
        Ok(())
    }

    fn graphed(&self) -> bool {
        self.graph.is_some()
    }

    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    /// Tokens in slot `i`'s cache (= position of its next token).
    pub fn len(&self, i: usize) -> usize {
        self.lens[i]
    }

    /// Frees slot `i` for a new sequence.
    pub fn reset(&mut self, i: usize) {
        self.lens[i] = 0;
    }
}

impl Llama {
    /// Advances every slot whose token is `Some` by one token and returns logits [slots, vocab]
    /// (f32). The whole batch runs together; rows of `None` slots are meaningless and their
    /// caches do not grow.
    pub fn decode_slots(&self, tokens: &[Option<u32>], cache: &mut BatchCache) -> Result<Tensor> {
        let s = cache.slots();
        if tokens.len() != s {
            bail!("decode_slots: {} tokens for {s} slots", tokens.len());
        }
        for (i, t) in tokens.iter().enumerate() {
            if t.is_some() && cache.lens[i] >= cache.capacity {
                bail!("decode_slots: KV cache full ({} tokens)", cache.capacity);
            }
        }
        // Attend over the longest slot (over the whole capacity for a CUDA graph, whose shapes
        // are fixed); a slot sees its positions 0..=pos.
        let longest = cache
            .lens
            .iter()
            .max()
            .map_or(1, |&n| (n + 1).min(cache.capacity));
        let span = if cache.graphed() {
            cache.capacity
        } else {
            longest
        };
        let data = StepData::new(
            tokens,
            cache,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
            span,
        );
        let logits = if cache.graphed() {
            self.decode_graphed(data, cache)?
        } else {
            let inputs = data.upload(&self.device)?;
            self.decode_layers(&inputs, cache)?
        };
        for (i, t) in tokens.iter().enumerate() {
            if t.is_some() {
                cache.lens[i] += 1;
            }
        }
        Ok(logits)
    }

    /// The device part of `decode_slots`: no host data, no shape that depends on values, so
    /// that it can be captured into a CUDA graph.
    fn decode_layers(&self, inp: &StepInputs, cache: &BatchCache) -> Result<Tensor> {
        let cfg = &self.cfg;
        let q = &self.quant;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let (s, span) = (cache.slots(), inp.mask.dim(3)?);
        let (rep, half, cap) = (nh / nkv, hd / 2, cache.capacity);
        let at_pos = |t: &Tensor| -> Result<Tensor> {
            t.index_select(&inp.pos, 0)?
                .reshape((s, 1, half))?
                .to_dtype(self.compute)
        };
        let (cos, sin) = (at_pos(&self.rope.cos)?, at_pos(&self.rope.sin)?);
        // Scores stay in the compute dtype: candle's softmax accumulates in f32 whatever the
        // dtype, and two casts per layer were 10% of a graph-replayed bf16 step's kernels.
        let (write_rows, mask) = (&inp.write_rows, &inp.mask.to_dtype(self.compute)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = self
            .embed_tokens
            .index_select(&inp.ids, 0)?
            .to_dtype(self.compute)?;
        let (qd, kvd) = (nh * hd, nkv * hd);
        for (l, blk) in self.blocks.iter().enumerate() {
            let lw = &cache.layers[l];
            let h = norm(&x, &blk.input_layernorm, cfg.rms_norm_eps)?;
            let qkv = project(&h, &lw.qkv, lw.qkv_bias.as_ref(), q)?;
            let qs = qkv.narrow(1, 0, qd)?;
            let mut k = qkv.narrow(1, qd, kvd)?;
            let v = quant_kv(&qkv.narrow(1, qd + kvd, kvd)?, q, hd)?;
            if q.kv_point == KvPoint::PreRope {
                k = quant_kv(&k, q, hd)?;
            }
            let qs = rope(&qs.reshape((s, nh, hd))?, &cos, &sin)?;
            let mut k = rope(&k.reshape((s, nkv, hd))?, &cos, &sin)?;
            if q.kv_point == KvPoint::PostRope {
                k = quant_kv(&k.reshape((s, nkv * hd))?, q, hd)?;
            }
            let flat = (s * nkv * cap, hd);
            cache.k[l].reshape(flat)?.scatter_set(
                write_rows,
                &k.reshape((s * nkv, hd))?.contiguous()?,
                0,
            )?;
            cache.v[l].reshape(flat)?.scatter_set(
                write_rows,
                &v.reshape((s * nkv, hd))?.contiguous()?,
                0,
            )?;
            let kc = cache.k[l].narrow(2, 0, span)?;
            let vc = cache.v[l].narrow(2, 0, span)?;
            let qg = qs.reshape((s, nkv, rep, hd))?;
            let scores = (qg.matmul(&kc.transpose(2, 3)?)? * scale)?.broadcast_add(mask)?;
            let att = candle_nn::ops::softmax_last_dim(&scores)?;
            let y = att.matmul(&vc)?.reshape((s, nh * hd))?;
            x = (x + project(&y, &lw.o, None, q)?)?;
            let h = norm(&x, &blk.post_attention_layernorm, cfg.rms_norm_eps)?;
            let gu = project(&h, &lw.gate_up, None, q)?;
            let inter = cfg.intermediate_size;
            let g = gu.narrow(1, 0, inter)?.silu()?;
            let u = gu.narrow(1, inter, inter)?;
            x = (x + project(&(g * u)?, &lw.down, None, q)?)?;
        }
        let x = norm(&x, &self.norm, cfg.rms_norm_eps)?;
        row_matmul(&x, &cache.lm_head)?.to_dtype(DType::F32)
    }
}

/// RMSNorm for decoding: candle's fused kernel (one launch instead of nine, accumulating in
/// f32) on a GPU in bf16/f16; our ops on the CPU and in f32, as in the full forward pass.
fn norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() || x.dtype() == DType::F32 {
        return rms_norm(x, w, eps);
    }
    candle_nn::ops::rms_norm(&x.contiguous()?, &w.to_dtype(x.dtype())?, eps as f32)
}

/// RoPE of x [slots, heads, head_dim] with cos/sin [slots, 1, head_dim / 2]: candle's fused
/// kernel on a GPU in bf16/f16, our ops otherwise (as `norm`).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() || x.dtype() == DType::F32 {
        return Rope::apply(x, cos, sin);
    }
    let (s, h, d) = x.dims3()?;
    let x = x.reshape((s, h, 1, d))?.contiguous()?;
    candle_nn::rotary_emb::rope(&x, &cos.contiguous()?, &sin.contiguous()?)?.reshape((s, h, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LlamaConfig;
    use candle_core::Device;
    use std::collections::HashMap;

    fn tiny_model(quant: QuantConfig) -> Llama {
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 50, "max_position_embeddings": 32, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2
        });
        let cfg = LlamaConfig::from_json(&v, std::path::Path::new("test")).unwrap();
        let dev = Device::Cpu;
        let t: HashMap<String, Tensor> = crate::llama::expected_tensors(&cfg)
            .into_iter()
            .map(|(n, s)| {
                let x = if n.ends_with("norm.weight") {
                    Tensor::ones(s, DType::F32, &dev)
                } else {
                    Tensor::randn(0f32, 0.3, s, &dev)
                };
                (n, x.unwrap())
            })
            .collect();
        Llama::from_tensors(cfg, quant, t, "test", &dev).unwrap()
    }

    /// The batched path (what GPUs run) gives the per-sequence path's logits, with slots at
    /// different positions and idle slots in the batch.
    #[test]
    fn batched_slots_match_per_sequence_caches() {
        let q = QuantConfig {
            w_bits: Some(4),
            a_bits: Some(8),
            kv_bits: Some(4),
            ..Default::default()
        };
        let m = tiny_model(q);
        let mut seqs: Vec<SeqCache> = (0..3).map(|_| SeqCache::new(&m, 16).unwrap()).collect();
        let mut batch = BatchCache::new(&m, 3, 16).unwrap();
        // Step by step: which slots take a token (slot 2 starts late, slot 1 stops early).
        let plan: [[Option<u32>; 3]; 6] = [
            [Some(5), Some(7), None],
            [Some(9), Some(3), None],
            [Some(4), Some(8), Some(11)],
            [Some(6), None, Some(12)],
            [Some(10), None, Some(13)],
            [Some(20), None, Some(14)],
        ];
        for toks in plan {
            let live: Vec<usize> = (0..3).filter(|&i| toks[i].is_some()).collect();
            let ids: Vec<u32> = live.iter().map(|&i| toks[i].unwrap()).collect();
            let mut refs: Vec<&mut SeqCache> = seqs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| toks[*i].is_some())
                .map(|(_, c)| c)
                .collect();
            let want = m
                .decode_step(&ids, &mut refs)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let got = m
                .decode_slots(&toks, &mut batch)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (row, &i) in want.iter().zip(&live) {
                for (a, b) in row.iter().zip(&got[i]) {
                    assert!((a - b).abs() < 1e-4, "slot {i}: {a} vs {b}");
                }
                assert_eq!(batch.len(i), seqs[i].len());
            }
        }
    }
}
