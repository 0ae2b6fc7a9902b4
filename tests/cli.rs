//! The binary on bad input: a one-line error naming the file, line, key or tensor, a non-zero
//! exit, never a panic, and no damage to what was there before.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn lmforge(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

/// Runs and expects a clean failure whose message contains every `needles` entry.
fn fails(args: &[&str], needles: &[&str]) {
    let (code, _, err) = lmforge(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    for n in needles {
        assert!(line.contains(n), "{args:?}: error {line:?} lacks {n:?}");
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn bad_corpora() {
    let d = tmpdir("cli_corpus");
    let out = s(&d.join("run"));
    fails(
        &[
            "pretrain",
            "--data",
            &s(&d.join("missing.txt")),
            "--out",
            &out,
        ],
        &["missing.txt", "no such file"],
    );
    std::fs::create_dir_all(d.join("empty_dir")).unwrap();
    std::fs::write(d.join("empty_dir/notes.bin"), [0u8, 1, 2]).unwrap();
    fails(
        &[
            "pretrain",
            "--data",
            &s(&d.join("empty_dir")),
            "--out",
            &out,
        ],
        &["empty_dir", "no text files"],
    );
    std::fs::write(d.join("empty.txt"), "").unwrap();
    fails(
        &[
            "pretrain",
            "--data",
            &s(&d.join("empty.txt")),
            "--out",
            &out,
        ],
        &["empty"],
    );
    let mut bad = b"good text here\nmore".to_vec();
    bad.extend([0xff, 0xfe]);
    std::fs::write(d.join("bad.txt"), &bad).unwrap();
    fails(
        &["pretrain", "--data", &s(&d.join("bad.txt")), "--out", &out],
        &["bad.txt", "invalid UTF-8", "byte offset 19"],
    );
    std::fs::write(d.join("a.jsonl"), "{\"text\": \"ok\"}\n{not json}\n").unwrap();
    fails(
        &["pretrain", "--data", &s(&d.join("a.jsonl")), "--out", &out],
        &["a.jsonl:2", "not valid JSON"],
    );
    std::fs::write(d.join("b.jsonl"), "{\"text\": \"ok\"}\n{\"body\": \"x\"}\n").unwrap();
    fails(
        &["pretrain", "--data", &s(&d.join("b.jsonl")), "--out", &out],
        &["b.jsonl:2", "\"text\""],
    );
    let small = small_corpus(&d, 200);
    fails(
        &["pretrain", "--data", &s(&small), "--out", &out],
        &["tokens"],
    );
}

#[test]
fn bad_configs() {
    let d = tmpdir("cli_config");
    fails(
        &["pretrain", "--set", "train.learning_rate=1"],
        &["learning_rate"],
    );
    fails(
        &["pretrain", "--set", "train.max_steps=many"],
        &["train.max_steps"],
    );
    fails(
        &["pretrain", "--set", "model.arch=transformer"],
        &["model.arch"],
    );
    let cfg = d.join("c.toml");
    std::fs::write(&cfg, "[model]\narch = \"gpt2\"\nwidth = 3\n").unwrap();
    fails(&["pretrain", "--config", &s(&cfg)], &["c.toml", "width"]);
    fails(&["pretrain", "--resume", &s(&d)], &["not a checkpoint"]);
    // Every training command reads the same kind of config, and names what it rejects.
    let sft = d.join("sft.toml");
    std::fs::write(&sft, "model = \"m\"\n[train]\nlearning_rate = 1e-4\n").unwrap();
    fails(
        &["sft", "--config", &s(&sft)],
        &["sft.toml", "train.learning_rate"],
    );
    fails(
        &["finetune", "--task", "ner", "--set", "peft.lora_rank=4"],
        &["--set peft.lora_rank=4", "lora_rank"],
    );
    fails(
        &[
            "sft",
            "--model",
            "m",
            "--data",
            "d",
            "--set",
            "train.beta1=5",
        ],
        &["train.beta1"],
    );
}

/// Copies a fixture model directory so that it can be damaged.
fn copy_fixture(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn bad_model_directories() {
    let d = tmpdir("cli_model");
    let text = d.join("t.txt");
    std::fs::write(
        &text,
        "some text to score, long enough to have a few tokens",
    )
    .unwrap();
    let score = |m: &Path| {
        vec![
            "score".to_string(),
            "--model".into(),
            s(m),
            "--file".into(),
            s(&text),
        ]
    };
    let run = |args: Vec<String>, needles: &[&str]| {
        fails(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            needles,
        )
    };

    // A weight whose shape disagrees with config.json: name the tensor and both shapes.
    let m1 = d.join("shape");
    copy_fixture("llama_tiny", &m1);
    let cfg = std::fs::read_to_string(m1.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 65");
    std::fs::write(m1.join("config.json"), cfg).unwrap();
    run(
        score(&m1),
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[64, 32]",
            "[65, 32]",
        ],
    );

    // A missing tensor.
    let m2 = d.join("missing");
    copy_fixture("gpt2_tiny", &m2);
    let cfg = std::fs::read_to_string(m2.join("config.json"))
        .unwrap()
        .replace("\"n_layer\": 2", "\"n_layer\": 3");
    std::fs::write(m2.join("config.json"), cfg).unwrap();
    run(score(&m2), &["missing tensor", "transformer.h.2"]);

    // A tokenizer with more ids than the embedding has rows.
    let m3 = d.join("vocab");
    copy_fixture("llama_tiny", &m3);
    let corpus = small_corpus(&d, 50_000);
    let texts = vec![std::fs::read_to_string(&corpus).unwrap()];
    let big = lmforge::tokenizer::train_bpe(texts.into_iter(), 500, 2).unwrap();
    big.save(&m3.join("tokenizer.json")).unwrap();
    run(score(&m3), &["tokenizer has 500 tokens", "320 rows"]);

    // Truncated weights, unsupported model type, missing directory.
    let m4 = d.join("truncated");
    copy_fixture("gpt2_tiny", &m4);
    let bytes = std::fs::read(m4.join("model.safetensors")).unwrap();
    std::fs::write(m4.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    run(
        score(&m4),
        &["model.safetensors", "not a valid safetensors"],
    );
    let m5 = d.join("type");
    copy_fixture("gpt2_tiny", &m5);
    let cfg = std::fs::read_to_string(m5.join("config.json"))
        .unwrap()
        .replace("\"gpt2\"", "\"bloom\"");
    std::fs::write(m5.join("config.json"), cfg).unwrap();
    run(score(&m5), &["model_type", "bloom"]);
    run(score(&d.join("nope")), &["nope", "not a model directory"]);
}

#[test]
fn generate_and_score_from_the_command_line() {
    let m = s(&fixture("llama_tiny"));
    let (code, out1, err) = lmforge(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "To be",
        "--max-new-tokens",
        "12",
        "--seed",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, out2, _) = lmforge(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "To be",
        "--max-new-tokens",
        "12",
        "--seed",
        "3",
    ]);
    assert_eq!(out1, out2);
    assert!(out1.starts_with("To be"));
    let d = tmpdir("cli_score");
    std::fs::write(
        d.join("t.txt"),
        "To be, or not to be, that is the question.",
    )
    .unwrap();
    let (code, out, err) = lmforge(&[
        "score",
        "--model",
        &m,
        "--file",
        &s(&d.join("t.txt")),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let nll = v["nll"].as_f64().unwrap();
    assert!((v["ppl"].as_f64().unwrap() - nll.exp()).abs() < 1e-6 * nll.exp());
    assert!(v["tokens"].as_u64().unwrap() > 5);
}

#[test]
fn tokenizer_train_command() {
    let d = tmpdir("cli_tok");
    let corpus = small_corpus(&d, 50_000);
    let out = d.join("tok.json");
    let (code, _, err) = lmforge(&[
        "tokenizer",
        "train",
        "--input",
        &s(&corpus),
        "--vocab-size",
        "500",
        "--out",
        &s(&out),
    ]);
    assert_eq!(code, 0, "{err}");
    let tok = lmforge::tokenizer::Tok::from_file(&out).unwrap();
    assert_eq!(tok.vocab_size(), 500);
    fails(
        &[
            "tokenizer",
            "train",
            "--input",
            &s(&corpus),
            "--vocab-size",
            "100",
            "--out",
            &s(&out),
            "--overwrite",
        ],
        &["at least 257"],
    );
}

#[test]
fn gguf_generate_chat_score_and_convert() {
    let g = s(&fixture("gguf").join("llama_q8_0.gguf"));
    let args = [
        "generate",
        "--model",
        &g,
        "--prompt",
        "hi",
        "--chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "5",
    ];
    let (code, out, err) = lmforge(&args);
    assert_eq!(code, 0, "{err}");
    // With --chat the prompt is not echoed; the answer is the model's only.
    assert!(!out.starts_with("hi"), "{out:?}");
    assert!(err.contains("tokens/s"), "{err}");
    assert_eq!(lmforge(&args).1, out, "greedy decoding is deterministic");

    let d = tmpdir("cli_convert");
    let (code, _, err) = lmforge(&["convert", &g, "--out", &s(&d.join("hf"))]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(
        d.join("t.txt"),
        "To be, or not to be, that is the question.",
    )
    .unwrap();
    let score = |m: &str| {
        let (code, out, err) = lmforge(&[
            "score",
            "--model",
            m,
            "--file",
            &s(&d.join("t.txt")),
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        out
    };
    assert_eq!(score(&g), score(&s(&d.join("hf"))));

    // A broken GGUF: an error naming the file, and a failed convert leaves the old output alone.
    let bad = d.join("bad.gguf");
    let bytes = std::fs::read(fixture("gguf").join("llama_q8_0.gguf")).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &[
            "convert",
            &s(&bad),
            "--out",
            &s(&d.join("hf")),
            "--overwrite",
        ],
        &["bad.gguf", "past the end"],
    );
    assert!(d.join("hf/model.safetensors").exists());
    fails(
        &[
            "generate",
            "--model",
            &s(&fixture("llama_tiny").join("config.json")),
            "--prompt",
            "x",
        ],
        &["config.json", "expected a model directory or a .gguf file"],
    );
    fails(
        &[
            "generate",
            "--model",
            &s(&fixture("gpt2_tiny")),
            "--prompt",
            "x",
            "--chat",
        ],
        &["has no chat template"],
    );
}
