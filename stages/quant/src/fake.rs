//! Symmetric MinMax fake quantization (DESIGN.md, "Quantizers"):
//!
//! ```text
//! qmax  = 2^(b-1) - 1
//! alpha = max |x| over the group / qmax        (alpha = 0 -> output 0)
//! q(x)  = clamp(round_half_even(x / alpha), -qmax, qmax) * alpha
//! ```
//!
//! Groups run along the last dimension: the whole row (per channel for an [out, in] weight,
//! per token for activations) or `k` consecutive values of a row (the last group may be
//! shorter). `x / alpha` is a true division, as in PyTorch, so results match bit for bit.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Error, Layout, Shape, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::grid::ScaleDtype;
use crate::QuantError;

/// 1.5 * 2^23: adding and subtracting it rounds an f32 of magnitude < 2^22 to an integer,
/// half to even (the FPU's rounding mode), unlike candle's `round` (half away from zero).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// How the values sharing one scale are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granularity {
    /// One scale per output channel (a weight row).
    PerChannel,
    /// One scale per `k` consecutive values of a row.
    PerGroup(usize),
    /// One scale per token (an activation row).
    PerToken,
}

impl Granularity {
    /// The group length along the last dimension (`None` = the whole row).
    pub fn group(&self) -> Option<usize> {
        match self {
            Granularity::PerChannel | Granularity::PerToken => None,
            Granularity::PerGroup(k) => Some(*k),
        }
    }

    pub fn validate(&self) -> Result<(), QuantError> {
        match self {
            Granularity::PerGroup(0) => Err(QuantError::invalid(
                "group_size",
                0,
                "a group size of at least 1",
            )),
            _ => Ok(()),
        }
    }
}

/// Reads a bit width from the configuration: 16 or 32 mean "no quantization" (`None`),
/// 2 to 8 quantize, anything else is an error.
pub fn parse_bits(bits: u32) -> Result<Option<u32>, QuantError> {
    match bits {
        16 | 32 => Ok(None),
        2..=8 => Ok(Some(bits)),
        _ => Err(QuantError::invalid(
            "bits",
            bits,
            "2 to 8 to quantize, or 16 / 32 for no quantization",
        )),
    }
}

/// A configured fake quantizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeQuant {
    pub bits: u32,
    pub granularity: Granularity,
}

impl FakeQuant {
    /// `Ok(None)` when `bits` is 16 or 32 (quantization off).
    pub fn new(bits: u32, granularity: Granularity) -> Result<Option<FakeQuant>, QuantError> {
        granularity.validate()?;
        Ok(parse_bits(bits)?.map(|bits| FakeQuant { bits, granularity }))
    }

    /// Quantized values, no gradient.
    pub fn quantize(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        fake_quant(x, self.bits, self.granularity.group())
    }

    /// Quantized values with a straight-through (identity) gradient, for training.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        fake_quant_ste(x, self.bits, self.granularity.group())
    }
}

/// Checks `bits` (2..=8) and `group` (≥ 1) and returns qmax = 2^(bits-1) - 1 (for callers that
/// launch the kernels themselves).
pub fn check_args(bits: u32, group: Option<usize>) -> candle_core::Result<f32> {
    if !(2..=8).contains(&bits) {
        return Err(Error::Msg(format!(
            "fake_quant: bits = {bits} is not allowed; allowed: 2 to 8"
        )));
    }
    if group == Some(0) {
        return Err(Error::Msg(
            "fake_quant: group_size = 0 is not allowed; allowed: at least 1".into(),
        ));
    }
    Ok(((1u32 << (bits - 1)) - 1) as f32)
}

/// Whether the one-pass kernel runs: on the CPU for any float dtype (through f32), and with
/// the `cuda` feature on a GPU for f32/bf16/f16 (in place of some fifteen tensor-op passes)
/// when scales stay f32 (the GPU kernel does not round them).
fn fast_path(x: &Tensor, scale: ScaleDtype) -> bool {
    match x.device() {
        Device::Cpu => x.dtype().is_float(),
        Device::Cuda(_) => {
            cfg!(feature = "cuda")
                && scale.is_f32()
                && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        }
        _ => false,
    }
}

/// The kernel's input: f32 on the CPU (its only dtype); the GPU kernel takes the dtype as is.
fn kernel_input(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = if x.device().is_cpu() {
        x.to_dtype(DType::F32)?
    } else {
        x.clone()
    };
    x.contiguous()
}

