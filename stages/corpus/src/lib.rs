//! The on-disk corpus: the synthetic training text a teacher model generates,
//! stored as byte-deterministic Parquet shards (`shard-00000.parquet`, ...) plus a
//! `manifest.json` naming the teacher, the sampling settings and every finished
//! shard with its row count, token count, size and SHA-256.
//!
//! Also home of the durable-file helpers (`fsio`: atomic writes, hashing, temp
//! file cleanup) that every stage uses for its run-directory artifacts.
//!
//! - `fsio`: write_atomic, sha256_file / sha256_bytes, fsync_dir, remove_temp_files
//! - `shard`: the Parquet shard format (write_shard / read_shard)
//! - `manifest`: CorpusManifest (load / save / compatibility checks)
//! - `ops`: verify, merge and stats over a whole corpus folder

mod footer;
pub mod fsio;
pub mod manifest;
pub mod ops;
pub mod shard;

pub use manifest::{CorpusManifest, Difference, TeacherInfo, MANIFEST_FILE};
pub use ops::{merge, stats, verify, CorpusStats, VerifyReport};
pub use shard::{read_shard, shard_file_name, write_shard, Finish, Sample, ShardEntry};

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    static COUNTER: AtomicU64 = AtomicU64::new(0);

    /// A fresh folder under the system temp dir, removed on drop.
    pub struct TestDir(PathBuf);

    impl TestDir {
        pub fn new(name: &str) -> std::io::Result<TestDir> {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("corpus-test-{name}-{}-{n}", std::process::id()));
            if p.exists() {
                std::fs::remove_dir_all(&p)?;
            }
            std::fs::create_dir_all(&p)?;
            Ok(TestDir(p))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
