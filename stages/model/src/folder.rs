//! A Hugging Face model folder on disk: `config.json`, `model.safetensors` (or a sharded
//! `model.safetensors.index.json`) and `tokenizer.json`. Loading checks every tensor against
//! the config so a broken checkpoint fails with the file and tensor name, not a panic later.
//! A llama.cpp `.gguf` file is accepted in place of a folder (see `gguf`).

use crate::config::LlamaConfig;
use crate::gguf::{self, GgufModel};
use crate::hub::HubSource;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use quant::block_folder::{self, LoadedTensor};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub struct ModelFolder {
    /// The folder, or the `.gguf` file of a llama.cpp checkpoint.
    pub dir: PathBuf,
    pub config: LlamaConfig,
    pub weight_files: Vec<PathBuf>,
    /// The hub repo and commit, when the folder was opened from a hub id (`dir` is then the
    /// snapshot folder in the Hugging Face cache).
    pub hub: Option<HubSource>,
    /// Set when `dir` is a `.gguf` file: config, tensors and tokenizer all come from it.
    pub gguf: Option<GgufModel>,
}

/// Identity of a teacher: hashes of its weights and tokenizer, recorded in corpus manifests
/// and stage fingerprints; for a teacher from the hub also its repo id and resolved commit
/// (absent for a local folder, so fingerprints made before these fields existed still match).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TeacherFingerprint {
    pub weights_sha256: String,
    pub tokenizer_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_repo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_commit: Option<String>,
}

fn sha256_files(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for f in files {
        let mut file =
            std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?;
        std::io::copy(&mut file, &mut h).with_context(|| format!("cannot read {}", f.display()))?;
    }
    Ok(hex::encode(h.finalize()))
}

