//! The student: how it parameterises the teacher's projections (`[student] method`), how it is
//! built from the teacher (or a quantized base) and a checkpoint, and what of it is saved. The
//! training loop sees only `Student::model` (its forward pass) and `Student::params` (what the
//! optimizer updates); it never asks which method it is.

use crate::config::{LoraConfig, Method, StudentConfig, TrainConfig, PROJECTIONS};
use crate::optim::Param;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use model::{BlockwiseWeight, Llama, LlamaConfig, LoraDropout, LoraWeight, QuantConfig, Weight};
use std::collections::HashMap;
use std::sync::Arc;

pub struct Student {
    pub model: Llama,
    pub params: Vec<Param>,
    /// The adapters' input dropout (`lora_dropout` > 0), switched on for each training pass.
    pub dropout: Option<Arc<LoraDropout>>,
    method: Method,
}

/// A block-quantized base (`qlora`, `loftq`): its quantized projections and its other
/// tensors, and for a LoftQ base the initial adapters chosen with it.
pub struct Base {
    pub dense: HashMap<String, Tensor>,
    pub blockwise: HashMap<String, BlockwiseWeight>,
    pub loftq: Option<LoftqStart>,
}

/// LoftQ's initial adapters (`loftq_adapters.safetensors`) and how they were made.
pub struct LoftqStart {
    pub settings: quant::block_folder::LoftqSettings,
    pub adapters: HashMap<String, Tensor>,
}

impl Base {
    /// Loads `dir` and checks that it was made from `teacher` (the tensors it keeps unquantized,
    /// such as the embedding and the norms, must be the teacher's).
    pub fn load(
        folder: &model::ModelFolder,
        teacher: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let dir = &folder.dir;
        let (dense, blockwise) = folder.load_base(device)?;
        if blockwise.is_empty() {
            bail!(
                "student.base = {}: the folder holds no block-quantized weights",
                dir.display()
            );
        }
        let mut names: Vec<&String> = dense.keys().filter(|n| teacher.contains_key(*n)).collect();
        names.sort();
        for name in names {
            let (a, b) = (&dense[name], &teacher[name]);
            if a.dims() != b.dims() || model::max_abs_diff(a, b)? != 0.0 {
                bail!(
                    "student.base = {}: tensor `{name}` differs from the teacher's: the base was made from another model (quantize this teacher with `pipeline quantize`)",
                    dir.display()
                );
            }
        }
        let header = quant::block_folder::QuantizeHeader::read(dir)?;
        let loftq = match header.and_then(|h| h.settings.loftq) {
            None => None,
            Some(settings) => {
                let path = dir.join(quant::block_folder::LOFTQ_FILE);
                let adapters = candle_core::safetensors::load(&path, device)
                    .with_context(|| format!("{}: LoftQ's initial adapters", path.display()))?;
                Some(LoftqStart { settings, adapters })
            }
        };
        Ok(Self {
            dense,
            blockwise,
            loftq,
        })
    }

    /// The initial adapters of a `loftq` student; its settings must be the base's.
    fn loftq_start(&self, lora: &LoraConfig, dir: &str) -> Result<&HashMap<String, Tensor>> {
        let Some(start) = &self.loftq else {
            bail!("student.method = \"loftq\" needs a base made with LoftQ (`pipeline quantize --loftq-rank R`, or `pipeline run` with [student] method = \"loftq\"); {dir} was quantized plainly");
        };
        let l = &start.settings;
        let mut mine = lora.lora_targets.clone();
        let mut theirs = l.targets.clone();
        mine.sort();
        theirs.sort();
        for (key, a, b) in [
            ("lora_rank", lora.lora_rank.to_string(), l.rank.to_string()),
            (
                "lora_alpha",
                lora.lora_alpha.to_string(),
                l.alpha.to_string(),
            ),
            ("lora_targets", format!("{mine:?}"), format!("{theirs:?}")),
            (
                "loftq_iters",
                lora.loftq_iters.unwrap_or(0).to_string(),
                l.iters.to_string(),
            ),
        ] {
            if a != b {
                bail!("student.{key} = {a}, but the base {dir} was made by LoftQ with {key} = {b} (quantize.json `loftq`); quantize again with these settings or change student.{key}");
            }
        }
        Ok(&start.adapters)
    }
}

