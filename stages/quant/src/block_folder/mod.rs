//! A block-quantized folder: a model folder whose projection weights are stored block-wise
//! quantized (NF4 / NF3 / NF2 / int-k codes, one scale a block, optionally double-quantized),
//! in one of two layouts, and read back here as plain tensors. The quantize stage writes it;
//! model, eval, train and generate read it.
//!
//! `bnb` is what transformers saves for a `Linear4bit` (bitsandbytes `Params4bit` +
//! `QuantState.as_dict(packed=True)`): for weight `W`,
//!   `W` U8 [ceil(n/2), 1] (two NF4 codes a byte, element 2j in the high nibble),
//!   `W.absmax` (U8 codes with double quantization, else F32), `W.quant_map` F32 [16],
//!   with double quantization `W.nested_absmax` F32 [ceil(blocks/256)] and
//!   `W.nested_quant_map` F32 [256], and `W.quant_state.bitsandbytes__nf4`: U8 bytes of the
//!   JSON of the non-tensor fields (`json.dumps` of quant_type, blocksize, dtype, shape,
//!   nested_blocksize, nested_dtype, nested_offset, in that order; see [`bnb`]).
//!
//! `packed` is ours, for every code book: `W.qcodes` U8 (k-bit codes packed densely, MSB
//! first), `W.absmax`, `W.quant_map` (the code book), with double quantization
//! `W.nested_absmax`, `W.nested_quant_map` and `W.nested_offset` F32 [1]; the shapes and
//! settings are in the folder's quantize.json ([`header`]). (Not to be confused with
//! [`crate::packed`], the export's layout of MinMax grids.)
//!
//! - [`settings`]: format, layout, block size, what is quantized, LoftQ's settings;
//! - [`header`]: the header, quantize.json;
//! - [`bnb`]: bitsandbytes' quant-state tensor and JSON;
//! - [`load`]: reading the folder back, dequantized or kept block-wise.

pub mod bnb;
pub mod header;
pub mod load;
pub mod settings;

pub use header::{QuantizeHeader, WeightInfo, HEADER_FILE, LOFTQ_FILE};
pub use load::{is_quantized_folder, load_blockwise, load_dequantized, LoadedTensor};
pub use settings::{
    check_block_size, Format, Layout, LoftqSettings, QuantizeSettings, DEFAULT_SKIP, FORMATS,
    PROJECTIONS,
};
