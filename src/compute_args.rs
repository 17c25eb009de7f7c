//! `--device cpu|cuda[:N]` and `--dtype f32|bf16|f16`, shared by the commands that run a model.

use anyhow::Result;
use clap::Args;
use model::{Compute, ComputeDtype, DeviceSpec};

#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// Where to compute: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Precision of activations and matrix products: f32, bf16 or f16 (trained weights and
    /// optimizer state stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: ComputeDtype,
}

impl ComputeArgs {
    pub fn open(&self) -> Result<Compute> {
        Compute::open(self.device, self.dtype)
    }
}
