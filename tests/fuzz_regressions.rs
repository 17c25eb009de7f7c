//! What cargo fuzz found in the model loaders (scripts/fuzz.sh), kept as end-to-end tests:
//! each input must be an error naming the file, never a crash.

mod common;
use common::*;
use std::path::Path;

fn eval_err(model: &Path) -> String {
    let m = model.display().to_string();
    let t = shared()
        .join("data/tinystories-valid-64k.txt")
        .display()
        .to_string();
    let o = run(&["eval", "--model", &m, "--text", &t, "--max-tokens", "100"]);
    assert!(!o.status.success(), "a corrupt model evaluated");
    assert!(
        o.status.code().is_some(),
        "killed by a signal: {}",
        stderr(&o)
    );
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "a panic reached the user: {err}");
    err
}

#[test]
fn a_tokenizer_json_the_tokenizers_library_panics_on_is_an_error() {
    // fuzz/fuzz_targets/tokenizer.rs: the tokenizers crate `expect`s while deserializing a
    // decoder ("Helper: expected `:`").
    let dir = temp_dir("fuzz_tokenizer");
    copy_model(&shared().join("models/stories260k"), &dir);
    let found = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("stages/model/tests/data/fuzz-crash-tokenizer.json");
    std::fs::copy(found, dir.join("tokenizer.json")).unwrap();
    let err = eval_err(&dir);
    assert!(
        err.contains("tokenizer.json") && err.contains("cannot load tokenizer"),
        "{err}"
    );
}

#[test]
fn a_code_index_outside_an_int4_code_book_is_an_error() {
    // fuzz/fuzz_targets/bnb_folder.rs: int4's code book has 15 values, so a stored nibble of
    // 15 indexed past it while dequantizing.
    let dir = temp_dir("fuzz_int4_code");
    let q = dir.join("q");
    let t = shared().join("models/stories260k").display().to_string();
    let o = run(&[
        "quantize",
        "--model",
        &t,
        "--out",
        q.to_str().unwrap(),
        "--format",
        "int4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Overwrite the first byte of one projection's codes with 0xff (two codes of 15).
    let f = q.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (name, entry) = header
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, v)| k.contains("q_proj") && v["dtype"] == "U8")
        .expect("a packed q_proj");
    let at = 8 + n + entry["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[at] = 0xff;
    std::fs::write(&f, bytes).unwrap();
    let err = eval_err(&q);
    assert!(
        err.contains("outside its code book") && err.contains("model.safetensors"),
        "{name}: {err}"
    );
}
