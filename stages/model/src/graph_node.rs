//! Graph nodes whose forward and backward are written in candle's own tensor ops. A node keeps
//! in the autograd graph only its inputs, and its backward returns gradients only for the
//! inputs that train: candle's ops would keep every full-size intermediate (a dequantized base,
//! a rounding) and compute gradients for frozen operands too. candle's custom ops see raw
//! storages, so the forward wraps them back into tensors here.

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor};

/// A tensor viewing `s` through `l` (contiguous, any offset).
pub(crate) fn wrap(s: Storage, l: &Layout) -> Result<Tensor> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("graph node: contiguous inputs expected")
    };
    // A view of the first `end` values (the storage may hold more).
    Tensor::from_storage(s, end, BackpropOp::none(), false)
        .narrow(0, start, end - start)?
        .reshape(l.shape())
}

/// `t`'s values as a storage of its own, with its shape.
fn unwrap(t: &Tensor) -> Result<(Storage, Shape)> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let (start, end) = l
        .contiguous_offsets()
        .expect("a contiguous tensor has contiguous offsets");
    if start == 0 && end == t.elem_count() {
        return Ok((s.try_clone(l)?, t.shape().clone()));
    }
    drop(s);
    // A narrowed view: copy out its values alone.
    let fresh = t.flatten_all()?.copy()?;
    let (s, l) = fresh.storage_and_layout();
    Ok((s.try_clone(l)?, t.shape().clone()))
}

/// The CPU forward of a node computed by `f` on tensors.
pub(crate) fn on_cpu(
    inputs: &[(&CpuStorage, &Layout)],
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<(CpuStorage, Shape)> {
    let ts = inputs
        .iter()
        .map(|(s, l)| wrap(Storage::Cpu((*s).clone()), l))
        .collect::<Result<Vec<_>>>()?;
    match unwrap(&f(&ts)?)? {
        (Storage::Cpu(s), shape) => Ok((s, shape)),
        _ => candle_core::bail!("graph node: a CPU forward left the CPU"),
    }
}

/// The GPU forward of a node computed by `f` on tensors.
#[cfg(feature = "cuda")]
pub(crate) fn on_cuda(
    inputs: &[(&candle_core::CudaStorage, &Layout)],
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let ts = inputs
        .iter()
        .map(|(s, l)| wrap(Storage::Cuda(s.try_clone(l)?), l))
        .collect::<Result<Vec<_>>>()?;
    match unwrap(&f(&ts)?)? {
        (Storage::Cuda(s), shape) => Ok((s, shape)),
        _ => candle_core::bail!("graph node: a GPU forward left the GPU"),
    }
}
