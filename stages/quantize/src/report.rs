//! `quantize_report.json`: what the quantization cost and what it kept: bits per parameter
//! as stored (codes plus every constant: scales, code books, quant states), file sizes
//! against the input, the relative Frobenius error of each weight, and the speed.

use quant::block_folder::{LoftqSettings, QuantizeSettings};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const REPORT_FILE: &str = "quantize_report.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorReport {
    pub name: String,
    pub shape: Vec<usize>,
    pub params: usize,
    pub input_bytes: usize,
    /// Every byte stored for this weight: codes, scales, code books, quant state.
    pub stored_bytes: usize,
    pub bits_per_param: f64,
    /// ||W - dequant(Q)||_F / ||W||_F, with the scales as stored.
    pub rel_error: f64,
    /// With LoftQ: plain block quantization's error ||W - dequant(Q_plain)||_F / ||W||_F ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_rel_error: Option<f64>,
    /// ... and LoftQ's, ||W - (dequant(Q) + (alpha / r) B A)||_F / ||W||_F.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loftq_rel_error: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuantizeReport {
    pub model: String,
    pub out: String,
    pub format: String,
    pub layout: String,
    pub block_size: usize,
    pub double_quant: bool,
    pub quantized_tensors: usize,
    pub quantized_params: usize,
    /// Stored bits per parameter over the quantized weights, constants included.
    pub bits_per_param: f64,
    pub input_file_bytes: u64,
    pub output_file_bytes: u64,
    /// output_file_bytes / input_file_bytes (the whole model, unquantized tensors included).
    pub size_ratio: f64,
    /// The largest relative error of any weight, and the parameter-weighted mean.
    pub max_rel_error: f64,
    pub mean_rel_error: f64,
    pub seconds: f64,
    /// Input bytes of the quantized weights per second of quantization proper (read,
    /// quantize, pack), and of the whole model per second end to end (writing included).
    pub quantize_gb_per_s: f64,
    pub end_to_end_gb_per_s: f64,
    /// LoftQ's summary, when the base was made with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loftq: Option<LoftqReport>,
    pub tensors: Vec<TensorReport>,
}

/// LoftQ's summary: the settings and the parameter-weighted mean errors over its matrices.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoftqReport {
    pub rank: usize,
    pub iters: u32,
    pub alpha: f64,
    pub matrices: usize,
    pub mean_plain_rel_error: f64,
    pub mean_loftq_rel_error: f64,
    /// mean_loftq_rel_error / mean_plain_rel_error.
    pub error_ratio: f64,
    pub max_plain_rel_error: f64,
    pub max_loftq_rel_error: f64,
    /// Seconds spent in LoftQ's alternating quantize / SVD steps (all threads together).
    pub seconds: f64,
}

impl LoftqReport {
    pub fn new(s: &LoftqSettings, tensors: &[TensorReport], seconds: f64) -> Self {
        let pairs: Vec<(f64, f64, f64)> = tensors
            .iter()
            .filter_map(|t| Some((t.plain_rel_error?, t.loftq_rel_error?, t.params as f64)))
            .collect();
        let n: f64 = pairs.iter().map(|p| p.2).sum::<f64>().max(1.0);
        let plain = pairs.iter().map(|p| p.0 * p.2).sum::<f64>() / n;
        let loftq = pairs.iter().map(|p| p.1 * p.2).sum::<f64>() / n;
        LoftqReport {
            rank: s.rank,
            iters: s.iters,
            alpha: s.alpha,
            matrices: pairs.len(),
            mean_plain_rel_error: plain,
            mean_loftq_rel_error: loftq,
            error_ratio: loftq / plain.max(f64::MIN_POSITIVE),
            max_plain_rel_error: pairs.iter().map(|p| p.0).fold(0.0, f64::max),
            max_loftq_rel_error: pairs.iter().map(|p| p.1).fold(0.0, f64::max),
            seconds,
        }
    }
}

impl QuantizeReport {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        input: &Path,
        out: &Path,
        s: &QuantizeSettings,
        tensors: Vec<TensorReport>,
        input_file_bytes: u64,
        output_file_bytes: u64,
        seconds: f64,
        quantize_seconds: f64,
        quantized_input_bytes: u64,
    ) -> QuantizeReport {
        let params: usize = tensors.iter().map(|t| t.params).sum();
        let stored: usize = tensors.iter().map(|t| t.stored_bytes).sum();
        let weighted: f64 = tensors.iter().map(|t| t.rel_error * t.params as f64).sum();
        QuantizeReport {
            model: input.display().to_string(),
            out: out.display().to_string(),
            format: s.format.name(),
            layout: s.layout.name().into(),
            block_size: s.block_size,
            double_quant: s.double_quant,
            quantized_tensors: tensors.len(),
            quantized_params: params,
            bits_per_param: stored as f64 * 8.0 / params.max(1) as f64,
            input_file_bytes,
            output_file_bytes,
            size_ratio: output_file_bytes as f64 / input_file_bytes.max(1) as f64,
            max_rel_error: tensors.iter().map(|t| t.rel_error).fold(0.0, f64::max),
            mean_rel_error: weighted / params.max(1) as f64,
            seconds,
            quantize_gb_per_s: quantized_input_bytes as f64 / quantize_seconds.max(1e-9) / 1e9,
            end_to_end_gb_per_s: input_file_bytes as f64 / seconds.max(1e-9) / 1e9,
            loftq: None,
            tensors,
        }
    }
}
