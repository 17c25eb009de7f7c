//! Training checkpoints and the final student folder, both written so that a SIGKILL at any
//! instant leaves either the previous state or the complete new one.
//!
//! A checkpoint `checkpoints/step-NNNNNNNN/` holds `student.safetensors` (HF names),
//! `optimizer.safetensors` (`m.NAME`, `v.NAME`), `state.json` and, written last,
//! `manifest.json` with the size and sha256 of each. It is built in `.step-NNNNNNNN.tmp`,
//! every file fsynced, then the folder is renamed into place and its parent fsynced; only a
//! folder named `step-*` whose manifest verifies is ever resumed from.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use corpus::fsio;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const STUDENT_FILE: &str = "student.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT: u32 = 1;

/// Everything besides tensors that the run needs to continue bit-identically. There is no
/// RNG state: the only randomness, the row shuffle, is a pure function of (seed, epoch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format: u32,
    /// Optimizer steps done; also the schedule position and AdamW's bias-correction count.
    pub step: u64,
    /// The next micro-batch the loader produces.
    pub loader_cursor: u64,
    /// Learning rate of the last step (informational; recomputed from `step`).
    pub lr: f64,
    /// Loss of the last step.
    pub loss: f64,
    /// Teacher hash, corpus manifest hash, student and train settings (see `fingerprint`).
    pub fingerprint: Value,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    bytes: u64,
    sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    step: u64,
    files: Vec<FileEntry>,
}

pub fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn parse_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())?
}

/// Serialises tensors as f32 safetensors bytes, sorted by name (deterministic bytes).
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((name.clone(), t.dims().to_vec(), bytes));
    }
    data.sort_by(|a, b| a.0.cmp(&b.0));
    let views = data
        .iter()
        .map(|(n, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map_err(|e| anyhow::anyhow!("tensor {n}: {e}"))?;
            Ok((n.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    // One metadata entry only: a HashMap with several would serialise in random order.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta))
        .map_err(|e| anyhow::anyhow!("serialising safetensors: {e}"))
}

/// Writes `tensors` as the bytes `safetensors_bytes` makes to a new file `path`, streamed: one
/// tensor's values at a time pass through a small buffer, so a checkpoint of a large student
/// never holds a second copy of its weights or moments in memory (the whole-file buffer and
/// the per-tensor byte copies were the peak of a 135M student's training). Fsyncs the file;
/// returns its length and SHA-256.
fn write_safetensors_synced(path: &Path, tensors: &[(String, Tensor)]) -> Result<(u64, String)> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    // The header as the safetensors crate writes it: metadata first, then each tensor in
    // order with its offsets; JSON without spaces, padded with spaces to a multiple of 8.
    let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0usize;
    for (name, t) in &sorted {
        let n = t.elem_count() * 4;
        header.push_str(&format!(
            r#",{}:{{"dtype":"F32","shape":{},"data_offsets":[{offset},{}]}}"#,
            serde_json::to_string(name)?,
            serde_json::to_string(t.dims())?,
            offset + n
        ));
        offset += n;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut out = HashingWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        bytes: 0,
    };
    let write = |out: &mut HashingWriter<std::io::BufWriter<fs::File>>, bytes: &[u8]| {
        out.write_all(bytes)
            .with_context(|| format!("writing {}", path.display()))
    };
    write(&mut out, &(header.len() as u64).to_le_bytes())?;
    write(&mut out, header.as_bytes())?;
    let mut buf = Vec::with_capacity(1 << 16);
    for (name, t) in &sorted {
        let t = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.contiguous())
            .with_context(|| format!("tensor {name}"))?;
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            drop(storage);
            // A GPU tensor: its values come to the host once, then out.
            let v: Vec<f32> = t.to_vec1()?;
            for chunk in v.chunks(1 << 14) {
                buf.clear();
                buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                write(&mut out, &buf)?;
            }
            continue;
        };
        let (a, b) = layout
            .contiguous_offsets()
            .context("a contiguous tensor without contiguous offsets")?;
        for chunk in cpu.as_slice::<f32>()?[a..b].chunks(1 << 14) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
            write(&mut out, &buf)?;
        }
    }
    let HashingWriter {
        inner,
        hasher,
        bytes,
    } = out;
    let file = inner
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("fsync of {}", path.display()))?;
    Ok((bytes, hex::encode(hasher.finalize())))
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads a safetensors file into f32 tensors on `device`.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading {}", path.display()))?;
    tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<candle_core::Result<_>>()
        .with_context(|| format!("reading {}", path.display()))
}

/// Creates `path` (which must not exist), writes `bytes` and fsyncs the file.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("fsync of {}", path.display()))
}

