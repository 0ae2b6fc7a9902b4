//! Extractive question answering (BERT §4.2, SQuAD v1.1):
//!
//!   (s, e) = argmax_{s ≤ e, e − s < 30} start_s + end_e,   L = ½(CE(start) + CE(end))
//!
//! Question and context are encoded as a pair; contexts longer than `--max-len` are split into
//! windows overlapping by `--stride` tokens (only the context is cut). A window that does not hold
//! the whole answer points both targets at [CLS] (transformers' `run_qa`). At evaluation every
//! window of a question is scored and the best span over all of them is mapped back to the
//! context's characters through the tokenizer's offsets; exact match and F1 use SQuAD's answer
//! normalisation (`eval::metrics`). Encoders only: a causal decoder cannot see the context after
//! a start position.

use crate::eval::metrics::{exact_match, squad_f1};
use crate::model::backbone::{add_head, open_metrics, write_head_outputs, Backbone, HeadOutputs};
use crate::rng::Stream;
use crate::tokenizer::Tok;
use crate::train::classify::{optimizer_step, plan, Options, Summary};
use crate::train::optim::lr_at;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct Question {
    pub id: String,
    pub question: String,
    pub context: String,
    /// Gold answers: text and byte offset in the context.
    pub answers: Vec<(String, usize)>,
}

/// Reads SQuAD v1.1 JSON; an answer whose `answer_start` does not point at its text is an error
/// naming the question.
pub fn read_squad(path: &Path) -> Result<Vec<Question>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let f = path.display();
    let mut out = Vec::new();
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .with_context(|| format!("{f}: no \"data\" list"))?;
    for (di, d) in data.iter().enumerate() {
        let paras = d
            .get("paragraphs")
            .and_then(Value::as_array)
            .with_context(|| format!("{f}: data[{di}] has no paragraphs"))?;
        for (pi, p) in paras.iter().enumerate() {
            let at = format!("{f}: data[{di}].paragraphs[{pi}]");
            let ctx = p
                .get("context")
                .and_then(Value::as_str)
                .with_context(|| format!("{at}: no context"))?;
            // SQuAD offsets count characters; lmforge slices bytes.
            let byte_of: Vec<usize> = ctx
                .char_indices()
                .map(|(b, _)| b)
                .chain(std::iter::once(ctx.len()))
                .collect();
            for (qi, q) in p
                .get("qas")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let id = q
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let qat = format!("{at}.qas[{qi}] (id {id:?})");
                if q.get("is_impossible").and_then(Value::as_bool) == Some(true) {
                    bail!("{qat}: unanswerable questions (SQuAD 2.0) are not supported");
                }
                let question = q
                    .get("question")
                    .and_then(Value::as_str)
                    .with_context(|| format!("{qat}: no question"))?;
                let mut answers = Vec::new();
                for a in q
                    .get("answers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let t = a
                        .get("text")
                        .and_then(Value::as_str)
                        .with_context(|| format!("{qat}: an answer has no text"))?;
                    let c = a
                        .get("answer_start")
                        .and_then(Value::as_u64)
                        .with_context(|| format!("{qat}: an answer has no answer_start"))?
                        as usize;
                    let b = *byte_of
                        .get(c)
                        .with_context(|| format!("{qat}: answer_start {c} is past the context"))?;
                    if !ctx[b..].starts_with(t) {
                        bail!("{qat}: answer {t:?} is not at answer_start {c} of the context");
                    }
                    answers.push((t.to_string(), b));
                }
                if answers.is_empty() {
                    bail!("{qat}: no answers");
                }
                out.push(Question {
                    id,
                    question: question.into(),
                    context: ctx.into(),
                    answers,
                });
            }
        }
    }
    if out.is_empty() {
        bail!("{f}: no questions");
    }
    Ok(out)
}

/// One window of a question: ids, the context byte range of each token (None outside the
/// context), and the target token positions (0, 0 = [CLS] when the answer is not inside).
pub struct Window {
    pub q: usize,
    pub ids: Vec<u32>,
    pub ctx: Vec<Option<(usize, usize)>>,
    pub target: (u32, u32),
}

