//! Where a batched decoding step's GPU time goes, when `PIPELINE_PROFILE=1`: CUDA events
//! recorded between the pieces of each eager step (not of a step replayed as a CUDA graph),
//! read once the step is done and summed per piece; `pipeline bench decode` reports the sums.
//! The events wait on nothing, so the pieces run as they would unprofiled; only the read at
//! the end of a step synchronises.

use candle_core::{Device, Result};
use std::sync::Mutex;

/// (piece, milliseconds, times) over the steps timed since the last `reset`.
static TOTALS: Mutex<Vec<(&'static str, f64, u64)>> = Mutex::new(Vec::new());

/// Whether `PIPELINE_PROFILE=1`.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("PIPELINE_PROFILE").is_ok_and(|v| v == "1"))
}

/// The sums so far: per piece, milliseconds in total and the number of times it ran.
pub fn totals() -> Vec<(&'static str, f64, u64)> {
    TOTALS.lock().expect("profile totals").clone()
}

/// Forgets the sums (after warm-up steps).
pub fn reset() {
    TOTALS.lock().expect("profile totals").clear();
}

/// The events of one step.
pub struct StepTimer {
    #[cfg(feature = "cuda")]
    stream: std::sync::Arc<candle_core::cuda::cudarc::driver::CudaStream>,
    #[cfg(feature = "cuda")]
    marks: Vec<(&'static str, candle_core::cuda::cudarc::driver::CudaEvent)>,
}

impl StepTimer {
    /// A timer for a step on `device`: None unless profiling is on and the device is a GPU.
    pub fn start(device: &Device) -> Result<Option<Self>> {
        if !enabled() {
            return Ok(None);
        }
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let mut t = Self {
                    stream: d.cuda_stream(),
                    marks: Vec::new(),
                };
                t.mark("start")?;
                Ok(Some(t))
            }
            _ => Ok(None),
        }
    }

    /// Charges the GPU time since the previous mark to `piece`.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn mark(&mut self, piece: &'static str) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda::cudarc::driver::sys::CUevent_flags;
            use candle_core::cuda::WrapErr;
            let e = self
                .stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .w()?;
            self.marks.push((piece, e));
        }
        Ok(())
    }

    /// Waits for the step and adds its pieces' times to the sums.
    pub fn finish(self) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda::WrapErr;
            let mut totals = TOTALS.lock().expect("profile totals");
            for w in self.marks.windows(2) {
                let ms = w[0].1.elapsed_ms(&w[1].1).w()? as f64;
                match totals.iter_mut().find(|t| t.0 == w[1].0) {
                    Some(t) => {
                        t.1 += ms;
                        t.2 += 1;
                    }
                    None => totals.push((w[1].0, ms, 1)),
                }
            }
        }
        Ok(())
    }
}

/// `timer.mark(piece)` when there is a timer.
pub fn mark(timer: &mut Option<StepTimer>, piece: &'static str) -> Result<()> {
    match timer {
        Some(t) => t.mark(piece),
        None => Ok(()),
    }
}
