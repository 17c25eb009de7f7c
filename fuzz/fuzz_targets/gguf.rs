#![no_main]
// A .gguf file: header, metadata, tensor index, tokenizer, tensors.
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let d = common::scratch("gguf");
    let p = d.join("m.gguf");
    std::fs::write(&p, data).unwrap();
    if let Ok(g) = model::gguf::GgufModel::open(&p) {
        if let Ok(c) = g.config() {
            let _ = g.tokenizer_json();
            let _ = g.load_tensors(&c, &candle_core::Device::Cpu);
        }
    }
});
