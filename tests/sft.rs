//! SFT data and loss: which tokens are trained (prompt/completion, multi-turn chat, merges across
//! the prompt/answer boundary, truncation), bad lines named by file:line, padded batches giving
//! the same loss as examples one by one, and the `sft` / `merge` / `generate --adapter` commands.

mod common;
use candle_core::{Device, Tensor};
use common::*;
use lmforge::chat::{ChatTemplate, Message};
use lmforge::data::sft::build_batch;
use lmforge::data::sft::{
    parse_line, read_jsonl, tokenize_all, Example, Formatter, Outcome, Tokenized, DEFAULT_TEMPLATE,
};
use lmforge::model::hf;
use lmforge::tokenizer::Tok;
use lmforge::train::sft::masked_loss;
use std::process::Command;

fn tok() -> Tok {
    Tok::from_file(&fixture("tokenizer/tokenizer.json")).unwrap()
}

fn chatml() -> ChatTemplate {
    ChatTemplate::new(DEFAULT_TEMPLATE.into(), None, Some("<|im_end|>".into()))
}

/// The text of the trained tokens, in order.
fn trained_text(tok: &Tok, t: &Tokenized) -> String {
    let ids: Vec<u32> = t
        .ids
        .iter()
        .zip(&t.train)
        .filter(|x| *x.1)
        .map(|x| *x.0)
        .collect();
    tok.decode(&ids, false).unwrap()
}

fn kept(o: Outcome) -> Tokenized {
    match o {
        Outcome::Kept(t) => t,
        other => panic!("expected Kept, got {other:?}"),
    }
}

#[test]
fn prompt_completion_trains_the_completion_and_eos_only() {
    let tok = tok();
    let eos = tok.eos_id;
    let f = Formatter {
        tok: &tok,
        template: None,
        train_on_prompt: false,
        eos,
    };
    let ex = parse_line(r#"{"prompt": "Question: who is Hamlet?\nAnswer:", "completion": " the prince of Denmark"}"#, "x:1").unwrap();
    let t = kept(f.tokenize(&ex, 1000, "x:1").unwrap());
    assert_eq!(
        trained_text(&tok, &t),
        " the prince of Denmark<|endoftext|>"
    );
    assert_eq!(t.ids.last(), eos.as_ref());
    // Trained tokens form one suffix: no prompt token is trained.
    let first = t.train.iter().position(|&b| b).unwrap();
    assert!(t.train[first..].iter().all(|&b| b));
    // With --train-on-prompt every token is a target.
    let f2 = Formatter {
        train_on_prompt: true,
        ..f
    };
    let all = kept(f2.tokenize(&ex, 1000, "x:1").unwrap());
    assert!(all.train.iter().all(|&b| b));
}

#[test]
fn a_token_merged_across_the_boundary_belongs_to_where_it_starts() {
    // " the" is one token: cut as "th" | "e", BPE merges across the cut, so searching for the
    // completion's own tokens would fail; offsets do not. A prompt ending in a space before a
    // one-word answer is the common case of the same thing.
    let tok = tok();
    let f = Formatter {
        tok: &tok,
        template: None,
        train_on_prompt: false,
        eos: None,
    };
    let ex = Example::PromptCompletion {
        prompt: "Lord th".into(),
        completion: "e king".into(),
    };
    let t = kept(f.tokenize(&ex, 1000, "x").unwrap());
    let (ids, offs) = tok.encode_with_offsets("Lord the king", true).unwrap();
    assert_eq!(ids, t.ids, "the example is tokenized as one text");
    for (o, tr) in offs.iter().zip(&t.train) {
        let (s, e) = o.unwrap();
        assert_eq!(*tr, e > "Lord th".len(), "token at bytes {s}..{e}");
    }
    // The merged token " the" is trained: the answer cannot be produced without it.
    let the = tok.encode(" the", false).unwrap();
    assert_eq!(the.len(), 1);
    let i = t.ids.iter().position(|&x| x == the[0]).unwrap();
    assert!(t.train[i]);
    assert_ne!(
        tok.encode("e king", false).unwrap(),
        t.ids[t.ids.len() - t.n_targets()..].to_vec(),
        "this case must actually merge across the boundary"
    );
}

#[test]
fn multi_turn_chat_trains_every_assistant_turn_and_nothing_else() {
    let tok = tok();
    let tpl = chatml();
    let f = Formatter {
        tok: &tok,
        template: Some(&tpl),
        train_on_prompt: false,
        eos: tok.eos_id,
    };
    let ex = Example::Chat(vec![
        Message::new("system", "Speak as a king."),
        Message::new("user", "Who art thou?"),
        Message::new("assistant", "The king of Denmark."),
        Message::new("user", "And thy son?"),
        Message::new("assistant", "He is mad."),
    ]);
    let t = kept(f.tokenize(&ex, 10_000, "x").unwrap());
    assert_eq!(
        trained_text(&tok, &t),
        "The king of Denmark.<|im_end|>\nHe is mad.<|im_end|>\n"
    );
    // The text is the template's, no EOS appended, no special tokens added.
    let full = tpl
        .render(
            match &ex {
                Example::Chat(m) => m,
                _ => unreachable!(),
            },
            false,
        )
        .unwrap();
    assert_eq!(tok.decode(&t.ids, false).unwrap(), full);
}

#[test]
fn truncation_keeps_what_fits_and_drops_examples_with_nothing_left() {
    let tok = tok();
    let f = Formatter {
        tok: &tok,
        template: None,
        train_on_prompt: false,
        eos: tok.eos_id,
    };
    let long_prompt = "word ".repeat(40);
    let d = tmpdir("sft_trunc");
    let p = d.join("data.jsonl");
    std::fs::write(
        &p,
        format!(
            "{}\n\n{}\n{}\n",
            r#"{"prompt": "Hi", "completion": " there, my lord and king of all"}"#,
            serde_json::json!({"prompt": long_prompt, "completion": " yes"}),
            r#"{"text": "a short text"}"#
        ),
    )
    .unwrap();
    let exs = read_jsonl(&p).unwrap();
    assert_eq!(exs[1].at, format!("{}:3", p.display()));
    match f.tokenize(&exs[0].example, 6, "x").unwrap() {
        Outcome::Truncated(t) => assert_eq!((t.ids.len(), t.train[0]), (6, false)),
        o => panic!("{o:?}"),
    }
    let mut warned = Vec::new();
    let (data, counts) = tokenize_all(&f, &exs, 12, |w| warned.push(w.to_string())).unwrap();
    assert_eq!((counts.kept, counts.truncated, counts.dropped), (1, 1, 1));
    assert_eq!(data.len(), 2);
    assert!(warned[0].contains(":3: skipped"), "{warned:?}");
    // Everything cut away: an error, not a silent empty run.
    assert!(tokenize_all(&f, &exs[1..2], 12, |_| {}).is_err());
}

#[test]
fn bad_lines_are_named() {
    let cases = [
        (
            r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
            "unknown role \"wizard\"",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}"#,
            "empty assistant turn",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}]}"#,
            "no assistant turn",
        ),
        (r#"{"prompt": "x"}"#, "expected"),
        (r#"{"prompt": 3, "completion": "y"}"#, "must be a string"),
        ("not json", "invalid JSON"),
    ];
    for (line, want) in cases {
        let e = format!("{:#}", parse_line(line, "f.jsonl:7").unwrap_err());
        assert!(e.contains("f.jsonl:7") && e.contains(want), "{line}: {e}");
    }
}

