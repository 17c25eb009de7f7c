//! The train stage on the real stories260k teacher and a tiny corpus made from real token ids:
//! gradients, learning, checkpoints, bit-identical resume, and the refusals.

use anyhow::Result;
use candle_core::{Device, Tensor};
use corpus::{CorpusManifest, Finish, Sample, TeacherInfo};
use model::{Llama, ModelFolder, QuantConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use train::{train, LogLine, Packing, Schedule, StudentConfig, TrainConfig, TrainJob};

fn shared_dir() -> PathBuf {
    match std::env::var_os("SHARED_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    }
}

fn teacher_dir() -> PathBuf {
    shared_dir().join("models/stories260k")
}

/// A fresh folder under the system temp dir, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("train-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a temp folder");
        TestDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two shards of 24 samples: paragraphs of the TinyStories validation text, tokenized by the
/// teacher's tokenizer and ended with EOS, as a generated corpus would be.
fn make_corpus(dir: &Path) -> Result<()> {
    let folder = ModelFolder::open(&teacher_dir())?;
    let tok = folder.tokenizer()?;
    let text = std::fs::read_to_string(shared_dir().join("data/tinystories-valid-64k.txt"))?;
    let eos = folder.config.eos_token_ids[0];
    let samples: Vec<Sample> = text
        .split("\n\n")
        .filter(|p| p.len() > 80)
        .take(48)
        .enumerate()
        .map(|(i, p)| {
            let mut tokens = tok
                .encode(p, false)
                .map_err(anyhow::Error::msg)?
                .get_ids()
                .to_vec();
            tokens.truncate(60);
            tokens.push(eos);
            Ok(Sample {
                sample_id: i as u64,
                tokens,
                greedy_prefix: 3,
                finish: Finish::Eos,
                text: None,
            })
        })
        .collect::<Result<_>>()?;
    let fp = folder.fingerprint()?;
    let teacher = TeacherInfo {
        path: teacher_dir().display().to_string(),
        weights_sha256: fp.weights_sha256,
        tokenizer_sha256: fp.tokenizer_sha256,
        vocab_size: folder.config.vocab_size,
        hub_repo: fp.hub_repo,
        hub_commit: fp.hub_commit,
    };
    let mut m = CorpusManifest::new(teacher, serde_json::json!({"temperature": 1.0}), 0, 48, 24);
    for (k, chunk) in samples.chunks(24).enumerate() {
        let entry = corpus::write_shard(&dir.join(corpus::shard_file_name(k)), chunk, false)?;
        m.shards.insert(k, entry);
    }
    m.save(dir)
}

/// A test run: a corpus folder and an output folder.
struct Run {
    _tmp: TestDir,
    corpus: PathBuf,
    out: PathBuf,
}

impl Run {
    fn new(name: &str) -> Result<Run> {
        let tmp = TestDir::new(name);
        let corpus = tmp.path().join("corpus");
        std::fs::create_dir_all(&corpus)?;
        make_corpus(&corpus)?;
        let out = tmp.path().join("out");
        Ok(Run {
            _tmp: tmp,
            corpus,
            out,
        })
    }

    fn other_out(&self, name: &str) -> PathBuf {
        self._tmp.path().join(name)
    }
}

fn small_cfg(steps: u64) -> TrainConfig {
    let mut c = TrainConfig::new(steps, 4, 32);
    c.lr = 2e-3;
    c.log_every = 1;
    c.checkpoint_every = 2;
    c
}

fn read_log(out: &Path) -> Result<Vec<LogLine>> {
    let text = std::fs::read_to_string(out.join(train::LOG_FILE))?;
    Ok(text
        .lines()
        .map(serde_json::from_str)
        .collect::<serde_json::Result<_>>()?)
}

#[test]
fn every_trainable_tensor_gets_a_gradient_and_the_teacher_none() -> Result<()> {
    let dev = Device::Cpu;
    let folder = ModelFolder::open(&teacher_dir())?;
    let tensors = folder.load_tensors(&dev)?;
    let teacher = Llama::from_tensors(
        folder.config.clone(),
        QuantConfig::none(),
        tensors.clone(),
        "teacher",
        &dev,
    )?;
    let quant = StudentConfig::default().quant_config()?;
    let cfg = TrainConfig::new(1, 2, 16);
    let (student, params) =
        train::build_student(&folder.config, &quant, &tensors, &cfg, "teacher", &dev)?;
    // Every tensor of this model is trainable by default: 5 layers x 9 + embedding + final norm.
    assert_eq!(params.len(), 5 * 9 + 2);

    let ids: Vec<u32> = (0..32).map(|i| (i * 37 + 5) % 512).collect();
    let ids = Tensor::from_vec(ids, (2, 16), &dev)?;
    let d = train::loss::distill_loss(&teacher.forward(&ids)?, &student.forward(&ids)?, None, 1.0)?;
    // The 4-bit student differs from the teacher, so there is something to learn.
    assert!(d.kl > 1e-4, "kl {}", d.kl);
    let grads = d.loss.backward()?;
    for p in &params {
        let g = grads
            .get(p.var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {}", p.name));
        let s = g.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(s > 0.0 && s.is_finite(), "{}: |grad| sum {s}", p.name);
    }
    for (name, t) in teacher.named_tensors() {
        assert!(
            grads.get(&t).is_none(),
            "teacher tensor {name} has a gradient"
        );
    }
    Ok(())
}

#[test]
fn loss_falls_and_the_student_folder_loads() -> Result<()> {
    let run = Run::new("falls")?;
    let mut cfg = small_cfg(30);
    cfg.checkpoint_every = 10;
    let mut seen = Vec::new();
    let report = train(
        &TrainJob::new(
            &teacher_dir(),
            &run.corpus,
            &run.out,
            &StudentConfig::default(),
            &cfg,
        ),
        |l| seen.push(l.step),
    )?;
    assert_eq!(report.steps_done, 30);
    assert_eq!(seen, (1..=30).collect::<Vec<_>>());
    let log = read_log(&run.out)?;
    assert_eq!(log.len(), 30);
    let mean = |xs: &[LogLine]| xs.iter().map(|l| l.kl).sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&log[..5]), mean(&log[25..]));
    assert!(
        last < 0.7 * first,
        "KL did not fall: first steps {first}, last steps {last}"
    );
    assert!(log
        .iter()
        .all(|l| l.loss.is_finite() && l.grad_norm > 0.0 && l.tokens_per_second > 0.0));

    // Kept: the last 3 checkpoints (steps 10, 20, 30).
    let kept: Vec<u64> = train::checkpoint::list(&run.out.join(train::CHECKPOINT_DIR))?
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, vec![10, 20, 30]);

    // The student folder is a loadable Hugging Face folder under the teacher's names.
    let dir = report
        .student_dir
        .expect("a finished run writes the student");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "quantization.json",
        "generation_config.json",
    ] {
        assert!(dir.join(f).is_file(), "student folder lacks {f}");
    }
    let q: QuantConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("quantization.json"))?)?;
    assert_eq!(q, StudentConfig::default().quant_config()?);
    let folder = ModelFolder::open(&dir)?;
    let student = Llama::load(&folder, q, &Device::Cpu)?;
    let ids = Tensor::from_vec(vec![1u32, 400, 20, 7], (1, 4), &Device::Cpu)?;
    let z = student.forward(&ids)?;
    assert_eq!(z.dims(), &[1, 4, 512]);
    // Its weights are the last checkpoint's.
    let ckpt = train::checkpoint::read_safetensors(
        &run.out
            .join(train::CHECKPOINT_DIR)
            .join("step-00000030")
            .join(train::checkpoint::STUDENT_FILE),
        &Device::Cpu,
    )?;
    let a = ckpt["model.layers.0.mlp.up_proj.weight"]
        .flatten_all()?
        .to_vec1::<f32>()?;
    let b = student.blocks[0]
        .mlp
        .up_proj
        .dense_weight()
        .expect("a qat student's weights are dense")
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(a, b);
    Ok(())
}

