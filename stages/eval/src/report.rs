//! The final report of a `pipeline run` folder: `report.json` (machine-readable numbers),
//! `report.md` (a readable summary), `loss.svg` (training curves) and `perplexity.svg`
//! (teacher / RTN / QAT student perplexities). Every file is written atomically, so a crash
//! mid-report never leaves a half-written file behind for a later reader to trust.

use anyhow::{anyhow, Context, Result};
use corpus::fsio::write_atomic;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{json, Value};
use std::path::Path;

/// Scores of one model on the held-out text.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelScore {
    pub ppl: f64,
    pub nll: f64,
    pub tokens: usize,
    /// Top-1 agreement with the teacher (fraction in [0, 1]); `None` for the teacher itself.
    pub agreement: Option<f64>,
    /// Mean KL(teacher || model) per token; `None` for the teacher itself.
    pub kl: Option<f64>,
}

/// Everything the report needs; the runner fills it in.
#[derive(Debug, Clone)]
pub struct ReportInput<'a> {
    pub run_name: &'a str,
    /// Teacher model folder or hub id, as the pipeline file names it.
    pub teacher: &'a str,
    /// The hub repo and resolved commit, when the teacher came from the hub.
    pub teacher_hub: Option<&'a model::HubSource>,
    /// Quantization label, e.g. "w4a8kv4".
    pub quant_label: &'a str,
    /// Path of the held-out text.
    pub eval_text: &'a str,
    /// Full-precision teacher (agreement / kl are `None`).
    pub teacher_score: ModelScore,
    /// Round-to-nearest student: teacher weights fake-quantized, no training, and no K/V
    /// rotation (the plain baseline the recovered share is measured against).
    pub rtn: ModelScore,
    /// Label of the plain RTN row (the run's label without a K/V rotation).
    pub rtn_label: &'a str,
    /// What the student is, e.g. "QAT student" or "qlora student".
    pub student_label: &'a str,
    /// RTN with the run's K/V rotation, when the run rotates: what rotation alone buys.
    pub rtn_rotated: Option<ModelScore>,
    /// The trained QAT student.
    pub student: ModelScore,
    /// The export stage's model as loaded back (label, e.g. "gguf export"), when the run
    /// exports one.
    pub exported: Option<(String, ModelScore)>,
    /// JSON lines written by the trainer; may be missing or empty.
    pub train_log: &'a Path,
    pub train_steps: u64,
    /// Stage name -> seconds, in run order.
    pub timings: Vec<(String, f64)>,
}

/// One line of the training log. Only `step` is required: a field the trainer did not
/// write is simply left out of its curve.
#[derive(Debug, Clone, Default, PartialEq)]
struct LogEntry {
    step: u64,
    loss: Option<f64>,
    kl: Option<f64>,
    agreement: Option<f64>,
    lr: Option<f64>,
    grad_norm: Option<f64>,
    tokens_per_second: Option<f64>,
}

/// The parsed training log and how much of it could not be read.
#[derive(Debug, Default)]
struct TrainLog {
    entries: Vec<LogEntry>,
    /// Lines that were not valid JSON objects with a `step` (e.g. a line cut short by a crash).
    skipped_lines: usize,
    /// Why the log could not be read at all (missing file), if so.
    unavailable: Option<String>,
}

const PLOT_W: u32 = 900;
const LOSS_PANEL_H: u32 = 340;
const PPL_H: u32 = 420;
const NO_STEPS: &str = "no training steps logged";

