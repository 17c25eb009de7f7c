//! The GGUF export read by candle-transformers' `quantized_llama` (llama.cpp's kernels, ported):
//! a W4 student of tinystories-656k (every row tiles into Q4_0 blocks) gives logits within
//! the tolerance of llama.cpp's 8-bit activation blocks of our own W4 forward, and exactly
//! our forward once the same Q4_0 weights are dequantized.

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use std::path::{Path, PathBuf};

fn shared() -> PathBuf {
    std::env::var_os("SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

/// A "student" folder: the teacher's files with the quantizers it was (notionally) trained
/// with; its grid is then round-to-nearest of the teacher.
fn student(dir: &Path, teacher: &str, quant: &str) -> PathBuf {
    let s = dir.join("student");
    let _ = std::fs::remove_dir_all(&s);
    std::fs::create_dir_all(&s).unwrap();
    for e in std::fs::read_dir(shared().join("models").join(teacher)).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), s.join(e.file_name())).unwrap();
        }
    }
    std::fs::write(s.join("quantization.json"), quant).unwrap();
    s
}

fn tokens() -> Vec<u32> {
    // "Once upon a time, there was a little girl named Lily." and more, as tinystories-656k ids.
    let tok =
        tokenizers::Tokenizer::from_file(shared().join("models/tinystories-656k/tokenizer.json"))
            .unwrap();
    let text = std::fs::read_to_string(shared().join("data/tinystories-valid-64k.txt")).unwrap();
    let mut ids = vec![1u32];
    ids.extend(tok.encode(&text[..600], false).unwrap().get_ids());
    ids.truncate(96);
    ids
}

#[test]
fn candle_quantized_llama_reads_the_gguf_export() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("export_quantized_llama");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let s = student(
        &dir,
        "tinystories-656k",
        r#"{"w_bits": 4, "w_group": null, "a_bits": null, "kv_bits": null, "w_scale": "f16"}"#,
    );
    let out = dir.join("gguf");
    let spec = export::ExportSpec {
        format: export::Format::Gguf,
        dtype: "f32".into(),
        text: None,
        max_tokens: None,
    };
    let r = export::export(&s, &out, &spec).unwrap();
    assert_eq!(
        r.max_weight_change, 0.0,
        "f16 scales: the GGUF holds the grid exactly"
    );
    assert_eq!(
        r.types.get("Q4_0"),
        Some(&14),
        "every projection as Q4_0: {:?}",
        r.types
    );
    assert!(r.as_float.is_empty());

    let ids = tokens();
    let dev = Device::Cpu;
    // Ours: the student's W4 forward (scales rounded to f16, as it was trained).
    let folder = model::ModelFolder::open(&s).unwrap();
    let q = model::QuantConfig {
        w_bits: Some(4),
        w_scale: quant::ScaleDtype::F16,
        ..Default::default()
    };
    let ours = model::Llama::load(&folder, q, &dev).unwrap();
    let input = Tensor::new(ids.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ours = ours.forward(&input).unwrap().squeeze(0).unwrap();
    // The same bytes as our GGUF reader dequantizes them: exactly our forward.
    let back = model::ModelFolder::open(&out.join(export::GGUF_FILE)).unwrap();
    let back = model::Llama::load(&back, model::QuantConfig::none(), &dev).unwrap();
    let back = back.forward(&input).unwrap().squeeze(0).unwrap();
    let d_back = (&ours - &back)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d_back, 0.0, "our reader of the export is our forward");

    // candle-transformers: its Q4_0 products quantize activations to 8-bit blocks of 32.
    let mut file = std::fs::File::open(out.join(export::GGUF_FILE)).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut m = ModelWeights::from_gguf(content, &mut file, &dev).unwrap();
    let mut theirs = Vec::new();
    // One token at a time through its KV cache: logits for every position.
    for (pos, id) in ids.iter().enumerate() {
        let x = Tensor::new(&[*id], &dev).unwrap().unsqueeze(0).unwrap();
        theirs.push(m.forward(&x, pos).unwrap().squeeze(0).unwrap());
    }
    let theirs = Tensor::stack(&theirs, 0).unwrap();
    let diff = (&ours - &theirs).unwrap().abs().unwrap();
    let max = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = ours
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let a: Vec<u32> = ours.argmax(1).unwrap().to_vec1().unwrap();
    let b: Vec<u32> = theirs.argmax(1).unwrap().to_vec1().unwrap();
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    eprintln!("candle quantized_llama vs ours: max |logit diff| {max} (largest |logit| {scale}), argmax agreement {agree}/{}", a.len());
    assert!(
        max <= 0.02 * scale,
        "max |diff| {max} against logits up to {scale}"
    );
    assert!(
        agree * 100 >= a.len() * 95,
        "argmax agreement {agree}/{}",
        a.len()
    );
}
