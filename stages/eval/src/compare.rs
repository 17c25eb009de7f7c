//! The eval stage of `pipeline run`: the teacher, the untrained baseline (round-to-nearest, and
//! RTN with the run's K/V rotation when it rotates; or the frozen base a student trained on),
//! the trained student and its export, scored on the same windows of the held-out text; then
//! the run's report from those scores.

use crate::report::{ModelScore, ReportInput};
use crate::{Agreement, Perplexity};
use anyhow::{Context, Result};
use model::{Compute, KvRotation, Llama, ModelFolder, QuantConfig};
use std::path::{Path, PathBuf};

/// What the trained student is measured against.
#[derive(Debug, Clone)]
pub enum Baseline {
    /// Round-to-nearest: the teacher's weights through the run's quantizers, no training.
    Rtn,
    /// The frozen block-quantized base a student trained on (qlora, loftq): it is the
    /// baseline, not RTN. `name` says what it is, e.g. "nf4 base" or "nf4 LoftQ base".
    FrozenBase { folder: PathBuf, name: String },
}

/// Everything a run's eval stage scores and reports; the runner fills it in.
#[derive(Debug, Clone)]
pub struct RunEval<'a> {
    pub run_name: &'a str,
    /// Teacher model folder or hub id, as the pipeline file names it.
    pub teacher: &'a Path,
    /// The held-out text.
    pub text: &'a Path,
    /// Score only the first N tokens (BOS included).
    pub max_tokens: Option<usize>,
    /// Window length (`None`: the teacher's usable context).
    pub ctx: Option<usize>,
    /// Windows scored together.
    pub batch: usize,
    /// The run's quantizers, K/V rotation included.
    pub quant: QuantConfig,
    pub baseline: Baseline,
    /// The trained student's folder and the quantizers it runs with.
    pub student: PathBuf,
    pub student_quant: QuantConfig,
    /// What the student is, e.g. "QAT student" or "qlora student".
    pub student_label: String,
    /// The export stage's model folder and its label (e.g. "gguf export"), when the run
    /// exports one.
    pub export: Option<(String, PathBuf)>,
    /// JSON lines written by the trainer; may be missing or empty.
    pub train_log: PathBuf,
    pub train_steps: u64,
    /// Stage name -> seconds, in run order.
    pub timings: Vec<(String, f64)>,
}

/// The models of a run's eval stage, loaded, and the token ids they are scored on.
pub struct Comparison<'a> {
    run: &'a RunEval<'a>,
    folder: ModelFolder,
    ids: Vec<u32>,
    teacher: Llama,
    rtn: Llama,
    rtn_label: String,
    /// RTN with the run's K/V rotation, when the run rotates.
    rtn_rotated: Option<Llama>,
    student: Llama,
    exported: Option<(String, Llama)>,
}

/// The teacher's perplexity and each other model's perplexity and agreement with it.
pub struct Scores {
    teacher: Perplexity,
    models: Vec<(Perplexity, Agreement)>,
}

