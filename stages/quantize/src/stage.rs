//! The quantize stage: a Hugging Face model folder in, a quantized folder out. Tensors are
//! read from the memory-mapped safetensors one at a time, quantized in parallel blocks and
//! written at their planned place in the output (see [`crate::writer`]) by a writer thread
//! while the next tensors are quantized, so the resident memory stays near a few tensors
//! whatever the model's size. Every input header is checked
//! and the output folder inspected before anything is written; files are replaced
//! atomically and `quantize.json` comes last.

use crate::kernel::{quantize_values, PackedTensor, Values};
use crate::layout::{planned_tensors, tail_tensor};
use crate::loftq::{loftq, LoftqWeight, Quantizer};
use crate::report::{LoftqReport, QuantizeReport, TensorReport, REPORT_FILE};
use crate::writer::{OutTensor, StreamingWriter};
use anyhow::{bail, Context, Result};
use quant::block_folder::bnb::quant_state_json;
use quant::block_folder::{
    Layout, QuantizeHeader, QuantizeSettings, WeightInfo, HEADER_FILE, LOFTQ_FILE,
};
use quant::blockwise::NESTED_BLOCK;
use quant::safetensors_file::{Dtype, SafetensorsFile, TensorEntry};
use quant::BlockScales;
use rayon::prelude::*;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Instant;

/// Where the stage stands, for a progress bar.
pub struct Progress<'a> {
    pub tensor: &'a str,
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// LoftQ's alternating steps done over all its matrices (matrices x iterations in all).
    pub loftq_steps_done: usize,
    pub loftq_steps_total: usize,
}

