//! A bf16 teacher trains a student on the CPU in f32 exactly as the same weights stored in f32
//! do: training keeps the teacher in its stored dtype and widens each weight where it is used
//! (half the teacher's bytes held), which must not change a bit of the student.

mod common;
use common::*;
use std::path::Path;

/// Rewrites `dir/model.safetensors` (all f32) with each value rounded to bf16, stored as bf16
/// (`narrow`) or as the same values in f32 (`!narrow`).
fn round_to_bf16(dir: &Path, narrow: bool) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut entries: Vec<(String, serde_json::Value)> = header.into_iter().collect();
    entries.retain(|(k, _)| k != "__metadata__");
    entries.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap());
    let (mut out_header, mut out_data) = (serde_json::Map::new(), Vec::new());
    for (name, v) in entries {
        assert_eq!(v["dtype"], "F32", "{name}");
        let (a, b) = (
            v["data_offsets"][0].as_u64().unwrap() as usize,
            v["data_offsets"][1].as_u64().unwrap() as usize,
        );
        let start = out_data.len();
        for c in data[a..b].chunks_exact(4) {
            let bits = u32::from_le_bytes(c.try_into().unwrap());
            // Round to nearest, ties to even (the values are finite).
            let top = ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
            if narrow {
                out_data.extend_from_slice(&top.to_le_bytes());
            } else {
                out_data.extend_from_slice(&((top as u32) << 16).to_le_bytes());
            }
        }
        out_header.insert(
            name,
            serde_json::json!({
                "dtype": if narrow { "BF16" } else { "F32" },
                "shape": v["shape"],
                "data_offsets": [start, out_data.len()],
            }),
        );
    }
    let mut h = serde_json::to_vec(&out_header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&out_data);
    std::fs::write(&path, file).unwrap();
}

fn run_ok(args: &[&str]) {
    let o = run(args);
    assert!(o.status.success(), "{args:?} failed: {}", stderr(&o));
}

#[test]
fn a_bf16_teacher_trains_the_student_of_its_f32_copy_bit_for_bit() {
    let dir = temp_dir("teacher_dtype");
    let src = shared().join("models/stories260k");
    let (bf16, f32) = (dir.join("bf16"), dir.join("f32"));
    copy_model(&src, &bf16);
    copy_model(&src, &f32);
    round_to_bf16(&bf16, true);
    round_to_bf16(&f32, false);
    let corpus = dir.join("corpus");
    run_ok(&[
        "generate",
        "--teacher",
        f32.to_str().unwrap(),
        "--out",
        corpus.to_str().unwrap(),
        "--samples",
        "8",
        "--max-tokens",
        "48",
    ]);
    let methods = [
        &["--w-bits", "4"][..],
        &["--method", "lrqat", "--lora-rank", "4", "--w-bits", "4"],
    ];
    for (i, method) in methods.into_iter().enumerate() {
        let student = |teacher: &Path, name: &str| -> Vec<u8> {
            let out = dir.join(format!("{name}-{i}"));
            let mut args = vec![
                "train",
                "--teacher",
                teacher.to_str().unwrap(),
                "--corpus",
                corpus.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--batch",
                "4",
                "--seq-len",
                "32",
                "--steps",
                "3",
                "--a-bits",
                "8",
                "--kv-bits",
                "4",
            ];
            args.extend_from_slice(method);
            run_ok(&args);
            std::fs::read(out.join("student/model.safetensors")).unwrap()
        };
        let (a, b) = (student(&bf16, "train-bf16"), student(&f32, "train-f32"));
        assert!(
            a == b,
            "{method:?}: the bf16 teacher's student differs from the f32 copy's"
        );
    }
}
