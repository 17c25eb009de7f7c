//! Batched decoding replayed as a CUDA graph. One decoding step of a 1B model is about a
//! thousand small kernels; launching them one by one from the host took ~10x longer than the
//! GPU needs to read the weights. The first step runs eagerly (with candle's cache of kernel
//! parameters turned on, so that the same parameter buffers are reused), then the same step is
//! captured; later steps only overwrite the input tensors in place and launch the graph.

#[cfg(feature = "cuda")]
use super::StepInputs;
use super::{BatchCache, StepData};
use crate::llama::Llama;
use candle_core::{Device, Result, Tensor};

#[cfg(feature = "cuda")]
pub struct GraphState {
    dev: candle_core::CudaDevice,
    captured: Option<Captured>,
}

#[cfg(feature = "cuda")]
struct Captured {
    graph: candle_core::cuda::cudarc::driver::CudaGraph,
    inputs: StepInputs,
    /// Written by every launch (graph-owned memory at a fixed address).
    logits: Tensor,
}

#[cfg(not(feature = "cuda"))]
pub struct GraphState;

impl GraphState {
    pub fn new(dev: &Device) -> Result<Self> {
        match dev {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Ok(Self {
                dev: d.clone(),
                captured: None,
            }),
            _ => candle_core::bail!("CUDA graphs need a CUDA device (got {dev:?})"),
        }
    }
}

impl Llama {
    pub(super) fn decode_graphed(&self, data: StepData, cache: &mut BatchCache) -> Result<Tensor> {
        let mut g = cache
            .graph
            .take()
            .expect("decode_graphed without a graph state");
        let out = g.step(self, data, cache);
        cache.graph = Some(g);
        out
    }
}

#[cfg(not(feature = "cuda"))]
impl GraphState {
    fn step(&mut self, _: &Llama, _: StepData, _: &BatchCache) -> Result<Tensor> {
        candle_core::bail!("CUDA graphs need a build with the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
impl GraphState {
    fn step(&mut self, model: &Llama, data: StepData, cache: &BatchCache) -> Result<Tensor> {
        use candle_core::cuda::cudarc::driver::sys;
        use candle_core::cuda::WrapErr;
        if let Some(c) = &self.captured {
            c.inputs.store(data, &model.device)?;
            c.graph.launch().w()?;
            // A copy: the graph's buffer is overwritten by the next launch.
            return c.logits.copy();
        }
        let stream = self.dev.cuda_stream();
        let inputs = data.upload(&model.device)?;
        let guard = self.dev.enable_cuda_graph_htod_cache();
        // This step's result comes from the eager run; the capture below records the same
        // kernels without running them.
        let eager = model.decode_layers(&inputs, cache)?;
        stream.synchronize().w()?;
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let recorded = model.decode_layers(&inputs, cache);
        let graph = stream.end_capture(
            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        drop(guard);
        let logits = recorded?;
        let graph = graph
            .w()?
            .ok_or_else(|| candle_core::Error::Msg("CUDA graph capture recorded nothing".into()))?;
        graph.upload().w()?;
        self.captured = Some(Captured {
            graph,
            inputs,
            logits,
        });
        Ok(eager)
    }
}
