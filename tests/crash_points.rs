//! Dies at every durable write of a whole `pipeline run` (generate, train with its
//! checkpoints, export, eval), one write per attempt, as SQLite's crash tests do:
//! `PIPELINE_CRASH_AT_WRITE=N` makes the process SIGKILL itself just before its Nth
//! rename into place (data written and fsynced). After each death the same command runs
//! again, and the finished run directory must equal an uninterrupted run: corpus, student,
//! export and report numbers byte for byte. No crash point is left to chance.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;

/// A W4A8KV4 QAT student with f16 scales, exported as GGUF.
const QAT: &str = "[student]\nw_bits = 4\na_bits = 8\nkv_bits = 4\nscale_dtype = \"f16\"\n[export]\nformat = \"gguf\"\n";
/// A LoftQ student: the quantize stage (NF3 base + initial adapters), exported as floats.
const LOFTQ: &str = "[quantize]\nformat = \"nf3\"\n[student]\nmethod = \"loftq\"\nlora_rank = 4\nlora_alpha = 4\nloftq_iters = 2\n[export]\nformat = \"hf\"\n";

fn pipeline(dir: &Path) -> std::path::PathBuf {
    pipeline_with(dir, QAT)
}

fn pipeline_with(dir: &Path, student: &str) -> std::path::PathBuf {
    let p = dir.join("p.toml");
    std::fs::write(
        &p,
        format!(
            "[run]\nname = \"c\"\ndirectory = \"{}\"\n[teacher]\nmodel = \"{}\"\n\
             [generate]\nsamples = 16\nmax_tokens = 32\nshard_size = 8\nseed = 3\n{student}\
             [train]\nsteps = 6\nbatch = 2\nseq_len = 32\nlr = 2e-3\nlog_every = 2\ncheckpoint_every = 2\nkeep_checkpoints = 2\n\
             [eval]\ntext = \"{}\"\nmax_tokens = 600\n",
            dir.join("run").display(),
            shared().join("models/stories260k").display(),
            shared().join("data/tinystories-valid-64k.txt").display()
        ),
    )
    .unwrap();
    p
}

/// Removes timings (which no rerun reproduces) and paths naming the run directory.
fn strip(v: &mut serde_json::Value, file: &str) {
    match v {
        serde_json::Value::Object(o) => {
            o.retain(|k, _| {
                !(["timings", "total_seconds", "seconds", "train_log"].contains(&k.as_str())
                    || k.ends_with("_per_s")
                    || (file == "export.json" && (k == "student" || k == "model"))
                    || (file == "quantize_report.json" && k == "out")
                    || k == "base_model_name_or_path")
            });
            o.values_mut().for_each(|x| strip(x, file));
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| strip(x, file)),
        _ => {}
    }
}

/// What a finished run must reproduce: every output file (checkpoints, logs with timings,
/// stage records, plots and temp files left out), JSON reports without their timings.
fn outputs(run: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            if name.starts_with('.')
                || [
                    "checkpoints",
                    "stage.json",
                    "train_log.jsonl",
                    "report.md",
                    "pipeline.toml",
                ]
                .contains(&name.as_str())
                || name.ends_with(".svg")
            {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
                continue;
            }
            let key = p.strip_prefix(root).unwrap().display().to_string();
            let mut bytes = std::fs::read(&p).unwrap();
            if name.ends_with(".json")
                && [
                    "report.json",
                    "export.json",
                    "quantize_report.json",
                    "adapter_config.json",
                ]
                .contains(&name.as_str())
            {
                let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                strip(&mut v, &name);
                bytes = serde_json::to_vec(&v).unwrap();
            }
            out.insert(key, bytes);
        }
    }
    let mut out = BTreeMap::new();
    walk(run, run, &mut out);
    out
}

#[test]
fn a_run_killed_at_every_durable_write_resumes_to_the_same_bytes() {
    let points = kill_at_every_write("crash_points", QAT, "model.gguf");
    assert!(points >= 20, "only {points} durable writes in a whole run");
}

#[test]
fn a_loftq_run_with_its_quantize_stage_killed_at_every_write_resumes() {
    let points = kill_at_every_write("crash_points_loftq", LOFTQ, "loftq_adapters.safetensors");
    assert!(points >= 20, "only {points} durable writes in a whole run");
}