/// Trains `student` straight through into `run`'s "straight" folder and, in `run.out`,
/// stopped after `stop` steps and resumed to the end; asserts the resume and that both
/// students are byte-identical. Returns the uninterrupted run's folder.
fn straight_and_resumed(
    run: &Run,
    student: &StudentConfig,
    cfg: &TrainConfig,
    stop: u64,
) -> Result<PathBuf> {
    let straight = run.other_out("straight");
    let job = |out: &Path| TrainJob::new(&teacher_dir(), &run.corpus, out, student, cfg);
    train(&job(&straight), |_| {})?;
    let first = train(
        &TrainJob {
            stop_after: Some(stop),
            ..job(&run.out)
        },
        |_| {},
    )?;
    assert_eq!(
        (first.steps_done, first.student_dir.is_none()),
        (stop, true)
    );
    let second = train(&job(&run.out), |_| {})?;
    assert_eq!(
        (second.resumed_from, second.steps_done),
        (Some(stop), cfg.steps)
    );
    assert!(
        student_bytes(&straight)? == student_bytes(&run.out)?,
        "{:?}: the resumed student differs from the uninterrupted one",
        student.method
    );
    Ok(straight)
}

/// The bytes of a run's final student weights.
fn student_bytes(out: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(out.join(train::STUDENT_DIR).join("model.safetensors"))
}

