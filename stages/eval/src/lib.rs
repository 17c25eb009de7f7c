//! Evaluation: perplexity of a model on a held-out text (the protocol of
//! `../shared/data/README.md`: BOS + whole file, non-overlapping windows of ctx + 1 ids, each
//! scored from scratch), and agreement / KL of a student against its teacher on the same windows.
//! [`compare`] is the eval stage of `pipeline run` (teacher, baselines, student and export on the
//! same windows); [`report`] writes a run's report (report.md, report.json and the plots) from
//! those scores.

pub mod compare;
pub mod report;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};
use model::llama::log_softmax_last;
use model::{Llama, QuantConfig};
use serde::Serialize;
use std::time::Instant;

/// `[BOS] + encode(text)`; the tokenizer must not add its own special tokens.
pub fn encode_text(
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
    bos: Option<u32>,
) -> Result<Vec<u32>> {
    let enc = tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the evaluation text: {e}"))?;
    let mut ids = Vec::with_capacity(enc.len() + 1);
    if let Some(b) = bos {
        ids.push(b);
    }
    ids.extend_from_slice(enc.get_ids());
    Ok(ids)
}

/// Start offsets and lengths of the scoring windows: ids[ctx*k .. ctx*k + ctx + 1].
pub fn windows(n: usize, ctx: usize) -> Vec<(usize, usize)> {
    let mut w = Vec::new();
    let mut start = 0;
    while start + 1 < n {
        let len = (ctx + 1).min(n - start);
        w.push((start, len));
        start += ctx;
    }
    w
}

/// The model as asked: dense (cast to the compute dtype) or with packed projections.
pub fn load_model(
    folder: &model::ModelFolder,
    quant: QuantConfig,
    packed: bool,
    compute: &model::Compute,
) -> Result<Llama> {
    if packed {
        // The CPU kernels compute in f32; on a GPU the 4-bit GEMV reads bf16/f16 activations.
        if compute.device.is_cpu() && compute.dtype != candle_core::DType::F32 {
            anyhow::bail!(
                "--packed on the CPU runs in f32 (the kernels read codes and compute in f32)"
            );
        }
        return Ok(Llama::load_packed(folder, quant, &compute.device)?.cast(compute.dtype)?);
    }
    Ok(Llama::load(folder, quant, &compute.device)?.cast(compute.dtype)?)
}

#[derive(Clone, Debug, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    /// Mean negative log-likelihood per predicted token, in nats.
    pub nll: f64,
    /// Number of predicted (scored) tokens.
    pub tokens: usize,
    pub windows: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
}

impl Perplexity {
    fn from_sum(sum: f64, tokens: usize, windows: usize, seconds: f64) -> Result<Self> {
        let nll = sum / tokens as f64;
        if !nll.is_finite() {
            bail!("perplexity is not finite (mean NLL = {nll}); the model produced NaN or infinite logits");
        }
        Ok(Perplexity {
            ppl: nll.exp(),
            nll,
            tokens,
            windows,
            seconds,
            tokens_per_second: tokens as f64 / seconds,
        })
    }
}

/// Summed negative log-probability of `tgt` ([b, t, 1] ids) under log-probabilities `lp`.
fn summed_nll(lp: &Tensor, tgt: &Tensor) -> Result<f64> {
    let v: Vec<f32> = lp.gather(tgt, D::Minus1)?.flatten_all()?.to_vec1()?;
    Ok(-v.iter().map(|&x| x as f64).sum::<f64>())
}

/// Windows of equal length are scored together in batches of `batch`.
fn batched_windows(n: usize, ctx: usize, batch: usize) -> Vec<Vec<(usize, usize)>> {
    let mut groups: Vec<Vec<(usize, usize)>> = Vec::new();
    for w in windows(n, ctx) {
        match groups.last_mut() {
            Some(g) if g.len() < batch && g[0].1 == w.1 => g.push(w),
            _ => groups.push(vec![w]),
        }
    }
    groups
}

