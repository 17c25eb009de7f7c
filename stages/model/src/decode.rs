//! Incremental decoding: a batch of sequences, each at its own position with its own KV cache,
//! advances by one token. Projections run batched through `row_matmul`, attention runs per
//! sequence, so a sequence's logits never depend on which other sequences share the batch.
//!
//! On a GPU, per-sequence attention costs a handful of kernel launches per sequence and layer;
//! `BatchCache` + `decode_slots` keep all sequences' K/V in one tensor per layer and run the
//! whole batch's attention with a few kernels (a length mask hides each slot's unused tail).
//! In bf16/f16 without activation or K/V quantization, gpu-kernels' decode kernels replace most
//! of those ops (see `StepKernels`): at a few slots a step is five launches per layer (RMSNorm +
//! QKV, RoPE + cache write + attention, O + residual, RMSNorm + gate/up + SwiGLU, down +
//! residual), each product reading its weight at close to full memory bandwidth.

use crate::block::{decoder_block, BlockPath, KvQuant};
use crate::llama::{rms_norm, softmax_last, Attention, Linear, Llama, Rope};
use crate::lowbit::{KvCacheFormat, KvCodes};
use crate::qconfig::{KvPoint, QuantConfig};
use crate::rowmatmul::{row_matmul, Bf16Rows};
use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

pub(crate) mod graph;
pub mod profile;

/// One sequence's KV cache: per layer, K and V buffers [n_kv, capacity, head_dim] in the
/// compute dtype, or (a low-bit cache) per layer the codes and scales of `KvCodes`.
pub struct SeqCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    codes: Vec<KvCodes>,
    format: KvCacheFormat,
    len: usize,
    capacity: usize,
    /// The model's weights as `decode_step` reads them, shared by the caches of a batch.
    weights: Option<Arc<SeqWeights>>,
}

/// A snapshot of the projection weights for `decode_step` on the CPU in f32: each weight whose
/// values are all bf16 values (a bf16 checkpoint upcast) is held as bf16, so a step reads half
/// the bytes for the same products; the others are read from the model as they are. Taken at a
/// batch's first step (or shared with live caches of the same, unchanged weights): make new
/// caches after changing the model's weights.
struct SeqWeights {
    /// The model it was taken from (`Llama::lm_head`'s id).
    source: candle_core::TensorId,
    /// Per layer: q, k, v, o, gate, up, down.
    layers: Vec<[Option<Bf16Rows>; 7]>,
    lm_head: Option<Bf16Rows>,
    /// A fake-quantized student's weights on the CPU, quantized once (with the id of the
    /// weight they came from) instead of at every step: a step re-quantized every weight
    /// (135M shape: 10.9 tokens/s against 51.6 for the f32 teacher). In `Block::projections`
    /// order, layer after layer (`layer * 7 + which`); `None` where the weight is not
    /// fake-quantized or is trainable.
    quantized: Vec<Option<(candle_core::TensorId, Tensor)>>,
}

impl SeqWeights {
    fn new(model: &Llama) -> Result<Self> {
        let cpu_f32 = model.device.is_cpu() && model.compute == DType::F32;
        let exact = |l: &Linear| -> Result<Option<Bf16Rows>> {
            match &l.weight {
                crate::llama::Weight::Dense(w) if cpu_f32 && model.quant.w_bits.is_none() => {
                    Bf16Rows::exact(w)
                }
                _ => Ok(None),
            }
        };
        let layers = model
            .blocks
            .iter()
            .map(|b| {
                let (a, m) = (&b.attn, &b.mlp);
                Ok([
                    exact(&a.q_proj)?,
                    exact(&a.k_proj)?,
                    exact(&a.v_proj)?,
                    exact(&a.o_proj)?,
                    exact(&m.gate_proj)?,
                    exact(&m.up_proj)?,
                    exact(&m.down_proj)?,
                ])
            })
            .collect::<Result<_>>()?;
        let lm_head = match cpu_f32 {
            true => Bf16Rows::exact(&model.lm_head)?,
            false => None,
        };
        let quantize = |l: &Linear| -> Result<Option<(candle_core::TensorId, Tensor)>> {
            match &l.weight {
                crate::llama::Weight::Dense(w)
                    if model.device.is_cpu() && model.quant.w_bits.is_some() && !w.track_op() =>
                {
                    let q = l.effective_weight(&model.quant)?.detach();
                    Ok(Some((w.id(), q.to_dtype(model.compute)?)))
                }
                _ => Ok(None),
            }
        };
        let quantized = model
            .blocks
            .iter()
            .flat_map(|b| b.projections())
            .map(|(_, l)| quantize(l))
            .collect::<Result<_>>()?;
        Ok(Self {
            source: model.lm_head.id(),
            layers,
            lm_head,
            quantized,
        })
    }

    /// Whether every weight held is still `model`'s (a live batch's snapshot may predate a
    /// change of the weights).
    fn matches(&self, model: &Llama) -> bool {
        let linears = model.blocks.iter().flat_map(|b| {
            let (a, m) = (&b.attn, &b.mlp);
            [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]
        });
        let held = self.layers.iter().flatten();
        let same = |h: &Option<Bf16Rows>, w: Option<&Tensor>| match (h, w) {
            (None, _) => true,
            (Some(h), Some(w)) => h.same_as(w).unwrap_or(false),
            (Some(_), None) => false,
        };
        fn dense(l: &Linear) -> Option<&Tensor> {
            match &l.weight {
                crate::llama::Weight::Dense(w) => Some(w),
                _ => None,
            }
        }
        let quantized_from_these = self
            .quantized
            .iter()
            .zip(model.blocks.iter().flat_map(|b| b.projections()))
            .all(|(q, (_, l))| match q {
                None => true,
                Some((id, _)) => dense(l).is_some_and(|w| w.id() == *id),
            });
        self.layers.len() == model.blocks.len()
            && held.zip(linears).all(|(h, l)| same(h, dense(l)))
            && same(&self.lm_head, Some(&model.lm_head))
            && self.quantized.len() == 7 * model.blocks.len()
            && quantized_from_these
    }