/// Quantizes the model folder `input` into `out` and returns the report (also written to
/// `out/quantize_report.json`).
pub fn quantize_folder(
    input: &Path,
    out: &Path,
    s: &QuantizeSettings,
    progress: &mut dyn FnMut(Progress),
) -> Result<QuantizeReport> {
    let start = Instant::now();
    let files = weight_files(input)?;
    check_output(input, out, s)?;
    // Every header is checked before the first byte is written.
    let sources: Vec<SafetensorsFile> = files
        .iter()
        .map(|f| SafetensorsFile::open(f))
        .collect::<Result<_>>()?;
    let mut weights = BTreeMap::new();
    for src in &sources {
        for t in &src.tensors {
            if t.name.contains(".quant_state.") || t.name.ends_with(".qcodes") {
                bail!(
                    "{}: tensor {} is already quantized; quantize the original model folder",
                    src.path.display(),
                    t.name
                );
            }
            if s.quantizes(&t.name) {
                if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                    bail!(
                        "{}: tensor {} has dtype {}; only F32, F16 and BF16 weights can be quantized",
                        src.path.display(),
                        t.name,
                        t.dtype.name()
                    );
                }
                if let Some(l) = s.loftq.as_ref().filter(|l| l.targets_weight(&t.name)) {
                    let small = t.shape.iter().copied().min().unwrap_or(0);
                    if t.shape.len() != 2 || l.rank > small {
                        bail!(
                            "{}: tensor {} has shape {:?}; LoftQ with lora_rank = {} needs a matrix with both sides >= {}",
                            src.path.display(),
                            t.name,
                            t.shape,
                            l.rank,
                            l.rank
                        );
                    }
                }
                weights.insert(
                    t.name.clone(),
                    WeightInfo {
                        shape: t.shape.clone(),
                        dtype: t.dtype.torch_name().to_string(),
                        file: file_name(&src.path),
                    },
                );
            }
        }
    }
    if weights.is_empty() {
        bail!(
            "{}: no projection weights (q/k/v/o/gate/up/down_proj) to quantize",
            input.display()
        );
    }
    corpus::fsio::create_out_dir(out)?;
    corpus::fsio::remove_temp_files(out)?;

    let tensors_total: usize = sources.iter().map(|f| f.tensors.len()).sum();
    let bytes_total: u64 = sources
        .iter()
        .flat_map(|f| &f.tensors)
        .map(|t| (t.end - t.begin) as u64)
        .sum();
    let (mut tensors_done, mut bytes_done) = (0usize, 0u64);
    let mut reports = Vec::new();
    let mut quantize_seconds = 0f64;
    let mut quantized_input_bytes = 0u64;
    let (mut in_bytes, mut out_bytes) = (0u64, 0u64);
    let mut weight_map = BTreeMap::new();
    let code = s.format.codebook().values();
    let code_bytes: Vec<u8> = code.iter().flat_map(|c| c.to_le_bytes()).collect();
    let nested_code: Vec<u8> = quant::dynamic8()
        .iter()
        .flat_map(|c| c.to_le_bytes())
        .collect();

    let quantizer = Quantizer {
        block: s.block_size,
        codebook: s.format.codebook(),
        double_quant: s.double_quant,
    };
    // LoftQ's adapters (name, shape, values), written after the base; and its time.
    let mut adapters: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut loftq_seconds = 0f64;
    let loftq_steps_total = s.loftq.as_ref().map_or(0, |l| {
        weights.keys().filter(|n| l.targets_weight(n)).count() * l.iters as usize
    });
    let mut loftq_steps_done = 0usize;

    for src in &sources {
        in_bytes += std::fs::metadata(&src.path)?.len();
        let fname = file_name(&src.path);
        let mut planned = Vec::new();
        let mut tails = Vec::new();
        for t in &src.tensors {
            if s.quantizes(&t.name) {
                planned.extend(planned_tensors(&t.name, t.numel(), s));
                tails.extend(tail_tensor(&t.name, s));
            } else {
                planned.push(OutTensor::new(&t.name, t.dtype, t.shape.clone()));
            }
        }
        for p in planned.iter().map(|p| &p.name).chain(&tails) {
            weight_map.insert(p.clone(), fname.clone());
        }
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let w = StreamingWriter::create(&out.join(&fname), planned, tails, meta)?;
        // LoftQ results computed ahead, a window of matrices in parallel (one per thread).
        let mut ready: HashMap<String, Result<LoftqWeight>> = HashMap::new();
        // A writer thread takes the output while the next tensors are quantized.
        out_bytes += std::thread::scope(|scope| -> Result<u64> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Write>(WRITE_QUEUE);
            let writer = scope.spawn(move || write_file(w, src, rx));
            let writer_stopped = &Cell::new(false);
            let send = move |m| -> Result<()> {
                tx.send(m).map_err(|_| {
                    writer_stopped.set(true);
                    anyhow::anyhow!("the output writer stopped")
                })
            };
            let quantized = (|| -> Result<()> {
                for (i, t) in src.tensors.iter().enumerate() {
                    progress(Progress {
                        tensor: &t.name,
                        tensors_done,
                        tensors_total,
                        bytes_done,
                        bytes_total,
                        loftq_steps_done,
                        loftq_steps_total,
                    });
                    if !s.quantizes(&t.name) {
                        // Written (and its pages dropped) by the writer, straight from the map.
                        send(Write::Mapped(t))?;
                    } else {
                        let t0 = Instant::now();
                        let mut errors = (None, None);
                        let q = match s.loftq.as_ref().filter(|l| l.targets_weight(&t.name)) {
                            None => {
                                // f16 / bf16 straight from the map: the kernel widens them block by
                                // block, so no f32 copy of the tensor is made.
                                let f32_copy;
                                let x = match t.dtype {
                                    Dtype::BF16 => Values::Bf16(src.bytes(t)),
                                    Dtype::F16 => Values::F16(src.bytes(t)),
                                    _ => {
                                        f32_copy = src.f32_values(t)?;
                                        Values::F32(&f32_copy)
                                    }
                                };
                                quantize_values(
                                    x,
                                    s.block_size,
                                    s.format.codebook(),
                                    s.double_quant,
                                )
                            }
                            Some(l) => {
                                if !ready.contains_key(&t.name) {
                                    let window: Vec<_> = src.tensors[i..]
                                        .iter()
                                        .filter(|u| {
                                            s.quantizes(&u.name) && l.targets_weight(&u.name)
                                        })
                                        .take(rayon::current_num_threads())
                                        .collect();
                                    // The window runs on rayon's threads; this one reports each
                                    // alternating step as it completes.
                                    let steps = AtomicUsize::new(0);
                                    let done: Vec<Result<LoftqWeight>> =
                                        std::thread::scope(|scope| {
                                            let work = scope.spawn(|| {
                                                window
                                                    .par_iter()
                                                    .map(|u| {
                                                        let x = src.f32_values(u)?;
                                                        let step = || {
                                                            steps.fetch_add(1, Ordering::Relaxed);
                                                        };
                                                        loftq(
                                                            &x, u.shape[0], u.shape[1], l,
                                                            &quantizer, &step,
                                                        )
                                                        .with_context(|| {
                                                            format!(
                                                                "{}: LoftQ of {}",
                                                                src.path.display(),
                                                                u.name
                                                            )
                                                        })
                                                    })
                                                    .collect()
                                            });
                                            while !work.is_finished() {
                                                progress(Progress {
                                                    tensor: &t.name,
                                                    tensors_done,
                                                    tensors_total,
                                                    bytes_done,
                                                    bytes_total,
                                                    loftq_steps_done: loftq_steps_done
                                                        + steps.load(Ordering::Relaxed),
                                                    loftq_steps_total,
                                                });
                                                std::thread::sleep(
                                                    std::time::Duration::from_millis(100),
                                                );
                                            }
                                            work.join().expect("a LoftQ worker panicked")
                                        });
                                    loftq_steps_done += window.len() * l.iters as usize;
                                    for (u, r) in window.iter().zip(done) {
                                        ready.insert(u.name.clone(), r);
                                    }
                                    loftq_seconds += t0.elapsed().as_secs_f64();
                                }
                                let lw = ready.remove(&t.name).expect("computed above")?;
                                let module = t.name.strip_suffix(".weight").unwrap_or(&t.name);
                                let (rows, cols) = (t.shape[0], t.shape[1]);
                                adapters.push((
                                    format!("{module}.lora_A.weight"),
                                    vec![l.rank, cols],
                                    lw.a,
                                ));
                                adapters.push((
                                    format!("{module}.lora_B.weight"),
                                    vec![rows, l.rank],
                                    lw.b,
                                ));
                                errors = (Some(lw.plain_rel_error), Some(lw.loftq_rel_error));
                                PackedTensor {
                                    rel_error: lw.rel_error,
                                    ..lw.q
                                }
                            }
                        };
                        quantize_seconds += t0.elapsed().as_secs_f64();
                        quantized_input_bytes += (t.end - t.begin) as u64;
                        let name = &t.name;
                        let mut stored = 0usize;
                        let mut put = |n: String, b: Vec<u8>| -> Result<()> {
                            stored += b.len();
                            send(Write::Tensor(n, b))
                        };
                        let packed_name = match s.layout {
                            Layout::Bnb => name.clone(),
                            Layout::Packed => format!("{name}.qcodes"),
                        };
                        put(packed_name, q.packed)?;
                        put(format!("{name}.quant_map"), code_bytes.clone())?;
                        let offset = match &q.scales {
                            BlockScales::F32(a) => {
                                let b: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
                                put(format!("{name}.absmax"), b)?;
                                None
                            }
                            BlockScales::Double {
                                q: codes,
                                nested_absmax,
                                offset,
                                nested_block,
                                ..
                            } => {
                                debug_assert_eq!(*nested_block, NESTED_BLOCK);
                                put(format!("{name}.absmax"), codes.clone())?;
                                let b: Vec<u8> =
                                    nested_absmax.iter().flat_map(|v| v.to_le_bytes()).collect();
                                put(format!("{name}.nested_absmax"), b)?;
                                put(format!("{name}.nested_quant_map"), nested_code.clone())?;
                                if s.layout == Layout::Packed {
                                    put(
                                        format!("{name}.nested_offset"),
                                        offset.to_le_bytes().to_vec(),
                                    )?;
                                }
                                Some(*offset)
                            }
                        };
                        if let Some(tail) = tail_tensor(name, s) {
                            let json = quant_state_json(&t.shape, t.dtype, s.block_size, offset);
                            stored += json.len();
                            send(Write::Tail(tail, json.into_bytes()))?;
                        }
                        reports.push(TensorReport {
                            name: name.clone(),
                            shape: t.shape.clone(),
                            params: t.numel(),
                            input_bytes: t.end - t.begin,
                            stored_bytes: stored,
                            bits_per_param: stored as f64 * 8.0 / t.numel().max(1) as f64,
                            rel_error: q.rel_error,
                            plain_rel_error: errors.0,
                            loftq_rel_error: errors.1,
                        });
                        // The input is quantized: its pages can go.
                        src.release(t);
                    }
                    tensors_done += 1;
                    bytes_done += (t.end - t.begin) as u64;
                }
                send(Write::Finish)
            })();
            drop(send);
            let written = writer.join().expect("the output writer panicked");
            match quantized {
                // A failed send only means the writer stopped: its error says why.
                Err(e) if !writer_stopped.get() => Err(e),
                _ => written,
            }
        })?;
    }
    progress(Progress {
        tensor: "",
        tensors_done,
        tensors_total,
        bytes_done,
        bytes_total,
        loftq_steps_done,
        loftq_steps_total,
    });

    if !adapters.is_empty() {
        write_adapters(&out.join(LOFTQ_FILE), &adapters)?;
    }
    copy_companions(input, out, s, &weight_map, files.len() > 1)?;
    let header = QuantizeHeader {
        version: 1,
        settings: s.clone(),
        bits: s.format.bits(),
        nested_block_size: NESTED_BLOCK,
        source: source_name(input),
        weights,
    };
    let mut report = QuantizeReport::new(
        input,
        out,
        s,
        reports,
        in_bytes,
        out_bytes,
        start.elapsed().as_secs_f64(),
        quantize_seconds,
        quantized_input_bytes,
    );
    if let Some(l) = &s.loftq {
        report.loftq = Some(LoftqReport::new(l, &report.tensors, loftq_seconds));
    }
    corpus::fsio::write_atomic(
        &out.join(REPORT_FILE),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    // Last: its presence marks a complete folder.
    corpus::fsio::write_atomic(
        &out.join(HEADER_FILE),
        serde_json::to_string_pretty(&header)?.as_bytes(),
    )?;
    Ok(report)
}

