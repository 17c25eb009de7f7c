//! `pipeline train`: QAT of a low-bit student by logit distillation from the teacher on a
//! synthetic corpus. Settings come from the `[train]` and `[student]` tables of an optional
//! TOML file, overridden by flags; both go through the same typed, validated config.

use crate::eval_cmd::bits_arg;
use anyhow::{Context, Result};
use clap::Args;
use model::{KvPoint, KvRotation};
use serde::Serialize;
use std::path::{Path, PathBuf};
use train::parallel::Launch;
use train::{Packing, Schedule, StudentConfig, TrainConfig};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Teacher model folder (Hugging Face format), or a hub id org/name[@revision].
    #[arg(long)]
    pub teacher: PathBuf,
    /// Corpus folder written by `pipeline generate`.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Output folder: checkpoints/, train_log.jsonl, student/. Rerunning resumes.
    #[arg(long)]
    pub out: PathBuf,
    /// TOML file with [train] and [student] tables (other tables are ignored); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub compute: crate::compute_args::ComputeArgs,
    /// Data-parallel training, one rank per device as threads of this process, e.g.
    /// cuda:0,cuda:1 (or cpu,cpu); replaces --device. Each rank takes batch / N rows of every
    /// micro-batch and the ranks sum their gradients, so the run follows the one-device run.
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    pub devices: Option<Vec<model::DeviceSpec>>,
    /// Optimizer steps in total.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Micro-batches per optimizer step (default 1).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate (default 3e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant, linear or cosine (default constant).
    #[arg(long)]
    pub schedule: Option<Schedule>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// concat (default) or pad.
    #[arg(long)]
    pub packing: Option<Packing>,
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Recompute each decoder block in the backward pass instead of keeping its activations
    /// (`[train] checkpoint_activations`): less memory, about one more forward pass of time.
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// How many of the newest checkpoints to keep (default 3).
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    #[arg(long)]
    pub log_every: Option<u64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Student weight bits (2..=8; 16 or none = off; default 4).
    #[arg(long, value_parser = bits_arg)]
    pub w_bits: Option<u32>,
    /// Weight group size along the input dimension (default: per output channel).
    #[arg(long)]
    pub w_group: Option<usize>,
    /// Student activation bits (default 8).
    #[arg(long, value_parser = bits_arg)]
    pub a_bits: Option<u32>,
    /// Student K/V cache bits (default 4).
    #[arg(long, value_parser = bits_arg)]
    pub kv_bits: Option<u32>,
    /// post_rope (default) or pre_rope.
    #[arg(long)]
    pub kv_point: Option<KvPoint>,
    /// none (default) or hadamard.
    #[arg(long)]
    pub kv_rotation: Option<KvRotation>,
    /// The type weight scales are rounded to (f32, f16, bf16; `qat`): f16 makes a GGUF export
    /// exact.
    #[arg(long)]
    pub scale_dtype: Option<String>,
    /// qat (default), qlora, loftq or lrqat.
    #[arg(long)]
    pub method: Option<train::Method>,
    /// The block-quantized base of a qlora / loftq student (a `pipeline quantize` output
    /// folder; for loftq made with --loftq-rank).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// LoRA rank r (qlora; default 16).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha (qlora; scale alpha / r; default 16).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on each adapter's input while training, in [0, 1) (qlora, loftq; default 0).
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Projections with adapters, comma separated (qlora; default all seven).
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
    /// LoftQ's alternating steps (loftq; default 5; must be the base's).
    #[arg(long)]
    pub loftq_iters: Option<u32>,
    /// How an lrqat student stores Phi0 = W0 / s0: int8 (default; fixed point) or bf16.
    #[arg(long)]
    pub phi_dtype: Option<train::PhiStorage>,
    /// An lrqat student's scale multipliers learn at this multiple of the learning rate
    /// (default 1; 0 keeps the MinMax scales).
    #[arg(long)]
    pub scale_lr_ratio: Option<f64>,
    /// How an lrqat student's start scales are chosen: minmax (default; nothing clipped) or
    /// mse (per group, the clip with the least squared error).
    #[arg(long)]
    pub scale_init: Option<train::ScaleInit>,
}

