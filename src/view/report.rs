//! Run reports (`lmforge report RUN [--compare RUN…] --out DIR`): one self-contained HTML page
//! (inline SVG, no executable script, nothing fetched: it opens with no network) and one PNG
//! per curve. Every numeric metric a run logged per step becomes a panel — loss, validation
//! loss/perplexity, learning rate, gradient norm, tokens/s, memory, and whatever its method adds
//! (DPO's rewards and margins, PPO's KL, …) — with every run overlaid; then each run's resolved
//! recipe (`config.toml`), its summary line, and its evaluation tables (`RUN/eval_suite`, or
//! `eval` output directories given with `--eval`).
//!
//! Long runs stay light: a curve keeps its ends and the lowest and the highest point of each of
//! `BUCKETS` slices of its steps (spikes survive, 10⁶ steps become ≤ 2,002 points). What is drawn is also
//! embedded as JSON (`<script type="application/json" id="lmforge-report">`), so tools and tests
//! read the plotted data back.

use crate::plot::{label, ticks, Series};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Slices per curve when downsampling (two points each, and the first and last points).
pub const BUCKETS: usize = 1000;

#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// A run directory (with metrics.jsonl).
    pub run: PathBuf,
    /// More runs to overlay on the same panels (repeatable).
    #[arg(long = "compare")]
    pub compare: Vec<PathBuf>,
    /// `lmforge eval` output directories (results.json) to tabulate too (repeatable).
    #[arg(long = "eval")]
    pub eval: Vec<PathBuf>,
    /// The report directory: index.html and one PNG per panel.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an earlier report in --out.
    #[arg(long)]
    pub overwrite: bool,
}

/// Keys that are not curves (counters, flags).
const NOT_CURVES: [&str; 7] = [
    "step",
    "epoch",
    "units",
    "tokens",
    "elapsed_s",
    "ranks",
    "skipped",
];
/// Panels that come first, in this order (the rest follow by name).
const FIRST: [&str; 11] = [
    "loss",
    "val_loss",
    "eval_loss",
    "val_ppl",
    "val_bits_per_byte",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "step_s",
    "peak_rss_mib",
    "allreduce_s",
];
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// One run as the report sees it.
pub struct Run {
    pub name: String,
    pub dir: PathBuf,
    /// Per numeric key, in the order first logged: (step, value) of every step line that has
    /// it.
    pub curves: Vec<(String, Vec<(f64, f64)>)>,
    /// Training steps logged (lines with a loss).
    pub train_steps: usize,
    /// Lines without a step (the summary, forgetting), the first `MAX_SUMMARY`.
    pub summary: Vec<Value>,
    pub config: Option<String>,
    /// (label, results.json) of its evaluations.
    pub evals: Vec<(String, Value)>,
}

const MAX_SUMMARY: usize = 16;
/// Metrics a run may log at most (a file with thousands of keys is not a training log).
pub const MAX_PANELS: usize = 256;

impl Run {
    /// (step, value) of `metric`, if the run logged it.
    pub fn curve(&self, metric: &str) -> Option<&[(f64, f64)]> {
        self.curves
            .iter()
            .find(|(k, _)| k == metric)
            .map(|(_, p)| p.as_slice())
    }

    /// Reads `dir/metrics.jsonl` line by line, keeping only numbers (a 10⁶-step run holds
    /// 16 bytes per logged value, not a JSON tree per line).
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let mut curves: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        let mut index = std::collections::HashMap::new();
        let (mut train_steps, mut summary) = (0, Vec::new());
        for line in crate::input::lines(&path)? {
            let (i, line) = line?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line)
                .with_context(|| format!("{}:{i}: invalid JSON", path.display()))?;
            let Some(step) = v.get("step").and_then(Value::as_f64) else {
                if summary.len() < MAX_SUMMARY {
                    summary.push(v);
                }
                continue;
            };
            train_steps += usize::from(v.get("loss").is_some());
            for (k, x) in v.as_object().into_iter().flatten() {
                let Some(y) = x.as_f64().filter(|y| y.is_finite()) else {
                    continue;
                };
                if k == "step" {
                    continue;
                }
                if !index.contains_key(k) && index.len() == MAX_PANELS {
                    bail!(
                        "{}:{i}: more than {MAX_PANELS} different metrics; not a training log",
                        path.display()
                    );
                }
                let at = *index.entry(k.clone()).or_insert_with(|| {
                    curves.push((k.clone(), Vec::new()));
                    curves.len() - 1
                });
                curves[at].1.push((step, y));
            }
        }
        let cfg = dir.join("config.toml");
        let config = match cfg.is_file() {
            true => Some(crate::input::read_text(
                &cfg,
                crate::input::MAX_CONFIG_BYTES,
            )?),
            false => None,
        };
        let mut evals = Vec::new();
        let suite = dir.join("eval_suite");
        if suite.join("results.json").is_file() {
            evals.push((
                "eval suite".to_string(),
                crate::input::read_json(&suite.join("results.json"))?,
            ));
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            curves,
            train_steps,
            summary,
            config,
            evals,
        })
    }
}

