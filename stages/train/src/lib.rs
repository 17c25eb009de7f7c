//! The train stage: a student initialised from the teacher is trained with W/A/KV fake
//! quantization (the model crate's `QuantConfig`) to match the frozen teacher's logits on the
//! synthetic corpus. Checkpointed and resumable after SIGKILL: on CPU a killed and resumed run
//! ends with the same bytes as an uninterrupted one.
//!
//! - `config`: the `[train]` and `[student]` tables
//! - `data`: corpus -> rows -> micro-batches, on a reader thread behind a bounded channel
//! - `loss`: the distillation loss (CE between temperature-scaled distributions), KL, agreement
//! - `optim`: AdamW, learning-rate schedule, gradient clipping
//! - `checkpoint`: checkpoint folders, verification, pruning, the final student folder
//! - `parallel`: data-parallel ranks: the launch environment and the gradient all-reduce
//! - `nccl` (feature `nccl`): the all-reduce over NCCL, for GPU ranks in threads or processes

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod kv_equalize;
pub mod loss;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod optim;
pub mod parallel;
pub mod student;

pub use config::{
    LoraConfig, Method, Packing, PhiStorage, ScaleInit, Schedule, StudentConfig, TrainConfig,
};
pub use student::{Base, Student};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use checkpoint::CheckpointState;
use corpus::{fsio, CorpusManifest};
use data::{Loader, LoaderSpec};
use model::{Compute, Llama, LlamaConfig, ModelFolder, QuantConfig};
use optim::{AdamW, Param};
use parallel::Collective;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const LOG_FILE: &str = "train_log.jsonl";
pub const CHECKPOINT_DIR: &str = "checkpoints";
pub const STUDENT_DIR: &str = "student";
/// A LoRA student's adapters as a PEFT folder (beside the merged `student/`).
pub const ADAPTER_DIR: &str = "adapter";

/// One line of `train_log.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub step: u64,
    /// Distillation loss (CE), averaged over the step's micro-batches.
    pub loss: f64,
    pub kl: f64,
    pub agreement: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens_per_second: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    /// The optimizer step the student has reached.
    pub steps_done: u64,
    /// The checkpoint step this invocation started from, if it resumed.
    pub resumed_from: Option<u64>,
    pub final_loss: f64,
    pub tokens_per_second: f64,
    pub seconds: f64,
    /// `None` when the run stopped early (`stop_after`) before `train.steps`.
    pub student_dir: Option<PathBuf>,
}

/// One training run: what to distil into what, where, on which devices. `train(&job, on_log)`
/// runs it.
#[derive(Clone, Debug)]
pub struct TrainJob {
    pub teacher: PathBuf,
    pub corpus: PathBuf,
    /// Checkpoints, the log and the final student go here; a rerun resumes.
    pub out: PathBuf,
    pub student: StudentConfig,
    pub cfg: TrainConfig,
    /// One data-parallel rank per entry, as threads of this process (`--devices`); one f32
    /// CPU rank by default. In bf16/f16 the teacher is stored in that dtype; the student keeps
    /// f32 master weights and f32 AdamW moments (so checkpoints are f32 whatever the device)
    /// and casts them to the compute dtype in each forward pass.
    pub computes: Vec<Compute>,
    /// Stop after this optimizer step (with a checkpoint there) if it comes before
    /// `train.steps`. The schedule still follows `train.steps`, so a stopped run resumed with
    /// the same config continues exactly as if it had not stopped.
    pub stop_after: Option<u64>,
}

impl TrainJob {
    /// `train.steps` steps on one f32 CPU rank.
    pub fn new(
        teacher: &Path,
        corpus: &Path,
        out: &Path,
        student: &StudentConfig,
        cfg: &TrainConfig,
    ) -> TrainJob {
        TrainJob {
            teacher: teacher.to_path_buf(),
            corpus: corpus.to_path_buf(),
            out: out.to_path_buf(),
            student: student.clone(),
            cfg: cfg.clone(),
            computes: vec![Compute::cpu()],
            stop_after: None,
        }
    }
}

/// Builds a `qat` student from `init` (teacher or checkpoint tensors): trainable tensors become
/// `Var`s, and the model holds the Vars' own tensors so optimizer updates reach the forward pass.
pub fn build_student(
    mcfg: &LlamaConfig,
    quant: &QuantConfig,
    init: &HashMap<String, Tensor>,
    cfg: &TrainConfig,
    source: &str,
    device: &Device,
) -> Result<(Llama, Vec<Param>)> {
    let s = Student::build(
        &StudentConfig::default(),
        mcfg,
        quant,
        init,
        init,
        false,
        None,
        cfg,
        source,
        device,
    )?;
    Ok((s.model, s.params))
}

