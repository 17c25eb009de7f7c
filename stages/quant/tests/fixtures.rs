//! Bit-for-bit comparisons with the PyTorch / bitsandbytes reference numbers in
//! shared/fixtures/quant.safetensors (and the case list in quant.json).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use quant::blockwise::BlockScales;
use quant::codebook::dynamic8_construction;
use quant::fake::fake_quant_tensor_ops;
use quant::{
    dynamic8, fake_quant, fake_quant_ste, normal_map, quantize_blockwise, CodeBook, NF4_CODE,
};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

fn load() -> HashMap<String, Tensor> {
    let path = fixtures_dir().join("quant.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

/// Number of positions whose f32 bit patterns differ.
fn bit_mismatches(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len(), "length");
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    let bad = bit_mismatches(got, want);
    if bad > 0 {
        let first = got
            .iter()
            .zip(want)
            .position(|(x, y)| x.to_bits() != y.to_bits())
            .unwrap();
        panic!(
            "{what}: {bad} of {} values differ; first at {first}: got {:e}, want {:e}",
            got.len(),
            got[first],
            want[first]
        );
    }
}

#[test]
fn fake_quant_matches_torch_bit_for_bit() {
    let fx = load();
    let x = &fx["fq.input"];
    assert_eq!(x.dims(), &[16, 128]);
    for bits in [2u32, 3, 4, 8] {
        let cases: [(&str, Option<usize>, bool); 4] = [
            ("per_row", None, false),
            ("per_column", None, true),
            ("per_group32", Some(32), false),
            ("per_group48", Some(48), false),
        ];
        for (name, group, transpose) in cases {
            let want = f32s(&fx[&format!("fq.{name}.b{bits}")]);
            let input = if transpose { x.t().unwrap() } else { x.clone() };
            let back = |t: Tensor| if transpose { t.t().unwrap() } else { t };
            let fast = back(fake_quant(&input, bits, group).unwrap());
            let ops = back(fake_quant_tensor_ops(&input, bits, group).unwrap());
            let ste = back(fake_quant_ste(&input, bits, group).unwrap());
            assert_bits_eq(&format!("{name} b{bits} cpu kernel"), &f32s(&fast), &want);
            assert_bits_eq(&format!("{name} b{bits} tensor ops"), &f32s(&ops), &want);
            assert_bits_eq(&format!("{name} b{bits} ste"), &f32s(&ste), &want);
        }
    }
}

#[test]
fn fake_quant_other_dtypes_and_shapes() {
    let fx = load();
    let x = &fx["fq.input"];
    // 3-D activations: per token along the last dim, same numbers as the 2-D rows.
    let x3 = x.reshape((2, 8, 128)).unwrap();
    let want = f32s(&fx["fq.per_row.b4"]);
    assert_bits_eq("3-D", &f32s(&fake_quant(&x3, 4, None).unwrap()), &want);
    // bf16 in, bf16 out; both paths agree.
    let xb = x.to_dtype(DType::BF16).unwrap();
    let a = fake_quant(&xb, 4, Some(32)).unwrap();
    let b = fake_quant_tensor_ops(&xb, 4, Some(32)).unwrap();
    assert_eq!(a.dtype(), DType::BF16);
    let a = f32s(&a.to_dtype(DType::F32).unwrap());
    let b = f32s(&b.to_dtype(DType::F32).unwrap());
    assert_bits_eq("bf16 paths", &a, &b);
    // Invalid settings are errors, not panics.
    assert!(fake_quant(x, 1, None).is_err());
    assert!(fake_quant(x, 9, None).is_err());
    assert!(fake_quant(x, 4, Some(0)).is_err());
}

#[test]
fn ste_gradient_is_identity() {
    let fx = load();
    let x0 = &fx["fq.input"];
    for (bits, group) in [(4u32, None), (3, Some(48)), (8, Some(32))] {
        let x = Var::from_tensor(x0).unwrap();
        // CPU kernel path.
        let q = fake_quant_ste(x.as_tensor(), bits, group).unwrap();
        let grads = q.sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).expect("gradient for x");
        assert!(f32s(g).iter().all(|v| *v == 1.0), "kernel ste gradient");
        // Tensor-op path, as used off the CPU: q - (detach(x) - x).
        let q2 = fake_quant_tensor_ops(&x.as_tensor().detach(), bits, group).unwrap();
        let xt = x.as_tensor();
        let y = q2.sub(&xt.detach().sub(xt).unwrap()).unwrap();
        assert_bits_eq("ops ste forward", &f32s(&y), &f32s(&q));
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).expect("gradient for x");
        assert!(f32s(g).iter().all(|v| *v == 1.0), "ops ste gradient");
        // A weighted loss: the gradient is the weight, passed straight through.
        let w = Tensor::arange(0f32, 2048f32, &Device::Cpu)
            .unwrap()
            .reshape((16, 128))
            .unwrap();
        let q = fake_quant_ste(x.as_tensor(), bits, group).unwrap();
        let grads = q.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        assert_bits_eq(
            "weighted grad",
            &f32s(grads.get(x.as_tensor()).unwrap()),
            &f32s(&w),
        );
    }
}

