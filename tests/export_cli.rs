//! `pipeline export` and the export stage of `pipeline run`: every format holds the trained
//! grid (checked by loading it back), llama.cpp (llama-cpp-python) scores the GGUF within 1%
//! of our W4A8 evaluation, transformers + compressed-tensors gives our W4 logits, and what a
//! format cannot hold is refused by name.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn text() -> String {
    shared()
        .join("data/tinystories-valid-64k.txt")
        .display()
        .to_string()
}

/// A student folder: the teacher's files with the quantizers it was trained with (its grid is
/// then round-to-nearest of the teacher; the export cannot tell).
fn student(dir: &Path, teacher: &str, quant: &str) -> PathBuf {
    let s = dir.join("student");
    copy_model(&shared().join("models").join(teacher), &s);
    std::fs::write(s.join("quantization.json"), quant).unwrap();
    s
}

fn json_of(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_str(stdout(o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

fn export(s: &Path, out: &Path, format: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "export",
        "--student",
        s.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        format,
        "--json",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// Runs scripts/export_check.py; None (after printing why) when its consumer is not installed.
fn check(args: &[&str]) -> Option<serde_json::Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/export_check.py");
    let o = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output();
    let o = match o {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: python3 cannot be started: {e}");
            return None;
        }
    };
    if o.status.code() == Some(77) {
        eprintln!("SKIPPED: {}", stderr(&o).trim());
        return None;
    }
    Some(json_of(&o))
}

#[test]
fn a_run_exports_the_exact_grid_and_llama_cpp_scores_it() {
    let d = temp_dir("export_run");
    let p = d.join("p.toml");
    std::fs::write(
        &p,
        format!(
            "[run]\nname = \"x\"\ndirectory = \"{}\"\n[teacher]\nmodel = \"{}\"\n\
             [generate]\nsamples = 32\nmax_tokens = 48\nshard_size = 16\nseed = 2\n\
             [student]\nw_bits = 4\na_bits = 8\nkv_bits = 4\nscale_dtype = \"f16\"\n\
             [train]\nsteps = 8\nbatch = 4\nseq_len = 48\nlr = 2e-3\nlog_every = 4\ncheckpoint_every = 4\n\
             [eval]\ntext = \"{}\"\nmax_tokens = 2000\n[export]\nformat = \"gguf\"\n",
            d.join("run").display(),
            shared().join("models/stories260k").display(),
            text()
        ),
    )
    .unwrap();
    let o = run(&["run", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ex: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("run/export/export.json")).unwrap())
            .unwrap();
    assert_eq!(ex["max_weight_change"], 0.0, "f16 scales: exact ({ex})");
    assert_eq!(ex["types"]["Q4_0"], 30);
    // stories260k's down_proj has 172 inputs: floats holding its grid, with the reason.
    let why = ex["as_float"]["model.layers.0.mlp.down_proj.weight"]["reason"]
        .as_str()
        .unwrap();
    assert!(why.contains("172") && why.contains("Q4_0"), "{why}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("run/eval/report.json")).unwrap())
            .unwrap();
    assert_eq!(
        report["export"]["ppl"], report["student"]["ppl"],
        "the export as loaded back is the student"
    );
    assert!(std::fs::read_to_string(d.join("run/eval/report.md"))
        .unwrap()
        .contains("gguf export (as loaded back)"));

    // llama.cpp: its Q4_0 products quantize activations in 8-bit blocks of 32; ours per token.
    let student = d.join("run/train/student");
    let ours = json_of(&run(&[
        "eval",
        "--model",
        student.to_str().unwrap(),
        "--text",
        &text(),
        "--w-bits",
        "4",
        "--a-bits",
        "8",
        "--scale-dtype",
        "f16",
        "--max-tokens",
        "2000",
        "--json",
    ]));
    let Some(l) = check(&[
        "gguf",
        "--model",
        d.join("run/export/model.gguf").to_str().unwrap(),
        "--student",
        student.to_str().unwrap(),
        "--text",
        &text(),
        "--max-tokens",
        "2000",
    ]) else {
        return;
    };
    let (a, b) = (l["ppl"].as_f64().unwrap(), ours["ppl"].as_f64().unwrap());
    eprintln!("llama.cpp {a} vs pipeline eval w4a8 {b}");
    assert_eq!(l["tokens"], ours["tokens"]);
    assert!((a / b - 1.0).abs() < 0.01, "llama.cpp {a} vs ours {b}");
    assert!(
        l["tokenization"]["first_difference"].is_null(),
        "llama.cpp tokenizes as tokenizer.json: {l}"
    );
}

/// Our W4 (weight-only) forward of a student folder.
fn our_logits(s: &Path, ids: &[u32]) -> candle_core::Tensor {
    let folder = model::ModelFolder::open(s).unwrap();
    let q = model::QuantConfig {
        w_bits: Some(4),
        ..Default::default()
    };
    let m = model::Llama::load(&folder, q, &candle_core::Device::Cpu).unwrap();
    let x = candle_core::Tensor::new(ids, &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(&x).unwrap().squeeze(0).unwrap()
}

#[test]
fn folders_hold_the_grid_and_transformers_reads_compressed_tensors() {
    let d = temp_dir("export_folders");
    let s = student(
        &d,
        "stories260k",
        r#"{"w_bits": 4, "w_group": null, "a_bits": null, "kv_bits": null}"#,
    );
    for format in ["compressed-tensors", "packed", "hf"] {
        let out = d.join(format);
        let r = json_of(&export(
            &s,
            &out,
            format,
            &["--text", &text(), "--max-tokens", "2000"],
        ));
        assert_eq!(r["max_weight_change"], 0.0, "{format}: {r}");
        assert_eq!(
            r["ppl"]["export"], r["ppl"]["student"],
            "{format}: loaded back it is the student"
        );
        // Again: a finished identical export is left as it is.
        let again = json_of(&export(
            &s,
            &out,
            format,
            &["--text", &text(), "--max-tokens", "2000"],
        ));
        assert_eq!(again["seconds"], r["seconds"]);
    }
    let ids = [1u32, 403, 407, 261, 378, 432, 383, 286, 261, 376];
    let ours = our_logits(&s, &ids);
    let out = d.join("ct_logits.safetensors");
    let tokens = ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if let Some(v) = check(&[
        "ct",
        "--model",
        d.join("compressed-tensors/model").to_str().unwrap(),
        "--tokens",
        &tokens,
        "--out",
        out.to_str().unwrap(),
    ]) {
        let theirs = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap()
            ["logits"]
            .clone();
        let diff = (&ours - &theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("transformers + compressed-tensors vs our W4 forward: max |diff| {diff}");
        assert!(diff <= 1e-4, "max |logit diff| {diff}");
        assert_eq!(v["weights"]["num_bits"], 4);
        assert_eq!(v["weights"]["strategy"], "channel");
        assert!(v["input_activations"].is_null());
    }

    // A W4A8 student declares 8-bit dynamic per-token input activations.
    let d8 = d.join("a8");
    let s8 = student(
        &d8,
        "stories260k",
        r#"{"w_bits": 4, "w_group": 4, "a_bits": 8, "kv_bits": null}"#,
    );
    json_of(&export(&s8, &d8.join("ct"), "compressed-tensors", &[]));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d8.join("ct/model/config.json")).unwrap())
            .unwrap();
    let g = &cfg["quantization_config"]["config_groups"]["group_0"];
    assert_eq!(g["weights"]["strategy"], "group");
    assert_eq!(g["weights"]["group_size"], 4);
    assert_eq!(g["input_activations"]["num_bits"], 8);
    assert_eq!(g["input_activations"]["strategy"], "token");
    assert_eq!(g["input_activations"]["dynamic"], true);
}

#[test]
fn grids_a_format_cannot_hold_and_bad_folders_are_refused() {
    let d = temp_dir("export_refusals");
    let s = student(
        &d,
        "stories260k",
        r#"{"w_bits": 4, "w_group": 16, "a_bits": null, "kv_bits": null}"#,
    );
    // Q4_0 has one scale per 32 values: a group of 16 is refused, naming format and setting.
    let o = export(&s, &d.join("g"), "gguf", &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--format gguf") && e.contains("w_group") && e.contains("16"),
        "{e}"
    );
    // compressed-tensors groups must tile a row.
    std::fs::write(
        s.join("quantization.json"),
        r#"{"w_bits": 4, "w_group": 24, "a_bits": null, "kv_bits": null}"#,
    )
    .unwrap();
    let e = stderr(&export(&s, &d.join("c"), "compressed-tensors", &[]));
    assert!(
        e.contains("compressed-tensors") && e.contains("w_group = 24"),
        "{e}"
    );
    // Unknown format.
    let e = stderr(&export(&s, &d.join("u"), "onnx", &[]));
    assert!(
        e.contains("onnx") && e.contains("gguf, compressed-tensors, packed, hf"),
        "{e}"
    );
    // An output folder that holds another export.
    std::fs::write(
        s.join("quantization.json"),
        r#"{"w_bits": 4, "w_group": null, "a_bits": null, "kv_bits": null}"#,
    )
    .unwrap();
    json_of(&export(&s, &d.join("o"), "packed", &[]));
    let e = stderr(&export(&s, &d.join("o"), "gguf", &[]));
    assert!(
        e.contains("holds another export") && e.contains("packed"),
        "{e}"
    );
    assert!(
        d.join("o/model/packed.json").is_file(),
        "the other export is left intact"
    );
    // A folder holding something else.
    std::fs::create_dir_all(d.join("busy")).unwrap();
    std::fs::write(d.join("busy/notes.txt"), "mine").unwrap();
    let e = stderr(&export(&s, &d.join("busy"), "gguf", &[]));
    assert!(e.contains("notes.txt"), "{e}");
    // A student folder without its quantizers.
    std::fs::remove_file(s.join("quantization.json")).unwrap();
    let e = stderr(&export(&s, &d.join("q"), "gguf", &[]));
    assert!(e.contains("quantization.json"), "{e}");
    // A student without a weight grid (w_bits none) for a low-bit format.
    std::fs::write(
        s.join("quantization.json"),
        r#"{"w_bits": null, "w_group": null, "a_bits": null, "kv_bits": null}"#,
    )
    .unwrap();
    let e = stderr(&export(&s, &d.join("n"), "gguf", &[]));
    assert!(
        e.contains("w_bits none") && e.contains("--format hf"),
        "{e}"
    );
}

#[test]
fn three_bit_rows_that_do_not_tile_are_floats_with_their_grid() {
    // Q3_K needs rows of multiples of 256; stories260k's rows are 64 and 172 long.
    let d = temp_dir("export_q3");
    let s = student(
        &d,
        "stories260k",
        r#"{"w_bits": 3, "w_group": null, "a_bits": null, "kv_bits": null}"#,
    );
    let r = json_of(&export(
        &s,
        &d.join("g"),
        "gguf",
        &["--text", &text(), "--max-tokens", "1000"],
    ));
    assert_eq!(r["types"]["F32"], 35, "{r}");
    assert_eq!(r["max_weight_change"], 0.0);
    assert_eq!(r["ppl"]["export"], r["ppl"]["student"]);
    assert!(
        r["as_float"]["model.layers.0.self_attn.q_proj.weight"]["reason"]
            .as_str()
            .unwrap()
            .contains("Q3_K")
    );
}