    /// The snapshot of `model` that one of `caches` (or another live batch of caches, as
    /// other decoding workers hold) has, or a new one; every cache then holds it.
    fn shared(model: &Llama, caches: &mut [&mut SeqCache]) -> Result<Arc<Self>> {
        static LIVE: std::sync::Mutex<Vec<std::sync::Weak<SeqWeights>>> =
            std::sync::Mutex::new(Vec::new());
        let id = model.lm_head.id();
        let held = caches
            .iter()
            .find_map(|c| c.weights.as_ref().filter(|w| w.source == id).cloned());
        let w = match held {
            Some(w) => w,
            None => {
                let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
                live.retain(|w| w.strong_count() > 0);
                match live
                    .iter()
                    .filter_map(|w| w.upgrade())
                    .find(|w| w.source == id && w.matches(model))
                {
                    Some(w) => w,
                    None => {
                        let w = Arc::new(Self::new(model)?);
                        live.push(Arc::downgrade(&w));
                        w
                    }
                }
            }
        };
        for c in caches.iter_mut() {
            c.weights = Some(w.clone());
        }
        Ok(w)
    }
}

impl SeqCache {
    pub fn new(model: &Llama, capacity: usize) -> Result<Self> {
        Self::with_format(model, capacity, KvCacheFormat::Float)
    }

    /// A cache storing K and V as `format`. The low-bit formats run on the CPU in f32, with K
    /// quantized after RoPE in the plain basis (what they store is what attention reads).
    pub fn with_format(model: &Llama, capacity: usize, format: KvCacheFormat) -> Result<Self> {
        let c = &model.cfg;
        let capacity = capacity.min(c.max_position_embeddings);
        let (mut k, mut v, mut codes) = (vec![], vec![], vec![]);
        if format == KvCacheFormat::Float {
            let shape = (c.num_key_value_heads, capacity, c.head_dim);
            for _ in 0..c.num_hidden_layers {
                k.push(Tensor::zeros(shape, model.compute, &model.device)?);
                v.push(Tensor::zeros(shape, model.compute, &model.device)?);
            }
        } else {
            let q = &model.quant;
            if !model.device.is_cpu() || model.compute != DType::F32 {
                bail!(
                    "--kv-cache {}: low-bit caches run on the CPU in f32",
                    format.name()
                );
            }
            if q.kv_bits.is_some() && q.kv_point != KvPoint::PostRope {
                bail!("--kv-cache {}: the model quantizes K before RoPE (kv_point = pre_rope); a cache stores K after it", format.name());
            }
            if q.kv_bits.is_some() && q.kv_rotation != crate::qconfig::KvRotation::None {
                bail!("--kv-cache {}: the model quantizes K/V in a Hadamard basis (kv_rotation); this cache stores them in the plain basis", format.name());
            }
            let width = c.num_key_value_heads * c.head_dim;
            for _ in 0..c.num_hidden_layers {
                codes.push(KvCodes::new(format, width, capacity)?);
            }
        }
        Ok(Self {
            k,
            v,
            codes,
            format,
            len: 0,
            capacity,
            weights: None,
        })
    }

    pub fn format(&self) -> KvCacheFormat {
        self.format
    }

    /// Bytes the cache holds for its whole capacity (K and V of every layer).
    pub fn bytes(&self) -> usize {
        let float: usize = self
            .k
            .iter()
            .chain(&self.v)
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        float + self.codes.iter().map(KvCodes::bytes).sum::<usize>()
    }

    /// Bytes per cached token (all layers, K and V).
    pub fn bytes_per_token(&self) -> usize {
        self.bytes() / self.capacity.max(1)
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
        if let crate::llama::Weight::Packed(p) = &self.weight {
            return p.forward_tensor(x, q.a_bits, self.bias.as_ref());
        }
        let w = self.effective_weight(q)?.detach().to_dtype(x.dtype())?;
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.to_dtype(x.dtype()))
            .transpose()?;
        project(x, &w, bias.as_ref(), q)
    }

    /// `forward_rows` from the weight's bf16 snapshot when it has one.
    fn forward_rows_from(
        &self,
        x: &Tensor,
        q: &QuantConfig,
        w: Option<&Bf16Rows>,
    ) -> Result<Tensor> {
        let Some(w) = w else {
            return self.forward_rows(x, q);
        };
        let x = match q.a_bits {
            Some(b) => quant::fake_quant(x, b, None)?,
            None => x.clone(),
        };
        let y = w.matmul(&x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?),
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
        let hd = cfg.head_dim;
        let half = hd / 2;
        let format = caches.first().map_or(KvCacheFormat::Float, |c| c.format);
        if caches.iter().any(|c| c.format != format) {
            bail!("decode_step: caches of different formats in one batch");
        }
        // A per-token integer cache of the model's own K/V bits stores the trained quantizer's
        // codes: quantize once, into the cache, not also before it.
        let stored = format.token_bits().is_some() && format.token_bits() == q.kv_bits;
        for c in caches.iter() {
            if c.len >= c.capacity {
                bail!("decode_step: KV cache full ({} tokens)", c.capacity);
            }
            cfg.check_context(c.len + 1)
                .map_err(candle_core::Error::Msg)?;
        }
        let sw = SeqWeights::shared(self, caches)?;
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
        let mut x = self
            .embed_tokens
            .index_select(&ids, 0)?
            .to_dtype(self.compute)?;
        let kv = KvQuant {
            q,
            head_dim: hd,
            stored,
        };
        let mut path = DecodeStep {
            model: self,
            weights: &sw,
            layer: 0,
            caches: &mut *caches,
            cos,
            sin,
        };
        for (l, blk) in self.blocks.iter().enumerate() {
            path.layer = l;
            x = decoder_block(blk, l, &x, cfg.rms_norm_eps, &kv, &mut path)?;
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        let x = rms_norm(&x, &self.norm, cfg.rms_norm_eps)?;
        match &sw.lm_head {
            Some(w) => w.matmul(&x),
            None => row_matmul(&x, &self.lm_head.to_dtype(self.compute)?)?.to_dtype(DType::F32),
        }
    }
}

/// The per-sequence decoding path of `block::decoder_block`: one token per row [B, ..], each
/// row attending over its own `SeqCache`.
struct DecodeStep<'a, 'c> {
    model: &'a Llama,
    weights: &'a SeqWeights,
    layer: usize,
    caches: &'a mut [&'c mut SeqCache],
    /// RoPE tables at each sequence's position, [B, 1, head_dim / 2].
    cos: Tensor,
    sin: Tensor,
}

impl BlockPath for DecodeStep<'_, '_> {
    fn project(&self, lin: &Linear, which: usize, x: &Tensor) -> Result<Tensor> {
        if let Some(Some((_, wq))) = self.weights.quantized.get(self.layer * 7 + which) {
            let bias = lin
                .bias
                .as_ref()
                .map(|b| b.to_dtype(x.dtype()))
                .transpose()?;
            return project(x, wq, bias.as_ref(), &self.model.quant);
        }
        let w = self.weights.layers[self.layer][which].as_ref();
        lin.forward_rows_from(x, &self.model.quant, w)
    }

