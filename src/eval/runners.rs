//! The scorers of each task kind (lm-evaluation-harness's semantics):
//!
//! - multiple choice: context = few-shot block + `doc_to_text`, continuation = delimiter +
//!   choice; trailing whitespace of the context moves to the continuation, and the
//!   continuation's tokens are those of tokenize(context + continuation) after
//!   tokenize(context)'s length. `acc` = argmax Σ log p; `acc_norm` divides by the choice's
//!   length in characters, `acc_bytes` in UTF-8 bytes; `exact_match` = the gold choice is the
//!   greedy continuation;
//! - generative: greedy (or sampled) decoding until a stop string, EOS or `max_gen_toks`, the
//!   text cut at the first stop string, scored against the references;
//! - rolling: whole documents' log-likelihood (`score::score_rolling`), word perplexity, byte
//!   perplexity and bits per byte over the corpus (sums before ratios);
//! - classify: a trained head's argmax label, accuracy and macro-F1.

use super::harness::{context, mean_stderr, Env, TaskResult};
use super::loglik::{loglikelihoods, Opts, Request};
use super::metrics;
use super::task::{Kind, Metric, Target, Task};
use crate::generate::{generate_chunked_until, Sampling};
use crate::model::hf::LoadedModel;
use anyhow::{bail, Context, Result};
use serde_json::json;

/// lm-eval's `prefix_token_id`: what an empty context becomes.
pub fn prefix_token(m: &LoadedModel) -> Result<u32> {
    m.tok
        .bos_id
        .or(m.tok.eos_id)
        .or_else(|| m.stop_ids().first().copied())
        .context("the tokenizer has neither a BOS nor an EOS token to start an empty context")
}

/// lm-eval's `tok_encode`: the tokenizer's special tokens are added unless the text already
/// starts with the prefix token's text (a rendered chat template carries its own BOS).
pub fn encode(m: &LoadedModel, text: &str) -> Result<Vec<u32>> {
    let has_bos = prefix_token(m)
        .ok()
        .and_then(|b| m.tok.decode(&[b], false).ok())
        .is_some_and(|b| !b.is_empty() && text.starts_with(&b));
    m.tok.encode(text, !has_bos)
}

/// lm-eval's `_encode_pair`: (context tokens, continuation tokens).
pub fn encode_pair(
    m: &LoadedModel,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    if context.is_empty() {
        return empty_context(m, continuation);
    }
    let trimmed = context.trim_end_matches(crate::eval::bleu::py_space);
    let (ctx, cont) = (
        trimmed,
        format!("{}{continuation}", &context[trimmed.len()..]),
    );
    if ctx.is_empty() {
        return empty_context(m, &cont);
    }
    let whole = encode(m, &format!("{ctx}{cont}"))?;
    let c = encode(m, ctx)?;
    let n = c.len().min(whole.len());
    Ok((c, whole[n..].to_vec()))
}

/// lm-eval's empty context: the continuation without special tokens after the prefix token —
/// or, when the continuation starts with that token itself, its first token as the context.
fn empty_context(m: &LoadedModel, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let p = prefix_token(m)?;
    let cont = m.tok.encode(continuation, false)?;
    Ok(match cont.split_first() {
        Some((&first, rest)) if first == p => (vec![first], rest.to_vec()),
        _ => (vec![p], cont),
    })
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn opts(env: &Env) -> Opts {
    Opts {
        batch_tokens: env.args.batch_tokens,
        ..Opts::default()
    }
}

/// numpy's `argmax`: the first of equal maxima.
fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (j, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = j;
        }
    }
    best
}

fn means(cols: Vec<(Metric, Vec<f64>)>) -> Vec<(String, f64, Option<f64>)> {
    cols.into_iter()
        .map(|(m, v)| {
            let (mean, se) = mean_stderr(&v);
            (m.name().to_string(), mean, se)
        })
        .collect()
}

/// A multiple-choice item as scored: (prompt, choices, gold index).
type McItem = (String, Vec<String>, usize);
/// A generative item: (prompt, references).
type GenItem = (String, Vec<String>);

