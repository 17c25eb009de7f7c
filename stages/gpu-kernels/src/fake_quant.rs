//! Launches cuda/fake_quant.cu (compiled to PTX by build.rs): the GPU half of quant's
//! `FakeQuantOp`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, CudaStorage, Map1, WrapErr};
use candle_core::{CudaDevice, Layout, Result, Shape, WithDType};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fake_quant.ptx"));

struct Launch {
    qmax: f32,
    group: Option<usize>,
}

impl Map1 for Launch {
    fn f<T: DeviceRepr + WithDType>(
        &self,
        src: &CudaSlice<T>,
        dev: &CudaDevice,
        layout: &Layout,
    ) -> Result<CudaSlice<T>> {
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("fake-quant: input must be contiguous");
        };
        let src = src.slice(o1..o2);
        let n = layout.shape().elem_count();
        let d = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let g = self.group.unwrap_or(d).min(d);
        let groups = (n / d * d.div_ceil(g)) as u64;
        // SAFETY: every element is written by the kernel below.
        let dst = unsafe { dev.alloc::<T>(n)? };
        if n == 0 {
            return Ok(dst);
        }
        let func = dev.get_or_load_custom_func(
            &kernel_name::<T>("fake_quant"),
            "pipeline_fake_quant",
            PTX,
        )?;
        const THREADS: u64 = 256;
        let warps_per_block = THREADS / 32;
        let cfg = LaunchConfig {
            grid_dim: (groups.div_ceil(warps_per_block) as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(&src);
        b.arg(&dst);
        candle_core::builder_arg!(b, groups, d as u32, g as u32, self.qmax);
        // SAFETY: the kernel reads `n` values of src and writes `n` values of dst.
        unsafe { b.launch(cfg) }.w()?;
        Ok(dst)
    }
}

/// Fake-quantizes contiguous rows of `storage` (groups of `group` values along the last dim,
/// `None` = whole rows) with `qmax` = 2^(bits-1) - 1.
pub fn fake_quant(
    storage: &CudaStorage,
    layout: &Layout,
    qmax: f32,
    group: Option<usize>,
) -> Result<(CudaStorage, Shape)> {
    let dev = storage.device();
    let slice = Launch { qmax, group }.map(&storage.slice, dev, layout)?;
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        layout.shape().clone(),
    ))
}
