//! The distillation loss of DESIGN.md: per token, the cross-entropy between the teacher's
//! softmax(z_T / T) and the student's log_softmax(z_S / T), averaged over the (unmasked) tokens
//! of the batch. KL (= CE - teacher entropy) and top-1 agreement are reported beside it.

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use model::llama::{log_softmax_last, softmax_last};

pub struct Distill {
    /// Scalar, differentiable w.r.t. the student's logits.
    pub loss: Tensor,
    pub kl: f64,
    /// Share of tokens where the student's top-1 equals the teacher's.
    pub agreement: f64,
}

/// `teacher` and `student` are logits [b, t, vocab]; `mask` (b * t values, 1 = counted) leaves
/// padding out of every average.
pub fn distill_loss(
    teacher: &Tensor,
    student: &Tensor,
    mask: Option<&[f32]>,
    temperature: f64,
) -> Result<Distill> {
    let (b, t, _) = student.dims3()?;
    let zt = teacher.detach().affine(1.0 / temperature, 0.0)?;
    let zs = student.affine(1.0 / temperature, 0.0)?;
    let p_t = softmax_last(&zt)?;
    let ce = (&p_t * log_softmax_last(&zs)?)?.sum(D::Minus1)?.neg()?;
    let entropy = (&p_t * log_softmax_last(&zt)?)?.sum(D::Minus1)?.neg()?;
    let agree = zt
        .argmax(D::Minus1)?
        .eq(&zs.argmax(D::Minus1)?.detach())?
        .to_dtype(DType::F32)?;
    let entropy = entropy.detach();
    // Mean over counted tokens: sum(x * mask) / sum(mask).
    let (weights, count) = match mask {
        Some(m) => (
            Some(Tensor::from_slice(m, (b, t), student.device())?),
            m.iter().map(|&x| x as f64).sum(),
        ),
        None => (None, (b * t) as f64),
    };
    let mean = |x: &Tensor| -> candle_core::Result<Tensor> {
        let x = match &weights {
            Some(w) => (x * w)?,
            None => x.clone(),
        };
        x.sum_all()?.affine(1.0 / count.max(1.0), 0.0)
    };
    let loss = mean(&ce)?;
    let ent = mean(&entropy)?.to_scalar::<f32>()? as f64;
    let ce_value = loss.to_scalar::<f32>()? as f64;
    Ok(Distill {
        kl: ce_value - ent,
        agreement: mean(&agree)?.to_scalar::<f32>()? as f64,
        loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equal_logits_have_zero_kl_and_full_agreement() -> Result<()> {
        let dev = Device::Cpu;
        let z = Tensor::from_vec(vec![1f32, 2.0, 0.5, -1.0, 0.0, 3.0], (1, 2, 3), &dev)?;
        let d = distill_loss(&z, &z, None, 1.0)?;
        assert!(d.kl.abs() < 1e-6);
        assert_eq!(d.agreement, 1.0);
        // CE of equal distributions is the entropy, > 0 here.
        assert!(d.loss.to_scalar::<f32>()? > 0.1);

        // A masked-out token does not count.
        let s = Tensor::from_vec(vec![1f32, 2.0, 0.5, 5.0, 0.0, -3.0], (1, 2, 3), &dev)?;
        let masked = distill_loss(&z, &s, Some(&[1.0, 0.0]), 1.0)?;
        assert!(masked.kl.abs() < 1e-6);
        assert_eq!(masked.agreement, 1.0);
        let full = distill_loss(&z, &s, None, 2.0)?;
        assert!(full.kl > 0.1 && full.agreement == 0.5);
        Ok(())
    }
}
