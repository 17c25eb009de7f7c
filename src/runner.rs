//! `pipeline run` and `pipeline status`: the stage graph generate -> (quantize) -> train -> eval
//! over one run directory; `quantize` makes the frozen base of students that need one (qlora). Each stage keeps `stage.json` in its folder (settings, fingerprint, status,
//! outputs with hashes); a complete stage whose fingerprint matches is skipped, a partial one
//! resumes, a changed one is refused unless `--force STAGE`. No numerics live here.

use crate::pipeline_file::PipelineFile;
use anyhow::{bail, Context, Result};
use corpus::fsio;
use eval::compare::{Baseline, Comparison, RunEval};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const STAGES: [&str; 5] = ["generate", "quantize", "train", "export", "eval"];
const STAGE_FILE: &str = "stage.json";

fn stage_dir(run: &Path, stage: &str) -> PathBuf {
    match stage {
        "generate" => run.join("corpus"),
        "quantize" => run.join("base"),
        other => run.join(other),
    }
}

fn sha(v: &Value) -> String {
    fsio::sha256_bytes(v.to_string().as_bytes())
}

/// What each stage depends on, as JSON; its hash is the stage fingerprint.
pub struct Plan {
    pub configs: Vec<(String, Value)>,
}

impl Plan {
    pub fn new(p: &PipelineFile) -> Result<Self> {
        let folder = model::ModelFolder::open(&p.teacher.model)?;
        let fp = folder.fingerprint()?;
        let g = &p.generate;
        let gen = json!({
            "teacher": fp, "settings": g.content_settings(), "seed": g.seed,
            "samples": g.samples, "shard_size": g.shard_size,
        });
        let mut train = serde_json::to_value(&p.train)?;
        if let Some(o) = train.as_object_mut() {
            // Cadence of logs and checkpoints does not change the student.
            for k in ["log_every", "checkpoint_every", "keep_checkpoints"] {
                o.remove(k);
            }
        }
        let mut tr = json!({ "input": sha(&gen), "student": p.student, "train": train });
        // Students on a frozen base (qlora) depend on the quantize stage; others have none,
        // and their fingerprints are what they were before the stage existed.
        let quant = if p.student.method.needs_base() {
            let q = json!({ "teacher": fp, "quantize": p.quantize_settings()? });
            tr["base"] = json!(sha(&q));
            Some(q)
        } else {
            None
        };
        // A bf16/f16 student differs from an f32 one; f32 runs keep the fingerprint they had
        // before the dtype setting existed.
        if p.run.dtype != model::ComputeDtype::F32 {
            tr["dtype"] = json!(p.run.dtype);
        }
        let mut ev = json!({ "input": sha(&tr), "eval": p.eval });
        // An export stage (a low-bit format in [export]) sits between train and eval, which
        // then also scores the export; runs without one keep their fingerprints.
        let ex = p
            .export_format()
            .map(|_| json!({ "input": sha(&tr), "export": p.export }));
        if let Some(ex) = &ex {
            ev["export"] = json!(sha(ex));
        }
        let mut configs = vec![("generate".into(), gen)];
        if let Some(q) = quant {
            configs.push(("quantize".into(), q));
        }
        configs.push(("train".into(), tr));
        if let Some(ex) = ex {
            configs.push(("export".into(), ex));
        }
        configs.push(("eval".into(), ev));
        Ok(Plan { configs })
    }

    /// The stages this run has, in order.
    pub fn stages(&self) -> Vec<&str> {
        self.configs.iter().map(|(s, _)| s.as_str()).collect()
    }

    fn config(&self, stage: &str) -> &Value {
        &self
            .configs
            .iter()
            .find(|(s, _)| s == stage)
            .expect("known stage")
            .1
    }
}

#[derive(Debug, PartialEq)]
pub enum State {
    Pending,
    Partial(String),
    Done,
    Changed(String),
}

fn read_stage(run: &Path, stage: &str) -> Result<Option<Value>> {
    let p = stage_dir(run, stage).join(STAGE_FILE);
    if !p.exists() {
        return Ok(None);
    }
    let t = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(Some(serde_json::from_str(&t).with_context(|| {
        format!("{}: not valid JSON", p.display())
    })?))
}

/// First key whose value differs between two JSON objects, as `a.b: old -> new`.
fn first_difference(old: &Value, new: &Value, prefix: &str) -> Option<String> {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => {
                        if let Some(d) = first_difference(x, y, &p) {
                            return Some(d);
                        }
                    }
                    (x, y) => return Some(format!("{p}: {} -> {}", fmt(x), fmt(y))),
                }
            }
            None
        }
        (a, b) if a != b => Some(format!("{prefix}: {a} -> {b}")),
        _ => None,
    }
}