#[test]
fn stopped_and_resumed_run_is_bit_identical() -> Result<()> {
    let run = Run::new("resume")?;
    let mut cfg = small_cfg(8);
    cfg.schedule = Schedule::Cosine;
    cfg.warmup_steps = 2;
    cfg.grad_accum = 2;
    cfg.weight_decay = 0.01;
    let student = StudentConfig::default();
    let straight = straight_and_resumed(&run, &student, &cfg, 3)?;
    let model = student_bytes;
    let ckpt = |out: &Path, f: &str| {
        std::fs::read(
            out.join(train::CHECKPOINT_DIR)
                .join("step-00000008")
                .join(f),
        )
    };
    assert!(ckpt(&straight, "optimizer.safetensors")? == ckpt(&run.out, "optimizer.safetensors")?);
    let losses = |out: &Path| -> Result<Vec<(u64, f64, f64)>> {
        Ok(read_log(out)?
            .iter()
            .map(|l| (l.step, l.loss, l.lr))
            .collect())
    };
    assert_eq!(losses(&straight)?, losses(&run.out)?);
    assert_eq!(losses(&run.out)?.len(), 8);

    // Rerunning a finished run trains nothing and rewrites the same student.
    let again = train(
        &TrainJob::new(&teacher_dir(), &run.corpus, &run.out, &student, &cfg),
        |_| {},
    )?;
    assert_eq!((again.resumed_from, again.steps_done), (Some(8), 8));
    assert!(model(&straight)? == model(&run.out)?);
    assert_eq!(read_log(&run.out)?.len(), 8);
    Ok(())
}

#[test]
fn broken_and_interrupted_checkpoints_are_skipped() -> Result<()> {
    let run = Run::new("broken")?;
    let cfg = small_cfg(6);
    let student = StudentConfig::default();
    train(
        &TrainJob {
            stop_after: Some(4),
            ..TrainJob::new(&teacher_dir(), &run.corpus, &run.out, &student, &cfg)
        },
        |_| {},
    )?;
    let root = run.out.join(train::CHECKPOINT_DIR);
    // Corrupt the newest checkpoint's weights (one byte), and fake two interrupted writes:
    // a temp folder and a step folder without manifest.
    let newest = root
        .join("step-00000004")
        .join(train::checkpoint::STUDENT_FILE);
    let mut bytes = std::fs::read(&newest)?;
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&newest, bytes)?;
    std::fs::create_dir_all(root.join(".step-00000006.tmp"))?;
    std::fs::create_dir_all(root.join("step-00000005"))?;
    std::fs::copy(
        root.join("step-00000002").join("state.json"),
        root.join("step-00000005").join("state.json"),
    )?;

    let r = train(
        &TrainJob::new(&teacher_dir(), &run.corpus, &run.out, &student, &cfg),
        |_| {},
    )?;
    assert_eq!((r.resumed_from, r.steps_done), (Some(2), 6));
    assert!(root.join("broken-step-00000004").is_dir());
    assert!(!root.join(".step-00000006.tmp").exists());
    // The log was rewritten from step 2 on: one line per step, no duplicates.
    let steps: Vec<u64> = read_log(&run.out)?.iter().map(|l| l.step).collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());

    // The same as a run that was never disturbed.
    let straight = run.other_out("straight");
    train(
        &TrainJob::new(&teacher_dir(), &run.corpus, &straight, &student, &cfg),
        |_| {},
    )?;
    let model = |out: &Path| std::fs::read(out.join(train::STUDENT_DIR).join("model.safetensors"));
    assert!(model(&straight)? == model(&run.out)?);
    Ok(())
}