/// Output tensors queued for the writer thread (each a tensor's worth of output at most).
const WRITE_QUEUE: usize = 16;

/// What the stage hands the writer thread.
enum Write<'a> {
    /// A planned tensor's bytes.
    Tensor(String, Vec<u8>),
    /// An input tensor copied as it is (its pages are dropped once written).
    Mapped(&'a TensorEntry),
    /// A quant-state tensor appended after the planned ones.
    Tail(String, Vec<u8>),
    /// Everything is written: finish the file. Without it (the stage failed) the
    /// unfinished file is removed.
    Finish,
}

/// The writer thread: writes what comes until `Finish`; returns the file's size.
fn write_file(mut w: StreamingWriter, src: &SafetensorsFile, rx: Receiver<Write>) -> Result<u64> {
    for m in rx {
        match m {
            Write::Tensor(name, bytes) => w.write(&name, &bytes)?,
            Write::Mapped(t) => {
                w.write(&t.name, src.bytes(t))?;
                src.release(t);
            }
            Write::Tail(name, bytes) => w.write_tail(&name, &bytes)?,
            Write::Finish => return w.finish(),
        }
    }
    bail!("the stage stopped before the output was complete")
}

/// LoftQ's initial adapters, f32, named `<module>.lora_A.weight` / `.lora_B.weight` (the
/// names a LoRA student trains under), scaled so that (alpha / r) B A is LoftQ's product.
fn write_adapters(path: &Path, adapters: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let planned = adapters
        .iter()
        .map(|(n, shape, _)| OutTensor::new(n, Dtype::F32, shape.clone()))
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut w = StreamingWriter::create(path, planned, vec![], meta)?;
    for (n, _, v) in adapters {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write(n, &b)?;
    }
    w.finish()?;
    Ok(())
}

