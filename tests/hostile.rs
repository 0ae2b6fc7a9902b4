//! Hostile and careless inputs, every command: crafted model files, templates, configs and
//! datasets, and output paths that hold the user's work. Each runs under a memory limit
//! (`ulimit -v`) and a time limit and must end in a clean error — exit 1, an `error:` line
//! naming the file or key, no panic, no abort, no hang — with no file of the user's touched.
//! The property tests over the parsers are in `tests/properties.rs`.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Virtual memory for one command: generous for the tiny fixtures (threads reserve address
/// space), far below what the unbounded cases used to take.
const LIMIT_KIB: u64 = 3 << 20;
const LIMIT_S: u64 = 120;

/// Runs lmforge under the limits in `cwd`; returns (exit code, stderr).
fn run_in(cwd: &Path, args: &[&str]) -> (i32, String) {
    let mut script = format!("ulimit -v {LIMIT_KIB}; exec timeout -s KILL {LIMIT_S} \"$0\"");
    for i in 1..=args.len() {
        script.push_str(&format!(" \"${{{i}}}\""));
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_lmforge"))
        .args(args)
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), err)
}

/// A clean refusal: exit 1 (not a signal, not the time limit), an `error:` line with every
/// needle, no panic.
fn refused_in(cwd: &Path, args: &[&str], needles: &[&str]) {
    let (code, err) = run_in(cwd, args);
    assert_eq!(
        code, 1,
        "{args:?}: expected a clean error, got exit {code}: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{args:?}: no error line: {err}"));
    for n in needles {
        assert!(line.contains(n), "{args:?}: {line:?} lacks {n:?}");
    }
}

fn refused(args: &[&str], needles: &[&str]) {
    refused_in(Path::new(env!("CARGO_MANIFEST_DIR")), args, needles)
}

fn ok(args: &[&str]) -> String {
    let (code, err) = run_in(Path::new(env!("CARGO_MANIFEST_DIR")), args);
    assert_eq!(code, 0, "{args:?}: {err}");
    err
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The user's work: a file and a folder, checked untouched afterwards.
fn precious(dir: &Path) -> impl Fn() {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("precious.txt"), "x").unwrap();
    std::fs::write(dir.join("sub/more.txt"), "y").unwrap();
    let dir = dir.to_path_buf();
    move || {
        assert_eq!(
            std::fs::read_to_string(dir.join("precious.txt")).unwrap(),
            "x"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("sub/more.txt")).unwrap(),
            "y"
        );
    }
}

/// A copy of a fixture model directory with `edit` applied to its config.json.
fn model_with(
    d: &Path,
    name: &str,
    fixture_name: &str,
    edit: impl Fn(&mut serde_json::Value),
) -> PathBuf {
    let dst = d.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(fixture_name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    let cfg = dst.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&cfg, v.to_string()).unwrap();
    dst
}

