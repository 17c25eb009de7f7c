//! Names, shapes and dtypes of the tensors that stand for one quantized weight, in both
//! layouts, and the bitsandbytes quant-state JSON.
//!
//! `bnb` is what transformers saves for a `Linear4bit` (bitsandbytes `Params4bit` +
//! `QuantState.as_dict(packed=True)`): for weight `W`,
//!   `W` U8 [ceil(n/2), 1] (two NF4 codes a byte, element 2j in the high nibble),
//!   `W.absmax` (U8 codes with double quantization, else F32), `W.quant_map` F32 [16],
//!   with double quantization `W.nested_absmax` F32 [ceil(blocks/256)] and
//!   `W.nested_quant_map` F32 [256], and `W.quant_state.bitsandbytes__nf4`: U8 bytes of the
//!   JSON of the non-tensor fields (`json.dumps` of quant_type, blocksize, dtype, shape,
//!   nested_blocksize, nested_dtype, nested_offset, in that order).
//!
//! `packed` is ours, for every code book: `W.qcodes` U8 (k-bit codes packed densely, MSB
//! first), `W.absmax`, `W.quant_map` (the code book), with double quantization
//! `W.nested_absmax`, `W.nested_quant_map` and `W.nested_offset` F32 [1]; the shapes and
//! settings are in the folder's quantize.json ([`crate::header`]).

use crate::input::Dtype;
use crate::settings::{Layout, QuantizeSettings};
use crate::writer::OutTensor;
use quant::blockwise::NESTED_BLOCK;

pub const BNB_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";

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

/// bitsandbytes' quant-state JSON, byte for byte as `json.dumps` writes it.
pub fn bnb_quant_state_json(
    shape: &[usize],
    dtype: Dtype,
    block_size: usize,
    nested_offset: Option<f32>,
) -> String {
    let shape: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {block_size}, \"dtype\": \"{}\", \"shape\": [{}]",
        dtype.torch_name(),
        shape.join(", ")
    );
    if let Some(off) = nested_offset {
        s.push_str(&format!(
            ", \"nested_blocksize\": {NESTED_BLOCK}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            python_float_repr(off as f64)
        ));
    }
    s.push('}');
    s
}

/// Python's `repr(float)`: the shortest digits that round-trip, in positional notation for
/// decimal exponents -4 to 15, else `d.ddde-05` style.
pub fn python_float_repr(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    if !x.is_finite() {
        return if x.is_nan() {
            "NaN".into()
        } else if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: "-1.2345e-3".
    let sci = format!("{x:e}");
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_repr_of_floats() {
        for (x, want) in [
            (0.1f64, "0.1"),
            (1.0, "1.0"),
            (123.5, "123.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-0.25, "-0.25"),
            (0.0, "0.0"),
            // An f32 widened to f64 keeps all its binary digits.
            (0.0123f32 as f64, "0.012299999594688416"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn quant_state_json_as_bitsandbytes_writes_it() {
        assert_eq!(
            bnb_quant_state_json(&[64, 172], Dtype::F32, 64, Some(0.5)),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [64, 172], \
             \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.5}"
        );
        assert_eq!(
            bnb_quant_state_json(&[8, 8], Dtype::BF16, 128, None),
            "{\"quant_type\": \"nf4\", \"blocksize\": 128, \"dtype\": \"bfloat16\", \"shape\": [8, 8]}"
        );
    }
}