/// The input folder as recorded in quantize.json (absolute, so reruns from elsewhere match).
fn source_name(input: &Path) -> String {
    input
        .canonicalize()
        .unwrap_or_else(|_| input.to_path_buf())
        .display()
        .to_string()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The safetensors files of a Hugging Face folder: model.safetensors or the shards of
/// model.safetensors.index.json.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!(
            "model folder {} does not exist or is not a folder",
            dir.display()
        );
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        bail!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing object field `weight_map`", index.display()))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|x| x.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|n| {
            corpus::fsio::check_plain_file_name(&n)
                .with_context(|| format!("{}: weight_map", index.display()))?;
            Ok(dir.join(n))
        })
        .collect()
}

/// Refuses an output folder that is the input, or that holds another model or a
/// quantization with other settings; nothing in it is touched before this passes.
fn check_output(input: &Path, out: &Path, s: &QuantizeSettings) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("--out {} exists and is not a folder", out.display());
    }
    if let (Ok(a), Ok(b)) = (input.canonicalize(), out.canonicalize()) {
        if a == b {
            bail!(
                "--out {} is the input model folder; choose another folder",
                out.display()
            );
        }
    }
    match QuantizeHeader::read(out)? {
        Some(h) => {
            let path = out.join(HEADER_FILE);
            let differs = |field: &str, have: String, want: String| -> Result<()> {
                if have != want {
                    bail!(
                        "{}: the folder already holds a different quantization ({field} = {have}, this run asks for {want}); nothing was overwritten: choose another --out or delete the folder",
                        path.display()
                    );
                }
                Ok(())
            };
            let hs = &h.settings;
            differs("format", hs.format.name(), s.format.name())?;
            differs("layout", hs.layout.name().into(), s.layout.name().into())?;
            differs(
                "block_size",
                hs.block_size.to_string(),
                s.block_size.to_string(),
            )?;
            differs(
                "double_quant",
                hs.double_quant.to_string(),
                s.double_quant.to_string(),
            )?;
            differs("skip", format!("{:?}", hs.skip), format!("{:?}", s.skip))?;
            differs("loftq", format!("{:?}", hs.loftq), format!("{:?}", s.loftq))?;
            differs("source", h.source.clone(), source_name(input))?;
            Ok(())
        }
        None => {
            let taken = std::fs::read_dir(out)
                .with_context(|| format!("cannot list {}", out.display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| {
                    n == "config.json" || n.ends_with(".safetensors") || n.ends_with(".index.json")
                });
            if let Some(n) = taken {
                bail!(
                    "{}: --out already holds a model ({n}) that pipeline quantize did not write; nothing was overwritten: choose another --out",
                    out.join(&n).display()
                );
            }
            Ok(())
        }
    }
}

