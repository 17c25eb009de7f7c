//! `pipeline eval` end to end: reference perplexities and clear errors on bad input.

mod common;
use common::*;

fn eval_json(model: &str, extra: &[&str]) -> serde_json::Value {
    let m = shared().join("models").join(model);
    let t = shared().join("data/tinystories-valid-64k.txt");
    let mut args = vec![
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--text",
        t.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(
        o.status.success(),
        "eval {model} {extra:?} failed: {}",
        stderr(&o)
    );
    serde_json::from_str(stdout(&o).trim()).expect("eval --json prints one JSON object")
}

fn settings(name: &str) -> Vec<&'static str> {
    match name {
        "fp" => vec![],
        "w8" => vec!["--w-bits", "8"],
        "w4" => vec!["--w-bits", "4"],
        "w3" => vec!["--w-bits", "3"],
        "w4g32" => vec!["--w-bits", "4", "--w-group", "32"],
        "w4a8" => vec!["--w-bits", "4", "--a-bits", "8"],
        "w4a8kv4" => vec!["--w-bits", "4", "--a-bits", "8", "--kv-bits", "4"],
        "w4a8kv4_pre_rope" => vec![
            "--w-bits",
            "4",
            "--a-bits",
            "8",
            "--kv-bits",
            "4",
            "--kv-point",
            "pre_rope",
        ],
        "w8a8kv8" => vec!["--w-bits", "8", "--a-bits", "8", "--kv-bits", "8"],
        "w4a4kv4" => vec!["--w-bits", "4", "--a-bits", "4", "--kv-bits", "4"],
        other => panic!("unknown setting {other}"),
    }
}

fn check_model(model: &str) {
    let text = std::fs::read_to_string(shared().join("fixtures/ppl.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let r = &reference[model];
    let mut failures = vec![];
    for (name, v) in r.as_object().unwrap() {
        if name == "tokens_scored" {
            continue;
        }
        let want = v["ppl"].as_f64().unwrap();
        let got = eval_json(model, &settings(name));
        assert_eq!(
            got["tokens"].as_u64(),
            r["tokens_scored"].as_u64(),
            "{model} {name}: tokens scored"
        );
        let ppl = got["ppl"].as_f64().unwrap();
        let rel = (ppl - want).abs() / want;
        eprintln!(
            "{model} {name}: ppl {ppl:.5} reference {want:.5} rel {rel:.2e} ({:.0} tok/s)",
            got["tokens_per_second"].as_f64().unwrap()
        );
        // 4-bit activations turn float-rounding differences in RMSNorm's mean (torch sums in a
        // different order) into code flips; that one setting gets 0.5%, the rest 0.1%.
        let tol = if name == "w4a4kv4" { 5e-3 } else { 1e-3 };
        if rel > tol {
            failures.push(format!("{name}: {ppl} vs {want}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{model}: perplexities off by more than 0.1%: {failures:?}"
    );
}

#[test]
fn stories260k_perplexities_match_reference() {
    check_model("stories260k");
}

#[test]
fn tinystories656k_perplexities_match_reference() {
    check_model("tinystories-656k");
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

#[test]
fn bad_input_gets_clear_errors() {
    let src = shared().join("models/stories260k");
    let text = shared().join("data/tinystories-valid-64k.txt");
    let t = text.to_str().unwrap();
    let base = temp_dir("eval_bad_input");

    // Missing config.json.
    let d = base.join("no_config");
    copy_model(&src, &d);
    std::fs::remove_file(d.join("config.json")).unwrap();
    expect_error(
        &["eval", "--model", d.to_str().unwrap(), "--text", t],
        &["config.json"],
    );

    // Unknown architecture.
    let d = base.join("arch");
    copy_model(&src, &d);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    let cfg = cfg
        .replace("LlamaForCausalLM", "GPT2LMHeadModel")
        .replace("\"llama\"", "\"gpt2\"");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    expect_error(
        &["eval", "--model", d.to_str().unwrap(), "--text", t],
        &["config.json", "GPT2LMHeadModel"],
    );

    // Missing tensor and wrong shape.
    let weights =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let d = base.join("missing_tensor");
    copy_model(&src, &d);
    let mut w = weights.clone();
    w.remove("model.layers.2.mlp.up_proj.weight");
    candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
    expect_error(
        &["eval", "--model", d.to_str().unwrap(), "--text", t],
        &["model.safetensors", "model.layers.2.mlp.up_proj.weight"],
    );

    let d = base.join("wrong_shape");
    copy_model(&src, &d);
    let mut w = weights.clone();
    let bad =
        candle_core::Tensor::zeros((64, 60), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    w.insert("model.layers.0.self_attn.q_proj.weight".into(), bad);
    candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
    expect_error(
        &["eval", "--model", d.to_str().unwrap(), "--text", t],
        &["model.layers.0.self_attn.q_proj.weight", "[64, 60]"],
    );

    // Corrupt weights file.
    let d = base.join("corrupt");
    copy_model(&src, &d);
    std::fs::write(d.join("model.safetensors"), b"not a safetensors file").unwrap();
    expect_error(
        &["eval", "--model", d.to_str().unwrap(), "--text", t],
        &["model.safetensors"],
    );

    // Tokenizer of a bigger vocabulary than the model.
    let d = base.join("tokenizer");
    copy_model(&src, &d);
    std::fs::copy(
        shared().join("models/tinystories-656k/tokenizer.json"),
        d.join("tokenizer.json"),
    )
    .unwrap();
    expect_error(
        &["eval", "--model", d.to_str().unwrap(), "--text", t],
        &["tokenizer.json", "vocab_size"],
    );

    // Bits and group out of range.
    let m = src.to_str().unwrap();
    expect_error(
        &["eval", "--model", m, "--text", t, "--w-bits", "0"],
        &["--w-bits", "2..=8"],
    );
    expect_error(
        &["eval", "--model", m, "--text", t, "--a-bits", "33"],
        &["--a-bits", "2..=8"],
    );
    expect_error(
        &[
            "eval",
            "--model",
            m,
            "--text",
            t,
            "--w-bits",
            "4",
            "--w-group",
            "0",
        ],
        &["--w-group"],
    );
    expect_error(
        &["eval", "--model", m, "--text", "/nonexistent/text.txt"],
        &["/nonexistent/text.txt"],
    );
}
