#![no_main]
// The [train] and [student] tables of a pipeline file, as TOML.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = toml::from_str::<train::TrainConfig>(text) {
        let _ = c.validate();
    }
    if let Ok(s) = toml::from_str::<train::StudentConfig>(text) {
        let _ = s.validate();
        let _ = s.quant_config();
    }
});
