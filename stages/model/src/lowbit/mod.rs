//! The student as it runs after training: projections kept as their low-bit codes and
//! scales (`PackedLinear`), and a K/V cache kept as codes (`KvCodes`), both read directly by
//! CPU kernels (`kernels`: AVX-512 / AVX2 / portable, chosen at run time) and, for the weights,
//! by gpu-kernels' 4-bit GEMV on a GPU.

pub mod kernels;
pub mod kv;
pub mod packed;

pub use kv::{KvCacheFormat, KvCodes};
#[cfg(feature = "cuda")]
pub(crate) use packed::gpu as packed_gpu;
pub use packed::PackedLinear;
