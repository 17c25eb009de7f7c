//! Quantizer math for the distillation pipeline, with no model code:
//!
//! - [`fake`]: symmetric MinMax fake quantization (QAT weights per channel or per group,
//!   activations and KV per token) with a straight-through gradient;
//! - [`codebook`]: NF4 / NF3 / NF2, int-k and bitsandbytes' dynamic 8-bit code books;
//! - [`blockwise`]: QLoRA block-wise k-bit quantization with double quantization;
//! - [`grid`]: a weight as the integer codes and scales of the MinMax quantizer, for export;
//! - [`ggml`]: llama.cpp's Q4_0 / Q8_0 / Q3_K / Q2_K blocks written from such a grid;
//! - [`packed`]: our own packed layout of such grids, written and read back;
//! - [`block_folder`]: a folder of block-wise quantized weights (the quantize stage's
//!   output, ours or bitsandbytes' layout) and reading it back;
//! - [`safetensors_file`]: a safetensors file read by memory map, tensor by tensor.
//!
//! The numbers are bit-identical to the PyTorch / bitsandbytes 0.50.2 (CPU) references in
//! `shared/fixtures/quant.safetensors` (see DESIGN.md, "Quantizers" and "Block-wise k-bit
//! quantization").

pub mod block_folder;
pub mod blockwise;
pub mod codebook;
pub mod compressed;
pub mod fake;
pub mod ggml;
pub mod grid;
pub mod packed;
pub mod safetensors_file;
mod tables;

pub use blockwise::{
    dequantize_packed, double_quantize, pack_bits, quantize_blockwise, unpack_bits, BlockQuantized,
    BlockScales,
};
pub use codebook::{dynamic8, normal_map, CodeBook, DYNAMIC8_CODE, NF2_CODE, NF3_CODE, NF4_CODE};
pub use fake::{
    fake_quant, fake_quant_scaled, fake_quant_scaled_ste, fake_quant_ste, parse_bits,
    round_half_even, FakeQuant, Granularity,
};
pub use grid::{GridWeight, ScaleDtype};

/// Errors from invalid quantizer settings or inputs; each names the field and what is allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("{field} = {value} is not allowed; allowed: {allowed}")]
    InvalidValue {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("data has {len} values but shape {shape:?} holds {expected}")]
    ShapeMismatch {
        len: usize,
        shape: Vec<usize>,
        expected: usize,
    },
}

impl QuantError {
    pub(crate) fn invalid(
        field: &'static str,
        value: impl ToString,
        allowed: &'static str,
    ) -> QuantError {
        QuantError::InvalidValue {
            field,
            value: value.to_string(),
            allowed,
        }
    }
}