pub fn multiple_choice(env: &Env, task: &Task, k: usize) -> Result<TaskResult> {
    let m = env.decoder(task)?;
    let n = env.n_items(task);
    let chat = env.chat.as_ref();
    // In chat mode the answer follows the assistant header directly.
    let delim = if chat.is_some() {
        ""
    } else {
        task.target_delimiter.as_str()
    };
    let mut reqs = Vec::with_capacity(n);
    let mut meta = Vec::with_capacity(n);
    for i in 0..n {
        let prep = || -> Result<(Request, McItem)> {
            let item = &task.items[i];
            let (prefix, ctx) = context(task, i, k, env.args.seed, chat)?;
            let choices = task.choices(item)?;
            let gold = match task.target(item)? {
                Target::Index(g) if g < choices.len() => g,
                t => bail!("target {t:?} is not one of the {} choices", choices.len()),
            };
            let mut context_ids = Vec::new();
            let mut conts = Vec::with_capacity(choices.len());
            for c in &choices {
                let (ci, co) = encode_pair(m, &ctx, &format!("{delim}{c}"))?;
                if co.is_empty() {
                    bail!("choice {c:?} tokenizes to nothing");
                }
                context_ids = ci;
                conts.push(co);
            }
            let prefix_len = if prefix.is_empty() {
                0
            } else {
                common_prefix(&encode(m, &prefix)?, &context_ids)
            };
            let req = Request {
                context: context_ids,
                continuations: conts,
                prefix_len,
            };
            Ok((req, (ctx, choices, gold)))
        };
        let (r, x) = prep().with_context(|| task.at(i))?;
        reqs.push(r);
        meta.push(x);
    }
    let (scores, stats) = loglikelihoods(&m.model, &reqs, &opts(env))
        .with_context(|| format!("task {}", task.name))?;
    let mut cols: Vec<(Metric, Vec<f64>)> = task.metrics.iter().map(|&x| (x, Vec::new())).collect();
    let mut samples = Vec::with_capacity(n);
    for (i, ((ctx, choices, gold), sc)) in meta.into_iter().zip(&scores).enumerate() {
        let lls: Vec<f64> = sc.iter().map(|s| s.logp).collect();
        let by = |len: &dyn Fn(&str) -> usize| -> usize {
            argmax(
                &lls.iter()
                    .zip(&choices)
                    .map(|(l, c)| l / len(c).max(1) as f64)
                    .collect::<Vec<_>>(),
            )
        };
        let pred = argmax(&lls);
        let pred_norm = by(&|c: &str| c.chars().count());
        let pred_bytes = by(&|c: &str| c.len());
        let mut rec = json!({"doc_id": i, "prompt": ctx, "choices": choices, "target": gold,
            "logprobs": lls, "greedy": sc.iter().map(|s| s.greedy).collect::<Vec<_>>(),
            "pred": pred});
        for (metric, v) in cols.iter_mut() {
            let x = match metric {
                Metric::Acc => (pred == gold) as u8 as f64,
                Metric::AccNorm => (pred_norm == gold) as u8 as f64,
                Metric::AccBytes => (pred_bytes == gold) as u8 as f64,
                Metric::ExactMatch => sc[gold].greedy as u8 as f64,
                other => bail!("{}: metric {} does not apply", task.file, other.name()),
            };
            rec[metric.name()] = json!(x);
            v.push(x);
        }
        samples.push(rec);
    }
    Ok(TaskResult {
        task: task.name.clone(),
        kind: Kind::MultipleChoice,
        shots: k,
        n,
        metrics: means(cols),
        seconds: 0.0,
        extra: json!({"tokens": stats.tokens, "truncated_contexts": stats.truncated}),
        samples,
    })
}

/// `text` cut before the first of `until` (lm-eval's `until`).
pub fn cut_at_stop<'a>(text: &'a str, until: &[String]) -> &'a str {
    let end = until
        .iter()
        .filter(|u| !u.is_empty())
        .filter_map(|u| text.find(u.as_str()))
        .min()
        .unwrap_or(text.len());
    &text[..end]
}