#[test]
fn code_books_match_fixtures() {
    let fx = load();
    assert_bits_eq("nf4", &NF4_CODE, &f32s(&fx["nf4.code"]));
    assert_bits_eq(
        "nf4 codebook",
        &CodeBook::Nf4.values(),
        &f32s(&fx["nf4.code"]),
    );
    // The construction is reproduced to 1e-6 (the code books use the stored tables).
    for bits in [2, 3, 4] {
        let want = f32s(&fx[&format!("nf{bits}_normal_map.code")]);
        let got = normal_map(bits);
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6, "nf{bits} map: {a} vs {b}");
        }
    }
    let got = dynamic8_construction();
    for (a, b) in got.iter().zip(&f32s(&fx["dynamic8.code"])) {
        assert!((a - b).abs() <= 1e-7, "dynamic8 construction: {a} vs {b}");
    }
    assert_bits_eq(
        "nf3 codebook",
        &CodeBook::Nf3.values(),
        &f32s(&fx["nf3_normal_map.code"]),
    );
    assert_bits_eq(
        "nf2 codebook",
        &CodeBook::Nf2.values(),
        &f32s(&fx["nf2_normal_map.code"]),
    );
    assert_bits_eq("dynamic8", &dynamic8(), &f32s(&fx["dynamic8.code"]));
}

#[derive(serde::Deserialize)]
struct Case {
    shape: Vec<usize>,
    block_size: usize,
    double_quant: bool,
    nested_block_size: Option<usize>,
}

#[test]
fn blockwise_nf4_matches_bitsandbytes() {
    let fx = load();
    let json = std::fs::read_to_string(fixtures_dir().join("quant.json")).unwrap();
    let cases: HashMap<String, Case> = serde_json::from_str(&json).unwrap();
    assert_eq!(cases.len(), 6);
    for (name, case) in &cases {
        let input = f32s(&fx[&format!("{name}.input")]);
        let q = quantize_blockwise(
            &input,
            &case.shape,
            case.block_size,
            CodeBook::Nf4,
            case.double_quant,
        )
        .unwrap();
        assert_eq!(
            q.packed(),
            u8s(&fx[&format!("{name}.packed")]),
            "{name}: packed codes"
        );
        match &q.absmax {
            BlockScales::F32(a) => {
                assert!(!case.double_quant);
                assert_bits_eq(
                    &format!("{name}: absmax"),
                    a,
                    &f32s(&fx[&format!("{name}.absmax")]),
                );
            }
            BlockScales::Double {
                q: qa,
                nested_absmax,
                nested_block,
                offset,
                code,
            } => {
                assert!(case.double_quant);
                assert_eq!(Some(*nested_block), case.nested_block_size);
                assert_bits_eq(
                    &format!("{name}: offset"),
                    &[*offset],
                    &f32s(&fx[&format!("{name}.offset")]),
                );
                assert_bits_eq(
                    &format!("{name}: nested absmax"),
                    nested_absmax,
                    &f32s(&fx[&format!("{name}.nested_absmax")]),
                );
                assert_bits_eq(
                    &format!("{name}: nested code"),
                    code,
                    &f32s(&fx[&format!("{name}.nested_code")]),
                );
                let want = u8s(&fx[&format!("{name}.absmax")]);
                let bad: Vec<_> = qa
                    .iter()
                    .zip(&want)
                    .enumerate()
                    .filter(|(_, (a, b))| a != b)
                    .collect();
                assert!(
                    bad.is_empty(),
                    "{name}: 8-bit absmax codes differ at {bad:?}"
                );
            }
        }
        assert_bits_eq(
            &format!("{name}: dequant"),
            &q.dequantize(),
            &f32s(&fx[&format!("{name}.dequant")]),
        );
    }
}
