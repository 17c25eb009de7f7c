//! The bitsandbytes layout: what transformers saves for a `Linear4bit` (bitsandbytes
//! `Params4bit` + `QuantState.as_dict(packed=True)`), here the name of the tensor that holds
//! a weight's quant state and that state's JSON, byte for byte as bitsandbytes writes it.
//! The tensors of the layout are listed in [`super`].

use crate::blockwise::NESTED_BLOCK;
use crate::safetensors_file::Dtype;

/// The suffix of the U8 tensor holding a weight's quant-state JSON (`W` + suffix).
pub const BNB_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";

/// bitsandbytes' quant-state JSON, byte for byte as `json.dumps` writes it.
pub fn quant_state_json(
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
            quant_state_json(&[64, 172], Dtype::F32, 64, Some(0.5)),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [64, 172], \
             \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.5}"
        );
        assert_eq!(
            quant_state_json(&[8, 8], Dtype::BF16, 128, None),
            "{\"quant_type\": \"nf4\", \"blocksize\": 128, \"dtype\": \"bfloat16\", \"shape\": [8, 8]}"
        );
    }
}