    fn rope(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let hd = self.model.cfg.head_dim;
        Rope::apply(&x.reshape((x.dim(0)?, heads, hd))?, &self.cos, &self.sin)
    }

    fn per_token(&self, k: &Tensor, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (b, nkv, hd) = k.dims3()?;
        f(&k.reshape((b, nkv * hd))?)?.reshape((b, nkv, hd))
    }

    fn attend(&mut self, l: usize, qs: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (bsz, nh, hd) = qs.dims3()?;
        let nkv = k.dim(1)?;
        let v = v.reshape((bsz, nkv, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let device = &self.model.device;
        let attend = |(i, c): (usize, &mut &mut SeqCache)| -> Result<Tensor> {
            let n = c.len;
            if let Some(codes) = c.codes.get_mut(l) {
                // Low-bit cache: store this token's codes, attend from the codes.
                let row = |t: &Tensor| t.get(i)?.flatten_all()?.to_vec1::<f32>();
                codes.write(n, &row(k)?, &row(&v)?);
                let y = codes.attend(&row(qs)?, n + 1, nh, nkv, hd, scale as f32);
                return Tensor::from_vec(y, (1, nh * hd), device);
            }
            c.k[l].slice_set(&k.get(i)?.reshape((nkv, 1, hd))?.contiguous()?, 1, n)?;
            c.v[l].slice_set(&v.get(i)?.reshape((nkv, 1, hd))?.contiguous()?, 1, n)?;
            let kc = c.k[l].narrow(1, 0, n + 1)?;
            let vc = c.v[l].narrow(1, 0, n + 1)?;
            let qi = qs.get(i)?.reshape((nkv, nh / nkv, hd))?;
            let att = attention_probs(&(qi.matmul(&kc.t()?)? * scale)?)?;
            att.matmul(&vc)?.reshape((1, nh * hd))
        };
        // On the CPU these small ops run on one thread each: the sequences go in parallel
        // (each writes only its own cache).
        let ys = if device.is_cpu() && bsz > 1 {
            self.caches
                .par_iter_mut()
                .enumerate()
                .map(attend)
                .collect::<Result<Vec<_>>>()?
        } else {
            self.caches
                .iter_mut()
                .enumerate()
                .map(attend)
                .collect::<Result<Vec<_>>>()?
        };
        Tensor::cat(&ys, 0)
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
    qkv: StepWeight,
    qkv_bias: Option<Tensor>,
    /// Qwen3's per-head norms of q and k.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o: StepWeight,
    o_bias: Option<Tensor>,
    gate_up: StepWeight,
    down: StepWeight,
}

impl LayerWeights {
    fn new(blk: &crate::llama::Block, q: &QuantConfig, dtype: DType) -> Result<Self> {
        let a = &blk.attn;
        let qkv_bias = match (&a.q_proj.bias, &a.k_proj.bias, &a.v_proj.bias) {
            (Some(bq), Some(bk), Some(bv)) => Some(Tensor::cat(&[bq, bk, bv], 0)?.to_dtype(dtype)?),
            _ => None,
        };
        let cast = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            t.as_ref().map(|t| t.detach().to_dtype(dtype)).transpose()
        };
        let device = blk.input_layernorm.device();
        let stack = |ls: &[&Linear]| StepWeight::stack(ls, q, dtype, device);
        Ok(Self {
            qkv: stack(&[&a.q_proj, &a.k_proj, &a.v_proj])?,
            qkv_bias,
            q_norm: cast(&a.q_norm)?,
            k_norm: cast(&a.k_norm)?,
            o: stack(&[&a.o_proj])?,
            o_bias: cast(&a.o_proj.bias)?,
            gate_up: stack(&[&blk.mlp.gate_proj, &blk.mlp.up_proj])?,
            down: stack(&[&blk.mlp.down_proj])?,
        })
    }
}

/// A (stacked) projection weight [out, in] as the batched step multiplies it.
enum StepWeight {
    /// Dense, in the compute dtype.
    Dense(Tensor),
    /// A packed student on a GPU: 4-bit codes u8 [out, in / 2] and f32 scales [out, groups]
    /// (`lowbit::PackedLinear`'s layout), read directly by the GEMV; larger batches dequantize
    /// one weight at a time for cuBLAS.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Q4 {
        codes: Tensor,
        scales: Tensor,
        group: usize,
    },
}

impl StepWeight {
    /// The projections `ls` (sharing their input) stacked along the output dim.
    fn stack(
        ls: &[&Linear],
        q: &QuantConfig,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let packed: Option<Vec<&crate::lowbit::PackedLinear>> = ls
            .iter()
            .map(|l| match &l.weight {
                crate::llama::Weight::Packed(p) if p.gpu_ready() => Some(&**p),
                _ => None,
            })
            .collect();
        let gpu =
            cfg!(feature = "cuda") && device.is_cuda() && matches!(dtype, DType::BF16 | DType::F16);
        if let (true, Some(ps)) = (gpu, packed) {
            let (codes, scales) = crate::lowbit::PackedLinear::stacked_parts(&ps, device)?;
            let group = ps[0].group();
            return Ok(Self::Q4 {
                codes,
                scales,
                group,
            });
        }
        let ws = ls
            .iter()
            .map(|l| {
                l.effective_weight(q)?
                    .detach()
                    .to_device(device)?
                    .to_dtype(dtype)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::Dense(Tensor::cat(&ws, 0)?))
    }

    /// Output rows.
    fn rows(&self) -> Result<usize> {
        match self {
            Self::Dense(w) => w.dim(0),
            Self::Q4 { codes, .. } => codes.dim(0),
        }
    }

    /// The dense weight: itself, or dequantized from the codes on the device (a transient
    /// copy for one product).
    fn dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(w.clone()),
            #[cfg(feature = "cuda")]
            Self::Q4 {
                codes,
                scales,
                group,
            } => crate::lowbit::packed_gpu::dequantize(codes, scales, *group, dtype),
            #[cfg(not(feature = "cuda"))]
            Self::Q4 { .. } => {
                let _ = dtype;
                bail!("decode: 4-bit step weights need a build with the `cuda` feature")
            }
        }
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
    /// What candle's attention ops need (absent when gpu-kernels' attention runs).
    ops: Option<OpsData>,
}

/// The cache rows to write and the attention mask, for candle's ops.
struct OpsData {
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
    /// `span`: key positions candle's attention ops cover; `None` when gpu-kernels' attention
    /// runs (it reads each slot's position on the device).
    fn new(
        tokens: &[Option<u32>],
        cache: &BatchCache,
        nkv: usize,
        hd: usize,
        span: Option<usize>,
    ) -> Self {
        let cap = cache.capacity;
        // An idle slot writes at its own next position (or the last one): never into live data.
        let pos: Vec<usize> = cache.lens.iter().map(|&n| n.min(cap - 1)).collect();
        let ops = span.map(|span| OpsData {
            write_rows: (0..pos.len() * nkv)
                .flat_map(|r| std::iter::repeat_n((r * cap + pos[r / nkv]) as u32, hd))
                .collect(),
            mask: pos
                .iter()
                .flat_map(|&p| (0..span).map(move |j| if j <= p { 0.0 } else { f32::NEG_INFINITY }))
                .collect(),
            span,
            nkv,
            hd,
        });
        Self {
            ids: tokens.iter().map(|t| t.unwrap_or(0)).collect(),
            pos: pos.iter().map(|&p| p as u32).collect(),
            ops,
        }
    }

