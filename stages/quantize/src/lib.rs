//! The quantize stage: a Hugging Face model folder in, a folder of block-wise NF4 / NF3 /
//! NF2 / int-k weights (optionally double-quantized) out, in bitsandbytes' 4-bit
//! serialization or our own packed layout, streamed tensor by tensor at memory speed.
//!
//! - [`settings`]: format, layout, block size, what is quantized;
//! - [`input`] / [`writer`]: safetensors read by memory map, written as a stream;
//! - [`kernel`]: one-pass block quantization + packing + error sums (the `quant` library's
//!   numbers, which match bitsandbytes bit for bit);
//! - [`layout`]: the tensor names of each layout and bitsandbytes' quant-state JSON;
//! - [`stage`]: the folder-to-folder run; [`header`] / [`report`]: its JSON outputs;
//! - [`loftq`]: LoftQ, the base and its initial LoRA adapters chosen together (SVD by faer);
//! - [`load`]: dequantizing a quantized folder on load (eval, train, generate use it);
//! - [`bandwidth`]: the memcpy yardstick for the throughput.

pub mod bandwidth;
pub mod header;
pub mod input;
pub mod kernel;
pub mod layout;
pub mod load;
pub mod loftq;
pub mod report;
pub mod settings;
pub mod stage;
pub mod writer;

pub use header::{QuantizeHeader, HEADER_FILE, LOFTQ_FILE, REPORT_FILE};
pub use load::{is_quantized_folder, load_blockwise, load_dequantized, LoadedTensor};
pub use loftq::LoftqSettings;
pub use report::QuantizeReport;
pub use settings::{check_block_size, Format, Layout, QuantizeSettings, DEFAULT_SKIP};
pub use stage::{quantize_folder, Progress};