fn fmt(v: Option<&Value>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "(unset)".into())
}

fn progress(run: &Path, stage: &str, p: &PipelineFile) -> String {
    match stage {
        "generate" => match corpus::CorpusManifest::load(&stage_dir(run, stage)) {
            Ok(m) => format!("{} of {} shards", m.shards.len(), m.num_shards()),
            Err(_) => "started".into(),
        },
        "train" => {
            let ck = stage_dir(run, stage).join(train::CHECKPOINT_DIR);
            let newest = std::fs::read_dir(&ck)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("step-")?
                        .parse::<u64>()
                        .ok()
                })
                .max();
            match newest {
                Some(s) => format!("checkpoint at step {s} of {}", p.train.steps),
                None => "no checkpoint yet".into(),
            }
        }
        _ => "started".into(),
    }
}

pub fn state(run: &Path, stage: &str, plan: &Plan, p: &PipelineFile) -> Result<State> {
    let Some(s) = read_stage(run, stage)? else {
        return Ok(if stage_dir(run, stage).exists() {
            State::Partial(progress(run, stage, p))
        } else {
            State::Pending
        });
    };
    let want = plan.config(stage);
    if s.get("fingerprint").and_then(|f| f.as_str()) != Some(sha(want).as_str()) {
        let d = first_difference(s.get("config").unwrap_or(&Value::Null), want, "")
            .unwrap_or_else(|| "an input stage changed".into());
        return Ok(State::Changed(d));
    }
    Ok(match s.get("status").and_then(|x| x.as_str()) {
        Some("complete") => State::Done,
        _ => State::Partial(progress(run, stage, p)),
    })
}

fn write_stage(run: &Path, stage: &str, plan: &Plan, status: &str, seconds: f64) -> Result<()> {
    let dir = stage_dir(run, stage);
    fsio::create_out_dir(&dir)?;
    let mut outputs = vec![];
    if status == "complete" {
        let mut files = vec![];
        collect_files(&dir, &dir, &mut files)?;
        for f in files {
            let full = dir.join(&f);
            outputs.push(json!({
                "file": f, "bytes": std::fs::metadata(&full)?.len(), "sha256": fsio::sha256_file(&full)?,
            }));
        }
    }
    let v = json!({
        "stage": stage, "status": status, "fingerprint": sha(plan.config(stage)),
        "config": plan.config(stage), "seconds": seconds, "outputs": outputs,
    });
    fsio::write_atomic(
        &dir.join(STAGE_FILE),
        serde_json::to_string_pretty(&v)?.as_bytes(),
    )
}

/// Removes everything in a stage folder but its `stage.json`.
fn clear_stage_outputs(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e?;
        if e.file_name() == STAGE_FILE {
            continue;
        }
        let p = e.path();
        if e.file_type()?.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        }
        .with_context(|| format!("cannot remove {}", p.display()))?;
    }
    Ok(())
}

/// Final outputs of a stage (checkpoints are working state and are left out).
fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == STAGE_FILE || name.starts_with('.') || name == train::CHECKPOINT_DIR {
            continue;
        }
        let p = e.path();
        if p.is_dir() {
            collect_files(root, &p, out)?;
        } else {
            out.push(p.strip_prefix(root).unwrap_or(&p).display().to_string());
        }
    }
    Ok(())
}

/// Holds an exclusive `flock` on RUN/.lock; the kernel drops it when the process dies.
struct RunLock(#[allow(dead_code)] std::fs::File);

fn lock(run: &Path) -> Result<RunLock> {
    use std::os::unix::io::AsRawFd;
    fsio::create_out_dir(run)?;
    let p = run.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("cannot open {}", p.display()))?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "run directory {} is in use by another pipeline process",
            run.display()
        );
    }
    Ok(RunLock(f))
}

