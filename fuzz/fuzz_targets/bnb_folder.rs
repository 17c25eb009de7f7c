#![no_main]
// A block-quantized base: our quantize.json or a bitsandbytes quantization_config (first byte
// chooses), then model.safetensors, split at the first 0 byte. Loaded both as the frozen 4-bit
// base (codes + scales) and dequantized.
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let cut = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    let (header, st) = (&rest[..cut], rest.get(cut + 1..).unwrap_or(&[]));
    let d = common::scratch("bnb");
    let files = vec![d.join("model.safetensors")];
    std::fs::write(&files[0], st).unwrap();
    if mode % 2 == 0 {
        std::fs::write(d.join("config.json"), common::CONFIG).unwrap();
        std::fs::write(d.join("quantize.json"), header).unwrap();
    } else {
        let Ok(q) = serde_json::from_slice::<serde_json::Value>(header) else { return };
        let mut cfg: serde_json::Value = serde_json::from_str(common::CONFIG).unwrap();
        cfg["quantization_config"] = q;
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    }
    if quant::block_folder::is_quantized_folder(&d) {
        let _ = quant::block_folder::load_blockwise(&d, &files);
        let _ = quant::block_folder::load_dequantized(&d, &files);
    }
});
