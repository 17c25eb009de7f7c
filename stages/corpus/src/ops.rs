//! Whole-corpus operations behind CLI commands: verify, merge, stats.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::fsio;
use crate::manifest::{CorpusManifest, MANIFEST_FILE};
use crate::shard::{read_shard, Finish, ShardEntry};

// ---------------------------------------------------------------- verify

/// A listed shard whose file is not what the manifest says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardProblem {
    pub index: usize,
    pub file: String,
    pub problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Problem {
    Missing,
    SizeMismatch {
        expected: u64,
        actual: u64,
    },
    HashMismatch {
        expected: String,
        actual: String,
    },
    /// The entry's row count is not what the shard's position requires.
    WrongRows {
        expected: u64,
        listed: u64,
    },
}

/// The result of `verify`: what is fine and what is not, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub dir: PathBuf,
    /// Shards listed in the manifest whose files match size and hash.
    pub ok_shards: usize,
    pub problems: Vec<ShardProblem>,
    /// Shard indices not yet generated (not in the manifest).
    pub pending: Vec<usize>,
    /// Files in the folder that the manifest does not list (temp files included).
    pub unlisted: Vec<String>,
}

impl VerifyReport {
    /// True when every listed shard matches; pending shards and unlisted files
    /// do not make a corpus wrong (it may be unfinished), only incomplete.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn is_complete(&self) -> bool {
        self.is_ok() && self.pending.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if !self.is_ok() {
            "FAILED"
        } else if self.pending.is_empty() {
            "OK"
        } else {
            "OK (incomplete)"
        };
        writeln!(f, "corpus {}: {verdict}", self.dir.display())?;
        writeln!(f, "  {} shard(s) verified", self.ok_shards)?;
        for p in &self.problems {
            let what = match &p.problem {
                Problem::Missing => "file missing".to_string(),
                Problem::SizeMismatch { expected, actual } => {
                    format!("size is {actual} bytes, manifest says {expected}")
                }
                Problem::HashMismatch { expected, actual } => {
                    format!("sha256 is {actual}, manifest says {expected}")
                }
                Problem::WrongRows { expected, listed } => {
                    format!("manifest lists {listed} rows, this shard must hold {expected}")
                }
            };
            writeln!(f, "  shard {} ({}): {what}", p.index, p.file)?;
        }
        if !self.pending.is_empty() {
            writeln!(
                f,
                "  {} shard(s) not generated yet: {}",
                self.pending.len(),
                compact_ranges(&self.pending)
            )?;
        }
        if !self.unlisted.is_empty() {
            writeln!(
                f,
                "  files not in the manifest: {}",
                self.unlisted.join(", ")
            )?;
        }
        Ok(())
    }
}

/// `[0,1,2,5,7,8]` -> `0-2, 5, 7-8`.
fn compact_ranges(xs: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < xs.len() {
        let mut j = i;
        while j + 1 < xs.len() && xs[j + 1] == xs[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            xs[i].to_string()
        } else {
            format!("{}-{}", xs[i], xs[j])
        });
        i = j + 1;
    }
    parts.join(", ")
}

/// Checks one listed shard file against its entry.
fn check_entry(dir: &Path, entry: &ShardEntry) -> Result<Option<Problem>> {
    let path = dir.join(&entry.file);
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(Problem::Missing)),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    };
    if meta.len() != entry.bytes {
        return Ok(Some(Problem::SizeMismatch {
            expected: entry.bytes,
            actual: meta.len(),
        }));
    }
    let actual = fsio::sha256_file(&path)?;
    if actual != entry.sha256 {
        return Ok(Some(Problem::HashMismatch {
            expected: entry.sha256.clone(),
            actual,
        }));
    }
    Ok(None)
}

