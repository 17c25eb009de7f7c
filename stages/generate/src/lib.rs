//! The generate stage: the teacher writes its own training corpus. Decoding workers run
//! batches with continuous batching over per-sequence KV caches and send finished samples
//! through a bounded channel to the shard writer, which writes Parquet shards and updates the
//! corpus manifest after each one. Reruns keep every verified shard and make only the rest.

pub mod sampler;
mod worker;

use anyhow::{bail, Result};
use corpus::{fsio, CorpusManifest, Sample, TeacherInfo};
use model::{Compute, Llama, ModelFolder, QuantConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

/// How the first token of a sample is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirstToken {
    /// Uniform over the vocabulary minus special tokens.
    #[default]
    Random,
    /// Sample i starts with the i-th non-special token (cycling).
    Sweep,
}

impl std::str::FromStr for FirstToken {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(FirstToken::Random),
            "sweep" => Ok(FirstToken::Sweep),
            o => bail!("first_token = {o:?}: allowed values are \"random\" and \"sweep\""),
        }
    }
}

/// Inclusive range of greedy-prefix lengths, counting the first token; written `3..5`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixRange {
    pub min: u8,
    pub max: u8,
}

impl std::str::FromStr for PrefixRange {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let parse = |x: &str| {
            x.trim().parse::<u8>().map_err(|_| {
                anyhow::anyhow!(
                    "greedy_prefix = {s:?}: expected N or MIN..MAX with 1 <= MIN <= MAX <= 255"
                )
            })
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (parse(a)?, parse(b.trim_start_matches('='))?),
            None => (parse(s)?, parse(s)?),
        };
        if min == 0 || min > max {
            bail!("greedy_prefix = {s:?}: expected 1 <= MIN <= MAX (e.g. \"3..5\")");
        }
        Ok(PrefixRange { min, max })
    }
}

impl std::fmt::Display for PrefixRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.min, self.max)
    }
}

impl Serialize for PrefixRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PrefixRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn default_shard_size() -> u64 {
    1024
}
fn default_batch() -> usize {
    32
}
fn default_temperature() -> f64 {
    1.0
}
fn default_prefix() -> PrefixRange {
    PrefixRange { min: 3, max: 5 }
}
fn default_workers() -> usize {
    1
}

/// The `[generate]` table of a pipeline file, and the flags of `pipeline generate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    pub samples: u64,
    pub max_tokens: usize,
    #[serde(default = "default_shard_size")]
    pub shard_size: u64,
    #[serde(default = "default_batch")]
    pub batch: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default = "default_prefix")]
    pub greedy_prefix: PrefixRange,
    #[serde(default)]
    pub first_token: FirstToken,
    /// Also store the decoded text of each sample.
    #[serde(default)]
    pub text: bool,
    /// Decoding threads; the corpus does not depend on it.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// On a GPU, replay each decoding step as one CUDA graph (much faster at small batches).
    #[serde(default)]
    pub cuda_graph: bool,
}

impl GenerateConfig {
    pub fn validate(&self) -> Result<()> {
        if self.samples == 0 {
            bail!("generate.samples = 0: must be at least 1");
        }
        if self.max_tokens == 0 {
            bail!("generate.max_tokens = 0: must be at least 1");
        }
        if self.shard_size == 0 {
            bail!("generate.shard_size = 0: must be at least 1");
        }
        if self.batch == 0 {
            bail!("generate.batch = 0: must be at least 1");
        }
        if self.workers == 0 {
            bail!("generate.workers = 0: must be at least 1");
        }
        if self.cuda_graph && self.workers > 1 {
            bail!(
                "generate.cuda_graph = true needs generate.workers = 1 (a graph is captured on the GPU's one stream), got {}",
                self.workers
            );
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "generate.temperature = {}: must be a finite number >= 0",
                self.temperature
            );
        }
        if self.top_k == Some(0) {
            bail!("generate.top_k = 0: must be at least 1 (or absent)");
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("generate.top_p = {p}: allowed values are 0 < top_p <= 1");
            }
        }
        Ok(())
    }

    /// The settings that decide the corpus bytes (batch and workers do not).
    pub fn content_settings(&self) -> serde_json::Value {
        serde_json::json!({
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "greedy_prefix": self.greedy_prefix.to_string(),
            "first_token": self.first_token,
            "text": self.text,
        })
    }

    pub fn num_shards(&self) -> usize {
        self.samples.div_ceil(self.shard_size) as usize
    }
}

/// Slice `k` of `n` contiguous, balanced slices of `range` (sizes differ by at most one).
pub fn shard_slice(range: std::ops::Range<usize>, k: usize, n: usize) -> std::ops::Range<usize> {
    let len = range.end - range.start;
    range.start + len * k / n..range.start + len * (k + 1) / n
}