/// Splits every question's context into windows `[CLS] question [SEP] context-slice [SEP]` of at
/// most `max_len` tokens, consecutive slices sharing `stride` tokens (the tokenizers crate's own
/// overflow handling for pairs returns only the first overflow, so windows are built here).
pub fn windows(tok: &Tok, qs: &[Question], max_len: usize, stride: usize) -> Result<Vec<Window>> {
    let id = |t: &str| {
        tok.inner
            .token_to_id(t)
            .with_context(|| format!("extractive QA needs a {t} token in the tokenizer"))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    let mut out = Vec::new();
    for (qi, q) in qs.iter().enumerate() {
        let qids = tok.encode(&q.question, false)?;
        let (cids, coffs) = tok.encode_with_offsets(&q.context, false)?;
        let budget = max_len.saturating_sub(qids.len() + 3);
        if budget <= stride {
            bail!(
                "question {:?}: {} tokens leave no room for the context in --max-len {max_len} (stride {stride})",
                q.id,
                qids.len()
            );
        }
        let (a_text, a_start) = &q.answers[0];
        let a_end = a_start + a_text.len();
        let mut start = 0;
        loop {
            let end = (start + budget).min(cids.len());
            let mut ids = vec![cls];
            ids.extend(&qids);
            ids.push(sep);
            let first = ids.len();
            ids.extend(&cids[start..end]);
            ids.push(sep);
            let mut ctx = vec![None; first];
            ctx.extend(coffs[start..end].iter().copied());
            ctx.push(None);
            let s = ctx
                .iter()
                .position(|o| o.is_some_and(|(s, e)| s <= *a_start && *a_start < e.max(s + 1)));
            let e = ctx
                .iter()
                .rposition(|o| o.is_some_and(|(s, e)| s < a_end && a_end <= e));
            let target = match (s, e) {
                (Some(s), Some(e)) if s <= e => (s as u32, e as u32),
                _ => (0, 0),
            };
            out.push(Window {
                q: qi,
                ids,
                ctx,
                target,
            });
            if end == cids.len() {
                break;
            }
            start = end - stride;
        }
    }
    Ok(out)
}

pub fn run(o: Options, stride: usize) -> Result<Summary> {
    let say = |s: &str| {
        if !o.quiet {
            eprintln!("{s}");
        }
    };
    if o.forgetting_eval.is_some() {
        bail!("--forgetting-eval measures causal-LM perplexity; extractive QA runs on encoders, which have none");
    }
    let train = read_squad(&o.data)?;
    let eval = match &o.eval_data {
        Some(p) => read_squad(p)?,
        None => Vec::new(),
    };
    let peft = o.lora.is_some();
    let mut m = Backbone::load(&o.model, &o.device, false, &|_| peft)?;
    if !matches!(m.body, Backbone::Encoder(_)) {
        bail!(
            "{}: extractive QA needs a bidirectional encoder (BERT); decoders are not supported",
            o.model.display()
        );
    }
    let max_len = o.max_len.min(m.body.max_len());
    if o.batch_size == 0 || stride >= max_len / 2 {
        bail!("--batch-size must be positive and --stride less than half of --max-len ({max_len})");
    }
    let (tw, ew) = (
        windows(&m.tok, &train, max_len, stride)?,
        windows(&m.tok, &eval, max_len, stride)?,
    );
    let (head, switch, adapters) =
        add_head(&mut m, "qa_outputs", true, 2, o.lora.as_ref(), o.seed)?;
    let (trainable, total) = (m.store.num_trainable(), m.store.num_params());
    say(&format!(
        "{} train questions ({} windows), {} eval ({} windows); trainable parameters {trainable} of {total}",
        train.len(),
        tw.len(),
        eval.len(),
        ew.len()
    ));
    let pad = m.body.pad_id(&m.tok);
    let dev = o.device.clone();
    // (B, T) start and end logits of a batch of windows.
    let logits = |ws: &[&Window]| -> Result<(Tensor, Tensor)> {
        let rows: Vec<Vec<u32>> = ws.iter().map(|w| w.ids.clone()).collect();
        let se = head.forward(&m.body.token_states(&rows, pad, &dev)?)?; // (B, T, 2)
        Ok((
            se.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?,
            se.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?,
        ))
    };
    let evaluate = || -> Result<(f64, f64)> {
        // Best (score, start byte, end byte) per question over its windows.
        let mut best: Vec<Option<(f32, usize, usize)>> = vec![None; eval.len()];
        for chunk in ew.chunks(o.batch_size) {
            let refs: Vec<&Window> = chunk.iter().collect();
            let (s, e) = logits(&refs)?;
            let (s, e): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
                s.to_dtype(DType::F32)?.to_vec2()?,
                e.to_dtype(DType::F32)?.to_vec2()?,
            );
            for ((w, sw), ew) in chunk.iter().zip(&s).zip(&e) {
                // Spans of at most 30 tokens inside the context part.
                for (i, (oi, si)) in w.ctx.iter().zip(sw).enumerate() {
                    let Some((cs, _)) = *oi else { continue };
                    for (oj, ej) in w.ctx.iter().zip(ew).skip(i).take(30) {
                        let Some((_, ce)) = *oj else { continue };
                        let score = si + ej;
                        if best[w.q].is_none_or(|(b, _, _)| score > b) {
                            best[w.q] = Some((score, cs, ce));
                        }
                    }
                }
            }
        }
        let (mut em, mut f1) = (0f64, 0f64);
        for (q, b) in eval.iter().zip(&best) {
            let pred = b.map_or("", |(_, s, e)| q.context.get(s..e).unwrap_or(""));
            let golds: Vec<String> = q.answers.iter().map(|a| a.0.clone()).collect();
            em += exact_match(pred, &golds);
            f1 += squad_f1(pred, &golds);
        }
        Ok((
            100.0 * em / eval.len() as f64,
            100.0 * f1 / eval.len() as f64,
        ))
    };
    let (mut opt, per_epoch, total_steps) = plan(&o, &m.store, tw.len())?;
    let mut metrics = open_metrics(&o.out)?;
    let mut stream = Stream::new(o.seed, tw.len());
    let (started, mut times) = (Instant::now(), Vec::new());
    let mut scores = None;
    for step in 0..total_steps {
        let t0 = Instant::now();
        let batch: Vec<&Window> = (0..o.batch_size)
            .map(|i| &tw[stream.get(step as usize * o.batch_size + i)])
            .collect();
        switch.set_training(true, step ^ o.seed.rotate_left(29));
        let (s, e) = logits(&batch)?;
        switch.set_training(false, 0);
        let n = batch.len();
        let ts = Tensor::from_vec(
            batch.iter().map(|w| w.target.0).collect::<Vec<_>>(),
            n,
            &dev,
        )?;
        let te = Tensor::from_vec(
            batch.iter().map(|w| w.target.1).collect::<Vec<_>>(),
            n,
            &dev,
        )?;
        // Padding positions must not win: they are real logits of pad tokens, so mask them.
        let t = s.dim(1)?;
        let mask: Vec<f32> = batch
            .iter()
            .flat_map(|w| (0..t).map(move |i| if i < w.ids.len() { 0.0 } else { -1e9 }))
            .collect();
        let mask = Tensor::from_vec(mask, (n, t), &dev)?;
        let loss = ((crate::losses::cross_entropy(&(s + &mask)?, &ts)?
            + crate::losses::cross_entropy(&(e + &mask)?, &te)?)?
            * 0.5)?;
        let lr = lr_at(step, o.lr, 0.0, o.warmup_steps, total_steps);
        let lv = optimizer_step(&m.store, &mut opt, &loss, lr, step, &mut metrics)?;
        times.push(t0.elapsed().as_secs_f64());
        if ((step + 1) % per_epoch == 0 || step + 1 == total_steps) && !eval.is_empty() {
            let (em, f1) = evaluate()?;
            scores = Some((em, f1));
            let epoch = (step + 1).div_ceil(per_epoch);
            writeln!(
                metrics,
                "{}",
                json!({"epoch": epoch, "exact_match": em, "f1": f1})
            )?;
            say(&format!(
                "epoch {epoch}: loss {lv:.4}  exact match {em:.2}  F1 {f1:.2}"
            ));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let checkpoint_bytes = write_head_outputs(&mut HeadOutputs {
        m: &mut m,
        kind: "QuestionAnswering",
        peft_task: "QUESTION_ANS",
        head_name: "qa_outputs",
        // transformers sizes `qa_outputs` by num_labels: 2 (start, end).
        labels: &["LABEL_0".to_string(), "LABEL_1".to_string()],
        pad,
        max_len,
        adapters: adapters.as_ref(),
        out: &o.out,
        base: &o.model,
        merge: o.merge,
    })?;
    let summary = Summary {
        squad: scores,
        ..Summary::new(
            total_steps,
            seconds,
            times,
            (trainable, total),
            checkpoint_bytes,
        )
    };
    summary.write_line(&mut metrics, json!({}))?;
    Ok(summary)
}
