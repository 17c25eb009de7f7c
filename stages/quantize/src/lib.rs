//! The quantize stage: a Hugging Face model folder in, a folder of block-wise NF4 / NF3 /
//! NF2 / int-k weights (optionally double-quantized) out, in bitsandbytes' 4-bit
//! serialization or our own packed layout, streamed tensor by tensor at memory speed.
//!
//! The folder's format (settings, quantize.json, both layouts, the safetensors reader and
//! reading it back) is the `quant` library's (`quant::block_folder`), so that the libraries
//! that read such folders need no stage; the stage's own parts are:
//!
//! - [`writer`]: the output safetensors, written as a stream;
//! - [`kernel`]: one-pass block quantization + packing + error sums (the `quant` library's
//!   numbers, which match bitsandbytes bit for bit);
//! - [`layout`]: the tensors planned for each weight in each layout;
//! - [`stage`]: the folder-to-folder run; [`report`]: its report (quantize.json is the
//!   library's header);
//! - [`loftq`]: LoftQ, the base and its initial LoRA adapters chosen together (SVD by faer);
//! - [`bandwidth`]: the memcpy yardstick for the throughput.

pub mod bandwidth;
pub mod kernel;
pub mod layout;
pub mod loftq;
pub mod report;
pub mod stage;
pub mod writer;

/// The stage's settings, defined with the folder format they decide.
pub use quant::block_folder::settings;
pub use quant::block_folder::{
    check_block_size, Format, Layout, LoftqSettings, QuantizeHeader, QuantizeSettings,
    DEFAULT_SKIP, HEADER_FILE, LOFTQ_FILE,
};
pub use report::{QuantizeReport, REPORT_FILE};
pub use stage::{quantize_folder, Progress};
