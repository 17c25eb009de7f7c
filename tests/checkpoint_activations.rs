//! `--checkpoint-activations` (`[train] checkpoint_activations`): each decoder block is
//! recomputed in the backward pass instead of keeping its activations. The gradients are the
//! same bits, so the students are, for every method: qat's tied embedding too, whose lookup
//! rows are added onto the head's gradient in the plain backward pass's order. (After a few
//! steps of W4 training any difference grows until rounding decisions flip, so only exact
//! equality shows that nothing changed.)

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn teacher() -> String {
    shared().join("models/stories260k").display().to_string()
}

fn run_ok(args: &[&str]) {
    let o = run(args);
    assert!(o.status.success(), "{args:?} failed: {}", stderr(&o));
}

fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let (c, b) = (dir.join("corpus"), dir.join("base"));
    let t = teacher();
    run_ok(&[
        "generate",
        "--teacher",
        &t,
        "--out",
        c.to_str().unwrap(),
        "--samples",
        "16",
        "--max-tokens",
        "48",
        "--shard-size",
        "8",
    ]);
    run_ok(&[
        "quantize",
        "--model",
        &t,
        "--out",
        b.to_str().unwrap(),
        "--format",
        "nf4",
        "--double-quant",
    ]);
    (c, b)
}

fn train(
    corpus: &Path,
    out: &Path,
    method: &[&str],
    checkpointed: bool,
) -> Vec<(String, Vec<f32>)> {
    let t = teacher();
    let mut args = vec![
        "train",
        "--teacher",
        &t,
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "4",
        "--batch",
        "2",
        "--seq-len",
        "48",
        "--lr",
        "2e-3",
        "--a-bits",
        "8",
        "--kv-bits",
        "4",
    ];
    args.extend_from_slice(method);
    if checkpointed {
        args.push("--checkpoint-activations");
    }
    run_ok(&args);
    // The last checkpoint holds exactly the trained tensors.
    let ck = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("step-")
        })
        .max()
        .unwrap();
    let t = train::checkpoint::read_safetensors(
        &ck.join("student.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .map(|(n, x)| (n, x.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn checkpointed_training_makes_the_same_student() {
    let dir = temp_dir("checkpoint_activations");
    let (corpus, base) = setup(&dir);
    let b = base.display().to_string();
    let methods: [(&str, Vec<&str>); 3] = [
        (
            "qlora",
            vec!["--method", "qlora", "--base", &b, "--w-bits", "16"],
        ),
        (
            "lrqat",
            vec!["--method", "lrqat", "--lora-rank", "4", "--w-bits", "4"],
        ),
        ("qat", vec!["--w-bits", "4"]),
    ];
    for (name, args) in methods {
        let plain = train(&corpus, &dir.join(format!("{name}-plain")), &args, false);
        let ckpt = train(&corpus, &dir.join(format!("{name}-ckpt")), &args, true);
        assert_eq!(plain.len(), ckpt.len(), "{name}");
        let mut worst = 0f32;
        for ((na, a), (nb, b)) in plain.iter().zip(&ckpt) {
            assert_eq!(na, nb);
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs() / (1e-3 + x.abs()));
            }
        }
        assert_eq!(
            worst, 0.0,
            "{name}: checkpointed training changed the student"
        );
    }
}