/// Which student tensors of a `qat` student receive gradients.
fn qat_trainable(name: &str, cfg: &TrainConfig) -> bool {
    if name == "model.embed_tokens.weight" {
        cfg.train_embeddings
    } else if name == "lm_head.weight" {
        cfg.train_lm_head
    } else if name.ends_with("layernorm.weight")
        || name.ends_with("_norm.weight")
        || name == "model.norm.weight"
    {
        cfg.train_norms
    } else {
        true
    }
}

/// splitmix64: a seedable stream per adapter, so initial adapters depend only on the seed.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// peft's initial A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
fn initial_a(rank: usize, inputs: usize, seed: u64, key: &str, device: &Device) -> Result<Tensor> {
    let mut state = seed ^ 0x5EED_1042_u64;
    for b in key.bytes() {
        state = splitmix(&mut state) ^ b as u64;
    }
    let bound = 1.0 / (inputs as f64).sqrt();
    let v: Vec<f32> = (0..rank * inputs)
        .map(|_| {
            let u = (splitmix(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * u - 1.0) * bound) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, (rank, inputs), device)?)
}

/// `model.layers.{l}.self_attn.{n}` or `model.layers.{l}.mlp.{n}` for projection `n`.
fn projection_prefix(l: usize, n: &str) -> String {
    let group = match n {
        "gate_proj" | "up_proj" | "down_proj" => "mlp",
        _ => "self_attn",
    };
    format!("model.layers.{l}.{group}.{n}")
}

/// A low-rank factor of rank `r` fits an `out x inp` projection only if r <= min(out, inp).
fn check_rank(r: usize, out: usize, inp: usize, prefix: &str) -> Result<()> {
    if r > out.min(inp) {
        bail!(
            "student.lora_rank = {r}: larger than `{prefix}` allows ({out} x {inp}: at most {})",
            out.min(inp)
        );
    }
    Ok(())
}

/// Tensor `k` of a saved set (checkpoint or LoftQ start), which must have `shape`.
fn saved(t: &HashMap<String, Tensor>, k: &str, shape: [usize; 2], source: &str) -> Result<Tensor> {
    let x = t
        .get(k)
        .with_context(|| format!("{source}: missing tensor `{k}`"))?;
    if x.dims() != shape {
        bail!(
            "{source}: tensor `{k}` has shape {:?}, expected {shape:?}",
            x.dims()
        );
    }
    Ok(x.clone())
}

