//! Run-directory confinement: no setting, corpus manifest, checkpoint manifest or planted
//! symbolic link can make the pipeline write (or delete) outside its run directory or output
//! folder. Each case checks the error names the setting or file, and that a "victim" file
//! outside is untouched.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn teacher() -> String {
    shared().join("models/stories260k").display().to_string()
}

/// A file outside every output folder, whose bytes must survive each attempt.
fn victim(dir: &Path) -> PathBuf {
    let v = dir.join("victim.txt");
    std::fs::write(&v, b"do not touch").unwrap();
    v
}

fn untouched(v: &Path) {
    assert_eq!(
        std::fs::read(v).unwrap_or_default(),
        b"do not touch",
        "{} was changed",
        v.display()
    );
}

fn generate(out: &Path) -> std::process::Output {
    let t = teacher();
    let o = out.display().to_string();
    run(&[
        "generate",
        "--teacher",
        &t,
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

fn train(corpus: &Path, out: &Path, steps: &str) -> std::process::Output {
    let t = teacher();
    let (c, o) = (corpus.display().to_string(), out.display().to_string());
    run(&[
        "train",
        "--teacher",
        &t,
        "--corpus",
        &c,
        "--out",
        &o,
        "--steps",
        steps,
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        "3",
    ])
}

fn fails_with(o: &std::process::Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "succeeded:\n{err}");
    for n in needles {
        assert!(err.contains(n), "error lacks {n:?}:\n{err}");
    }
}

#[test]
fn run_names_and_overrides_cannot_leave_the_run_directory() {
    let dir = temp_dir("confine_names");
    let v = victim(&dir);
    let p = dir.join("p.toml");
    for name in ["../escape", "/tmp/escape", "a/../../escape"] {
        std::fs::write(
            &p,
            format!(
                "[run]\nname = \"{name}\"\ndirectory = \"{}\"\n[teacher]\nmodel = \"{}\"\n\
                 [generate]\nsamples = 4\nmax_tokens = 8\n[train]\nsteps = 1\nbatch = 1\nseq_len = 8\n\
                 [eval]\ntext = \"{}\"\nmax_tokens = 100\n",
                dir.join("run").display(),
                teacher(),
                shared().join("data/tinystories-valid-64k.txt").display()
            ),
        )
        .unwrap();
        let ps = p.display().to_string();
        fails_with(&run(&["run", &ps]), &["p.toml", "name"]);
        // The same through an override.
        std::fs::write(&p, std::fs::read_to_string(&p).unwrap().replace(name, "ok")).unwrap();
        let set = format!("run.name={name}");
        fails_with(&run(&["run", &ps, "--set", &set]), &["name"]);
    }
    assert!(!dir.join("escape").exists() && !Path::new("/tmp/escape").exists());
    untouched(&v);
}

#[test]
fn a_corpus_manifest_naming_a_shard_outside_is_refused_by_every_reader() {
    let dir = temp_dir("confine_corpus");
    let v = victim(&dir);
    let corpus = dir.join("out/corpus");
    assert!(generate(&corpus).status.success());
    let m = corpus.join("manifest.json");
    let text = std::fs::read_to_string(&m).unwrap();
    let evil = text.replacen("shard-00000.parquet", "../../victim.txt", 1);
    assert_ne!(text, evil);
    std::fs::write(&m, evil).unwrap();
    // Resuming generation (which rewrites and, with --force, deletes shards) and training
    // (which reads them) both stop at the manifest.
    fails_with(&generate(&corpus), &["manifest.json", "file", "victim.txt"]);
    let t = teacher();
    let c = corpus.display().to_string();
    let forced = run(&[
        "generate",
        "--teacher",
        &t,
        "--out",
        &c,
        "--samples",
        "8",
        "--max-tokens",
        "16",
        "--shard-size",
        "4",
        "--force",
    ]);
    fails_with(&forced, &["manifest.json", "file"]);
    fails_with(
        &train(&corpus, &dir.join("out/train"), "1"),
        &["manifest.json", "file"],
    );
    untouched(&v);
}

#[test]
fn a_checkpoint_manifest_naming_a_file_outside_is_set_aside_not_followed() {
    let dir = temp_dir("confine_checkpoint");
    let v = victim(&dir);
    let corpus = dir.join("corpus");
    assert!(generate(&corpus).status.success());
    let out = dir.join("train");
    assert!(train(&corpus, &out, "2").status.success());
    // The newest checkpoint now claims a file three levels up: the victim, with its true size
    // and hash, so only the name check stands between it and the reader.
    let ck = out.join("checkpoints/step-00000002");
    let m = ck.join("manifest.json");
    let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    j["files"][0]["name"] = "../../../victim.txt".into();
    j["files"][0]["bytes"] = 12.into();
    std::fs::write(&m, serde_json::to_vec(&j).unwrap()).unwrap();
    let o = train(&corpus, &out, "3");
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("skipping broken checkpoint") && err.contains("not a plain file name"),
        "{err}"
    );
    assert!(
        err.contains("step-00000001"),
        "did not resume from step 1:\n{err}"
    );
    assert!(out.join("checkpoints/broken-step-00000002").is_dir());
    untouched(&v);
}

#[test]
fn symbolic_links_planted_in_output_folders_are_refused() {
    let dir = temp_dir("confine_links");
    let v = victim(&dir);
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let corpus = dir.join("corpus");
    assert!(generate(&corpus).status.success());

    // A shard replaced by a link to the victim: generate (which would rewrite it) refuses.
    let shard = corpus.join("shard-00001.parquet");
    std::fs::remove_file(&shard).unwrap();
    std::os::unix::fs::symlink(&v, &shard).unwrap();
    fails_with(
        &generate(&corpus),
        &["shard-00001.parquet", "symbolic link", "victim.txt"],
    );
    std::fs::remove_file(&shard).unwrap();
    assert!(generate(&corpus).status.success());

    // A training folder whose log or checkpoint folder is a link out.
    let out = dir.join("train");
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&v, out.join("train_log.jsonl")).unwrap();
    fails_with(
        &train(&corpus, &out, "1"),
        &["train_log.jsonl", "symbolic link"],
    );
    std::fs::remove_file(out.join("train_log.jsonl")).unwrap();
    std::os::unix::fs::symlink(&outside, out.join("checkpoints")).unwrap();
    fails_with(
        &train(&corpus, &out, "1"),
        &["checkpoints", "symbolic link"],
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    std::fs::remove_file(out.join("checkpoints")).unwrap();

    // A whole stage folder of a run directory linked out: `pipeline run` refuses before any stage.
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::os::unix::fs::symlink(&outside, run_dir.join("train")).unwrap();
    let p = dir.join("p.toml");
    std::fs::write(
        &p,
        format!(
            "[run]\nname = \"l\"\ndirectory = \"{}\"\n[teacher]\nmodel = \"{}\"\n\
             [generate]\nsamples = 4\nmax_tokens = 8\n[train]\nsteps = 1\nbatch = 1\nseq_len = 8\n\
             [eval]\ntext = \"{}\"\nmax_tokens = 100\n",
            run_dir.display(),
            teacher(),
            shared().join("data/tinystories-valid-64k.txt").display()
        ),
    )
    .unwrap();
    let ps = p.display().to_string();
    fails_with(&run(&["run", &ps]), &["train", "symbolic link"]);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert!(
        !run_dir.join("corpus").exists(),
        "a stage ran before the check"
    );
    untouched(&v);

    // An export folder holding a link: refused too.
    let t = out.display().to_string();
    assert!(train(&corpus, &out, "1").status.success());
    let ex = dir.join("export");
    std::fs::create_dir_all(&ex).unwrap();
    std::os::unix::fs::symlink(&outside, ex.join("model")).unwrap();
    let e = ex.display().to_string();
    let o = run(&["export", "--student", &t, "--out", &e, "--format", "hf"]);
    fails_with(&o, &["model", "symbolic link"]);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    untouched(&v);
}