/// Sets `key` in `table` when the flag was given.
fn set<T: Serialize>(table: &mut toml::Table, key: &str, v: Option<T>) -> Result<()> {
    if let Some(v) = v {
        table.insert(
            key.into(),
            toml::Value::try_from(v)
                .with_context(|| format!("flag --{}", key.replace('_', "-")))?,
        );
    }
    Ok(())
}

/// The `[train]` and `[student]` tables of the config file (empty when there is none).
fn file_tables(path: Option<&Path>) -> Result<(toml::Table, toml::Table)> {
    let Some(path) = path else {
        return Ok(Default::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let mut doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
    let mut table = |name: &str| -> Result<toml::Table> {
        match doc.remove(name) {
            None => Ok(toml::Table::new()),
            Some(toml::Value::Table(t)) => Ok(t),
            Some(_) => anyhow::bail!("{}: `{name}` must be a table ([{name}])", path.display()),
        }
    };
    Ok((table("train")?, table("student")?))
}

impl TrainArgs {
    /// File values, then flags on top, parsed and validated as one config.
    pub fn configs(&self) -> Result<(StudentConfig, TrainConfig)> {
        let (mut t, mut s) = file_tables(self.config.as_deref())?;
        let src = self.config.as_ref().map_or("flags".to_string(), |p| {
            format!("{} and flags", p.display())
        });
        set(&mut t, "steps", self.steps)?;
        set(&mut t, "batch", self.batch)?;
        set(&mut t, "seq_len", self.seq_len)?;
        set(&mut t, "grad_accum", self.grad_accum)?;
        set(&mut t, "lr", self.lr)?;
        set(&mut t, "schedule", self.schedule)?;
        set(&mut t, "warmup_steps", self.warmup_steps)?;
        set(&mut t, "packing", self.packing)?;
        set(&mut t, "checkpoint_every", self.checkpoint_every)?;
        set(&mut t, "keep_checkpoints", self.keep_checkpoints)?;
        set(&mut t, "log_every", self.log_every)?;
        set(&mut t, "seed", self.seed)?;
        set(
            &mut t,
            "checkpoint_activations",
            self.checkpoint_activations.then_some(true),
        )?;
        set(&mut s, "w_bits", self.w_bits)?;
        set(&mut s, "w_group", self.w_group)?;
        set(&mut s, "a_bits", self.a_bits)?;
        set(&mut s, "kv_bits", self.kv_bits)?;
        set(&mut s, "kv_point", self.kv_point)?;
        set(&mut s, "kv_rotation", self.kv_rotation)?;
        set(&mut s, "scale_dtype", self.scale_dtype.clone())?;
        set(&mut s, "method", self.method)?;
        set(&mut s, "base", self.base.clone())?;
        set(&mut s, "lora_rank", self.lora_rank)?;
        set(&mut s, "lora_alpha", self.lora_alpha)?;
        set(&mut s, "lora_dropout", self.lora_dropout)?;
        set(&mut s, "lora_targets", self.lora_targets.clone())?;
        set(&mut s, "loftq_iters", self.loftq_iters)?;
        set(&mut s, "phi_dtype", self.phi_dtype)?;
        set(&mut s, "scale_lr_ratio", self.scale_lr_ratio)?;
        set(&mut s, "scale_init", self.scale_init)?;
        let train: TrainConfig = toml::Value::Table(t).try_into().with_context(|| {
            format!("[train] settings from {src} (steps, batch and seq_len are required)")
        })?;
        let student: StudentConfig = toml::Value::Table(s)
            .try_into()
            .with_context(|| format!("[student] settings from {src}"))?;
        train.validate()?;
        student.validate()?;
        Ok((student, train))
    }
}

/// With a `[quantize]` table in the config file, a LoRA student's base must have been made with
/// those settings (its `quantize.json` says how it was made).
fn check_base_settings(config: Option<&Path>, student: &StudentConfig) -> Result<()> {
    let (Some(path), Some(base)) = (config, &student.base) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
    let Some(table) = doc.get("quantize") else {
        return Ok(());
    };
    let want: crate::pipeline_file::QuantizeTable = table
        .clone()
        .try_into()
        .with_context(|| format!("{}: [quantize]", path.display()))?;
    let want = want.settings()?;
    let Some(have) = quantize::QuantizeHeader::read(base)? else {
        anyhow::bail!(
            "student.base = {}: no quantize.json, so it cannot be checked against [quantize] of {}",
            base.display(),
            path.display()
        );
    };
    let h = &have.settings;
    for (key, a, b) in [
        ("format", h.format.name(), want.format.name()),
        ("layout", h.layout.name().into(), want.layout.name().into()),
        (
            "block_size",
            h.block_size.to_string(),
            want.block_size.to_string(),
        ),
        (
            "double_quant",
            h.double_quant.to_string(),
            want.double_quant.to_string(),
        ),
        ("skip", format!("{:?}", h.skip), format!("{:?}", want.skip)),
    ] {
        if a != b {
            anyhow::bail!(
                "student.base = {} was quantized with {key} = {a}, but [quantize] {key} = {b} in {}; quantize the teacher with these settings or change [quantize]",
                base.display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// Without the `nccl` feature a torchrun-style launch of several processes is refused: the
/// ranks would need NCCL to sum their gradients; one process with `--devices` runs its ranks as
/// threads.
#[cfg(any(not(feature = "nccl"), test))]
pub fn refuse_process_launch(var: impl Fn(&str) -> Option<String>) -> Result<()> {
    if let Some(l) = Launch::from_env(var)? {
        if l.world_size > 1 {
            anyhow::bail!(
                "RANK = {} and WORLD_SIZE = {} ask for ranks in separate processes, which sum their gradients over NCCL, but this build lacks the `nccl` feature (scripts/build-cuda.sh builds it); or run one process with --devices (e.g. cuda:0,cuda:1) instead",
                l.rank,
                l.world_size
            );
        }
    }
    Ok(())
}

/// The launch (torchrun's variables) this process is a rank of, when its ranks sum over NCCL:
/// always with WORLD_SIZE above 1; with WORLD_SIZE = 1 on a GPU too (a one-GPU run of the NCCL
/// path), unless `--devices` asks for ranks as threads. Builds without the `nccl` feature
/// refuse a launch of several processes and train a WORLD_SIZE = 1 launch as a plain run.
fn nccl_launch(a: &TrainArgs) -> Result<Option<Launch>> {
    let var = |v: &str| std::env::var(v).ok();
    #[cfg(not(feature = "nccl"))]
    {
        refuse_process_launch(var)?;
        let _ = a;
        Ok(None)
    }
    #[cfg(feature = "nccl")]
    Ok(Launch::from_env(var)?.filter(|l| {
        l.world_size > 1 || (a.devices.is_none() && a.compute.device != model::DeviceSpec::Cpu)
    }))
}

/// The GPU of a rank of a launch: cuda:LOCAL_RANK, or cuda:0 when `visible`
/// (CUDA_VISIBLE_DEVICES) shows this process one GPU only, as a scheduler that gives each
/// task its own GPU does (Slurm's --gpus-per-task=1 with SLURM_LOCALID above 0). `--device`
/// must say cuda (an ordinal it names must be that GPU), and `--devices` (ranks as threads)
/// does not mix with a launch.
#[cfg(any(feature = "nccl", test))]
fn launch_device(
    l: &Launch,
    device: model::DeviceSpec,
    devices: Option<&[model::DeviceSpec]>,
    visible: Option<&str>,
) -> Result<model::DeviceSpec> {
    use model::DeviceSpec;
    let who = format!("RANK = {} of WORLD_SIZE = {}", l.rank, l.world_size);
    if devices.is_some() {
        anyhow::bail!(
            "--devices runs ranks as threads of one process, but {who} makes this process one rank of a launch: drop --devices (each rank trains on cuda:LOCAL_RANK)"
        );
    }
    let shown = visible.map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count());
    let gpu = match shown {
        Some(1) => 0,
        Some(k) if l.local_rank >= k => anyhow::bail!(
            "{who} has LOCAL_RANK = {}, but CUDA_VISIBLE_DEVICES = {:?} shows this process {k} GPU(s): a rank of a launch trains on cuda:LOCAL_RANK among the GPUs it sees",
            l.local_rank,
            visible.unwrap_or_default()
        ),
        _ => l.local_rank,
    };
    match device {
        DeviceSpec::Cuda(n) if n == 0 || n == gpu => Ok(DeviceSpec::Cuda(gpu)),
        DeviceSpec::Cuda(n) => anyhow::bail!(
            "--device cuda:{n}, but {who} has LOCAL_RANK = {}: a rank of a launch trains on cuda:LOCAL_RANK; pass --device cuda",
            l.local_rank
        ),
        DeviceSpec::Cpu => anyhow::bail!(
            "{who} sums gradients over NCCL between GPUs, but --device is cpu: pass --device cuda (each rank trains on cuda:LOCAL_RANK)"
        ),
    }
}

/// This process as one rank of a launch: its GPU, NCCL's id from rank 0 (served at
/// MASTER_ADDR:MASTER_PORT), then the training of its slice of every batch.
#[cfg(feature = "nccl")]
fn train_launched(a: &TrainArgs, l: &Launch, job: train::TrainJob) -> Result<train::TrainReport> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let device = launch_device(
        l,
        a.compute.device,
        a.devices.as_deref(),
        visible.as_deref(),
    )?;
    let compute = model::Compute::open(device, a.compute.dtype)?;
    let ranks = train::nccl::NcclRanks::launch(l, &compute.device)?;
    if l.rank == 0 {
        eprintln!(
            "rank 0 of {}: gradients summed over NCCL {}",
            l.world_size,
            train::nccl::version()?
        );
    }
    let job = train::TrainJob {
        computes: vec![compute],
        ..job
    };
    train::train_launched(&job, &ranks, |_| {})
}

pub fn run(a: TrainArgs) -> Result<()> {
    let (student, cfg) = a.configs()?;
    if student.method.needs_base() {
        check_base_settings(a.config.as_deref(), &student)?;
    }
    let quant = student.quant_config()?;
    eprintln!(
        "training a {} student of {} on {} for {} steps ({} x {} tokens per micro-batch, grad_accum {})",
        quant.label(),
        a.teacher.display(),
        a.corpus.display(),
        cfg.steps,
        cfg.batch,
        cfg.seq_len,
        cfg.grad_accum
    );
    let job = train::TrainJob::new(&a.teacher, &a.corpus, &a.out, &student, &cfg);
    let r = match nccl_launch(&a)? {
        #[cfg(feature = "nccl")]
        Some(l) => train_launched(&a, &l, job)?,
        _ => {
            let job = train::TrainJob {
                computes: a.compute.open_each(a.devices.as_deref())?,
                ..job
            };
            train::train(&job, |_| {})?
        }
    };
    let resumed = r
        .resumed_from
        .map_or(String::new(), |s| format!(" (resumed from step {s})"));
    println!(
        "trained to step {}{resumed} in {:.1} s, {:.0} tokens/s, final loss {:.5}; student in {}",
        r.steps_done,
        r.seconds,
        r.tokens_per_second,
        r.final_loss,
        r.student_dir.as_deref().unwrap_or(&a.out).display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn args(extra: &[&str]) -> TrainArgs {
        let base = ["pipeline", "--teacher", "t", "--corpus", "c", "--out", "o"];
        Cli::parse_from(base.iter().chain(extra)).args
    }

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn a_launch_of_processes_without_nccl_is_refused_naming_the_feature() {
        let two = vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]);
        let e = format!("{:#}", refuse_process_launch(two).unwrap_err());
        assert!(
            e.contains("RANK = 1 and WORLD_SIZE = 2")
                && e.contains("lacks the `nccl` feature")
                && e.contains("--devices"),
            "{e}"
        );
        refuse_process_launch(vars(&[("RANK", "0"), ("WORLD_SIZE", "1")])).unwrap();
        refuse_process_launch(vars(&[])).unwrap();
    }

    #[test]
    fn a_rank_of_a_launch_trains_on_cuda_local_rank() -> Result<()> {
        use model::DeviceSpec::{Cpu, Cuda};
        let l = Launch {
            rank: 3,
            world_size: 4,
            local_rank: 1,
            master: Some("node0:29500".into()),
        };
        assert_eq!(launch_device(&l, Cuda(0), None, None)?, Cuda(1));
        assert_eq!(launch_device(&l, Cuda(1), None, None)?, Cuda(1));
        assert_eq!(launch_device(&l, Cuda(0), None, Some("0,1,2,3"))?, Cuda(1));
        // A scheduler that gives each task its own GPU: the one this process sees.
        assert_eq!(launch_device(&l, Cuda(0), None, Some("5"))?, Cuda(0));
        let third = Launch {
            local_rank: 2,
            ..l.clone()
        };
        let e = format!(
            "{:#}",
            launch_device(&third, Cuda(0), None, Some("0,1")).unwrap_err()
        );
        assert!(
            e.contains(
                "LOCAL_RANK = 2, but CUDA_VISIBLE_DEVICES = \"0,1\" shows this process 2 GPU(s)"
            ),
            "{e}"
        );
        for (device, devices, want) in [
            (
                Cuda(2),
                None,
                "--device cuda:2, but RANK = 3 of WORLD_SIZE = 4 has LOCAL_RANK = 1",
            ),
            (Cpu, None, "but --device is cpu: pass --device cuda"),
            (Cuda(0), Some(vec![Cuda(0), Cuda(1)]), "drop --devices"),
        ] {
            let e = format!(
                "{:#}",
                launch_device(&l, device, devices.as_deref(), None).unwrap_err()
            );
            assert!(e.contains(want), "{device} {devices:?}: {e}");
        }
        Ok(())
    }

    #[test]
    fn flags_override_the_file() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("train-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("p.toml");
        std::fs::write(
            &file,
            "[generate]\nsamples = 10\n[train]\nsteps = 100\nbatch = 8\nseq_len = 256\nlr = 1e-3\nschedule = \"cosine\"\n[student]\nw_bits = 3\nkv_bits = \"none\"\n",
        )?;
        let f = file.to_string_lossy().into_owned();
        let (s, t) = args(&[
            "--config",
            &f,
            "--steps",
            "7",
            "--a-bits",
            "none",
            "--kv-point",
            "pre_rope",
        ])
        .configs()?;
        assert_eq!(
            (t.steps, t.batch, t.seq_len, t.lr, t.schedule),
            (7, 8, 256, 1e-3, Schedule::Cosine)
        );
        assert_eq!(
            (s.w_bits, s.a_bits, s.kv_bits, s.kv_point),
            (3, 16, 16, KvPoint::PreRope)
        );

        std::fs::write(
            &file,
            "[train]\nsteps = 1\nbatch = 1\nseq_len = 8\nbogus = 1\n",
        )?;
        let err = format!("{:#}", args(&["--config", &f]).configs().unwrap_err());
        assert!(err.contains("bogus"), "{err}");
        let err = format!(
            "{:#}",
            args(&["--batch", "2", "--seq-len", "8"])
                .configs()
                .unwrap_err()
        );
        assert!(err.contains("steps"), "{err}");
        let err = format!(
            "{:#}",
            args(&[
                "--steps",
                "1",
                "--batch",
                "2",
                "--seq-len",
                "8",
                "--w-bits",
                "9"
            ])
            .configs()
            .unwrap_err()
        );
        assert!(err.contains("student.w_bits"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