fn window_tensor(
    ids: &[u32],
    group: &[(usize, usize)],
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let len = group[0].1;
    let mut inp = Vec::with_capacity(group.len() * (len - 1));
    let mut tgt = Vec::with_capacity(group.len() * (len - 1));
    for &(s, l) in group {
        inp.extend_from_slice(&ids[s..s + l - 1]);
        tgt.extend_from_slice(&ids[s + 1..s + l]);
    }
    Ok((
        Tensor::from_vec(inp, (group.len(), len - 1), dev)?,
        Tensor::from_vec(tgt, (group.len(), len - 1), dev)?,
    ))
}

fn check_ids(model: &Llama, ids: &[u32], ctx: usize) -> Result<()> {
    if ids.len() < 2 {
        bail!("the evaluation text has fewer than 2 tokens; nothing to score");
    }
    if ctx == 0 || ctx > model.cfg.usable_context() {
        bail!(
            "ctx = {ctx}: allowed values are 1..={} (the model's {})",
            model.cfg.usable_context(),
            model.cfg.context_limit()
        );
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= model.cfg.vocab_size) {
        bail!("token id {bad} is outside the model's vocabulary ({}): tokenizer and model do not match", model.cfg.vocab_size);
    }
    Ok(())
}

/// Perplexity of `model` over `ids`; `on_tokens` is called with the tokens scored so far.
pub fn perplexity(
    model: &Llama,
    ids: &[u32],
    ctx: usize,
    batch: usize,
    mut on_tokens: impl FnMut(usize),
) -> Result<Perplexity> {
    check_ids(model, ids, ctx)?;
    let t0 = Instant::now();
    let mut sum = 0f64;
    let mut count = 0usize;
    let groups = batched_windows(ids.len(), ctx, batch.max(1));
    let nwin: usize = groups.iter().map(|g| g.len()).sum();
    for g in &groups {
        let (inp, tgt) = window_tensor(ids, g, &model.device)?;
        let lp = log_softmax_last(&model.forward(&inp).context("forward pass")?)?;
        sum += summed_nll(&lp, &tgt.unsqueeze(D::Minus1)?)?;
        count += tgt.elem_count();
        on_tokens(count);
    }
    Perplexity::from_sum(sum, count, nwin, t0.elapsed().as_secs_f64())
}

/// Perplexity of `model` over `ids` through the incremental decoder, the way a deployed model
/// runs: each window's tokens fed one at a time, K and V kept in a cache of `format` (a
/// low-bit one holds codes), up to `batch` windows decoded side by side. Same windows and
/// targets as `perplexity`.
pub fn perplexity_decoding(
    model: &Llama,
    ids: &[u32],
    ctx: usize,
    batch: usize,
    format: model::lowbit::KvCacheFormat,
    mut on_tokens: impl FnMut(usize),
) -> Result<Perplexity> {
    check_ids(model, ids, ctx)?;
    let t0 = Instant::now();
    let mut sum = 0f64;
    let mut count = 0usize;
    let groups = batched_windows(ids.len(), ctx, batch.max(1));
    let nwin: usize = groups.iter().map(|g| g.len()).sum();
    for g in &groups {
        let len = g[0].1;
        // The CPU decodes each window with its own cache; a GPU decodes the group together in
        // one batch cache, as generation does (its kernels read low-bit caches directly).
        let mut batch = if model.device.is_cpu() {
            None
        } else {
            Some(model::BatchCache::with_format(model, g.len(), len, format)?)
        };
        let mut caches = match batch {
            Some(_) => Vec::new(),
            None => g
                .iter()
                .map(|_| model::SeqCache::with_format(model, len, format))
                .collect::<candle_core::Result<Vec<_>>>()?,
        };
        for p in 0..len - 1 {
            let toks: Vec<u32> = g.iter().map(|&(s, _)| ids[s + p]).collect();
            let tgt: Vec<u32> = g.iter().map(|&(s, _)| ids[s + p + 1]).collect();
            let logits = match batch.as_mut() {
                Some(b) => {
                    let slots: Vec<Option<u32>> = toks.iter().map(|&t| Some(t)).collect();
                    model.decode_slots(&slots, b)
                }
                None => {
                    let mut refs: Vec<&mut model::SeqCache> = caches.iter_mut().collect();
                    model.decode_step(&toks, &mut refs)
                }
            }
            .context("decoding step")?;
            let tgt = Tensor::from_vec(tgt, (g.len(), 1), &model.device)?;
            sum += summed_nll(&log_softmax_last(&logits)?, &tgt)?;
            count += g.len();
        }
        on_tokens(count);
    }
    Perplexity::from_sum(sum, count, nwin, t0.elapsed().as_secs_f64())
}