#[test]
fn changed_settings_are_refused_naming_the_key() -> Result<()> {
    let run = Run::new("refuse")?;
    let cfg = small_cfg(2);
    train(
        &TrainJob::new(
            &teacher_dir(),
            &run.corpus,
            &run.out,
            &StudentConfig::default(),
            &cfg,
        ),
        |_| {},
    )?;
    let more = small_cfg(4);
    let w3 = StudentConfig {
        w_bits: 3,
        ..Default::default()
    };
    let err = format!(
        "{:#}",
        train(
            &TrainJob::new(&teacher_dir(), &run.corpus, &run.out, &w3, &more),
            |_| {}
        )
        .unwrap_err()
    );
    assert!(
        err.contains("student.w_bits") && err.contains("step-00000002"),
        "{err}"
    );
    let mut lr = small_cfg(4);
    lr.lr = 1e-3;
    let err = format!(
        "{:#}",
        train(
            &TrainJob::new(
                &teacher_dir(),
                &run.corpus,
                &run.out,
                &StudentConfig::default(),
                &lr
            ),
            |_| {}
        )
        .unwrap_err()
    );
    assert!(err.contains("train.lr"), "{err}");
    // More steps with the same settings is fine.
    let r = train(
        &TrainJob::new(
            &teacher_dir(),
            &run.corpus,
            &run.out,
            &StudentConfig::default(),
            &more,
        ),
        |_| {},
    )?;
    assert_eq!((r.resumed_from, r.steps_done), (Some(2), 4));
    Ok(())
}

#[test]
fn non_finite_loss_stops_naming_the_step_and_keeps_checkpoints() -> Result<()> {
    let run = Run::new("nan")?;
    let mut cfg = small_cfg(6);
    cfg.lr = 1e30;
    cfg.checkpoint_every = 1;
    let err = train(
        &TrainJob::new(
            &teacher_dir(),
            &run.corpus,
            &run.out,
            &StudentConfig::default(),
            &cfg,
        ),
        |_| {},
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("step 2:") && msg.contains("step-00000001"),
        "{msg}"
    );
    assert!(run
        .out
        .join(train::CHECKPOINT_DIR)
        .join("step-00000001")
        .join("manifest.json")
        .is_file());
    assert!(!run.out.join(train::STUDENT_DIR).exists());
    Ok(())
}

#[test]
fn pad_packing_trains_and_corrupt_shards_are_named() -> Result<()> {
    let run = Run::new("pad")?;
    let mut cfg = small_cfg(2);
    cfg.packing = Packing::Pad;
    cfg.seq_len = 48;
    let r = train(
        &TrainJob::new(
            &teacher_dir(),
            &run.corpus,
            &run.out,
            &StudentConfig::default(),
            &cfg,
        ),
        |_| {},
    )?;
    assert!(r.final_loss.is_finite());

    let shard = run.corpus.join(corpus::shard_file_name(1));
    let mut bytes = std::fs::read(&shard)?;
    bytes[100] ^= 1;
    std::fs::write(&shard, bytes)?;
    let err = train(
        &TrainJob::new(
            &teacher_dir(),
            &run.corpus,
            &run.other_out("x"),
            &StudentConfig::default(),
            &cfg,
        ),
        |_| {},
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("shard-00001.parquet") && msg.contains("corrupt"),
        "{msg}"
    );
    Ok(())
}

/// Throughput at batch 8 x seq_len 256 (run with `--ignored --nocapture`); prints the numbers.
#[test]
#[ignore]
fn throughput_8x256() -> Result<()> {
    let run = Run::new("speed")?;
    let mut cfg = TrainConfig::new(6, 8, 256);
    cfg.log_every = 1;
    cfg.checkpoint_every = 100;
    let mut lines = Vec::new();
    let r = train(
        &TrainJob::new(
            &teacher_dir(),
            &run.corpus,
            &run.out,
            &StudentConfig::default(),
            &cfg,
        ),
        |l| lines.push(l.clone()),
    )?;
    // The first step warms up allocations; report the rest.
    let tps: Vec<f64> = lines[1..].iter().map(|l| l.tokens_per_second).collect();
    let mean = tps.iter().sum::<f64>() / tps.len() as f64;
    println!(
        "batch 8 x 256: {mean:.0} tokens/s, {:.3} s/step (overall {:.0} tokens/s)",
        2048.0 / mean,
        r.tokens_per_second
    );
    Ok(())
}

fn kill_cfg() -> TrainConfig {
    let mut c = small_cfg(10);
    c.checkpoint_every = 1;
    c.keep_checkpoints = 2;
    c.schedule = Schedule::Linear;
    c
}

