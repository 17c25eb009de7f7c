//! The Llama-family decoder: embeddings, `num_hidden_layers` blocks of (RMSNorm, GQA attention
//! with RoPE, RMSNorm, SwiGLU MLP), final norm and LM head. `forward` is the full-sequence,
//! differentiable pass; `decode.rs` adds the incremental pass over a KV cache. Both run the one
//! decoder block of `block.rs` (the fused GPU paths aside), where the quantization points are.
//! Quantization enters only through `QuantConfig`, applied in `Linear::forward` and `quant_kv`.

use crate::attention_softmax::causal_softmax;
use crate::config::LlamaConfig;
use crate::qconfig::{KvRotation, QuantConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;

/// How a projection's weight [out, in] is held: the student's parameterisation lives here,
/// and everything else (activation and K/V quantizers, the blocks) is the same for all.
#[derive(Clone)]
pub enum Weight {
    /// A dense weight as stored by Hugging Face: the teacher's, or the `qat` student's f32
    /// master, fake-quantized per `QuantConfig::w_bits` in the forward pass.
    Dense(Tensor),
    /// A frozen block-quantized base with a low-rank adapter (`qlora`, `loftq`).
    Lora(crate::lora::LoraWeight),
    /// Low-rank weights inside the quantizer (`lrqat`): quantizes itself, whatever
    /// `QuantConfig::w_bits` says.
    LowRankQ(crate::lowrank_q::LowRankQWeight),
    /// Frozen low-bit codes and scales, multiplied from the codes (a packed export,
    /// or a student's grid made on load): the student as it runs after training.
    Packed(std::sync::Arc<crate::lowbit::PackedLinear>),
}

/// A projection `y = x Wᵀ (+ b)`.
#[derive(Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    /// The dense weight, if the projection has one (the fused GPU paths take only those).
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Lora(_) | Weight::LowRankQ(_) | Weight::Packed(_) => None,
        }
    }

    /// The weight as the forward pass sees it: a dense weight fake-quantized per channel or
    /// per group; a LoRA weight as dequant(base) + scale B A (its base is the quantization).
    pub fn effective_weight(&self, q: &QuantConfig) -> candle_core::Result<Tensor> {
        match (&self.weight, q.w_bits) {
            (Weight::Dense(w), Some(b)) => quant::fake_quant_scaled_ste(w, b, q.w_group, q.w_scale),
            (Weight::Dense(w), None) => Ok(w.clone()),
            (Weight::Lora(l), _) => l.effective(),
            (Weight::LowRankQ(l), _) => l.effective(),
            (Weight::Packed(p), _) => p.dense_tensor(),
        }
    }

    /// The weight a plain checkpoint stores: dense as is, a LoRA weight merged into its base,
    /// an LR-QAT weight as its integers times its scales (exactly the forward's values).
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Lora(l) => Ok(l.effective()?.detach()),
            Weight::LowRankQ(l) => l.merged(),
            Weight::Packed(p) => p.dense_tensor(),
        }
    }

    /// Activations are quantized per token (over the last dim) before the product.
    pub fn forward(&self, x: &Tensor, q: &QuantConfig) -> candle_core::Result<Tensor> {
        if let Weight::Packed(p) = &self.weight {
            return p.forward_tensor(x, q.a_bits, self.bias.as_ref());
        }
        let fused_dense = self
            .dense_weight()
            .filter(|w| crate::fused_ops::available(x) && (x.track_op() || w.track_op()))
            // The fused kernels keep f32 scales.
            .filter(|_| q.w_scale.is_f32());
        if let Some(w) = fused_dense {
            // Training on a GPU: quantizers, cast and product as one graph node.
            let y = crate::fused_ops::quant_linear(x, w, q.a_bits, q.w_bits, q.w_group)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                None => Ok(y),
            };
        }
        let cpu_node = self.dense_weight().filter(|w| {
            (x.track_op() || w.track_op())
                && (q.a_bits.is_some() || q.w_bits.is_some())
                && crate::cpu_nodes::quant_linear_supported(x, w, q.a_bits)
        });
        if let Some(w) = cpu_node {
            // Training on the CPU: one node that keeps no quantized copies, the same bits.
            let y = crate::cpu_nodes::quant_linear(x, w, q.a_bits, q.w_bits, q.w_group, q.w_scale)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                None => Ok(y),
            };
        }
        if let (Weight::LowRankQ(l), Some(_)) = (&self.weight, q.a_bits) {
            let w = l.effective()?;
            if x.track_op() && crate::cpu_nodes::quant_linear_supported(x, &w, q.a_bits) {
                // LR-QAT training on the CPU: the input's quantized copy is made again in the
                // backward pass; the weight's gradient flows on into its quantizer node.
                let y = crate::cpu_nodes::quant_linear(x, &w, q.a_bits, None, None, q.w_scale)?;
                return match &self.bias {
                    Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                    None => Ok(y),
                };
            }
        }
        let x = match q.a_bits {
            Some(b) => quant::fake_quant_ste(x, b, None)?,
            None => x.clone(),
        };
        if let Weight::Lora(l) = &self.weight {
            let y = l.forward(&x)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                None => Ok(y),
            };
        }
        // Quantized in f32 on the master weight, then cast to the compute dtype (a no-op in f32).
        let w = self.effective_weight(q)?.to_dtype(x.dtype())?;
        let y = matmul_t(&x, &w)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

