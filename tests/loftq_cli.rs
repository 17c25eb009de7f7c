//! LoftQ students end to end: `pipeline quantize --loftq-rank` makes the base and its initial
//! adapters (checked against peft's LoftQ where torch, bitsandbytes and peft install), the
//! report carries both reconstruction errors, a `loftq` student starts from those adapters
//! (lower loss than QLoRA's zero start), a run killed at random moments ends byte-identical,
//! and settings that do not fit the base fail naming the key.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn teacher() -> PathBuf {
    shared().join("models/stories260k")
}

fn run_ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "{args:?} failed: {}", stderr(&o));
    stdout(&o)
}

fn run_err(args: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "{args:?} should have failed");
    stderr(&o)
}

fn sha256(p: &Path) -> String {
    corpus::fsio::sha256_bytes(&std::fs::read(p).unwrap())
}

fn quantize(out: &Path, format: &str, extra: &[&str]) -> serde_json::Value {
    let t = teacher();
    let mut args = vec![
        "quantize",
        "--model",
        t.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        format,
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(run_ok(&args).trim()).unwrap()
}

/// A small corpus for the training tests of this file.
fn corpus() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let c = temp_dir("loftq_corpus").join("corpus");
        let t = teacher();
        run_ok(&[
            "generate",
            "--teacher",
            t.to_str().unwrap(),
            "--out",
            c.to_str().unwrap(),
            "--samples",
            "48",
            "--max-tokens",
            "64",
            "--shard-size",
            "16",
            "--seed",
            "9",
        ]);
        c
    })
    .clone()
}

fn train(out: &Path, method: &str, base: &Path, extra: &[&str]) -> std::process::Output {
    let (t, c) = (teacher(), corpus());
    let mut args = vec![
        "train",
        "--teacher",
        t.to_str().unwrap(),
        "--corpus",
        c.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--method",
        method,
        "--base",
        base.to_str().unwrap(),
        "--steps",
        "4",
        "--batch",
        "4",
        "--seq-len",
        "64",
        "--lr",
        "1e-3",
        "--log-every",
        "1",
    ];
    // r = 8, alpha = 8 (the bases' LoftQ settings) unless the test says otherwise.
    if !extra.contains(&"--lora-rank") {
        args.extend_from_slice(&["--lora-rank", "8"]);
    }
    if !extra.contains(&"--lora-alpha") {
        args.extend_from_slice(&["--lora-alpha", "8"]);
    }
    args.extend_from_slice(extra);
    run(&args)
}

