//! The prompts online RL samples from: a JSONL file whose records are
//! `{"prompt": "…" | [messages], "answer"?: "…" | number}` (the answer is what the `number` rule
//! checks), a preference record (its prompt: HH-RLHF dialogues, TRL pairs), or a conversation
//! `{"messages": […]}` (the turns before its last assistant turn).
//!
//! Chat models see the prompt through their template with the generation prompt added; plain
//! models see the text. Prompts longer than `max_prompt_len` keep their last tokens (TRL's
//! left truncation), so the question right before the answer survives.

use crate::chat::{ChatTemplate, Message};
use crate::data::preference::{self, dialogue_messages, text_of, Record, Text};
use crate::tokenizer::Tok;
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: Text,
    pub answer: Option<String>,
    /// `file:line`
    pub at: String,
}

fn answer_of(v: &Value, at: &str) -> Result<Option<String>> {
    Ok(match v.get("answer") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => bail!("{at}: \"answer\" must be a string or a number, got {other}"),
    })
}

/// One line's prompt.
pub fn parse_line(line: &str, at: &str) -> Result<Prompt> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{at}: invalid JSON: {e}"))?;
    if !v.is_object() {
        bail!("{at}: expected a JSON object");
    }
    let answer = answer_of(&v, at)?;
    let text = if v.get("chosen").is_some() {
        match preference::parse_line(line, at)? {
            Ok(Record::Pair { prompt, .. } | Record::Unpaired { prompt, .. }) => prompt,
            Err(why) => bail!(
                "{at}: no prompt can be taken from this pair ({})",
                why.why()
            ),
        }
    } else if let Some(p) = text_of(&v, "prompt", at)? {
        p
    } else if let Some(Text::Messages(m)) = text_of(&v, "messages", at)? {
        let keep = m
            .iter()
            .rposition(|x| x.role == "assistant")
            .unwrap_or(m.len());
        let m = m[..keep].to_vec();
        if m.last().map(|x| x.role.as_str()) != Some("user") {
            bail!("{at}: \"messages\" must have a user turn before its last assistant turn");
        }
        Text::Messages(m)
    } else {
        bail!("{at}: expected {{\"prompt\": …}}, a preference pair or {{\"messages\": […]}}");
    };
    let empty = match &text {
        Text::Plain(s) => s.trim().is_empty(),
        Text::Messages(m) => m.is_empty(),
    };
    if empty {
        bail!("{at}: the prompt is empty");
    }
    Ok(Prompt {
        text,
        answer,
        at: at.to_string(),
    })
}

/// Reads a prompt file (blank lines skipped).
pub fn read(path: &Path) -> Result<Vec<Prompt>> {
    let mut out = Vec::new();
    for item in crate::input::lines(path)? {
        let (i, line) = item?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_line(&line, &format!("{}:{i}", path.display()))?);
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// The conversation a plain-text prompt becomes for a chat model (HH-RLHF dialogues keep
/// their turns).
pub fn messages(t: &Text) -> Vec<Message> {
    match t {
        Text::Messages(m) => m.clone(),
        Text::Plain(p) => dialogue_messages(p).unwrap_or_else(|| vec![Message::new("user", p)]),
    }
}

/// The longest prompt (at most `cap` tokens) that leaves `max_new` tokens of a `ctx`-token
/// context for the response.
pub fn room(ctx: usize, max_new: usize, cap: usize) -> Result<usize> {
    if max_new == 0 || max_new >= ctx {
        bail!(
            "max_new_tokens {max_new} leaves no room for a prompt in the model's context of {ctx}"
        );
    }
    Ok((ctx - max_new).min(cap))
}

/// The prompt's tokens for a model: through `template` with the generation prompt, or the plain
/// text with the tokenizer's special tokens; the last `max_len` kept. Returns (ids, truncated).
pub fn tokenize(
    p: &Prompt,
    tok: &Tok,
    template: Option<&ChatTemplate>,
    max_len: usize,
) -> Result<(Vec<u32>, bool)> {
    let mut ids = match (template, &p.text) {
        (Some(t), text) => {
            let s = t.render(&messages(text), true)?;
            tok.encode(&s, false)?
        }
        (None, Text::Plain(s)) => tok.encode(s, true)?,
        (None, Text::Messages(_)) => bail!(
            "{}: a conversation needs a chat template (the model has none; pass --chat-template FILE)",
            p.at
        ),
    };
    if ids.is_empty() {
        bail!("{}: the prompt has no tokens", p.at);
    }
    let cut = ids.len() > max_len;
    if cut {
        ids.drain(..ids.len() - max_len);
    }
    Ok((ids, cut))
}
