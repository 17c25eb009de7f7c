//! Where and in which precision models compute: `--device cpu|cuda[:N]` (or `[run] device`) and
//! `--dtype f32|bf16|f16` (or `[run] dtype`). CUDA needs a build with the `cuda` feature
//! (scripts/build-cuda.sh). Weights that are trained keep f32 masters whatever the dtype; see
//! `Llama::set_compute_dtype`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A device as the user names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            anyhow::anyhow!("device = {s:?}: allowed values are \"cpu\", \"cuda\" and \"cuda:N\"")
        };
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                Ok(DeviceSpec::Cuda(n.parse().map_err(|_| bad())?))
            }
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(e))
    }
}

impl DeviceSpec {
    /// Opens the device. Open it once per process: candle tensors of two `Device` values
    /// of the same GPU cannot be mixed.
    pub fn open(&self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                let dev = Device::new_cuda(*n).with_context(|| {
                    format!(
                        "cannot open CUDA device {n} (this binary needs the `cuda` feature: scripts/build-cuda.sh)"
                    )
                })?;
                #[cfg(feature = "cuda")]
                if let Device::Cuda(d) = &dev {
                    // Everything runs on the device's one stream, so cudarc's per-launch event
                    // records (for cross-stream ordering) are pure overhead, and they cannot be
                    // captured into a CUDA graph.
                    // SAFETY: no tensor is used on a second stream.
                    unsafe { d.disable_event_tracking() };
                }
                Ok(dev)
            }
        }
    }
}

/// The precision of activations and matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl std::str::FromStr for ComputeDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(ComputeDtype::F32),
            "bf16" => Ok(ComputeDtype::Bf16),
            "f16" => Ok(ComputeDtype::F16),
            o => bail!("dtype = {o:?}: allowed values are \"f32\", \"bf16\" and \"f16\""),
        }
    }
}

impl std::fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
            ComputeDtype::F16 => "f16",
        })
    }
}

impl ComputeDtype {
    pub fn dtype(&self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
            ComputeDtype::F16 => DType::F16,
        }
    }
}

/// An opened device and the compute dtype, handed to the stages.
#[derive(Clone, Debug)]
pub struct Compute {
    pub device: Device,
    pub dtype: DType,
}

impl Compute {
    /// f32 on the CPU: the default, and the only bit-reproducible setting.
    pub fn cpu() -> Self {
        Compute {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    pub fn open(device: DeviceSpec, dtype: ComputeDtype) -> Result<Self> {
        Ok(Compute {
            device: device.open()?,
            dtype: dtype.dtype(),
        })
    }

    /// Waits for queued GPU work, so that wall-clock timings cover it.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.device.synchronize()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        assert_eq!("bf16".parse::<ComputeDtype>().unwrap().dtype(), DType::BF16);
        assert!("f64".parse::<ComputeDtype>().is_err());
    }

    #[test]
    fn cuda_fails_with_a_hint_without_the_feature() {
        // On a CUDA build with a GPU this opens; everywhere else it must say how to get one.
        if let Err(e) = DeviceSpec::Cuda(0).open() {
            assert!(format!("{e:#}").contains("scripts/build-cuda.sh"));
        }
    }
}