/// Which of the variables a job array sets holds this job's index, in the order they are read.
pub const JOB_INDEX_VARS: [&str; 2] = ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"];

/// `--shard-of K/N`: this invocation makes slice K (0-based) of N of the corpus's shards.
/// `env/N` takes K from the job array's index (`JOB_INDEX_VARS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardOf {
    /// `None`: read from the environment.
    pub k: Option<usize>,
    pub n: usize,
}

impl std::str::FromStr for ShardOf {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || anyhow::anyhow!("--shard-of {s:?}: expected K/N (e.g. 0/8) or env/N");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let n: usize = n.trim().parse().map_err(|_| bad())?;
        let k = match k.trim() {
            "env" => None,
            k => Some(k.parse().map_err(|_| bad())?),
        };
        if n == 0 {
            bail!("--shard-of {s:?}: N must be at least 1");
        }
        Ok(ShardOf { k, n })
    }
}

impl ShardOf {
    /// The shards this slice makes out of `num_shards`; `var` looks up an environment variable
    /// (a parameter so tests need not set the process's environment).
    pub fn range(
        &self,
        num_shards: usize,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<std::ops::Range<usize>> {
        let n = self.n;
        let k = match self.k {
            Some(k) => k,
            None => {
                let found = JOB_INDEX_VARS
                    .iter()
                    .find_map(|&name| var(name).map(|v| (name, v)));
                let Some((name, v)) = found else {
                    bail!(
                        "--shard-of env/{n}: neither {} nor {} is set (they hold a Slurm array task's or a Kubernetes Indexed Job's index); give K/{n} instead",
                        JOB_INDEX_VARS[0],
                        JOB_INDEX_VARS[1]
                    );
                };
                v.trim().parse().map_err(|_| {
                    anyhow::anyhow!(
                        "--shard-of env/{n}: {name} = {v:?} is not a job index (0, 1, ...)"
                    )
                })?
            }
        };
        if k >= n {
            bail!("--shard-of {k}/{n}: K must be below N (K counts from 0)");
        }
        if n > num_shards {
            bail!(
                "--shard-of {k}/{n}: the settings give only {num_shards} shard(s) (samples / shard_size, rounded up), so N must be at most {num_shards}"
            );
        }
        Ok(shard_slice(0..num_shards, k, n))
    }
}

/// Progress events for the caller's progress bar / log.
pub enum Event<'a> {
    Start {
        samples_to_make: u64,
        shards_kept: usize,
    },
    Sample {
        tokens: usize,
    },
    ShardWritten {
        index: usize,
    },
    Note(&'a str),
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateReport {
    pub out: PathBuf,
    pub shards_kept: usize,
    pub shards_written: usize,
    pub samples_made: u64,
    pub tokens_made: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Of `seconds`, the time spent loading the teacher (once per device); the rest is
    /// decoding and writing shards. Benchmarks compare the rest with peers that time
    /// generation alone.
    pub load_seconds: f64,
    pub complete: bool,
}

/// Token ids a sample may start with: everything the tokenizer knows that is not special.
pub fn first_token_candidates(tok: &tokenizers::Tokenizer, model: &Llama) -> Vec<u32> {
    let n = tok.get_vocab_size(true).min(model.cfg.vocab_size) as u32;
    let mut special: Vec<u32> = tok
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(&id, _)| id)
        .collect();
    special.extend(model.cfg.bos_token_id);
    special.extend(model.cfg.eos_token_ids.iter().copied());
    (0..n).filter(|i| !special.contains(i)).collect()
}

/// Makes the corpus in `out` (or the shards in `shard_range` of it), resuming what is there.
pub fn generate(
    teacher_dir: &Path,
    out: &Path,
    cfg: &GenerateConfig,
    shard_range: Option<std::ops::Range<usize>>,
    force: bool,
    on_event: impl FnMut(Event),
) -> Result<GenerateReport> {
    generate_on(
        &Compute::cpu(),
        teacher_dir,
        out,
        cfg,
        shard_range,
        force,
        on_event,
    )
}

/// `generate` with the teacher on a chosen device and dtype. Only f32 on the CPU gives a
/// corpus that is byte-identical across machines; elsewhere the tokens can differ where two
/// logits are nearly tied.
pub fn generate_on(
    compute: &Compute,
    teacher_dir: &Path,
    out: &Path,
    cfg: &GenerateConfig,
    shard_range: Option<std::ops::Range<usize>>,
    force: bool,
    on_event: impl FnMut(Event),
) -> Result<GenerateReport> {
    generate_on_devices(
        std::slice::from_ref(compute),
        teacher_dir,
        out,
        cfg,
        shard_range,
        force,
        on_event,
    )
}

/// `generate_on` with one teacher per device: each takes a contiguous slice of the shards
/// still to make, and one writer writes every shard and the manifest. A sample depends only
/// on (seed, sample id), so the corpus is the same for any number of devices.
pub fn generate_on_devices(
    computes: &[Compute],
    teacher_dir: &Path,
    out: &Path,
    cfg: &GenerateConfig,
    shard_range: Option<std::ops::Range<usize>>,
    force: bool,
    mut on_event: impl FnMut(Event),
) -> Result<GenerateReport> {
    cfg.validate()?;
    if computes.is_empty() {
        bail!("--devices is empty: name at least one device");
    }
    if cfg.cuda_graph && computes.iter().any(|c| c.device.is_cpu()) {
        bail!("generate.cuda_graph = true needs a CUDA device, but the device is cpu");
    }
    let folder = ModelFolder::open(teacher_dir)?;
    let tokenizer = folder.tokenizer()?;
    if cfg.max_tokens > folder.config.usable_context() {
        bail!(
            "generate.max_tokens = {} is above the teacher's context ({}: {} in {})",
            cfg.max_tokens,
            folder.config.usable_context(),
            folder.config.context_limit(),
            folder.dir.join("config.json").display()
        );
    }
    let fp = folder.fingerprint()?;
    let teacher = TeacherInfo {
        path: teacher_dir.display().to_string(),
        weights_sha256: fp.weights_sha256,
        tokenizer_sha256: fp.tokenizer_sha256,
        vocab_size: folder.config.vocab_size,
        hub_repo: fp.hub_repo,
        hub_commit: fp.hub_commit,
    };
    let wanted = CorpusManifest::new(
        teacher,
        cfg.content_settings(),
        cfg.seed,
        cfg.samples,
        cfg.shard_size,
    );
    let nshards = wanted.num_shards();
    let range = shard_range.unwrap_or(0..nshards);
    if range.start >= range.end || range.end > nshards {
        bail!(
            "--shards {}..{}: the corpus has shards 0..{nshards}",
            range.start,
            range.end
        );
    }

    corpus::fsio::create_out_dir(out)?;
    let mut manifest = if CorpusManifest::exists(out) {
        let existing = CorpusManifest::load(out)?;
        match existing.compatible_with(&wanted) {
            Ok(()) => existing,
            Err(e) if force => {
                on_event(Event::Note(&format!("--force: discarding the existing corpus in {} ({e:#})", out.display())));
                for entry in existing.shards.values() {
                    let _ = std::fs::remove_file(out.join(&entry.file));
                }
                wanted.clone()
            }
            Err(e) => {
                return Err(e.context(format!(
                    "{} already holds a corpus with other settings; use another --out, or --force to replace it",
                    out.display()
                )))
            }
        }
    } else {
        wanted.clone()
    };
    for p in fsio::remove_temp_files(out)? {
        on_event(Event::Note(&format!(
            "removed partial file {}",
            p.display()
        )));
    }
    // Keep shards whose file still matches the manifest; anything else is made again.
    let mut kept = 0;
    let listed: Vec<usize> = manifest.shards.keys().copied().collect();
    for idx in listed {
        let entry = manifest.shards[&idx].clone();
        let path = out.join(&entry.file);
        let ok = match std::fs::metadata(&path) {
            Ok(m) if m.len() == entry.bytes => fsio::sha256_file(&path)? == entry.sha256,
            _ => false,
        };
        if ok {
            if range.contains(&idx) {
                kept += 1;
            }
        } else {
            on_event(Event::Note(&format!(
                "shard {idx} ({}) is missing or corrupt: regenerating it",
                path.display()
            )));
            manifest.shards.remove(&idx);
        }
    }
    manifest.save(out)?;

    let todo: Vec<usize> = range
        .clone()
        .filter(|i| !manifest.shards.contains_key(i))
        .collect();
    let samples_of = |shards: &[usize]| -> Vec<u64> {
        shards
            .iter()
            .flat_map(|&s| {
                let first = manifest.first_sample(s);
                first..first + manifest.expected_rows(s)
            })
            .collect()
    };
    on_event(Event::Start {
        samples_to_make: samples_of(&todo).len() as u64,
        shards_kept: kept,
    });

    let t0 = Instant::now();
    let mut load_seconds = 0.0;
    let mut tokens_made = 0u64;
    let mut samples_made = 0u64;
    let mut written = 0usize;
    if !todo.is_empty() {
        let (tx, rx) = crossbeam_channel::bounded::<Result<Sample>>(
            cfg.batch * 2 * cfg.workers * computes.len(),
        );
        let mut handles = Vec::new();
        for (d, compute) in computes.iter().enumerate() {
            let mine = shard_slice(0..todo.len(), d, computes.len());
            let ids = samples_of(&todo[mine]);
            if ids.is_empty() {
                continue;
            }
            let loading = Instant::now();
            let model = Arc::new(
                Llama::load(&folder, QuantConfig::none(), &compute.device)?.cast(compute.dtype)?,
            );
            load_seconds += loading.elapsed().as_secs_f64();
            let job = Arc::new(worker::Job {
                first_tokens: first_token_candidates(&tokenizer, &model),
                model,
                cfg: cfg.clone(),
                ids,
                next: AtomicUsize::new(0),
            });
            if job.first_tokens.is_empty() {
                bail!(
                    "{}: the tokenizer has no non-special token to start a sample with",
                    folder.tokenizer_path().display()
                );
            }
            for _ in 0..cfg.workers {
                let job = job.clone();
                let tx = tx.clone();
                handles.push(std::thread::spawn(move || worker::run(&job, &tx)));
            }
        }
        drop(tx);
        // Shard writer: buffer finished samples per shard, write a shard once it is whole.
        let mut pending: BTreeMap<usize, Vec<Sample>> = BTreeMap::new();
        for msg in rx.iter() {
            let mut s = msg?;
            tokens_made += s.tokens.len() as u64;
            samples_made += 1;
            on_event(Event::Sample {
                tokens: s.tokens.len(),
            });
            if cfg.text {
                s.text =
                    Some(tokenizer.decode(&s.tokens, true).map_err(|e| {
                        anyhow::anyhow!("cannot decode sample {}: {e}", s.sample_id)
                    })?);
            }
            let shard = (s.sample_id / cfg.shard_size) as usize;
            let buf = pending.entry(shard).or_default();
            buf.push(s);
            if buf.len() as u64 == manifest.expected_rows(shard) {
                let mut rows = pending.remove(&shard).unwrap_or_default();
                rows.sort_by_key(|r| r.sample_id);
                let path = out.join(corpus::shard_file_name(shard));
                let entry = corpus::write_shard(&path, &rows, cfg.text)?;
                manifest.shards.insert(shard, entry);
                manifest.save(out)?;
                written += 1;
                on_event(Event::ShardWritten { index: shard });
            }
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a decoding worker panicked"))??;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(GenerateReport {
        out: out.to_path_buf(),
        shards_kept: kept,
        shards_written: written,
        samples_made,
        tokens_made,
        seconds: secs,
        tokens_per_second: if secs > 0.0 {
            tokens_made as f64 / secs
        } else {
            0.0
        },
        load_seconds,
        complete: manifest.is_complete(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_slices_are_contiguous_balanced_and_cover_every_shard() {
        for shards in 1..20 {
            for n in 1..=shards {
                let slices: Vec<_> = (0..n).map(|k| shard_slice(0..shards, k, n)).collect();
                assert_eq!(slices[0].start, 0);
                assert_eq!(slices[n - 1].end, shards);
                for w in slices.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let sizes: Vec<usize> = slices.iter().map(|r| r.len()).collect();
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(*lo >= 1 && hi - lo <= 1, "{shards} shards / {n}: {sizes:?}");
            }
        }
        assert_eq!(shard_slice(4..9, 1, 2), 6..9);
    }

    #[test]
    fn shard_of_reads_the_job_index_and_names_what_is_wrong() {
        let none = |_: &str| None;
        let slurm =
            |v: &'static str| move |k: &str| (k == "SLURM_ARRAY_TASK_ID").then(|| v.to_string());
        let k8s = |k: &str| (k == "JOB_COMPLETION_INDEX").then(|| "2".to_string());
        let p = |s: &str| s.parse::<ShardOf>();
        assert_eq!(p("1/3").unwrap().range(5, none).unwrap(), 1..3);
        assert_eq!(p("env/3").unwrap().range(5, slurm("0")).unwrap(), 0..1);
        assert_eq!(p("env/3").unwrap().range(5, k8s).unwrap(), 3..5);
        let err = |r: Result<std::ops::Range<usize>>| format!("{:#}", r.unwrap_err());
        let e = err(p("env/3").unwrap().range(5, none));
        assert!(
            e.contains("SLURM_ARRAY_TASK_ID") && e.contains("JOB_COMPLETION_INDEX"),
            "{e}"
        );
        let e = err(p("env/3").unwrap().range(5, slurm("x")));
        assert!(e.contains("SLURM_ARRAY_TASK_ID = \"x\""), "{e}");
        assert!(err(p("3/3").unwrap().range(5, none)).contains("K must be below N"));
        assert!(err(p("0/6").unwrap().range(5, none)).contains("only 5 shard(s)"));
        for bad in ["3", "a/2", "1/0", "1/", "/2"] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }
}
