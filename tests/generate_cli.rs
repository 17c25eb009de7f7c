//! `pipeline generate` and `pipeline corpus` end to end: determinism across batch sizes and
//! workers, resume after SIGKILL, split-and-merge, greedy prefixes, and bad input.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

fn teacher() -> String {
    shared()
        .join("models/stories260k")
        .to_str()
        .unwrap()
        .to_string()
}

fn gen(out: &Path, extra: &[&str]) -> std::process::Output {
    let t = teacher();
    let mut args = vec![
        "generate",
        "--teacher",
        &t,
        "--out",
        out.to_str().unwrap(),
        "--samples",
        "48",
        "--max-tokens",
        "40",
        "--shard-size",
        "12",
        "--seed",
        "7",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn gen_ok(out: &Path, extra: &[&str]) -> String {
    let o = gen(out, extra);
    assert!(
        o.status.success(),
        "generate {extra:?} failed: {}",
        stderr(&o)
    );
    stderr(&o)
}

/// Every shard file's bytes, by name.
fn shard_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    folder_bytes(dir, |n| n.ends_with(".parquet"))
}

#[test]
fn corpus_is_identical_across_batch_sizes_and_workers() {
    let base = temp_dir("gen_batch");
    let reference = base.join("b7");
    gen_ok(&reference, &["--batch", "7"]);
    let want = shard_bytes(&reference);
    assert_eq!(want.len(), 4);
    for (name, extra) in [
        ("b1", vec!["--batch", "1"]),
        ("b64", vec!["--batch", "64"]),
        ("w2", vec!["--batch", "5", "--workers", "2"]),
    ] {
        let d = base.join(name);
        gen_ok(&d, &extra);
        assert!(
            shard_bytes(&d) == want,
            "{name}: shards differ from batch 7"
        );
    }
    // A rerun of a finished corpus keeps everything.
    let log = gen_ok(&reference, &["--batch", "3"]);
    assert!(log.contains("keeping 4 finished shard"), "{log}");
    assert!(shard_bytes(&reference) == want);
}

#[test]
fn greedy_prefix_is_the_teachers_argmax() {
    let d = temp_dir("gen_greedy");
    gen_ok(&d, &["--batch", "16"]);
    let folder = model::ModelFolder::open(Path::new(&teacher())).unwrap();
    let m = model::Llama::load(
        &folder,
        model::QuantConfig::none(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut checked = 0;
    for i in 0..4 {
        for s in corpus::read_shard(&d.join(corpus::shard_file_name(i))).unwrap() {
            let g = s.greedy_prefix as usize;
            assert!(
                (3..=5).contains(&g) || s.tokens.len() < 3,
                "greedy prefix {g}"
            );
            let ids = candle_core::Tensor::new(&s.tokens[..g], &candle_core::Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = m.forward(&ids).unwrap().squeeze(0).unwrap();
            let am: Vec<u32> = logits
                .argmax(candle_core::D::Minus1)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(
                &am[..g - 1],
                &s.tokens[1..g],
                "sample {}: prefix is not greedy",
                s.sample_id
            );
            assert!(s.tokens.len() <= 40);
            checked += 1;
        }
    }
    assert_eq!(checked, 48);
}

#[test]
fn sigkill_mid_shard_then_resume_is_byte_identical() {
    let base = temp_dir("gen_kill");
    let reference = base.join("ref");
    gen_ok(&reference, &["--batch", "4"]);
    let want = shard_bytes(&reference);
    let d = base.join("killed");
    let t = teacher();
    // Kill at three different moments, rerunning after each.
    for (i, ms) in [150u64, 700, 1500].iter().enumerate() {
        let mut child = bin()
            .args([
                "generate",
                "--teacher",
                &t,
                "--out",
                d.to_str().unwrap(),
                "--samples",
                "48",
                "--max-tokens",
                "40",
                "--shard-size",
                "12",
                "--seed",
                "7",
                "--batch",
                "4",
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*ms));
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        eprintln!(
            "kill {i} after {ms} ms: {} shard(s) on disk",
            shard_bytes(&d).len()
        );
    }
    gen_ok(&d, &["--batch", "4"]);
    assert!(
        shard_bytes(&d) == want,
        "resumed corpus differs from an uninterrupted one"
    );
    let o = run(&["corpus", "verify", d.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stdout(&o));
}

#[test]
fn split_generation_then_merge_equals_one_run() {
    let base = temp_dir("gen_split");
    let whole = base.join("whole");
    gen_ok(&whole, &[]);
    let (a, b, merged) = (base.join("a"), base.join("b"), base.join("merged"));
    gen_ok(&a, &["--shards", "0..2"]);
    gen_ok(&b, &["--shards", "2..4", "--batch", "9"]);
    let o = run(&[
        "corpus",
        "merge",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "merge failed: {}", stderr(&o));
    assert!(shard_bytes(&merged) == shard_bytes(&whole));
    let m1: serde_json::Value =
        serde_json::from_slice(&std::fs::read(merged.join("manifest.json")).unwrap()).unwrap();
    let m2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(whole.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m1["shards"], m2["shards"]);
    let o = run(&["corpus", "stats", merged.to_str().unwrap(), "--json"]);
    assert!(o.status.success());
    let s: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(s["samples"], 48);
}

#[test]
fn bad_input_is_refused_without_touching_shards() {
    let base = temp_dir("gen_bad");
    // Teacher without a tokenizer.
    let t = base.join("no_tok");
    copy_model(Path::new(&teacher()), &t);
    std::fs::remove_file(t.join("tokenizer.json")).unwrap();
    let o = run(&[
        "generate",
        "--teacher",
        t.to_str().unwrap(),
        "--out",
        base.join("x").to_str().unwrap(),
        "--samples",
        "4",
        "--max-tokens",
        "8",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("tokenizer.json"), "{}", stderr(&o));

    // max_tokens above the context.
    let t = teacher();
    let y = base.join("y");
    let o = run(&[
        "generate",
        "--teacher",
        &t,
        "--out",
        y.to_str().unwrap(),
        "--samples",
        "4",
        "--max-tokens",
        "4096",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("max_tokens") && stderr(&o).contains("512"),
        "{}",
        stderr(&o)
    );

    // A corpus made by another teacher, or with another setting, is refused and kept.
    let d = base.join("corpus");
    gen_ok(&d, &[]);
    let before = shard_bytes(&d);
    let other = shared().join("models/tinystories-656k");
    let o = run(&[
        "generate",
        "--teacher",
        other.to_str().unwrap(),
        "--out",
        d.to_str().unwrap(),
        "--samples",
        "48",
        "--max-tokens",
        "40",
        "--shard-size",
        "12",
        "--seed",
        "7",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("teacher"), "{}", stderr(&o));
    let o = gen(&d, &["--temperature", "0.5"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("temperature"), "{}", stderr(&o));
    // CUDA graphs on the CPU, and with two workers, are refused by name.
    for extra in [
        &["--cuda-graph"][..],
        &["--cuda-graph", "--workers", "2"][..],
    ] {
        let o = gen(&d, extra);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("generate.cuda_graph"), "{}", stderr(&o));
    }
    assert!(
        shard_bytes(&d) == before,
        "a refused run changed the corpus"
    );

    // A truncated shard: verify reports it, and a rerun regenerates it and says so.
    let victim = d.join("shard-00002.parquet");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() - 50]).unwrap();
    let o = run(&["corpus", "verify", d.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("shard-00002.parquet"), "{}", stdout(&o));
    let log = gen_ok(&d, &[]);
    assert!(
        log.contains("shard 2") && log.contains("regenerating"),
        "{log}"
    );
    assert!(shard_bytes(&d) == before);
}

#[test]
fn shards_read_back_in_python_pyarrow() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import pyarrow"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: python3 with pyarrow is not available (pip install pyarrow)");
        return;
    }
    let d = temp_dir("gen_pyarrow");
    gen_ok(&d, &["--text"]);
    let script = format!(
        "import pyarrow.parquet as pq\nt = pq.read_table('{}')\nassert t.num_rows == 12, t.num_rows\nassert t.column_names == ['sample_id','tokens','greedy_prefix','finish','text'], t.column_names\nassert str(t.schema.field('tokens').type).startswith('list<')\nprint(t.column('text')[0].as_py()[:80])",
        d.join("shard-00000.parquet").display()
    );
    let o = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "pyarrow check failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
