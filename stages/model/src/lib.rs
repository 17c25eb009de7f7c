//! The model library: a Llama-family decoder (Llama, Mistral, Qwen2-style bias) loaded from a
//! Hugging Face folder (or a llama.cpp GGUF file), with one quantization seam (`QuantConfig`)
//! handed to the seven linear projections and to the K/V cache. It has two forward paths: a
//! full-sequence pass that is differentiable (training, evaluation) and an incremental pass with
//! a per-sequence KV cache (generation). No training code lives here.

pub mod attention_softmax;
mod block;
pub mod causal_attention;
pub mod compressed;
pub mod compute;
pub mod config;
pub mod cpu_nodes;
pub mod decode;
pub mod folder;
pub mod fused_block;
pub mod fused_ops;
pub mod gguf;
pub mod grad_sink;
mod graph_node;
pub mod hub;
pub mod kv_rotation;
pub mod llama;
pub mod lora;
pub mod lowbit;
pub mod lowrank_q;
pub mod qconfig;
pub mod rowmatmul;
pub mod synth;

pub use compute::{Compute, ComputeDtype, DeviceSpec};
pub use config::LlamaConfig;
pub use decode::{BatchCache, SeqCache};
pub use folder::{check_finite, ModelFolder, TeacherFingerprint};
pub use grad_sink::{GradSink, GradSinks};
pub use hub::HubSource;
pub use llama::{Linear, Llama, Weight};
pub use lora::{BlockwiseWeight, LoraDropout, LoraWeight};
pub use lowrank_q::{LowRankQWeight, PhiDtype, ScaleInit};
pub use qconfig::{parse_bits, KvPoint, KvRotation, QuantConfig};

/// The largest |a - b| over all elements, in f64 whatever the dtypes (for tests and checks).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> candle_core::Result<f64> {
    let f = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F64);
    (f(a)? - f(b)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}