/// Fake-quantizes `x` (forward values only, no gradient) with `bits` bits, groups of `group`
/// values along the last dimension (`None` = the whole row).
pub fn fake_quant(x: &Tensor, bits: u32, group: Option<usize>) -> candle_core::Result<Tensor> {
    fake_quant_scaled(x, bits, group, ScaleDtype::F32)
}

/// Like [`fake_quant`], with a straight-through estimator: the gradient w.r.t. `x` is the
/// identity. The forward values are exactly those of [`fake_quant`].
pub fn fake_quant_ste(x: &Tensor, bits: u32, group: Option<usize>) -> candle_core::Result<Tensor> {
    fake_quant_scaled_ste(x, bits, group, ScaleDtype::F32)
}

/// [`fake_quant`] with each scale rounded to `scale` before the codes are chosen (so that a
/// format storing f16 or bf16 scales holds the grid exactly).
pub fn fake_quant_scaled(
    x: &Tensor,
    bits: u32,
    group: Option<usize>,
    scale: ScaleDtype,
) -> candle_core::Result<Tensor> {
    let qmax = check_args(bits, group)?;
    if fast_path(x, scale) {
        let op = FakeQuantOp { qmax, group, scale };
        kernel_input(&x.detach())?
            .apply_op1_no_bwd(&op)?
            .to_dtype(x.dtype())
    } else {
        tensor_ops(&x.detach(), bits, group, scale)
    }
}

/// [`fake_quant_ste`] with scales rounded to `scale`.
pub fn fake_quant_scaled_ste(
    x: &Tensor,
    bits: u32,
    group: Option<usize>,
    scale: ScaleDtype,
) -> candle_core::Result<Tensor> {
    let qmax = check_args(bits, group)?;
    if fast_path(x, scale) {
        // One pass: the custom op's backward passes the gradient through unchanged.
        let op = FakeQuantOp { qmax, group, scale };
        kernel_input(x)?.apply_op1(op)?.to_dtype(x.dtype())
    } else {
        // (detach(x) - x) is exactly +0 forward and has gradient -1, so q(x) minus it gives
        // the exact quantized values, -0.0 included, with an identity gradient
        // (x + (q - x).detach() would round twice).
        let q = tensor_ops(&x.detach(), bits, group, scale)?;
        q.sub(&x.detach().sub(x)?)
    }
}

/// The same math written with candle tensor ops (any device), computed in f32. Public so
/// that tests can compare it with the CPU kernel.
pub fn fake_quant_tensor_ops(
    x: &Tensor,
    bits: u32,
    group: Option<usize>,
) -> candle_core::Result<Tensor> {
    tensor_ops(x, bits, group, ScaleDtype::F32)
}

fn tensor_ops(
    x: &Tensor,
    bits: u32,
    group: Option<usize>,
    scale: ScaleDtype,
) -> candle_core::Result<Tensor> {
    let qmax = check_args(bits, group)?;
    let dims = x.dims().to_vec();
    let d = dims.last().copied().unwrap_or(1);
    let n = x.elem_count();
    if n == 0 {
        return Ok(x.clone());
    }
    let rows = n / d;
    let g = group.unwrap_or(d).min(d);
    let n_groups = d.div_ceil(g);
    let padded = n_groups * g;
    let dev = x.device();

    let x2 = x.to_dtype(DType::F32)?.reshape((rows, d))?;
    // Zero padding of the short last group leaves its max |x| unchanged.
    let x2 = if padded > d {
        x2.pad_with_zeros(1, 0, padded - d)?
    } else {
        x2
    };
    let xg = x2.reshape((rows, n_groups, g))?;
    let amax = xg.abs()?.max_keepdim(2)?;
    // True division (candle's `tensor / f64` multiplies by the reciprocal).
    let alpha = amax.broadcast_div(&Tensor::new(qmax, dev)?)?;
    // Rounded to nearest even in the scale's type (candle's casts round so, as `half` does).
    let alpha = match scale {
        ScaleDtype::F32 => alpha,
        ScaleDtype::F16 => alpha.to_dtype(DType::F16)?.to_dtype(DType::F32)?,
        ScaleDtype::Bf16 => alpha.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
    };
    // alpha = 0 only when the group is all zeros: divide by 1 instead, the result is 0 * 0.
    let safe = alpha.eq(0f32)?.where_cond(&alpha.ones_like()?, &alpha)?;
    let v = xg.broadcast_div(&safe)?.clamp(-qmax, qmax)?;
    let magic = Tensor::new(ROUND_MAGIC, dev)?;
    let r_abs = v.abs()?.broadcast_add(&magic)?.broadcast_sub(&magic)?;
    // Round |v| and restore the sign, so that small negative values give -0.0 as in torch.
    let r = v.lt(0f32)?.where_cond(&r_abs.neg()?, &r_abs)?;
    r.broadcast_mul(&alpha)?
        .reshape((rows, padded))?
        .narrow(1, 0, d)?
        .reshape(dims)?
        .to_dtype(x.dtype())
}