fn first_loss(dir: &Path) -> f64 {
    let log = std::fs::read_to_string(dir.join("train_log.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    first["loss"].as_f64().unwrap()
}

#[test]
fn loftq_base_matches_peft_and_reports_both_errors() {
    let d = temp_dir("loftq_peft");
    // peft's setting: NF4 without double quantization, T = 1, alpha = r.
    let b = d.join("nf4");
    let r = quantize(&b, "nf4", &["--loftq-rank", "8", "--loftq-iters", "1"]);
    let l = &r["loftq"];
    assert_eq!(
        (l["rank"].as_u64(), l["matrices"].as_u64()),
        (Some(8), Some(35))
    );
    for t in r["tensors"].as_array().unwrap() {
        let (plain, loftq) = (
            t["plain_rel_error"].as_f64().unwrap(),
            t["loftq_rel_error"].as_f64().unwrap(),
        );
        assert!(loftq < plain, "{t}");
        // With T = 1 the base is plain quantization.
        assert!(
            (t["rel_error"].as_f64().unwrap() - plain).abs() < 1e-9,
            "{t}"
        );
    }
    let adapters = candle_core::safetensors::load(
        b.join("loftq_adapters.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(adapters.len(), 70);
    assert_eq!(
        adapters["model.layers.0.mlp.up_proj.lora_A.weight"].dims(),
        [8, 64]
    );
    assert_eq!(
        adapters["model.layers.0.mlp.up_proj.lora_B.weight"].dims(),
        [172, 8]
    );

    // At T = 1 the base is byte for byte the plain quantization.
    let plain = d.join("plain");
    quantize(&plain, "nf4", &[]);
    assert_eq!(
        sha256(&b.join("model.safetensors")),
        sha256(&plain.join("model.safetensors"))
    );

    // NF2 with T = 5: the plain error is plain NF2's, LoftQ's is lower, and the run is
    // deterministic.
    let (n2, n2b) = (d.join("nf2"), d.join("nf2-again"));
    let r2 = quantize(&n2, "nf2", &["--double-quant", "--loftq-rank", "16"]);
    quantize(&n2b, "nf2", &["--double-quant", "--loftq-rank", "16"]);
    for f in ["model.safetensors", "loftq_adapters.safetensors"] {
        assert_eq!(sha256(&n2.join(f)), sha256(&n2b.join(f)), "{f}");
    }
    let p2 = quantize(&d.join("nf2-plain"), "nf2", &["--double-quant"]);
    for (a, b) in r2["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .zip(p2["tensors"].as_array().unwrap())
    {
        assert_eq!(a["name"], b["name"]);
        assert!(
            (a["plain_rel_error"].as_f64().unwrap() - b["rel_error"].as_f64().unwrap()).abs()
                < 1e-6
        );
    }
    let ratio = r2["loftq"]["error_ratio"].as_f64().unwrap();
    eprintln!("NF2 r = 16 T = 5: LoftQ / plain error {ratio:.3}");
    assert!(ratio < 0.7, "{ratio}");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/loftq_check.py");
    let t = teacher();
    match std::process::Command::new("python3")
        .args([script.as_os_str(), t.as_os_str(), b.as_os_str()])
        .output()
    {
        Ok(o) if o.status.code() == Some(3) => eprintln!(
            "SKIPPED: the LoftQ cross-check needs python3 with torch, bitsandbytes and peft ({})",
            stderr(&o).trim()
        ),
        Err(e) => eprintln!("SKIPPED: python3 cannot be started ({e})"),
        Ok(o) => {
            assert!(o.status.success(), "loftq_check.py failed: {}", stderr(&o));
            eprintln!("peft cross-check: {}", stdout(&o).trim());
        }
    }
}

#[test]
fn loftq_student_starts_from_its_adapters_and_bad_settings_fail() {
    let d = temp_dir("loftq_train");
    let lb = d.join("loftq-base");
    quantize(
        &lb,
        "nf2",
        &["--double-quant", "--loftq-rank", "8", "--loftq-iters", "5"],
    );
    let pb = d.join("plain-base");
    quantize(&pb, "nf2", &["--double-quant"]);

    let o = train(&d.join("loftq"), "loftq", &lb, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(&d.join("qlora"), "qlora", &pb, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (lq, ql) = (first_loss(&d.join("loftq")), first_loss(&d.join("qlora")));
    eprintln!("first-step loss: LoftQ {lq:.4}, QLoRA {ql:.4}");
    assert!(lq < ql, "LoftQ {lq} >= QLoRA {ql}");

    // An NF2 base is ours (packed): a PEFT export would not load, the merged one does.
    let lq = d.join("loftq");
    let e = run_err(&[
        "export",
        "--student",
        lq.to_str().unwrap(),
        "--out",
        d.join("ex").to_str().unwrap(),
        "--format",
        "peft",
    ]);
    assert!(
        e.contains("cannot load (only nf4 in the bnb layout)"),
        "{e}"
    );
    run_ok(&[
        "export",
        "--student",
        lq.to_str().unwrap(),
        "--out",
        d.join("ex-hf").to_str().unwrap(),
        "--format",
        "hf",
    ]);

    let err = |name: &str, method: &str, base: &Path, extra: &[&str], want: &str| {
        let o = train(&d.join(name), method, base, extra);
        assert!(!o.status.success(), "{name} should have failed");
        let e = stderr(&o);
        assert!(e.contains(want), "{name}: wanted {want:?} in:\n{e}");
    };
    err("plain", "loftq", &pb, &[], "needs a base made with LoftQ");
    err(
        "rank",
        "loftq",
        &lb,
        &["--lora-rank", "4", "--lora-alpha", "4"],
        "student.lora_rank = 4, but the base",
    );
    err(
        "alpha",
        "loftq",
        &lb,
        &["--lora-alpha", "16"],
        "student.lora_alpha = 16",
    );
    err(
        "iters",
        "loftq",
        &lb,
        &["--loftq-iters", "2"],
        "student.loftq_iters = 2",
    );
    err(
        "iters0",
        "loftq",
        &lb,
        &["--loftq-iters", "0"],
        "student.loftq_iters = 0",
    );
    err(
        "targets",
        "loftq",
        &lb,
        &["--lora-targets", "q_proj,v_proj"],
        "student.lora_targets",
    );
    err(
        "qlora_iters",
        "qlora",
        &pb,
        &["--loftq-iters", "3"],
        "student.loftq_iters is a key of method \"loftq\"",
    );
    err("qlora_on_loftq", "qlora", &lb, &[], "was made with LoftQ");

    let t = teacher();
    let q = |out: &str, extra: &[&str]| -> String {
        let o = d.join(out);
        let mut args = vec![
            "quantize",
            "--model",
            t.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
            "--format",
            "nf2",
        ];
        args.extend_from_slice(extra);
        run_err(&args)
    };
    assert!(q("r0", &["--loftq-rank", "0"]).contains("rank = 0"));
    assert!(q("r100", &["--loftq-rank", "100"]).contains("needs a matrix with both sides >= 100"));
    assert!(
        q("tg", &["--loftq-rank", "4", "--lora-targets", "q_proj,mlp"])
            .contains("\"mlp\" is not a projection")
    );
    assert!(q("it", &["--loftq-iters", "3"]).contains("--loftq-rank"));
    // A folder made with other LoftQ settings is never overwritten.
    let before = sha256(&lb.join("loftq_adapters.safetensors"));
    let e = run_err(&[
        "quantize",
        "--model",
        t.to_str().unwrap(),
        "--out",
        lb.to_str().unwrap(),
        "--format",
        "nf2",
        "--double-quant",
        "--loftq-rank",
        "4",
    ]);
    assert!(e.contains("different quantization (loftq = "), "{e}");
    assert_eq!(before, sha256(&lb.join("loftq_adapters.safetensors")));
}

/// `pipeline run` of a LoftQ student, SIGKILLed at random moments (LoftQ's quantize stage
/// included) and finished: base, initial and trained adapters and student equal an
/// uninterrupted run's.
#[test]
fn loftq_run_survives_sigkill_byte_identical() {
    let d = temp_dir("loftq_kill");
    let s = shared();
    let write = |name: &str| -> PathBuf {
        let dir = d.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("p.toml");
        std::fs::write(
            &p,
            format!(
                "[run]\nname = \"k\"\ndirectory = \"{}\"\n[teacher]\nmodel = \"{}\"\n\
                 [generate]\nsamples = 48\nmax_tokens = 48\nshard_size = 16\nseed = 4\n\
                 [quantize]\nformat = \"nf3\"\n\
                 [student]\nmethod = \"loftq\"\nlora_rank = 8\nlora_alpha = 8\nloftq_iters = 3\n\
                 [train]\nsteps = 200\nbatch = 4\nseq_len = 48\nlr = 2e-3\nschedule = \"cosine\"\n\
                 warmup_steps = 5\nlog_every = 10\ncheckpoint_every = 3\nkeep_checkpoints = 2\n\
                 [eval]\ntext = \"{}\"\nmax_tokens = 1000\n",
                dir.join("run").display(),
                s.join("models/stories260k").display(),
                s.join("data/tinystories-valid-64k.txt").display()
            ),
        )
        .unwrap();
        p
    };
    let (pa, pb) = (write("a"), write("b"));
    run_ok(&["run", pa.to_str().unwrap()]);
    let report = std::fs::read_to_string(d.join("a/run/eval/report.md")).unwrap_or_default();
    assert!(report.contains("LoftQ base"), "{report}");
    let kills = kill_at_random_moments(
        &["run", pb.to_str().unwrap()],
        10,
        0x2545f4914f6cdd1d,
        100,
        1000,
    );
    eprintln!("{kills} kills");
    assert!(kills >= 7, "only {kills} runs were still going when killed");
    run_ok(&["run", pb.to_str().unwrap()]);
    for f in [
        "run/base/model.safetensors",
        "run/base/loftq_adapters.safetensors",
        "run/train/adapter/adapter_model.safetensors",
        "run/train/student/model.safetensors",
    ] {
        assert_eq!(
            sha256(&d.join("a").join(f)),
            sha256(&d.join("b").join(f)),
            "{f} differs after kills"
        );
    }
}