/// config.json (with bitsandbytes' `quantization_config` for the bnb layout), the tokenizer
/// and the other small files of the folder; a sharded model gets a new index.
fn copy_companions(
    input: &Path,
    out: &Path,
    s: &QuantizeSettings,
    weight_map: &BTreeMap<String, String>,
    sharded: bool,
) -> Result<()> {
    for e in std::fs::read_dir(input).with_context(|| format!("cannot list {}", input.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        // `Path::is_file` follows symlinks: a Hugging Face cache snapshot links every file
        // to its blob.
        if !e.path().is_file()
            || name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || name == HEADER_FILE
            || name == REPORT_FILE
            || name == LOFTQ_FILE
        {
            continue;
        }
        let src = e.path();
        let mut bytes =
            std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
        if name == "config.json" && s.layout == Layout::Bnb {
            let mut cfg: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not valid JSON", src.display()))?;
            let obj = cfg
                .as_object_mut()
                .with_context(|| format!("{}: not a JSON object", src.display()))?;
            let dtype = obj
                .get("torch_dtype")
                .or_else(|| obj.get("dtype"))
                .and_then(|d| d.as_str())
                .unwrap_or("float32")
                .to_string();
            obj.insert(
                "quantization_config".into(),
                bnb_quantization_config(s, &dtype),
            );
            bytes = serde_json::to_vec_pretty(&cfg)?;
        }
        corpus::fsio::write_atomic(&out.join(&name), &bytes)?;
    }
    if sharded {
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        corpus::fsio::write_atomic(
            &out.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// transformers' `BitsAndBytesConfig` for a pre-quantized NF4 checkpoint; the skipped
/// modules stay `nn.Linear` (transformers also never converts lm_head).
fn bnb_quantization_config(s: &QuantizeSettings, compute_dtype: &str) -> serde_json::Value {
    serde_json::json!({
        "quant_method": "bitsandbytes",
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": s.double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": s.skip,
        "llm_int8_threshold": 6.0,
    })
}