/// Re-hashes every shard the manifest in `dir` lists. Errors only when the
/// manifest itself cannot be read; shard problems go into the report.
pub fn verify(dir: &Path) -> Result<VerifyReport> {
    let m = CorpusManifest::load(dir)?;
    let mut report = VerifyReport {
        dir: dir.to_path_buf(),
        ok_shards: 0,
        problems: Vec::new(),
        pending: m.missing_shards(),
        unlisted: Vec::new(),
    };
    for (&index, entry) in &m.shards {
        let expected = m.expected_rows(index);
        let problem = if entry.rows != expected {
            Some(Problem::WrongRows {
                expected,
                listed: entry.rows,
            })
        } else {
            check_entry(dir, entry)?
        };
        match problem {
            None => report.ok_shards += 1,
            Some(problem) => report.problems.push(ShardProblem {
                index,
                file: entry.file.clone(),
                problem,
            }),
        }
    }
    let listed: BTreeSet<&str> = m.shards.values().map(|e| e.file.as_str()).collect();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != MANIFEST_FILE && !listed.contains(name.as_str()) {
            report.unlisted.push(name);
        }
    }
    report.unlisted.sort();
    Ok(report)
}

// ---------------------------------------------------------------- merge

/// Same folder? Compares canonical paths; a folder that does not exist yet is
/// different from every existing one.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Places `src` at `dst` (hard link when possible, else copy), durably and
/// atomically: link/copy to a temp name, fsync, rename.
fn place_file(src: &Path, dst: &Path) -> Result<()> {
    let tmp = fsio::temp_path_for(dst)?;
    let result = (|| -> Result<()> {
        if fs::hard_link(src, &tmp).is_err() {
            // Different filesystem or no link support: copy instead.
            fs::copy(src, &tmp)
                .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
        }
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("fsync of {}", tmp.display()))?;
        fsio::rename_durable(&tmp, dst)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Merges corpora made with the same teacher and settings (e.g. generated on
/// several machines, each a range of shards) into `out`, which may be one of
/// the inputs. Shard files are hard-linked or copied, then re-hashed; the merged
/// manifest is written last.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<CorpusManifest> {
    let Some(first_dir) = dirs.first() else {
        bail!("merge needs at least one input corpus");
    };
    let manifests: Vec<CorpusManifest> = dirs
        .iter()
        .map(|d| CorpusManifest::load(d))
        .collect::<Result<_>>()?;
    if CorpusManifest::exists(out) && !dirs.iter().any(|d| same_dir(d, out)) {
        bail!(
            "{} already holds a corpus; name it as one of the inputs to merge into it",
            out.display()
        );
    }

    // All must describe the same corpus.
    let base = &manifests[0];
    for (dir, m) in dirs.iter().zip(&manifests).skip(1) {
        if let Some(d) = base.first_difference(m) {
            bail!(
                "cannot merge: corpus {} has {} = {}, corpus {} has {} = {}",
                first_dir.display(),
                d.key,
                d.ours,
                dir.display(),
                d.key,
                d.theirs
            );
        }
    }

    // Union of the shards; each index remembers where it comes from.
    let mut sources: BTreeMap<usize, (&Path, &ShardEntry)> = BTreeMap::new();
    for (dir, m) in dirs.iter().zip(&manifests) {
        for (&index, entry) in &m.shards {
            match sources.get(&index) {
                Some((other_dir, other)) if other.sha256 != entry.sha256 => bail!(
                    "cannot merge: shard {index} differs between {} (sha256 {}) and {} (sha256 {})",
                    other_dir.display(),
                    other.sha256,
                    dir.display(),
                    entry.sha256
                ),
                Some(_) => {}
                None => {
                    sources.insert(index, (dir.as_path(), entry));
                }
            }
        }
    }

    fsio::create_out_dir(out)?;
    let mut merged = base.clone();
    merged.shards.clear();
    for (&index, &(src_dir, entry)) in &sources {
        let src = src_dir.join(&entry.file);
        let dst = out.join(&entry.file);
        // Already in place (out is this input, or a previous merge got here)?
        let in_place = dst.is_file()
            && fs::metadata(&dst).map(|m| m.len()).ok() == Some(entry.bytes)
            && fsio::sha256_file(&dst)? == entry.sha256;
        if !in_place {
            if same_dir(src_dir, out) {
                bail!(
                    "shard {index} ({}) in {} does not match its manifest; run verify",
                    entry.file,
                    src_dir.display()
                );
            }
            place_file(&src, &dst)
                .with_context(|| format!("placing shard {index} from {}", src.display()))?;
            let actual = fsio::sha256_file(&dst)?;
            if actual != entry.sha256 {
                let _ = fs::remove_file(&dst);
                bail!(
                    "shard {index}: {} has sha256 {actual}, its manifest says {}",
                    src.display(),
                    entry.sha256
                );
            }
        }
        merged.shards.insert(index, entry.clone());
    }
    merged.save(out)?;
    Ok(merged)
}

// ---------------------------------------------------------------- stats

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LengthBucket {
    /// Inclusive bounds, in tokens.
    pub lo: usize,
    pub hi: usize,
    pub count: u64,
}

/// Statistics over all shards the manifest lists.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CorpusStats {
    pub dir: PathBuf,
    pub shards: usize,
    /// Shards the complete corpus has.
    pub shards_expected: usize,
    pub samples: u64,
    pub tokens: u64,
    pub mean_len: f64,
    pub min_len: usize,
    pub max_len: usize,
    /// Up to 16 equal-width buckets covering 0..=max_len.
    pub length_histogram: Vec<LengthBucket>,
    /// Counts by finish reason ("eos", "length").
    pub finish: BTreeMap<String, u64>,
    pub vocab_size: usize,
    pub distinct_tokens: usize,
    /// distinct_tokens / vocab_size.
    pub distinct_token_share: f64,
    /// Tokens with an id >= vocab_size (should be 0).
    pub out_of_vocab_tokens: u64,
    /// Samples per greedy-prefix length.
    pub greedy_prefix: BTreeMap<u8, u64>,
}

const HIST_BUCKETS: usize = 16;

/// Reads every listed shard of the corpus in `dir` and summarises it.
pub fn stats(dir: &Path) -> Result<CorpusStats> {
    let m = CorpusManifest::load(dir)?;
    let vocab = m.teacher.vocab_size;
    let mut seen = vec![false; vocab];
    let mut distinct = 0usize;
    let mut oov = 0u64;
    let mut lengths: Vec<usize> = Vec::new();
    let mut finish: BTreeMap<String, u64> = [Finish::Eos, Finish::Length]
        .iter()
        .map(|f| (f.as_str().to_string(), 0))
        .collect();
    let mut greedy: BTreeMap<u8, u64> = BTreeMap::new();

    for entry in m.shards.values() {
        for s in read_shard(&dir.join(&entry.file))? {
            lengths.push(s.tokens.len());
            *finish.entry(s.finish.as_str().to_string()).or_default() += 1;
            *greedy.entry(s.greedy_prefix).or_default() += 1;
            for &t in &s.tokens {
                match seen.get_mut(t as usize) {
                    Some(flag) => {
                        distinct += usize::from(!*flag);
                        *flag = true;
                    }
                    None => oov += 1,
                }
            }
        }
    }

    let samples = lengths.len() as u64;
    let tokens: u64 = lengths.iter().map(|&l| l as u64).sum();
    let min_len = lengths.iter().copied().min().unwrap_or(0);
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    let length_histogram = if lengths.is_empty() {
        Vec::new()
    } else {
        let width = (max_len + 1).div_ceil(HIST_BUCKETS);
        let n = (max_len + 1).div_ceil(width);
        let mut buckets: Vec<LengthBucket> = (0..n)
            .map(|b| LengthBucket {
                lo: b * width,
                hi: ((b + 1) * width - 1).min(max_len),
                count: 0,
            })
            .collect();
        for &l in &lengths {
            buckets[l / width].count += 1;
        }
        buckets
    };

    Ok(CorpusStats {
        dir: dir.to_path_buf(),
        shards: m.shards.len(),
        shards_expected: m.num_shards(),
        samples,
        tokens,
        mean_len: if samples == 0 {
            0.0
        } else {
            tokens as f64 / samples as f64
        },
        min_len,
        max_len,
        length_histogram,
        finish,
        vocab_size: vocab,
        distinct_tokens: distinct,
        distinct_token_share: if vocab == 0 {
            0.0
        } else {
            distinct as f64 / vocab as f64
        },
        out_of_vocab_tokens: oov,
        greedy_prefix: greedy,
    })
}

impl fmt::Display for CorpusStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |n: u64| {
            if self.samples == 0 {
                0.0
            } else {
                100.0 * n as f64 / self.samples as f64
            }
        };
        writeln!(f, "corpus {}", self.dir.display())?;
        writeln!(f, "  shards:   {} of {}", self.shards, self.shards_expected)?;
        writeln!(f, "  samples:  {}", self.samples)?;
        writeln!(f, "  tokens:   {}", self.tokens)?;
        writeln!(
            f,
            "  length:   mean {:.1}, min {}, max {}",
            self.mean_len, self.min_len, self.max_len
        )?;
        let finish: Vec<String> = self
            .finish
            .iter()
            .map(|(k, &n)| format!("{k} {n} ({:.1}%)", pct(n)))
            .collect();
        writeln!(f, "  finish:   {}", finish.join(", "))?;
        writeln!(
            f,
            "  distinct tokens: {} of {} ({:.1}%)",
            self.distinct_tokens,
            self.vocab_size,
            100.0 * self.distinct_token_share
        )?;
        if self.out_of_vocab_tokens > 0 {
            writeln!(
                f,
                "  WARNING: {} token(s) with an id >= vocab_size",
                self.out_of_vocab_tokens
            )?;
        }
        let greedy: Vec<String> = self
            .greedy_prefix
            .iter()
            .map(|(g, &n)| format!("{g}: {n}"))
            .collect();
        writeln!(f, "  greedy prefix: {}", greedy.join(", "))?;
        if !self.length_histogram.is_empty() {
            writeln!(f, "  length histogram:")?;
            let top = self
                .length_histogram
                .iter()
                .map(|b| b.count)
                .max()
                .unwrap_or(0);
            for b in &self.length_histogram {
                let bar = if top == 0 {
                    0
                } else {
                    (b.count * 40).div_ceil(top) as usize
                };
                writeln!(
                    f,
                    "    {:>6}-{:<6} {:>8}  {}",
                    b.lo,
                    b.hi,
                    b.count,
                    "#".repeat(bar)
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::make_manifest;
    use crate::shard::tests::make_samples;
    use crate::shard::{shard_file_name, write_shard, Sample};
    use crate::testutil::TestDir;

    /// Writes a complete corpus of `samples` samples (shards of `size`) into `dir`.
    fn make_corpus(dir: &Path, samples: u64, size: u64) -> Result<CorpusManifest> {
        let mut m = make_manifest(samples, size);
        for i in 0..m.num_shards() {
            let part = make_samples(m.first_sample(i), m.expected_rows(i) as usize, false);
            let e = write_shard(&dir.join(shard_file_name(i)), &part, false)?;
            m.shards.insert(i, e);
        }
        m.save(dir)?;
        Ok(m)
    }

    #[test]
    fn verify_clean_and_flipped_byte() -> Result<()> {
        let dir = TestDir::new("ops-verify")?;
        make_corpus(dir.path(), 10, 4)?;
        let r = verify(dir.path())?;
        assert!(r.is_complete(), "{r}");
        assert_eq!(r.ok_shards, 3);
        assert!(r.to_string().contains(": OK\n"), "{r}");

        // Flip one byte in the middle of shard 1.
        let p = dir.path().join(shard_file_name(1));
        let mut bytes = fs::read(&p)?;
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        fs::write(&p, &bytes)?;
        // Remove shard 2, add a stray file.
        fs::remove_file(dir.path().join(shard_file_name(2)))?;
        fs::write(dir.path().join("stray.txt"), b"x")?;

        let r = verify(dir.path())?;
        assert!(!r.is_ok());
        assert_eq!(r.ok_shards, 1);
        assert_eq!(r.problems.len(), 2);
        assert_eq!(r.problems[0].index, 1);
        assert!(matches!(
            r.problems[0].problem,
            Problem::HashMismatch { .. }
        ));
        assert_eq!(r.problems[1].problem, Problem::Missing);
        assert_eq!(r.unlisted, vec!["stray.txt".to_string()]);
        let text = r.to_string();
        assert!(text.contains("FAILED"), "{text}");
        assert!(
            text.contains("shard 1 (shard-00001.parquet): sha256 is"),
            "{text}"
        );
        assert!(
            text.contains("shard 2 (shard-00002.parquet): file missing"),
            "{text}"
        );
        assert!(text.contains("stray.txt"), "{text}");

        // Size mismatch.
        bytes.push(0);
        fs::write(&p, &bytes)?;
        let r = verify(dir.path())?;
        assert!(matches!(
            r.problems[0].problem,
            Problem::SizeMismatch { .. }
        ));
        Ok(())
    }

    #[test]
    fn verify_reports_pending() -> Result<()> {
        let dir = TestDir::new("ops-pending")?;
        let mut m = make_corpus(dir.path(), 20, 4)?;
        m.shards.remove(&1);
        m.shards.remove(&2);
        m.shards.remove(&4);
        m.save(dir.path())?;
        let r = verify(dir.path())?;
        assert!(r.is_ok() && !r.is_complete());
        assert_eq!(r.pending, vec![1, 2, 4]);
        let text = r.to_string();
        assert!(
            text.contains("OK (incomplete)") && text.contains("1-2, 4"),
            "{text}"
        );
        Ok(())
    }

    #[test]
    fn merge_halves_equals_full() -> Result<()> {
        let full = TestDir::new("ops-full")?;
        let a = TestDir::new("ops-half-a")?;
        let b = TestDir::new("ops-half-b")?;
        let out = TestDir::new("ops-merged")?;
        let full_m = make_corpus(full.path(), 10, 3)?; // 4 shards, last one 1 row

        // Each half generated shards on its own (same deterministic content).
        for (dir, keep) in [(&a, [0usize, 1]), (&b, [2, 3])] {
            let m = make_corpus(dir.path(), 10, 3)?;
            let mut half = m.clone();
            half.shards.retain(|i, _| keep.contains(i));
            for (i, e) in &m.shards {
                if !keep.contains(i) {
                    fs::remove_file(dir.path().join(&e.file))?;
                }
            }
            half.save(dir.path())?;
        }
        // Different teacher path: informational only.
        let mut mb = CorpusManifest::load(b.path())?;
        mb.teacher.path = "/other/machine/teacher".into();
        mb.save(b.path())?;

        let out_dir = out.path().join("merged");
        let merged = merge(&[a.path().to_path_buf(), b.path().to_path_buf()], &out_dir)?;
        assert_eq!(merged, full_m);
        assert_eq!(CorpusManifest::load(&out_dir)?, full_m);
        assert!(verify(&out_dir)?.is_complete());
        for e in full_m.shards.values() {
            assert_eq!(
                fs::read(out_dir.join(&e.file))?,
                fs::read(full.path().join(&e.file))?
            );
        }

        // Merging into one of the inputs, twice (idempotent).
        for _ in 0..2 {
            let m = merge(&[a.path().to_path_buf(), b.path().to_path_buf()], a.path())?;
            assert_eq!(m, full_m);
            assert!(verify(a.path())?.is_complete());
        }
        Ok(())
    }

    #[test]
    fn merge_refuses_differences() -> Result<()> {
        let a = TestDir::new("ops-diff-a")?;
        let b = TestDir::new("ops-diff-b")?;
        let out = TestDir::new("ops-diff-out")?;
        make_corpus(a.path(), 10, 4)?;
        let mut mb = make_corpus(b.path(), 10, 4)?;
        mb.settings["temperature"] = serde_json::json!(0.7);
        mb.save(b.path())?;
        let dirs = [a.path().to_path_buf(), b.path().to_path_buf()];
        let msg = merge(&dirs, &out.path().join("m")).unwrap_err().to_string();
        assert!(
            msg.contains("settings.temperature = 1.0")
                && msg.contains("settings.temperature = 0.7")
                && msg.contains(&a.path().display().to_string())
                && msg.contains(&b.path().display().to_string()),
            "{msg}"
        );

        // Same settings, but shard 0 has different content.
        mb.settings["temperature"] = serde_json::json!(1.0);
        let other: Vec<Sample> = make_samples(100, 4, false)
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                s.sample_id = i as u64;
                s
            })
            .collect();
        let e = write_shard(&b.path().join(shard_file_name(0)), &other, false)?;
        mb.shards.insert(0, e);
        mb.save(b.path())?;
        let msg = merge(&dirs, &out.path().join("m")).unwrap_err().to_string();
        assert!(msg.contains("shard 0 differs between"), "{msg}");

        // An existing corpus as output that is not an input.
        let msg = merge(&dirs[..1], b.path()).unwrap_err().to_string();
        assert!(msg.contains("already holds a corpus"), "{msg}");
        Ok(())
    }

    #[test]
    fn stats_on_known_corpus() -> Result<()> {
        let dir = TestDir::new("ops-stats")?;
        let s = |id: u64, tokens: Vec<u32>, g: u8, finish: Finish| Sample {
            sample_id: id,
            tokens,
            greedy_prefix: g,
            finish,
            text: None,
        };
        let mut m = make_manifest(5, 3);
        let shard0 = vec![
            s(0, vec![1, 2, 3], 3, Finish::Eos),
            s(1, vec![1, 1, 1, 1, 5, 6, 7, 8, 9, 10], 4, Finish::Length),
            s(2, vec![], 3, Finish::Eos),
        ];
        let shard1 = vec![
            s(3, vec![99, 2], 5, Finish::Eos),
            s(4, vec![150, 3, 3, 3, 3], 3, Finish::Length),
        ];
        m.shards.insert(
            0,
            write_shard(&dir.path().join(shard_file_name(0)), &shard0, false)?,
        );
        m.shards.insert(
            1,
            write_shard(&dir.path().join(shard_file_name(1)), &shard1, false)?,
        );
        m.save(dir.path())?;

        let st = stats(dir.path())?;
        assert_eq!((st.shards, st.shards_expected), (2, 2));
        assert_eq!(st.samples, 5);
        assert_eq!(st.tokens, 20);
        assert_eq!(st.mean_len, 4.0);
        assert_eq!((st.min_len, st.max_len), (0, 10));
        // 0..=10 in 16 buckets -> width 1, 11 buckets.
        assert_eq!(st.length_histogram.len(), 11);
        let counts: Vec<u64> = st.length_histogram.iter().map(|b| b.count).collect();
        assert_eq!(counts, vec![1, 0, 1, 1, 0, 1, 0, 0, 0, 0, 1]);
        assert_eq!(st.finish["eos"], 3);
        assert_eq!(st.finish["length"], 2);
        // Distinct in-vocab ids: 1,2,3,5,6,7,8,9,10,99 = 10 of 100; 150 is out of vocab.
        assert_eq!(st.distinct_tokens, 10);
        assert_eq!(st.distinct_token_share, 0.1);
        assert_eq!(st.out_of_vocab_tokens, 1);
        assert_eq!(st.greedy_prefix, BTreeMap::from([(3, 3), (4, 1), (5, 1)]));

        let text = st.to_string();
        assert!(text.contains("samples:  5"), "{text}");
        assert!(text.contains("mean 4.0, min 0, max 10"), "{text}");
        assert!(text.contains("eos 3 (60.0%)"), "{text}");
        assert!(
            text.contains("distinct tokens: 10 of 100 (10.0%)"),
            "{text}"
        );
        let json = serde_json::to_value(&st)?;
        assert_eq!(json["samples"], 5);
        assert_eq!(json["greedy_prefix"]["4"], 1);
        Ok(())
    }

    #[test]
    fn histogram_wide_lengths() -> Result<()> {
        let dir = TestDir::new("ops-hist")?;
        let mut m = make_manifest(3, 3);
        let samples: Vec<Sample> = [0usize, 100, 1000]
            .iter()
            .enumerate()
            .map(|(i, &len)| Sample {
                sample_id: i as u64,
                tokens: vec![1; len],
                greedy_prefix: 3,
                finish: Finish::Length,
                text: None,
            })
            .collect();
        m.shards.insert(
            0,
            write_shard(&dir.path().join(shard_file_name(0)), &samples, false)?,
        );
        m.save(dir.path())?;
        let st = stats(dir.path())?;
        let h = &st.length_histogram;
        assert_eq!(h.len(), 16);
        assert_eq!((h[0].lo, h[0].hi), (0, 62));
        assert_eq!(h[15].hi, 1000);
        assert_eq!(h.iter().map(|b| b.count).sum::<u64>(), 3);
        assert_eq!(h[100 / 63].count, 1);
        assert_eq!(h[15].count, 1);
        Ok(())
    }

    #[test]
    fn compact_ranges_formats() {
        assert_eq!(compact_ranges(&[0, 1, 2, 5, 7, 8]), "0-2, 5, 7-8");
        assert_eq!(compact_ranges(&[]), "");
    }
}
