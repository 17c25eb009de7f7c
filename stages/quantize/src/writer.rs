//! A safetensors file written as a stream, never held in memory: the byte range of every
//! tensor is planned from the shapes before any data exists, data is written at its planned
//! offset as each tensor is quantized, and small tensors whose size is only known at the end
//! (bitsandbytes' quant-state JSON) are appended after the planned region. The header space
//! is reserved up front for the largest header these tensors could need and filled at the
//! end (safetensors allows trailing spaces in the header). Everything goes to a temp file
//! next to the target, fsynced and renamed, so a crash never leaves a half-written model.

use anyhow::{bail, Context, Result};
use quant::safetensors_file::Dtype;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The largest appended tensor (a bitsandbytes quant state is about 200 bytes of JSON).
pub const TAIL_MAX: usize = 4096;

/// Bytes written between early flushes of the temp file: the disk writes while the stage
/// still computes, so the final fsync has little left to wait for.
const FLUSH_EVERY: usize = 32 << 20;

#[derive(Clone, Debug, PartialEq)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl OutTensor {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype,
            shape,
        }
    }

    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

struct Slot {
    tensor: OutTensor,
    begin: usize,
    written: bool,
}

pub struct StreamingWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    header_len: usize,
    slots: BTreeMap<String, Slot>,
    tail_names: Vec<String>,
    next_tail: usize,
    metadata: BTreeMap<String, String>,
    finished: bool,
    /// Bytes written since the last flush.
    unflushed: usize,
}

impl StreamingWriter {
    /// Plans `planned` (sizes known now) and room for `tail_names` (appended later, each at
    /// most [`TAIL_MAX`] bytes of U8).
    pub fn create(
        path: &Path,
        planned: Vec<OutTensor>,
        tail_names: Vec<String>,
        metadata: BTreeMap<String, String>,
    ) -> Result<StreamingWriter> {
        // Wider elements first keeps every f32 / f16 tensor aligned to its size in the file.
        let mut planned = planned;
        planned.sort_by_key(|t| std::cmp::Reverse(t.dtype.size()));
        let mut slots = BTreeMap::new();
        let mut offset = 0usize;
        for t in planned {
            let n = t.bytes();
            let name = t.name.clone();
            let slot = Slot {
                tensor: t,
                begin: offset,
                written: false,
            };
            if slots.insert(name.clone(), slot).is_some() {
                bail!("{}: tensor {name} is planned twice", path.display());
            }
            offset += n;
        }
        // Header upper bound: every offset at its largest possible value, every tail at
        // TAIL_MAX bytes.
        let bound = offset + TAIL_MAX * tail_names.len();
        let mut worst = serde_json::Map::new();
        for s in slots.values() {
            worst.insert(
                s.tensor.name.clone(),
                entry_json(&s.tensor.dtype, &s.tensor.shape, bound, bound),
            );
        }
        for n in &tail_names {
            worst.insert(n.clone(), entry_json(&Dtype::U8, &[TAIL_MAX], bound, bound));
        }
        worst.insert("__metadata__".into(), serde_json::to_value(&metadata)?);
        let header_len = serde_json::to_string(&worst)?.len().div_ceil(8) * 8;

        let tmp = corpus::fsio::temp_path_for(path)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("creating temp file {}", tmp.display()))?;
        Ok(StreamingWriter {
            path: path.to_path_buf(),
            tmp,
            file,
            header_len,
            slots,
            tail_names,
            next_tail: offset,
            metadata,
            finished: false,
            unflushed: 0,
        })
    }

    fn data_start(&self) -> u64 {
        8 + self.header_len as u64
    }

    /// Writes the data of a planned tensor at its place.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let start = self.data_start();
        let slot = self
            .slots
            .get_mut(name)
            .with_context(|| format!("{}: tensor {name} was not planned", self.path.display()))?;
        if bytes.len() != slot.tensor.bytes() {
            bail!(
                "{}: tensor {name} is planned at {} bytes but {} came",
                self.path.display(),
                slot.tensor.bytes(),
                bytes.len()
            );
        }
        self.file
            .write_all_at(bytes, start + slot.begin as u64)
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        slot.written = true;
        self.unflushed += bytes.len();
        if self.unflushed >= FLUSH_EVERY {
            self.unflushed = 0;
            self.file
                .sync_data()
                .with_context(|| format!("flushing {}", self.tmp.display()))?;
        }
        Ok(())
    }

    /// Appends one of the tail tensors (U8, 1-D) after the planned region.
    pub fn write_tail(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        if bytes.len() > TAIL_MAX || !self.tail_names.iter().any(|n| n == name) {
            bail!(
                "{}: tensor {name} is not an appendable tensor of at most {TAIL_MAX} bytes",
                self.path.display()
            );
        }
        let slot = Slot {
            tensor: OutTensor::new(name, Dtype::U8, vec![bytes.len()]),
            begin: self.next_tail,
            written: true,
        };
        self.file
            .write_all_at(bytes, self.data_start() + self.next_tail as u64)
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        self.next_tail += bytes.len();
        self.slots.insert(name.to_string(), slot);
        Ok(())
    }

    /// Writes the header, fsyncs, renames over the target; returns the file size.
    pub fn finish(mut self) -> Result<u64> {
        let missing: Vec<&str> = self
            .slots
            .values()
            .filter(|s| !s.written)
            .map(|s| s.tensor.name.as_str())
            .chain(
                self.tail_names
                    .iter()
                    .filter(|n| !self.slots.contains_key(n.as_str()))
                    .map(|n| n.as_str()),
            )
            .collect();
        if !missing.is_empty() {
            bail!(
                "{}: tensors never written: {}",
                self.path.display(),
                missing.join(", ")
            );
        }
        let mut header = serde_json::Map::new();
        for s in self.slots.values() {
            let end = s.begin + s.tensor.bytes();
            header.insert(
                s.tensor.name.clone(),
                entry_json(&s.tensor.dtype, &s.tensor.shape, s.begin, end),
            );
        }
        header.insert("__metadata__".into(), serde_json::to_value(&self.metadata)?);
        let mut text = serde_json::to_string(&header)?;
        if text.len() > self.header_len {
            bail!(
                "{}: header of {} bytes exceeds the {} reserved",
                self.path.display(),
                text.len(),
                self.header_len
            );
        }
        text.extend(std::iter::repeat_n(' ', self.header_len - text.len()));
        let mut head = (self.header_len as u64).to_le_bytes().to_vec();
        head.extend_from_slice(text.as_bytes());
        let at = self.tmp.display().to_string();
        self.file
            .write_all_at(&head, 0)
            .with_context(|| format!("writing {at}"))?;
        let size = self.data_start() + self.next_tail as u64;
        self.file
            .set_len(size)
            .with_context(|| format!("sizing {at}"))?;
        self.file
            .sync_all()
            .with_context(|| format!("fsync of {at}"))?;
        corpus::fsio::rename_durable(&self.tmp, &self.path)?;
        self.finished = true;
        Ok(size)
    }
}