    fn upload(self, dev: &candle_core::Device) -> Result<StepInputs> {
        let s = self.ids.len();
        let ops = match self.ops {
            Some(o) => Some(OpsInputs {
                write_rows: Tensor::from_vec(o.write_rows, (s * o.nkv, o.hd), dev)?,
                mask: Tensor::from_vec(o.mask, (s, 1, 1, o.span), dev)?,
            }),
            None => None,
        };
        Ok(StepInputs {
            ids: Tensor::from_vec(self.ids, s, dev)?,
            pos: Tensor::from_vec(self.pos, s, dev)?,
            ops,
        })
    }
}

/// The device side of one batched step.
struct StepInputs {
    ids: Tensor,
    pos: Tensor,
    ops: Option<OpsInputs>,
}

struct OpsInputs {
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
        match (&self.ops, &new.ops) {
            (Some(o), Some(n)) => {
                o.write_rows.slice_set(&n.write_rows, 0, 0)?;
                o.mask.slice_set(&n.mask, 0, 0)
            }
            (None, None) => Ok(()),
            _ => bail!("decode: a step's inputs changed kind between captured steps"),
        }
    }
}

/// The K/V caches of `slots` sequences, per layer one tensor [slots, n_kv, capacity, head_dim],
/// with a snapshot of the model's decoding weights (a second copy of the projections: make a
/// new cache after changing the model).
pub struct BatchCache {
    /// Per layer: [slots, nkv, capacity, hd] in the compute dtype, or for a low-bit cache the
    /// codes u8 [slots, capacity, nkv · hd · bits / 8] (see `gpu_kernels::decode::Caches`).
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// A low-bit cache's f32 scales per layer, [slots, capacity] (empty for a float cache).
    k_scale: Vec<Tensor>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    v_scale: Vec<Tensor>,
    format: KvCacheFormat,
    lens: Vec<usize>,
    capacity: usize,
    layers: Vec<LayerWeights>,
    lm_head: StepWeight,
    /// Which kernels run a step's pieces.
    kernels: StepKernels,
    /// A step's activations when every piece runs on gpu-kernels.
    workspace: Option<Workspace>,
    /// Replays the step as one CUDA graph (see `enable_cuda_graph`).
    graph: Option<graph::GraphState>,
}

/// The activations of a step that runs entirely on gpu-kernels, allocated once: a captured step
/// then has no allocation between its kernels (one would order the two kernels fully and undo
/// their programmatic dependent launch), and the residual stream is updated in place.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Workspace {
    /// The residual stream, [slots, hidden].
    x: Tensor,
    /// [slots, (nh + 2 nkv) · hd].
    qkv: Tensor,
    /// The attention's output, [slots, nh · hd].
    y: Tensor,
    /// The SwiGLU's output, [slots, intermediate].
    m: Tensor,
    /// The attention's partial results over long caches (f32).
    scratch: Option<Tensor>,
}

impl Workspace {
    /// `None` unless every projection and the attention run on gpu-kernels.
    #[cfg(feature = "cuda")]
    fn new(
        model: &Llama,
        kernels: StepKernels,
        slots: usize,
        capacity: usize,
    ) -> Result<Option<Self>> {
        let c = &model.cfg;
        let (qd, kvd) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let fits = [c.hidden_size, qd, c.intermediate_size]
            .iter()
            .all(|k| k.is_multiple_of(8));
        if !(kernels.gemv && kernels.attention && fits) {
            return Ok(None);
        }
        let zeros = |n: usize, dtype: DType| Tensor::zeros((slots, n), dtype, &model.device);
        let heads = StepKernels::heads(model, slots, capacity);
        let scratch = gpu_kernels::decode::attention_scratch(heads);
        Ok(Some(Self {
            x: zeros(c.hidden_size, model.compute)?,
            qkv: zeros(qd + 2 * kvd, model.compute)?,
            y: zeros(qd, model.compute)?,
            m: zeros(c.intermediate_size, model.compute)?,
            scratch: (scratch > 0)
                .then(|| Tensor::zeros(scratch, DType::F32, &model.device))
                .transpose()?,
        }))
    }

    #[cfg(not(feature = "cuda"))]
    fn new(_: &Llama, _: StepKernels, _: usize, _: usize) -> Result<Option<Self>> {
        Ok(None)
    }
}

impl BatchCache {
    pub fn new(model: &Llama, slots: usize, capacity: usize) -> Result<Self> {
        Self::with_format(model, slots, capacity, KvCacheFormat::Float)
    }

