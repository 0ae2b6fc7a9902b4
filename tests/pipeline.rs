//! End-to-end behaviour of the library: tokenizer, data pipeline, training (loss, exact
//! resume), generation and scoring.

mod common;
use candle_core::Device;
use common::*;
use lmforge::data::{collect_sources, tokenize_cached, Pieces};
use lmforge::generate::{generate, Sampling};
use lmforge::model::hf;
use lmforge::tokenizer::{train_bpe, Tok};
use lmforge::train::engine::{self, Control};
use lmforge::train::pretrain::{self, PretrainOptions};
use std::path::Path;

fn tiny_recipe(corpus: &Path, out: &Path, steps: u64) -> PretrainOptions {
    let text = format!(
        r#"
out = {out:?}
[model]
arch = "gpt2"
n_layer = 2
n_head = 2
d_model = 64
ctx = 64
[tokenizer]
vocab_size = 400
min_frequency = 2
[data]
paths = [{corpus:?}]
val_fraction = 0.05
seq_len = 64
eval_batches = 4
[train]
seed = 7
max_steps = {steps}
batch_size = 8
grad_accum = 2
lr = 3e-3
min_lr = 3e-4
warmup_steps = 10
weight_decay = 0.1
grad_clip = 1.0
eval_every = 0
checkpoint_every = 0
[sample]
sample_every = 0
sample_prompt = "HAMLET."
sample_tokens = 8
"#
    );
    toml::from_str(&text).unwrap()
}

fn train(o: PretrainOptions, resume: Option<&Path>, stop_at: Option<u64>) -> pretrain::Summary {
    let mut ctl = Control::new(Device::Cpu, true);
    ctl.resume = resume.map(|p| engine::open_resume(p, "pretrain").unwrap());
    ctl.stop_at = stop_at;
    pretrain::run(o, ctl).unwrap()
}

#[test]
fn tokenizer_matches_transformers_and_round_trips() {
    let tok = Tok::from_file(&fixture("tokenizer").join("tokenizer.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tokenizer").join("reference.json")).unwrap(),
    )
    .unwrap();
    let text = r["text"].as_str().unwrap();
    let want: Vec<u32> = r["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(ids, want);
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}

#[test]
fn trained_bpe_round_trips_any_text() {
    let texts = [
        "the quick brown fox\n\n".repeat(50),
        "jumps over the lazy dog. ".repeat(50),
    ];
    let tok = train_bpe(texts.into_iter(), 300, 2).unwrap();
    for s in [
        "Ünïcödé ✓ 🦀\ttabs\r\n",
        "   spaces  ",
        "<|endoftext|> special",
        "新しい",
    ] {
        let ids = tok.encode(s, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), s);
    }
    assert_eq!(
        tok.encode("<|endoftext|>", false).unwrap(),
        vec![tok.eos_id.unwrap()]
    );
}

#[test]
fn token_cache_streams_documents_with_eos_and_is_reused() {
    let d = tmpdir("cache");
    std::fs::write(d.join("a.txt"), "one two three").unwrap();
    std::fs::write(
        d.join("b.jsonl"),
        "{\"text\": \"four five\"}\n\n{\"text\": \"six\"}\n",
    )
    .unwrap();
    let tok = train_bpe(
        ["one two three four five six".to_string()].into_iter(),
        260,
        1,
    )
    .unwrap();
    let sources = collect_sources(std::slice::from_ref(&d)).unwrap();
    let t = tokenize_cached(&sources, &tok, &d.join("cache"), false).unwrap();
    let ids = t.slice(0, t.len());
    let eos = tok.eos_id.unwrap();
    assert_eq!(
        ids.iter().filter(|&&i| i == eos).count(),
        3,
        "one EOS per document"
    );
    let mut expect = tok.encode("one two three", false).unwrap();
    expect.push(eos);
    expect.extend(tok.encode("four five", false).unwrap());
    expect.push(eos);
    expect.extend(tok.encode("six", false).unwrap());
    expect.push(eos);
    assert_eq!(ids, expect);
    let n_files = std::fs::read_dir(d.join("cache")).unwrap().count();
    tokenize_cached(&sources, &tok, &d.join("cache"), false).unwrap();
    assert_eq!(
        std::fs::read_dir(d.join("cache")).unwrap().count(),
        n_files,
        "second call reuses the cache"
    );
}

#[test]
fn long_files_are_cut_at_line_breaks_without_losing_text() {
    let d = tmpdir("pieces");
    let line = "Ünïcödé line of text that repeats\n";
    let text = line.repeat((3 << 20) / line.len());
    std::fs::write(d.join("big.txt"), &text).unwrap();
    let pieces: Vec<_> = Pieces::new(collect_sources(&[d.join("big.txt")]).unwrap(), false)
        .map(|p| p.unwrap())
        .collect();
    assert!(pieces.len() >= 3);
    assert!(pieces[..pieces.len() - 1]
        .iter()
        .all(|p| !p.last && p.text.ends_with('\n')));
    assert!(pieces.last().unwrap().last);
    assert_eq!(
        pieces.iter().map(|p| p.text.as_str()).collect::<String>(),
        text
    );
}

