#![no_main]
// A whole pipeline file (`pipeline run FILE`), parsed and validated as the binary does,
// with a `--set` override taken from the input's last line.
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/pipeline_file.rs"]
mod pipeline_file;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = std::path::Path::new("fuzz.toml");
    if let Ok(p) = pipeline_file::PipelineFile::parse(text, path, &[]) {
        let _ = p.quantize_settings();
        let _ = p.export_format();
    }
    if let Some(last) = text.lines().last() {
        let _ = pipeline_file::PipelineFile::parse(text, path, &[last.to_string()]);
    }
});