impl<'a> Comparison<'a> {
    pub fn load(compute: &Compute, run: &'a RunEval<'a>) -> Result<Self> {
        let dev = &compute.device;
        let folder = ModelFolder::open(run.teacher)?;
        let tok = folder.tokenizer()?;
        let text = std::fs::read_to_string(run.text)
            .with_context(|| format!("cannot read {}", run.text.display()))?;
        let mut ids = crate::encode_text(&tok, &text, folder.config.bos_token_id)?;
        if let Some(n) = run.max_tokens {
            ids.truncate(n);
        }
        let q = &run.quant;
        let teacher = Llama::load(&folder, QuantConfig::none(), dev)?.cast(compute.dtype)?;
        // The baseline is plain round-to-nearest; a K/V rotation is part of the method, so
        // with one, RTN with the rotation is scored too (what rotation alone buys, without
        // training).
        let plain = QuantConfig {
            kv_rotation: KvRotation::None,
            ..q.clone()
        };
        let (rtn, rtn_label) = match &run.baseline {
            Baseline::FrozenBase { folder: base, name } => {
                let base = ModelFolder::open(base)?;
                let label = format!("{name} ({})", plain.label());
                (Llama::load(&base, plain.clone(), dev)?, label)
            }
            Baseline::Rtn => (Llama::load(&folder, plain.clone(), dev)?, plain.label()),
        };
        let rtn = rtn.cast(compute.dtype)?;
        let rtn_rotated = if *q == plain {
            None
        } else {
            Some(Llama::load(&folder, q.clone(), dev)?.cast(compute.dtype)?)
        };
        let student = Llama::load(
            &ModelFolder::open(&run.student)?,
            run.student_quant.clone(),
            dev,
        )?
        .cast(compute.dtype)?;
        // The export as loaded back: its stored weights with the student's activation and K/V
        // quantizers (its weights are on their grid already).
        let exported = match &run.export {
            Some((label, dir)) => {
                let runtime = QuantConfig {
                    w_bits: None,
                    w_group: None,
                    w_scale: Default::default(),
                    ..run.student_quant.clone()
                };
                let folder = ModelFolder::open(dir)?;
                Some((
                    label.clone(),
                    Llama::load(&folder, runtime, dev)?.cast(compute.dtype)?,
                ))
            }
            None => None,
        };
        Ok(Comparison {
            run,
            folder,
            ids,
            teacher,
            rtn,
            rtn_label,
            rtn_rotated,
            student,
            exported,
        })
    }

    /// Predicted tokens the scoring walks through (what `score`'s progress counts up to).
    pub fn tokens_to_score(&self) -> usize {
        self.ids.len() - 1
    }

    /// Scores every model against the teacher on the same windows; `on_tokens` is called with
    /// the tokens scored so far.
    pub fn score(&self, on_tokens: impl FnMut(usize)) -> Result<Scores> {
        let mut models = vec![&self.rtn];
        models.extend(self.rtn_rotated.as_ref());
        models.push(&self.student);
        models.extend(self.exported.as_ref().map(|e| &e.1));
        let ctx = self.run.ctx.unwrap_or(self.folder.config.usable_context());
        let (teacher, models) = crate::score_against_teacher(
            &self.teacher,
            &models,
            &self.ids,
            ctx,
            self.run.batch,
            on_tokens,
        )?;
        Ok(Scores { teacher, models })
    }

    /// Writes the report (report.json, report.md, the plots) into `dir` and returns the
    /// Markdown score table.
    pub fn write_report(&self, dir: &Path, s: &Scores) -> Result<String> {
        let run = self.run;
        let score = |pp: &Perplexity, a: Option<&Agreement>| ModelScore {
            ppl: pp.ppl,
            nll: pp.nll,
            tokens: pp.tokens,
            agreement: a.map(|a| a.agreement),
            kl: a.map(|a| a.kl),
        };
        let scores = &s.models;
        let input = ReportInput {
            run_name: run.run_name,
            teacher: &run.teacher.display().to_string(),
            teacher_hub: self.folder.hub.as_ref(),
            quant_label: &run.quant.label(),
            eval_text: &run.text.display().to_string(),
            teacher_score: score(&s.teacher, None),
            rtn: score(&scores[0].0, Some(&scores[0].1)),
            rtn_label: &self.rtn_label,
            student_label: &run.student_label,
            rtn_rotated: self
                .rtn_rotated
                .as_ref()
                .map(|_| score(&scores[1].0, Some(&scores[1].1))),
            student: {
                let i = scores.len() - 1 - self.exported.is_some() as usize;
                score(&scores[i].0, Some(&scores[i].1))
            },
            exported: self.exported.as_ref().map(|(label, _)| {
                let s = scores.last().expect("the export's score");
                (label.clone(), score(&s.0, Some(&s.1)))
            }),
            train_log: &run.train_log,
            train_steps: run.train_steps,
            timings: run.timings.clone(),
        };
        crate::report::write_report(dir, &input)
    }
}