#[test]
fn training_beats_the_unigram_entropy_and_resume_is_exact() {
    let d = tmpdir("train");
    let corpus = small_corpus(&d, 120_000);
    // Uninterrupted run.
    let full = train(tiny_recipe(&corpus, &d.join("full"), 60), None, None);
    assert_eq!(full.outcome.steps, 60);
    // Interrupted at step 25, then resumed from the run directory.
    let first = train(tiny_recipe(&corpus, &d.join("split"), 60), None, Some(25));
    assert_eq!(first.outcome.steps, 25);
    assert!(first.outcome.stopped && first.outcome.losses.len() == 25);
    let second = train(
        tiny_recipe(&corpus, &d.join("split"), 60),
        Some(&d.join("split")),
        None,
    );
    let resumed: Vec<(u64, f32)> = first
        .outcome
        .losses
        .iter()
        .chain(&second.outcome.losses)
        .copied()
        .collect();
    assert_eq!(
        resumed, full.outcome.losses,
        "losses of the resumed run must equal the uninterrupted run's"
    );

    // Unigram entropy of the training tokens: a model that learned nothing beyond token
    // frequencies scores this; a working LM must go below it.
    let tok = Tok::from_file(&d.join("full/tokenizer.json")).unwrap();
    let tokens = tokenize_cached(
        &collect_sources(&[corpus]).unwrap(),
        &tok,
        &d.join("full/data"),
        false,
    )
    .unwrap();
    let mut counts = vec![0f64; tok.vocab_size()];
    for i in 0..tokens.len() {
        counts[tokens.get(i) as usize] += 1.0;
    }
    let n = tokens.len() as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0.0)
        .map(|&c| -(c / n) * (c / n).ln())
        .sum();
    let val = full.val_loss.unwrap();
    let first_loss = full.outcome.losses[0].1 as f64;
    println!("unigram entropy {entropy:.3} nats, first loss {first_loss:.3}, final validation loss {val:.3}");
    assert!(
        val < entropy,
        "validation loss {val} did not beat unigram entropy {entropy}"
    );

    // The final model is an HF directory that loads and scores.
    let m = hf::load_dir(&d.join("full/model"), &Device::Cpu, &|_| true).unwrap();
    let ids = m
        .tok
        .encode("HAMLET. To be, or not to be, that is the question.", true)
        .unwrap();
    let s = lmforge::eval::score::score_ids(&m.model, &ids, 64, 32).unwrap();
    assert_eq!(s.tokens, ids.len() - 1);
    assert!(s.nll.is_finite() && s.nll < entropy + 1.0);
}

#[test]
fn windowed_scoring_covers_every_token_once() {
    let m = hf::load_dir(&fixture("llama_tiny"), &Device::Cpu, &|_| true).unwrap();
    let ids: Vec<u32> = (0..150u32).map(|i| (i * 37 + 11) % 320).collect();
    let one = lmforge::eval::score::score_ids(&m.model, &ids[..60], 64, 64).unwrap();
    assert_eq!(one.tokens, 59);
    for (w, s) in [(64, 32), (64, 64), (40, 13)] {
        let r = lmforge::eval::score::score_ids(&m.model, &ids, w, s).unwrap();
        assert_eq!(r.tokens, 149, "window {w} stride {s}");
    }
    // With one window covering everything, the windowed score equals a direct computation.
    let direct = m
        .model
        .token_logprobs(
            &candle_core::Tensor::new(&ids[..60], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            Default::default(),
        )
        .unwrap();
    let mean = -direct.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((mean - one.nll).abs() < 1e-5);
}

#[test]
fn seeded_generation_is_reproducible() {
    let m = hf::load_dir(&fixture("llama_tiny"), &Device::Cpu, &|_| true).unwrap();
    let s = |seed| Sampling {
        max_new_tokens: 20,
        temperature: 1.0,
        top_k: Some(50),
        top_p: Some(0.95),
        seed,
    };
    let run = |seed| {
        generate(&m.model, &[1, 2, 3], &s(seed), &[], |_| Ok(()))
            .unwrap()
            .0
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
    let greedy = Sampling {
        temperature: 0.0,
        ..s(0)
    };
    let g1 = generate(&m.model, &[1, 2, 3], &greedy, &[], |_| Ok(()))
        .unwrap()
        .0;
    let g2 = generate(
        &m.model,
        &[1, 2, 3],
        &Sampling {
            seed: 9,
            ..greedy.clone()
        },
        &[],
        |_| Ok(()),
    )
    .unwrap()
    .0;
    assert_eq!(g1, g2, "greedy ignores the seed");
    // Stops at EOS: make the first greedy token the EOS.
    let (out, stop) = generate(&m.model, &[1, 2, 3], &greedy, &[g1[0]], |_| Ok(())).unwrap();
    assert!(out.is_empty());
    assert_eq!(stop, lmforge::generate::Stop::Eos);
}

#[test]
fn failed_directory_write_keeps_the_old_one() {
    let d = tmpdir("atomic");
    let dest = d.join("ckpt");
    lmforge::fsutil::write_dir(&dest, |p| Ok(std::fs::write(p.join("f"), "good")?)).unwrap();
    let err = lmforge::fsutil::write_dir(&dest, |p| {
        std::fs::write(p.join("f"), "half")?;
        anyhow::bail!("disk full")
    });
    assert!(err.is_err());
    assert_eq!(std::fs::read_to_string(dest.join("f")).unwrap(), "good");
    assert_eq!(
        std::fs::read_dir(&d).unwrap().count(),
        1,
        "no temporary left behind"
    );
}