    /// A cache holding K/V as `format` says: the compute dtype, or (on a GPU, through
    /// gpu-kernels' attention) int8/int4 codes with one scale per token, the trained K/V
    /// quantizer's. llama.cpp's q8_0/q4_0 layouts run only on the CPU's per-sequence caches.
    pub fn with_format(
        model: &Llama,
        slots: usize,
        capacity: usize,
        format: KvCacheFormat,
    ) -> Result<Self> {
        let c = &model.cfg;
        let capacity = capacity.min(c.max_position_embeddings);
        let kernels = StepKernels::new(model, slots, capacity, format);
        let bits = match format {
            KvCacheFormat::Float => 0,
            _ => match format.token_bits() {
                Some(b) if kernels.attention => b as usize,
                _ => bail!(
                    "a {} K/V cache in batched decoding needs gpu-kernels' attention: a CUDA build on a GPU in bf16/f16, KV heads × head size a multiple of 32 for int4, no q/k norm, and a student whose K/V quantizer (if any) is the cache's: post-RoPE, unrotated, same bits (use the per-sequence CPU decoder otherwise)",
                    format.name()
                ),
            },
        };
        let layers = c.num_hidden_layers;
        let (nkv, hd) = (c.num_key_value_heads, c.head_dim);
        let buffers = || -> Result<Vec<Tensor>> {
            (0..layers)
                .map(|_| match bits {
                    0 => Tensor::zeros((slots, nkv, capacity, hd), model.compute, &model.device),
                    b => Tensor::zeros(
                        (slots, capacity, nkv * hd * b / 8),
                        DType::U8,
                        &model.device,
                    ),
                })
                .collect()
        };
        let scales = || -> Result<Vec<Tensor>> {
            match bits {
                0 => Ok(Vec::new()),
                _ => (0..layers)
                    .map(|_| Tensor::zeros((slots, capacity), DType::F32, &model.device))
                    .collect(),
            }
        };
        Ok(Self {
            k: buffers()?,
            v: buffers()?,
            k_scale: scales()?,
            v_scale: scales()?,
            format,
            lens: vec![0; slots],
            capacity,
            layers: model
                .blocks
                .iter()
                .map(|b| LayerWeights::new(b, &model.quant, model.compute))
                .collect::<Result<_>>()?,
            lm_head: StepWeight::Dense(model.lm_head.detach().to_dtype(model.compute)?),
            kernels,
            workspace: Workspace::new(model, kernels, slots, capacity)?,
            graph: None,
        })
    }

    pub fn format(&self) -> KvCacheFormat {
        self.format
    }

    /// Bytes the cache holds per token of one slot, over all layers (K and V, scales
    /// included).
    pub fn bytes_per_token(&self) -> usize {
        let row: usize = self.k[0].elem_count() / (self.slots() * self.capacity);
        let dtype = self.k[0].dtype().size_in_bytes();
        let scales = if self.k_scale.is_empty() { 0 } else { 4 };
        2 * self.k.len() * (row * dtype + scales)
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
            if t.is_some() {
                self.cfg
                    .check_context(cache.lens[i] + 1)
                    .map_err(candle_core::Error::Msg)?;
            }
        }
        // candle's attention ops span the longest slot (the whole capacity for a CUDA graph,
        // whose shapes are fixed); a slot sees its positions 0..=pos.
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
            (!cache.kernels.attention).then_some(span),
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
        let eps = cfg.rms_norm_eps;
        let kernels = cache.kernels;
        let ops = match &inp.ops {
            Some(o) => Some(self.attention_ops(o, &inp.pos, cache)?),
            None => None,
        };
        // With a workspace, each piece writes into its buffer there.
        let ws = cache.workspace.as_ref();
        // PIPELINE_PROFILE=1: GPU time per piece of eager steps (a graph records no events).
        let mut timer = match cache.graph {
            None => profile::StepTimer::start(&self.device)?,
            Some(_) => None,
        };
        let mark = profile::mark;
        let mut x = self
            .embed_tokens
            .index_select(&inp.ids, 0)?
            .to_dtype(self.compute)?;
        mark(&mut timer, "embed")?;
        for (l, blk) in self.blocks.iter().enumerate() {
            let lw = &cache.layers[l];
            let into = ws.map(|w| &w.qkv);
            let qkv = kernels.norm_project(&x, &blk.input_layernorm, &lw.qkv, eps, q, into)?;
            let qkv = match &lw.qkv_bias {
                Some(b) => qkv.broadcast_add(b)?,
                None => qkv,
            };
            mark(&mut timer, "norm_qkv")?;
            let y = match &ops {
                Some(ops) => ops.attend(&qkv, lw, &cache.k[l], &cache.v[l], q)?,
                None => self.attend_kernels(&qkv, &inp.pos, cache, l)?,
            };
            mark(&mut timer, "attention")?;
            x = kernels.project_add(&y, &lw.o, &x, q, ws.map(|w| &w.x))?;
            if let Some(b) = &lw.o_bias {
                x = x.broadcast_add(b)?;
            }
            mark(&mut timer, "o_proj")?;
            let into = ws.map(|w| &w.m);
            let m = kernels.swiglu(&x, &blk.post_attention_layernorm, &lw.gate_up, eps, q, into)?;
            mark(&mut timer, "norm_gate_up_swiglu")?;
            x = kernels.project_add(&m, &lw.down, &x, q, ws.map(|w| &w.x))?;
            mark(&mut timer, "down_proj")?;
        }
        let logits = kernels.logits(&x, &self.norm, &cache.lm_head, eps)?;
        mark(&mut timer, "norm_lm_head")?;
        if let Some(t) = timer {
            t.finish()?;
        }
        Ok(logits)
    }

    /// The step-wide tensors of candle's attention ops: RoPE tables at each slot's position,
    /// the cache rows to write, the mask.
    fn attention_ops(
        &self,
        o: &OpsInputs,
        pos: &Tensor,
        cache: &BatchCache,
    ) -> Result<AttentionOps> {
        let cfg = &self.cfg;
        let (s, half) = (cache.slots(), cfg.head_dim / 2);
        let at_pos = |t: &Tensor| -> Result<Tensor> {
            t.index_select(pos, 0)?
                .reshape((s, 1, half))?
                .to_dtype(self.compute)
        };
        Ok(AttentionOps {
            cos: at_pos(&self.rope.cos)?,
            sin: at_pos(&self.rope.sin)?,
            write_rows: o.write_rows.clone(),
            // Scores stay in the compute dtype: candle's softmax accumulates in f32 whatever
            // the dtype, and two casts per layer were 10% of a graph-replayed bf16 step's
            // kernels.
            mask: o.mask.to_dtype(self.compute)?,
            nh: cfg.num_attention_heads,
            nkv: cfg.num_key_value_heads,
            hd: cfg.head_dim,
            eps: cfg.rms_norm_eps,
            capacity: cache.capacity,
        })
    }

    /// Attention of layer `l` through gpu-kernels: RoPE, the cache write and each slot's queries
    /// against its cache prefix in one launch.
    #[cfg(feature = "cuda")]
    fn attend_kernels(
        &self,
        qkv: &Tensor,
        pos: &Tensor,
        cache: &BatchCache,
        l: usize,
    ) -> Result<Tensor> {
        let h = StepKernels::heads(self, cache.slots(), cache.capacity);
        let scales = cache.k_scale.get(l).zip(cache.v_scale.get(l));
        let caches = (&cache.k[l], &cache.v[l], scales, cache.format.token_bits());
        let rope = (&self.rope.cos, &self.rope.sin);
        let into = cache.workspace.as_ref().map(|w| (&w.y, w.scratch.as_ref()));
        gpu::attention(qkv, rope, pos, caches, h, into)
    }

    #[cfg(not(feature = "cuda"))]
    fn attend_kernels(&self, _: &Tensor, _: &Tensor, _: &BatchCache, _: usize) -> Result<Tensor> {
        bail!("decode: gpu-kernels' attention needs a build with the `cuda` feature")
    }
}