/// The first and last points, and the lowest and the highest point of each of `buckets`
/// consecutive slices, in step order.
pub fn downsample(points: &[(f64, f64)], buckets: usize) -> Vec<(f64, f64)> {
    let n = points.len();
    if n <= 2 * buckets {
        return points.to_vec();
    }
    let mut out = Vec::with_capacity(2 * buckets + 2);
    out.push(points[0]);
    for b in 0..buckets {
        let s = &points[b * n / buckets..(b + 1) * n / buckets];
        let lo = s
            .iter()
            .enumerate()
            .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1));
        let hi = s
            .iter()
            .enumerate()
            .max_by(|a, b| a.1 .1.total_cmp(&b.1 .1));
        if let (Some((i, &p)), Some((j, &q))) = (lo, hi) {
            match i.cmp(&j) {
                std::cmp::Ordering::Less => out.extend([p, q]),
                std::cmp::Ordering::Greater => out.extend([q, p]),
                std::cmp::Ordering::Equal => out.push(p),
            }
        }
    }
    out.push(points[n - 1]);
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// One chart: a metric and its curve in each run.
pub type Panel = (String, Vec<Series>);

/// Panels (metric, one series per run), `FIRST` metrics first, then the rest by name.
pub fn panels(runs: &[Run]) -> Vec<Panel> {
    let mut keys: Vec<&String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (k, _) in runs.iter().flat_map(|r| &r.curves) {
        if !NOT_CURVES.contains(&k.as_str()) && seen.insert(k) {
            keys.push(k);
        }
    }
    let rank = |k: &String| FIRST.iter().position(|f| f == k).unwrap_or(FIRST.len());
    keys.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    keys.into_iter()
        .map(|k| {
            let series = runs
                .iter()
                .map(|r| Series {
                    name: r.name.clone(),
                    points: r
                        .curve(k)
                        .map(|p| downsample(p, BUCKETS))
                        .unwrap_or_default(),
                })
                .collect();
            (k.clone(), series)
        })
        .collect()
}

/// Writes the report of `a.run` (and `a.compare`) into `a.out`.
pub fn write(a: &ReportArgs) -> Result<PathBuf> {
    crate::outdir::check(
        &a.out,
        crate::outdir::Claim {
            kind: "report",
            overwrite: a.overwrite,
            resumable: false,
        },
    )?;
    let dirs: Vec<PathBuf> = std::iter::once(&a.run).chain(&a.compare).cloned().collect();
    let evals: Vec<(String, PathBuf)> = a
        .eval
        .iter()
        .map(|d| (d.display().to_string(), d.clone()))
        .collect();
    let (html, panels) = render(&dirs, &evals)?;
    crate::outdir::write_output(&a.out, "report", |dir| {
        crate::fsutil::write_file(&dir.join("index.html"), html.as_bytes())?;
        for (i, (k, series)) in panels.iter().enumerate() {
            // Every run, drawn or not, so each keeps its colour (`chart` skips empty ones).
            crate::plot::chart(
                &[(k.clone(), series.clone())],
                "step",
                &dir.join(png_name(i, k)),
            )?;
        }
        Ok(())
    })?;
    Ok(a.out.join("index.html"))
}