/// Writes `report.json`, `report.md`, `loss.svg` and `perplexity.svg` into `dir` and returns
/// the Markdown score table (followed by the recovered-gap line) for the runner to print.
pub fn write_report(dir: &Path, input: &ReportInput) -> Result<String> {
    corpus::fsio::create_out_dir(dir)?;
    let log = read_train_log(input.train_log);
    let gap = gap_recovered(&input.teacher_score, &input.rtn, &input.student);

    // Plots first: report.md links them, so they should exist once it does.
    let loss_svg = render_loss_svg(&log, input)?;
    write_atomic(&dir.join("loss.svg"), loss_svg.as_bytes())?;
    let ppl_svg = render_perplexity_svg(input)?;
    write_atomic(&dir.join("perplexity.svg"), ppl_svg.as_bytes())?;

    let json = report_json(input, &log, gap);
    let json_text = serde_json::to_string_pretty(&json).context("serializing report.json")?;
    write_atomic(
        &dir.join("report.json"),
        format!("{json_text}\n").as_bytes(),
    )?;

    let table = score_table(input, gap);
    let md = report_markdown(input, &log, &table);
    write_atomic(&dir.join("report.md"), md.as_bytes())?;
    Ok(table)
}

/// Share of the RTN perplexity gap that training closed: 1 means the student matches the
/// teacher, 0 means no better than RTN. `None` when undefined (RTN already equals the teacher,
/// or a perplexity is not finite).
fn gap_recovered(teacher: &ModelScore, rtn: &ModelScore, student: &ModelScore) -> Option<f64> {
    let denom = rtn.ppl - teacher.ppl;
    if denom == 0.0 || !denom.is_finite() {
        return None;
    }
    let g = (rtn.ppl - student.ppl) / denom;
    g.is_finite().then_some(g)
}

fn read_train_log(path: &Path) -> TrainLog {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return TrainLog {
                unavailable: Some(format!("{}: {e}", path.display())),
                ..TrainLog::default()
            }
        }
    };
    let mut log = TrainLog::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match parse_log_line(line) {
            Some(e) => log.entries.push(e),
            None => log.skipped_lines += 1,
        }
    }
    // A resumed run logs again from its checkpoint step: keep the latest line per step so the
    // curves follow the run that produced the final student. (Stable sort keeps file order.)
    log.entries.sort_by_key(|e| e.step);
    let mut dedup: Vec<LogEntry> = Vec::with_capacity(log.entries.len());
    for e in log.entries.drain(..) {
        match dedup.last_mut() {
            Some(last) if last.step == e.step => *last = e,
            _ => dedup.push(e),
        }
    }
    log.entries = dedup;
    log
}

fn parse_log_line(line: &str) -> Option<LogEntry> {
    let v: Value = serde_json::from_str(line).ok()?;
    let obj = v.as_object()?;
    // Non-finite numbers are written as null by serde_json; treat them like absent values.
    let num = |k: &str| obj.get(k).and_then(Value::as_f64).filter(|x| x.is_finite());
    Some(LogEntry {
        step: obj.get("step")?.as_u64()?,
        loss: num("loss"),
        kl: num("kl"),
        agreement: num("agreement"),
        lr: num("lr"),
        grad_norm: num("grad_norm"),
        tokens_per_second: num("tokens_per_second"),
    })
}