/// The training process that `sigkill_at_any_moment_resumes_bit_identically` kills: this test
/// binary itself, run with `--ignored --exact kill_child` and TRAIN_KILL_DIR set.
#[test]
#[ignore]
fn kill_child() -> Result<()> {
    let Some(dir) = std::env::var_os("TRAIN_KILL_DIR") else {
        return Ok(());
    };
    let dir = PathBuf::from(dir);
    train(
        &TrainJob::new(
            &teacher_dir(),
            &dir.join("corpus"),
            &dir.join("out"),
            &StudentConfig::default(),
            &kill_cfg(),
        ),
        |_| {},
    )?;
    Ok(())
}

#[test]
fn sigkill_at_any_moment_resumes_bit_identically() -> Result<()> {
    let run = Run::new("kill")?;
    let root = run
        .corpus
        .parent()
        .expect("corpus has a parent")
        .to_path_buf();
    let straight = run.other_out("straight");
    train(
        &TrainJob::new(
            &teacher_dir(),
            &run.corpus,
            &straight,
            &StudentConfig::default(),
            &kill_cfg(),
        ),
        |_| {},
    )?;

    let exe = std::env::current_exe()?;
    let spawn = || {
        std::process::Command::new(&exe)
            .args(["--ignored", "--exact", "kill_child", "--nocapture"])
            .env("TRAIN_KILL_DIR", &root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
    };
    // Kill after varying delays (Child::kill is SIGKILL), so kills land in every phase: start-up,
    // steps, checkpoint writes, pruning, the final export. Each restart resumes and gets further.
    let mut kills = 0;
    let mut finished = false;
    for round in 0..40u64 {
        let mut child = spawn()?;
        std::thread::sleep(std::time::Duration::from_millis(60 + (round * 71) % 400));
        if let Some(status) = child.try_wait()? {
            assert!(status.success(), "the training child failed: {status}");
            finished = true;
            break;
        }
        child.kill()?;
        child.wait()?;
        kills += 1;
    }
    if !finished {
        let status = spawn()?.wait()?;
        assert!(
            status.success(),
            "the final training child failed: {status}"
        );
    }
    eprintln!("killed the training child {kills} times");
    assert!(kills > 0, "the child finished before it could be killed");
    let model = |out: &Path| std::fs::read(out.join(train::STUDENT_DIR).join("model.safetensors"));
    assert!(
        model(&straight)? == model(&run.out)?,
        "killed {kills} times: the student differs"
    );
    let losses = |out: &Path| -> Result<Vec<(u64, f64)>> {
        Ok(read_log(out)?.iter().map(|l| (l.step, l.loss)).collect())
    };
    assert_eq!(losses(&straight)?, losses(&run.out)?);
    Ok(())
}

/// An `lrqat` student (keys as a user writes them): stopped and resumed it ends byte-identical
/// to an uninterrupted run; its checkpoints hold only A, B and the scale multipliers; the
/// merged student folder is integers times per-channel scales and gives bit-identical logits
/// to the trained (unmerged) student rebuilt from its last checkpoint.
#[test]
fn lrqat_resumes_bit_identically_and_merges_exactly() -> Result<()> {
    let run = Run::new("lrqat")?;
    let cfg = small_cfg(6);
    let student: StudentConfig = serde_json::from_str(
        r#"{"method": "lrqat", "w_bits": 4, "lora_rank": 4, "lora_alpha": 4, "phi_dtype": "int8"}"#,
    )?;
    student.validate()?;
    let straight = straight_and_resumed(&run, &student, &cfg, 3)?;

    let dev = Device::Cpu;
    let ck = train::checkpoint::read_safetensors(
        &straight
            .join(train::CHECKPOINT_DIR)
            .join("step-00000006")
            .join(train::checkpoint::STUDENT_FILE),
        &dev,
    )?;
    // 5 layers x 7 projections x (A, B, m).
    assert_eq!(ck.len(), 105);
    assert!(ck.keys().all(|k| k.contains(".lrqat_")), "{:?}", ck.keys());
    let folder = ModelFolder::open(&teacher_dir())?;
    let teacher = folder.load_tensors(&dev)?;
    let q = student.quant_config()?;
    let trained = train::Student::build(
        &student,
        &folder.config,
        &q,
        &ck,
        &teacher,
        true,
        None,
        &cfg,
        "checkpoint",
        &dev,
    )?;
    let merged_dir = straight.join(train::STUDENT_DIR);
    let merged = Llama::load(&ModelFolder::open(&merged_dir)?, QuantConfig::none(), &dev)?;
    let ids = Tensor::new(&[[1u32, 403, 27, 95, 300, 12, 7, 250, 44, 2]], &dev)?;
    let (a, b) = (trained.model.forward(&ids)?, merged.forward(&ids)?);
    assert_eq!(
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?,
        "merged logits differ from the trained student's"
    );
    // The merged weights are integers in [-8, 7] times one scale per output channel, stored
    // packed (packed.json names the grids).
    assert!(merged_dir.join(quant::packed::HEADER_FILE).is_file());
    let w = ModelFolder::open(&merged_dir)?.load_tensors(&dev)?;
    let up = w["model.layers.0.mlp.up_proj.weight"].to_vec2::<f32>()?;
    for row in &up {
        let levels: std::collections::BTreeSet<u32> =
            row.iter().map(|v| (v + 0.0).to_bits()).collect();
        assert!(levels.len() <= 16, "{} values in a row", levels.len());
    }
    Ok(())
}

/// An `lrqat` student with K/V equalization: its frozen Phi0 is made from the equalized
/// weights, recomputed on resume (it is not checkpointed), so a stopped and resumed run ends
/// byte-identical to an uninterrupted one; and the equalization changed the student.
#[test]
fn lrqat_with_kv_equalization_resumes_bit_identically() -> Result<()> {
    let run = Run::new("lrqat_kveq")?;
    let mut cfg = small_cfg(4);
    cfg.kv_equalize = 0.5;
    let student: StudentConfig = serde_json::from_str(
        r#"{"method": "lrqat", "w_bits": 4, "lora_rank": 4, "lora_alpha": 4, "kv_bits": 4}"#,
    )?;
    student.validate()?;
    let straight = straight_and_resumed(&run, &student, &cfg, 2)?;
    let plain = run.other_out("plain");
    cfg.kv_equalize = 0.0;
    train(
        &TrainJob::new(&teacher_dir(), &run.corpus, &plain, &student, &cfg),
        |_| {},
    )?;
    assert!(
        student_bytes(&plain)? != student_bytes(&straight)?,
        "K/V equalization left the lrqat student unchanged"
    );
    Ok(())
}

/// `scale_init = "mse"`: the start scales are the least-error clip, recomputed from the
/// teacher on resume (s0 is not checkpointed), so a stopped and resumed run ends
/// byte-identical to an uninterrupted one; and the start differs from MinMax's.
#[test]
fn lrqat_mse_start_resumes_bit_identically() -> Result<()> {
    let run = Run::new("lrqat_mse")?;
    let cfg = small_cfg(4);
    let spec = |init: &str| -> Result<StudentConfig> {
        let s: StudentConfig = serde_json::from_str(&format!(
            r#"{{"method": "lrqat", "w_bits": 3, "lora_rank": 4, "lora_alpha": 4, "scale_init": "{init}"}}"#
        ))?;
        s.validate()?;
        Ok(s)
    };
    let straight = straight_and_resumed(&run, &spec("mse")?, &cfg, 2)?;
    let minmax = run.other_out("minmax");
    train(
        &TrainJob::new(&teacher_dir(), &run.corpus, &minmax, &spec("minmax")?, &cfg),
        |_| {},
    )?;
    assert!(
        student_bytes(&minmax)? != student_bytes(&straight)?,
        "the MSE start left the lrqat student as MinMax's"
    );
    Ok(())
}

/// `scale_lr_ratio` scales the learning rate of an lrqat student's scale multipliers alone:
/// at 0 they stay at their start (1), while A and B train as at the default ratio.
#[test]
fn lrqat_scale_lr_ratio_moves_only_the_scales() -> Result<()> {
    let run = Run::new("lrqat_scale_lr")?;
    let cfg = small_cfg(2);
    let spec = |extra: &str| -> Result<StudentConfig> {
        let s: StudentConfig = serde_json::from_str(&format!(
            r#"{{"method": "lrqat", "w_bits": 4, "lora_rank": 4, "lora_alpha": 4{extra}}}"#
        ))?;
        s.validate()?;
        Ok(s)
    };
    let last = |out: &Path| {
        train::checkpoint::read_safetensors(
            &out.join(train::CHECKPOINT_DIR)
                .join("step-00000002")
                .join(train::checkpoint::STUDENT_FILE),
            &Device::Cpu,
        )
    };
    let (frozen, free) = (run.other_out("frozen"), run.other_out("free"));
    for (out, extra) in [(&frozen, r#", "scale_lr_ratio": 0.0"#), (&free, "")] {
        train(
            &TrainJob::new(&teacher_dir(), &run.corpus, out, &spec(extra)?, &cfg),
            |_| {},
        )?;
    }
    let (a, b) = (last(&frozen)?, last(&free)?);
    let m = "model.layers.0.self_attn.q_proj.lrqat_m";
    let ones = |t: &Tensor| -> Result<bool> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().all(|&v| v == 1.0))
    };
    assert!(ones(&a[m])?, "ratio 0: the multipliers moved");
    assert!(!ones(&b[m])?, "ratio 1: the multipliers did not move");
    let bkey = "model.layers.0.self_attn.q_proj.lrqat_B.weight";
    assert!(
        a[bkey].abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
        "ratio 0: B did not train"
    );
    Ok(())
}

