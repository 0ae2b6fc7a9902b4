//! SQuAD v1.1 files (answer offsets checked, character offsets converted to bytes) and the
//! windows `[CLS] question [SEP] context-slice [SEP]` an encoder reads a long context in.

use crate::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

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
    let text = crate::input::read_text(path, crate::input::MAX_FILE_BYTES)?;
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