impl Drop for StreamingWriter {
    fn drop(&mut self) {
        if !self.finished {
            // An abandoned write leaves nothing behind, not even the temp file.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn entry_json(dtype: &Dtype, shape: &[usize], begin: usize, end: usize) -> serde_json::Value {
    serde_json::json!({
        "dtype": dtype.name(),
        "shape": shape,
        "data_offsets": [begin, end],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quant::safetensors_file::SafetensorsFile;

    #[test]
    fn streams_a_file_the_reader_and_safetensors_accept() {
        let dir = std::env::temp_dir().join(format!("quantize-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        let planned = vec![
            OutTensor::new("codes", Dtype::U8, vec![3]),
            OutTensor::new("scale", Dtype::F32, vec![2]),
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut w = StreamingWriter::create(&path, planned, vec!["state".into()], meta).unwrap();
        w.write("codes", &[1, 2, 3]).unwrap();
        assert!(w.write("scale", &[0; 4]).is_err(), "wrong size is refused");
        let scale: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        w.write("scale", &scale).unwrap();
        w.write_tail("state", b"{\"a\": 1}").unwrap();
        let size = w.finish().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);

        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.bytes(f.get("codes").unwrap()), &[1, 2, 3]);
        assert_eq!(
            &*f.f32_values(f.get("scale").unwrap()).unwrap(),
            &[1.5, -2.0]
        );
        assert_eq!(f.bytes(f.get("state").unwrap()), b"{\"a\": 1}");
        // The f32 tensor comes first so it is 4-byte aligned.
        assert_eq!(f.get("scale").unwrap().begin, 0);
        assert_eq!(f.metadata["format"], "pt");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unfinished_file_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("quantize-writer2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        let mut w = StreamingWriter::create(
            &path,
            vec![OutTensor::new("a", Dtype::U8, vec![2])],
            vec![],
            BTreeMap::new(),
        )
        .unwrap();
        w.write("a", &[1, 2]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let w = StreamingWriter::create(
            &path,
            vec![OutTensor::new("a", Dtype::U8, vec![2])],
            vec![],
            BTreeMap::new(),
        )
        .unwrap();
        let e = w.finish().unwrap_err();
        assert!(format!("{e}").contains("never written: a"), "{e}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
