#![no_main]
// config.json: any bytes either parse to a config or give an error, never a panic.
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = model::config::LlamaConfig::from_json(&v, Path::new("config.json"));
    }
});