/// The fixture GGUF with the value of metadata `key` replaced by `value` (same type, same size).
fn gguf_with(d: &Path, name: &str, key: &str, value: &[u8]) -> PathBuf {
    let mut b = std::fs::read(fixture("gguf").join("llama_q8_0.gguf")).unwrap();
    let at = b
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .unwrap()
        + key.len();
    let ty = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let v = at + 4;
    match ty {
        8 => {
            // string: u64 length, then the bytes; the new text is padded to the old length.
            let n = u64::from_le_bytes(b[v..v + 8].try_into().unwrap()) as usize;
            assert!(value.len() <= n);
            let mut padded = value.to_vec();
            padded.resize(n, b' ');
            b[v + 8..v + 8 + n].copy_from_slice(&padded);
        }
        _ => b[v..v + value.len()].copy_from_slice(value),
    }
    let p = d.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn text_file(d: &Path) -> String {
    let p = d.join("t.txt");
    std::fs::write(
        &p,
        "Hello there. A short text to score, twice. Hello there.\n",
    )
    .unwrap();
    s(&p)
}

#[test]
fn outputs_never_destroy_user_files() {
    let d = tmpdir("hostile_out");
    let model = s(&fixture("llama_tiny"));
    let v = d.join("v");
    let intact = precious(&v);
    refused(
        &["convert", &model, "--out", &s(&v)],
        &["precious.txt", "not written by lmforge"],
    );
    refused(
        &["convert", &model, "--out", &s(&v), "--overwrite"],
        &["not written by lmforge"],
    );
    refused(
        &[
            "merge",
            "--model",
            &model,
            "--adapter",
            &s(&fixture("peft").join("llama_tiny_lora")),
            "--out",
            &s(&v),
        ],
        &["precious.txt"],
    );
    intact();
    // The working directory's parent, the home directory and / are never outputs.
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    refused_in(
        &work,
        &["convert", &model, "--out", ".."],
        &["working directory"],
    );
    refused_in(
        &work,
        &["convert", &model, "--out", "."],
        &["working directory"],
    );
    refused(&["convert", &model, "--out", "/"], &["root directory"]);
    refused(&["pretrain", "--out", "/"], &["root directory"]);
    if let Ok(home) = std::env::var("HOME") {
        refused(&["convert", &model, "--out", &home], &["home directory"]);
    }
    intact();
    // --out naming a file.
    let f = d.join("notes.txt");
    std::fs::write(&f, "mine").unwrap();
    refused(&["convert", &model, "--out", &s(&f)], &["not a directory"]);
    refused(
        &[
            "tokenizer",
            "train",
            "--input",
            &text_file(&d),
            "--vocab-size",
            "300",
            "--out",
            &s(&f),
        ],
        &["--overwrite"],
    );
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "mine");
    // An earlier lmforge output: replaced only with --overwrite, and the user's files in it stay.
    let hf = d.join("hf");
    ok(&["convert", &model, "--out", &s(&hf)]);
    refused(&["convert", &model, "--out", &s(&hf)], &["--overwrite"]);
    std::fs::write(hf.join("README.md"), "my notes").unwrap();
    ok(&["convert", &model, "--out", &s(&hf), "--overwrite"]);
    assert_eq!(
        std::fs::read_to_string(hf.join("README.md")).unwrap(),
        "my notes"
    );
    assert!(hf.join("model.safetensors").is_file());
}

