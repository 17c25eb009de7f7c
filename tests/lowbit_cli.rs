//! The student as it runs deployed: projections kept as 4-bit codes (`--packed`) and a K/V
//! cache kept as codes (`--kv-cache int4`), in `pipeline eval` and `pipeline sample`. A trained
//! W4A8KV4 student must score as its fake-quantized evaluation (within 0.1%: the integer
//! kernels sum in another order) and write the same greedy tokens.

mod common;
use common::*;
use std::path::{Path, PathBuf};

const Q: [&str; 6] = ["--w-bits", "4", "--a-bits", "8", "--kv-bits", "4"];

fn text() -> String {
    shared()
        .join("data/tinystories-valid-64k.txt")
        .display()
        .to_string()
}

fn teacher(name: &str) -> String {
    shared().join("models").join(name).display().to_string()
}

/// A W4A8KV4 student trained for a few steps on its teacher's own corpus.
fn trained_student(dir: &Path) -> PathBuf {
    let (c, t) = (dir.join("corpus"), dir.join("train"));
    let (cs, ts) = (c.display().to_string(), t.display().to_string());
    let tea = teacher("stories260k");
    let o = run(&[
        "generate",
        "--teacher",
        &tea,
        "--out",
        &cs,
        "--samples",
        "16",
        "--max-tokens",
        "48",
        "--shard-size",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[
        "train",
        "--teacher",
        &tea,
        "--corpus",
        &cs,
        "--out",
        &ts,
        "--steps",
        "8",
        "--batch",
        "2",
        "--seq-len",
        "48",
        "--w-bits",
        "4",
        "--a-bits",
        "8",
        "--kv-bits",
        "4",
        "--lr",
        "1e-3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    t.join("student")
}

fn json_of(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_str(stdout(o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

fn eval(model: &Path, extra: &[&str]) -> serde_json::Value {
    let (m, t) = (model.display().to_string(), text());
    let mut args = vec![
        "eval",
        "--model",
        &m,
        "--text",
        &t,
        "--max-tokens",
        "3000",
        "--json",
    ];
    args.extend_from_slice(extra);
    json_of(&run(&args))
}

fn sample(model: &str, prompt: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "sample",
        "--model",
        model,
        "--prompt",
        prompt,
        "--max-tokens",
        "60",
        "--json",
    ];
    args.extend_from_slice(extra);
    json_of(&run(&args))
}

fn ppl(v: &serde_json::Value) -> f64 {
    v["ppl"].as_f64().unwrap()
}

#[test]
fn packed_weights_and_an_int4_cache_score_and_write_as_the_fake_quantized_student() {
    let dir = temp_dir("lowbit_student");
    let s = trained_student(&dir);
    fn with<'a>(more: &[&'a str]) -> Vec<&'a str> {
        [&Q[..], more].concat()
    }
    let full = eval(&s, &Q);
    let fake = eval(&s, &with(&["--kv-cache", "float"]));
    let low = eval(&s, &with(&["--packed", "--kv-cache", "int4"]));
    // The two float references themselves differ where a 4-bit K/V code flips between the
    // full-sequence and the token-by-token summation orders (0.25% for this 8-step student on
    // 3,000 tokens); the packed path may sit anywhere within that spread, plus 0.1% for its
    // integer kernels. A wrong code or scale moves it by far more.
    let spread = (ppl(&full) / ppl(&fake) - 1.0).abs();
    for (name, reference) in [
        ("fake-quantized decoding", &fake),
        ("full-sequence evaluation", &full),
    ] {
        let rel = (ppl(&low) / ppl(reference) - 1.0).abs();
        assert!(
            rel < 1e-3 + spread,
            "packed + int4: ppl {} vs {name} {} ({rel:e})",
            ppl(&low),
            ppl(reference)
        );
    }
    // Without activation quantization the packed product differs only by f32 rounding.
    let w4 = eval(&s, &["--w-bits", "4"]);
    let w4p = eval(&s, &["--w-bits", "4", "--packed"]);
    assert!(
        (ppl(&w4p) / ppl(&w4) - 1.0).abs() < 1e-5,
        "{} vs {}",
        ppl(&w4p),
        ppl(&w4)
    );
    // 4-bit codes + one f32 scale per row: about an eighth of f32.
    let (dense, packed) = (
        w4["projection_bytes"].as_u64().unwrap(),
        low["projection_bytes"].as_u64().unwrap(),
    );
    assert!(packed * 7 < dense, "packed {packed} bytes vs dense {dense}");
    assert_eq!(low["weights"], "packed");
    assert_eq!(low["kv_cache"], "int4");
    // The comparison formats run; q8_0 stays close to the trained cache.
    for f in ["int8", "q8_0", "q4_0"] {
        let v = eval(&s, &with(&["--packed", "--kv-cache", f]));
        assert!(ppl(&v).is_finite() && ppl(&v) > 1.0, "{f}: {v}");
        if f == "q8_0" {
            assert!(
                (ppl(&v) / ppl(&fake) - 1.0).abs() < 0.05,
                "q8_0 {} vs {}",
                ppl(&v),
                ppl(&fake)
            );
        }
    }

    // Greedy continuations: the same tokens from the codes as from the fake quantizers, over
    // the first 32 (a wrong code or scale changes the first ones). Later, a near-tie between
    // two tokens of this 8-step student may fall either way under the integer kernels'
    // summation order, and then the two texts go their own ways (seen at about token 45).
    let sd = s.display().to_string();
    for prompt in ["Once upon a time", "Tom had a red ball"] {
        let a = &sample(&sd, prompt, &Q)["model"];
        let b = &sample(&sd, prompt, &with(&["--packed", "--kv-cache", "int4"]))["model"];
        let ids = |v: &serde_json::Value| -> Vec<u64> {
            let ids = v["ids"].as_array().expect("ids");
            assert!(ids.len() >= 32, "{prompt:?}: only {} tokens", ids.len());
            ids[..32].iter().map(|x| x.as_u64().unwrap()).collect()
        };
        assert_eq!(
            ids(a),
            ids(b),
            "{prompt:?}: {}\nvs\n{}",
            a["text"],
            b["text"]
        );
        // stories260k: 5 layers, K and V of 4 heads x 8 dims per token; int4 = 16 bytes of
        // codes + a 4-byte scale per row, against 32 f32 values.
        assert_eq!(a["kv_cache_bytes_per_token"], 5 * 2 * 32 * 4);
        assert_eq!(b["kv_cache_bytes_per_token"], 5 * 2 * (16 + 4));
    }
}

#[test]
fn a_packed_export_is_run_from_its_own_codes() {
    let dir = temp_dir("lowbit_export");
    let s = trained_student(&dir);
    let out = dir.join("packed");
    let o = run(&[
        "export",
        "--student",
        s.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        "packed",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rest = [
        "--a-bits",
        "8",
        "--kv-bits",
        "4",
        "--packed",
        "--kv-cache",
        "int4",
    ];
    let from_export = eval(&out.join("model"), &rest);
    let from_student = eval(&s, &[&["--w-bits", "4"][..], &rest[..]].concat());
    // The same grid, the same kernels: the same bits.
    assert_eq!(from_export["nll"], from_student["nll"]);
    assert_eq!(
        from_export["projection_bytes"],
        from_student["projection_bytes"]
    );
}

#[test]
fn sample_writes_from_both_shared_models_and_beside_a_teacher() {
    for name in ["stories260k", "tinystories-656k"] {
        let v = sample(&teacher(name), "Once upon a time", &[]);
        let m = &v["model"];
        assert!(!m["ids"].as_array().unwrap().is_empty(), "{v}");
        assert!(m["text"].as_str().unwrap().len() > 10, "{v}");
        assert!(m["tokens_per_second"].as_f64().unwrap() > 0.0);
    }
    // A quantized model beside its teacher; sampling with a seed repeats itself.
    let t = teacher("stories260k");
    let args = [
        "--teacher",
        &t,
        "--temperature",
        "0.8",
        "--seed",
        "5",
        "--packed",
        "--w-bits",
        "4",
        "--kv-cache",
        "int4",
    ];
    let a = sample(&t, "The cat", &args);
    let b = sample(&t, "The cat", &args);
    for role in ["model", "teacher"] {
        assert_eq!(a[role]["ids"], b[role]["ids"], "{role}");
    }
    assert!(
        a["teacher"]["ids"].is_array() && a["model"]["ids"].is_array(),
        "{a}"
    );
    assert_eq!(a["weights"], "packed");
    // The text form shows both, with speeds and cache sizes.
    let o = run(&[
        "sample",
        "--model",
        &t,
        "--teacher",
        &t,
        "--prompt",
        "The cat",
        "--max-tokens",
        "10",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("== model") && out.contains("== teacher") && out.contains("tok/s"),
        "{out}"
    );
}

#[test]
fn low_bit_settings_that_cannot_run_are_refused_by_name() {
    let t = teacher("stories260k");
    let txt = text();
    let e = |args: &[&str], needle: &str| {
        let mut all = vec!["eval", "--model", &t, "--text", &txt, "--max-tokens", "200"];
        all.extend_from_slice(args);
        let o = run(&all);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    };
    e(&["--kv-cache", "int3"], "int8, int4, q8_0, q4_0");
    e(&["--packed"], "--w-bits");
    e(&["--packed", "--w-bits", "4", "--dtype", "bf16"], "f32");
    e(
        &[
            "--kv-cache",
            "int4",
            "--kv-bits",
            "4",
            "--kv-rotation",
            "hadamard",
        ],
        "kv_rotation",
    );
    e(
        &[
            "--kv-cache",
            "int4",
            "--kv-bits",
            "4",
            "--kv-point",
            "pre_rope",
        ],
        "pre_rope",
    );
}