/// JSON number, or null when not finite (JSON has no NaN/inf).
fn jnum(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

fn jopt(x: Option<f64>) -> Value {
    x.map(jnum).unwrap_or(Value::Null)
}

fn score_json(s: &ModelScore) -> Value {
    json!({
        "ppl": jnum(s.ppl),
        "nll": jnum(s.nll),
        "tokens": s.tokens,
        "agreement": jopt(s.agreement),
        "kl": jopt(s.kl),
    })
}

fn report_json(input: &ReportInput, log: &TrainLog, gap: Option<f64>) -> Value {
    let mut teacher = score_json(&input.teacher_score);
    teacher["path"] = json!(input.teacher);
    if let Some(h) = input.teacher_hub {
        teacher["hub_repo"] = json!(h.repo);
        teacher["hub_commit"] = json!(h.commit);
    }
    // Timings as a list: a JSON object would lose the run order of the stages.
    let timings: Vec<Value> = input
        .timings
        .iter()
        .map(|(stage, s)| json!({ "stage": stage, "seconds": jnum(*s) }))
        .collect();
    let total: f64 = input.timings.iter().map(|(_, s)| s).sum();
    let last = log.entries.last().map(|e| {
        json!({
            "step": e.step,
            "loss": jopt(e.loss),
            "kl": jopt(e.kl),
            "agreement": jopt(e.agreement),
            "lr": jopt(e.lr),
            "grad_norm": jopt(e.grad_norm),
            "tokens_per_second": jopt(e.tokens_per_second),
        })
    });
    json!({
        "run_name": input.run_name,
        "quant": input.quant_label,
        "eval_text": input.eval_text,
        "train_steps": input.train_steps,
        "teacher": teacher,
        "rtn": score_json(&input.rtn),
        "rtn_rotated": input.rtn_rotated.as_ref().map(score_json).unwrap_or(Value::Null),
        "student": score_json(&input.student),
        "export": input.exported.as_ref().map(|(label, sc)| {
            let mut v = score_json(sc);
            v["label"] = json!(label);
            v
        }).unwrap_or(Value::Null),
        "gap_recovered": jopt(gap),
        "timings": timings,
        "total_seconds": jnum(total),
        "train_log": {
            "path": input.train_log.display().to_string(),
            "entries": log.entries.len(),
            "skipped_lines": log.skipped_lines,
            "last": last.unwrap_or(Value::Null),
        },
        "plots": ["loss.svg", "perplexity.svg"],
    })
}

/// Table cells must not contain a raw `|`, which would split the cell.
fn md_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn fmt_num(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        format!("{x}")
    }
}

fn fmt_opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map(f).unwrap_or_else(|| "—".to_string())
}

fn fmt_pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.2} %", 100.0 * x)
    } else {
        format!("{x}")
    }
}

fn score_table(input: &ReportInput, gap: Option<f64>) -> String {
    let q = md_cell(input.quant_label);
    let mut rows = vec![
        ("teacher (full precision)".to_string(), &input.teacher_score),
        (format!("RTN {}", md_cell(input.rtn_label)), &input.rtn),
    ];
    if let Some(r) = &input.rtn_rotated {
        rows.push((format!("RTN {q} (rotation, no training)"), r));
    }
    rows.push((format!("{} {q}", input.student_label), &input.student));
    if let Some((label, e)) = &input.exported {
        rows.push((format!("{} (as loaded back)", md_cell(label)), e));
    }
    let mut t = String::from(
        "| model | perplexity | NLL | top-1 agreement | KL to teacher |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for (name, s) in rows {
        t.push_str(&format!(
            "| {name} | {} | {} | {} | {} |\n",
            fmt_num(s.ppl, 3),
            fmt_num(s.nll, 4),
            fmt_opt(s.agreement, fmt_pct),
            fmt_opt(s.kl, |k| fmt_num(k, 4)),
        ));
    }
    t.push_str(&format!(
        "\nRecovered share of the RTN perplexity gap: {}\n",
        match gap {
            Some(g) => fmt_pct(g),
            None => "n/a (RTN perplexity equals the teacher's)".to_string(),
        }
    ));
    t
}