/// `cfg` on `ranks` CPU ranks (threads), optionally stopping after a step.
fn ranks_job(
    run: &Run,
    out: &Path,
    cfg: &TrainConfig,
    ranks: usize,
    stop_after: Option<u64>,
) -> TrainJob {
    TrainJob {
        computes: vec![model::Compute::cpu(); ranks],
        stop_after,
        ..TrainJob::new(
            &teacher_dir(),
            &run.corpus,
            out,
            &StudentConfig::default(),
            cfg,
        )
    }
}

#[test]
fn two_cpu_ranks_follow_the_one_rank_loss_curve() -> Result<()> {
    let run = Run::new("ranks")?;
    let float = StudentConfig {
        w_bits: 16,
        a_bits: 16,
        kv_bits: 16,
        ..StudentConfig::default()
    };
    // Concat rows with gradient accumulation, and padded rows whose slices hold unequal
    // token counts (the ranks' gradients weigh by tokens). Two ranks add in another order,
    // and a 4-bit student's weights then land on other grid points within a few steps (its
    // curve moves by percents from step 3 here), so it is compared over 2 steps only.
    for (name, packing, grad_accum, student, steps) in [
        ("concat", Packing::Concat, 2, &float, 6),
        ("pad", Packing::Pad, 1, &float, 6),
        ("w4a8kv4", Packing::Concat, 1, &StudentConfig::default(), 2),
    ] {
        let mut cfg = small_cfg(steps);
        cfg.packing = packing;
        cfg.grad_accum = grad_accum;
        let one = run.other_out(&format!("{name}-1"));
        let two = run.other_out(&format!("{name}-2"));
        let job = |out: &Path, ranks| TrainJob {
            student: student.clone(),
            ..ranks_job(&run, out, &cfg, ranks, None)
        };
        train(&job(&one, 1), |_| {})?;
        let mut seen = Vec::new();
        train(&job(&two, 2), |l| seen.push(l.step))?;
        assert_eq!(
            seen,
            (1..=steps).collect::<Vec<_>>(),
            "rank 0 logs every step once"
        );
        let (a, b) = (read_log(&one)?, read_log(&two)?);
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            // The gradient norm sums squares of many small, noisier components.
            for (what, p, q, tol) in [
                ("loss", x.loss, y.loss, 1e-4),
                ("grad_norm", x.grad_norm, y.grad_norm, 1e-3),
            ] {
                assert!(
                    (p - q).abs() <= tol * p.abs(),
                    "{name} step {}: {what} {p} with one rank, {q} with two",
                    x.step
                );
            }
        }
        assert!(two
            .join(train::STUDENT_DIR)
            .join("model.safetensors")
            .is_file());
    }
    Ok(())
}