/// The report page of runs `dirs` (the first one's curves drawn first) with the `lmforge eval`
/// results in `evals` (name, directory), and its panels (what the PNGs draw).
pub fn render(dirs: &[PathBuf], evals: &[(String, PathBuf)]) -> Result<(String, Vec<Panel>)> {
    let mut runs = Vec::new();
    for d in dirs {
        runs.push(Run::load(d)?);
    }
    // Two runs called alike (a/run, b/run) are told apart by their paths.
    for i in 0..runs.len() {
        if runs.iter().filter(|r| r.name == runs[i].name).count() > 1 {
            runs[i].name = runs[i].dir.display().to_string();
        }
    }
    let mut results = Vec::new();
    for (name, d) in evals {
        results.push((
            name.clone(),
            crate::input::read_json(&d.join("results.json"))?,
        ));
    }
    let panels = panels(&runs);
    if panels.is_empty() {
        let first = dirs
            .first()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        bail!("{first}: no step of the run has a numeric metric");
    }
    Ok((page(&runs, &panels, &results), panels))
}

fn png_name(i: usize, key: &str) -> String {
    let k: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(60)
        .collect();
    format!("{i:02}-{k}.png")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page: legend, panels, embedded data, summaries, recipes, evaluation tables.
fn page(runs: &[Run], panels: &[Panel], evals: &[(String, Value)]) -> String {
    let title = runs
        .iter()
        .map(|r| r.name.as_str())
        .collect::<Vec<_>>()
        .join(" vs ");
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>lmforge report: {}</title>\n\
         <style>body{{font:14px sans-serif;margin:24px;max-width:900px}}pre{{background:#f6f6f6;\
         padding:8px;overflow-x:auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;\
         padding:2px 8px;text-align:right}}th:first-child,td:first-child{{text-align:left}}</style>\n\
         </head><body>\n<h1>{}</h1>\n<p>",
        esc(&title),
        esc(&title)
    );
    for (i, r) in runs.iter().enumerate() {
        let _ = write!(
            h,
            "<span style=\"color:{}\">&#9632; {}</span> ({} steps logged) &nbsp; ",
            COLORS[i % COLORS.len()],
            esc(&r.name),
            r.train_steps
        );
    }
    h.push_str("</p>\n");
    for (k, series) in panels {
        h.push_str(&svg(k, series));
    }
    let data = json!({
        "runs": runs.iter().map(|r| json!({"name": r.name})).collect::<Vec<_>>(),
        "panels": panels.iter().map(|(k, s)| json!({"metric": k,
            "series": s.iter().map(|s| json!({"run": s.name, "points": s.points})).collect::<Vec<_>>()}))
            .collect::<Vec<_>>(),
    });
    let _ = writeln!(
        h,
        "<script type=\"application/json\" id=\"lmforge-report\">{}</script>",
        // Nothing in it can end or re-open the script element (`</script>`, `<!--<script>`).
        data.to_string()
            .replace('<', "\\u003c")
            .replace('>', "\\u003e")
            .replace('&', "\\u0026")
    );
    for r in runs {
        let _ = writeln!(h, "<h2>{}</h2>", esc(&r.name));
        for s in &r.summary {
            let _ = writeln!(h, "<p>summary: <code>{}</code></p>", esc(&s.to_string()));
        }
        for (label, res) in &r.evals {
            h.push_str(&eval_table(label, res));
        }
        if let Some(c) = &r.config {
            let _ = writeln!(
                h,
                "<details><summary>recipe (config.toml)</summary><pre>{}</pre></details>",
                esc(c)
            );
        }
    }
    for (label, res) in evals {
        h.push_str(&eval_table(label, res));
    }
    h.push_str("</body></html>\n");
    h
}

/// A table of one `results.json`: a row per task, shots and metric; columns the model and, when
/// the file has one, its baseline and the change.
fn eval_table(label: &str, res: &Value) -> String {
    let base = res.get("baseline");
    let mut h = format!(
        "<h3>evaluation: {}</h3>\n<table><tr><th>task</th><th>metric</th><th>{}</th>",
        esc(label),
        esc(res["model"].as_str().unwrap_or("model"))
    );
    if base.is_some() {
        h.push_str("<th>baseline</th><th>change</th>");
    }
    h.push_str("</tr>\n");
    let empty = serde_json::Map::new();
    let per = res["results"].as_object().unwrap_or(&empty);
    for (task, r) in per {
        for (m, v) in r["metrics"].as_object().unwrap_or(&empty) {
            let Some(x) = v.as_f64().filter(|_| !m.ends_with("_stderr")) else {
                continue;
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{x:.4}</td>",
                esc(task),
                esc(m)
            );
            if let Some(b) = base {
                match b["results"][task.as_str()]["metrics"][m.as_str()].as_f64() {
                    Some(y) => {
                        let _ = write!(h, "<td>{y:.4}</td><td>{:+.4}</td>", x - y);
                    }
                    None => h.push_str("<td></td><td></td>"),
                }
            }
            h.push_str("</tr>\n");
        }
    }
    h.push_str("</table>\n");
    h
}