/// Where a step's time goes, when `PIPELINE_PROFILE=1`: the device is synchronised after each
/// phase (which removes CPU/GPU overlap, so only for diagnosis) and the running totals are
/// printed to stderr every 5 steps.
struct PhaseTimes {
    device: Option<Device>,
    last: Instant,
    totals: Vec<(&'static str, f64)>,
    steps: usize,
}

impl PhaseTimes {
    fn from_env(device: &Device) -> Self {
        let on = std::env::var("PIPELINE_PROFILE").is_ok_and(|v| v == "1");
        Self {
            device: on.then(|| device.clone()),
            last: Instant::now(),
            totals: Vec::new(),
            steps: 0,
        }
    }

    fn mark(&mut self, phase: &'static str) -> Result<()> {
        let Some(dev) = &self.device else {
            return Ok(());
        };
        dev.synchronize()?;
        let dt = self.last.elapsed().as_secs_f64();
        match self.totals.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, t)) => *t += dt,
            None => self.totals.push((phase, dt)),
        }
        if phase == "optimizer" {
            self.steps += 1;
        }
        if phase == "optimizer" && self.steps.is_multiple_of(5) {
            let total: f64 = self.totals.iter().map(|(_, t)| t).sum();
            let parts: Vec<String> = self
                .totals
                .iter()
                .map(|(p, t)| format!("{p} {:.1}%", 100.0 * t / total))
                .collect();
            eprintln!("profile ({total:.2} s): {}", parts.join(", "));
        }
        self.last = Instant::now();
        Ok(())
    }
}

/// A step's gradient of each parameter: what candle's backward passes returned (summed over the
/// micro-batches) and what GPU ops wrote into the parameter's sink, if it has one.
fn step_gradients(
    from_candle: Vec<Option<Tensor>>,
    params: &[Param],
    sinks: &[Option<std::sync::Arc<model::GradSink>>],
) -> Result<Vec<Tensor>> {
    from_candle
        .into_iter()
        .zip(params)
        .zip(sinks)
        .map(|((acc, p), sink)| {
            let sunk = sink.as_ref().and_then(|s| s.gradient());
            Ok(match (acc, sunk) {
                (Some(a), Some(s)) => (a + s)?,
                (Some(a), None) => a,
                (None, Some(s)) => s.clone(),
                (None, None) if sink.is_some() => p.var.zeros_like()?,
                (None, None) => bail!("no micro-batch ran"),
            })
        })
        .collect()
}

/// Corpus batches that measure the K/V ranges for `train.kv_equalize`.
const KV_CALIBRATION_BATCHES: usize = 8;

/// Names the training kernels' summation order (see `fingerprint`).
const KERNELS: &str = "fused-causal-attention-1";

/// What a checkpoint must agree on with the current run to be resumed: the teacher, the corpus,
/// the quantization and every setting that changes the computation (`steps` may grow; logging
/// and checkpoint cadence do not change the weights).
fn fingerprint(
    teacher: &model::TeacherFingerprint,
    corpus_sha: &str,
    student: &StudentConfig,
    cfg: &TrainConfig,
    dtype: candle_core::DType,
) -> Result<Value> {
    let mut train = serde_json::to_value(cfg)?;
    if let Value::Object(m) = &mut train {
        for k in ["steps", "log_every", "checkpoint_every", "keep_checkpoints"] {
            m.remove(k);
        }
    }
    Ok(json!({
        // The CPU kernels' evaluation order: a change here changes the trained weights, so a
        // checkpoint from another order is not resumed into this one.
        "kernels": KERNELS,
        // bf16 and f32 compute give different students; the device only changes float order.
        "compute_dtype": dtype.as_str(),
        "teacher": teacher,
        "corpus_manifest_sha256": corpus_sha,
        "student": student,
        "train": train,
    }))
}