fn exact(pred: &str, refs: &[String], task: &Task) -> f64 {
    let norm = |s: &str| -> String {
        let mut s = s.trim().to_string();
        if task.ignore_case {
            s = s.to_lowercase();
        }
        if task.ignore_punctuation {
            s.retain(|c| !c.is_ascii_punctuation());
        }
        s
    };
    let p = norm(pred);
    refs.iter().any(|r| norm(r) == p) as u8 as f64
}

pub fn generate(env: &Env, task: &Task, k: usize) -> Result<TaskResult> {
    let m = env.decoder(task)?;
    let n = env.n_items(task);
    let ctx_len = m.model.context();
    if task.max_gen_toks >= ctx_len {
        bail!(
            "{}: max_gen_toks {} leaves no room in the model's context of {ctx_len}",
            task.file,
            task.max_gen_toks
        );
    }
    let mut prompts = Vec::with_capacity(n);
    let mut meta = Vec::with_capacity(n);
    for i in 0..n {
        let prep = || -> Result<(Vec<u32>, GenItem)> {
            let (_, ctx) = context(task, i, k, env.args.seed, env.chat.as_ref())?;
            let mut ids = encode(m, &ctx)?;
            // lm-eval: the context is cut from the left to leave room for the generation.
            let room = ctx_len - task.max_gen_toks;
            if ids.len() > room {
                ids.drain(..ids.len() - room);
            }
            if ids.is_empty() {
                ids.push(prefix_token(m)?);
            }
            match task.target(&task.items[i])? {
                Target::Texts(refs) if !refs.is_empty() => Ok((ids, (ctx, refs))),
                Target::Texts(_) => bail!("key `doc_to_target`: the item has no reference"),
                Target::Index(_) => bail!("a generative task's target must be text"),
            }
        };
        let (ids, x) = prep().with_context(|| task.at(i))?;
        prompts.push(ids);
        meta.push(x);
    }
    let s = Sampling {
        max_new_tokens: task.max_gen_toks,
        temperature: task.temperature,
        top_k: task.top_k,
        top_p: task.top_p,
        seed: env.args.seed,
    };
    let eos = m.stop_ids();
    let tok = &m.tok;
    // Stop strings are checked as tokens arrive, so a row leaves the batch when it is done.
    // A stop string first appears when the newest token completes it, so only the tail needs
    // decoding each step (every token is at least one character; the margin covers skipped
    // special tokens). Missing one would only delay the stop: the text is cut at the end.
    let tail = task
        .until
        .iter()
        .map(|u| u.chars().count())
        .max()
        .unwrap_or(0)
        + 8;
    let until = |_: usize, t: &[u32]| -> bool {
        !task.until.is_empty()
            && tok
                .decode(&t[t.len().saturating_sub(tail)..], true)
                .is_ok_and(|s| {
                    task.until
                        .iter()
                        .any(|u| !u.is_empty() && s.contains(u.as_str()))
                })
    };
    let outs = generate_chunked_until(&m.model, &prompts, &s, &eos, env.args.gen_batch, &until)?;
    let mut preds = Vec::with_capacity(n);
    let mut samples = Vec::with_capacity(n);
    for (i, (o, (ctx, refs))) in outs.iter().zip(&meta).enumerate() {
        let text = m.tok.decode(o.text_tokens(), true)?;
        let pred = cut_at_stop(&text, &task.until).to_string();
        samples.push(
            json!({"doc_id": i, "prompt": ctx, "references": refs, "generation": pred,
            "stop": o.stop.name()}),
        );
        preds.push(pred);
    }
    let refs: Vec<Vec<String>> = meta.into_iter().map(|(_, r)| r).collect();
    let mut metrics = Vec::new();
    let mut extra = json!({});
    let seed = env.args.seed;
    for &metric in &task.metrics {
        let per_item: Option<Vec<f64>> = match metric {
            Metric::ExactMatch => Some(
                preds
                    .iter()
                    .zip(&refs)
                    .map(|(p, r)| exact(p, r, task))
                    .collect(),
            ),
            Metric::SquadEm => Some(
                preds
                    .iter()
                    .zip(&refs)
                    .map(|(p, r)| metrics::exact_match(p, r))
                    .collect(),
            ),
            Metric::SquadF1 => Some(
                preds
                    .iter()
                    .zip(&refs)
                    .map(|(p, r)| metrics::squad_f1(p, r))
                    .collect(),
            ),
            Metric::RougeL => Some(
                preds
                    .iter()
                    .zip(&refs)
                    .map(|(p, r)| super::rouge::rouge_l_best(r, p, task.rouge_stemmer))
                    .collect(),
            ),
            _ => None,
        };
        let (v, se) = match (&per_item, metric) {
            (Some(xs), _) => {
                for (smp, x) in samples.iter_mut().zip(xs) {
                    smp[metric.name()] = json!(x);
                }
                mean_stderr(xs)
            }
            (None, Metric::Bleu) => {
                extra["bleu_signature"] = json!(super::bleu::Bleu::signature(&refs));
                let f = super::bleu::corpus_bleu_score;
                (f(&preds, &refs), bootstrap_se(&preds, &refs, seed, f))
            }
            (None, Metric::Chrf) => {
                let f = super::bleu::corpus_chrf;
                (f(&preds, &refs), bootstrap_se(&preds, &refs, seed, f))
            }
            (None, other) => bail!("{}: metric {} does not apply", task.file, other.name()),
        };
        metrics.push((metric.name().to_string(), v, se));
    }
    Ok(TaskResult {
        task: task.name.clone(),
        kind: Kind::Generate,
        shots: k,
        n,
        metrics,
        seconds: 0.0,
        extra,
        samples,
    })
}