#[test]
fn two_ranks_stopped_and_resumed_end_with_the_uninterrupted_student() -> Result<()> {
    let run = Run::new("ranks-resume")?;
    let mut cfg = small_cfg(6);
    cfg.schedule = Schedule::Cosine;
    cfg.warmup_steps = 2;
    let straight = run.other_out("straight");
    train(&ranks_job(&run, &straight, &cfg, 2, None), |_| {})?;
    let first = train(&ranks_job(&run, &run.out, &cfg, 2, Some(3)), |_| {})?;
    assert_eq!((first.steps_done, first.student_dir.is_none()), (3, true));
    let second = train(&ranks_job(&run, &run.out, &cfg, 2, None), |_| {})?;
    assert_eq!((second.resumed_from, second.steps_done), (Some(3), 6));
    let model = |out: &Path| std::fs::read(out.join(train::STUDENT_DIR).join("model.safetensors"));
    assert!(
        model(&straight)? == model(&run.out)?,
        "resumed two-rank student differs from the uninterrupted one"
    );
    let log = |out: &Path| std::fs::read_to_string(out.join(train::LOG_FILE));
    let strip = |t: String| -> Vec<(u64, f64)> {
        t.lines()
            .map(|l| serde_json::from_str::<LogLine>(l).unwrap())
            .map(|l| (l.step, l.loss))
            .collect()
    };
    assert_eq!(strip(log(&straight)?), strip(log(&run.out)?));
    Ok(())
}

