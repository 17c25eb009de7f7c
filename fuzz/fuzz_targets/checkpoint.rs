#![no_main]
// A training checkpoint folder. First byte even: manifest.json, state.json and
// student.safetensors all fuzzed (split at 0 bytes). Odd: state.json and the two tensor files
// fuzzed under a manifest that matches them, so the readers behind the hash check are reached.
use libfuzzer_sys::fuzz_target;
mod common;

fn sha256_hex(b: &[u8]) -> String {
    corpus::fsio::sha256_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut parts = rest.splitn(3, |b| *b == 0);
    let (a, b, c) = (
        parts.next().unwrap_or(&[]),
        parts.next().unwrap_or(&[]),
        parts.next().unwrap_or(&[]),
    );
    let root = common::scratch("checkpoint");
    let dir = root.join("step-00000003");
    std::fs::create_dir_all(&dir).unwrap();
    let dev = candle_core::Device::Cpu;
    if mode % 2 == 0 {
        std::fs::write(dir.join("manifest.json"), a).unwrap();
        std::fs::write(dir.join("state.json"), b).unwrap();
        std::fs::write(dir.join("student.safetensors"), c).unwrap();
        std::fs::write(dir.join("optimizer.safetensors"), c).unwrap();
    } else {
        let files = [("state.json", a), ("student.safetensors", b), ("optimizer.safetensors", c)];
        let mut entries = Vec::new();
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
            entries.push(format!(
                r#"{{"name":"{name}","bytes":{},"sha256":"{}"}}"#,
                bytes.len(),
                sha256_hex(bytes)
            ));
        }
        let m = format!(r#"{{"format":1,"step":3,"files":[{}]}}"#, entries.join(","));
        std::fs::write(dir.join("manifest.json"), m).unwrap();
    }
    if train::checkpoint::verify(&dir).is_ok() {
        let _ = train::checkpoint::read_safetensors(&dir.join("student.safetensors"), &dev);
        let _ = train::checkpoint::read_safetensors(&dir.join("optimizer.safetensors"), &dev);
    }
    // The resume scan: a broken newest checkpoint is moved aside, never followed.
    let _ = train::checkpoint::newest_valid(&root, &mut |_| {});
});
