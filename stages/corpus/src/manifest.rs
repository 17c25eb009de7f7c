//! The corpus manifest, `manifest.json` in the corpus folder.
//!
//! It says what the corpus is (teacher, sampling settings, seed, size) and which
//! shards are done. Generation writes a shard, then rewrites the manifest with
//! the new entry (atomically), so after a crash the manifest lists exactly the
//! shards that are complete and generation resumes at the first missing one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fsio;
use crate::shard::ShardEntry;

/// The manifest's file name inside the corpus folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The manifest format this crate reads and writes.
pub const FORMAT: u32 = 1;

/// The teacher model the corpus was generated with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherInfo {
    /// Where the teacher was loaded from: a folder, or a hub id `org/name[@revision]`
    /// (informational; not compared).
    pub path: String,
    pub weights_sha256: String,
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    /// The hub repo id, for a teacher resolved from the Hugging Face hub (informational like
    /// `path`: the hashes above decide whether two corpora match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_repo: Option<String>,
    /// The commit the hub revision resolved to (40 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_commit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorpusManifest {
    /// Always `FORMAT` (1).
    pub format: u32,
    pub teacher: TeacherInfo,
    /// The sampling settings; opaque here, compared key by key.
    pub settings: Value,
    pub seed: u64,
    /// Total number of samples requested.
    pub samples: u64,
    /// Samples per shard; shard k holds samples [k*S, min((k+1)*S, samples)).
    pub shard_size: u64,
    /// Finished shards, by shard index.
    pub shards: BTreeMap<usize, ShardEntry>,
}

/// The first setting in which two manifests differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// E.g. `settings.temperature`, `seed`, `teacher.weights_sha256`.
    pub key: String,
    /// The value in `self` (rendered as JSON; `(unset)` when absent).
    pub ours: String,
    /// The value in `other`.
    pub theirs: String,
}

impl CorpusManifest {
    /// A manifest with no shards yet.
    pub fn new(
        teacher: TeacherInfo,
        settings: Value,
        seed: u64,
        samples: u64,
        shard_size: u64,
    ) -> Self {
        CorpusManifest {
            format: FORMAT,
            teacher,
            settings,
            seed,
            samples,
            shard_size,
            shards: BTreeMap::new(),
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Does `dir` hold a manifest?
    pub fn exists(dir: &Path) -> bool {
        Self::path(dir).is_file()
    }

    /// Reads and checks `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<CorpusManifest> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading corpus manifest {}", path.display()))?;
        let m: CorpusManifest = serde_json::from_str(&text)
            .with_context(|| format!("parsing corpus manifest {}", path.display()))?;
        m.validate()
            .with_context(|| format!("corpus manifest {}", path.display()))?;
        Ok(m)
    }

    /// Writes `dir/manifest.json` atomically (pretty JSON, trailing newline).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.validate()
            .with_context(|| format!("refusing to save manifest in {}", dir.display()))?;
        let mut text =
            serde_json::to_string_pretty(self).context("serialising the corpus manifest")?;
        text.push('\n');
        fsio::write_atomic(&Self::path(dir), text.as_bytes())
    }

    /// Internal consistency: format, shard size, entries within range.
    pub fn validate(&self) -> Result<()> {
        if self.format != FORMAT {
            bail!(
                "format is {}, this program reads format {FORMAT}",
                self.format
            );
        }
        if self.shard_size == 0 {
            bail!("shard_size is 0");
        }
        let n = self.num_shards();
        for (&index, entry) in &self.shards {
            if index >= n {
                bail!(
                    "lists shard {index}, but {} samples in shards of {} make only {n} shards",
                    self.samples,
                    self.shard_size
                );
            }
            fsio::check_plain_file_name(&entry.file)
                .with_context(|| format!("shard {index}: field `file`"))?;
        }
        Ok(())
    }

    /// How many shards the complete corpus has.
    pub fn num_shards(&self) -> usize {
        if self.shard_size == 0 {
            return 0;
        }
        self.samples.div_ceil(self.shard_size) as usize
    }

    /// The first sample id of shard `index`.
    pub fn first_sample(&self, index: usize) -> u64 {
        index as u64 * self.shard_size
    }