/// candle's attention ops over the batch cache: any device, dtype and quantization.
struct AttentionOps {
    /// RoPE tables at each slot's position, [slots, 1, head_dim / 2], compute dtype.
    cos: Tensor,
    sin: Tensor,
    write_rows: Tensor,
    /// [slots, 1, 1, span], compute dtype.
    mask: Tensor,
    nh: usize,
    nkv: usize,
    hd: usize,
    eps: f64,
    capacity: usize,
}

impl AttentionOps {
    /// qkv [slots, (nh + 2 nkv) · hd] -> [slots, nh · hd]; writes this step's k and v into the
    /// caches [slots, nkv, capacity, hd].
    fn attend(
        &self,
        qkv: &Tensor,
        lw: &LayerWeights,
        kc: &Tensor,
        vc: &Tensor,
        q: &QuantConfig,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let (s, span, cap) = (qkv.dim(0)?, self.mask.dim(3)?, self.capacity);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let qs = Attention::norm_heads(&qkv.narrow(1, 0, qd)?, lw.q_norm.as_ref(), hd, self.eps)?;
        let mut k =
            Attention::norm_heads(&qkv.narrow(1, qd, kvd)?, lw.k_norm.as_ref(), hd, self.eps)?;
        let kv = KvQuant {
            q,
            head_dim: hd,
            stored: false,
        };
        let v = kv.value(&qkv.narrow(1, qd + kvd, kvd)?)?;
        k = kv.key_before_rope(k)?;
        let qs = rope(&qs.reshape((s, nh, hd))?, &self.cos, &self.sin)?;
        let mut k = rope(&k.reshape((s, nkv, hd))?, &self.cos, &self.sin)?;
        if kv.after_rope() {
            k = kv.key_after_rope(&k.reshape((s, nkv * hd))?)?;
        }
        let flat = (s * nkv * cap, hd);
        kc.reshape(flat)?.scatter_set(
            &self.write_rows,
            &k.reshape((s * nkv, hd))?.contiguous()?,
            0,
        )?;
        vc.reshape(flat)?.scatter_set(
            &self.write_rows,
            &v.reshape((s * nkv, hd))?.contiguous()?,
            0,
        )?;
        let kc = kc.narrow(2, 0, span)?;
        let vc = vc.narrow(2, 0, span)?;
        let qg = qs.reshape((s, nkv, nh / nkv, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (qg.matmul(&kc.transpose(2, 3)?)? * scale)?.broadcast_add(&self.mask)?;
        let att = candle_nn::ops::softmax_last_dim(&scores)?;
        att.matmul(&vc)?.reshape((s, nh * hd))
    }
}

/// Which kernels run the pieces of a batched step. candle's ops run anything; gpu-kernels'
/// decode kernels take a GPU in bf16/f16 without activation or K/V quantization (weight
/// quantization is folded into `LayerWeights` already); their GEMV takes at most
/// `GEMV_MAX_SLOTS` slots (its work per weight grows with the slots; cuBLAS's tiled products
/// serve larger batches).
#[derive(Clone, Copy)]
struct StepKernels {
    /// RoPE + cache write and attention (`Llama::attend_kernels`).
    attention: bool,
    /// Projections with the RMSNorm before them and the residual add or SwiGLU after them.
    gemv: bool,
}

impl StepKernels {
    fn new(model: &Llama, slots: usize, capacity: usize, format: KvCacheFormat) -> Self {
        let q = &model.quant;
        let gpu = cfg!(feature = "cuda")
            && model.device.is_cuda()
            && matches!(model.compute, DType::BF16 | DType::F16);
        // The attention kernel applies RoPE straight to the projections (no q/k norm between)
        // and quantizes K/V only as a code cache does: post-RoPE, per token, unrotated.
        let kv_fits = match (q.kv_bits, format) {
            (None, KvCacheFormat::Float) => true,
            (None, f) => f.token_bits().is_some(),
            (Some(b), f) => {
                f.token_bits() == Some(b)
                    && q.kv_point == KvPoint::PostRope
                    && q.kv_rotation == crate::qconfig::KvRotation::None
            }
        };
        let bits = format.token_bits().unwrap_or(0);
        Self {
            attention: gpu
                && kv_fits
                && !model.cfg.qk_norm
                && Self::heads_fit(model, slots, capacity, bits),
            gemv: gpu && q.a_bits.is_none() && slots <= GEMV_MAX_SLOTS,
        }
    }

    #[cfg(feature = "cuda")]
    fn heads(model: &Llama, slots: usize, capacity: usize) -> gpu_kernels::decode::Heads {
        let c = &model.cfg;
        gpu_kernels::decode::Heads {
            slots,
            nh: c.num_attention_heads,
            nkv: c.num_key_value_heads,
            hd: c.head_dim,
            capacity,
        }
    }

    #[cfg(feature = "cuda")]
    fn heads_fit(model: &Llama, slots: usize, capacity: usize, bits: u32) -> bool {
        Self::heads(model, slots, capacity).fit()
            && gpu_kernels::decode::cache_fits(
                bits,
                model.cfg.head_dim,
                model.cfg.num_key_value_heads,
            )
    }

    #[cfg(not(feature = "cuda"))]
    fn heads_fit(_: &Llama, _: usize, _: usize, _: u32) -> bool {
        false
    }

    /// Whether the GEMV takes products with this weight [out, in].
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn gemv_takes(&self, w: &StepWeight) -> bool {
        self.gemv
            && match w {
                StepWeight::Dense(w) => w.dim(1).is_ok_and(|k| k.is_multiple_of(8)),
                StepWeight::Q4 { codes, .. } => codes.dim(1).is_ok_and(|h| h.is_multiple_of(16)),
            }
    }

    /// `rms_norm(x) · wᵀ` (written into `into` by the GEMV).
    fn norm_project(
        &self,
        x: &Tensor,
        nw: &Tensor,
        w: &StepWeight,
        eps: f64,
        q: &QuantConfig,
        into: Option<&Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.gemv_takes(w) {
            let g = gpu::Gemv {
                norm: Some((nw, eps)),
                ..Default::default()
            };
            return g.run(x, w, into);
        }
        let _ = into;
        project(&norm(x, nw, eps)?, &w.dense(x.dtype())?, None, q)
    }

    /// `res + y · wᵀ` (written into `into` by the GEMV; `into` may be `res`).
    fn project_add(
        &self,
        y: &Tensor,
        w: &StepWeight,
        res: &Tensor,
        q: &QuantConfig,
        into: Option<&Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.gemv_takes(w) {
            let g = gpu::Gemv {
                residual: Some(res),
                ..Default::default()
            };
            return g.run(y, w, into);
        }
        let _ = into;
        res + project(y, &w.dense(y.dtype())?, None, q)?
    }

    /// `silu(h · gateᵀ) · (h · upᵀ)` with `h = rms_norm(x)`, `gate_up` = [gate; up] (written
    /// into `into` by the GEMV).
    fn swiglu(
        &self,
        x: &Tensor,
        nw: &Tensor,
        gate_up: &StepWeight,
        eps: f64,
        q: &QuantConfig,
        into: Option<&Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.gemv_takes(gate_up) {
            let g = gpu::Gemv {
                norm: Some((nw, eps)),
                swiglu: true,
                ..Default::default()
            };
            return g.run(x, gate_up, into);
        }
        let _ = into;
        let gu = project(&norm(x, nw, eps)?, &gate_up.dense(x.dtype())?, None, q)?;
        let inter = gate_up.rows()? / 2;
        gu.narrow(1, 0, inter)?.silu()? * gu.narrow(1, inter, inter)?
    }

    /// f32 logits `rms_norm(x) · lm_headᵀ`.
    fn logits(&self, x: &Tensor, nw: &Tensor, lm_head: &StepWeight, eps: f64) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.gemv_takes(lm_head) {
            let g = gpu::Gemv {
                norm: Some((nw, eps)),
                out_f32: true,
                ..Default::default()
            };
            return g.run(x, lm_head, None);
        }
        row_matmul(&norm(x, nw, eps)?, &lm_head.dense(x.dtype())?)?.to_dtype(DType::F32)
    }
}

/// Most slots for which the projections run as gpu-kernels' GEMV rather than cuBLAS.
const GEMV_MAX_SLOTS: usize = 8;

/// gpu-kernels' decode kernels on candle tensors (which must live on a CUDA device).
#[cfg(feature = "cuda")]
mod gpu {
    use super::StepWeight;
    use candle_core::op::BackpropOp;
    use candle_core::{bail, CudaStorage, Layout, Result, Shape, Storage, StorageRef, Tensor};
    use gpu_kernels::decode::{self as k, Caches, GemvOptions, GemvWeight, Heads};

