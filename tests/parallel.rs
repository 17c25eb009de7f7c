//! Work spread over job arrays, devices and ranks, end to end: `generate --shard-of K/N` parts
//! merged and `generate --devices cpu,cpu` give the corpus of one run byte for byte, and
//! `train --devices cpu,cpu` follows the one-device run.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn teacher() -> String {
    shared()
        .join("models/stories260k")
        .to_str()
        .unwrap()
        .to_string()
}

/// 20 samples in 5 shards of 4.
fn gen(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let t = teacher();
    let mut args = vec![
        "generate",
        "--teacher",
        &t,
        "--out",
        out.to_str().unwrap(),
        "--samples",
        "20",
        "--max-tokens",
        "24",
        "--shard-size",
        "4",
        "--seed",
        "3",
    ];
    args.extend_from_slice(extra);
    let mut c = bin();
    c.args(&args);
    for var in ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"] {
        c.env_remove(var);
    }
    c.envs(env.iter().copied());
    c.output().expect("cannot start pipeline")
}

fn gen_ok(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> String {
    let o = gen(out, extra, env);
    assert!(
        o.status.success(),
        "generate {extra:?} failed: {}",
        stderr(&o)
    );
    stderr(&o)
}

/// Every file of a corpus folder (shards and manifest) by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    folder_bytes(dir, |_| true)
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// The parquet shards only (a merged manifest names the teacher path of its first part, so
/// manifests are compared by their shard lists).
fn shards(dir: &Path) -> Vec<(String, Vec<u8>)> {
    files(dir)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".parquet"))
        .collect()
}

#[test]
fn shard_of_slices_merged_equal_one_run() {
    let base = temp_dir("par_shard_of");
    let whole = base.join("whole");
    gen_ok(&whole, &[], &[]);
    assert_eq!(shards(&whole).len(), 5);
    let mut parts: Vec<PathBuf> = Vec::new();
    for k in 0..3 {
        let d = base.join(format!("part{k}"));
        // Part 1 takes K from a Slurm array's variable, part 2 from a Kubernetes Indexed Job's.
        match k {
            0 => gen_ok(&d, &["--shard-of", "0/3"], &[]),
            1 => gen_ok(
                &d,
                &["--shard-of", "env/3"],
                &[("SLURM_ARRAY_TASK_ID", "1")],
            ),
            _ => gen_ok(
                &d,
                &["--shard-of", "env/3"],
                &[("JOB_COMPLETION_INDEX", "2")],
            ),
        };
        parts.push(d);
    }
    // 5 shards in 3 balanced slices: 0..1, 1..3, 3..5.
    let counts: Vec<usize> = parts.iter().map(|p| shards(p).len()).collect();
    assert_eq!(counts, [1, 2, 2]);
    let merged = base.join("merged");
    let mut args = vec!["corpus", "merge"];
    args.extend(parts.iter().map(|p| p.to_str().unwrap()));
    args.extend(["--out", merged.to_str().unwrap()]);
    let o = run(&args);
    assert!(o.status.success(), "merge failed: {}", stderr(&o));
    assert!(shards(&merged) == shards(&whole), "merged shards differ");
    let (m1, m2) = (manifest(&merged), manifest(&whole));
    assert_eq!(m1["shards"], m2["shards"]);
    assert_eq!(m1["settings"], m2["settings"]);
    let o = run(&["corpus", "verify", merged.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stdout(&o));
}

#[test]
fn shard_of_refusals_name_the_problem() {
    let base = temp_dir("par_shard_of_bad");
    let d = base.join("c");
    for (extra, env, want) in [
        (
            vec!["--shard-of", "env/2"],
            vec![],
            "SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX",
        ),
        (
            vec!["--shard-of", "env/2"],
            vec![("SLURM_ARRAY_TASK_ID", "one")],
            "SLURM_ARRAY_TASK_ID = \"one\"",
        ),
        (vec!["--shard-of", "2/2"], vec![], "K must be below N"),
        (vec!["--shard-of", "0/6"], vec![], "only 5 shard(s)"),
        (
            vec!["--shard-of", "0/2", "--shards", "0..1"],
            vec![],
            "--shards",
        ),
    ] {
        let o = gen(&d, &extra, &env);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(stderr(&o).contains(want), "{extra:?}: {}", stderr(&o));
    }
}

#[test]
fn two_cpu_generators_write_the_corpus_of_one() {
    let base = temp_dir("par_devices");
    let one = base.join("one");
    gen_ok(&one, &[], &[]);
    let two = base.join("two");
    gen_ok(&two, &["--devices", "cpu,cpu", "--batch", "3"], &[]);
    assert!(files(&two) == files(&one), "cpu,cpu corpus differs");
    // With a job array slice too: the devices split the slice.
    let part = base.join("part");
    gen_ok(&part, &["--devices", "cpu,cpu", "--shard-of", "1/2"], &[]);
    assert_eq!(
        shards(&part),
        shards(&one)
            .into_iter()
            .filter(|(n, _)| ["00002", "00003", "00004"].iter().any(|k| n.contains(k)))
            .collect::<Vec<_>>()
    );
}

/// `pipeline train` of a float student (so float order cannot move weights across a
/// quantization grid) on `corpus`, 4 steps of 4 rows with a checkpoint every 2.
fn train(corpus: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
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
        "4",
        "--seq-len",
        "16",
        "--lr",
        "2e-3",
        "--log-every",
        "1",
        "--checkpoint-every",
        "2",
        "--w-bits",
        "none",
        "--a-bits",
        "none",
        "--kv-bits",
        "none",
    ];
    args.extend_from_slice(extra);
    let mut c = bin();
    c.args(&args);
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        c.env_remove(v);
    }
    c.envs(env.iter().copied());
    c.output().expect("cannot start pipeline")
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn student(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("student/model.safetensors")).unwrap()
}