    /// Rows shard `index` must hold (the last shard may be shorter; 0 past the end).
    pub fn expected_rows(&self, index: usize) -> u64 {
        let start = self.first_sample(index);
        if start >= self.samples {
            return 0;
        }
        self.shard_size.min(self.samples - start)
    }

    /// Shard indices not yet listed as done, in order.
    pub fn missing_shards(&self) -> Vec<usize> {
        (0..self.num_shards())
            .filter(|i| !self.shards.contains_key(i))
            .collect()
    }

    /// Are all shards present with the expected row counts?
    pub fn is_complete(&self) -> bool {
        (0..self.num_shards()).all(|i| {
            self.shards
                .get(&i)
                .is_some_and(|e| e.rows == self.expected_rows(i))
        })
    }

    /// Total rows and tokens over the listed shards.
    pub fn totals(&self) -> (u64, u64) {
        self.shards
            .values()
            .fold((0, 0), |(r, t), e| (r + e.rows, t + e.tokens))
    }

    /// The first setting (in a fixed order) in which `self` and `other` differ,
    /// shards and the teacher's path aside. `None` when they describe the same corpus.
    pub fn first_difference(&self, other: &CorpusManifest) -> Option<Difference> {
        fn diff<T: PartialEq + Serialize>(key: &str, a: &T, b: &T) -> Option<Difference> {
            (a != b).then(|| Difference {
                key: key.to_string(),
                ours: render(a),
                theirs: render(b),
            })
        }
        diff("format", &self.format, &other.format)
            .or_else(|| {
                diff(
                    "teacher.weights_sha256",
                    &self.teacher.weights_sha256,
                    &other.teacher.weights_sha256,
                )
            })
            .or_else(|| {
                diff(
                    "teacher.tokenizer_sha256",
                    &self.teacher.tokenizer_sha256,
                    &other.teacher.tokenizer_sha256,
                )
            })
            .or_else(|| {
                diff(
                    "teacher.vocab_size",
                    &self.teacher.vocab_size,
                    &other.teacher.vocab_size,
                )
            })
            .or_else(|| value_difference("settings", &self.settings, &other.settings))
            .or_else(|| diff("seed", &self.seed, &other.seed))
            .or_else(|| diff("samples", &self.samples, &other.samples))
            .or_else(|| diff("shard_size", &self.shard_size, &other.shard_size))
    }

    /// Ok when `other` (what a run asks for) describes the same corpus as
    /// `self` (what is on disk); else an error naming the first difference.
    pub fn compatible_with(&self, other: &CorpusManifest) -> Result<()> {
        match self.first_difference(other) {
            None => Ok(()),
            Some(d) => bail!(
                "corpus was made with {} = {}, this run asks for {}",
                d.key,
                d.ours,
                d.theirs
            ),
        }
    }

    /// For resuming: loads the manifest in `dir` if there is one and checks it
    /// against `wanted`. Returns `None` for a fresh folder.
    pub fn load_compatible(dir: &Path, wanted: &CorpusManifest) -> Result<Option<CorpusManifest>> {
        if !Self::exists(dir) {
            return Ok(None);
        }
        let on_disk = Self::load(dir)?;
        if let Some(d) = on_disk.first_difference(wanted) {
            bail!(
                "corpus at {} was made with {} = {}, this run asks for {} \
                 (use another folder, or delete it to regenerate)",
                dir.display(),
                d.key,
                d.ours,
                d.theirs
            );
        }
        Ok(Some(on_disk))
    }
}

fn render<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "?".to_string())
}