#[derive(Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Qwen3's RMSNorm weights [head_dim], applied to each head of q and k before RoPE.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

impl Attention {
    /// Qwen3's per-head RMSNorm of a projection's output [.., heads * head_dim] (identity for
    /// other architectures).
    pub fn norm_heads(
        x: &Tensor,
        w: Option<&Tensor>,
        head_dim: usize,
        eps: f64,
    ) -> candle_core::Result<Tensor> {
        let Some(w) = w else {
            return Ok(x.clone());
        };
        let dims = x.dims().to_vec();
        let last = dims[dims.len() - 1];
        let mut split = dims[..dims.len() - 1].to_vec();
        split.extend([last / head_dim, head_dim]);
        rms_norm(&x.reshape(split)?, w, eps)?.reshape(dims)
    }
}

#[derive(Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Clone)]
pub struct Block {
    pub input_layernorm: Tensor,
    pub attn: Attention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

impl Block {
    pub fn projections(&self) -> [(&'static str, &Linear); 7] {
        [
            ("self_attn.q_proj", &self.attn.q_proj),
            ("self_attn.k_proj", &self.attn.k_proj),
            ("self_attn.v_proj", &self.attn.v_proj),
            ("self_attn.o_proj", &self.attn.o_proj),
            ("mlp.gate_proj", &self.mlp.gate_proj),
            ("mlp.up_proj", &self.mlp.up_proj),
            ("mlp.down_proj", &self.mlp.down_proj),
        ]
    }

    /// Whether every projection has a dense weight (the fused GPU block takes only those).
    pub fn is_dense(&self) -> bool {
        self.projections()
            .iter()
            .all(|(_, l)| l.dense_weight().is_some())
    }
}

/// Precomputed RoPE tables (Hugging Face "rotate half" layout), [max_pos, head_dim / 2].
#[derive(Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    fn new(cfg: &LlamaConfig, device: &Device) -> candle_core::Result<Self> {
        let half = cfg.head_dim / 2;
        // Inverse frequencies (with the config's RoPE scaling), angles and cos/sin in f64,
        // rounded once to f32: the most accurate table. (transformers rounds inv_freq and the
        // angles to f32 first; either order is within the float noise of the 4-bit KV
        // references, see scripts/torch_ppl_reference.py.) YaRN scales cos and sin.
        let n = cfg.max_position_embeddings;
        let (inv, attention_factor) = cfg.rope_frequencies();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv {
                let a = p as f64 * f;
                cos.push((a.cos() * attention_factor) as f32);
                sin.push((a.sin() * attention_factor) as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, half), device)?,
            sin: Tensor::from_vec(sin, (n, half), device)?,
        })
    }

    /// x: [.., t, head_dim] with cos/sin broadcastable to [.., t, head_dim / 2].
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        if fused_gpu_path(x) && x.rank() == 4 && cos.rank() == 2 {
            // candle's kernel: one launch instead of eight ([b, h, t, d] with cos [t, d / 2]).
            return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
        }
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
        let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
        Tensor::cat(&[a, b], D::Minus1)
    }
}

/// `x [.., in] · w [out, in]ᵀ`. On a GPU as one 2-D product with the transposed weight read in
/// place: `broadcast_matmul` would first copy the weight once per batch row (for a 1B model,
/// gigabytes per forward pass). The CPU keeps the batched product, whose summation order the
/// evaluation references were checked against.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() || x.rank() <= 2 {
        return x.broadcast_matmul(&w.t()?);
    }
    let dims = x.dims();
    let (inner, rows) = (dims[dims.len() - 1], x.elem_count() / dims[dims.len() - 1]);
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(w.dim(0)?);
    x.reshape((rows, inner))?.matmul(&w.t()?)?.reshape(out)
}