impl ModelFolder {
    /// Opens a model folder, or a hub id `org/name[@revision]` (see [`crate::hub`]).
    pub fn open(dir: &Path) -> Result<Self> {
        let (resolved, hub) = crate::hub::resolve(dir)?;
        let dir = resolved.as_path();
        if gguf::is_gguf_path(dir) {
            let g = GgufModel::open(dir)?;
            return Ok(Self {
                dir: dir.to_path_buf(),
                config: g.config()?,
                weight_files: vec![dir.to_path_buf()],
                hub,
                gguf: Some(g),
            });
        }
        if !dir.is_dir() {
            bail!(
                "model folder {} does not exist or is not a folder",
                dir.display()
            );
        }
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            bail!(
                "{}: missing config.json (expected a Hugging Face model folder)",
                dir.display()
            );
        }
        let config = LlamaConfig::load(&config_path)?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let weight_files = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("cannot read {}", index.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| {
                    format!("{}: missing object field `weight_map`", index.display())
                })?;
            let files: BTreeSet<String> = map
                .values()
                .filter_map(|x| x.as_str().map(String::from))
                .collect();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported)",
                dir.display()
            );
        };
        for f in &weight_files {
            if !f.exists() {
                bail!(
                    "{}: weight file listed in the index is missing",
                    f.display()
                );
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weight_files,
            hub,
            gguf: None,
        })
    }

    /// Where the tokenizer comes from: `tokenizer.json`, or the `.gguf` file's metadata.
    pub fn tokenizer_path(&self) -> PathBuf {
        match &self.gguf {
            Some(_) => self.dir.clone(),
            None => self.dir.join("tokenizer.json"),
        }
    }

    /// The weight files, as errors name the model's weights.
    pub fn weight_source(&self) -> String {
        let names: Vec<String> = self
            .weight_files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        names.join(", ")
    }

    /// Loads `tokenizer.json` and checks that every id it can produce fits the model's vocabulary.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let path = self.tokenizer_path();
        let (tok, config_file) = match &self.gguf {
            Some(g) => (g.tokenizer()?, self.dir.clone()),
            None => {
                if !path.exists() {
                    bail!("{}: missing tokenizer.json", self.dir.display());
                }
                let tok = without_panics(|| Tokenizer::from_file(&path))
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map_err(|e| {
                        anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display())
                    })?;
                (tok, self.dir.join("config.json"))
            }
        };
        let n = tok.get_vocab_size(true);
        if n > self.config.vocab_size {
            bail!(
                "{}: tokenizer has {n} tokens but {} says vocab_size = {}: tokenizer and model do not match",
                path.display(),
                config_file.display(),
                self.config.vocab_size
            );
        }
        Ok(tok)
    }

    /// Hashes of the weights and the tokenizer (for a `.gguf` file: of the file and of the
    /// tokenizer.json built from it), and the hub source if any.
    pub fn fingerprint(&self) -> Result<TeacherFingerprint> {
        let tokenizer_sha256 = match &self.gguf {
            Some(g) => hex::encode(Sha256::digest(g.tokenizer_json()?.as_bytes())),
            None => sha256_files(&[self.tokenizer_path()])?,
        };
        Ok(TeacherFingerprint {
            weights_sha256: sha256_files(&self.weight_files)?,
            hub_repo: self.hub.as_ref().map(|h| h.repo.clone()),
            hub_commit: self.hub.as_ref().map(|h| h.commit.clone()),
            tokenizer_sha256,
        })
    }

    /// Every tensor of the checkpoint, converted to f32 on `device`. A folder written by
    /// `pipeline quantize` (or a bitsandbytes 4-bit checkpoint) is dequantized on load, and so
    /// are a GGUF file, a `pipeline export --format packed` folder and a compressed-tensors
    /// `pack-quantized` folder (code * scale, exactly the stored grid).
    /// Every value must be finite: a NaN or infinity names its tensor and index here, not as a
    /// NaN loss many steps later.
    pub fn load_tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let out = self.load_tensors_unchecked(device, true, true)?;
        Self::check_all_finite(&out, &self.dir)?;
        Ok(out)
    }

    /// As `load_tensors`, but the tensors of a safetensors checkpoint keep the dtype they are
    /// stored in (f32, f16 or bf16): a frozen model computing in f32 can widen each weight
    /// where it is used (exactly: both narrow dtypes are subsets of f32) and hold half the
    /// bytes meanwhile. Dequantized sources (quantized folders, GGUF, packed or compressed
    /// exports) come in f32 as before.
    pub fn load_tensors_as_stored(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let out = self.load_tensors_unchecked(device, true, false)?;
        Self::check_all_finite(&out, &self.dir)?;
        Ok(out)
    }

    /// A packed export's integer grids by weight name (empty for any other folder), and every
    /// other tensor as `load_tensors` gives it: the low-bit decoder keeps the grids as codes.
    pub fn load_packed(
        &self,
        device: &Device,
    ) -> Result<(
        HashMap<String, Tensor>,
        std::collections::BTreeMap<String, quant::GridWeight>,
    )> {
        let Some(h) = quant::packed::PackedHeader::read(&self.dir)? else {
            return Ok((self.load_tensors(device)?, Default::default()));
        };
        let dense = self.load_tensors_unchecked(device, false, true)?;
        Self::check_all_finite(&dense, &self.dir)?;
        let mut grids = std::collections::BTreeMap::new();
        for f in &self.weight_files {
            grids.extend(quant::packed::read_grids(&h, f)?);
        }
        for (name, g) in &grids {
            if let Some(bad) = g.scales.iter().position(|s| !s.is_finite()) {
                bail!(
                    "{}: tensor {name}: scale {bad} is {}; refusing to use this model",
                    self.dir.display(),
                    g.scales[bad]
                );
            }
        }
        Ok((dense, grids))
    }

    fn check_all_finite(out: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
        let mut names: Vec<&String> = out.keys().collect();
        names.sort();
        for name in names {
            check_finite(&out[name]).with_context(|| {
                format!(
                    "{}: tensor {name} is broken; refusing to use this model",
                    dir.display()
                )
            })?;
        }
        Ok(())
    }

    /// `with_grids = false`: a packed folder's grids are left out; `widen = false`: stored
    /// tensors keep their dtype.
    fn load_tensors_unchecked(
        &self,
        device: &Device,
        with_grids: bool,
        widen: bool,
    ) -> Result<HashMap<String, Tensor>> {
        if let Some(g) = &self.gguf {
            return g.load_tensors(&self.config, device);
        }
        if block_folder::is_quantized_folder(&self.dir) {
            return self.load_dequantized(device);
        }
        let packed = quant::packed::PackedHeader::read(&self.dir)?;
        let compressed = crate::compressed::Scheme::read(&self.dir.join("config.json"))?;
        let mut out = HashMap::new();
        for f in &self.weight_files {
            let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
                anyhow::anyhow!("{}: not a valid safetensors file: {e}", f.display())
            })?;
            let mut skip: Box<dyn Fn(&str) -> bool> = Box::new(|_| false);
            if let Some(h) = &packed {
                if with_grids {
                    for (name, g) in quant::packed::read_grids(h, f)? {
                        let t = Tensor::from_vec(g.values(), (g.rows, g.cols), device)?;
                        out.insert(name, t);
                    }
                }
                let h = h.clone();
                skip = Box::new(move |n| quant::packed::is_grid_tensor(&h, n));
            }
            if let Some(scheme) = &compressed {
                for (name, shape, values) in scheme.dequantize(&st, f)? {
                    out.insert(name, Tensor::from_vec(values, shape, device)?);
                }
                skip = Box::new(crate::compressed::is_packed_tensor);
            }
            for (name, view) in st.tensors() {
                if skip(&name) {
                    continue;
                }
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    other => bail!(
                        "{}: tensor {name} has dtype {other:?}; expected f32, f16 or bf16",
                        f.display()
                    ),
                };
                let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
                    .with_context(|| format!("{}: tensor {name}", f.display()))?;
                let t = if widen { t.to_dtype(DType::F32)? } else { t };
                let t = t.to_device(device)?;
                out.insert(name.to_string(), t);
            }
        }
        if let Some(h) = packed.as_ref().filter(|_| with_grids) {
            if let Some(missing) = h.weights.keys().find(|n| !out.contains_key(*n)) {
                bail!(
                    "{}: weight {missing} is named in {} but not stored",
                    self.dir.display(),
                    quant::packed::HEADER_FILE
                );
            }
        }
        Ok(out)
    }

    /// A quantized folder as a frozen base: its block-quantized weights kept quantized (by
    /// tensor name), every other tensor as f32.
    pub fn load_base(
        &self,
        device: &Device,
    ) -> Result<(
        HashMap<String, Tensor>,
        HashMap<String, crate::lora::BlockwiseWeight>,
    )> {
        if !block_folder::is_quantized_folder(&self.dir) {
            bail!(
                "{}: not a quantized folder (no quantize.json, no bitsandbytes quantization_config); make one with `pipeline quantize`",
                self.dir.display()
            );
        }
        let (mut dense, mut blockwise) = (HashMap::new(), HashMap::new());
        for t in block_folder::load_blockwise(&self.dir, &self.weight_files)? {
            match t {
                LoadedTensor::Blockwise {
                    name,
                    shape,
                    codes,
                    block,
                    code,
                    scales,
                } => {
                    let [o, i] = shape[..] else {
                        bail!(
                            "{}: quantized tensor {name} has shape {shape:?}, expected 2 dims",
                            self.dir.display()
                        );
                    };
                    let w = crate::lora::BlockwiseWeight::new(
                        (o, i),
                        codes,
                        block,
                        code,
                        scales,
                        device,
                    )
                    .with_context(|| format!("{}: tensor {name}", self.dir.display()))?;
                    blockwise.insert(name, w);
                }
                LoadedTensor::F32 { name, shape, data } => {
                    dense.insert(name, Tensor::from_vec(data, shape, device)?);
                }
                LoadedTensor::Raw {
                    name,
                    dtype,
                    shape,
                    bytes,
                } => {
                    let t = self.raw_tensor(&name, dtype, &shape, &bytes)?;
                    dense.insert(name, t.to_dtype(DType::F32)?.to_device(device)?);
                }
            }
        }
        Ok((dense, blockwise))
    }

    /// A tensor a quantized folder stores as is (f32, f16 or bf16), on the CPU.
    fn raw_tensor(
        &self,
        name: &str,
        dtype: quant::safetensors_file::Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<Tensor> {
        let dtype = match dtype {
            quant::safetensors_file::Dtype::F32 => DType::F32,
            quant::safetensors_file::Dtype::F16 => DType::F16,
            quant::safetensors_file::Dtype::BF16 => DType::BF16,
            other => bail!(
                "{}: tensor {name} has dtype {}; expected f32, f16 or bf16",
                self.dir.display(),
                other.name()
            ),
        };
        Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)
            .with_context(|| format!("{}: tensor {name}", self.dir.display()))
    }

    fn load_dequantized(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for t in block_folder::load_dequantized(&self.dir, &self.weight_files)? {
            let (name, t) = match t {
                LoadedTensor::F32 { name, shape, data } => {
                    let t = Tensor::from_vec(data, shape, &Device::Cpu)
                        .with_context(|| format!("{}: tensor {name}", self.dir.display()))?;
                    (name, t)
                }
                LoadedTensor::Blockwise { name, .. } => {
                    bail!(
                        "{}: tensor {name}: unexpected block-quantized tensor",
                        self.dir.display()
                    )
                }
                LoadedTensor::Raw {
                    name,
                    dtype,
                    shape,
                    bytes,
                } => {
                    let t = self.raw_tensor(&name, dtype, &shape, &bytes)?;
                    (name, t)
                }
            };
            out.insert(name, t.to_dtype(DType::F32)?.to_device(device)?);
        }
        Ok(out)
    }
}

/// Fails naming the first NaN or infinite value of `t` (flat index and value). One pass on
/// the tensor's own device: x * 0 sums to 0 exactly when every x is finite.
pub fn check_finite(t: &Tensor) -> Result<()> {
    let zero = t
        .affine(0.0, 0.0)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if zero == 0.0 {
        return Ok(());
    }
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => bail!("value {} at flat index {i} of shape {:?}", v[i], t.dims()),
        None => Ok(()),
    }
}

/// Runs `f`, turning a panic into an error message. The tokenizers library panics (an
/// `expect` while deserializing) on some malformed tokenizer.json files (found by
/// fuzz/fuzz_targets/tokenizer.rs); a bad file must be an error naming it, not a crash. The
/// panic hook is silenced meanwhile so that no backtrace reaches the user.
pub fn without_panics<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("the tokenizers library failed on it ({why})")
    })
}