/// Kills `student`'s run at each durable write in turn; returns how many there were.
fn kill_at_every_write(name: &str, student: &str, must_have: &str) -> usize {
    let base = temp_dir(name);
    let reference = base.join("reference");
    std::fs::create_dir_all(&reference).unwrap();
    let o = run(&["run", pipeline_with(&reference, student).to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = outputs(&reference.join("run"));
    assert!(
        want.keys().any(|k| k.ends_with(must_have)),
        "{:?}",
        want.keys()
    );

    let mut points = 0;
    for n in 1.. {
        let d = base.join(format!("n{n}"));
        std::fs::create_dir_all(&d).unwrap();
        let p = pipeline_with(&d, student);
        let o = bin()
            .args(["run", p.to_str().unwrap()])
            .env("PIPELINE_CRASH_AT_WRITE", n.to_string())
            .output()
            .unwrap();
        if o.status.success() {
            // Fewer than n durable writes: every point has been visited.
            std::fs::remove_dir_all(&d).unwrap();
            break;
        }
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            o.status.signal(),
            Some(9),
            "write {n}: died otherwise: {}",
            stderr(&o)
        );
        points += 1;
        let o = run(&["run", p.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "rerun after a death at write {n}: {}",
            stderr(&o)
        );
        let got = outputs(&d.join("run"));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "files after a death at write {n}"
        );
        for (k, v) in &want {
            assert!(got[k] == *v, "{k} differs after a death at write {n}");
        }
        std::fs::remove_dir_all(&d).unwrap();
        assert!(n < 500, "the run never finished without dying");
    }
    eprintln!("{name}: {points} crash points, each resumed to the same bytes");
    points
}

#[test]
fn a_full_disk_at_every_durable_write_fails_naming_the_file_and_resumes() {
    let base = temp_dir("full_disk_points");
    let reference = base.join("reference");
    std::fs::create_dir_all(&reference).unwrap();
    let o = run(&["run", pipeline(&reference).to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = outputs(&reference.join("run"));

    let mut points = 0;
    for n in 1.. {
        let d = base.join(format!("n{n}"));
        std::fs::create_dir_all(&d).unwrap();
        let p = pipeline(&d);
        let o = bin()
            .args(["run", p.to_str().unwrap()])
            .env("PIPELINE_FULL_DISK_AT_WRITE", n.to_string())
            .output()
            .unwrap();
        if o.status.success() {
            std::fs::remove_dir_all(&d).unwrap();
            break;
        }
        points += 1;
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "write {n}: {e}");
        assert!(
            e.contains("No space left on device") && e.contains(d.join("run").to_str().unwrap()),
            "write {n}: the error names the disk and the file: {e}"
        );
        // Space is back: the same command finishes what was left, to the same bytes.
        let o = run(&["run", p.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "rerun after a full disk at write {n}: {}",
            stderr(&o)
        );
        let got = outputs(&d.join("run"));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "write {n}"
        );
        for (k, v) in &want {
            assert!(got[k] == *v, "{k} differs after a full disk at write {n}");
        }
        std::fs::remove_dir_all(&d).unwrap();
        assert!(n < 500, "the run never finished");
    }
    eprintln!("{points} full-disk points, each failed cleanly and resumed to the same bytes");
    assert!(points >= 20, "only {points} durable writes in a whole run");
}

#[test]
fn fifty_random_kills_across_quantize_train_export_and_eval_resume_to_the_same_bytes() {
    // A longer LoftQ run (about 30 s here), so that 50 kills land in a running process, in
    // every stage in turn: quantize (with LoftQ), generate, train, export, eval.
    let slow = |dir: &Path| {
        let p = pipeline_with(dir, LOFTQ);
        let t = std::fs::read_to_string(&p)
            .unwrap()
            .replace("steps = 6", "steps = 400")
            .replace("checkpoint_every = 2", "checkpoint_every = 10");
        std::fs::write(&p, t).unwrap();
        p
    };
    let base = temp_dir("random_kills");
    let (a, b) = (base.join("a"), base.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (pa, pb) = (slow(&a), slow(&b));
    let o = run(&["run", pa.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let seed = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9E37_79B9_7F4A_7C15u64);
    eprintln!("kill seed {seed} (replay with KILL_SEED={seed})");
    let mut kills = 0;
    let mut round = 0;
    while kills < 50 {
        round += 1;
        assert!(
            round <= 4,
            "the run finished before 50 kills landed ({kills})"
        );
        kills += kill_at_random_moments(
            &["run", pb.to_str().unwrap()],
            50 - kills,
            seed ^ round,
            150,
            900,
        );
        if kills < 50 {
            // Finished early: start over in the same directory (stages are redone from scratch).
            let _ = std::fs::remove_dir_all(b.join("run"));
        }
    }
    let o = run(&["run", pb.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (want, got) = (outputs(&a.join("run")), outputs(&b.join("run")));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, v) in &want {
        assert!(
            got[k] == *v,
            "{k} differs after {kills} kills (seed {seed})"
        );
    }
    eprintln!("{kills} kills in {round} round(s), the same bytes");
}