fn report_markdown(input: &ReportInput, log: &TrainLog, table: &str) -> String {
    let mut md = format!("# Run report: {}\n\n", input.run_name);
    md.push_str(table);
    md.push_str(
        "\nRecovered share = (RTN ppl − student ppl) / (RTN ppl − teacher ppl): \
         1 means the student matches the teacher, 0 means no better than RTN.\n",
    );

    md.push_str("\n## Settings\n\n");
    md.push_str(&format!("- teacher: `{}`", input.teacher));
    match input.teacher_hub {
        Some(h) => md.push_str(&format!(
            " (hub repo `{}`, commit `{}`)\n",
            h.repo, h.commit
        )),
        None => md.push('\n'),
    }
    md.push_str(&format!("- quantization: `{}`\n", input.quant_label));
    md.push_str(&format!(
        "- held-out text: `{}` ({} tokens scored)\n",
        input.eval_text, input.teacher_score.tokens
    ));
    md.push_str(&format!("- training steps: {}\n", input.train_steps));
    md.push_str(&format!("- training log: `{}`", input.train_log.display()));
    match (&log.unavailable, log.entries.len()) {
        (Some(why), _) => md.push_str(&format!(" (not readable: {why})\n")),
        (None, 0) => md.push_str(&format!(" ({NO_STEPS})\n")),
        (None, n) => md.push_str(&format!(" ({n} logged steps)\n")),
    }
    if log.skipped_lines > 0 {
        md.push_str(&format!(
            "- {} unreadable training-log line(s) skipped\n",
            log.skipped_lines
        ));
    }
    if let Some(last) = log.entries.last() {
        let mut parts = vec![format!("step {}", last.step)];
        let fields = [
            ("loss", last.loss),
            ("KL", last.kl),
            ("agreement", last.agreement),
            ("lr", last.lr),
            ("grad norm", last.grad_norm),
            ("tokens/s", last.tokens_per_second),
        ];
        for (name, v) in fields {
            if let Some(v) = v {
                parts.push(format!("{name} {}", fmt_g(v)));
            }
        }
        md.push_str(&format!(
            "- last logged training step: {}\n",
            parts.join(", ")
        ));
    }

    if !input.timings.is_empty() {
        md.push_str("\n## Timings\n\n| stage | seconds |\n|---|---:|\n");
        let mut total = 0.0;
        for (stage, s) in &input.timings {
            total += s;
            md.push_str(&format!("| {} | {} |\n", md_cell(stage), fmt_num(*s, 1)));
        }
        md.push_str(&format!("| **total** | **{}** |\n", fmt_num(total, 1)));
    }

    md.push_str("\n## Plots\n\n");
    if log.entries.is_empty() {
        md.push_str(&format!(
            "- [training curves](loss.svg): empty, {NO_STEPS}\n"
        ));
    } else {
        md.push_str("- [training curves](loss.svg)\n");
    }
    md.push_str("- [perplexities](perplexity.svg)\n\n");
    md.push_str("![training curves](loss.svg)\n\n![perplexities](perplexity.svg)\n");
    md
}

/// Compact number formatting for log values spanning many magnitudes (lr 3e-5, loss 2.1).
fn fmt_g(x: f64) -> String {
    let a = x.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{x:.3e}")
    } else {
        format!("{}", (x * 1e4).round() / 1e4)
    }
}

fn plot_err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {what}: {e}")
}

/// Finite-valued (step, value) points of one log field.
fn series(log: &TrainLog, f: impl Fn(&LogEntry) -> Option<f64>) -> Vec<(f64, f64)> {
    log.entries
        .iter()
        .filter_map(|e| f(e).map(|v| (e.step as f64, v)))
        .collect()
}

/// (min, max) with padding, never degenerate (plotters needs a non-empty range).
fn padded_range(values: impl Iterator<Item = f64>, pad_frac: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * pad_frac
    } else {
        lo.abs().max(1.0) * 0.5
    };
    (lo - pad, hi + pad)
}

