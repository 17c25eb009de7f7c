//! A safetensors file opened by memory map, its header checked before any tensor is
//! touched: every tensor's byte range must match its dtype and shape and lie inside the
//! file, so a header that lies about sizes fails with the file and tensor named instead of
//! reading garbage. Tensors are then read one at a time and their pages released after use,
//! so the resident memory stays near one tensor.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::path::{Path, PathBuf};

/// Element types we read and write (safetensors' names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    U8,
    I8,
    I32,
    I64,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "I32" => Dtype::I32,
            "I64" => Dtype::I64,
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I32 => "I32",
            Dtype::I64 => "I64",
        }
    }

    pub fn size(&self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U8 | Dtype::I8 => 1,
            Dtype::I64 => 8,
        }
    }

    /// torch's name, as bitsandbytes writes it in a quant state (`float32`, ...).
    pub fn torch_name(&self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::U8 => "uint8",
            Dtype::I8 => "int8",
            Dtype::I32 => "int32",
            Dtype::I64 => "int64",
        }
    }

    pub fn from_torch_name(s: &str) -> Option<Dtype> {
        [Dtype::F32, Dtype::F16, Dtype::BF16]
            .into_iter()
            .find(|d| d.torch_name() == s)
    }
}

#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section (after the header).
    pub begin: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    /// Tensors in file order (by offset), so reading walks the file front to back.
    pub tensors: Vec<TensorEntry>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // Safety: the model folder is input we only read; a concurrent writer truncating it
        // would be a misuse we cannot guard against, as with any mmap reader.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let at = path.display();
        if mmap.len() < 8 {
            bail!(
                "{at}: {} bytes is too short for a safetensors file",
                mmap.len()
            );
        }
        let n = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
        if n > mmap.len() - 8 {
            bail!(
                "{at}: header length field says {n} bytes but the file holds only {} after it",
                mmap.len() - 8
            );
        }
        let header: serde_json::Value = serde_json::from_slice(&mmap[8..8 + n])
            .with_context(|| format!("{at}: the header is not valid JSON"))?;
        let obj = header
            .as_object()
            .with_context(|| format!("{at}: the header is not a JSON object"))?;
        let data_start = 8 + n;
        let data_len = mmap.len() - data_start;
        let mut tensors = Vec::new();
        let mut metadata = serde_json::Map::new();
        for (name, v) in obj {
            if name == "__metadata__" {
                if let Some(m) = v.as_object() {
                    metadata = m.clone();
                }
                continue;
            }
            tensors.push(parse_entry(&at.to_string(), name, v, data_len)?);
        }
        tensors.sort_by_key(|t| (t.begin, t.end));
        for w in tensors.windows(2) {
            if w[1].begin < w[0].end {
                bail!(
                    "{at}: tensors {} and {} overlap (data_offsets {}..{} and {}..{})",
                    w[0].name,
                    w[1].name,
                    w[0].begin,
                    w[0].end,
                    w[1].begin,
                    w[1].end
                );
            }
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
            metadata,
        })
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw little-endian bytes of a tensor.
    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.mmap[self.data_start + t.begin..self.data_start + t.end]
    }

    /// The tensor as f32 (f16 / bf16 widened exactly). Borrowed straight from the map when it
    /// is f32 and aligned, otherwise copied.
    pub fn f32_values(&self, t: &TensorEntry) -> Result<std::borrow::Cow<'_, [f32]>> {
        let b = self.bytes(t);
        Ok(match t.dtype {
            Dtype::F32 => {
                // Safety: every bit pattern is a valid f32; align_to only splits off what
                // does not fit the alignment.
                let (pre, mid, post) = unsafe { b.align_to::<f32>() };
                if pre.is_empty() && post.is_empty() && cfg!(target_endian = "little") {
                    std::borrow::Cow::Borrowed(mid)
                } else {
                    std::borrow::Cow::Owned(
                        b.chunks_exact(4)
                            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                            .collect(),
                    )
                }
            }
            Dtype::BF16 => std::borrow::Cow::Owned(
                b.chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            Dtype::F16 => std::borrow::Cow::Owned(
                b.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            other => bail!(
                "{}: tensor {} has dtype {}; expected F32, F16 or BF16",
                self.path.display(),
                t.name,
                other.name()
            ),
        })
    }

    /// Drops the tensor's pages from this process (they stay in the page cache), so reading
    /// a large model tensor by tensor does not grow the resident set to the model's size.
    pub fn release(&self, t: &TensorEntry) {
        let page = page_size();
        let start = self.data_start + t.begin;
        let end = self.data_start + t.end;
        // Only whole pages inside the range: its neighbours may still be needed.
        let lo = start.div_ceil(page) * page;
        let hi = end / page * page;
        if hi > lo {
            // Safety: the range lies inside our read-only mapping; MADV_DONTNEED on a
            // file-backed mapping only drops pages, which are read back on the next access.
            unsafe {
                libc::madvise(
                    self.mmap.as_ptr().add(lo) as *mut libc::c_void,
                    hi - lo,
                    libc::MADV_DONTNEED,
                );
            }
        }
    }
}

fn page_size() -> usize {
    // Safety: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

fn parse_entry(
    at: &str,
    name: &str,
    v: &serde_json::Value,
    data_len: usize,
) -> Result<TensorEntry> {
    let dtype_s = v
        .get("dtype")
        .and_then(|d| d.as_str())
        .with_context(|| format!("{at}: tensor {name}: missing string field `dtype`"))?;
    let dtype = Dtype::parse(dtype_s).with_context(|| {
        format!("{at}: tensor {name}: dtype {dtype_s:?} is not supported (F32, F16, BF16, U8, I8, I32, I64)")
    })?;
    let shape: Vec<usize> = v
        .get("shape")
        .and_then(|s| s.as_array())
        .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
        .with_context(|| format!("{at}: tensor {name}: field `shape` is not a list of sizes"))?;
    let offs: Vec<usize> = v
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
        .with_context(|| {
            format!("{at}: tensor {name}: field `data_offsets` is not [begin, end]")
        })?;
    let [begin, end] = offs[..] else {
        bail!("{at}: tensor {name}: field `data_offsets` must hold two numbers");
    };
    let need = shape
        .iter()
        .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
        .with_context(|| format!("{at}: tensor {name}: shape {shape:?} overflows"))?;
    if end < begin || end - begin != need {
        bail!(
            "{at}: tensor {name}: data_offsets [{begin}, {end}] hold {} bytes but dtype {dtype_s} with shape {shape:?} needs {need}",
            end as i128 - begin as i128
        );
    }
    if end > data_len {
        bail!(
            "{at}: tensor {name}: data_offsets end {end} is past the end of the data ({data_len} bytes after the header)"
        );
    }
    Ok(TensorEntry {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}
