//! `pipeline export`: a trained student in the form another tool loads. The low-bit formats
//! (`gguf`, `compressed-tensors`, `packed`) and `hf` are the export stage's (`stages/export`);
//! `peft`: a LoRA student's base folder (bitsandbytes layout for NF4) and its PEFT adapter
//! folder.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The train output folder (`pipeline train --out`, or RUN/train).
    #[arg(long)]
    pub student: PathBuf,
    /// A new folder for the export.
    #[arg(long)]
    pub out: PathBuf,
    /// gguf (llama.cpp), compressed-tensors (vLLM, transformers), packed (ours), hf (floats),
    /// or peft (a LoRA student: base/ + adapter/).
    #[arg(long)]
    pub format: String,
    /// hf only: the float type of the weights (f32, f16, bf16).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Score the student and the export as loaded back on this text (export.json `ppl`).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// With --text: score only the first N tokens.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Print one JSON object describing the export.
    #[arg(long)]
    pub json: bool,
}

/// The files of `src` (not subfolders), read for a durable copy; symlinks are followed.
fn folder_files(src: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .with_context(|| format!("cannot read {}", src.display()))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        if name.starts_with('.') || !p.is_file() {
            continue;
        }
        out.push((
            name,
            std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?,
        ));
    }
    Ok(out)
}

fn write(dst: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    train::checkpoint::write_folder(dst, files)
}

pub fn run(a: ExportArgs) -> Result<()> {
    if let Some(format) = export::Format::parse(&a.format) {
        let spec = export::ExportSpec {
            format,
            dtype: a.dtype.clone(),
            text: a.text.clone(),
            max_tokens: a.max_tokens,
        };
        let r = export::export(&a.student, &a.out, &spec)?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "exported {} to {}: {:.2} MB, {:.3} bits per weight, largest weight change {:e}{}",
                format.name(),
                r.model,
                r.file_size_bytes as f64 / 1e6,
                r.bits_per_weight,
                r.max_weight_change,
                r.ppl
                    .as_ref()
                    .map(|p| format!(", ppl {:.4} (student {:.4})", p.export, p.student))
                    .unwrap_or_default()
            );
        }
        return Ok(());
    }
    if a.format != "peft" {
        bail!(
            "--format {:?}: allowed values are gguf, compressed-tensors, packed, hf, peft",
            a.format
        );
    }
    let student_dir = a.student.join(train::STUDENT_DIR);
    if !student_dir.join("model.safetensors").is_file() {
        bail!(
            "--student {}: no finished student ({} is missing); train to the last step first",
            a.student.display(),
            student_dir.join("model.safetensors").display()
        );
    }
    if a.out.exists()
        && std::fs::read_dir(&a.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "--out {}: exists and is not empty; export into a new folder",
            a.out.display()
        );
    }
    corpus::fsio::create_out_dir(&a.out)?;
    let summary = match a.format.as_str() {
        "peft" => {
            let adapter = a.student.join(train::ADAPTER_DIR);
            let cfg_path = adapter.join("adapter_config.json");
            if !cfg_path.is_file() {
                bail!(
                    "--format peft: {} has no adapter ({} is missing): only LoRA students (student.method = \"qlora\" or \"loftq\") have one; use --format hf",
                    a.student.display(),
                    cfg_path.display()
                );
            }
            let mut cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&cfg_path)
                    .with_context(|| format!("cannot read {}", cfg_path.display()))?,
            )
            .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
            let base =
                PathBuf::from(cfg["base_model_name_or_path"].as_str().with_context(|| {
                    format!("{}: no base_model_name_or_path", cfg_path.display())
                })?);
            // The base must be the one the adapters were trained on (its weights' hash is in
            // the training fingerprint of every checkpoint).
            let ckpts = a.student.join(train::CHECKPOINT_DIR);
            let trained_on = train::checkpoint::newest_valid(&ckpts, &mut |m| eprintln!("{m}"))?
                .and_then(|(_, s)| {
                    s.fingerprint["base_weights_sha256"]
                        .as_str()
                        .map(String::from)
                })
                .with_context(|| {
                    format!(
                        "{}: no checkpoint names the base the adapters were trained on",
                        ckpts.display()
                    )
                })?;
            let have = model::ModelFolder::open(&base)?
                .fingerprint()?
                .weights_sha256;
            if have != trained_on {
                bail!(
                    "{}: the base folder {} has changed since training (weights sha256 {have}, trained on {trained_on})",
                    cfg_path.display(),
                    base.display()
                );
            }
            // transformers reads bitsandbytes' layout (NF4) only; other bases are ours.
            if let Some(h) = quantize::QuantizeHeader::read(&base)? {
                if h.settings.layout != quantize::Layout::Bnb {
                    bail!(
                        "--format peft: the base {} is {} in the {} layout, which transformers and bitsandbytes cannot load (only nf4 in the bnb layout); use --format hf for the merged student",
                        base.display(),
                        h.settings.format.name(),
                        h.settings.layout.name()
                    );
                }
            }
            let base_files = folder_files(&base)?;
            write(&a.out.join("base"), &base_files)?;
            let base_out = std::fs::canonicalize(a.out.join("base"))?;
            cfg["base_model_name_or_path"] = base_out.display().to_string().into();
            let mut files = folder_files(&adapter)?;
            for (n, b) in &mut files {
                if n == "adapter_config.json" {
                    *b = serde_json::to_vec_pretty(&cfg)?;
                }
            }
            write(&a.out.join("adapter"), &files)?;
            serde_json::json!({
                "format": "peft",
                "base": a.out.join("base"),
                "adapter": a.out.join("adapter"),
                "r": cfg["r"],
                "lora_alpha": cfg["lora_alpha"],
                "target_modules": cfg["target_modules"],
            })
        }
        other => bail!(
            "--format {other:?}: allowed values are gguf, compressed-tensors, packed, hf, peft"
        ),
    };
    if a.json {
        println!("{summary}");
    } else {
        println!("exported {} to {}", a.format, a.out.display());
    }
    Ok(())
}