#[test]
fn a_run_is_never_started_over_by_accident() {
    let d = tmpdir("hostile_runs");
    let corpus = small_corpus(&d, 30_000);
    let run = s(&d.join("run"));
    let tiny = [
        "--set",
        "model.d_model=32",
        "--set",
        "model.n_layer=1",
        "--set",
        "model.n_head=2",
        "--set",
        "model.ctx=32",
        "--set",
        "data.seq_len=32",
        "--set",
        "train.batch_size=4",
        "--set",
        "tokenizer.vocab_size=300",
        "--set",
        "train.eval_every=2",
        "--quiet",
    ];
    let pre = |extra: &[&str]| {
        let mut a = vec![
            "pretrain",
            "--data",
            corpus.to_str().unwrap(),
            "--out",
            &run,
            "--max-steps",
            "4",
        ];
        a.extend_from_slice(&tiny);
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let args = pre(&["--stop-at-step", "2"]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let metrics = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    let again = pre(&[]);
    refused(
        &again.iter().map(String::as_str).collect::<Vec<_>>(),
        &["--resume", "--overwrite"],
    );
    assert_eq!(
        std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap(),
        metrics
    );
    // A truncated token cache is noticed and rebuilt when the run resumes.
    let cache = std::fs::read_dir(d.join("run/data"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let len = std::fs::metadata(&cache).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cache)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let err = ok(&["pretrain", "--resume", &run, "--quiet"]);
    assert!(
        err.contains("token cache unusable") && err.contains("truncated"),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&cache).unwrap().len(), len);
    // --overwrite starts afresh: the old run's checkpoints and log go, `latest` names the new
    // run's checkpoint, the user's file in the run directory stays.
    std::fs::write(d.join("run/notes.md"), "mine").unwrap();
    let mut fresh = pre(&["--overwrite"]);
    fresh.retain(|a| a != "4");
    let i = fresh.iter().position(|a| a == "--max-steps").unwrap();
    fresh.insert(i + 1, "3".into());
    ok(&fresh.iter().map(String::as_str).collect::<Vec<_>>());
    let steps: Vec<_> = std::fs::read_dir(d.join("run/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(steps, vec!["step-00000003".to_string()], "{steps:?}");
    let latest = std::fs::read_to_string(d.join("run/checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000003");
    assert_eq!(
        std::fs::read_to_string(d.join("run/notes.md")).unwrap(),
        "mine"
    );
    let log = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    assert_eq!(
        log.lines().filter(|l| l.contains("\"loss\"")).count(),
        3,
        "{log}"
    );
    // sft into that run's directory: refused, the run kept.
    let sft_data = d.join("sft.jsonl");
    std::fs::write(&sft_data, "{\"prompt\": \"a\", \"completion\": \"b\"}\n").unwrap();
    refused(
        &[
            "sft",
            "--model",
            &s(&fixture("llama_tiny")),
            "--data",
            &s(&sft_data),
            "--out",
            &run,
        ],
        &["written by `pretrain`", "--overwrite"],
    );
    assert!(d.join("run/model/model.safetensors").is_file());
}

#[test]
fn bounded_resources_on_hostile_files() {
    let d = tmpdir("hostile_res");
    let t = text_file(&d);
    // Chat templates that grow without bound or loop for hours.
    let huge = r#"{% set a = "x" * 10000 %}{% for i in range(99999) %}{{ a }}{% endfor %}"#;
    let g = gguf_with(
        &d,
        "huge_template.gguf",
        "tokenizer.chat_template",
        huge.as_bytes(),
    );
    refused(
        &["generate", "--model", &s(&g), "--prompt", "hi", "--chat"],
        &["MiB"],
    );
    let slow = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}";
    let g = gguf_with(
        &d,
        "slow_template.gguf",
        "tokenizer.chat_template",
        slow.as_bytes(),
    );
    refused(
        &["generate", "--model", &s(&g), "--prompt", "hi", "--chat"],
        &["instructions"],
    );
    // Contexts far beyond any model: refused by range, naming the key.
    let g = gguf_with(
        &d,
        "ctx.gguf",
        "llama.context_length",
        &u32::MAX.to_le_bytes(),
    );
    refused(
        &["score", "--model", &s(&g), "--file", &t],
        &["ctx.gguf", "max_position_embeddings"],
    );
    let m = model_with(&d, "ctx_model", "llama_tiny", |v| {
        v["max_position_embeddings"] = 1_000_000_000_000u64.into()
    });
    refused(
        &["score", "--model", &s(&m), "--file", &t],
        &["config.json", "max_position_embeddings"],
    );
    // A large but legal context costs only the positions used (the RoPE table grows on demand).
    let m = model_with(&d, "long_model", "llama_tiny", |v| {
        v["max_position_embeddings"] = (1u64 << 24).into()
    });
    ok(&["score", "--model", &s(&m), "--file", &t, "--window", "16"]);
    // Devices and endless lines.
    let model = s(&fixture("llama_tiny"));
    refused(
        &["score", "--model", &model, "--file", "/dev/zero"],
        &["/dev/zero", "not a regular file"],
    );
    refused(
        &[
            "pretrain",
            "--data",
            "/dev/zero",
            "--out",
            &s(&d.join("r0")),
        ],
        &["not a regular file"],
    );
    // A FIFO nobody writes to would block forever on open.
    let fifo = d.join("fifo.jsonl");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let f = s(&fifo);
    let r3 = s(&d.join("r3"));
    refused(
        &["score", "--model", &model, "--file", &f],
        &["fifo.jsonl", "not a regular file"],
    );
    refused(
        &["sft", "--model", &model, "--data", &f, "--out", &r3],
        &["not a regular file"],
    );
    refused(
        &["pretrain", "--config", &f],
        &["fifo.jsonl", "not a regular file"],
    );
    refused(
        &["generate", "--model", &f, "--prompt", "hi"],
        &["fifo.jsonl"],
    );
    let long = d.join("long.jsonl");
    std::fs::write(
        &long,
        format!(
            "{{\"prompt\": \"{}\", \"completion\": \"b\"}}\n",
            "a".repeat(5000)
        ),
    )
    .unwrap();
    refused(
        &[
            "sft",
            "--model",
            &model,
            "--data",
            &s(&long),
            "--out",
            &s(&d.join("r1")),
            "--max-line-bytes",
            "1000",
        ],
        &["long.jsonl:1", "--max-line-bytes"],
    );
    let big = d.join("big.jsonl");
    std::fs::write(
        &big,
        format!("{{\"text\": \"{}\"}}\n", "word ".repeat(4 << 20)),
    )
    .unwrap();
    refused(
        &["pretrain", "--data", &s(&big), "--out", &s(&d.join("r2"))],
        &["big.jsonl:1", "--max-line-bytes"],
    );
    // 60 MB of bytes that are never a character boundary: refused at once (each 1 MiB piece
    // used to re-read everything before it: quadratic, minutes).
    let junk = d.join("junk.txt");
    let mut bytes = vec![b'a'];
    bytes.resize(60 << 20, 0x80);
    std::fs::write(&junk, bytes).unwrap();
    let t0 = std::time::Instant::now();
    refused(
        &["score", "--model", &model, "--file", &s(&junk)],
        &["junk.txt", "invalid UTF-8"],
    );
    assert!(t0.elapsed().as_secs() < 30, "{:?}", t0.elapsed());
    std::fs::remove_file(&junk).unwrap();
    // A symlink loop in a corpus directory ends, and a linked file is read once.
    let corpus = d.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    small_corpus(&corpus, 20_000);
    std::os::unix::fs::symlink(&corpus, corpus.join("loop")).unwrap();
    std::os::unix::fs::symlink(corpus.join("corpus.txt"), corpus.join("again.txt")).unwrap();
    let tok = d.join("tok.json");
    let err = ok(&[
        "tokenizer",
        "train",
        "--input",
        &s(&corpus),
        "--vocab-size",
        "300",
        "--out",
        &s(&tok),
    ]);
    assert!(tok.is_file(), "{err}");
    // A file given again (or reached through a link) is read once, and said so.
    let err = ok(&[
        "tokenizer",
        "train",
        "--input",
        &s(&corpus),
        "--input",
        &s(&corpus.join("corpus.txt")),
        "--vocab-size",
        "300",
        "--out",
        &s(&tok),
        "--overwrite",
    ]);
    assert!(err.contains("read once"), "{err}");
    // A pre-tokenizer regex that backtracks catastrophically: an error naming the tokenizer.
    let bt = model_with(&d, "backtrack", "llama_tiny", |_| {});
    let tj = bt.join("tokenizer.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    v["pre_tokenizer"] = serde_json::json!({"type": "Split", "pattern": {"Regex": "(a|a)+$"}, "behavior": "Isolated", "invert": false});
    std::fs::write(&tj, v.to_string()).unwrap();
    let evil = d.join("evil.txt");
    std::fs::write(&evil, format!("{}b", "a".repeat(64))).unwrap();
    refused(
        &["score", "--model", &s(&bt), "--file", &s(&evil)],
        &["tokenizer.json"],
    );
}

#[test]
fn wrong_values_are_errors_not_nan() {
    let d = tmpdir("hostile_vals");
    let t = text_file(&d);
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, &str, Edit, &str); 3] = [
        (
            "eps",
            "gpt2_tiny",
            |v| v["layer_norm_epsilon"] = (-1e-5).into(),
            "layer_norm_epsilon",
        ),
        (
            "theta",
            "llama_tiny",
            |v| {
                v["rope_theta"] = 0.0.into();
                if v.get("rope_parameters").is_some() {
                    v["rope_parameters"]["rope_theta"] = 0.0.into();
                }
            },
            "rope_theta",
        ),
        (
            "window",
            "mistral_tiny",
            |v| v["sliding_window"] = 0.into(),
            "sliding_window",
        ),
    ];
    for (name, fx, edit, key) in cases {
        let m = model_with(&d, name, fx, edit);
        refused(&["score", "--model", &s(&m), "--file", &t], &[key]);
        refused(&["generate", "--model", &s(&m), "--prompt", "hi"], &[key]);
    }
    let g = gguf_with(&d, "base.gguf", "llama.rope.freq_base", &0f32.to_le_bytes());
    refused(
        &["generate", "--model", &s(&g), "--prompt", "hi"],
        &["base.gguf", "rope_theta"],
    );
    for (kv, key) in [
        ("train.beta1=5", "beta1"),
        ("train.grad_clip=-1", "grad_clip"),
        ("train.weight_decay=-0.1", "weight_decay"),
        ("model.d_model=100000000", "model.d_model"),
        ("model.rope_theta=0", "rope_theta"),
    ] {
        refused(
            &["pretrain", "--set", kv, "--out", &s(&d.join("r"))],
            &[key],
        );
    }
}