#[derive(Clone, Debug, Serialize)]
pub struct Agreement {
    /// Share of positions where the student's argmax equals the teacher's.
    pub agreement: f64,
    /// Mean KL(teacher || student) per token, nats.
    pub kl: f64,
    pub tokens: usize,
}

/// Perplexity of the teacher and, on the same windows, perplexity plus agreement / KL of each
/// student against it; the teacher runs once per window.
pub fn score_against_teacher(
    teacher: &Llama,
    students: &[&Llama],
    ids: &[u32],
    ctx: usize,
    batch: usize,
    mut on_tokens: impl FnMut(usize),
) -> Result<(Perplexity, Vec<(Perplexity, Agreement)>)> {
    check_ids(teacher, ids, ctx)?;
    let t0 = Instant::now();
    let n = students.len();
    let mut t_sum = 0f64;
    let mut s_sum = vec![0f64; n];
    let mut same = vec![0usize; n];
    let mut kl = vec![0f64; n];
    let mut count = 0usize;
    let groups = batched_windows(ids.len(), ctx, batch.max(1));
    let nwin: usize = groups.iter().map(|g| g.len()).sum();
    for g in &groups {
        let (inp, tgt) = window_tensor(ids, g, &teacher.device)?;
        let tgt = tgt.unsqueeze(D::Minus1)?;
        let lt = log_softmax_last(&teacher.forward(&inp)?)?;
        t_sum += summed_nll(&lt, &tgt)?;
        let at: Vec<u32> = lt.argmax(D::Minus1)?.flatten_all()?.to_vec1()?;
        let pt = lt.exp()?;
        for (i, s) in students.iter().enumerate() {
            let ls = log_softmax_last(&s.forward(&inp)?)?;
            s_sum[i] += summed_nll(&ls, &tgt)?;
            let as_: Vec<u32> = ls.argmax(D::Minus1)?.flatten_all()?.to_vec1()?;
            same[i] += at.iter().zip(&as_).filter(|(a, b)| a == b).count();
            let k: Vec<f32> = (&pt * (&lt - &ls)?)?
                .sum(D::Minus1)?
                .flatten_all()?
                .to_vec1()?;
            kl[i] += k.iter().map(|&x| x as f64).sum::<f64>();
        }
        count += at.len();
        on_tokens(count);
    }
    let secs = t0.elapsed().as_secs_f64();
    let ppl = |sum: f64| Perplexity::from_sum(sum, count, nwin, secs);
    let teacher_ppl = ppl(t_sum)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push((
            ppl(s_sum[i])?,
            Agreement {
                agreement: same[i] as f64 / count as f64,
                kl: kl[i] / count as f64,
                tokens: count,
            },
        ));
    }
    Ok((teacher_ppl, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_prediction_once() {
        let w = windows(1100, 512);
        assert_eq!(w, vec![(0, 513), (512, 513), (1024, 76)]);
        let predicted: usize = w.iter().map(|(_, l)| l - 1).sum();
        assert_eq!(predicted, 1099);
        assert_eq!(windows(513, 512), vec![(0, 513)]);
        assert_eq!(windows(514, 512), vec![(0, 513), (512, 2)]);
    }
}