#[test]
fn two_cpu_ranks_train_like_one_and_resume_after_a_kill() {
    let base = temp_dir("par_train");
    let corpus = base.join("corpus");
    gen_ok(&corpus, &[], &[]);
    let one = base.join("one");
    let o = train(&corpus, &one, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let two = base.join("two");
    let o = train(&corpus, &two, &["--devices", "cpu,cpu"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 4);
    for (step, (p, q)) in a.iter().zip(&b).enumerate() {
        assert!(
            (p - q).abs() <= 1e-4 * p.abs(),
            "step {}: loss {p} on one device, {q} on cpu,cpu",
            step + 1
        );
    }
    // Killed just before each durable write after the log's: the step-2 checkpoint (2), the
    // step-4 one (3, so the rerun resumes from step 2) and the student (4); then rerun.
    for n in [2, 3, 4] {
        let out = base.join(format!("killed-{n}"));
        let crash = n.to_string();
        let o = train(
            &corpus,
            &out,
            &["--devices", "cpu,cpu"],
            &[("PIPELINE_CRASH_AT_WRITE", &crash)],
        );
        assert!(!o.status.success(), "write {n}: the run was not killed");
        let o = train(&corpus, &out, &["--devices", "cpu,cpu"], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        if n == 3 {
            assert!(stderr(&o).contains("(step 2)"), "{}", stderr(&o));
        }
        assert!(
            student(&out) == student(&two),
            "killed at write {n} and resumed: the student differs from the unkilled run"
        );
    }
}

#[test]
fn a_multi_process_launch_and_bad_devices_are_refused() {
    let base = temp_dir("par_train_bad");
    let corpus = base.join("corpus");
    gen_ok(&corpus, &[], &[]);
    let out = base.join("out");
    for (extra, env, want) in [
        (
            vec![],
            vec![
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1"),
            ],
            "--devices",
        ),
        (
            vec![],
            vec![("RANK", "2"), ("WORLD_SIZE", "2")],
            "RANK must be below WORLD_SIZE",
        ),
        (vec!["--devices", "cpu,cpu,cpu"], vec![], "train.batch = 4"),
        (vec!["--devices", "cuda:0,cuda:0"], vec![], "cuda:0 twice"),
    ] {
        let o = train(&corpus, &out, &extra, &env);
        assert!(!o.status.success(), "{extra:?} {env:?} succeeded");
        assert!(
            stderr(&o).contains(want),
            "{extra:?} {env:?}: {}",
            stderr(&o)
        );
    }
}
