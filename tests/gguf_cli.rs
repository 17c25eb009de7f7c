//! llama.cpp GGUF files as models, against llama.cpp's own converter: scripts/make_gguf.py
//! converts the Hugging Face folders to F32 and Q8_0 GGUF files (skipped with a message when
//! python3, torch or the llama-cpp-python source distribution is missing), which must give the
//! folder's tensors, logits, tokenizer and perplexity, and serve as a pipeline's teacher.

mod common;
use candle_core::{Device, Tensor};
use common::*;
use model::{Llama, ModelFolder, QuantConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Q8_0 against the folder's own f32 forward pass, on both fixture sequences (measured max
/// abs: stories260k 0.357 over 296 x 512 logits, where ffn_down stays F16 since its 172
/// columns are no multiple of Q8_0's 32-blocks; tinystories-656k 0.321 over 296 x 2048).
const Q8_0_LOGITS_TOL: f64 = 0.5;
/// Q8_0 perplexity on the 64k text, relative to the folder's (measured: +0.091%).
const Q8_0_PPL_REL_TOL: f64 = 0.003;

fn model_dir(name: &str) -> PathBuf {
    shared().join("models").join(name)
}

/// `<name>-f32.gguf` and `<name>-q8_0.gguf`, converted once per test process; None (after
/// printing why) when the converter cannot run here.
fn converted(name: &str) -> Option<(PathBuf, PathBuf)> {
    type Files = Result<(PathBuf, PathBuf), String>;
    static DONE: Mutex<Vec<(String, Files)>> = Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if !done.iter().any(|(n, _)| n == name) {
        let r = convert(name);
        done.push((name.to_string(), r));
    }
    match &done.iter().find(|(n, _)| n == name).unwrap().1 {
        Ok(files) => Some(files.clone()),
        Err(why) => {
            eprintln!("SKIPPED: the GGUF checks need llama.cpp's converter: {why}");
            None
        }
    }
}

fn convert(name: &str) -> Result<(PathBuf, PathBuf), String> {
    let out = temp_dir(&format!("gguf_{name}"));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/make_gguf.py");
    let o = std::process::Command::new("python3")
        .arg(&script)
        .arg(model_dir(name))
        .arg(&out)
        .output()
        .map_err(|e| format!("python3 cannot be started: {e}"))?;
    if o.status.code() == Some(77) {
        return Err(stderr(&o).trim().to_string());
    }
    assert!(
        o.status.success(),
        "make_gguf.py {name} failed: {}",
        stderr(&o)
    );
    Ok((
        out.join(format!("{name}-f32.gguf")),
        out.join(format!("{name}-q8_0.gguf")),
    ))
}

/// The fixture's two token sequences (`a` starts with BOS, `b` from mid-text) of a model.
fn fixture_tokens(name: &str) -> Vec<Vec<u32>> {
    let fx = candle_core::safetensors::load(
        shared().join(format!("fixtures/logits/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    ["a.tokens", "b.tokens"]
        .iter()
        .map(|k| {
            fx[*k]
                .to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|t| t as u32)
                .collect()
        })
        .collect()
}

fn logits(path: &Path, tokens: &[Vec<u32>]) -> Vec<Tensor> {
    let f = ModelFolder::open(path).unwrap();
    let m = Llama::load(&f, QuantConfig::none(), &Device::Cpu).unwrap();
    tokens
        .iter()
        .map(|t| {
            let ids = Tensor::new(t.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            m.forward(&ids).unwrap().squeeze(0).unwrap()
        })
        .collect()
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| model::max_abs_diff(a, b).unwrap())
        .fold(0.0, f64::max)
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    ModelFolder::open(path)
        .unwrap()
        .load_tensors(&Device::Cpu)
        .unwrap()
}

#[test]
fn gguf_tensors_and_logits_match_the_hugging_face_folder() {
    for name in ["stories260k", "tinystories-656k"] {
        let Some((f32_file, q8_file)) = converted(name) else {
            return;
        };
        let hf_dir = model_dir(name);
        // F32: every tensor under the same name, bit for bit (q/k un-permuted).
        let hf = tensors(&hf_dir);
        let gg = tensors(&f32_file);
        let mut names: Vec<_> = hf.keys().collect();
        names.sort();
        let mut gg_names: Vec<_> = gg.keys().collect();
        gg_names.sort();
        assert_eq!(names, gg_names, "{name}: tensor names");
        for n in names {
            assert_eq!(hf[n].dims(), gg[n].dims(), "{name}: {n}");
            let d = model::max_abs_diff(&hf[n], &gg[n]).unwrap();
            assert_eq!(d, 0.0, "{name}: {n} differs by {d}");
        }
        let hf_cfg = ModelFolder::open(&hf_dir).unwrap().config;
        let gg_cfg = ModelFolder::open(&f32_file).unwrap().config;
        // The folders store lm_head.weight, so the GGUF has output.weight: untied, same values.
        assert_eq!(
            model::LlamaConfig {
                tie_word_embeddings: hf_cfg.tie_word_embeddings,
                eos_token_ids: hf_cfg.eos_token_ids.clone(),
                ..gg_cfg.clone()
            },
            hf_cfg,
            "{name}: config"
        );

        let tokens = fixture_tokens(name);
        let want = logits(&hf_dir, &tokens);
        let d32 = max_diff(&logits(&f32_file, &tokens), &want);
        let d8 = max_diff(&logits(&q8_file, &tokens), &want);
        eprintln!("{name}: max abs logit diff to the folder: F32 {d32:e}, Q8_0 {d8:.4}");
        assert!(d32 <= 1e-4, "{name}: F32 GGUF logits differ by {d32}");
        assert!(d8 > 0.0, "{name}: Q8_0 should not be lossless");
        assert!(
            d8 <= Q8_0_LOGITS_TOL,
            "{name}: Q8_0 GGUF logits differ by {d8}"
        );
    }
}

#[test]
fn gguf_tokenizer_matches_tokenizer_json() {
    let Some((f32_file, q8_file)) = converted("stories260k") else {
        return;
    };
    let hf_dir = model_dir("stories260k");
    // The tokenizer.json built from the GGUF vocabulary is the folder's, field for field.
    let ours: serde_json::Value = serde_json::from_str(
        &ModelFolder::open(&f32_file)
            .unwrap()
            .gguf
            .unwrap()
            .tokenizer_json()
            .unwrap(),
    )
    .unwrap();
    let theirs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf_dir.join("tokenizer.json")).unwrap()).unwrap();
    for k in [
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
        "model",
    ] {
        assert_eq!(ours[k], theirs[k], "tokenizer.json field {k}");
    }

    let text = std::fs::read_to_string(shared().join("data/tinystories-valid-64k.txt")).unwrap();
    let hf = ModelFolder::open(&hf_dir).unwrap().tokenizer().unwrap();
    let gg = ModelFolder::open(&f32_file).unwrap().tokenizer().unwrap();
    for special in [false, true] {
        let a = hf
            .encode(text.as_str(), special)
            .unwrap()
            .get_ids()
            .to_vec();
        let b = gg
            .encode(text.as_str(), special)
            .unwrap()
            .get_ids()
            .to_vec();
        assert!(a.len() > 30_000);
        assert_eq!(a, b, "ids of the 64k text (add_special_tokens {special})");
        assert_eq!(
            hf.decode(&a, true).unwrap(),
            gg.decode(&b, true).unwrap(),
            "decoded text"
        );
    }
    // Unknown characters fall back to byte pieces the same way.
    let odd = "naïve 東京 🦀\ttabs  and\n\nlines";
    assert_eq!(
        hf.encode(odd, true).unwrap().get_ids(),
        gg.encode(odd, true).unwrap().get_ids()
    );

    let fp32 = ModelFolder::open(&f32_file).unwrap().fingerprint().unwrap();
    let fp8 = ModelFolder::open(&q8_file).unwrap().fingerprint().unwrap();
    assert_eq!(
        fp32.tokenizer_sha256, fp8.tokenizer_sha256,
        "same vocabulary"
    );
    assert_ne!(fp32.weights_sha256, fp8.weights_sha256);
}

fn eval_ppl(model: &Path) -> serde_json::Value {
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
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

#[test]
fn gguf_perplexity_through_pipeline_eval() {
    let Some((f32_file, q8_file)) = converted("stories260k") else {
        return;
    };
    let hf = eval_ppl(&model_dir("stories260k"));
    let g32 = eval_ppl(&f32_file);
    let g8 = eval_ppl(&q8_file);
    let ppl = |v: &serde_json::Value| v["ppl"].as_f64().unwrap();
    eprintln!(
        "stories260k ppl: folder {}, F32 GGUF {}, Q8_0 GGUF {}",
        ppl(&hf),
        ppl(&g32),
        ppl(&g8)
    );
    assert_eq!(hf["tokens"], g32["tokens"]);
    assert_eq!(hf["tokens"], g8["tokens"]);
    assert_eq!(ppl(&hf), ppl(&g32), "same weights, same tokens");
    let rel = (ppl(&g8) - ppl(&hf)).abs() / ppl(&hf);
    assert!(
        ppl(&g8) != ppl(&hf) && rel <= Q8_0_PPL_REL_TOL,
        "Q8_0 ppl {} vs {}",
        ppl(&g8),
        ppl(&hf)
    );
}

#[test]
fn gguf_teacher_runs_a_pipeline() {
    let Some((f32_file, _)) = converted("stories260k") else {
        return;
    };
    let d = temp_dir("gguf_pipeline");
    let s = shared();
    let text = format!(
        r#"[run]
name = "gguf"
directory = "{run}"
[teacher]
model = "{model}"
[generate]
samples = 32
max_tokens = 48
shard_size = 16
batch = 16
seed = 3
[student]
w_bits = 4
a_bits = 8
kv_bits = 4
[train]
steps = 8
batch = 4
seq_len = 48
lr = 1e-3
schedule = "cosine"
warmup_steps = 2
log_every = 4
checkpoint_every = 4
keep_checkpoints = 2
[eval]
text = "{text}"
max_tokens = 1000
"#,
        run = d.join("run").display(),
        model = f32_file.display(),
        text = s.join("data/tinystories-valid-64k.txt").display(),
    );
    let p = d.join("p.toml");
    std::fs::write(&p, text).unwrap();
    let o = run(&["run", p.to_str().unwrap()]);
    assert!(o.status.success(), "run failed: {}", stderr(&o));
    // The student folder gets the config.json and tokenizer.json built from the GGUF file.
    let student = d.join("run/train/student");
    let f = ModelFolder::open(&student).unwrap();
    assert_eq!(f.config, ModelFolder::open(&f32_file).unwrap().config);
    let text = "Once upon a time, there was a little girl.";
    assert_eq!(
        f.tokenizer().unwrap().encode(text, true).unwrap().get_ids(),
        ModelFolder::open(&model_dir("stories260k"))
            .unwrap()
            .tokenizer()
            .unwrap()
            .encode(text, true)
            .unwrap()
            .get_ids()
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("run/eval/report.json")).unwrap()).unwrap();
    assert!(r["teacher"]["ppl"].as_f64().unwrap() > 1.0, "{r}");
    assert!(r["student"]["ppl"].as_f64().unwrap() > 1.0, "{r}");
}
