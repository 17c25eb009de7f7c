#![no_main]
// A corpus folder: manifest.json (before the first 0 byte) and one Parquet shard (after).
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let cut = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (manifest, shard) = (&data[..cut], data.get(cut + 1..).unwrap_or(&[]));
    let d = common::scratch("corpus");
    std::fs::write(d.join("manifest.json"), manifest).unwrap();
    std::fs::write(d.join("shard-00000.parquet"), shard).unwrap();
    let _ = corpus::CorpusManifest::load(&d);
    // read_shard turns the parquet crate's panics on malformed pages into errors
    // (catch_unwind); libFuzzer's panic hook would abort on them even when caught, so it is
    // silenced around the call, as production has no such hook. Panics elsewhere still abort.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let _ = corpus::shard::read_shard(&d.join("shard-00000.parquet"));
    std::panic::set_hook(hook);
});