fn examples(m: &hf::LoadedModel) -> Vec<Tokenized> {
    let f = Formatter {
        tok: &m.tok,
        template: None,
        train_on_prompt: false,
        eos: m.tok.eos_id,
    };
    [
        ("To be", " or not"),
        ("O", " Romeo, Romeo, wherefore"),
        ("A horse", "!"),
    ]
    .iter()
    .map(|(p, c)| {
        let ex = Example::PromptCompletion {
            prompt: (*p).into(),
            completion: (*c).into(),
        };
        kept(f.tokenize(&ex, 64, "x").unwrap())
    })
    .collect()
}

/// Summed NLL of `rows` and the gradients of it divided by `total`.
fn masked_step(
    m: &hf::LoadedModel,
    rows: &[Vec<&Tokenized>],
    total: usize,
) -> (f64, lmforge::model::Grads) {
    let nll = masked_loss(&m.model, &build_batch(rows, 0)).unwrap();
    let sum = nll.to_scalar::<f32>().unwrap() as f64;
    let g = m
        .store
        .grads(&(nll / total as f64).unwrap().backward().unwrap());
    (sum, g)
}

/// Summed NLL and gradients of `rows`, compared with each example alone.
fn same_as_one_by_one(m: &hf::LoadedModel, rows: &[Vec<&Tokenized>]) {
    let all: Vec<&Tokenized> = rows.iter().flatten().copied().collect();
    let total: usize = all.iter().map(|t| t.n_targets()).sum();
    let (batch_sum, g) = masked_step(m, rows, total);
    let mut one_by_one = 0f64;
    let mut acc: Option<lmforge::model::Grads> = None;
    for e in &all {
        let (s, g1) = masked_step(m, &[vec![*e]], total);
        one_by_one += s;
        match acc.as_mut() {
            Some(a) => a.accumulate(g1).unwrap(),
            None => acc = Some(g1),
        }
    }
    assert!(
        (batch_sum - one_by_one).abs() < 1e-4 * one_by_one,
        "{batch_sum} vs {one_by_one}"
    );
    for ((a, b), p) in g.0.iter().zip(&acc.unwrap().0).zip(m.store.params()) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        let d = max_abs_diff(a, b);
        assert!(
            d <= 1e-4 * max_abs(b).max(1e-3),
            "gradient of {} differs by {d}",
            p.name
        );
    }
}

