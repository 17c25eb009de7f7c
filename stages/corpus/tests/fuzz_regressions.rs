//! Inputs cargo fuzz found (scripts/fuzz.sh), kept as regression tests.

use std::path::PathBuf;

#[test]
fn a_shard_whose_page_levels_overrun_is_an_error_naming_it() {
    // fuzz/fuzz_targets/corpus.rs: the parquet crate panicked ("range end out of bounds")
    // decoding a level length beyond its page.
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-crash-shard.parquet");
    let e = corpus::read_shard(&p).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("fuzz-crash-shard.parquet") && msg.contains("not a readable Parquet file"),
        "{msg}"
    );
}

#[test]
fn a_shard_whose_dictionary_indices_overrun_is_an_error_naming_it() {
    // fuzz/fuzz_targets/corpus.rs: the parquet crate indexed past its dictionary ("index out
    // of bounds" in its RLE decoder) on a shard with a corrupt data page.
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-crash-shard-rle.parquet");
    let e = corpus::read_shard(&p).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("fuzz-crash-shard-rle.parquet") && msg.contains("not a readable Parquet file"),
        "{msg}"
    );
}

#[test]
fn a_footer_claiming_more_elements_than_bytes_is_refused_before_parquet_allocates() {
    // fuzz/fuzz_targets/corpus.rs: parquet's footer decoder reserved room for a list length
    // read from the file (8.9 GB, then 221 GB, for 2.6 KB shards).
    for name in ["fuzz-oom-shard-schema.parquet", "fuzz-oom-shard-2.parquet"] {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name);
        let msg = format!("{:#}", corpus::read_shard(&p).unwrap_err());
        assert!(
            msg.contains(name) && msg.contains("corrupt Parquet footer"),
            "{msg}"
        );
    }
}