/// First difference between two JSON values, recursing into objects so the
/// message names the exact key (`settings.top_k`), keys in sorted order.
fn value_difference(key: &str, a: &Value, b: &Value) -> Option<Difference> {
    match (a, b) {
        (Value::Object(ma), Value::Object(mb)) => {
            let keys: std::collections::BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
            keys.into_iter().find_map(|k| {
                let sub = format!("{key}.{k}");
                match (ma.get(k), mb.get(k)) {
                    (Some(x), Some(y)) => value_difference(&sub, x, y),
                    (x, y) => Some(Difference {
                        key: sub,
                        ours: x.map_or("(unset)".to_string(), render),
                        theirs: y.map_or("(unset)".to_string(), render),
                    }),
                }
            })
        }
        _ => (a != b).then(|| Difference {
            key: key.to_string(),
            ours: render(a),
            theirs: render(b),
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::TestDir;
    use serde_json::json;

    pub(crate) fn make_manifest(samples: u64, shard_size: u64) -> CorpusManifest {
        CorpusManifest::new(
            TeacherInfo {
                path: "/models/teacher".into(),
                weights_sha256: "ab".repeat(32),
                tokenizer_sha256: "cd".repeat(32),
                vocab_size: 100,
                hub_repo: None,
                hub_commit: None,
            },
            json!({"temperature": 1.0, "top_k": null, "greedy": [3, 5], "first_token": "random"}),
            7,
            samples,
            shard_size,
        )
    }

    #[test]
    fn save_load_round_trip() -> Result<()> {
        let dir = TestDir::new("manifest-rt")?;
        let mut m = make_manifest(10, 4);
        m.shards.insert(
            1,
            ShardEntry {
                file: "shard-00001.parquet".into(),
                rows: 4,
                tokens: 40,
                bytes: 1234,
                sha256: "00".repeat(32),
                first_sample: 4,
            },
        );
        m.save(dir.path())?;
        let back = CorpusManifest::load(dir.path())?;
        assert_eq!(back, m);
        let text = std::fs::read_to_string(dir.path().join(MANIFEST_FILE))?;
        assert!(
            text.contains("\n  \"teacher\": {"),
            "pretty JSON expected:\n{text}"
        );
        Ok(())
    }

    #[test]
    fn hub_fields_are_optional_and_informational() -> Result<()> {
        let dir = TestDir::new("manifest-hub")?;
        // A local teacher writes no hub fields, so manifests from before they existed match.
        let local = make_manifest(10, 4);
        local.save(dir.path())?;
        let text = std::fs::read_to_string(dir.path().join(MANIFEST_FILE))?;
        assert!(!text.contains("hub_"), "{text}");
        let mut v: Value = serde_json::from_str(&text)?;
        assert_eq!(v["teacher"].as_object().map(|o| o.len()), Some(4), "{text}");
        assert_eq!(CorpusManifest::load(dir.path())?, local);

        let mut hub = local.clone();
        hub.teacher.path = "org/name@main".into();
        hub.teacher.hub_repo = Some("org/name".into());
        hub.teacher.hub_commit = Some("0123456789abcdef0123456789abcdef01234567".into());
        hub.save(dir.path())?;
        v = serde_json::from_str(&std::fs::read_to_string(dir.path().join(MANIFEST_FILE))?)?;
        assert_eq!(v["teacher"]["hub_repo"], "org/name");
        assert_eq!(
            v["teacher"]["hub_commit"],
            "0123456789abcdef0123456789abcdef01234567"
        );
        assert_eq!(CorpusManifest::load(dir.path())?, hub);
        // Same weights and tokenizer: the same corpus, wherever the teacher was loaded from.
        assert!(local.compatible_with(&hub).is_ok());
        Ok(())
    }

    #[test]
    fn load_errors_name_the_file() -> Result<()> {
        let dir = TestDir::new("manifest-bad")?;
        let msg = format!("{:#}", CorpusManifest::load(dir.path()).unwrap_err());
        assert!(msg.contains("manifest.json"), "{msg}");
        std::fs::write(dir.path().join(MANIFEST_FILE), "{\"format\": 1")?;
        let msg = format!("{:#}", CorpusManifest::load(dir.path()).unwrap_err());
        assert!(
            msg.contains("parsing corpus manifest") && msg.contains("manifest.json"),
            "{msg}"
        );
        let mut m = make_manifest(10, 4);
        m.format = 2;
        std::fs::write(dir.path().join(MANIFEST_FILE), serde_json::to_string(&m)?)?;
        let msg = format!("{:#}", CorpusManifest::load(dir.path()).unwrap_err());
        assert!(msg.contains("format is 2"), "{msg}");
        Ok(())
    }

    #[test]
    fn shard_arithmetic() {
        let mut m = make_manifest(10, 4);
        assert_eq!(m.num_shards(), 3);
        assert_eq!(
            (0..4).map(|i| m.expected_rows(i)).collect::<Vec<_>>(),
            vec![4, 4, 2, 0]
        );
        assert_eq!(m.missing_shards(), vec![0, 1, 2]);
        assert!(!m.is_complete());
        for i in 0..3 {
            m.shards.insert(
                i,
                ShardEntry {
                    file: crate::shard::shard_file_name(i),
                    rows: m.expected_rows(i),
                    tokens: 0,
                    bytes: 0,
                    sha256: String::new(),
                    first_sample: m.first_sample(i),
                },
            );
        }
        assert!(m.is_complete());
        if let Some(e) = m.shards.get_mut(&2) {
            e.rows = 1;
        }
        assert!(!m.is_complete());
        assert_eq!(make_manifest(12, 4).num_shards(), 3);
        assert_eq!(make_manifest(0, 4).num_shards(), 0);
        assert!(make_manifest(0, 4).is_complete());
    }

    #[test]
    fn compatible_with_names_first_difference() {
        let base = make_manifest(10, 4);
        let mut same = base.clone();
        same.teacher.path = "/elsewhere".into(); // the path alone does not matter
        same.shards.insert(
            0,
            ShardEntry {
                file: "x".into(),
                rows: 1,
                tokens: 1,
                bytes: 1,
                sha256: String::new(),
                first_sample: 0,
            },
        );
        assert!(base.compatible_with(&same).is_ok());

        let mut t = base.clone();
        t.settings["temperature"] = json!(0.8);
        let msg = base.compatible_with(&t).unwrap_err().to_string();
        assert_eq!(
            msg,
            "corpus was made with settings.temperature = 1.0, this run asks for 0.8"
        );

        let mut k = base.clone();
        if let Some(o) = k.settings.as_object_mut() {
            o.remove("top_k");
        }
        k.settings["top_p"] = json!(0.9);
        let d = base.first_difference(&k).expect("differs");
        assert_eq!(
            (d.key.as_str(), d.ours.as_str(), d.theirs.as_str()),
            ("settings.top_k", "null", "(unset)")
        );

        let mut s = base.clone();
        s.seed = 8;
        assert!(base
            .compatible_with(&s)
            .unwrap_err()
            .to_string()
            .contains("seed = 7"));
        let mut w = base.clone();
        w.teacher.weights_sha256 = "ef".repeat(32);
        assert!(base
            .compatible_with(&w)
            .unwrap_err()
            .to_string()
            .contains("teacher.weights_sha256"));
        let mut tk = base.clone();
        tk.teacher.tokenizer_sha256 = "ef".repeat(32);
        assert!(base
            .first_difference(&tk)
            .is_some_and(|d| d.key == "teacher.tokenizer_sha256"));
        let mut n = base.clone();
        n.samples = 11;
        assert!(base
            .first_difference(&n)
            .is_some_and(|d| d.key == "samples"));
        let mut z = base.clone();
        z.shard_size = 5;
        assert!(base
            .first_difference(&z)
            .is_some_and(|d| d.key == "shard_size"));
    }

    #[test]
    fn load_compatible_names_dir() -> Result<()> {
        let dir = TestDir::new("manifest-compat")?;
        let m = make_manifest(10, 4);
        assert!(CorpusManifest::load_compatible(dir.path(), &m)?.is_none());
        m.save(dir.path())?;
        assert!(CorpusManifest::load_compatible(dir.path(), &m)?.is_some());
        let mut other = m.clone();
        other.settings["temperature"] = json!(0.8);
        let msg = CorpusManifest::load_compatible(dir.path(), &other)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(&format!(
                "corpus at {} was made with settings.temperature = 1.0, this run asks for 0.8",
                dir.path().display()
            )),
            "{msg}"
        );
        Ok(())
    }

    #[test]
    fn validate_rejects_bad_entries() {
        let mut m = make_manifest(10, 4);
        m.shards.insert(
            3,
            ShardEntry {
                file: "shard-00003.parquet".into(),
                rows: 0,
                tokens: 0,
                bytes: 0,
                sha256: String::new(),
                first_sample: 12,
            },
        );
        assert!(m.validate().unwrap_err().to_string().contains("shard 3"));
        let mut m = make_manifest(10, 4);
        m.shards.insert(
            0,
            ShardEntry {
                file: "../escape".into(),
                rows: 4,
                tokens: 0,
                bytes: 0,
                sha256: String::new(),
                first_sample: 0,
            },
        );
        assert!(format!("{:#}", m.validate().unwrap_err()).contains("field `file`"));
        let mut m = make_manifest(10, 4);
        m.shard_size = 0;
        assert!(m.validate().is_err());
    }
}
