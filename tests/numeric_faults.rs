//! Numeric faults: NaN or infinity in the teacher's weights, token ids outside the vocabulary
//! in a corpus, a NaN loss and an infinite gradient. Each stops with the tensor, shard or step
//! named, keeps every checkpoint written before it, and (once the fault is gone) the same
//! command resumes to the bytes of a run that never failed.

mod common;
use common::*;
use std::path::Path;

fn teacher() -> String {
    shared().join("models/stories260k").display().to_string()
}

fn generate(teacher: &str, out: &Path) -> std::process::Output {
    let o = out.display().to_string();
    run(&[
        "generate",
        "--teacher",
        teacher,
        "--out",
        &o,
        "--samples",
        "8",
        "--max-tokens",
        "16",
        "--shard-size",
        "4",
    ])
}

fn train(corpus: &Path, out: &Path, fault: Option<&str>) -> std::process::Output {
    let t = teacher();
    let (c, o) = (corpus.display().to_string(), out.display().to_string());
    let mut cmd = bin();
    cmd.args([
        "train",
        "--teacher",
        &t,
        "--corpus",
        &c,
        "--out",
        &o,
        "--steps",
        "4",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        "10",
    ]);
    cmd.env_remove("PIPELINE_INJECT_FAULT");
    if let Some(f) = fault {
        cmd.env("PIPELINE_INJECT_FAULT", f);
    }
    cmd.output().unwrap()
}

/// Overwrites one f32 of `tensor` in a safetensors file with `value`.
fn poison(file: &Path, tensor: &str, index: usize, value: f32) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header[tensor]["dtype"], "F32");
    let start = header[tensor]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n + 4 * index;
    bytes[start..start + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(file, bytes).unwrap();
}

fn fails_with(o: &std::process::Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "succeeded:\n{err}");
    for n in needles {
        assert!(err.contains(n), "error lacks {n:?}:\n{err}");
    }
    err
}

#[test]
fn nan_or_inf_in_teacher_weights_is_named_by_every_stage_that_loads_it() {
    let dir = temp_dir("fault_teacher");
    let t = dir.join("teacher");
    copy_model(&shared().join("models/stories260k"), &t);
    let ts = t.display().to_string();
    let corpus = dir.join("corpus");
    assert!(generate(&teacher(), &corpus).status.success());
    for (value, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        copy_model(&shared().join("models/stories260k"), &t);
        poison(
            &t.join("model.safetensors"),
            "model.layers.2.mlp.up_proj.weight",
            77,
            value,
        );
        let needles = ["model.layers.2.mlp.up_proj.weight", "index 77", shown];
        fails_with(&generate(&ts, &dir.join(format!("c-{shown}"))), &needles);
        let (c, o) = (
            corpus.display().to_string(),
            dir.join("tr").display().to_string(),
        );
        fails_with(
            &run(&[
                "train",
                "--teacher",
                &ts,
                "--corpus",
                &c,
                "--out",
                &o,
                "--steps",
                "1",
                "--batch",
                "1",
                "--seq-len",
                "8",
            ]),
            &needles,
        );
        let text = shared()
            .join("data/tinystories-valid-64k.txt")
            .display()
            .to_string();
        fails_with(
            &run(&[
                "eval",
                "--model",
                &ts,
                "--text",
                &text,
                "--max-tokens",
                "200",
            ]),
            &needles,
        );
    }
}

#[test]
fn token_ids_outside_the_vocabulary_name_the_shard_and_sample() {
    let dir = temp_dir("fault_tokens");
    // tinystories-656k's vocabulary (2048) is larger than stories260k's (512).
    let big = shared()
        .join("models/tinystories-656k")
        .display()
        .to_string();
    let corpus = dir.join("corpus");
    assert!(generate(&big, &corpus).status.success());
    let err = fails_with(
        &train(&corpus, &dir.join("train"), None),
        &["shard-0000", "token id", "vocabulary of 512"],
    );
    assert!(err.contains("sample"), "{err}");
    assert!(!dir.join("train/student").exists());
}

#[test]
fn a_nan_loss_or_infinite_gradient_stops_naming_the_step_and_keeps_every_checkpoint() {
    let dir = temp_dir("fault_train");
    let corpus = dir.join("corpus");
    assert!(generate(&teacher(), &corpus).status.success());
    let clean = dir.join("clean");
    assert!(train(&corpus, &clean, None).status.success());
    let student = |d: &Path| std::fs::read(d.join("student/model.safetensors")).unwrap();

    for (fault, needles) in [
        ("loss@3", vec!["step 3", "loss is NaN", "step-00000002"]),
        (
            "grad@3",
            vec!["step 3", "the gradient of ", "value inf", "step-00000002"],
        ),
    ] {
        let out = dir.join(fault.replace('@', "-"));
        fails_with(&train(&corpus, &out, Some(fault)), &needles);
        // Steps 1 and 2 are kept and verify; nothing of step 3 was written.
        let ck = out.join("checkpoints");
        for s in ["step-00000001", "step-00000002"] {
            assert!(
                ck.join(s).join("manifest.json").is_file(),
                "{fault}: {s} lost"
            );
        }
        assert!(!ck.join("step-00000003").exists());
        // The fault gone, the same command resumes from step 2 to the clean run's student.
        let o = train(&corpus, &out, None);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
        assert_eq!(
            student(&out),
            student(&clean),
            "{fault}: resumed student differs"
        );
    }
}