impl Student {
    /// Builds the student. `init` holds the teacher's tensors (fresh start) or, when resuming,
    /// the checkpoint's (`checkpoint_tensors`); `teacher` the teacher's (the frozen start of
    /// `lrqat`); `base` is required by methods that need one.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        spec: &StudentConfig,
        mcfg: &LlamaConfig,
        quant: &QuantConfig,
        init: &HashMap<String, Tensor>,
        teacher: &HashMap<String, Tensor>,
        resuming: bool,
        base: Option<&Base>,
        cfg: &TrainConfig,
        source: &str,
        device: &Device,
    ) -> Result<Self> {
        match (&spec.method, &spec.lora, base) {
            (Method::Qat, _, _) => Self::qat(mcfg, quant, init, cfg, source, device),
            (Method::Lrqat, Some(lora), _) => {
                let ckpt = if resuming { Some(init) } else { None };
                Self::lrqat(spec, mcfg, quant, lora, teacher, ckpt, cfg, source, device)
            }
            (Method::Qlora | Method::Loftq, Some(lora), Some(base)) => {
                let dir = spec
                    .base
                    .as_ref()
                    .map_or("student.base".into(), |d| d.display().to_string());
                let (adapters, from) = if resuming {
                    (Some(init), source.to_string())
                } else if spec.method == Method::Loftq {
                    let start = base.loftq_start(lora, &dir)?;
                    (
                        Some(start),
                        format!("{dir}/{}", quant::block_folder::LOFTQ_FILE),
                    )
                } else {
                    if base.loftq.is_some() {
                        bail!("student.base = {dir} was made with LoftQ: train it with student.method = \"loftq\" (a qlora student starts from a plainly quantized base)");
                    }
                    (None, source.to_string())
                };
                let mut s = Self::lora(mcfg, quant, lora, base, adapters, cfg, &from, device)?;
                s.method = spec.method;
                Ok(s)
            }
            (m, _, _) => bail!(
                "student.method = \"{}\" needs a base (student.base)",
                m.name()
            ),
        }
    }

    fn qat(
        mcfg: &LlamaConfig,
        quant: &QuantConfig,
        init: &HashMap<String, Tensor>,
        cfg: &TrainConfig,
        source: &str,
        device: &Device,
    ) -> Result<Self> {
        let mut tensors = HashMap::new();
        let mut params = Vec::new();
        for (name, _) in model::llama::expected_tensors(mcfg) {
            let t = init
                .get(&name)
                .with_context(|| format!("{source}: missing tensor `{name}`"))?;
            if qat_trainable(&name, cfg) {
                // from_tensor copies the storage, so the teacher's tensors are never touched.
                let var = Var::from_tensor(t)?;
                tensors.insert(name.clone(), var.as_tensor().clone());
                params.push(Param::new(name, var));
            } else {
                tensors.insert(name, t.clone());
            }
        }
        let model = Llama::from_tensors(mcfg.clone(), quant.clone(), tensors, source, device)?;
        Ok(Self {
            model,
            params,
            dropout: None,
            method: Method::Qat,
        })
    }

    /// Frozen base + LoRA adapters on the target projections (the only trainable tensors);
    /// `adapters` are a checkpoint's, else A starts random and B at zero, as peft starts them.
    #[allow(clippy::too_many_arguments)]
    fn lora(
        mcfg: &LlamaConfig,
        quant: &QuantConfig,
        lora: &LoraConfig,
        base: &Base,
        adapters: Option<&HashMap<String, Tensor>>,
        cfg: &TrainConfig,
        source: &str,
        device: &Device,
    ) -> Result<Self> {
        let r = lora.lora_rank;
        let mut projections = HashMap::new();
        let mut params = Vec::new();
        let dropout = (lora.lora_dropout > 0.0)
            .then(|| Arc::new(LoraDropout::new(lora.lora_dropout, cfg.seed)));
        for l in 0..mcfg.num_hidden_layers {
            for (j, n) in PROJECTIONS.iter().enumerate() {
                let prefix = projection_prefix(l, n);
                let q = base.blockwise.get(&format!("{prefix}.weight")).with_context(|| {
                    format!("student.base: `{prefix}.weight` is not block-quantized in the base (see [quantize] skip)")
                })?;
                let (out, inp) = q.shape;
                if !lora.lora_targets.iter().any(|t| t == *n) {
                    // Not adapted: the frozen base as a dense weight.
                    projections.insert(prefix, Weight::Dense(q.dequantize()?));
                    continue;
                }
                check_rank(r, out, inp, &prefix)?;
                let (ka, kb) = (
                    format!("{prefix}.lora_A.weight"),
                    format!("{prefix}.lora_B.weight"),
                );
                let (a, b) = match adapters {
                    Some(t) => (
                        saved(t, &ka, [r, inp], source)?,
                        saved(t, &kb, [out, r], source)?,
                    ),
                    None => (
                        initial_a(r, inp, cfg.seed, &ka, device)?,
                        Tensor::zeros((out, r), candle_core::DType::F32, device)?,
                    ),
                };
                let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
                projections.insert(
                    prefix,
                    Weight::Lora(LoraWeight {
                        base: Arc::new(q.clone()),
                        a: a.as_tensor().clone(),
                        b: b.as_tensor().clone(),
                        scale: lora.scale(),
                        dropout: dropout
                            .clone()
                            .map(|d| (d, (l * PROJECTIONS.len() + j) as u64)),
                    }),
                );
                params.push(Param::new(ka, a));
                params.push(Param::new(kb, b));
            }
        }
        let model = Llama::with_projections(
            mcfg.clone(),
            quant.clone(),
            base.dense.clone(),
            projections,
            source,
            device,
        )?;
        Ok(Self {
            model,
            params,
            dropout,
            method: Method::Qlora,
        })
    }

    /// LR-QAT on every projection: Phi0 and s0 from the teacher's weight (recomputed on
    /// resume: they depend only on it), A, B and the scale multipliers from `ckpt` or fresh
    /// (A random, B zero, multipliers 1). Embeddings, norms and the LM head stay the
    /// teacher's, frozen.
    #[allow(clippy::too_many_arguments)]
    fn lrqat(
        spec: &StudentConfig,
        mcfg: &LlamaConfig,
        quant: &QuantConfig,
        lora: &LoraConfig,
        teacher: &HashMap<String, Tensor>,
        ckpt: Option<&HashMap<String, Tensor>>,
        cfg: &TrainConfig,
        source: &str,
        device: &Device,
    ) -> Result<Self> {
        let r = lora.lora_rank;
        let phi = spec.phi_dtype.unwrap_or_default().model();
        let mut projections = HashMap::new();
        let mut params = Vec::new();
        let mut dense = teacher.clone();
        for l in 0..mcfg.num_hidden_layers {
            for n in PROJECTIONS {
                let prefix = projection_prefix(l, n);
                let w0 = dense
                    .remove(&format!("{prefix}.weight"))
                    .with_context(|| format!("teacher: missing tensor `{prefix}.weight`"))?;
                let (out, inp) = w0.dims2()?;
                check_rank(r, out, inp, &prefix)?;
                if let Some(g) = spec.w_group.filter(|g| !inp.is_multiple_of(*g)) {
                    bail!("student.w_group = {g}: an lrqat student needs groups that divide every projection's input dimension, and `{prefix}` has {inp}");
                }
                let (ka, kb, km) = (
                    format!("{prefix}.lrqat_A.weight"),
                    format!("{prefix}.lrqat_B.weight"),
                    format!("{prefix}.lrqat_m"),
                );
                let groups = inp / spec.w_group.unwrap_or(inp);
                let get = |k: &str, shape: [usize; 2]| -> Result<Option<Tensor>> {
                    ckpt.map(|t| saved(t, k, shape, source)).transpose()
                };
                let a = match get(&ka, [out, r])? {
                    Some(a) => a,
                    // Random A of LR-QAT's orientation (out x r): bound 1 / sqrt(r).
                    None => initial_a(out, r, cfg.seed, &ka, device)?,
                };
                let b = match get(&kb, [r, inp])? {
                    Some(b) => b,
                    None => Tensor::zeros((r, inp), candle_core::DType::F32, device)?,
                };
                let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
                let mut w = model::LowRankQWeight::init(
                    &w0,
                    spec.w_bits,
                    spec.w_group,
                    spec.scale_init.unwrap_or_default().model(),
                    phi,
                    a.as_tensor().clone(),
                    b.as_tensor().clone(),
                    lora.scale(),
                )?;
                let m = Var::from_tensor(&match get(&km, [out, groups])? {
                    Some(m) => m,
                    None => w.m.clone(),
                })?;
                w.m = m.as_tensor().clone();
                projections.insert(prefix, Weight::LowRankQ(w));
                params.push(Param::new(ka, a));
                params.push(Param::new(kb, b));
                params.push(Param {
                    name: km,
                    var: m,
                    lr_ratio: spec.scale_lr_ratio.unwrap_or(1.0),
                });
            }
        }
        // The projections quantize themselves; activations and K/V as configured.
        let quant = QuantConfig {
            w_bits: None,
            w_group: None,
            ..quant.clone()
        };
        let model =
            Llama::with_projections(mcfg.clone(), quant, dense, projections, source, device)?;
        Ok(Self {
            model,
            params,
            dropout: None,
            method: Method::Lrqat,
        })
    }

    /// What a checkpoint stores of the student: every tensor for `qat` (as before), only the
    /// trainable tensors for the others (a base is the base folder's, named by its hash; an
    /// LR-QAT student's Phi0 and s0 are the teacher's weights, recomputed).
    pub fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        match self.method {
            Method::Qat => self.model.named_tensors(),
            Method::Qlora | Method::Loftq | Method::Lrqat => self
                .params
                .iter()
                .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
                .collect(),
        }
    }

    /// The student as a plain Hugging Face checkpoint: `qat` as trained (f32 masters), LoRA
    /// students merged (dequant(base) + scale B A).
    pub fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(match self.method {
            Method::Qat => self.model.named_tensors(),
            Method::Qlora | Method::Loftq | Method::Lrqat => self.model.merged_named_tensors()?,
        })
    }

    /// Trainable parameters in total (for reports).
    pub fn trainable_count(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }
}