    type Guard<'a> = (StorageRef<'a>, &'a Layout);

    fn arg<'a>(g: &'a Guard<'_>) -> Result<k::Arg<'a>> {
        match &*g.0 {
            Storage::Cuda(s) => Ok((s, g.1)),
            _ => bail!("decode kernels: a tensor is not on a CUDA device"),
        }
    }

    fn tensor(s: CudaStorage, shape: impl Into<Shape>) -> Tensor {
        Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
    }

    /// A GEMV with what comes around it (see `gpu_kernels::decode::GemvOptions`).
    #[derive(Default)]
    pub struct Gemv<'a> {
        /// RMSNorm of x first: weight and epsilon.
        pub norm: Option<(&'a Tensor, f64)>,
        pub swiglu: bool,
        pub residual: Option<&'a Tensor>,
        pub out_f32: bool,
    }

    impl Gemv<'_> {
        /// `x [s, k] · w [n, k]ᵀ` with the extras, into `into` (returned) or a new tensor.
        pub fn run(&self, x: &Tensor, w: &StepWeight, into: Option<&Tensor>) -> Result<Tensor> {
            let x = x.contiguous()?;
            let nw = self.norm.map(|(g, _)| g.to_dtype(x.dtype())).transpose()?;
            let (wt, extra) = match w {
                StepWeight::Dense(w) => (w, None),
                StepWeight::Q4 {
                    codes,
                    scales,
                    group,
                } => (codes, Some((scales, *group))),
            };
            let gx = x.storage_and_layout();
            let gw = wt.storage_and_layout();
            let gsc = extra.map(|(s, _)| s.storage_and_layout());
            let weight = match (&gsc, extra) {
                (Some(gs), Some((_, group))) => GemvWeight::Q4 {
                    codes: arg(&gw)?,
                    scales: arg(gs)?,
                    group,
                },
                _ => GemvWeight::Dense(arg(&gw)?),
            };
            let gn = nw.as_ref().map(|g| g.storage_and_layout());
            let gr = self.residual.map(|r| r.storage_and_layout());
            let opts = GemvOptions {
                norm: match (&gn, self.norm) {
                    (Some(g), Some((_, eps))) => Some((arg(g)?, eps as f32)),
                    _ => None,
                },
                swiglu: self.swiglu,
                residual: gr.as_ref().map(arg).transpose()?,
                out_f32: self.out_f32,
            };
            match into {
                Some(out) => {
                    let go = out.storage_and_layout();
                    k::gemv_weight(arg(&gx)?, weight, opts, Some(arg(&go)?))?;
                    Ok(out.clone())
                }
                None => {
                    let y = k::gemv_weight(arg(&gx)?, weight, opts, None)?
                        .expect("gemv allocates its output");
                    let n = if self.swiglu {
                        w.rows()? / 2
                    } else {
                        w.rows()?
                    };
                    Ok(tensor(y, (x.dim(0)?, n)))
                }
            }
        }
    }

    /// See `gpu_kernels::decode::attention`: [slots, nh · hd], into the workspace's output
    /// (with its scratch) or a new tensor.
    pub fn attention(
        qkv: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        pos: &Tensor,
        (kc, vc, scales, bits): CacheTensors,
        h: Heads,
        into: Option<(&Tensor, Option<&Tensor>)>,
    ) -> Result<Tensor> {
        let qkv = qkv.contiguous()?;
        let g = [&qkv, cos, sin, pos, kc, vc].map(|t| t.storage_and_layout());
        let gsc = scales.map(|(ks, vs)| (ks.storage_and_layout(), vs.storage_and_layout()));
        let [a, b, c, d, e, f] = &g;
        let (a, b, c, d, e, f) = (arg(a)?, arg(b)?, arg(c)?, arg(d)?, arg(e)?, arg(f)?);
        let caches = match (&gsc, bits) {
            (Some((ks, vs)), Some(bits)) => Caches::Codes {
                bits,
                k: e,
                v: f,
                k_scale: arg(ks)?,
                v_scale: arg(vs)?,
            },
            _ => Caches::Float { k: e, v: f },
        };
        match into {
            Some((out, scratch)) => {
                let go = out.storage_and_layout();
                let gs = scratch.map(|t| t.storage_and_layout());
                let sc = gs.as_ref().map(arg).transpose()?;
                k::attention_into(a, b, c, d, caches, h, arg(&go)?, sc)?;
                Ok(out.clone())
            }
            None => {
                let y = k::attention(a, b, c, d, caches, h)?;
                Ok(tensor(y, (h.slots, h.nh * h.hd)))
            }
        }
    }

