//! Token classification (named-entity recognition; BERT §4.3):
//!
//!   p(tag_w | x) = softmax(W·h_{first sub-token of word w} + b),   L = mean over words
//!
//! Data: CoNLL-style files, one word per line with the BIO tag in the last column, blank lines
//! between sentences, `-DOCSTART-` lines skipped; every line must have the file's column count.
//! Words are joined with spaces and tokenized once; each token belongs to the word its byte offset
//! falls in, and only a word's first sub-token carries its label (transformers' usual alignment;
//! the others are ignored, −100). Deviation: decoders label the last sub-token (see `align`). Evaluation is entity-level precision/recall/F1 with seqeval's
//! semantics (`eval::metrics::entity_prf`); words cut away by `--max-len` are predicted `O` and
//! counted.

use crate::eval::metrics::entity_prf;
use crate::model::backbone::{
    add_head, open_metrics, write_head_outputs, Backbone, HeadOutputs, POOLER,
};
use crate::rng::Stream;
use crate::tokenizer::Tok;
use crate::train::classify::{optimizer_step, plan, Forgetting, Options, Summary};
use crate::train::optim::lr_at;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub struct Sentence {
    pub words: Vec<String>,
    pub tags: Vec<String>,
    /// `file:line` of the first word.
    pub at: String,
}

pub fn read_conll(path: &Path) -> Result<Vec<Sentence>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    let mut cur: Option<Sentence> = None;
    let mut ncols = None;
    for (i, line) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.is_empty() || cols[0] == "-DOCSTART-" {
            out.extend(cur.take());
            continue;
        }
        let n = *ncols.get_or_insert(cols.len());
        if n < 2 {
            bail!("{at}: expected a word and a tag per line, found 1 column");
        }
        if cols.len() != n {
            bail!("{at}: {} columns, the file's lines have {n}", cols.len());
        }
        let tag = cols[n - 1];
        if !(tag == "O" || tag.starts_with("B-") || tag.starts_with("I-")) {
            bail!("{at}: tag {tag:?} is not BIO (O, B-TYPE or I-TYPE)");
        }
        let s = cur.get_or_insert_with(|| Sentence {
            words: Vec::new(),
            tags: Vec::new(),
            at,
        });
        s.words.push(cols[0].to_string());
        s.tags.push(tag.to_string());
    }
    out.extend(cur);
    if out.is_empty() {
        bail!("{}: no sentences", path.display());
    }
    Ok(out)
}

/// Token ids and, per word, the index of the token that carries its label (None when
/// truncated away).
pub struct Aligned {
    pub ids: Vec<u32>,
    pub first: Vec<Option<usize>>,
}

/// `last`: label a word's last sub-token instead of its first. A causal decoder at a word's first
/// token has not seen the word (byte-level BPE often starts it with a bare space token), so
/// decoders use the last one; encoders see both directions and use the first, as transformers.
pub fn align(tok: &Tok, words: &[String], max_len: usize, last: bool) -> Result<Aligned> {
    let mut text = String::new();
    let mut starts = Vec::with_capacity(words.len());
    for w in words {
        if !text.is_empty() {
            text.push(' ');
        }
        starts.push(text.len());
        text.push_str(w);
    }
    let (ids, offs) = tok.encode_with_offsets(&text, true)?;
    let mut first = vec![None; words.len()];
    for (t, o) in offs.iter().enumerate().take(max_len) {
        let Some((s, _)) = *o else { continue };
        // The word whose span holds this token's first byte (a trimmed-space token points at
        // the start of the word after it).
        let w = match starts.binary_search(&s) {
            Ok(w) => w,
            Err(0) => continue,
            Err(w) => w - 1,
        };
        if (last || first[w].is_none()) && s < starts[w] + words[w].len().max(1) {
            first[w] = Some(t);
        }
    }
    let mut ids = ids;
    ids.truncate(max_len);
    Ok(Aligned { ids, first })
}

