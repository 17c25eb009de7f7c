#![no_main]
// model.safetensors beside a valid config.json: our loader and the block-quantized folder's reader.
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let d = common::scratch("st");
    std::fs::write(d.join("config.json"), common::CONFIG).unwrap();
    std::fs::write(d.join("model.safetensors"), data).unwrap();
    if let Ok(f) = model::ModelFolder::open(&d) {
        let _ = f.load_tensors(&candle_core::Device::Cpu);
    }
    let _ = quant::block_folder::load_dequantized(&d, &[d.join("model.safetensors")]);
});