fn json_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s.into_bytes())
}

/// Removes a folder by first renaming it to a hidden temp name, so a crash halfway through
/// the deletion never leaves a half-deleted `step-*` (or `student`) folder behind.
fn remove_dir_safely(dir: &Path, parent: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let trash = parent.join(format!(".{name}.del.tmp"));
    if trash.exists() {
        fs::remove_dir_all(&trash).with_context(|| format!("removing {}", trash.display()))?;
    }
    fsio::rename_durable(dir, &trash)?;
    fs::remove_dir_all(&trash).with_context(|| format!("removing {}", trash.display()))
}

/// Deletes leftovers of interrupted writes or deletions (`.*.tmp` folders) inside `dir`.
pub fn remove_temp_dirs(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for e in entries {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") && e.file_type()?.is_dir() {
            fs::remove_dir_all(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Writes checkpoint `step` under `root` and returns its folder.
pub fn write(
    root: &Path,
    student: &[(String, Tensor)],
    moments: &[(String, Tensor)],
    state: &CheckpointState,
) -> Result<PathBuf> {
    let name = dir_name(state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    let dst = root.join(&name);
    let result = (|| -> Result<()> {
        if tmp.exists() {
            fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut files = Vec::new();
        for (file, tensors) in [(STUDENT_FILE, student), (OPTIMIZER_FILE, moments)] {
            let (bytes, sha256) = write_safetensors_synced(&tmp.join(file), tensors)?;
            files.push(FileEntry {
                name: file.into(),
                bytes,
                sha256,
            });
        }
        let bytes = json_bytes(state)?;
        write_synced(&tmp.join(STATE_FILE), &bytes)?;
        files.push(FileEntry {
            name: STATE_FILE.into(),
            bytes: bytes.len() as u64,
            sha256: fsio::sha256_bytes(&bytes),
        });
        // The manifest comes last: without it the folder is never taken for a checkpoint.
        let manifest = Manifest {
            format: FORMAT,
            step: state.step,
            files,
        };
        write_synced(&tmp.join(MANIFEST_FILE), &json_bytes(&manifest)?)?;
        fsio::fsync_dir(&tmp)?;
        if dst.exists() {
            // A broken checkpoint of the same step, left from before the resume.
            remove_dir_safely(&dst, root)?;
        }
        fsio::rename_durable(&tmp, &dst)
    })();
    result.with_context(|| format!("writing checkpoint {}", dst.display()))?;
    Ok(dst)
}

/// The `step-*` folders under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(e).with_context(|| format!("listing {}", root.display())),
    };
    for e in entries {
        let e = e.with_context(|| format!("listing {}", root.display()))?;
        if let Some(step) = parse_dir_name(&e.file_name().to_string_lossy()) {
            v.push((step, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// Checks a checkpoint folder against its manifest and returns its state.
pub fn verify(dir: &Path) -> Result<CheckpointState> {
    let mpath = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&mpath)
        .with_context(|| format!("no readable {MANIFEST_FILE} (interrupted write?)"))?;
    let m: Manifest =
        serde_json::from_str(&text).with_context(|| format!("{MANIFEST_FILE} is not valid"))?;
    if m.format != FORMAT {
        bail!(
            "{MANIFEST_FILE} has format {}, this program reads format {FORMAT}",
            m.format
        );
    }
    // Names first: a crafted name is reported as such, and never opened.
    for f in &m.files {
        fsio::check_plain_file_name(&f.name)?;
    }
    for required in [STUDENT_FILE, OPTIMIZER_FILE, STATE_FILE] {
        if !m.files.iter().any(|f| f.name == required) {
            bail!("{MANIFEST_FILE} does not list {required}");
        }
    }
    for f in &m.files {
        let path = dir.join(&f.name);
        let len = fs::metadata(&path)
            .with_context(|| format!("{} is missing", f.name))?
            .len();
        if len != f.bytes {
            bail!("{} has {len} bytes, the manifest says {}", f.name, f.bytes);
        }
        let sha = fsio::sha256_file(&path)?;
        if sha != f.sha256 {
            bail!(
                "{} has sha256 {sha}, the manifest says {}",
                f.name,
                f.sha256
            );
        }
    }
    let spath = dir.join(STATE_FILE);
    let state: CheckpointState = serde_json::from_str(
        &fs::read_to_string(&spath).with_context(|| format!("reading {}", spath.display()))?,
    )
    .with_context(|| format!("{STATE_FILE} is not valid"))?;
    if state.step != m.step {
        bail!(
            "{STATE_FILE} says step {}, the manifest says {}",
            state.step,
            m.step
        );
    }
    Ok(state)
}

/// The newest checkpoint under `root` that verifies. Broken ones newer than it are renamed
/// `broken-step-*` (so they are neither resumed from nor counted as kept) and reported.
pub fn newest_valid(
    root: &Path,
    report: &mut dyn FnMut(String),
) -> Result<Option<(PathBuf, CheckpointState)>> {
    for (step, dir) in list(root)?.into_iter().rev() {
        match verify(&dir) {
            Ok(state) if state.step == step => return Ok(Some((dir, state))),
            Ok(state) => report(format!(
                "skipping checkpoint {}: its state says step {}",
                dir.display(),
                state.step
            )),
            Err(e) => {
                let aside = root.join(format!("broken-{}", dir_name(step)));
                if aside.exists() {
                    fs::remove_dir_all(&aside)
                        .with_context(|| format!("removing {}", aside.display()))?;
                }
                fsio::rename_durable(&dir, &aside)?;
                report(format!(
                    "skipping broken checkpoint {}: {e:#} (moved to {})",
                    dir.display(),
                    aside.display()
                ));
            }
        }
    }
    Ok(None)
}

/// Keeps the `keep` newest checkpoints, deleting older ones (called after a new one is in place).
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list(root)?;
    let n = all.len().saturating_sub(keep);
    for (_, dir) in &all[..n] {
        remove_dir_safely(dir, root)?;
    }
    Ok(())
}

/// The first key (dotted path) where two fingerprints differ, with both values.
pub fn first_difference(
    ours: &Value,
    theirs: &Value,
    prefix: &str,
) -> Option<(String, String, String)> {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => first_difference(x, y, &key),
                    (x, y) => Some((key, render(x), render(y))),
                }
            })
        }
        (a, b) if a != b => Some((prefix.to_string(), a.to_string(), b.to_string())),
        _ => None,
    }
}

fn render(v: Option<&Value>) -> String {
    v.map_or("(unset)".into(), |v| v.to_string())
}

/// Files of the teacher folder copied beside the student's weights (those that exist).
const COPIED_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// The teacher's files that go beside the student's weights: those of COPIED_FILES that exist,
/// or for a llama.cpp `.gguf` teacher the config.json and tokenizer.json built from it.
fn teacher_files(teacher: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    if model::gguf::is_gguf_path(teacher) {
        let g = model::gguf::GgufModel::open(teacher)?;
        return Ok(vec![
            (
                "config.json".into(),
                serde_json::to_vec_pretty(g.config_json())?,
            ),
            ("tokenizer.json".into(), g.tokenizer_json()?.into_bytes()),
        ]);
    }
    let mut out = vec![];
    for f in COPIED_FILES {
        let src = teacher.join(f);
        if src.is_file() {
            let bytes = fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            out.push((f.to_string(), bytes));
        }
    }
    Ok(out)
}

/// Writes the final student as a Hugging Face folder `dst` (built in a temp folder, renamed).
/// Projections with an integer grid (`grids`, an LR-QAT student's merged weights) are stored
/// packed as their codes and scales (`packed.json` names them; `pipeline eval` and the export
/// read them back exactly); `tensors` holds every other tensor.
pub fn export_student(
    teacher_dir: &Path,
    dst: &Path,
    tensors: &[(String, Tensor)],
    grids: &[(String, quant::GridWeight)],
    quantization: &Value,
) -> Result<()> {
    // Dense weights stream to disk (a second in-memory copy of a large student would be the
    // run's peak); packed ones are small.
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    if !grids.is_empty() {
        let floats = tensors
            .iter()
            .map(|(n, t)| -> Result<_> {
                Ok((
                    n.clone(),
                    t.dims().to_vec(),
                    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let grids: Vec<_> = grids.iter().map(|(n, g)| (n.as_str(), g)).collect();
        let (st, header) = quant::packed::write_bytes(&floats, &grids)?;
        files.push(("model.safetensors".into(), st));
        files.push((quant::packed::HEADER_FILE.into(), header));
    }
    for (f, bytes) in teacher_files(teacher_dir)? {
        files.push((f.to_string(), bytes));
    }
    files.push(("quantization.json".into(), json_bytes(quantization)?));
    write_folder_with(dst, |tmp| {
        if grids.is_empty() {
            write_safetensors_synced(&tmp.join("model.safetensors"), tensors)?;
        }
        for (f, bytes) in &files {
            write_synced(&tmp.join(f), bytes)?;
        }
        Ok(())
    })
    .context("writing the student folder")
}

/// Writes a folder of `files` (name, bytes) at `dst`: built in a temp folder, synced, renamed.
pub fn write_folder<S: AsRef<str>>(dst: &Path, files: &[(S, Vec<u8>)]) -> Result<()> {
    write_folder_with(dst, |tmp| {
        for (f, bytes) in files {
            write_synced(&tmp.join(f.as_ref()), bytes)?;
        }
        Ok(())
    })
}

/// Writes a folder at `dst`: `fill` writes (and syncs) its files into a temp folder, which is
/// then synced and renamed into place.
fn write_folder_with(dst: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dst.parent().context("the folder has no parent")?;
    let name = dst
        .file_name()
        .context("the folder has no name")?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".{name}.tmp"));
    let result = (|| -> Result<()> {
        if tmp.exists() {
            fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fill(&tmp)?;
        fsio::fsync_dir(&tmp)?;
        if dst.exists() {
            remove_dir_safely(dst, parent)?;
        }
        fsio::rename_durable(&tmp, dst)
    })();
    result.with_context(|| format!("writing {}", dst.display()))
}

/// The trained adapters of a LoRA student as a PEFT adapter folder (`adapter_config.json`,
/// `adapter_model.safetensors` under peft's tensor names) for the base folder `base`.
pub fn export_adapter(
    dst: &Path,
    adapters: &[(String, Tensor)],
    lora: &crate::config::LoraConfig,
    base: &Path,
) -> Result<()> {
    let named: Vec<(String, Tensor)> = adapters
        .iter()
        .map(|(n, t)| (format!("base_model.model.{n}"), t.clone()))
        .collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.lora_rank,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "target_modules": lora.lora_targets,
        // Absolute, so that `pipeline export` finds it from any working directory.
        "base_model_name_or_path": fs::canonicalize(base)
            .with_context(|| format!("resolving the base folder {}", base.display()))?
            .display()
            .to_string(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
    });
    write_folder(
        dst,
        &[
            ("adapter_model.safetensors", safetensors_bytes(&named)?),
            ("adapter_config.json", json_bytes(&config)?),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_and_differences() {
        assert_eq!(dir_name(42), "step-00000042");
        assert_eq!(parse_dir_name("step-00000042"), Some(42));
        assert_eq!(parse_dir_name(".step-00000042.tmp"), None);
        assert_eq!(parse_dir_name("broken-step-00000042"), None);
        let a = json!({"student": {"w_bits": 4, "a_bits": 8}, "train": {"lr": 0.1}});
        let b = json!({"student": {"w_bits": 3, "a_bits": 8}, "train": {"lr": 0.1}});
        assert_eq!(first_difference(&a, &a, ""), None);
        assert_eq!(
            first_difference(&a, &b, ""),
            Some(("student.w_bits".into(), "4".into(), "3".into()))
        );
    }

    /// The streamed checkpoint file is byte for byte the crate's serialisation, with its
    /// length and hash, for names that need JSON escapes and tensors of several shapes.
    #[test]
    fn streamed_safetensors_equal_the_crates_bytes() -> Result<()> {
        let dev = Device::Cpu;
        let big: Vec<f32> = (0..40_000).map(|i| (i as f32).sin()).collect();
        let tensors: Vec<(String, Tensor)> = vec![
            ("z.weight".into(), Tensor::from_vec(big, (200, 200), &dev)?),
            (
                "a \"quoted\" name".into(),
                Tensor::new(&[1.5f32, -2.0, 0.25], &dev)?,
            ),
            ("m".into(), Tensor::new(3f32, &dev)?),
            (
                "b.t".into(),
                Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (2, 3), &dev)?.t()?,
            ),
        ];
        let want = safetensors_bytes(&tensors)?;
        let dir = std::env::temp_dir().join(format!("train-stream-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let p = dir.join("t.safetensors");
        let (n, sha) = write_safetensors_synced(&p, &tensors)?;
        let got = fs::read(&p)?;
        fs::remove_dir_all(&dir)?;
        assert_eq!(got.len(), want.len());
        assert!(
            got == want,
            "streamed bytes differ from safetensors::serialize"
        );
        assert_eq!((n, sha), (want.len() as u64, fsio::sha256_bytes(&want)));
        Ok(())
    }

    #[test]
    fn safetensors_bytes_are_sorted_and_round_trip() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0], (2, 2), &dev)?;
        let b = Tensor::from_vec(vec![5f32], 1, &dev)?;
        let x = safetensors_bytes(&[("b".into(), b.clone()), ("a".into(), a.clone())])?;
        let y = safetensors_bytes(&[("a".into(), a), ("b".into(), b)])?;
        assert_eq!(x, y);
        let dir = std::env::temp_dir().join(format!("train-st-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let p = dir.join("t.safetensors");
        fs::write(&p, &x)?;
        let back = read_safetensors(&p, &dev)?;
        assert_eq!(
            back["a"].to_vec2::<f32>()?,
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
