//! The project's own CUDA kernels, for what candle's generic ops do in many passes:
//! - `fake_quant`: symmetric MinMax fake quantization in one pass (quant's `FakeQuantOp` on a
//!   GPU), bit-identical to the CPU kernel;
//! - `adamw`: the AdamW update in place, three kernels per parameter instead of about twelve
//!   tensor ops, with the CPU formula's order of operations.
//!
//! The kernels exist only with the `cuda` feature; `adamw::AdamWStep` (plain data shared with
//! the CPU formula) always does.

pub mod adamw;
#[cfg(feature = "cuda")]
pub mod fake_quant;
