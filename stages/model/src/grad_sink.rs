//! Gradient sinks: one f32 buffer per trainable weight that GPU training ops write the weight's
//! gradient into directly (cuBLAS accumulates micro-batches with beta = 1), instead of handing
//! it to candle's backward pass. candle would add it into a fresh zero tensor, after a bf16
//! product and a cast: four passes over every weight per step, which the sink avoids.
//!
//! The trainer owns the cycle: `reset` before a step, ops write during backward passes, and
//! `gradient` afterwards (None if nothing was written: that weight got no gradient this way).

use candle_core::{DType, Result, Tensor};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct GradSink {
    buf: Tensor,
    written: AtomicBool,
}

impl GradSink {
    /// A zeroed f32 buffer shaped like `weight`, on its device.
    pub fn new(weight: &Tensor) -> Result<Self> {
        Ok(Self {
            buf: Tensor::zeros(weight.shape(), DType::F32, weight.device())?,
            written: AtomicBool::new(false),
        })
    }

    /// The next write replaces the buffer instead of adding to it.
    pub fn reset(&self) {
        self.written.store(false, Ordering::Relaxed);
    }

    /// For a writer: whether this write overwrites (first of the step) or accumulates.
    pub fn begin_write(&self) -> bool {
        !self.written.swap(true, Ordering::Relaxed)
    }

    /// The buffer itself (f32, contiguous), for writers.
    pub fn buffer(&self) -> &Tensor {
        &self.buf
    }

    /// The gradient written since the last `reset`.
    pub fn gradient(&self) -> Option<&Tensor> {
        self.written.load(Ordering::Relaxed).then_some(&self.buf)
    }
}

/// The sinks of a model's weights, by Hugging Face name.
#[derive(Default)]
pub struct GradSinks {
    pub by_name: HashMap<String, Arc<GradSink>>,
}

impl GradSinks {
    pub fn get(&self, name: &str) -> Option<Arc<GradSink>> {
        self.by_name.get(name).cloned()
    }

    pub fn reset(&self) {
        for s in self.by_name.values() {
            s.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_write_of_a_step_overwrites_later_ones_accumulate() -> Result<()> {
        let w = Tensor::ones((2, 3), DType::BF16, &Device::Cpu)?;
        let s = GradSink::new(&w)?;
        assert_eq!(s.buffer().dtype(), DType::F32);
        assert_eq!(s.buffer().dims(), &[2, 3]);
        assert!(s.gradient().is_none(), "nothing written yet");
        assert!(s.begin_write());
        assert!(!s.begin_write());
        assert!(s.gradient().is_some());
        s.reset();
        assert!(s.gradient().is_none());
        assert!(s.begin_write());
        Ok(())
    }
}
