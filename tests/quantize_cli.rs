//! `pipeline quantize` end to end: the bitsandbytes layout against the real bitsandbytes and
//! transformers (when Python has them), perplexity of every format through `pipeline eval`,
//! and clear errors on bad input that leave existing files alone.

mod common;
use candle_core::{Device, Tensor};
use common::*;
use std::path::{Path, PathBuf};

const TEACHER_PPL: f64 = 4.0253;

fn teacher() -> PathBuf {
    shared().join("models/stories260k")
}

fn quantize(out: &Path, extra: &[&str]) -> serde_json::Value {
    let m = teacher();
    let mut args = vec![
        "quantize",
        "--model",
        m.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(
        o.status.success(),
        "quantize {extra:?} failed: {}",
        stderr(&o)
    );
    serde_json::from_str(stdout(&o).trim()).expect("quantize --json prints one JSON object")
}

fn eval_ppl(model: &Path) -> f64 {
    let t = shared().join("data/tinystories-valid-64k.txt");
    let o = run(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--text",
        t.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        o.status.success(),
        "eval {} failed: {}",
        model.display(),
        stderr(&o)
    );
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    v["ppl"].as_f64().unwrap()
}

/// Our model's logits on the fixture's token sequence, from the quantized folder.
fn our_logits(folder: &Path) -> (Vec<u32>, Tensor) {
    let fx = candle_core::safetensors::load(
        shared().join("fixtures/logits/stories260k.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let tokens: Vec<u32> = fx["a.tokens"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let f = model::ModelFolder::open(folder).unwrap();
    let m = model::Llama::load(&f, model::QuantConfig::none(), &Device::Cpu).unwrap();
    let ids = Tensor::new(tokens.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    (tokens, m.forward(&ids).unwrap().squeeze(0).unwrap())
}

fn python_has_bnb() -> Result<(), String> {
    let o = std::process::Command::new("python3")
        .args([
            "-c",
            "import torch, transformers, bitsandbytes, safetensors, accelerate",
        ])
        .output()
        .map_err(|e| format!("python3 cannot be started: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        let e = String::from_utf8_lossy(&o.stderr);
        Err(e.lines().last().unwrap_or("").to_string())
    }
}

#[test]
fn nf4_bnb_layout_loads_in_transformers_and_matches_bitsandbytes() {
    let out = temp_dir("quantize_nf4_bnb").join("q");
    let r = quantize(&out, &["--format", "nf4", "--double-quant"]);
    assert_eq!(r["layout"], "bnb");
    assert_eq!(r["quantized_tensors"], 35, "7 projections x 5 layers");
    // Codes 4 bits + absmax codes 8/64 + nested absmax, plus per-tensor constants (16 + 256
    // f32 code entries and the JSON state), which are large next to these tiny matrices.
    let bpp = r["bits_per_param"].as_f64().unwrap();
    let params = r["quantized_params"].as_u64().unwrap() as f64;
    let stored: f64 = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["stored_bytes"].as_f64().unwrap())
        .sum();
    assert!((bpp - stored * 8.0 / params).abs() < 1e-9);
    assert!(bpp > 4.127 && bpp < 6.0, "bits/param {bpp}");
    for t in r["tensors"].as_array().unwrap() {
        let e = t["rel_error"].as_f64().unwrap();
        assert!(e > 0.02 && e < 0.2, "{}: NF4 error {e}", t["name"]);
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["quant_method"], "bitsandbytes");
    assert_eq!(
        cfg["quantization_config"]["bnb_4bit_use_double_quant"],
        true
    );

    let ppl = eval_ppl(&out);
    eprintln!("nf4 bnb (double quant) ppl {ppl:.4} (teacher {TEACHER_PPL})");
    assert!(
        ppl > TEACHER_PPL && ppl < TEACHER_PPL * 1.15,
        "nf4 ppl {ppl}"
    );

    if let Err(why) = python_has_bnb() {
        eprintln!(
            "SKIPPED: the bitsandbytes/transformers check needs python3 with torch, transformers and bitsandbytes ({why}); `pip install torch transformers bitsandbytes accelerate` enables it"
        );
        return;
    }
    let (tokens, logits) = our_logits(&out);
    let lf = out.parent().unwrap().join("ours_logits.safetensors");
    let ids = Tensor::new(
        tokens
            .iter()
            .map(|&t| t as i64)
            .collect::<Vec<_>>()
            .as_slice(),
        &Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            ("tokens".to_string(), ids),
            ("logits".to_string(), logits),
        ]),
        &lf,
    )
    .unwrap();
    // Our dequantized weights, exactly as eval / train / generate load the folder.
    let deq = out.parent().unwrap().join("ours_dequantized.safetensors");
    let tensors = model::ModelFolder::open(&out)
        .unwrap()
        .load_tensors(&Device::Cpu)
        .unwrap();
    candle_core::safetensors::save(&tensors, &deq).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bnb_check.py");
    let o = std::process::Command::new("python3")
        .arg(&script)
        .args(["--original", teacher().to_str().unwrap()])
        .args(["--quantized", out.to_str().unwrap()])
        .args(["--logits", lf.to_str().unwrap()])
        .args(["--dequantized", deq.to_str().unwrap()])
        .output()
        .unwrap();
    let text = stdout(&o);
    eprintln!("bnb_check: {text}");
    if o.status.code() == Some(2) {
        eprintln!("SKIPPED: {}", stderr(&o));
        return;
    }
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|_| panic!("bnb_check.py printed no JSON: {}", stderr(&o)));
    assert_eq!(v["byte_mismatches"], serde_json::json!([]), "{v}");
    assert_eq!(v["quantized_weights"], 35);
    assert_eq!(
        v["tensors_compared"],
        35 * 6,
        "packed, absmax, quant_map, nested x2, state"
    );
    assert_eq!(v["linear4bit_modules"], 35);
    assert_eq!(v["dequantized_weights_max_abs_diff"], 0.0, "{v}");
    let d = v["logits_max_abs_diff"].as_f64().unwrap();
    assert!(
        d <= 1e-5,
        "logits differ from transformers+bitsandbytes by {d}"
    );
    // Our own forward pass sums in another order than torch: the fp tolerance of the
    // fixtures (they agree with transformers to 3e-5).
    let d = v["rust_logits_max_abs_diff"].as_f64().unwrap();
    assert!(
        d <= 1e-4,
        "our logits differ from transformers+bitsandbytes by {d}"
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn every_format_evaluates_with_sensible_perplexity() {
    let base = temp_dir("quantize_formats");
    let mut ppl = std::collections::BTreeMap::new();
    for (format, layout) in [
        ("nf4", "packed"),
        ("nf3", "packed"),
        ("nf2", "packed"),
        ("int8", "packed"),
        ("int4", "packed"),
    ] {
        let out = base.join(format);
        let r = quantize(
            &out,
            &["--format", format, "--layout", layout, "--double-quant"],
        );
        let bits = r["bits_per_param"].as_f64().unwrap();
        let p = eval_ppl(&out);
        eprintln!(
            "{format}: ppl {p:.4} (teacher {TEACHER_PPL}), {bits:.3} bits/param, mean rel error {:.4}, {:.1}% of the input size",
            r["mean_rel_error"].as_f64().unwrap(),
            100.0 * r["size_ratio"].as_f64().unwrap()
        );
        ppl.insert(format, p);
    }
    // int8 is nearly lossless; the NormalFloat formats lose more as bits go down.
    assert!((ppl["int8"] / TEACHER_PPL - 1.0).abs() < 0.005, "{ppl:?}");
    assert!(
        ppl["nf4"] < ppl["nf3"] && ppl["nf3"] < ppl["nf2"],
        "{ppl:?}"
    );
    assert!(
        ppl["nf4"] < ppl["int4"],
        "NF4 beats int4 on normal weights: {ppl:?}"
    );

    // The packed NF4 layout and the bnb one hold the same numbers.
    let bnb = base.join("nf4_bnb");
    quantize(&bnb, &["--format", "nf4", "--double-quant"]);
    let p = eval_ppl(&bnb);
    assert_eq!(
        p, ppl["nf4"],
        "nf4 packed and bnb layouts dequantize identically"
    );
}

fn expect_error(args: &[&str], needles: &[&str]) {
    let o = run(args);
    assert!(!o.status.success(), "{args:?} should fail");
    let e = stderr(&o);
    assert!(!e.contains("panicked"), "{args:?} panicked: {e}");
    for n in needles {
        assert!(
            e.contains(n),
            "{args:?}: error should mention {n:?}, got: {e}"
        );
    }
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn bad_input_gets_clear_errors_and_overwrites_nothing() {
    let base = temp_dir("quantize_bad_input");
    let m = teacher();
    let ms = m.to_str().unwrap();
    let fresh = base.join("fresh");
    let fs = fresh.to_str().unwrap();

    expect_error(
        &["quantize", "--model", ms, "--out", fs, "--format", "nf5"],
        &["format = \"nf5\"", "nf4, nf3, nf2, int8, int4, int3, int2"],
    );
    for b in ["48", "16", "8192", "0"] {
        expect_error(
            &[
                "quantize",
                "--model",
                ms,
                "--out",
                fs,
                "--format",
                "nf4",
                "--block-size",
                b,
            ],
            &[&format!("block_size = {b}"), "power of two from 32 to 4096"],
        );
    }
    expect_error(
        &[
            "quantize", "--model", ms, "--out", fs, "--format", "int4", "--layout", "bnb",
        ],
        &["layout = \"bnb\"", "packed"],
    );
    assert!(!fresh.exists(), "a refused run creates nothing");

    // A header that claims more bytes than the tensor's range holds.
    let lying = base.join("lying");
    copy_model(&m, &lying);
    let st = lying.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let key = "\"model.layers.0.self_attn.k_proj.weight\":{\"dtype\":\"F32\",\"shape\":[32,64]";
    assert!(
        header.contains(key),
        "fixture header layout changed: {header}"
    );
    // Same length, so only the lie differs.
    let bad = header.replace(key, &key.replace("[32,64]", "[64,64]"));
    bytes.splice(8..8 + n, bad.into_bytes());
    std::fs::write(&st, &bytes).unwrap();
    let out = base.join("from_lying");
    expect_error(
        &[
            "quantize",
            "--model",
            lying.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--format",
            "nf4",
        ],
        &[
            "model.safetensors",
            "model.layers.0.self_attn.k_proj.weight",
            "data_offsets",
            "[64, 64]",
        ],
    );
    assert!(!out.exists(), "nothing is written for a broken input");
    // A header that points past the end of the file.
    let mut bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    bytes.truncate(bytes.len() - 100);
    std::fs::write(&st, &bytes).unwrap();
    expect_error(
        &[
            "quantize",
            "--model",
            lying.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--format",
            "nf4",
        ],
        &["model.safetensors", "past the end of the data"],
    );

    // An output folder holding another quantization is left as it is.
    let done = base.join("done");
    quantize(&done, &["--format", "nf4", "--double-quant"]);
    let before = snapshot(&done);
    expect_error(
        &[
            "quantize",
            "--model",
            ms,
            "--out",
            done.to_str().unwrap(),
            "--format",
            "nf3",
        ],
        &[
            "quantize.json",
            "different quantization",
            "format = nf4",
            "nf3",
        ],
    );
    expect_error(
        &[
            "quantize",
            "--model",
            ms,
            "--out",
            done.to_str().unwrap(),
            "--format",
            "nf4",
        ],
        &["quantize.json", "double_quant = true", "false"],
    );
    assert_eq!(
        snapshot(&done),
        before,
        "the existing quantization is untouched"
    );
    // The same settings again redo the folder, byte for byte the same (except timings).
    quantize(&done, &["--format", "nf4", "--double-quant"]);
    let again = snapshot(&done);
    for ((a, x), (b, y)) in before.iter().zip(&again) {
        assert_eq!(a, b);
        if a != "quantize_report.json" {
            assert!(x == y, "{a} changed on an identical rerun");
        }
    }

    // An output folder holding a plain model is refused.
    let plain = base.join("plain");
    copy_model(&m, &plain);
    let before = snapshot(&plain);
    expect_error(
        &[
            "quantize",
            "--model",
            ms,
            "--out",
            plain.to_str().unwrap(),
            "--format",
            "nf4",
        ],
        &["did not write", "nothing was overwritten"],
    );
    assert_eq!(snapshot(&plain), before);
}

#[test]
fn pipeline_file_quantize_table_is_checked_like_the_command() {
    let base = temp_dir("quantize_pipeline_table");
    let smoke = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines/smoke.toml"),
    )
    .unwrap();
    for (table, needles) in [
        (
            "[quantize]\nformat = \"nf4\"\nblock_size = 48\n",
            vec!["[quantize] block_size = 48", "power of two from 32 to 4096"],
        ),
        (
            "[quantize]\nformat = \"int3\"\nlayout = \"bnb\"\n",
            vec!["[quantize] layout = \"bnb\"", "packed"],
        ),
        (
            "[quantize]\nformat = \"fp4\"\n",
            vec![
                "[quantize] format = \"fp4\"",
                "nf4, nf3, nf2, int8, int4, int3, int2",
            ],
        ),
    ] {
        let p = base.join("p.toml");
        std::fs::write(&p, format!("{smoke}\n{table}")).unwrap();
        let mut needles: Vec<&str> = needles;
        needles.push("p.toml");
        expect_error(&["status", p.to_str().unwrap()], &needles);
    }
    // The full table, as `pipeline quantize` takes it, is accepted.
    let p = base.join("ok.toml");
    let table = "[quantize]\nformat = \"nf3\"\nlayout = \"packed\"\nblock_size = 128\ndouble_quant = false\nskip = [\"lm_head\", \"down_proj\"]\n";
    std::fs::write(&p, format!("{smoke}\n{table}")).unwrap();
    let o = run(&["status", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}