/// One panel as inline SVG: axes with rounded ticks, a polyline per run.
fn svg(title: &str, series: &[Series]) -> String {
    const W: f64 = 860.0;
    const H: f64 = 220.0;
    const L: f64 = 70.0;
    const R: f64 = 16.0;
    const T: f64 = 24.0;
    const B: f64 = 30.0;
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts() {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 || !(x1 - x0).is_finite() || !(y1 - y0).is_finite() {
        return String::new();
    }
    // A flat range (one point, a constant) gets a width that survives the value's magnitude.
    let widen = |lo: f64, hi: f64| match hi - lo > 0.0 {
        true => (lo, hi),
        false => {
            let w = (lo.abs() * 1e-9).max(0.5);
            (lo - w, hi + w)
        }
    };
    (x0, x1) = widen(x0, x1);
    (y0, y1) = widen(y0, y1);
    let pad = (y1 - y0) * 0.05;
    (y0, y1) = (y0 - pad, y1 + pad);
    let sx = |x: f64| L + (x - x0) / (x1 - x0) * (W - L - R);
    let sy = |y: f64| T + (y1 - y) / (y1 - y0) * (H - T - B);
    let mut h = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" role=\"img\" \
         aria-label=\"{t}\"><text x=\"{L}\" y=\"16\" font-weight=\"bold\">{t}</text>\
         <rect x=\"{L}\" y=\"{T}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>",
        W - L - R,
        H - T - B,
        t = esc(title)
    );
    let ys = ticks(y0, y1);
    for &v in &ys {
        let y = sy(v);
        let _ = write!(
            h,
            "<line x1=\"{L}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\
             <text x=\"{}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            W - R,
            L - 4.0,
            y + 4.0,
            label(v, &ys)
        );
    }
    let xs = ticks(x0, x1);
    for &v in &xs {
        let x = sx(v);
        let _ = write!(
            h,
            "<text x=\"{x:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            H - B + 16.0,
            label(v, &xs)
        );
    }
    for (i, s) in series
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.points.is_empty())
    {
        let color = COLORS[i % COLORS.len()];
        if let [(x, y)] = s.points[..] {
            // A polyline of one point draws nothing.
            let _ = write!(
                h,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{color}\"/>",
                sx(x),
                sy(y)
            );
            continue;
        }
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            h,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
            path.join(" ")
        );
    }
    h.push_str("</svg>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsampling_keeps_the_extremes_of_every_slice() {
        let pts: Vec<(f64, f64)> = (0..1_000_000)
            .map(|i| (i as f64, if i == 654_321 { 99.0 } else { (i % 7) as f64 }))
            .collect();
        let d = downsample(&pts, BUCKETS);
        assert!(d.len() <= 2 * BUCKETS + 2, "{}", d.len());
        assert_eq!((d[0], d[d.len() - 1]), (pts[0], pts[pts.len() - 1]));
        assert!(d.contains(&(654_321.0, 99.0)), "the spike survives");
        assert!(d.windows(2).all(|w| w[0].0 < w[1].0), "in step order");
        let short: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, i as f64)).collect();
        assert_eq!(downsample(&short, BUCKETS), short);
    }

    #[test]
    fn ticks_are_computed_not_accumulated_and_labelled_by_their_spacing() {
        let t = ticks(-0.7, 0.1);
        assert!(t.contains(&0.0), "{t:?}");
        let l: Vec<String> = t.iter().map(|&v| label(v, &t)).collect();
        assert_eq!(l, ["-0.6", "-0.4", "-0.2", "0"]);
        let t = ticks(0.0, 1e-3);
        let l: Vec<String> = t.iter().map(|&v| label(v, &t)).collect();
        assert_eq!(l, ["0", "0.0002", "0.0004", "0.0006", "0.0008", "0.0010"]);
        let t = ticks(0.0, 4e-5);
        assert_eq!(label(t[1], &t), "1e-5");
        let t = ticks(2.31, 2.31002);
        let l: Vec<String> = t.iter().map(|&v| label(v, &t)).collect();
        assert!(l.windows(2).all(|w| w[0] != w[1]), "{l:?}");
        let t = ticks(0.0, 200_000.0);
        assert_eq!(label(100_000.0, &t), "100000");
    }
}