fn render_loss_svg(log: &TrainLog, input: &ReportInput) -> Result<String> {
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (PLOT_W, 2 * LOSS_PANEL_H)).into_drawing_area();
        let err = plot_err("loss.svg");
        root.fill(&WHITE).map_err(|e| err(&e))?;
        if log.entries.is_empty() {
            // Still write the file so the link in report.md is never dangling.
            root.draw(&Text::new(
                NO_STEPS,
                ((PLOT_W / 2) as i32, LOSS_PANEL_H as i32),
                ("sans-serif", 24).into_font().color(&BLACK).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Center,
                    ),
                ),
            ))
            .map_err(|e| err(&e))?;
        } else {
            let (top, bottom) = root.split_vertically(LOSS_PANEL_H);
            draw_loss_panel(&top, log, input)?;
            draw_agreement_panel(&bottom, log, input)?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

fn step_range(log: &TrainLog) -> (f64, f64) {
    let first = log.entries.first().map_or(0.0, |e| e.step as f64);
    let last = log.entries.last().map_or(1.0, |e| e.step as f64);
    if last > first {
        (first, last)
    } else {
        (first - 0.5, first + 0.5)
    }
}

fn draw_loss_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    log: &TrainLog,
    input: &ReportInput,
) -> Result<()> {
    let err = plot_err("loss panel");
    let loss = series(log, |e| e.loss);
    let kl = series(log, |e| e.kl);
    let rtn_kl = input.rtn.kl.filter(|k| k.is_finite());
    let (y0, y1) = padded_range(
        loss.iter().chain(kl.iter()).map(|p| p.1).chain(rtn_kl),
        0.05,
    );
    let (x0, x1) = step_range(log);
    let mut chart = ChartBuilder::on(area)
        .caption("Training loss and KL to teacher", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0.max(0.0).min(y1 - 1e-9)..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(loss, BLUE.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(kl, RED.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("KL (train)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    // The untrained RTN model's held-out KL: the bar training should get under.
    if let Some(k) = rtn_kl {
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x0, k), (x1, k)],
                8,
                5,
                grey.stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label("RTN KL (held-out)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    Ok(())
}

fn draw_agreement_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    log: &TrainLog,
    input: &ReportInput,
) -> Result<()> {
    let err = plot_err("agreement panel");
    let agree = series(log, |e| e.agreement);
    let rtn_agree = input.rtn.agreement.filter(|a| a.is_finite());
    // Agreement is a fraction; allow >1 only if the trainer logged percentages.
    let y1 = agree.iter().map(|p| p.1).fold(1.0_f64, f64::max);
    let (x0, x1) = step_range(log);
    let mut chart = ChartBuilder::on(area)
        .caption("Top-1 agreement with teacher", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if y1 <= 1.0 {
                format!("{:.0} %", y * 100.0)
            } else {
                format!("{y:.0}")
            }
        })
        .draw()
        .map_err(|e| err(&e))?;
    if agree.is_empty() {
        chart
            .draw_series(std::iter::once(Text::new(
                "no agreement logged",
                (x0 + (x1 - x0) * 0.4, y1 * 0.5),
                ("sans-serif", 18),
            )))
            .map_err(|e| err(&e))?;
    }
    chart
        .draw_series(LineSeries::new(agree, GREEN.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("agreement (train)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    if let Some(a) = rtn_agree {
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x0, a), (x1, a)],
                8,
                5,
                grey.stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label("RTN agreement (held-out)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    Ok(())
}

fn render_perplexity_svg(input: &ReportInput) -> Result<String> {
    let bars: Vec<(String, f64, RGBColor)> = vec![
        (
            "teacher".to_string(),
            input.teacher_score.ppl,
            RGBColor(70, 110, 180),
        ),
        (
            format!("RTN {}", input.rtn_label),
            input.rtn.ppl,
            RGBColor(200, 90, 70),
        ),
    ];
    let mut bars = bars;
    if let Some(r) = &input.rtn_rotated {
        bars.push((
            format!("RTN {}", input.quant_label),
            r.ppl,
            RGBColor(220, 150, 60),
        ));
    }
    bars.push((
        format!("QAT {}", input.quant_label),
        input.student.ppl,
        RGBColor(80, 160, 90),
    ));
    let finite: Vec<f64> = bars
        .iter()
        .map(|b| b.1)
        .filter(|p| p.is_finite() && *p > 0.0)
        .collect();
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (PLOT_W, PPL_H)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| plot_err("perplexity.svg")(&e))?;
        if finite.is_empty() {
            draw_ppl_bars(&root, 0.0..1.0, 0.0, &bars, "")?;
        } else if hi / lo > 10.0 {
            // RTN at low bit widths can be orders of magnitude worse than the teacher; a linear
            // axis would flatten the teacher and student bars to nothing.
            let (a, b) = (lo / 2.0, hi * 2.0);
            draw_ppl_bars(&root, (a..b).log_scale(), a, &bars, " (log scale)")?;
        } else {
            draw_ppl_bars(&root, 0.0..hi * 1.15, 0.0, &bars, "")?;
        }
        root.present().map_err(|e| plot_err("perplexity.svg")(&e))?;
    }
    Ok(svg)
}

fn draw_ppl_bars<Y>(
    area: &DrawingArea<SVGBackend, Shift>,
    y: Y,
    baseline: f64,
    bars: &[(String, f64, RGBColor)],
    note: &str,
) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let err = plot_err("perplexity bars");
    let n = bars.len() as u32;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("Held-out perplexity (lower is better){note}"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d((0u32..n).into_segmented(), y)
        .map_err(|e| err(&e))?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let x_fmt = |v: &SegmentValue<u32>| match v {
        SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&x_fmt)
        .y_desc("perplexity")
        .y_label_formatter(&|v| fmt_g(*v))
        .draw()
        .map_err(|e| err(&e))?;
    let colors: Vec<RGBColor> = bars.iter().map(|b| b.2).collect();
    let data: Vec<(u32, f64)> = bars
        .iter()
        .enumerate()
        .filter(|(_, b)| b.1.is_finite() && b.1 > baseline)
        .map(|(i, b)| (i as u32, b.1))
        .collect();
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .baseline(baseline)
                .margin(40)
                .style_func(|x, _| match x {
                    SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => {
                        colors.get(*i as usize).copied().unwrap_or(BLACK).filled()
                    }
                    SegmentValue::Last => BLACK.filled(),
                })
                .data(data.iter().copied()),
        )
        .map_err(|e| err(&e))?;
    // Value labels above the bars: the exact numbers matter more than bar heights.
    let labels = bars
        .iter()
        .enumerate()
        .filter(|(_, b)| b.1.is_finite())
        .map(|(i, b)| {
            Text::new(
                fmt_num(b.1, 2),
                (SegmentValue::CenterOf(i as u32), b.1),
                ("sans-serif", 16).into_font().color(&BLACK).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Bottom,
                    ),
                ),
            )
        });
    chart.draw_series(labels).map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh folder under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let p =
                std::env::temp_dir().join(format!("report-{tag}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn score(ppl: f64, agreement: Option<f64>, kl: Option<f64>) -> ModelScore {
        ModelScore {
            ppl,
            nll: ppl.ln(),
            tokens: 4096,
            agreement,
            kl,
        }
    }

    fn input<'a>(log: &'a Path, rtn_ppl: f64) -> ReportInput<'a> {
        ReportInput {
            run_name: "test-run",
            teacher: "models/teacher",
            teacher_hub: None,
            quant_label: "w4a8kv4",
            eval_text: "data/heldout.txt",
            teacher_score: score(10.0, None, None),
            rtn: score(rtn_ppl, Some(0.62), Some(0.85)),
            rtn_label: "w4a8kv4",
            student_label: "QAT student",
            rtn_rotated: None,
            exported: None,
            student: score(12.0, Some(0.81), Some(0.21)),
            train_log: log,
            train_steps: 30,
            timings: vec![
                ("generate".into(), 12.5),
                ("train".into(), 100.25),
                ("eval".into(), 3.0),
            ],
        }
    }

    fn read_json(p: &Path) -> Value {
        let text = std::fs::read_to_string(p).expect("read report.json");
        serde_json::from_str(&text).expect("parse report.json")
    }

    fn check_svg(p: &Path) -> String {
        let s = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            s.starts_with("<svg"),
            "{} starts with {:?}",
            p.display(),
            &s[..s.len().min(40)]
        );
        assert!(
            s.trim_end().ends_with("</svg>"),
            "{} is not closed",
            p.display()
        );
        s
    }

    #[test]
    fn report_from_fake_numbers() {
        let tmp = TempDir::new("full");
        let log_path = tmp.0.join("train_log.jsonl");
        let mut lines = String::new();
        for step in 0..30u64 {
            let t = step as f64;
            lines.push_str(&format!(
                "{{\"step\":{step},\"loss\":{},\"kl\":{},\"agreement\":{},\"lr\":0.0001,\"grad_norm\":1.5,\"tokens_per_second\":2000.0}}\n",
                2.0 / (1.0 + t),
                1.5 / (1.0 + t),
                0.6 + 0.2 * t / 30.0
            ));
        }
        // A resumed run re-logs step 29, and a crash left a half line: both must be handled.
        lines.push_str("{\"step\":29,\"loss\":0.05,\"kl\":0.04,\"agreement\":0.8,\"lr\":0.0001,\"grad_norm\":1.0,\"tokens_per_second\":2100.0}\n");
        lines.push_str("{\"step\":30,\"lo");
        std::fs::write(&log_path, lines).expect("write log");
        let out = tmp.0.join("run");
        let table = write_report(&out, &input(&log_path, 20.0)).expect("write_report");

        let j = read_json(&out.join("report.json"));
        assert_eq!(j["teacher"]["ppl"], 10.0);
        assert_eq!(j["rtn"]["ppl"], 20.0);
        assert_eq!(j["student"]["ppl"], 12.0);
        assert_eq!(j["student"]["agreement"], 0.81);
        assert_eq!(j["student"]["kl"], 0.21);
        assert_eq!(j["rtn"]["agreement"], 0.62);
        assert_eq!(j["rtn"]["kl"], 0.85);
        assert_eq!(j["student"]["tokens"], 4096);
        assert!((j["student"]["nll"].as_f64().expect("nll") - 12f64.ln()).abs() < 1e-12);
        assert!(j["teacher"]["agreement"].is_null());
        assert!((j["gap_recovered"].as_f64().expect("gap") - 0.8).abs() < 1e-12);
        assert_eq!(j["quant"], "w4a8kv4");
        assert_eq!(j["eval_text"], "data/heldout.txt");
        assert_eq!(j["train_steps"], 30);
        assert_eq!(j["timings"][1]["stage"], "train");
        assert_eq!(j["timings"][1]["seconds"], 100.25);
        assert_eq!(j["train_log"]["entries"], 30);
        assert_eq!(j["train_log"]["skipped_lines"], 1);
        assert_eq!(j["train_log"]["last"]["loss"], 0.05);

        let md = std::fs::read_to_string(out.join("report.md")).expect("read report.md");
        assert!(
            md.contains("| teacher (full precision) | 10.000 | 2.3026 | — | — |"),
            "{md}"
        );
        assert!(md.contains("| RTN w4a8kv4 | 20.000 |"), "{md}");
        assert!(
            md.contains("| QAT student w4a8kv4 | 12.000 | 2.4849 | 81.00 % | 0.2100 |"),
            "{md}"
        );
        assert!(md.contains("80.00 %"), "{md}");
        assert!(md.contains("(loss.svg)") && md.contains("(perplexity.svg)"));
        assert!(md.contains(&table));

        let loss = check_svg(&out.join("loss.svg"));
        assert!(loss.contains("<text") && loss.contains("agreement"));
        assert!(loss.contains("<polyline") || loss.contains("<path"));
        let ppl = check_svg(&out.join("perplexity.svg"));
        assert!(ppl.contains("<rect"));
        assert!(ppl.contains("12.00") && ppl.contains("20.00"));
        // No temp files left behind by the atomic writes.
        let leftovers: Vec<_> = std::fs::read_dir(&out)
            .expect("list out")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn missing_log_and_zero_gap() {
        let tmp = TempDir::new("nolog");
        let missing = tmp.0.join("does-not-exist.jsonl");
        // RTN equal to the teacher: the recovered share is undefined, not a division by zero.
        // And a huge RTN perplexity elsewhere exercises the log-scale bars.
        let table = write_report(&tmp.0, &input(&missing, 10.0)).expect("write_report");
        let j = read_json(&tmp.0.join("report.json"));
        assert!(j["gap_recovered"].is_null());
        assert_eq!(j["train_log"]["entries"], 0);
        assert!(table.contains("n/a"));
        let md = std::fs::read_to_string(tmp.0.join("report.md")).expect("read report.md");
        assert!(md.contains("not readable"));
        assert!(check_svg(&tmp.0.join("loss.svg")).contains(NO_STEPS));
        check_svg(&tmp.0.join("perplexity.svg"));

        let empty = tmp.0.join("empty.jsonl");
        std::fs::write(&empty, "").expect("write empty log");
        let out = tmp.0.join("log-scale");
        write_report(&out, &input(&empty, 5000.0)).expect("write_report");
        let md = std::fs::read_to_string(out.join("report.md")).expect("read report.md");
        assert!(md.contains(NO_STEPS));
        assert!(check_svg(&out.join("loss.svg")).contains(NO_STEPS));
        assert!(check_svg(&out.join("perplexity.svg")).contains("log scale"));
    }

    /// A teacher from the hub: report.json and report.md name its repo and commit; a local
    /// teacher's report has no such fields.
    #[test]
    fn hub_teacher_is_named_with_its_commit() {
        let tmp = TempDir::new("hub");
        let missing = tmp.0.join("none.jsonl");
        let local = tmp.0.join("local");
        write_report(&local, &input(&missing, 20.0)).expect("write_report");
        let j = read_json(&local.join("report.json"));
        assert!(j["teacher"].get("hub_repo").is_none() && j["teacher"].get("hub_commit").is_none());

        let src = model::HubSource {
            repo: "org/name".into(),
            revision: "main".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
        };
        let mut inp = input(&missing, 20.0);
        inp.teacher = "org/name";
        inp.teacher_hub = Some(&src);
        let out = tmp.0.join("hub");
        write_report(&out, &inp).expect("write_report");
        let j = read_json(&out.join("report.json"));
        assert_eq!(j["teacher"]["path"], "org/name");
        assert_eq!(j["teacher"]["hub_repo"], "org/name");
        assert_eq!(j["teacher"]["hub_commit"], src.commit.as_str());
        let md = std::fs::read_to_string(out.join("report.md")).expect("read report.md");
        assert!(
            md.contains(&format!(
                "- teacher: `org/name` (hub repo `org/name`, commit `{}`)",
                src.commit
            )),
            "{md}"
        );
    }

    /// A run with a K/V rotation: the plain RTN stays the baseline, rotation alone gets a row.
    #[test]
    fn rotated_rtn_row() {
        let tmp = TempDir::new("rot");
        let missing = tmp.0.join("none.jsonl");
        let mut inp = input(&missing, 20.0);
        inp.quant_label = "w4a8kv4_hadamard";
        inp.rtn_rotated = Some(score(14.0, Some(0.7), Some(0.5)));
        let table = write_report(&tmp.0, &inp).expect("write_report");
        let j = read_json(&tmp.0.join("report.json"));
        assert_eq!(j["rtn"]["ppl"], 20.0);
        assert_eq!(j["rtn_rotated"]["ppl"], 14.0);
        assert!((j["gap_recovered"].as_f64().unwrap() - 0.8).abs() < 1e-12);
        assert!(table.contains("| RTN w4a8kv4 | 20.000 |"), "{table}");
        assert!(
            table.contains("| RTN w4a8kv4_hadamard (rotation, no training) | 14.000 |"),
            "{table}"
        );
        assert!(check_svg(&tmp.0.join("perplexity.svg")).contains("14.00"));
        // Without rotation the field is null.
        let plain = write_report(&tmp.0.join("plain"), &input(&missing, 20.0)).unwrap();
        assert!(!plain.contains("rotation"));
        assert!(read_json(&tmp.0.join("plain/report.json"))["rtn_rotated"].is_null());
    }
}