#[test]
fn a_batch_that_does_not_split_over_the_ranks_is_refused() -> Result<()> {
    let run = Run::new("ranks-split")?;
    let cfg = small_cfg(1);
    let err = train(&ranks_job(&run, &run.out, &cfg, 3, None), |_| {}).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("train.batch = 4") && msg.contains("3 ranks"),
        "{msg}"
    );
    Ok(())
}

/// Each rank of a launch (`train_launched`) as a thread here, summing through `ThreadRanks`:
/// the path a process of a torchrun-style launch takes, with NCCL replaced by the host sum.
fn launched(jobs: Vec<TrainJob>) -> Vec<Result<train::TrainReport>> {
    let ranks = train::parallel::ThreadRanks::new(jobs.len());
    let handles: Vec<_> = jobs
        .into_iter()
        .zip(ranks)
        .map(|(job, r)| std::thread::spawn(move || train::train_launched(&job, &r, |_| {})))
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn launched_ranks_train_and_resume_like_threaded_ranks() -> Result<()> {
    let run = Run::new("launched")?;
    let mut cfg = small_cfg(6);
    cfg.schedule = Schedule::Cosine;
    cfg.warmup_steps = 2;
    let threads = run.other_out("threads");
    train(&ranks_job(&run, &threads, &cfg, 2, None), |_| {})?;
    // Stopped after step 3 and resumed: rank 1 finds rank 0's checkpoint.
    for stop in [Some(3), None] {
        let jobs = (0..2)
            .map(|_| ranks_job(&run, &run.out, &cfg, 1, stop))
            .collect();
        let reports = launched(jobs).into_iter().collect::<Result<Vec<_>>>()?;
        assert_eq!(reports[1].student_dir, None, "rank 1 writes no student");
        if stop.is_none() {
            assert_eq!(
                (reports[0].resumed_from, reports[1].resumed_from),
                (Some(3), Some(3))
            );
        }
    }
    let model = |out: &Path| std::fs::read(out.join(train::STUDENT_DIR).join("model.safetensors"));
    assert!(
        model(&threads)? == model(&run.out)?,
        "the launched ranks' student differs from the threaded ranks'"
    );
    let losses = |out: &Path| -> Result<Vec<(u64, f64)>> {
        Ok(read_log(out)?.iter().map(|l| (l.step, l.loss)).collect())
    };
    assert_eq!(losses(&threads)?, losses(&run.out)?);
    Ok(())
}

#[test]
fn launched_ranks_that_disagree_or_fail_to_prepare_all_stop() -> Result<()> {
    let run = Run::new("launched-bad")?;
    let cfg = small_cfg(2);
    let mut other = cfg.clone();
    other.lr = 1e-3;
    let errors = |results: Vec<Result<train::TrainReport>>| -> Vec<String> {
        results
            .into_iter()
            .map(|r| format!("{:#}", r.expect_err("a rank went on")))
            .collect()
    };
    // Another learning rate on rank 1: another job.
    let jobs = vec![
        ranks_job(&run, &run.out, &cfg, 1, None),
        ranks_job(&run, &run.out, &other, 1, None),
    ];
    for e in errors(launched(jobs)) {
        assert!(e.contains("do not agree on the run"), "{e}");
    }
    // Rank 1 cannot open its teacher; rank 0 stops too, and says why.
    let mut broken = ranks_job(&run, &run.other_out("b"), &cfg, 1, None);
    broken.teacher = run.other_out("no-such-teacher");
    let jobs = vec![ranks_job(&run, &run.other_out("b"), &cfg, 1, None), broken];
    let e = errors(launched(jobs));
    assert!(
        e[0].contains("1 of the 2 ranks could not prepare"),
        "{}",
        e[0]
    );
    assert!(e[1].contains("no-such-teacher"), "{}", e[1]);
    Ok(())
}