/// RMSNorm, computed in f32 whatever the activations' dtype (a bf16 mean of squares is too coarse).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if crate::fused_ops::available(x) && (x.track_op() || w.track_op()) {
        // Training on a GPU: one differentiable kernel instead of a dozen graph nodes.
        return crate::fused_ops::rms_norm(x, w, eps);
    }
    if (x.track_op() || w.track_op()) && crate::cpu_nodes::rms_norm_supported(x, w) {
        // Training on the CPU: one node, each value the tensor ops' below.
        return crate::cpu_nodes::rms_norm(x, w, eps);
    }
    if fused_gpu_path(x) && !w.track_op() {
        // candle's kernel (one launch instead of nine; it accumulates in f32 too).
        return candle_nn::ops::rms_norm(&x.contiguous()?, &w.to_dtype(x.dtype())?, eps as f32);
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

/// Whether to use candle's fused GPU kernels for RMSNorm and RoPE: on a GPU, in bf16/f16,
/// without gradients (they have no backward pass). f32 keeps our ops, whose order the
/// evaluation references were checked against.
fn fused_gpu_path(x: &Tensor) -> bool {
    !x.device().is_cpu() && x.dtype() != DType::F32 && !x.track_op()
}

/// Softmax over the last dim; the max shift is a constant for autograd.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

pub fn log_softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&m)?;
    s.broadcast_sub(&s.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Fake-quantizes K or V per token across all KV heads: x is [..., n_kv * head_dim]. With
/// `kv_rotation = hadamard` the rounding happens in each head's Hadamard basis.
pub fn quant_kv(x: &Tensor, q: &QuantConfig, head_dim: usize) -> candle_core::Result<Tensor> {
    let Some(b) = q.kv_bits else {
        return Ok(x.clone());
    };
    match q.kv_rotation {
        KvRotation::None => quant::fake_quant_ste(x, b, None),
        KvRotation::Hadamard => {
            crate::kv_rotation::rotated(x, head_dim, |r| quant::fake_quant_ste(r, b, None))
        }
    }
}

#[derive(Clone)]
pub struct Llama {
    pub cfg: LlamaConfig,
    pub quant: QuantConfig,
    pub embed_tokens: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    pub lm_head: Tensor,
    pub rope: Rope,
    pub device: Device,
    /// Dtype of activations and matrix products; weights are cast to it where used.
    pub compute: DType,
    /// Use the fused CPU attention kernel (training: about 2x faster at 512 tokens). Off for
    /// evaluation, whose numbers are pinned to the PyTorch references: its different summation
    /// order moves 4-bit-KV perplexities by about 0.1%, the size of the reference tolerance.
    pub fused_attention: bool,
    /// Where GPU training writes weight gradients (`attach_grad_sinks`); with them each block
    /// runs as one fused op (`fused_block`).
    pub grad_sinks: Option<std::sync::Arc<crate::grad_sink::GradSinks>>,
}

/// The Hugging Face names of every tensor the model uses, with their shapes.
pub fn expected_tensors(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, q, kv) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.q_dim(),
        cfg.kv_dim(),
    );
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if cfg.attention_bias {
            v.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            v.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            v.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        if cfg.o_proj_bias {
            v.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        if cfg.qk_norm {
            v.push((format!("{p}.self_attn.q_norm.weight"), vec![cfg.head_dim]));
            v.push((format!("{p}.self_attn.k_norm.weight"), vec![cfg.head_dim]));
        }
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    v.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    v
}

/// What every block of one forward pass shares.
struct Sequence {
    b: usize,
    t: usize,
    /// RoPE tables in the compute dtype, and in f32 for the fused GPU kernels.
    cos: Tensor,
    sin: Tensor,
    cos32: Tensor,
    sin32: Tensor,
}

/// The 7 projections of a decoder block, by their path inside `model.layers.N`.
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Is `name` the weight of one of a decoder block's 7 projections?
pub fn is_projection_weight(name: &str) -> bool {
    name.strip_prefix("model.layers.")
        .and_then(|r| r.strip_suffix(".weight"))
        .and_then(|r| r.split_once('.'))
        .is_some_and(|(l, p)| l.parse::<usize>().is_ok() && PROJECTIONS.contains(&p))
}

impl Llama {
    /// Loads `folder` with the 7 projections of every layer kept as low-bit codes and scales
    /// (`Weight::Packed`), multiplied from the codes (on a GPU, the decoding step's GEMV reads
    /// them; other products dequantize one weight at a time): a packed export's grids as
    /// stored, or else each weight's MinMax grid of `quant.w_bits` (per `w_group`, scales in
    /// `w_scale`: the weight fake quantizer's codes), made on load and the f32 weight dropped.
    /// Activations and K/V are quantized as `quant` says.
    pub fn load_packed(
        folder: &crate::folder::ModelFolder,
        quant: QuantConfig,
        device: &Device,
    ) -> Result<Self> {
        let (mut dense, mut grids) = folder.load_packed(device)?;
        let dir = folder.dir.display();
        let mut projections = HashMap::new();
        for l in 0..folder.config.num_hidden_layers {
            for p in PROJECTIONS {
                let prefix = format!("model.layers.{l}.{p}");
                let name = format!("{prefix}.weight");
                let grid = match (grids.remove(&name), dense.remove(&name), quant.w_bits) {
                    (Some(g), _, _) => g,
                    (None, Some(w), Some(bits)) => {
                        let (rows, cols) = w.dims2()?;
                        let v = w.flatten_all()?.to_vec1::<f32>()?;
                        quant::GridWeight::minmax(&v, rows, cols, bits, quant.w_group, quant.w_scale)
                    }
                    (None, Some(_), None) => bail!(
                        "{dir}: packed weights need an integer grid: a packed export, or --w-bits for the student's"
                    ),
                    (None, None, _) => bail!("{dir}: missing tensor `{name}`"),
                };
                let packed = crate::lowbit::PackedLinear::from_grid(&grid)
                    .with_context(|| format!("{dir}: `{name}`"))?;
                projections.insert(prefix, Weight::Packed(std::sync::Arc::new(packed)));
            }
        }
        let source = folder.weight_source();
        Self::with_projections(
            folder.config.clone(),
            quant,
            dense,
            projections,
            &source,
            device,
        )
    }

    /// Bytes of the 7 projections as held: codes and scales for packed ones, the tensor's for
    /// dense ones.
    pub fn projection_bytes(&self) -> usize {
        let mut n = 0;
        for b in &self.blocks {
            for lin in [
                &b.attn.q_proj,
                &b.attn.k_proj,
                &b.attn.v_proj,
                &b.attn.o_proj,
                &b.mlp.gate_proj,
                &b.mlp.up_proj,
                &b.mlp.down_proj,
            ] {
                n += match &lin.weight {
                    Weight::Packed(p) => p.bytes(),
                    Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
                    Weight::Lora(_) | Weight::LowRankQ(_) => 0,
                };
            }
        }
        n
    }

    /// Loads a Hugging Face folder (weights converted to f32).
    pub fn load(
        folder: &crate::folder::ModelFolder,
        quant: QuantConfig,
        device: &Device,
    ) -> Result<Self> {
        let tensors = folder.load_tensors(device)?;
        let source = folder.weight_source();
        Self::from_tensors(folder.config.clone(), quant, tensors, &source, device)
    }

    /// Builds the model from named tensors (e.g. trainable `Var`s), checking names and shapes.
    pub fn from_tensors(
        cfg: LlamaConfig,
        quant: QuantConfig,
        t: HashMap<String, Tensor>,
        source: &str,
        device: &Device,
    ) -> Result<Self> {
        Self::with_projections(cfg, quant, t, HashMap::new(), source, device)
    }

    /// `from_tensors` where some projections come already built (a student's parameterisation),
    /// keyed by their Hugging Face prefix (`model.layers.0.self_attn.q_proj`); the others are
    /// dense weights from `t`.
    pub fn with_projections(
        cfg: LlamaConfig,
        quant: QuantConfig,
        mut t: HashMap<String, Tensor>,
        mut projections: HashMap<String, Weight>,
        source: &str,
        device: &Device,
    ) -> Result<Self> {
        quant.validate()?;
        quant
            .check_model(cfg.head_dim)
            .with_context(|| source.to_string())?;
        let expected = expected_tensors(&cfg);
        for (prefix, w) in &projections {
            let name = format!("{prefix}.weight");
            let Some((_, shape)) = expected.iter().find(|(n, _)| *n == name) else {
                bail!("{source}: `{prefix}` is not a projection of this model");
            };
            if let Weight::Lora(l) = w {
                let (o, i) = l.base.shape;
                if [o, i] != shape[..]
                    || l.a.dims() != [l.a.dim(0)?, i]
                    || l.b.dims() != [o, l.a.dim(0)?]
                {
                    bail!(
                        "{source}: `{prefix}`: base {:?}, A {:?}, B {:?} do not fit {shape:?}",
                        l.base.shape,
                        l.a.dims(),
                        l.b.dims()
                    );
                }
            }
            if let Weight::Packed(p) = w {
                if [p.rows, p.cols] != shape[..] {
                    bail!(
                        "{source}: `{prefix}`: packed [{}, {}] does not fit {shape:?}",
                        p.rows,
                        p.cols
                    );
                }
            }
            if let Weight::LowRankQ(l) = w {
                let (o, i) = l.shape()?;
                let r = l.rank()?;
                if [o, i] != shape[..] || l.b.dims() != [r, i] || l.s0.dims() != l.m.dims() {
                    bail!(
                        "{source}: `{prefix}`: A {:?}, B {:?}, scales {:?} do not fit {shape:?}",
                        l.a.dims(),
                        l.b.dims(),
                        l.m.dims()
                    );
                }
            }
        }
        for (name, shape) in expected {
            if name
                .strip_suffix(".weight")
                .is_some_and(|p| projections.contains_key(p))
            {
                continue;
            }
            match t.get(&name) {
                None => {
                    bail!("{source}: missing tensor `{name}` (config.json implies shape {shape:?})")
                }
                Some(x) if x.dims() != shape.as_slice() => bail!(
                    "{source}: tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                    x.dims()
                ),
                _ => {}
            }
        }
        let mut take = |n: &str| -> Result<Tensor> {
            t.remove(n)
                .with_context(|| format!("{source}: missing tensor `{n}`"))
        };
        let embed_tokens = take("model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |n: &str, bias: bool| -> Result<Linear> {
                let weight = match projections.remove(&format!("{p}.{n}")) {
                    Some(w) => w,
                    None => Weight::Dense(take(&format!("{p}.{n}.weight"))?),
                };
                Ok(Linear {
                    weight,
                    bias: if bias {
                        Some(take(&format!("{p}.{n}.bias"))?)
                    } else {
                        None
                    },
                })
            };
            let ab = cfg.attention_bias;
            let attn = Attention {
                q_proj: lin("self_attn.q_proj", ab)?,
                k_proj: lin("self_attn.k_proj", ab)?,
                v_proj: lin("self_attn.v_proj", ab)?,
                o_proj: lin("self_attn.o_proj", cfg.o_proj_bias)?,
                q_norm: None,
                k_norm: None,
            };
            let mlp = Mlp {
                gate_proj: lin("mlp.gate_proj", false)?,
                up_proj: lin("mlp.up_proj", false)?,
                down_proj: lin("mlp.down_proj", false)?,
            };
            let mut attn = attn;
            if cfg.qk_norm {
                attn.q_norm = Some(take(&format!("{p}.self_attn.q_norm.weight"))?);
                attn.k_norm = Some(take(&format!("{p}.self_attn.k_norm.weight"))?);
            }
            blocks.push(Block {
                input_layernorm: take(&format!("{p}.input_layernorm.weight"))?,
                attn,
                post_attention_layernorm: take(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp,
            });
        }
        let norm = take("model.norm.weight")?;
        // Tied models use the embedding as LM head even when a copy of it is stored.
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            take("lm_head.weight")?
        };
        let rope = Rope::new(&cfg, device)?;
        let compute = embed_tokens.dtype();
        Ok(Self {
            cfg,
            quant,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            rope,
            device: device.clone(),
            compute,
            fused_attention: false,
            grad_sinks: None,
        })
    }

    /// Converts every weight to `dtype` and computes in it: for frozen models (teacher, eval).
    pub fn cast(mut self, dtype: DType) -> candle_core::Result<Self> {
        if dtype == self.dtype() {
            self.compute = dtype;
            return Ok(self);
        }
        let c = |t: &Tensor| t.to_dtype(dtype);
        let cl = |l: &Linear| -> candle_core::Result<Linear> {
            Ok(Linear {
                weight: match &l.weight {
                    Weight::Dense(w) => Weight::Dense(c(w)?),
                    // The base is dequantized to f32 where used; the adapter stays f32.
                    Weight::Lora(lw) => Weight::Lora(lw.clone()),
                    Weight::LowRankQ(lw) => Weight::LowRankQ(lw.clone()),
                    Weight::Packed(p) => Weight::Packed(p.clone()),
                },
                bias: l.bias.as_ref().map(c).transpose()?,
            })
        };
        let tied = self.cfg.tie_word_embeddings;
        self.embed_tokens = c(&self.embed_tokens)?;
        self.lm_head = if tied {
            self.embed_tokens.clone()
        } else {
            c(&self.lm_head)?
        };
        self.norm = c(&self.norm)?;
        for b in &mut self.blocks {
            b.input_layernorm = c(&b.input_layernorm)?;
            b.post_attention_layernorm = c(&b.post_attention_layernorm)?;
            b.attn.q_norm = b.attn.q_norm.as_ref().map(c).transpose()?;
            b.attn.k_norm = b.attn.k_norm.as_ref().map(c).transpose()?;
            for l in [
                &mut b.attn.q_proj,
                &mut b.attn.k_proj,
                &mut b.attn.v_proj,
                &mut b.attn.o_proj,
                &mut b.mlp.gate_proj,
                &mut b.mlp.up_proj,
                &mut b.mlp.down_proj,
            ] {
                *l = cl(l)?;
            }
        }
        self.compute = dtype;
        Ok(self)
    }

    /// Computes in `dtype` but keeps the weights as they are (the student's f32 `Var`s, a
    /// bf16 teacher computing in f32): each forward casts them where they are used, so
    /// gradients and optimizer updates stay in f32.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute = dtype;
    }

    /// Gives every trainable projection and norm weight of the blocks, and an untied trainable
    /// LM head, a gradient sink, on a CUDA device in a `cuda` build (elsewhere: none, and
    /// gradients come from candle's backward pass as before). Returns the sinks by name.
    pub fn attach_grad_sinks(
        &mut self,
    ) -> candle_core::Result<std::sync::Arc<crate::grad_sink::GradSinks>> {
        let mut sinks = crate::grad_sink::GradSinks::default();
        if cfg!(feature = "cuda") && self.device.is_cuda() {
            for (name, t) in self.named_tensors() {
                let wanted = name.starts_with("model.layers.") || name == "lm_head.weight";
                if wanted && t.track_op() {
                    sinks.by_name.insert(
                        name,
                        std::sync::Arc::new(crate::grad_sink::GradSink::new(&t)?),
                    );
                }
            }
        }
        let sinks = std::sync::Arc::new(sinks);
        self.grad_sinks = Some(sinks.clone());
        Ok(sinks)
    }

    /// Every parameter under its Hugging Face name (tied LM head listed once, as the embedding).
    /// The integer grids of the LR-QAT projections, under their weights' names.
    pub fn lowrank_grids(&self) -> candle_core::Result<Vec<(String, quant::GridWeight)>> {
        let mut v = Vec::new();
        for (l, b) in self.blocks.iter().enumerate() {
            for (n, lin) in [
                ("self_attn.q_proj", &b.attn.q_proj),
                ("self_attn.k_proj", &b.attn.k_proj),
                ("self_attn.v_proj", &b.attn.v_proj),
                ("self_attn.o_proj", &b.attn.o_proj),
                ("mlp.gate_proj", &b.mlp.gate_proj),
                ("mlp.up_proj", &b.mlp.up_proj),
                ("mlp.down_proj", &b.mlp.down_proj),
            ] {
                if let Weight::LowRankQ(w) = &lin.weight {
                    v.push((format!("model.layers.{l}.{n}.weight"), w.grid()?));
                }
            }
        }
        Ok(v)
    }

    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (l, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{l}");
            v.push((
                format!("{p}.input_layernorm.weight"),
                b.input_layernorm.clone(),
            ));
            for (n, lin) in [
                ("self_attn.q_proj", &b.attn.q_proj),
                ("self_attn.k_proj", &b.attn.k_proj),
                ("self_attn.v_proj", &b.attn.v_proj),
                ("self_attn.o_proj", &b.attn.o_proj),
                ("mlp.gate_proj", &b.mlp.gate_proj),
                ("mlp.up_proj", &b.mlp.up_proj),
                ("mlp.down_proj", &b.mlp.down_proj),
            ] {
                match &lin.weight {
                    Weight::Dense(w) => v.push((format!("{p}.{n}.weight"), w.clone())),
                    Weight::Lora(l) => {
                        v.push((format!("{p}.{n}.lora_A.weight"), l.a.clone()));
                        v.push((format!("{p}.{n}.lora_B.weight"), l.b.clone()));
                    }
                    Weight::LowRankQ(l) => {
                        v.push((format!("{p}.{n}.lrqat_A.weight"), l.a.clone()));
                        v.push((format!("{p}.{n}.lrqat_B.weight"), l.b.clone()));
                        v.push((format!("{p}.{n}.lrqat_s0"), l.s0.clone()));
                        v.push((format!("{p}.{n}.lrqat_m"), l.m.clone()));
                    }
                    Weight::Packed(w) => v.push((
                        format!("{p}.{n}.weight"),
                        w.dense_tensor()
                            .expect("a packed weight dequantizes on the CPU"),
                    )),
                }
                if let Some(bias) = &lin.bias {
                    v.push((format!("{p}.{n}.bias"), bias.clone()));
                }
            }
            for (n, w) in [("q_norm", &b.attn.q_norm), ("k_norm", &b.attn.k_norm)] {
                if let Some(w) = w {
                    v.push((format!("{p}.self_attn.{n}.weight"), w.clone()));
                }
            }
            v.push((
                format!("{p}.post_attention_layernorm.weight"),
                b.post_attention_layernorm.clone(),
            ));
        }
        v.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            v.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        v
    }

    /// `named_tensors` with every non-dense projection merged into a dense weight (LoRA:
    /// dequant(base) + scale B A; LR-QAT: integers times scales): a plain Hugging Face
    /// checkpoint of the same function.
    pub fn merged_named_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, t) in self.named_tensors() {
            // A non-dense projection appears under its parameter names; its first one stands
            // for the merged `<prefix>.weight`, the others are dropped.
            let Some((prefix, first)) = [
                (".lora_A.weight", true),
                (".lora_B.weight", false),
                (".lrqat_A.weight", true),
                (".lrqat_B.weight", false),
                (".lrqat_s0", false),
                (".lrqat_m", false),
            ]
            .iter()
            .find_map(|(suffix, first)| name.strip_suffix(suffix).map(|p| (p.to_string(), *first))) else {
                out.push((name, t));
                continue;
            };
            if !first {
                continue;
            }
            let (l, proj) = prefix
                .strip_prefix("model.layers.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(l, p)| Some((l.parse::<usize>().ok()?, p)))
                .ok_or_else(|| candle_core::Error::Msg(format!("bad projection name {name}")))?;
            let lin = self.blocks[l]
                .projections()
                .into_iter()
                .find(|(n, _)| *n == proj)
                .map(|(_, lin)| lin)
                .ok_or_else(|| candle_core::Error::Msg(format!("bad projection name {name}")))?;
            out.push((format!("{prefix}.weight"), lin.merged_weight()?));
        }
        Ok(out)
    }

    /// Full-sequence forward from position 0: ids [b, t] (u32) -> logits [b, t, vocab].
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_probed(ids, &mut |_, _, _| Ok(()))
    }

    /// `forward`, handing each layer's K (after RoPE) and V, as the cache stores them, both
    /// [b, n_kv, t, head_dim], to `probe(layer, k, v)` (calibration statistics).
    pub fn forward_probed(
        &self,
        ids: &Tensor,
        probe: &mut dyn FnMut(usize, &Tensor, &Tensor) -> candle_core::Result<()>,
    ) -> candle_core::Result<Tensor> {
        let ctx = self.sequence(ids)?;
        let mut x = self.embed(ids, &ctx)?;
        for layer in 0..self.blocks.len() {
            x = self.block_forward(layer, &x, &ctx, probe)?;
        }
        self.head(&x)
    }

    /// What every block of one forward pass shares: the shape and the RoPE tables.
    fn sequence(&self, ids: &Tensor) -> candle_core::Result<Sequence> {
        let (b, t) = ids.dims2()?;
        self.cfg.check_context(t).map_err(candle_core::Error::Msg)?;
        let (cos32, sin32) = (
            self.rope.cos.narrow(0, 0, t)?,
            self.rope.sin.narrow(0, 0, t)?,
        );
        Ok(Sequence {
            b,
            t,
            cos: cos32.to_dtype(self.compute)?,
            sin: sin32.to_dtype(self.compute)?,
            cos32,
            sin32,
        })
    }

    /// The token embeddings [b, t, hidden] in the compute dtype.
    fn embed(&self, ids: &Tensor, s: &Sequence) -> candle_core::Result<Tensor> {
        self.embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((s.b, s.t, self.cfg.hidden_size))?
            .to_dtype(self.compute)
    }

    /// Decoder block `layer` on the residual stream `x` [b, t, hidden].
    fn block_forward(
        &self,
        layer: usize,
        x: &Tensor,
        s: &Sequence,
        probe: &mut dyn FnMut(usize, &Tensor, &Tensor) -> candle_core::Result<()>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let q = &self.quant;
        let blk = &self.blocks[layer];
        let sinks = self.grad_sinks.as_deref().filter(|s| !s.by_name.is_empty());
        let fused_blocks = crate::fused_block::supported(x, cfg, q, sinks)
            && self.blocks.iter().all(Block::is_dense);
        if let (true, Some(sinks)) = (fused_blocks, sinks) {
            // Training on a GPU: the whole block is one node (no probe: calibration runs on
            // the teacher, which has no sinks).
            return crate::fused_block::block_forward(
                x,
                blk,
                layer,
                cfg,
                q,
                sinks,
                (&s.cos32, &s.sin32),
            );
        }
        let kv = crate::block::KvQuant {
            q,
            head_dim: cfg.head_dim,
            stored: false,
        };
        let mut path = FullSequence {
            model: self,
            s,
            probe,
        };
        crate::block::decoder_block(blk, layer, x, cfg.rms_norm_eps, &kv, &mut path)
    }

    /// Final norm and LM head: logits [b, t, vocab] in f32.
    fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let sinks = self.grad_sinks.as_deref().filter(|s| !s.by_name.is_empty());
        let x = rms_norm(x, &self.norm, cfg.rms_norm_eps)?;
        // Logits leave in f32 (the losses and the sampler read them in f32).
        if let Some(sink) = sinks.and_then(|s| s.get("lm_head.weight")) {
            if crate::fused_ops::available(&x) {
                // Training on a GPU: the LM head's gradient goes to its sink.
                return crate::fused_ops::quant_linear_into_sink(
                    &x,
                    &self.lm_head,
                    None,
                    None,
                    None,
                    sink,
                )?
                .to_dtype(DType::F32);
            }
        }
        matmul_t(&x, &self.lm_head.to_dtype(self.compute)?)?.to_dtype(DType::F32)
    }

    /// Training with gradient checkpointing: the forward keeps only each block's input (the
    /// residual stream, detached); the backward recomputes one block at a time and pulls the
    /// gradient through it, so the autograd graph (activations, and any weight a projection
    /// materialises, such as a QLoRA base dequantized) never holds more than one block.
    /// `loss_of(logits)` gives the scalar to differentiate and whatever else the caller reads
    /// from the logits. Returns that and the gradients of the trainable tensors, as
    /// `loss.backward()` would (summed in another order where a tensor is used twice, as tied
    /// embeddings are).
    ///
    /// Only the gradients of `keep` (the trainable tensors) are kept between blocks: candle's
    /// backward also stores a gradient for every frozen full-size operand it meets (a
    /// dequantized base, Phi0, a rounding), which would otherwise pile up block after block.
    pub fn backward_checkpointed<T>(
        &self,
        ids: &Tensor,
        keep: &[&Tensor],
        loss_of: impl FnOnce(&Tensor) -> candle_core::Result<(Tensor, T)>,
    ) -> candle_core::Result<(T, candle_core::backprop::GradStore)> {
        let ctx = self.sequence(ids)?;
        let x0 = self.embed(ids, &ctx)?;
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut x = x0.detach();
        let mut no_probe = |_: usize, _: &Tensor, _: &Tensor| Ok(());
        for layer in 0..self.blocks.len() {
            let next = self.block_forward(layer, &x, &ctx, &mut no_probe)?.detach();
            inputs.push(std::mem::replace(&mut x, next));
        }
        let top = candle_core::Var::from_tensor(&x)?;
        drop(x);
        let (loss, out) = loss_of(&self.head(top.as_tensor())?)?;
        let mut head = loss.backward()?;
        drop(loss);
        let mut g = head.remove(top.as_tensor()).ok_or_else(|| {
            candle_core::Error::Msg(
                "checkpointed backward: no gradient reached the last block".into(),
            )
        })?;
        // An empty store to collect the kept gradients in (candle has no public constructor).
        let mut grads = candle_core::Var::new(0f32, &Device::Cpu)?
            .as_tensor()
            .backward()?;
        let mut collect = |from: &mut candle_core::backprop::GradStore| -> candle_core::Result<()> {
            for t in keep {
                // Detached: a gradient made from another trainable tensor (B of A's, say)
                // carries its last op, whose full-size operands would stay alive until the
                // step ends.
                if let Some(gt) = from.remove(t).map(|g| g.detach()) {
                    let sum = match grads.get(t) {
                        Some(prev) => (prev + gt)?,
                        None => gt,
                    };
                    grads.insert(t, sum);
                }
            }
            Ok(())
        };
        collect(&mut head)?;
        drop(head);
        for layer in (0..self.blocks.len()).rev() {
            let input = candle_core::Var::from_tensor(&inputs[layer])?;
            let y = self.block_forward(layer, input.as_tensor(), &ctx, &mut no_probe)?;
            // d(Σ y · g)/dθ is the vector-Jacobian product g · ∂y/∂θ.
            let mut gi = (y * &g)?.sum_all()?.backward()?;
            g = gi.remove(input.as_tensor()).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "checkpointed backward: no gradient reached block {layer}"
                ))
            })?;
            collect(&mut gi)?;
            drop(gi);
            inputs.truncate(layer);
        }
        let embed = &self.embed_tokens;
        if keep.iter().any(|t| t.id() == embed.id()) && x0.dtype() == embed.dtype() {
            // The lookup's rows added one by one onto what the head gave the (tied) embedding,
            // as the plain backward pass adds them: summed apart first, a row of a token seen
            // twice would round differently. `+ 0` as candle's gradient store adds.
            let (b, t) = ids.dims2()?;
            let rows = g.reshape((b * t, self.cfg.hidden_size))?.affine(1.0, 0.0)?;
            let ids = ids.flatten_all()?.contiguous()?;
            let sum = match grads.get(embed) {
                Some(head) => head.index_add(&ids, &rows, 0)?,
                None => embed.zeros_like()?.index_add(&ids, &rows, 0)?,
            };
            grads.insert(embed, sum.detach());
        } else if x0.track_op() {
            collect(&mut (x0 * &g)?.sum_all()?.backward()?)?;
        }
        Ok((out, grads))
    }

    /// The dtype the weights are stored in.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }
}

