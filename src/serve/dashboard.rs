//! `lmforge dashboard`'s routes: the page (`dashboard.html`: plain HTML and script, no build
//! step, nothing fetched from elsewhere), the runs and evaluations of the runs directory with
//! their sizes and ages (the page polls them and redraws a run that changed), and a run's
//! report — the page `lmforge report` writes, rendered on request. Runs and evaluations are
//! named by their path below the runs directory and looked up in its listing, never opened as
//! given.

use super::batcher::Refusal;
use super::catalog::{Catalog, RunDir};
use super::http::{self, Request};
use serde_json::{json, Value};
use std::net::TcpStream;
use std::path::PathBuf;

const PAGE: &str = include_str!("dashboard.html");
/// Runs one report may overlay.
const MAX_COMPARED: usize = 8;

fn not_found(message: String) -> Refusal {
    Refusal::new(404, "not_found", message)
}

pub fn route(catalog: &Catalog, stream: &TcpStream, req: &Request) -> Result<(), Refusal> {
    if req.method != "GET" {
        return Err(Refusal::new(
            405,
            "method_not_allowed",
            format!("{} is not allowed on {}", req.method, req.path),
        ));
    }
    match req.path.as_str() {
        "/" | "/index.html" => {
            let _ = http::respond(stream, 200, "text/html; charset=utf-8", PAGE.as_bytes());
            Ok(())
        }
        "/api/runs" => {
            let runs: Vec<Value> = catalog.runs().iter().map(describe).collect();
            let evals: Vec<String> = catalog.evals().into_iter().map(|e| e.name).collect();
            let models: Vec<String> = catalog.list().into_iter().map(|(n, _)| n).collect();
            let v = json!({"runs": runs, "evals": evals, "models": models});
            let _ = http::respond(stream, 200, "application/json", v.to_string().as_bytes());
            Ok(())
        }
        "/api/report" => {
            let names = req.query_values("run");
            if names.is_empty() || names.len() > MAX_COMPARED {
                return Err(Refusal::invalid(format!(
                    "give 1 to {MAX_COMPARED} runs (?run=NAME&run=…)"
                )));
            }
            let runs = catalog.runs();
            let dirs = pick(&runs, &names, "run")?;
            let evals = catalog.evals();
            let eval_names = req.query_values("eval");
            let eval_dirs = pick(&evals, &eval_names, "evaluation")?;
            let evals: Vec<(String, PathBuf)> = eval_names.into_iter().zip(eval_dirs).collect();
            match crate::view::report::render(&dirs, &evals) {
                Ok((html, _)) => {
                    let _ = http::respond(stream, 200, "text/html; charset=utf-8", html.as_bytes());
                    Ok(())
                }
                Err(e) => Err(Refusal::invalid(format!("{e:#}"))),
            }
        }
        p => Err(not_found(format!("no page {p}"))),
    }
}

fn pick(listed: &[RunDir], names: &[String], what: &str) -> Result<Vec<PathBuf>, Refusal> {
    names
        .iter()
        .map(|n| {
            listed
                .iter()
                .find(|r| &r.name == n)
                .map(|r| r.dir.clone())
                .ok_or_else(|| not_found(format!("no {what} {n} in the runs directory")))
        })
        .collect()
}

/// A run's name with its metrics file's size and age: the page redraws a run whose size changed.
/// "Training": metrics written in the last minute and no final output written with or after them (the
/// run's lock cannot be asked without taking it, which could make a starting run fail).
fn describe(r: &RunDir) -> Value {
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let metrics = r.dir.join("metrics.jsonl");
    let size = std::fs::metadata(&metrics).map(|m| m.len()).unwrap_or(0);
    let written = modified(&metrics);
    let age = written
        .and_then(|t| t.elapsed().ok())
        .map(|d| d.as_secs_f64());
    let output = ["model", "adapter"]
        .iter()
        .filter_map(|d| modified(&r.dir.join(d)))
        .max();
    let finished = match (output, written) {
        // The summary line follows the outputs by moments.
        (Some(o), Some(w)) => o + std::time::Duration::from_secs(10) >= w,
        (Some(_), None) => true,
        _ => false,
    };
    json!({
        "name": r.name,
        "metrics_bytes": size,
        "age_s": age,
        "training": !finished && age.is_some_and(|a| a < 60.0),
        "finished": finished,
    })
}
