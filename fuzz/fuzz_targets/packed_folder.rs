#![no_main]
// A packed export (packed.json + model.safetensors) and a compressed-tensors config: the
// input is split at the first 0 byte into the JSON header and the safetensors bytes.
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let cut = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (header, st) = (&data[..cut], data.get(cut + 1..).unwrap_or(&[]));
    let d = common::scratch("packed");
    std::fs::write(d.join("config.json"), common::CONFIG).unwrap();
    std::fs::write(d.join("packed.json"), header).unwrap();
    std::fs::write(d.join("model.safetensors"), st).unwrap();
    if let Ok(f) = model::ModelFolder::open(&d) {
        let _ = f.load_tensors(&candle_core::Device::Cpu);
    }
    // The same header bytes as a quantization_config of compressed-tensors.
    let _ = std::fs::remove_file(d.join("packed.json"));
    if let Ok(q) = serde_json::from_slice::<serde_json::Value>(header) {
        let mut cfg: serde_json::Value = serde_json::from_str(common::CONFIG).unwrap();
        cfg["quantization_config"] = q;
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        if let Ok(f) = model::ModelFolder::open(&d) {
            let _ = f.load_tensors(&candle_core::Device::Cpu);
        }
    }
});