/// Standard error of a corpus-level score by bootstrap (100 resamples of the items, as lm-eval
/// does for BLEU).
fn bootstrap_se(
    preds: &[String],
    refs: &[Vec<String>],
    seed: u64,
    score: fn(&[String], &[Vec<String>]) -> f64,
) -> Option<f64> {
    if preds.len() < 2 {
        return None;
    }
    let xs = super::harness::bootstrap(preds.len(), (seed, 0xB007), 100, |idx| {
        let p: Vec<String> = idx.iter().map(|&i| preds[i].clone()).collect();
        let r: Vec<Vec<String>> = idx.iter().map(|&i| refs[i].clone()).collect();
        score(&p, &r)
    });
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    Some((xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt())
}

/// Python's `len(re.split(r"\s+", text))`, lm-eval's word count.
pub fn count_words(text: &str) -> usize {
    let mut n = 1;
    let mut in_space = false;
    for c in text.chars() {
        let sp = crate::eval::bleu::py_space(c);
        if sp && !in_space {
            n += 1;
        }
        in_space = sp;
    }
    n
}

pub fn rolling(env: &Env, task: &Task) -> Result<TaskResult> {
    let m = env.decoder(task)?;
    let n = env.n_items(task);
    let prefix = prefix_token(m)?;
    let (mut ll, mut words, mut bytes, mut tokens) = (0f64, 0usize, 0usize, 0usize);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let doc = || -> Result<(String, crate::eval::score::Score)> {
            let text = task.target_text(&task.items[i])?;
            let ids = encode(m, &text)?;
            if ids.is_empty() {
                bail!("the document tokenizes to nothing");
            }
            Ok((text, super::score::score_rolling(&m.model, &ids, prefix)?))
        };
        let (text, s) = doc().with_context(|| task.at(i))?;
        let doc_ll = -s.nll * s.tokens as f64;
        let (w, b) = (count_words(&text), text.len());
        ll += doc_ll;
        words += w;
        bytes += b;
        tokens += s.tokens;
        samples.push(json!({"doc_id": i, "loglikelihood": doc_ll, "tokens": s.tokens, "words": w, "bytes": b}));
    }
    let metrics = task
        .metrics
        .iter()
        .map(|&mt| {
            let v = match mt {
                Metric::WordPerplexity => (-ll / words as f64).exp(),
                Metric::BytePerplexity => (-ll / bytes as f64).exp(),
                _ => -ll / bytes as f64 / std::f64::consts::LN_2,
            };
            (mt.name().to_string(), v, None)
        })
        .collect();
    Ok(TaskResult {
        task: task.name.clone(),
        kind: Kind::Rolling,
        shots: 0,
        n,
        metrics,
        seconds: 0.0,
        extra: json!({"tokens": tokens, "words": words, "bytes": bytes, "loglikelihood": ll}),
        samples,
    })
}