pub fn run(toml: &Path, sets: &[String], force: &[String]) -> Result<()> {
    for f in force {
        if !STAGES.contains(&f.as_str()) {
            bail!("--force {f}: allowed stages are {}", STAGES.join(", "));
        }
    }
    let p = PipelineFile::load(toml, sets)?;
    let run = p.run.directory.clone();
    let _lock = lock(&run)?;
    let plan = Plan::new(&p)?;
    // The effective settings (overrides applied), so `pipeline status RUN_DIR` can read them.
    fsio::write_atomic(&run.join("pipeline.toml"), toml::to_string(&p)?.as_bytes())?;
    let stages = plan.stages();
    for f in force {
        if !stages.contains(&f.as_str()) {
            bail!(
                "--force {f}: this run has no {f} stage (its stages are {})",
                stages.join(", ")
            );
        }
    }
    // --force STAGE redoes that stage and every stage after it.
    if let Some(first) = stages.iter().position(|s| force.iter().any(|f| f == s)) {
        for s in &stages[first..] {
            let d = stage_dir(&run, s);
            if d.exists() {
                eprintln!("--force: removing {} ({s})", d.display());
                std::fs::remove_dir_all(&d)
                    .with_context(|| format!("cannot remove {}", d.display()))?;
            }
        }
    }
    // Refuse before doing anything if a stage's settings changed.
    for &s in &stages {
        if let State::Changed(d) = state(&run, s, &plan, &p)? {
            bail!(
                "stage {s} in {} was made with other settings ({d}); rerun with --force {s} to redo it and the stages after it, or use another run directory",
                run.display()
            );
        }
    }
    let mut timings = vec![];
    let mut did_something = false;
    // Opened once: tensors of two handles to the same GPU cannot be mixed.
    let compute = model::Compute::open(p.run.device, p.run.dtype)?;
    for &s in &stages {
        match state(&run, s, &plan, &p)? {
            State::Done => {
                eprintln!("{s}: complete, skipping");
                continue;
            }
            State::Partial(pr) => eprintln!("{s}: resuming ({pr})"),
            State::Pending => eprintln!("{s}: starting"),
            State::Changed(_) => unreachable!("refused above"),
        }
        did_something = true;
        write_stage(&run, s, &plan, "running", 0.0)?;
        let t0 = Instant::now();
        match s {
            "generate" => {
                // `[run] devices`: one teacher per device on slices of the shards.
                crate::generate_cmd::generate_on_devices_with_progress(
                    &p.run.computes()?,
                    &p.teacher.model,
                    &stage_dir(&run, s),
                    &p.generate,
                    None,
                    false,
                )?;
            }
            "quantize" => {
                // A base left unfinished by a kill is this run's own partial output (quantize
                // refuses a folder it did not finish, to protect users' folders): quantizing is
                // deterministic and fast, so it starts over.
                clear_stage_outputs(&stage_dir(&run, s))?;
                let (input, _) = model::hub::resolve(&p.teacher.model)?;
                let settings = p.quantize_settings()?;
                let r =
                    quantize::quantize_folder(&input, &stage_dir(&run, s), &settings, &mut |_| {})?;
                eprintln!(
                    "quantize: {} at {:.3} bits per parameter",
                    settings.format.name(),
                    r.bits_per_param
                );
                if let Some(l) = &r.loftq {
                    eprintln!(
                        "quantize: LoftQ r = {} T = {}: relative error {:.4} with the adapters, {:.4} for plain quantization",
                        l.rank, l.iters, l.mean_loftq_rel_error, l.mean_plain_rel_error
                    );
                }
            }
            "train" => {
                let mut student = p.student.clone();
                if student.method.needs_base() {
                    student.base = Some(stage_dir(&run, "quantize"));
                }
                let job = train::TrainJob {
                    computes: p.run.computes()?,
                    ..train::TrainJob::new(
                        &p.teacher.model,
                        &stage_dir(&run, "generate"),
                        &stage_dir(&run, s),
                        &student,
                        &p.train,
                    )
                };
                // The train stage prints each logged step itself.
                let r = train::train(&job, |_| {})?;
                if let Some(from) = r.resumed_from {
                    eprintln!("train: resumed from step {from}");
                }
            }
            "export" => {
                // What an interrupted export left is rewritten (exporting is deterministic).
                clear_stage_outputs(&stage_dir(&run, s))?;
                let format = p.export_format().expect("an export stage has a format");
                let spec = export::ExportSpec {
                    format,
                    dtype: p
                        .export
                        .as_ref()
                        .and_then(|e| e.dtype.clone())
                        .unwrap_or_else(|| "f32".into()),
                    text: None,
                    max_tokens: None,
                };
                let r = export::export(&stage_dir(&run, "train"), &stage_dir(&run, s), &spec)?;
                eprintln!(
                    "export: {} {:.3} bits per weight, {} bytes, largest weight change {:e}",
                    format.name(),
                    r.bits_per_weight,
                    r.file_size_bytes,
                    r.max_weight_change
                );
            }
            "eval" => evaluate(&compute, &run, &p, &timings)?,
            _ => unreachable!(),
        }
        let secs = t0.elapsed().as_secs_f64();
        timings.push((s.to_string(), secs));
        write_stage(&run, s, &plan, "complete", secs)?;
    }
    if !did_something {
        eprintln!(
            "nothing to do: every stage of {} is complete",
            run.display()
        );
    }
    let md = stage_dir(&run, "eval").join("report.md");
    let table =
        std::fs::read_to_string(&md).with_context(|| format!("cannot read {}", md.display()))?;
    println!("{table}");
    Ok(())
}