/// Rounds every value of `x` half to even (values, no gradient): `|x| < 2^22`, as the grids
/// of the quantizers are.
pub fn round_half_even(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.detach();
    let magic = Tensor::new(ROUND_MAGIC, x.device())?.to_dtype(x.dtype())?;
    let r_abs = x.abs()?.broadcast_add(&magic)?.broadcast_sub(&magic)?;
    x.lt(0f64)?.where_cond(&r_abs.neg()?, &r_abs)
}

/// The kernel: on the CPU contiguous f32 rows, rayon over rows; on a GPU gpu-kernels'
/// cuda/fake_quant.cu.
struct FakeQuantOp {
    qmax: f32,
    group: Option<usize>,
    scale: ScaleDtype,
}

impl CustomOp1 for FakeQuantOp {
    fn name(&self) -> &'static str {
        "fake-quant"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = storage.as_slice::<f32>()?;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::Msg("fake-quant: input must be contiguous".into()))?;
        let x = &data[start..end];
        let shape = layout.shape().clone();
        let row = shape.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; x.len()];
        if !x.is_empty() {
            quantize_rows(x, &mut out, row, self.qmax, self.group, self.scale);
        }
        Ok((CpuStorage::F32(out), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        gpu_kernels::fake_quant::fake_quant(storage, layout, self.qmax, self.group)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // Straight-through estimator, no clipping window.
        Ok(Some(grad_res.clone()))
    }
}

fn quantize_rows(
    x: &[f32],
    out: &mut [f32],
    row: usize,
    qmax: f32,
    group: Option<usize>,
    scale: ScaleDtype,
) {
    let g = group.unwrap_or(row).min(row);
    // Enough rows per rayon task that small rows do not drown in scheduling.
    let min_rows = (16 * 1024 / row).max(1);
    out.par_chunks_mut(row)
        .zip(x.par_chunks(row))
        .with_min_len(min_rows)
        .for_each(|(o, xr)| {
            for (oc, xc) in o.chunks_mut(g).zip(xr.chunks(g)) {
                quantize_group(xc, oc, qmax, scale);
            }
        });
}

fn quantize_group(x: &[f32], out: &mut [f32], qmax: f32, scale: ScaleDtype) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let alpha = crate::grid::group_scale(amax, qmax, scale);
    if alpha == 0.0 {
        out.fill(0.0);
        return;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        // round_ties_even by adding and subtracting 1.5 * 2^23 (|v / alpha| <= qmax < 2^22):
        // the same values, -0.0 included through the sign, but it vectorizes, where
        // round_ties_even compiles to one libm call per value on baseline x86-64.
        let c = (v / alpha).clamp(-qmax, qmax);
        *o = ((c.abs() + ROUND_MAGIC) - ROUND_MAGIC).copysign(c) * alpha;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's rounding (adding and subtracting 1.5 * 2^23) gives round_ties_even's
    /// values bit for bit, ties and -0.0 included.
    #[test]
    fn kernel_rounds_as_round_ties_even() {
        let qmax = 7.0f32;
        let x: Vec<f32> = (-4000..=4000)
            .map(|i| i as f32 * 0.00125)
            .chain([0.0, -0.0, 3.5 / 7.0, -2.5 / 7.0, 0.5 / 7.0, -0.5 / 7.0])
            .collect();
        let mut out = vec![0f32; x.len()];
        quantize_rows(&x, &mut out, x.len(), qmax, Some(7), ScaleDtype::F32);
        for (g, (xc, oc)) in x.chunks(7).zip(out.chunks(7)).enumerate() {
            let amax = xc.iter().fold(0f32, |m, v| m.max(v.abs()));
            let alpha = amax / qmax;
            for (v, o) in xc.iter().zip(oc) {
                let want = if alpha == 0.0 {
                    0.0
                } else {
                    (v / alpha).clamp(-qmax, qmax).round_ties_even() * alpha
                };
                assert_eq!(
                    o.to_bits(),
                    want.to_bits(),
                    "group {g}: {v} -> {o}, want {want}"
                );
            }
        }
    }
}