pub fn classify(env: &Env, task: &Task) -> Result<TaskResult> {
    let super::harness::Subject::Classifier(h) = env.subject else {
        bail!(
            "task {}: a classify task needs a sequence classifier (a `finetune` output)",
            task.name
        );
    };
    let dir = env.args.adapter.as_deref().unwrap_or(&env.args.model);
    let labels = id2label(dir, h.head.out_dim)?;
    let n = env.n_items(task);
    let max_len = h.m.body.max_len();
    let dev = h.m.store.device.clone();
    let (mut gold, mut pred) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let prep = || -> Result<(Vec<u32>, usize)> {
            let item = &task.items[i];
            let text = task.text(item)?;
            let ids = crate::train::finetune::classify::encode_text(&h.m.tok, &text, max_len)?;
            let g = task.target_text(item)?;
            let idx = labels
                .iter()
                .position(|l| *l == g)
                .with_context(|| format!("label {g:?} is not one of the model's {labels:?}"))?;
            Ok((ids, idx))
        };
        let (ids, g) = prep().with_context(|| task.at(i))?;
        rows.push(ids);
        gold.push(g);
    }
    for chunk in rows.chunks(32) {
        let f = h.m.body.features(chunk, h.pad, &dev)?;
        let logits = h.head.forward(&f)?;
        pred.extend(crate::model::backbone::argmax_rows(&logits)?);
    }
    let acc: Vec<f64> = gold
        .iter()
        .zip(&pred)
        .map(|(g, p)| (g == p) as u8 as f64)
        .collect();
    let metrics = task
        .metrics
        .iter()
        .map(|&mt| match mt {
            Metric::MacroF1 => (mt.name().to_string(), metrics::macro_f1(&gold, &pred), None),
            _ => {
                let (v, se) = mean_stderr(&acc);
                (mt.name().to_string(), v, se)
            }
        })
        .collect();
    let samples = gold
        .iter()
        .zip(&pred)
        .enumerate()
        .map(|(i, (g, p))| json!({"doc_id": i, "target": labels[*g], "pred": labels[*p]}))
        .collect();
    Ok(TaskResult {
        task: task.name.clone(),
        kind: Kind::Classify,
        shots: 0,
        n,
        metrics,
        seconds: 0.0,
        extra: json!({"labels": labels}),
        samples,
    })
}

/// The label names of a classifier with `n` outputs, in id order: its config's `id2label`, or
/// transformers' defaults `LABEL_i` (a PEFT adapter directory carries no config).
fn id2label(dir: &std::path::Path, n: usize) -> Result<Vec<String>> {
    let p = dir.join("config.json");
    if !p.is_file() {
        return Ok((0..n).map(|i| format!("LABEL_{i}")).collect());
    }
    let v = crate::input::read_json(&p)?;
    let Some(map) = v["id2label"].as_object() else {
        return Ok((0..n).map(|i| format!("LABEL_{i}")).collect());
    };
    if map.len() != n {
        bail!(
            "{}: id2label has {} labels, the head {n} outputs",
            p.display(),
            map.len()
        );
    }
    let mut out = vec![String::new(); n];
    for (k, l) in map {
        let slot = k
            .parse::<usize>()
            .ok()
            .and_then(|i| out.get_mut(i))
            .with_context(|| {
                format!("{}: id2label key {k:?} is not an id below {n}", p.display())
            })?;
        *slot = l.as_str().unwrap_or_default().to_string();
    }
    Ok(out)
}
