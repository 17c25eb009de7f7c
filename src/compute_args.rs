//! `--device cpu|cuda[:N]` and `--dtype f32|bf16|f16`, shared by the commands that run a model.

use anyhow::{bail, Result};
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

    /// One `Compute` per entry of `--devices` (the list replaces `--device`), or `--device`'s
    /// alone.
    pub fn open_each(&self, devices: Option<&[DeviceSpec]>) -> Result<Vec<Compute>> {
        match devices {
            Some(d) => open_devices(d, self.dtype, "--devices"),
            None => Ok(vec![self.open()?]),
        }
    }
}

/// One `Compute` per device of a list (`what` names the flag or key). `cpu` may repeat (ranks
/// or generators as threads); a GPU may not.
pub fn open_devices(
    devices: &[DeviceSpec],
    dtype: ComputeDtype,
    what: &str,
) -> Result<Vec<Compute>> {
    if devices.is_empty() {
        bail!("{what} is empty: name at least one device, e.g. cuda:0,cuda:1");
    }
    for (i, d) in devices.iter().enumerate() {
        if *d != DeviceSpec::Cpu && devices[..i].contains(d) {
            bail!("{what} names {d} twice: each GPU runs one rank or generator");
        }
    }
    devices.iter().map(|&d| Compute::open(d, dtype)).collect()
}
