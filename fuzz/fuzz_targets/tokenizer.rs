#![no_main]
// tokenizer.json beside a valid config.json: loaded and checked against the model's vocabulary.
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let d = common::scratch("tokenizer");
    std::fs::write(d.join("config.json"), common::CONFIG).unwrap();
    std::fs::write(d.join("model.safetensors"), b"").unwrap();
    std::fs::write(d.join("tokenizer.json"), data).unwrap();
    if let Ok(f) = model::ModelFolder::open(&d) {
        if let Ok(t) = f.tokenizer() {
            let _ = t.encode("Once upon a time", false);
        }
    }
});