pub fn run(o: Options) -> Result<Summary> {
    let say = |s: &str| {
        if !o.quiet {
            eprintln!("{s}");
        }
    };
    let train = read_conll(&o.data)?;
    let eval = match &o.eval_data {
        Some(p) => read_conll(p)?,
        None => Vec::new(),
    };
    // Labels: O first, then the entity tags sorted.
    let mut labels: Vec<String> = train.iter().flat_map(|s| s.tags.iter().cloned()).collect();
    labels.push("O".into());
    labels.sort_by(|a, b| (a != "O", a).cmp(&(b != "O", b)));
    labels.dedup();
    let tag_id = |t: &str, at: &str| -> Result<usize> {
        labels
            .iter()
            .position(|l| l == t)
            .with_context(|| format!("{at}: tag {t:?} does not occur in the training data"))
    };

    let peft = o.lora.is_some();
    let mut m = Backbone::load(&o.model, &o.device, false, &|n: &str| {
        peft && !n.starts_with(POOLER)
    })?;
    let max_len = o.max_len.min(m.body.max_len());
    if o.batch_size == 0 || max_len < 2 {
        bail!("--batch-size must be positive and --max-len at least 2");
    }
    let last = matches!(m.body, Backbone::Decoder(_));
    let prep = |ss: &[Sentence]| -> Result<Vec<(Aligned, Vec<usize>)>> {
        ss.iter()
            .map(|s| {
                Ok((
                    align(&m.tok, &s.words, max_len, last)?,
                    s.tags
                        .iter()
                        .map(|t| tag_id(t, &s.at))
                        .collect::<Result<_>>()?,
                ))
            })
            .collect()
    };
    let (tr, ev) = (prep(&train)?, prep(&eval)?);
    let cut = tr
        .iter()
        .chain(&ev)
        .filter(|(a, _)| a.first.iter().any(Option::is_none))
        .count();
    let (head_name, bias) = m.body.token_head_name();
    let (head, switch, adapters) = add_head(
        &mut m,
        head_name,
        bias,
        labels.len(),
        o.lora.as_ref(),
        o.seed,
    )?;
    let mut forgetting = Forgetting::start(o.forgetting_eval.as_deref(), &m)?;
    let (trainable, total) = (m.store.num_trainable(), m.store.num_params());
    say(&format!(
        "{} train / {} eval sentences, {} tags, {cut} sentences truncated; trainable parameters {trainable} of {total}",
        tr.len(),
        ev.len(),
        labels.len()
    ));

    let pad = m.body.pad_id(&m.tok);
    let dev: Device = o.device.clone();
    let (mut opt, per_epoch, total_steps) = plan(&o, &m.store, tr.len())?;
    // Per-token logits (B, T, L) for a batch of aligned sentences.
    let logits = |batch: &[&(Aligned, Vec<usize>)]| -> Result<(Tensor, usize)> {
        let rows: Vec<Vec<u32>> = batch.iter().map(|(a, _)| a.ids.clone()).collect();
        let h = m.body.token_states(&rows, pad, &dev)?;
        let t = h.dim(1)?;
        Ok((head.forward(&h)?, t))
    };
    let evaluate = || -> Result<(f64, f64, f64)> {
        let (mut gold, mut pred) = (Vec::new(), Vec::new());
        for (chunk, sents) in ev.chunks(o.batch_size).zip(eval.chunks(o.batch_size)) {
            let refs: Vec<&(Aligned, Vec<usize>)> = chunk.iter().collect();
            let (lg, t) = logits(&refs)?;
            let best = crate::model::backbone::argmax_rows(
                &lg.detach().reshape((refs.len() * t, labels.len()))?,
            )?;
            for (bi, ((a, _), s)) in chunk.iter().zip(sents).enumerate() {
                pred.push(
                    a.first
                        .iter()
                        .map(|f| f.map_or("O", |ti| labels[best[bi * t + ti]].as_str()))
                        .collect::<Vec<_>>(),
                );
                gold.push(s.tags.iter().map(String::as_str).collect::<Vec<_>>());
            }
        }
        let p = entity_prf(&gold, &pred);
        Ok((p.precision, p.recall, p.f1))
    };
    let mut metrics = open_metrics(&o.out)?;
    let mut stream = Stream::new(o.seed, tr.len());
    let started = Instant::now();
    let mut times = Vec::new();
    let mut f1 = None;
    for step in 0..total_steps {
        let t0 = Instant::now();
        let batch: Vec<&(Aligned, Vec<usize>)> = (0..o.batch_size)
            .map(|i| &tr[stream.get(step as usize * o.batch_size + i)])
            .collect();
        switch.set_training(true, step ^ o.seed.rotate_left(23));
        let (lg, t) = logits(&batch)?;
        switch.set_training(false, 0);
        // Targets at each word's first sub-token; everything else carries no loss.
        let (mut pos, mut tgt) = (Vec::new(), Vec::new());
        for (bi, (a, tags)) in batch.iter().enumerate() {
            for (f, &tag) in a.first.iter().zip(tags) {
                if let Some(ti) = f {
                    pos.push((bi * t + ti) as u32);
                    tgt.push(tag as u32);
                }
            }
        }
        if pos.is_empty() {
            continue;
        }
        let n = pos.len();
        let picked = lg
            .reshape((batch.len() * t, labels.len()))?
            .index_select(&Tensor::from_vec(pos, n, &dev)?, 0)?;
        let loss = crate::losses::cross_entropy(&picked, &Tensor::from_vec(tgt, n, &dev)?)?;
        let lr = lr_at(step, o.lr, 0.0, o.warmup_steps, total_steps);
        let lv = optimizer_step(&m.store, &mut opt, &loss, lr, step, &mut metrics)?;
        times.push(t0.elapsed().as_secs_f64());
        if ((step + 1) % per_epoch == 0 || step + 1 == total_steps) && !ev.is_empty() {
            let (p, r, f) = evaluate()?;
            f1 = Some(f);
            let epoch = (step + 1).div_ceil(per_epoch);
            writeln!(
                metrics,
                "{}",
                json!({"epoch": epoch, "precision": p, "recall": r, "f1": f})
            )?;
            say(&format!(
                "epoch {epoch}: loss {lv:.4}  entity precision {p:.4} recall {r:.4} F1 {f:.4}"
            ));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let checkpoint_bytes = write_head_outputs(&mut HeadOutputs {
        m: &mut m,
        kind: "TokenClassification",
        peft_task: "TOKEN_CLS",
        head_name,
        labels: &labels,
        pad,
        max_len,
        adapters: adapters.as_ref(),
        out: &o.out,
        base: &o.model,
        merge: o.merge,
    })?;
    let summary = Summary {
        entity_f1: f1,
        forgetting: forgetting.finish(&m.body)?,
        ..Summary::new(
            total_steps,
            seconds,
            times,
            (trainable, total),
            checkpoint_bytes,
        )
    };
    summary.write_line(&mut metrics, json!({"truncated_sentences": cut}))?;
    Ok(summary)
}
