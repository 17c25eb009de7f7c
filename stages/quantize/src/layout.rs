//! The tensors the stage plans for one quantized weight, in both layouts (names, shapes and
//! dtypes, fixed before any is written). The layouts themselves are described with their
//! reader, in `quant::block_folder`.

use crate::writer::OutTensor;
use quant::block_folder::bnb::BNB_STATE_SUFFIX;
use quant::block_folder::{Layout, QuantizeSettings};
use quant::blockwise::NESTED_BLOCK;
use quant::safetensors_file::Dtype;

/// The tensors planned (fixed size) for weight `name` of `numel` values.
pub fn planned_tensors(name: &str, numel: usize, s: &QuantizeSettings) -> Vec<OutTensor> {
    let bits = s.format.bits() as usize;
    let blocks = numel.div_ceil(s.block_size);
    let code_len = s.format.codebook().values().len();
    let mut v = match s.layout {
        Layout::Bnb => vec![OutTensor::new(name, Dtype::U8, vec![numel.div_ceil(2), 1])],
        Layout::Packed => vec![OutTensor::new(
            format!("{name}.qcodes"),
            Dtype::U8,
            vec![(numel * bits).div_ceil(8)],
        )],
    };
    let absmax_dtype = if s.double_quant {
        Dtype::U8
    } else {
        Dtype::F32
    };
    v.push(OutTensor::new(
        format!("{name}.absmax"),
        absmax_dtype,
        vec![blocks],
    ));
    v.push(OutTensor::new(
        format!("{name}.quant_map"),
        Dtype::F32,
        vec![code_len],
    ));
    if s.double_quant {
        v.push(OutTensor::new(
            format!("{name}.nested_absmax"),
            Dtype::F32,
            vec![blocks.div_ceil(NESTED_BLOCK)],
        ));
        v.push(OutTensor::new(
            format!("{name}.nested_quant_map"),
            Dtype::F32,
            vec![256],
        ));
        if s.layout == Layout::Packed {
            v.push(OutTensor::new(
                format!("{name}.nested_offset"),
                Dtype::F32,
                vec![1],
            ));
        }
    }
    v
}

/// The appended tensor of weight `name` (bnb's quant state), if the layout has one.
pub fn tail_tensor(name: &str, s: &QuantizeSettings) -> Option<String> {
    (s.layout == Layout::Bnb).then(|| format!("{name}{BNB_STATE_SUFFIX}"))
}
