//! `lmforge report`: the page opens with no network (nothing fetched), the curves it draws are
//! the metrics (read back from the embedded JSON), runs overlay, evaluation tables and recipes
//! are there, a long run is downsampled with its spikes kept, bad input is named.

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

/// The data embedded in a report page.
fn embedded(html: &str) -> Value {
    let open = "<script type=\"application/json\" id=\"lmforge-report\">";
    let start = html.find(open).expect("embedded data") + open.len();
    let end = start + html[start..].find("</script>").unwrap();
    serde_json::from_str(&html[start..end]).unwrap()
}

/// (step, value) of `key` in a run's metrics.
fn curve(run: &Path, key: &str) -> Vec<(f64, f64)> {
    metrics(run)
        .iter()
        .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(key)?.as_f64()?)))
        .collect()
}

fn points(data: &Value, metric: &str, run: &str) -> Vec<(f64, f64)> {
    let p = data["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["metric"] == metric)
        .unwrap_or_else(|| panic!("no panel {metric}"));
    let s = p["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["run"] == run)
        .unwrap();
    serde_json::from_value(s["points"].clone()).unwrap()
}

#[test]
fn a_report_shows_the_runs_metrics_and_needs_no_network() {
    let d = tmpdir("report");
    let corpus = small_corpus(&d, 20_000);
    let train = |name: &str, lr: &str| {
        let out = d.join(name);
        let mut a = vec!["pretrain", "--data", corpus.to_str().unwrap(), "--quiet"];
        a.extend([
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "12",
            "--lr",
            lr,
        ]);
        a.extend(["--eval-every", "4"]);
        a.extend(TINY_GPT);
        ok(&a);
        out
    };
    let (a, b) = (train("fast", "3e-3"), train("slow", "1e-3"));
    // A results.json as `lmforge eval --baseline` writes it.
    let ev = d.join("eval");
    std::fs::create_dir_all(&ev).unwrap();
    let res = json!({"model": "fast/model", "results": {"arith|0-shot": {"metrics": {"acc": 0.75, "acc_stderr": 0.1}}},
        "baseline": {"results": {"arith|0-shot": {"metrics": {"acc": 0.5}}}}});
    std::fs::write(ev.join("results.json"), res.to_string()).unwrap();
    let out = d.join("report");
    ok(&[
        "report",
        a.to_str().unwrap(),
        "--compare",
        b.to_str().unwrap(),
        "--eval",
        ev.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    for fetch in ["src=", "href=", "@import", "url(", "<link"] {
        assert!(
            !html.contains(fetch),
            "the page would fetch something: {fetch}"
        );
    }
    let data = embedded(&html);
    let metrics: Vec<&str> = data["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metric"].as_str().unwrap())
        .collect();
    assert_eq!(&metrics[..2], &["loss", "val_loss"], "{metrics:?}");
    for m in ["lr", "grad_norm", "tokens_per_s", "peak_rss_mib", "val_ppl"] {
        assert!(metrics.contains(&m), "{m} missing from {metrics:?}");
    }
    // What is drawn is what the runs logged.
    for (run, name) in [(&a, "fast"), (&b, "slow")] {
        for m in ["loss", "val_loss", "lr"] {
            assert_eq!(points(&data, m, name), curve(run, m), "{name} {m}");
        }
    }
    assert_eq!(points(&data, "val_loss", "fast").len(), 3);
    let pngs = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "png")
        })
        .count();
    assert_eq!(pngs, metrics.len());
    assert!(html.contains("<polyline") && html.contains("recipe (config.toml)"));
    assert!(html.contains("arith|0-shot") && html.contains("0.7500") && html.contains("+0.2500"));
    // Again into the same directory: only with --overwrite.
    let err = fails(&[
        "report",
        a.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("--overwrite"), "{err}");
}

#[test]
fn a_long_run_is_downsampled_with_its_spikes_and_bad_input_is_named() {
    let d = tmpdir("report_long");
    let run = d.join("long");
    std::fs::create_dir_all(&run).unwrap();
    let mut text = String::new();
    for s in 1..=200_000u64 {
        let loss = if s == 123_457 {
            50.0
        } else {
            2.0 + (s % 10) as f64 * 0.01
        };
        text.push_str(&format!(
            "{{\"step\":{s},\"loss\":{loss},\"rewards/margins\":{}}}\n",
            s as f64 * 1e-5
        ));
    }
    // A metric name that tries to end the data element or open a script.
    text.push_str("{\"step\":1,\"x</script><!--<script>\":1}\n");
    text.push_str("{\"summary\":true,\"steps\":200000}\n");
    std::fs::write(run.join("metrics.jsonl"), text).unwrap();
    let out = d.join("report");
    ok(&[
        "report",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert_eq!(
        html.matches("<script").count(),
        1,
        "one data element, nothing opened"
    );
    assert!(
        html.contains("<h2>long</h2>"),
        "the page goes on after the data"
    );
    let data = embedded(&html);
    assert_eq!(
        points(&data, "x</script><!--<script>", "long"),
        [(1.0, 1.0)]
    );
    let loss = points(&data, "loss", "long");
    assert!(
        loss.len() <= 2 * lmforge::view::report::BUCKETS + 2,
        "{}",
        loss.len()
    );
    assert!(loss.contains(&(123_457.0, 50.0)), "the spike is drawn");
    assert_eq!((loss[0].0, loss[loss.len() - 1].0), (1.0, 200_000.0));
    assert!(points(&data, "rewards/margins", "long").len() > 100);

    std::fs::write(
        run.join("metrics.jsonl"),
        "{\"step\":1,\"loss\":2}\nnot json\n",
    )
    .unwrap();
    let err = fails(&[
        "report",
        run.to_str().unwrap(),
        "--out",
        d.join("r2").to_str().unwrap(),
    ]);
    assert!(err.contains("metrics.jsonl:2"), "{err}");
    let err = fails(&[
        "report",
        d.join("nothing").to_str().unwrap(),
        "--out",
        d.join("r3").to_str().unwrap(),
    ]);
    assert!(err.contains("metrics.jsonl"), "{err}");
}

/// A minimal reader of what `--tensorboard` writes: TFRecord frames (CRCs checked) around
/// Event messages; (step, tag, value) of every scalar.
fn read_events(path: &Path) -> Vec<(i64, String, f32)> {
    use lmforge::view::tensorboard::masked_crc;
    fn varint(b: &[u8], i: &mut usize) -> u64 {
        let (mut v, mut s) = (0u64, 0);
        loop {
            let x = b[*i];
            *i += 1;
            v |= ((x & 0x7f) as u64) << s;
            s += 7;
            if x < 0x80 {
                return v;
            }
        }
    }
    /// (field, wire type, payload) of each field of a message.
    fn fields(b: &[u8]) -> Vec<(u64, u64, &[u8])> {
        let (mut i, mut out) = (0, Vec::new());
        while i < b.len() {
            let key = varint(b, &mut i);
            let len = match key & 7 {
                0 => {
                    let s = i;
                    varint(b, &mut i);
                    out.push((key >> 3, 0, &b[s..i]));
                    continue;
                }
                1 => 8,
                5 => 4,
                2 => varint(b, &mut i) as usize,
                w => panic!("wire type {w}"),
            };
            out.push((key >> 3, key & 7, &b[i..i + len]));
            i += len;
        }
        out
    }
    let bytes = std::fs::read(path).unwrap();
    let (mut at, mut out, mut first) = (0, Vec::new(), true);
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let n = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        assert_eq!(crc(at + 8), masked_crc(len_bytes));
        let data = &bytes[at + 12..at + 12 + n];
        assert_eq!(crc(at + 12 + n), masked_crc(data));
        at += 16 + n;
        let ev = fields(data);
        if first {
            assert!(ev.iter().any(|f| f.0 == 3 && f.2 == b"brain.Event:2"));
            first = false;
            continue;
        }
        let step = ev
            .iter()
            .find(|f| f.0 == 2)
            .map(|f| varint(f.2, &mut 0))
            .unwrap() as i64;
        for (_, _, summary) in ev.iter().filter(|f| f.0 == 5) {
            for (_, _, val) in fields(summary) {
                let v = fields(val);
                let tag =
                    String::from_utf8(v.iter().find(|f| f.0 == 1).unwrap().2.to_vec()).unwrap();
                let x =
                    f32::from_le_bytes(v.iter().find(|f| f.0 == 2).unwrap().2.try_into().unwrap());
                out.push((step, tag, x));
            }
        }
    }
    out
}

#[test]
fn tensorboard_event_files_hold_every_step_metric() {
    let d = tmpdir("report_tensorboard");
    let corpus = small_corpus(&d, 20_000);
    let run = d.join("run");
    let mut a = vec!["pretrain", "--data", corpus.to_str().unwrap(), "--quiet"];
    a.extend([
        "--out",
        run.to_str().unwrap(),
        "--max-steps",
        "8",
        "--eval-every",
        "4",
    ]);
    a.extend(["--tensorboard"]);
    a.extend(TINY_GPT);
    ok(&a);
    let files: Vec<_> = std::fs::read_dir(run.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    let events = read_events(&files[0]);
    let mut n = 0;
    for v in metrics(&run) {
        let Some(step) = v.get("step").and_then(Value::as_i64) else {
            continue;
        };
        for (k, x) in v.as_object().unwrap() {
            let Some(x) = x.as_f64().filter(|_| k != "step") else {
                continue;
            };
            assert!(
                events
                    .iter()
                    .any(|(s, t, y)| *s == step && t == k && *y == x as f32),
                "step {step} {k} = {x} is not in the event file"
            );
            n += 1;
        }
    }
    assert_eq!(n, events.len());
    assert!(events.iter().any(|e| e.1 == "val_loss") && n > 60, "{n}");
}