    /// A layer's caches: K, V, a low-bit cache's (K, V) scales, and its bits.
    pub type CacheTensors<'a> = (
        &'a Tensor,
        &'a Tensor,
        Option<(&'a Tensor, &'a Tensor)>,
        Option<u32>,
    );
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
        random_model(&v, quant, 0.3)
    }

    /// A model of config `v` with random weights (normal with deviation `std`, unit norms), on
    /// the CPU.
    fn random_model(v: &serde_json::Value, quant: QuantConfig, std: f32) -> Llama {
        let cfg = LlamaConfig::from_json(v, std::path::Path::new("test")).unwrap();
        let dev = Device::Cpu;
        let t: HashMap<String, Tensor> = crate::llama::expected_tensors(&cfg)
            .into_iter()
            .map(|(n, s)| {
                let x = if n.ends_with("norm.weight") {
                    Tensor::ones(s, DType::F32, &dev)
                } else {
                    Tensor::randn(0f32, std, s, &dev)
                };
                (n, x.unwrap())
            })
            .collect();
        Llama::from_tensors(cfg, quant, t, "test", &dev).unwrap()
    }

    /// gpu-kernels' batched path in bf16 is as close to the f32 per-sequence path on the CPU as
    /// candle's bf16 per-sequence path on the GPU is: with few slots (every piece a kernel,
    /// replayed as a CUDA graph) and many (cuBLAS products, the attention kernel), over a cache
    /// long enough for the attention to split. Needs a CUDA device (it passes without one).
    #[cfg(feature = "cuda")]
    #[test]
    fn kernel_path_matches_cpu() {
        let Ok(dev) = Device::new_cuda(0) else {
            return;
        };
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 50, "max_position_embeddings": 320, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2
        });
        let cpu = random_model(&v, QuantConfig::none(), 0.1);
        let t: HashMap<String, Tensor> = cpu
            .named_tensors()
            .into_iter()
            .map(|(n, w)| (n, w.to_device(&dev).unwrap()))
            .collect();
        let gpu = Llama::from_tensors(cpu.cfg.clone(), QuantConfig::none(), t, "test", &dev)
            .unwrap()
            .cast(DType::BF16)
            .unwrap();
        let steps = 300;
        for (slots, graph) in [(2, true), (12, false)] {
            let mut batch = BatchCache::new(&gpu, slots, steps).unwrap();
            assert_eq!(batch.workspace.is_some(), slots <= GEMV_MAX_SLOTS);
            if graph {
                batch.enable_cuda_graph().unwrap();
            }
            let caches = |m: &Llama| -> Vec<SeqCache> {
                (0..slots)
                    .map(|_| SeqCache::new(m, steps).unwrap())
                    .collect()
            };
            let (mut want_seqs, mut ops_seqs) = (caches(&cpu), caches(&gpu));
            // Worst difference from the CPU relative to the row's largest logit, of candle's
            // ops and of the kernels, while each cache fits one attention block and after.
            let mut worst = [[0f32; 2]; 2];
            for step in 0..steps {
                // Slot 1 starts 20 steps late: slots sit at different positions.
                let toks: Vec<Option<u32>> = (0..slots)
                    .map(|i| (i != 1 || step >= 20).then_some(((step * 7 + i * 3) % 50) as u32))
                    .collect();
                let live: Vec<usize> = (0..slots).filter(|&i| toks[i].is_some()).collect();
                let ids: Vec<u32> = live.iter().map(|&i| toks[i].unwrap()).collect();
                let per_seq = |m: &Llama, seqs: &mut [SeqCache]| -> Vec<Vec<f32>> {
                    let mut refs: Vec<&mut SeqCache> = seqs
                        .iter_mut()
                        .enumerate()
                        .filter(|(i, _)| toks[*i].is_some())
                        .map(|(_, c)| c)
                        .collect();
                    let y = m.decode_step(&ids, &mut refs).unwrap();
                    y.to_vec2::<f32>().unwrap()
                };
                let want = per_seq(&cpu, &mut want_seqs);
                let ops = per_seq(&gpu, &mut ops_seqs);
                let got = gpu.decode_slots(&toks, &mut batch).unwrap();
                let got = got.to_vec2::<f32>().unwrap();
                for (r, &i) in live.iter().enumerate() {
                    let scale = want[r].iter().fold(1f32, |m, a| m.max(a.abs()));
                    for (path, row) in [&ops[r], &got[i]].into_iter().enumerate() {
                        let w = &mut worst[path][usize::from(step >= 256)];
                        for (a, b) in want[r].iter().zip(row) {
                            *w = w.max((a - b).abs() / scale);
                        }
                    }
                }
            }
            eprintln!(
                "{slots} slots: relative differences, ops {:?}, kernels {:?}",
                worst[0], worst[1]
            );
            for phase in 0..2 {
                assert!(
                    worst[1][phase] <= 1.5 * worst[0][phase] + 0.01,
                    "{slots} slots: kernels {:?} against ops {:?}",
                    worst[1],
                    worst[0]
                );
            }
        }
    }

    /// A low-bit batch cache needs gpu-kernels' attention; elsewhere it is refused with what
    /// it needs, and a float batch cache counts its bytes per token.
    #[test]
    fn low_bit_batch_caches_are_refused_without_the_gpu_kernels() {
        let m = tiny_model(QuantConfig::none());
        for f in [
            KvCacheFormat::Int8,
            KvCacheFormat::Int4,
            KvCacheFormat::Q4_0,
        ] {
            let Err(e) = BatchCache::with_format(&m, 2, 8, f) else {
                panic!("{f:?} batch cache on the CPU")
            };
            let e = e.to_string();
            assert!(e.contains(&format!("a {} K/V cache", f.name())), "{e}");
            assert!(e.contains("per-sequence CPU decoder"), "{e}");
        }
        let c = BatchCache::with_format(&m, 2, 8, KvCacheFormat::Float).unwrap();
        // 2 layers x (K and V) x 2 KV heads x head size 4 x 4 bytes.
        assert_eq!(c.bytes_per_token(), 2 * 2 * 2 * 4 * 4);
        assert_eq!(c.format(), KvCacheFormat::Float);
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