/// Keeps the log lines of steps `<= step` (a resumed run rewrites the rest); drops a torn
/// last line left by a kill.
fn truncate_log(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut kept = String::new();
    for line in text.lines() {
        if serde_json::from_str::<LogLine>(line).is_ok_and(|l| l.step <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    fsio::write_atomic(path, kept.as_bytes())
}

/// Trains `job.cfg.steps` optimizer steps (resuming from the newest checkpoint under
/// `job.out`) and writes the final student to `<out>/student/`. With several devices each is
/// a data-parallel rank: it takes its slice of every micro-batch, the ranks sum their
/// gradients, and each applies the same step; rank 0 alone writes. `on_log` sees each logged
/// step.
pub fn train(job: &TrainJob, mut on_log: impl FnMut(&LogLine)) -> Result<TrainReport> {
    let plan = prepare(job, job.computes.len(), true)?;
    let computes = &job.computes;
    if computes.len() == 1 {
        return train_rank(job, &plan, &computes[0], None, &mut on_log);
    }
    let ranks = thread_ranks(computes)?;
    std::thread::scope(|scope| {
        let mut ranks = ranks.into_iter();
        let first = ranks.next().expect("at least two ranks");
        let others: Vec<_> = ranks
            .zip(&computes[1..])
            .map(|(r, compute)| {
                let plan = &plan;
                scope.spawn(move || {
                    let res = train_rank(job, plan, compute, Some(r.as_ref()), &mut |_| {});
                    if res.is_err() {
                        r.abort();
                    }
                    res
                })
            })
            .collect();
        // Rank 0 runs here, so `on_log` need not be shared with other threads. Its collective
        // goes before the others are joined: none outlives the run it served.
        let res = train_rank(job, &plan, &computes[0], Some(first.as_ref()), &mut on_log);
        if res.is_err() {
            first.abort();
        }
        drop(first);
        let mut results = vec![res];
        for h in others {
            results.push(
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a training rank panicked"))),
            );
        }
        // The error of the rank that failed first, not that of the ranks it released.
        let failed_first = results
            .iter()
            .position(|r| matches!(r, Err(e) if format!("{e}") != parallel::ABORTED));
        match failed_first {
            Some(i) => results.swap_remove(i),
            None => results.swap_remove(0),
        }
    })
}

/// The collective of ranks that are threads of this process: NCCL between the GPUs when built
/// with `nccl` and every rank is on a GPU, else sums through the host.
fn thread_ranks(computes: &[Compute]) -> Result<Vec<Box<dyn Collective>>> {
    #[cfg(feature = "nccl")]
    if computes.iter().all(|c| c.device.is_cuda()) {
        let devices: Vec<Device> = computes.iter().map(|c| c.device.clone()).collect();
        let ranks = nccl::NcclRanks::threads(&devices)?;
        return Ok(ranks
            .into_iter()
            .map(|r| Box::new(r) as Box<dyn Collective>)
            .collect());
    }
    Ok(parallel::ThreadRanks::new(computes.len())
        .into_iter()
        .map(|r| Box::new(r) as Box<dyn Collective>)
        .collect())
}

/// One rank of a launch of several processes (torchrun's variables): this process trains on
/// `job.computes`' one device and sums its gradients through `ranks`. Rank 0 settles the output
/// folder first (temporary files, broken checkpoints, the log) and alone writes; the others
/// then read it, and every rank checks that all resume from the same step of the same job.
pub fn train_launched(
    job: &TrainJob,
    ranks: &dyn Collective,
    mut on_log: impl FnMut(&LogLine),
) -> Result<TrainReport> {
    let [compute] = job.computes.as_slice() else {
        bail!(
            "a rank of a launch trains on one device, not {}",
            job.computes.len()
        );
    };
    let (rank, world) = (ranks.rank(), ranks.world_size());
    // Two rounds: rank 0 prepares while the others wait; then every rank must have a plan,
    // and the same one, before any trains.
    let plan = if rank == 0 {
        let plan = prepare(job, world, true);
        launch_checks(ranks, plan.is_ok(), None)?;
        let plan = plan?;
        launch_checks(ranks, true, Some(&plan))?;
        plan
    } else {
        launch_checks(ranks, true, None)?;
        let plan = prepare(job, world, false);
        launch_checks(ranks, plan.is_ok(), plan.as_ref().ok())?;
        plan?
    };
    let res = train_rank(job, &plan, compute, Some(ranks), &mut on_log);
    if res.is_err() {
        ranks.abort();
    }
    res
}

/// One sum over the ranks of a launch that tells each whether all are `ready` and, given their
/// `plan`s, whether they agree on them: the job's fingerprint and the step and loader cursor
/// they resume from, in pieces under 2^16 beside their squares (all ranks hold the same piece x
/// exactly when n * sum(x^2) == sum(x)^2, and in f64 both sides are exact).
fn launch_checks(ranks: &dyn Collective, ready: bool, plan: Option<&Plan>) -> Result<()> {
    const PIECES: usize = 14;
    let mut v = vec![0f64; 1 + 2 * PIECES];
    v[0] = if ready { 1.0 } else { 0.0 };
    if let Some(p) = plan {
        let fp = <sha2::Sha256 as sha2::Digest>::digest(serde_json::to_vec(&p.fp)?);
        let mut pieces: Vec<u64> = fp[..6].iter().map(|&b| b as u64).collect();
        for x in [p.start_step, p.cursor] {
            pieces.extend((0..4).map(|i| (x >> (16 * i)) & 0xffff));
        }
        for (i, x) in pieces.into_iter().enumerate() {
            v[1 + 2 * i] = x as f64;
            v[2 + 2 * i] = (x * x) as f64;
        }
    }
    let sums = ranks.all_reduce_sum(&[Tensor::new(v.as_slice(), &Device::Cpu)?])?;
    let s = sums
        .first()
        .context("all_reduce_sum returned nothing")?
        .to_vec1::<f64>()?;
    let world = ranks.world_size() as f64;
    if !ready {
        // The caller reports its own error.
        return Ok(());
    }
    if s[0] != world {
        bail!(
            "{} of the {world} ranks could not prepare the run (see their errors), so rank {} stops too",
            world - s[0],
            ranks.rank()
        );
    }
    if let Some(p) = plan {
        if !(0..PIECES).all(|i| world * s[2 + 2 * i] == s[1 + 2 * i] * s[1 + 2 * i]) {
            bail!(
                "the ranks of this launch do not agree on the run: rank {} resumes from step {} (loader cursor {}), and another rank from another step or with other settings, teacher or corpus; every rank needs the same flags, and --out must be one folder that all ranks see",
                ranks.rank(),
                p.start_step,
                p.cursor
            );
        }
    }
    Ok(())
}

/// What every rank of a run settles before training: the checks, the fingerprint, the
/// checkpoint to resume from. The `writer` (rank 0) also tidies `job.out`; a rank of another
/// process reads it only, after rank 0 has (`train_launched`).
fn prepare(job: &TrainJob, world: usize, writer: bool) -> Result<Plan> {
    let started = Instant::now();
    let (cfg, student, out) = (&job.cfg, &job.student, job.out.as_path());
    let (teacher_dir, corpus_dir) = (job.teacher.as_path(), job.corpus.as_path());
    cfg.validate()?;
    student.validate()?;
    let quant = student.quant_config()?;
    let Some(dtype) = job.computes.first().map(|c| c.dtype) else {
        bail!("no device to train on: --devices names none");
    };
    if job.computes.iter().any(|c| c.dtype != dtype) {
        bail!("the devices of one run must share one compute dtype");
    }
    data::check_ranks(cfg.batch, world)?;

    let folder = ModelFolder::open(teacher_dir)?;
    let mcfg = folder.config.clone();
    if cfg.seq_len > mcfg.usable_context() {
        bail!(
            "train.seq_len = {}: allowed values are 2..={} (the teacher's {})",
            cfg.seq_len,
            mcfg.usable_context(),
            mcfg.context_limit()
        );
    }
    if mcfg.tie_word_embeddings && cfg.train_embeddings != cfg.train_lm_head {
        bail!(
            "train.train_embeddings = {} but train.train_lm_head = {}: the teacher ties the LM head to the embedding, so both must be equal",
            cfg.train_embeddings,
            cfg.train_lm_head
        );
    }
    let manifest = CorpusManifest::load(corpus_dir)?;
    if !manifest.is_complete() {
        bail!(
            "corpus {} is incomplete (missing shards {:?}); finish it with `pipeline generate` first",
            corpus_dir.display(),
            manifest.missing_shards()
        );
    }
    let corpus_sha = fsio::sha256_file(&CorpusManifest::path(corpus_dir))?;
    let teacher_fp = folder.fingerprint()?;
    if teacher_fp.weights_sha256 != manifest.teacher.weights_sha256 {
        eprintln!(
            "warning: corpus {} was generated by another teacher (weights sha256 {}), not {}",
            corpus_dir.display(),
            manifest.teacher.weights_sha256,
            teacher_dir.display()
        );
    }
    if student.method.needs_base() && cfg.kv_equalize > 0.0 {
        bail!(
            "train.kv_equalize = {}: not supported with student.method = \"{}\" (it would rescale the frozen base); set it to 0",
            cfg.kv_equalize,
            student.method.name()
        );
    }
    let base_folder = match (student.method.needs_base(), &student.base) {
        (true, Some(d)) => Some(ModelFolder::open(d)?),
        (true, None) => bail!(
            "student.method = \"{}\" needs a block-quantized base: `pipeline train --base DIR` or [student] base (made by `pipeline quantize`; `pipeline run` makes it from [quantize])",
            student.method.name()
        ),
        (false, _) => None,
    };
    // A LoRA student's checkpoints hold adapters only: the base they go with is named by the
    // hash of its weights.
    let base_sha = match &base_folder {
        Some(f) => Some(f.fingerprint()?.weights_sha256),
        None => None,
    };
    let mut fp = fingerprint(&teacher_fp, &corpus_sha, student, cfg, dtype)?;
    if let Some(sha) = &base_sha {
        fp["base_weights_sha256"] = json!(sha);
    }
    // A LoftQ base's initial adapters are part of what the student starts from.
    if let Some(f) = base_folder
        .as_ref()
        .filter(|_| student.method == Method::Loftq)
    {
        let p = f.dir.join(quant::block_folder::LOFTQ_FILE);
        if p.exists() {
            fp["loftq_adapters_sha256"] = json!(fsio::sha256_file(&p)?);
        }
    }

    // Find where to start: the newest checkpoint that verifies, if its settings match ours.
    let ckpt_root = out.join(CHECKPOINT_DIR);
    let resume = if writer {
        fsio::create_out_dir(out)?;
        std::fs::create_dir_all(&ckpt_root)
            .with_context(|| format!("creating {}", ckpt_root.display()))?;
        checkpoint::remove_temp_dirs(&ckpt_root)?;
        checkpoint::remove_temp_dirs(out)?;
        fsio::remove_temp_files(out)?;
        checkpoint::newest_valid(&ckpt_root, &mut |msg| eprintln!("{msg}"))?
    } else {
        // Read only: rank 0 has already set broken checkpoints aside.
        checkpoint::list(&ckpt_root)?
            .into_iter()
            .rev()
            .find_map(|(step, dir)| {
                let state = checkpoint::verify(&dir).ok()?;
                (state.step == step).then_some((dir, state))
            })
    };
    if let Some((dir, state)) = &resume {
        if let Some((key, theirs, ours)) = checkpoint::first_difference(&state.fingerprint, &fp, "")
        {
            bail!(
                "checkpoint {} was made with {key} = {theirs}, but the current run has {key} = {ours}; \
                 refusing to mix them (restore the setting, or train into a new --out folder)",
                dir.display()
            );
        }
        if state.step > cfg.steps {
            bail!(
                "checkpoint {} is at step {}, beyond train.steps = {}; raise steps or use a new --out folder",
                dir.display(),
                state.step,
                cfg.steps
            );
        }
    }
    let start_step = resume.as_ref().map_or(0, |(_, s)| s.step);
    let cursor = resume.as_ref().map_or(0, |(_, s)| s.loader_cursor);

    let end_step = job
        .stop_after
        .map_or(cfg.steps, |s| s.clamp(start_step, cfg.steps));
    if writer {
        truncate_log(&out.join(LOG_FILE), start_step)?;
    }
    Ok(Plan {
        folder,
        quant,
        base_folder,
        fp,
        ckpt_root,
        resume,
        start_step,
        cursor,
        end_step,
        started,
    })
}

/// What every rank shares, settled before any starts: the teacher folder, the fingerprint and
/// the checkpoint to resume from.
struct Plan {
    folder: ModelFolder,
    quant: QuantConfig,
    base_folder: Option<ModelFolder>,
    fp: Value,
    ckpt_root: PathBuf,
    resume: Option<(PathBuf, CheckpointState)>,
    start_step: u64,
    cursor: u64,
    end_step: u64,
    started: Instant,
}

/// One rank's run: its own teacher, student, optimizer and loader slice. With `ranks` the
/// gradients are summed over the ranks before each step; without, this is the whole run.
fn train_rank(
    job: &TrainJob,
    plan: &Plan,
    compute: &Compute,
    ranks: Option<&dyn Collective>,
    on_log: &mut dyn FnMut(&LogLine),
) -> Result<TrainReport> {
    let (cfg, student, out) = (&job.cfg, &job.student, job.out.as_path());
    let (teacher_dir, corpus_dir) = (job.teacher.as_path(), job.corpus.as_path());
    let Plan {
        folder,
        quant,
        base_folder,
        fp,
        ckpt_root,
        resume,
        start_step,
        cursor,
        end_step,
        started,
    } = plan;
    let (start_step, cursor, end_step, started) = (*start_step, *cursor, *end_step, *started);
    let (rank, world) = ranks.map_or((0, 1), |r| (r.rank(), r.world_size()));
    // Rank 0 alone writes and reports.
    let writer = rank == 0;
    let device = compute.device.clone();
    let mcfg = folder.config.clone();

    // The reader thread verifies and reads the corpus while the models load.
    let spec = LoaderSpec {
        packing: cfg.packing,
        seq_len: cfg.seq_len,
        batch: cfg.batch,
        seed: cfg.seed,
        bos: mcfg.bos_token_id,
        pad: mcfg.eos_token_ids.first().copied().unwrap_or(0),
        vocab_size: mcfg.vocab_size,
    };
    let mut loader = Loader::start_rank(corpus_dir, spec.clone(), cursor, rank, world)?;

    // Computing in f32 on the CPU, the teacher keeps its checkpoint's dtype (bf16 for most
    // published models) through training and widens each weight where it is used: the same
    // values as an f32 copy (widening is exact), half the bytes. Everything else (the
    // student's start, Phi0, a QLoRA base) is made from the f32 values; the teacher goes back
    // to the stored dtype once they are made, so the two copies never coexist.
    let (teacher_tensors, stored_dtype) = if device.is_cpu() && compute.dtype == DType::F32 {
        let stored = folder.load_tensors_as_stored(&device)?;
        let mut dtypes = stored.values().map(|t| t.dtype());
        let first = dtypes.next();
        let narrow = first
            .filter(|d| matches!(d, DType::BF16 | DType::F16))
            .filter(|d| dtypes.all(|x| x == *d));
        // Widened one tensor at a time: each stored copy is freed as its f32 one is made.
        let widened = stored
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        (widened, narrow)
    } else {
        (folder.load_tensors(&device)?, None)
    };
    let teacher_names: Vec<String> = teacher_tensors.keys().cloned().collect();
    let base = match &base_folder {
        Some(f) => Some(Base::load(f, &teacher_tensors, &device)?),
        None => None,
    };
    let teacher = Llama::from_tensors(
        mcfg.clone(),
        QuantConfig::none(),
        teacher_tensors.clone(),
        teacher_dir.to_string_lossy().as_ref(),
        &device,
    )?
    .cast(compute.dtype)?;
    let teacher = Llama {
        fused_attention: true,
        ..teacher
    };
    // K/V equalization rescales the teacher's weights before the student is made from them:
    // qat's masters start from the result, and lrqat's frozen Phi0 is made from it (again on
    // resume, as Phi0 is not checkpointed: the calibration batches are the same).
    let equalized =
        if cfg.kv_equalize > 0.0 && (resume.is_none() || student.method == Method::Lrqat) {
            // Calibration: the first batches of the corpus, from a loader of its own, so the
            // training order is untouched.
            let mut calib = Loader::start(corpus_dir, spec, 0)?;
            let batches = (0..KV_CALIBRATION_BATCHES)
                .map(|_| {
                    let b = calib.next_batch()?;
                    Ok(Tensor::from_slice(&b.ids, (b.rows, b.len), &device)?)
                })
                .collect::<Result<Vec<_>>>()?;
            let ranges = kv_equalize::measure(&teacher, &batches)?;
            let mut eq = teacher_tensors.clone();
            kv_equalize::apply(&mut eq, &mcfg, &ranges, cfg.kv_equalize)?;
            if writer {
                eprintln!(
                    "K/V equalization (strength {}) applied to the student's initial weights",
                    cfg.kv_equalize
                );
            }
            Some(eq)
        } else {
            None
        };
    let (init, source) = match &resume {
        Some((dir, _)) => {
            let p = dir.join(checkpoint::STUDENT_FILE);
            (
                checkpoint::read_safetensors(&p, &device)?,
                p.display().to_string(),
            )
        }
        None => (
            equalized.clone().unwrap_or_else(|| teacher_tensors.clone()),
            teacher_dir.display().to_string(),
        ),
    };
    // The weights an lrqat student quantizes (its W0).
    let w0 = match (&equalized, student.method) {
        (Some(eq), Method::Lrqat) => eq,
        _ => &teacher_tensors,
    };
    let mut stu = Student::build(
        student,
        &mcfg,
        quant,
        &init,
        w0,
        resume.is_some(),
        base.as_ref(),
        cfg,
        &source,
        &device,
    )?;
    drop(base);
    if writer {
        eprintln!(
            "student: method {}, {} trainable parameters{}",
            student.method.name(),
            stu.trainable_count(),
            if world > 1 {
                format!(", {world} data-parallel ranks")
            } else {
                String::new()
            }
        );
    }
    stu.model.set_compute_dtype(compute.dtype);
    stu.model.fused_attention = true;
    // On a GPU, weight gradients are written straight into f32 sinks (none on the CPU).
    let sinks = stu.model.attach_grad_sinks()?;
    let sink_of: Vec<_> = stu.params.iter().map(|p| sinks.get(&p.name)).collect();
    drop(init);
    drop(equalized);
    drop(teacher_tensors);
    let teacher = match stored_dtype {
        Some(d) => {
            let mut t = teacher.cast(d)?;
            t.set_compute_dtype(DType::F32);
            t
        }
        None => teacher,
    };
    let mut opt = AdamW::new(cfg, &stu.params)?;
    if let Some((dir, _)) = &resume {
        let p = dir.join(checkpoint::OPTIMIZER_FILE);
        opt.load_moments(
            &stu.params,
            checkpoint::read_safetensors(&p, &device)?,
            &p.display().to_string(),
        )?;
        if writer {
            eprintln!("resuming from {} (step {start_step})", dir.display());
        }
    }

    let log_path = out.join(LOG_FILE);
    let mut log_file = match writer {
        true => Some(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&log_path)
                .with_context(|| format!("opening {}", log_path.display()))?,
        ),
        false => None,
    };
    let mut last_ckpt = resume.as_ref().map(|(d, _)| d.clone());
    let mut last_loss = resume.as_ref().map_or(f64::NAN, |(_, s)| s.loss);
    let mut cursor = cursor;
    let loop_start = Instant::now();
    let (mut total_tokens, mut window_tokens, mut window_start) = (0usize, 0usize, Instant::now());
    let no_ckpt = || "none yet".to_string();

    let mut prof = PhaseTimes::from_env(&device);
    for step in start_step + 1..=end_step {
        let lr = optim::lr_at(cfg, step);
        sinks.reset();
        let mut grads: Vec<Option<Tensor>> = vec![None; stu.params.len()];
        let (mut loss_sum, mut kl_sum, mut agree_sum) = (0f64, 0f64, 0f64);
        for _ in 0..cfg.grad_accum {
            let batch = loader.next_batch()?;
            debug_assert_eq!(batch.index, cursor);
            cursor += 1;
            let ids = Tensor::from_slice(&batch.ids, (batch.rows, batch.len), &device)?;
            prof.mark("data")?;
            let teacher_logits = teacher.forward(&ids)?;
            prof.mark("teacher forward")?;
            // Gradients of the mean over micro-batches: each backward sees loss / grad_accum,
            // and a rank's loss weighs by its share of the micro-batch's tokens (1 alone).
            let weight = batch.share / cfg.grad_accum as f64;
            let scaled = |d: &loss::Distill| d.loss.affine(weight, 0.0);
            // Dropout masks of this micro-batch (and rank), the same when it is replayed.
            if let Some(d) = &stu.dropout {
                d.begin(batch.index * world as u64 + rank as u64);
            }
            let (d, g) = if cfg.checkpoint_activations {
                let keep: Vec<&Tensor> = stu.params.iter().map(|p| p.var.as_tensor()).collect();
                // The teacher's logits move into the loss and the reported loss is detached:
                // both are freed with the head's graph, before the blocks are recomputed.
                let (d, g) = stu
                    .model
                    .backward_checkpointed(&ids, &keep, move |logits| {
                        let d = loss::distill_loss(
                            &teacher_logits,
                            logits,
                            batch.mask.as_deref(),
                            cfg.temperature,
                        )
                        .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
                        let scaled = scaled(&d)?;
                        Ok((
                            scaled,
                            loss::Distill {
                                loss: d.loss.detach(),
                                ..d
                            },
                        ))
                    })?;
                prof.mark("student forward and backward (checkpointed)")?;
                (d, g)
            } else {
                let student_logits = stu.model.forward(&ids)?;
                prof.mark("student forward")?;
                let d = loss::distill_loss(
                    &teacher_logits,
                    &student_logits,
                    batch.mask.as_deref(),
                    cfg.temperature,
                )?;
                let g = scaled(&d)?.backward()?;
                prof.mark("backward")?;
                (d, g)
            };
            if let Some(d) = &stu.dropout {
                d.end();
            }
            let mut value = d.loss.to_scalar::<f32>()? as f64;
            if injected_fault("loss", step) {
                value = f64::NAN;
            }
            prof.mark("loss")?;
            if !value.is_finite() {
                bail!(
                    "step {step}: the distillation loss is {value}; stopping. Last good checkpoint: {} \
                     (all checkpoints are kept). Lower train.lr (now {}) or check the corpus",
                    last_ckpt.as_ref().map_or_else(no_ckpt, |p| p.display().to_string()),
                    cfg.lr
                );
            }
            for ((acc, p), sink) in grads.iter_mut().zip(&stu.params).zip(&sink_of) {
                let gi = match g.get(p.var.as_tensor()) {
                    // Detached: a gradient computed through another trainable tensor (LoRA's
                    // B A) carries that graph, and the AdamW moments made from it would chain
                    // every step's graph to the next.
                    Some(x) => x.detach(),
                    // Written into its sink (collected below).
                    None if sink.is_some() => continue,
                    None => p.var.zeros_like()?,
                };
                *acc = Some(match acc.take() {
                    Some(a) => (a + gi)?,
                    None => gi,
                });
            }
            loss_sum += value * batch.share;
            kl_sum += d.kl * batch.share;
            agree_sum += d.agreement * batch.share;
            window_tokens += batch.rows * batch.len * world;
        }
        let mut grads = step_gradients(grads, &stu.params, &sink_of)?;
        if injected_fault("grad", step) {
            let last = grads.len() - 1;
            grads[last] = (grads[last].clone() * f64::INFINITY)?;
        }
        if let Some(ranks) = ranks {
            // The slices' gradients (and metrics), each weighed by its token share, sum to the
            // global batch's; every rank then takes the same step.
            let metrics = Tensor::new(&[loss_sum, kl_sum, agree_sum], &Device::Cpu)?;
            grads.push(metrics);
            let mut sums = ranks.all_reduce_sum(&grads)?;
            let m = sums.pop().context("all_reduce_sum returned no metrics")?;
            [loss_sum, kl_sum, agree_sum] = m
                .to_vec1::<f64>()?
                .try_into()
                .map_err(|_| anyhow::anyhow!("all_reduce_sum changed the metrics' shape"))?;
            grads = sums;
            prof.mark("all-reduce")?;
        }
        prof.mark("gradient sums")?;
        let grad_norm = optim::global_norm(&grads)?;
        let gscale = optim::clip_scale(grad_norm, cfg.grad_clip);
        prof.mark("clip")?;
        if !grad_norm.is_finite() {
            // Name the first tensor whose gradient is not finite.
            let culprit = stu
                .params
                .iter()
                .zip(&grads)
                .find_map(|(p, g)| {
                    model::check_finite(g)
                        .err()
                        .map(|e| format!("the gradient of {} has {e:#}", p.name))
                })
                .unwrap_or_else(|| "the gradients overflow in their sum of squares".into());
            bail!(
                "step {step}: the gradient norm is {grad_norm} ({culprit}); stopping. Last good checkpoint: {} \
                 (all checkpoints are kept). Lower train.lr (now {}) or check the teacher and corpus",
                last_ckpt.as_ref().map_or_else(no_ckpt, |p| p.display().to_string()),
                cfg.lr
            );
        }
        opt.step(&stu.params, &grads, lr, step, gscale)?;
        prof.mark("optimizer")?;
        let n = cfg.grad_accum as f64;
        last_loss = loss_sum / n;

        if let (Some(log_file), true) =
            (&mut log_file, step % cfg.log_every == 0 || step == end_step)
        {
            let secs = window_start.elapsed().as_secs_f64();
            let line = LogLine {
                step,
                loss: last_loss,
                kl: kl_sum / n,
                agreement: agree_sum / n,
                lr,
                grad_norm,
                tokens_per_second: window_tokens as f64 / secs.max(1e-9),
            };
            writeln!(log_file, "{}", serde_json::to_string(&line)?)
                .with_context(|| format!("writing {}", log_path.display()))?;
            eprintln!(
                "step {step}/{}  loss {:.4}  kl {:.4}  agree {:.1}%  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
                cfg.steps,
                line.loss,
                line.kl,
                100.0 * line.agreement,
                lr,
                grad_norm,
                line.tokens_per_second
            );
            on_log(&line);
            total_tokens += window_tokens;
            window_tokens = 0;
            window_start = Instant::now();
        }

        if writer && (step % cfg.checkpoint_every == 0 || step == end_step) {
            let state = CheckpointState {
                format: 1,
                step,
                loader_cursor: cursor,
                lr,
                loss: last_loss,
                fingerprint: fp.clone(),
            };
            let dir = checkpoint::write(
                ckpt_root,
                &stu.checkpoint_tensors(),
                &opt.named_moments(&stu.params),
                &state,
            )?;
            checkpoint::prune(ckpt_root, cfg.keep_checkpoints)?;
            last_ckpt = Some(dir);
        }
    }
    drop(loader);
    total_tokens += window_tokens;
    let loop_secs = loop_start.elapsed().as_secs_f64();

    let student_dir = if writer && end_step == cfg.steps {
        // Under the teacher's names: a tied model that also stored `lm_head.weight` gets it back.
        let mut tensors = stu.hf_tensors()?;
        if mcfg.tie_word_embeddings && teacher_names.iter().any(|n| n == "lm_head.weight") {
            tensors.push(("lm_head.weight".into(), stu.model.embed_tokens.clone()));
        }
        let dst = out.join(STUDENT_DIR);
        if let (Some(lora), Some(base)) = (&student.lora, &base_folder) {
            // Written first: `student/` is what marks a finished run.
            checkpoint::export_adapter(
                &out.join(ADAPTER_DIR),
                &stu.checkpoint_tensors(),
                lora,
                &base.dir,
            )?;
        }
        // The student's own quantizers: an lrqat student's weights are merged onto its grid
        // (stored packed as integers and scales), so its folder says w_bits none.
        let grids = stu.model.lowrank_grids()?;
        let tensors: Vec<_> = tensors
            .into_iter()
            .filter(|(n, _)| !grids.iter().any(|(g, _)| g == n))
            .collect();
        checkpoint::export_student(
            &folder.dir,
            &dst,
            &tensors,
            &grids,
            &serde_json::to_value(&stu.model.quant)?,
        )?;
        Some(dst)
    } else {
        None
    };
    Ok(TrainReport {
        steps_done: end_step,
        resumed_from: resume.as_ref().map(|(_, s)| s.step),
        final_loss: last_loss,
        tokens_per_second: total_tokens as f64 / loop_secs.max(1e-9),
        seconds: started.elapsed().as_secs_f64(),
        student_dir,
    })
}

/// Test hook, like `PIPELINE_CRASH_AT_WRITE`: `PIPELINE_INJECT_FAULT=loss@N` makes step N's
/// loss NaN, `grad@N` makes the last parameter's gradient infinite at step N, so the tests can
/// check that a numeric fault stops the run naming the step and tensor and keeps every
/// checkpoint.
fn injected_fault(kind: &str, step: u64) -> bool {
    std::env::var("PIPELINE_INJECT_FAULT").is_ok_and(|v| v == format!("{kind}@{step}"))
}