/// The full-sequence path of `block::decoder_block`: x [b, t, hidden], heads as [b, heads, t,
/// head_dim] after RoPE, causal attention over the sequence itself.
struct FullSequence<'a> {
    model: &'a Llama,
    s: &'a Sequence,
    probe: &'a mut dyn FnMut(usize, &Tensor, &Tensor) -> candle_core::Result<()>,
}

impl crate::block::BlockPath for FullSequence<'_> {
    fn project(&self, lin: &Linear, _: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        lin.forward(x, &self.model.quant)
    }

    fn rope(&self, x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        let (s, hd) = (self.s, self.model.cfg.head_dim);
        let x = x.reshape((s.b, s.t, heads, hd))?;
        // While training on a GPU one differentiable kernel does the transpose and rotation.
        if crate::fused_ops::available(&x) && x.track_op() {
            crate::fused_ops::rope_transposed(&x, &s.cos32, &s.sin32)
        } else if x.track_op() && crate::cpu_nodes::rope_supported(&x, &s.cos, &s.sin) {
            // Training on the CPU: one node, the same bits as `Rope::apply` below.
            crate::cpu_nodes::rope_transposed(&x, &s.cos, &s.sin)
        } else {
            Rope::apply(&x.transpose(1, 2)?, &s.cos, &s.sin)
        }
    }

    fn per_token(
        &self,
        k: &Tensor,
        f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = (self.s.b, self.s.t);
        let (nkv, hd) = (k.dim(1)?, k.dim(3)?);
        f(&k.transpose(1, 2)?.reshape((b, t, nkv * hd))?)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)
    }

    fn attend(
        &mut self,
        layer: usize,
        qs: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = (self.s.b, self.s.t);
        let (nh, nkv, hd) = (qs.dim(1)?, k.dim(1)?, k.dim(3)?);
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        (self.probe)(layer, k, &v)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // Group the query heads that share one KV head: [b, nkv, rep * t, hd].
        let qg = qs.reshape((b, nkv, nh / nkv * t, hd))?;
        let y = if self.model.fused_attention && crate::causal_attention::supported(&qg) {
            crate::causal_attention::causal_attention(&qg, k, &v, t, scale)?
        } else {
            causal_softmax(&qg.matmul(&k.contiguous()?.t()?)?, t, scale)?.matmul(&v)?
        };
        y.reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))
    }

    fn swiglu(&self, g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
        // The fused kernel also serves the frozen teacher in bf16/f16 (one launch instead of
        // two); f32 keeps the tensor ops the evaluation references were checked against.
        let fused = g.track_op() || u.track_op() || g.dtype() != DType::F32;
        if crate::fused_ops::available(g) && fused {
            crate::fused_ops::swiglu(g, u)
        } else if (g.track_op() || u.track_op()) && crate::cpu_nodes::supported(g, u) {
            // Training on the CPU: one node, the same bits as the tensor ops below.
            crate::cpu_nodes::swiglu(g, u)
        } else {
            g.silu()? * u
        }
    }
}
