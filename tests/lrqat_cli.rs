//! LR-QAT students through `pipeline run` and `pipeline train`: the run's report scores the
//! merged integer student (and `pipeline eval` of its folder gives the same perplexity), and
//! keys that do not fit the method fail naming the key.

mod common;
use common::*;
use std::path::PathBuf;

fn toml(dir: &std::path::Path, student: &str, train_extra: &str) -> PathBuf {
    let s = shared();
    let p = dir.join("p.toml");
    std::fs::write(
        &p,
        format!(
            "[run]\nname = \"l\"\ndirectory = \"{}\"\n[teacher]\nmodel = \"{}\"\n\
             [generate]\nsamples = 32\nmax_tokens = 48\nshard_size = 16\nseed = 2\n\
             [student]\n{student}\n\
             [train]\nsteps = 8\nbatch = 4\nseq_len = 48\nlr = 2e-3\nlog_every = 4\ncheckpoint_every = 4\n{train_extra}\n\
             [eval]\ntext = \"{}\"\nmax_tokens = 2000\n",
            dir.join("run").display(),
            s.join("models/stories260k").display(),
            s.join("data/tinystories-valid-64k.txt").display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn lrqat_run_reports_the_merged_student() {
    let d = temp_dir("lrqat_run");
    let p = toml(
        &d,
        "method = \"lrqat\"\nw_bits = 4\nlora_rank = 4\nlora_alpha = 4",
        "",
    );
    let o = run(&["run", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("run/eval/report.json")).unwrap())
            .unwrap();
    let md = std::fs::read_to_string(d.join("run/eval/report.md")).unwrap();
    assert!(md.contains("lrqat student"), "{md}");
    let student_ppl = report["student"]["ppl"]
        .as_f64()
        .expect("student.ppl in report.json");
    let o = run(&[
        "eval",
        "--model",
        d.join("run/train/student").to_str().unwrap(),
        "--text",
        shared()
            .join("data/tinystories-valid-64k.txt")
            .to_str()
            .unwrap(),
        "--max-tokens",
        "2000",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let ppl = v["ppl"].as_f64().unwrap();
    assert!(
        (ppl - student_ppl).abs() <= 1e-6 * student_ppl,
        "the folder ({ppl}) is the student the report scored ({student_ppl})"
    );
    // Its integers export unchanged: packed exactly, GGUF as Q4_0 blocks (its trained f32
    // scales rounded to f16, and the change reported).
    let student = d.join("run/train");
    for format in ["packed", "gguf"] {
        let o = run(&[
            "export",
            "--student",
            student.to_str().unwrap(),
            "--out",
            d.join(format).to_str().unwrap(),
            "--format",
            format,
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        if format == "packed" {
            assert_eq!(r["max_weight_change"], 0.0, "{r}");
        } else {
            assert_eq!(r["types"]["Q4_0"], 30, "{r}");
            let change = r["max_weight_change"].as_f64().unwrap();
            assert!(change < 1e-3, "f16 rounding of the scales only: {change}");
        }
    }
}

#[test]
fn lrqat_keys_that_do_not_fit_fail_naming_the_key() {
    let d = temp_dir("lrqat_bad");
    for (name, student, train, want) in [
        (
            "phi",
            "method = \"lrqat\"\nphi_dtype = \"fp8\"",
            "",
            "phi_dtype",
        ),
        (
            "rank0",
            "method = \"lrqat\"\nlora_rank = 0",
            "",
            "student.lora_rank = 0",
        ),
        (
            "rank_big",
            "method = \"lrqat\"\nlora_rank = 65",
            "",
            "student.lora_rank = 65",
        ),
        (
            "targets",
            "method = \"lrqat\"\nlora_targets = [\"q_proj\"]",
            "",
            "student.lora_targets is a key of method \"qlora\"",
        ),
        (
            "iters",
            "method = \"lrqat\"\nloftq_iters = 2",
            "",
            "student.loftq_iters is a key of method \"loftq\"",
        ),
        (
            "bits16",
            "method = \"lrqat\"\nw_bits = \"none\"",
            "",
            "student.w_bits = 16",
        ),
        (
            "group",
            "method = \"lrqat\"\nw_group = 48",
            "",
            "student.w_group = 48",
        ),
        (
            "qat_phi",
            "method = \"qat\"\nphi_dtype = \"bf16\"",
            "",
            "student.phi_dtype is a key of method \"lrqat\"",
        ),
        (
            "qat_scale_lr",
            "method = \"qat\"\nscale_lr_ratio = 0.5",
            "",
            "student.scale_lr_ratio is a key of method \"lrqat\"",
        ),
        (
            "scale_lr_negative",
            "method = \"lrqat\"\nscale_lr_ratio = -1.0",
            "",
            "student.scale_lr_ratio = -1",
        ),
        (
            "qat_scale_init",
            "method = \"qat\"\nscale_init = \"mse\"",
            "",
            "student.scale_init is a key of method \"lrqat\"",
        ),
        (
            "scale_init_unknown",
            "method = \"lrqat\"\nscale_init = \"percentile\"",
            "",
            "percentile",
        ),
    ] {
        let dir = d.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let p = toml(&dir, student, train);
        let o = run(&["run", p.to_str().unwrap()]);
        assert!(!o.status.success(), "{name} should have failed");
        let e = stderr(&o);
        assert!(e.contains(want), "{name}: wanted {want:?} in:\n{e}");
    }
}