/// The eval stage: the eval crate scores the run's models and writes the report; here, only
/// where each model lives and what it is called.
fn evaluate(
    compute: &model::Compute,
    run: &Path,
    p: &PipelineFile,
    timings: &[(String, f64)],
) -> Result<()> {
    let q = p.student.quant_config()?;
    // A student on a frozen base (qlora) starts from that base: it is the baseline, not RTN.
    let baseline = if p.student.method.needs_base() {
        let settings = p.quantize_settings()?;
        Baseline::FrozenBase {
            folder: stage_dir(run, "quantize"),
            name: format!(
                "{} {}base",
                settings.format.name(),
                if settings.loftq.is_some() {
                    "LoftQ "
                } else {
                    ""
                }
            ),
        }
    } else {
        Baseline::Rtn
    };
    // An lrqat student's folder holds its merged integers times scales: no weight quantizer.
    let student_quant = match p.student.method {
        train::Method::Lrqat => model::QuantConfig {
            w_bits: None,
            w_group: None,
            ..q.clone()
        },
        _ => q.clone(),
    };
    let inputs = RunEval {
        run_name: &p.run.name,
        teacher: &p.teacher.model,
        text: &p.eval.text,
        max_tokens: p.eval.max_tokens,
        ctx: p.eval.ctx,
        batch: p.eval.batch,
        quant: q,
        baseline,
        student: stage_dir(run, "train").join(train::STUDENT_DIR),
        student_quant,
        student_label: match p.student.method {
            train::Method::Qat => "QAT student".to_string(),
            m => format!("{} student", m.name()),
        },
        export: p.export_format().map(|f| {
            (
                format!("{} export", f.name()),
                f.model_path(&stage_dir(run, "export")),
            )
        }),
        train_log: stage_dir(run, "train").join(train::LOG_FILE),
        train_steps: p.train.steps,
        timings: timings.to_vec(),
    };
    let models = Comparison::load(compute, &inputs)?;
    let mut bar = crate::progress::LazyBar::new(
        models.tokens_to_score() as u64,
        "eval {bar:40} {pos}/{len} tokens eta {eta}",
    );
    let scores = models.score(|n| bar.set_position(n as u64))?;
    bar.finish();
    models.write_report(&stage_dir(run, "eval"), &scores)?;
    Ok(())
}

/// `pipeline status RUN_DIR_OR_TOML`.
pub fn status(arg: &Path, sets: &[String]) -> Result<()> {
    let toml = if arg.is_dir() {
        arg.join("pipeline.toml")
    } else {
        arg.to_path_buf()
    };
    if !toml.exists() {
        bail!("{}: no pipeline file (pass the pipeline TOML, or a run directory made by `pipeline run`)", toml.display());
    }
    let p = PipelineFile::load(&toml, sets)?;
    let run = p.run.directory.clone();
    let plan = Plan::new(&p)?;
    println!("run {} ({})", p.run.name, run.display());
    let mut next = None;
    for s in plan.stages() {
        let st = state(&run, s, &plan, &p)?;
        let line = match &st {
            State::Done => {
                let secs = read_stage(&run, s)?
                    .and_then(|v| v["seconds"].as_f64())
                    .unwrap_or(0.0);
                format!("done ({secs:.1}s)")
            }
            State::Partial(pr) => format!("partial: {pr}"),
            State::Pending => "pending".into(),
            State::Changed(d) => format!("changed: {d}"),
        };
        println!("  {s:<9} {line}");
        if next.is_none() {
            next = match st {
                State::Done => None,
                State::Partial(_) => Some(format!("resume {s}")),
                State::Pending => Some(format!("start {s}")),
                State::Changed(_) => Some(format!("refuse: {s} changed (use --force {s})")),
            };
        }
    }
    if let Ok(r) = std::fs::read_to_string(stage_dir(&run, "eval").join("report.json")) {
        if let Ok(v) = serde_json::from_str::<Value>(&r) {
            println!(
                "  perplexity: teacher {} | rtn {} | student {} (agreement {})",
                v["teacher"]["ppl"],
                v["rtn"]["ppl"],
                v["student"]["ppl"],
                v["student"]["agreement"]
            );
        }
    }
    println!(
        "next run: {}",
        next.unwrap_or_else(|| "nothing to do".into())
    );
    Ok(())
}