#[test]
fn padded_and_packed_batches_equal_examples_one_by_one() {
    for base in ["llama_tiny", "gpt2_tiny"] {
        let m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| false).unwrap();
        let exs = examples(&m);
        // Right-padded: one example per row.
        same_as_one_by_one(&m, &exs.iter().map(|e| vec![e]).collect::<Vec<_>>());
        // Packed: all three in one row, and two rows of unequal fill.
        same_as_one_by_one(&m, &[exs.iter().collect()]);
        same_as_one_by_one(&m, &[vec![&exs[0], &exs[2]], vec![&exs[1]]]);
    }
}

#[test]
fn packed_logits_equal_separate_logits_fused_and_composite() {
    use lmforge::model::{ForwardOpts, Packing};
    for base in ["llama_tiny", "gpt2_tiny"] {
        let m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
        let exs = examples(&m);
        let row: Vec<u32> = exs.iter().flat_map(|e| e.ids.clone()).collect();
        let t = row.len() + 3; // padding after the last example
        let mut ids = row.clone();
        ids.extend([0, 0, 0]);
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let p = Packing::new(
            &[exs.iter().map(|e| e.ids.len()).collect()],
            t,
            &Device::Cpu,
        )
        .unwrap();
        let ones = Tensor::ones((1, t), candle_core::DType::F32, &Device::Cpu).unwrap();
        let run = |padding: Option<&Tensor>| {
            let opts = ForwardOpts {
                packing: Some(&p),
                key_padding: padding,
                ..Default::default()
            };
            let h = m
                .model
                .hidden_states(&m.model.embed(&x).unwrap(), opts)
                .unwrap();
            m.model.logits(&h).unwrap()
        };
        // A key-padding mask routes attention through the composite path.
        for (what, packed) in [("fused", run(None)), ("composite", run(Some(&ones)))] {
            let mut at = 0;
            for e in &exs {
                let alone = m
                    .model
                    .forward(
                        &Tensor::new(e.ids.as_slice(), &Device::Cpu)
                            .unwrap()
                            .unsqueeze(0)
                            .unwrap(),
                    )
                    .unwrap();
                let part = packed.narrow(1, at, e.ids.len()).unwrap();
                let d = max_abs_diff(&part, &alone);
                assert!(d < 1e-5, "{base} {what}: packed logits differ by {d}");
                at += e.ids.len();
            }
        }
    }
}

fn lmforge(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn sft_lora_merge_and_generate_commands() {
    let d = tmpdir("sft_cli");
    let data = d.join("train.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"Q: capital of Denmark?\\nA:\", \"completion\": \" Copenhagen\"}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hail\"}]}\n",
    )
    .unwrap();
    let forget = small_corpus(&d, 3000);
    let base = fixture("llama_tiny");
    let (b, out) = (base.to_str().unwrap(), d.join("run"));
    let o = lmforge(&[
        "sft",
        "--model",
        b,
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--peft",
        "lora",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--target-modules",
        "q_proj,v_proj",
        "--max-steps",
        "8",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--max-len",
        "64",
        "--forgetting-eval",
        forget.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("trainable parameters: 896 of"), "{err}");
    assert!(err.contains("forgetting: perplexity"), "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"ppl_before\"") && metrics.contains("\"summary\":true"));
    let adapter = out.join("adapter");
    assert!(adapter.join("adapter_config.json").is_file());
    assert!(adapter.join("chat_template.jinja").is_file());
    // merge, then generate from the merged model and from base + adapter: same greedy text.
    let merged = d.join("merged");
    let o = lmforge(&[
        "merge",
        "--model",
        b,
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--prompt",
            "Q: capital",
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
        ];
        a.extend_from_slice(extra);
        let o = lmforge(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let with_adapter = gen(&["--model", b, "--adapter", adapter.to_str().unwrap()]);
    assert_eq!(with_adapter, gen(&["--model", merged.to_str().unwrap()]));
    assert_ne!(
        with_adapter,
        gen(&["--model", b]),
        "the adapter should change greedy output"
    );
    // A bad line stops the run with file:line and writes nothing.
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let o = lmforge(&[
        "sft",
        "--model",
        b,
        "--data",
        data.to_str().unwrap(),
        "--out",
        d.join("bad").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("train.jsonl:1"));
    assert!(!d.join("bad/model").exists());
}

#[test]
fn packing_rows_hold_every_example_once_within_the_length() {
    use lmforge::data::sft::rows_of;
    let m = hf::load_dir(&fixture("llama_tiny"), &Device::Cpu, &|_| true).unwrap();
    let mut exs = examples(&m);
    exs.extend(examples(&m));
    exs.extend(examples(&m));
    let max_len = 40;
    let rows = rows_of(&exs, true, max_len, 5);
    assert!(rows.len() < exs.len(), "nothing was packed");
    let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
    seen.sort();
    assert_eq!(seen, (0..exs.len()).collect::<Vec<_>>());
    for r in &rows {
        assert!(r.iter().map(|&i| exs[i].ids.len() - 1).sum::<usize>() < max_len);
    }
    assert_eq!(rows_of(&exs, false, max_len, 5).len(), exs.len());
}
