//! The student as it runs after training: projections kept as their low-bit codes and
//! scales (`PackedLinear`), and a K/V cache kept as codes (`KvCodes`), both read directly by
//! CPU kernels (`kernels`: AVX-512 / AVX2 / portable, chosen at run time).

pub mod kernels;
pub mod kv;
pub mod packed;

pub use kv::{KvCacheFormat, KvCodes};
pub use packed::PackedLinear;
