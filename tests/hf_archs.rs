//! Real checkpoint forms load right or not at all: tiny models of every supported
//! architecture and config form, written by transformers itself (`scripts/hf_arch_reference.py`),
//! give transformers' logits through the full forward and the KV-cache decoder, and its greedy
//! tokens; configs we do not implement fail naming the file and the key.

mod common;
use common::*;
use std::path::{Path, PathBuf};

const CASES: &[&str] = &[
    "llama_rope_parameters",
    "llama32_llama3",
    "llama_linear",
    "llama_yarn",
    "llama_attention_bias",
    "mistral",
    "qwen2",
    "qwen3",
    "llama_tied",
    "llama_bf16",
    "llama_sharded",
];

/// Runs the reference script once per test binary; `None` (with the reason) when Python lacks
/// torch or transformers.
fn references() -> Result<PathBuf, String> {
    static DIR: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out = temp_dir("hf_archs");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hf_arch_reference.py");
        let o = std::process::Command::new("python3")
            .arg(&script)
            .arg(&out)
            .arg(shared())
            .output()
            .map_err(|e| format!("python3 cannot be started: {e}"))?;
        match o.status.code() {
            Some(0) => Ok(out),
            Some(3) => Err(stderr(&o)),
            _ => panic!("{} failed:\n{}", script.display(), stderr(&o)),
        }
    })
    .clone()
}

#[test]
fn every_architecture_matches_transformers() {
    let dir = match references() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("SKIPPED: needs python3 with torch and transformers ({why}); `pip install torch transformers` enables it");
            return;
        }
    };
    let mut failures = Vec::new();
    for case in CASES {
        let m = dir.join(case);
        let r = m.join("reference.safetensors");
        let o = run(&[
            "bench",
            "logits",
            "--model",
            m.to_str().unwrap(),
            "--reference",
            r.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "{case}: bench logits failed: {}",
            stderr(&o)
        );
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        let cases = &v["cases"];
        for path in ["forward", "decode", "decode_batch"] {
            let c = &cases[format!("fp.a.{path}")];
            let diff = c["max_abs_diff"].as_f64().unwrap();
            let mismatch = c["argmax_mismatch"].as_f64().unwrap();
            eprintln!("{case:24} {path:8} max |diff| {diff:.2e}, argmax mismatch {mismatch}");
            if diff > 1e-4 || mismatch > 0.0 {
                failures.push(format!(
                    "{case} {path}: max |diff| {diff:e}, argmax mismatch {mismatch}"
                ));
            }
        }
        // The fake quantizers (W4 per channel, A8 per token, V and post-RoPE K per token)
        // against the same quantizers put into transformers' modules. Equal, except where a
        // value lies within float noise of a rounding boundary: such a flip moves logits by a
        // few hundredths (quantization itself moves them by about 1), and in the decoder,
        // whose products sum in another order, it stays in the cache for every later position.
        for path in ["forward", "decode", "decode_batch"] {
            let c = &cases[format!("w4a8kv4.a.{path}")];
            let over = c["positions_over_1e-4"].as_u64().unwrap();
            let diff = c["max_abs_diff"].as_f64().unwrap();
            eprintln!(
                "{case:24} {path:8} w4a8kv4: max |diff| {diff:.2e}, positions over 1e-4: {over}"
            );
            let exact_enough = match path {
                "forward" => over <= 1 && diff < 0.05,
                _ => diff < 0.05,
            };
            if !exact_enough {
                failures.push(format!("{case} {path} w4a8kv4: {c}"));
            }
        }
        let g = &cases["fp.greedy"];
        assert_eq!(g["tokens"].as_u64(), Some(32), "{case}: {g}");
        if !g["first_mismatch"].is_null() {
            failures.push(format!("{case} greedy: {g}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn sliding_window_shorter_than_the_context_is_refused() {
    let dir = match references() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("SKIPPED: needs python3 with torch and transformers ({why})");
            return;
        }
    };
    let m = dir.join("mistral"); // sliding_window = 96, max_position_embeddings = 128
    let text = shared().join("data/tinystories-valid-64k.txt");
    let o = run(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "128",
        "--max-tokens",
        "400",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("ctx = 128") && e.contains("sliding_window"),
        "{e}"
    );
    // Within the window the model runs (by default at the window's length).
    let o = run(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--max-tokens",
        "400",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["ctx"].as_u64(), Some(96), "{v}");
}

/// A copy of stories260k whose config.json has `key` set to `value` (JSON).
fn with_config(name: &str, key: &str, value: serde_json::Value) -> PathBuf {
    let d = temp_dir(&format!("hf_archs_bad_{name}"));
    copy_model(&shared().join("models/stories260k"), &d);
    let p = d.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    d
}

#[test]
fn unimplemented_config_keys_fail_naming_file_and_key() {
    use serde_json::json;
    let text = shared().join("data/tinystories-valid-64k.txt");
    let cases = [
        ("dynamic", "rope_scaling", json!({"rope_type": "dynamic", "factor": 2.0}), "`rope_scaling.rope_type` = \"dynamic\" is not supported; supported: default, linear, llama3, yarn"),
        ("longrope", "rope_parameters", json!({"rope_type": "longrope", "rope_theta": 10000.0}), "`rope_parameters.rope_type` = \"longrope\""),
        ("partial", "partial_rotary_factor", json!(0.5), "`partial_rotary_factor` = 0.5: partial rotary embeddings are not supported"),
        ("mlp_bias", "mlp_bias", json!(true), "`mlp_bias` = true"),
        ("act", "hidden_act", json!("gelu_pytorch_tanh"), "`hidden_act` = \"gelu_pytorch_tanh\""),
        ("arch", "architectures", json!(["GemmaForCausalLM"]), "unsupported architecture [\"GemmaForCausalLM\"]"),
        ("per_layer_rope", "rope_parameters", json!({"full_attention": {"rope_type": "default"}}), "RoPE settings per layer type"),
    ];
    for (name, key, value, want) in cases {
        let mut d = with_config(name, key, value);
        if name == "arch" {
            // model_type would still say llama; a Gemma config says gemma.
            let p = d.join("config.json");
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            v["model_type"] = json!("gemma");
            std::fs::write(&p, v.to_string()).unwrap();
            d = d.clone();
        }
        let o = run(&[
            "eval",
            "--model",
            d.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--max-tokens",
            "64",
        ]);
        assert!(!o.status.success(), "{name}: accepted");
        let e = stderr(&o);
        let file = d.join("config.json");
        assert!(
            e.contains(&file.display().to_string()) && e.contains(want),
            "{name}: {e}\nwanted: {want}"
        );
    }
}

#[test]
fn transformers_5_rope_parameters_change_the_model() {
    // The bug of issue 15: `rope_parameters.rope_theta` was ignored (theta 10000 used). The same
    // weights with theta 100000 must score differently, and the transformers-4 form the same.
    let text = shared().join("data/tinystories-valid-64k.txt");
    let ppl = |d: &Path| -> f64 {
        let o = run(&[
            "eval",
            "--model",
            d.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--max-tokens",
            "2048",
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        v["ppl"].as_f64().unwrap()
    };
    let tf5 = with_config(
        "tf5",
        "rope_parameters",
        serde_json::json!({"rope_theta": 100000.0, "rope_type": "default"}),
    );
    let tf4 = with_config("tf4", "rope_theta", serde_json::json!(100000.0));
    let (a, b, base) = (
        ppl(&tf5),
        ppl(&tf4),
        ppl(&shared().join("models/stories260k")),
    );
    assert_eq!(a, b);
    assert_ne!(a, base);
}
