//! Supervised fine-tuning examples: JSONL → token ids with a per-token "train on this" mask.
//!
//! One JSON object per line, any of
//!   {"prompt": …, "completion": …}                     loss on the completion (+ EOS)
//!   {"messages": [{"role", "content"}, …]}             loss on the assistant turns
//!   {"text": …}                                         loss on everything (+ EOS)
//!
//! Conversations go through the model's chat template. The mask is built from character spans
//! of the rendered text and the tokenizer's offsets, never by searching for the answer string:
//! an assistant turn's span is where `render(messages[..=i])` extends
//! `render(messages[..i], add_generation_prompt)`, so the turn's end-of-turn marker is trained
//! too (the model learns to stop). Text is tokenized once; a token that merges across a
//! boundary is trained when any of its bytes is (it is needed to produce the answer). Rendered templates carry their own BOS, so they are
//! tokenized without special tokens (no double BOS); plain text gets the tokenizer's usual ones.

use crate::chat::{ChatTemplate, Message};
use crate::rng::permutation;
use crate::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::ops::Range;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Chat(Vec<Message>),
    Text(String),
    /// A conversation of which only the assistant turns of `reply` are trained (preference
    /// pairs: the shared context is not part of either completion).
    Reply {
        context: Vec<Message>,
        reply: Vec<Message>,
    },
}

/// An example with where it came from, for messages.
#[derive(Debug, Clone)]
pub struct Sourced {
    pub example: Example,
    /// `file:line`
    pub at: String,
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

fn string_field(v: &Value, key: &str, at: &str) -> Result<Option<String>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("{at}: \"{key}\" must be a string, got {other}"),
    }
}

/// Parses one JSON line.
pub fn parse_line(line: &str, at: &str) -> Result<Example> {
    let v: Value = serde_json::from_str(line).with_context(|| format!("{at}: invalid JSON"))?;
    if !v.is_object() {
        bail!("{at}: expected a JSON object");
    }
    if let Some(msgs) = v.get("messages") {
        let Value::Array(items) = msgs else {
            bail!("{at}: \"messages\" must be a list");
        };
        let mut out = Vec::new();
        for (i, m) in items.iter().enumerate() {
            let role = string_field(m, "role", at)?
                .with_context(|| format!("{at}: message {i} has no \"role\""))?;
            if !ROLES.contains(&role.as_str()) {
                bail!(
                    "{at}: message {i} has unknown role {role:?} (expected one of {})",
                    ROLES.join(", ")
                );
            }
            let content = string_field(m, "content", at)?
                .with_context(|| format!("{at}: message {i} has no \"content\""))?;
            if role == "assistant" && content.trim().is_empty() {
                bail!("{at}: message {i} is an empty assistant turn");
            }
            out.push(Message { role, content });
        }
        if !out.iter().any(|m| m.role == "assistant") {
            bail!("{at}: the conversation has no assistant turn to learn from");
        }
        return Ok(Example::Chat(out));
    }
    match (
        string_field(&v, "prompt", at)?,
        string_field(&v, "completion", at)?,
        string_field(&v, "text", at)?,
    ) {
        (Some(prompt), Some(completion), None) => {
            if completion.is_empty() {
                bail!("{at}: empty \"completion\"");
            }
            Ok(Example::PromptCompletion { prompt, completion })
        }
        (None, None, Some(text)) if !text.is_empty() => Ok(Example::Text(text)),
        (None, None, Some(_)) => bail!("{at}: empty \"text\""),
        _ => {
            bail!("{at}: expected {{\"prompt\", \"completion\"}}, {{\"messages\"}} or {{\"text\"}}")
        }
    }
}

/// Reads a JSONL file (blank lines skipped); any bad line is an error naming file:line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Sourced>> {
    let mut out = Vec::new();
    for item in crate::input::lines(path)? {
        let (i, line) = item?;
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{i}", path.display());
        out.push(Sourced {
            example: parse_line(&line, &at)?,
            at,
        });
    }
    if out.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(out)
}

/// Token ids and, per token, whether the loss includes predicting it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub train: Vec<bool>,
}

impl Tokenized {
    /// Number of trained targets (tokens after the first that are marked).
    pub fn n_targets(&self) -> usize {
        self.train.iter().skip(1).filter(|&&t| t).count()
    }
}

pub struct Formatter<'a> {
    pub tok: &'a Tok,
    pub template: Option<&'a ChatTemplate>,
    /// Include prompt / user / system tokens in the loss.
    pub train_on_prompt: bool,
    pub eos: Option<u32>,
}

/// What happened to an example.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Kept(Tokenized),
    /// Shortened to the length limit, with some trained tokens left.
    Truncated(Tokenized),
    /// Nothing left to train on after truncation.
    Dropped,
}

impl Formatter<'_> {
    /// The text to tokenize, the byte spans to train on, and whether the tokenizer should add
    /// its special tokens.
    fn render(&self, ex: &Example, at: &str) -> Result<(String, Vec<Range<usize>>, bool)> {
        Ok(match ex {
            Example::Text(t) => (t.clone(), std::iter::once(0..t.len()).collect(), true),
            Example::PromptCompletion { prompt, completion } => {
                let text = format!("{prompt}{completion}");
                (
                    text,
                    std::iter::once(prompt.len()..prompt.len() + completion.len()).collect(),
                    true,
                )
            }
            Example::Chat(msgs) => self.render_chat(msgs, 0, at)?,
            Example::Reply { context, reply } => {
                let msgs: Vec<Message> = context.iter().chain(reply).cloned().collect();
                self.render_chat(&msgs, context.len(), at)?
            }
        })
    }

    /// A conversation's text and the spans of its assistant turns from message `from` on.
    fn render_chat(
        &self,
        msgs: &[Message],
        from: usize,
        at: &str,
    ) -> Result<(String, Vec<Range<usize>>, bool)> {
        let t = self.template.with_context(|| {
            format!("{at}: a conversation needs a chat template (the model has none; pass --chat-template FILE)")
        })?;
        let full = t.render(msgs, false).with_context(|| at.to_string())?;
        let mut spans = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            if m.role != "assistant" || i < from {
                continue;
            }
            let before = t.render(&msgs[..i], true).with_context(|| at.to_string())?;
            let upto = t
                .render(&msgs[..=i], false)
                .with_context(|| at.to_string())?;
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                bail!(
                    "{at}: the chat template renders turn {i} differently depending on what follows \
                     (its text is not a prefix of the whole conversation), so the assistant tokens cannot \
                     be located; use --chat-template with a prefix-stable template"
                );
            }
            spans.push(before.len()..upto.len());
        }
        Ok((full, spans, false))
    }

    /// Tokenizes an example and truncates it to `max_len` tokens.
    pub fn tokenize(&self, ex: &Example, max_len: usize, at: &str) -> Result<Outcome> {
        let (text, spans, special) = self.render(ex, at)?;
        let (mut ids, offs) = self.tok.encode_with_offsets(&text, special)?;
        let mut train: Vec<bool> = offs
            .iter()
            // A token is trained if any of its bytes is: a word merged with the space before it
            // (`" positive"` after `"Answer: "`) must be trained, or a one-word answer learns nothing.
            .map(|o| match *o {
                Some((s, e)) => {
                    self.train_on_prompt
                        || spans.iter().any(|r| s < r.end && e.max(s + 1) > r.start)
                }
                None => false,
            })
            .collect();
        // Double BOS: a text that starts with the BOS string, tokenized with a BOS-adding
        // post-processor.
        if ids.len() >= 2 && ids[0] == ids[1] && self.tok.bos_id == Some(ids[0]) {
            ids.remove(0);
            train.remove(0);
        }
        if !matches!(ex, Example::Chat(_) | Example::Reply { .. }) {
            if let Some(e) = self.eos {
                if ids.last() == Some(&e) {
                    // Appended by the post-processor (no offsets): still the answer's end.
                    if let Some(t) = train.last_mut() {
                        *t = true;
                    }
                } else {
                    ids.push(e);
                    train.push(true);
                }
            }
        }
        let mut t = Tokenized { ids, train };
        if t.ids.len() <= max_len {
            return Ok(if t.n_targets() == 0 {
                Outcome::Dropped
            } else {
                Outcome::Kept(t)
            });
        }
        t.ids.truncate(max_len);
        t.train.truncate(max_len);
        Ok(if t.n_targets() == 0 {
            Outcome::Dropped
        } else {
            Outcome::Truncated(t)
        })
    }
}

/// What a run says when conversations fall back to `DEFAULT_TEMPLATE`.
pub const DEFAULT_TEMPLATE_NOTE: &str =
    "note: the model has no chat template; conversations use the default ChatML template";

/// ChatML, the template used for conversations when a model has none and no
/// `--chat-template` is given (SmolLM2, Qwen and many others use it).
pub const DEFAULT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Counts reported at the end of a run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub kept: usize,
    pub truncated: usize,
    pub dropped: usize,
}

/// Tokenizes every example; returns the trainable ones and the counts. Dropped examples are
/// reported with their `file:line` through `warn`.
pub fn tokenize_all(
    f: &Formatter,
    examples: &[Sourced],
    max_len: usize,
    mut warn: impl FnMut(&str),
) -> Result<(Vec<Tokenized>, Counts)> {
    let mut out = Vec::new();
    let mut c = Counts::default();
    for s in examples {
        match f.tokenize(&s.example, max_len, &s.at)? {
            Outcome::Kept(t) => {
                c.kept += 1;
                out.push(t);
            }
            Outcome::Truncated(t) => {
                c.truncated += 1;
                out.push(t);
            }
            Outcome::Dropped => {
                c.dropped += 1;
                warn(&format!(
                    "{}: skipped: no trained token left within {max_len} tokens",
                    s.at
                ));
            }
        }
    }
    if out.is_empty() {
        bail!(
            "no example has a token to train on (all {} were cut away by truncation)",
            examples.len()
        );
    }
    Ok((out, c))
}

/// Groups examples into rows: one example per row, or with `packing` as many consecutive
/// examples (in a seeded shuffled order) as fit into `max_len` tokens.
pub fn rows_of(data: &[Tokenized], packing: bool, max_len: usize, seed: u64) -> Vec<Vec<usize>> {
    if !packing {
        return (0..data.len()).map(|i| vec![i]).collect();
    }
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = 0usize;
    for i in permutation(seed ^ 0xBAC4, 0, data.len()) {
        let len = data[i].ids.len() - 1; // inputs: every token but the last
        if rows.is_empty() || used + len > max_len - 1 {
            rows.push(Vec::new());
            used = 0;
        }
        rows.last_mut().expect("a row was just pushed").push(i);
        used += len;
    }
    rows
}

/// A right-padded batch of rows, each the concatenation of its examples.
pub struct RowBatch {
    /// Inputs (B, T), targets and loss weights (B·T).
    pub x: Vec<u32>,
    pub y: Vec<u32>,
    pub w: Vec<f32>,
    pub t: usize,
    /// The examples' lengths per row.
    pub segments: Vec<Vec<usize>>,
}

pub fn build_batch(rows: &[Vec<&Tokenized>], pad: u32) -> RowBatch {
    let len = |r: &Vec<&Tokenized>| r.iter().map(|e| e.ids.len() - 1).sum::<usize>();
    let t = rows.iter().map(len).max().unwrap_or(1).max(1);
    let (mut x, mut y, mut w, mut segs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        for e in r {
            let n = e.ids.len() - 1;
            x.extend_from_slice(&e.ids[..n]);
            y.extend_from_slice(&e.ids[1..]);
            w.extend(e.train[1..].iter().map(|&b| if b { 1f32 } else { 0.0 }));
        }
        let n = len(r);
        x.extend(std::iter::repeat_n(pad, t - n));
        y.extend(std::iter::repeat_n(pad, t - n));
        w.extend(std::iter::repeat_n(0f32, t - n));
        segs.push(r.iter().map(|e| e.ids.len() - 1).collect());
    }
    RowBatch {
        x,
        y,
        w,
        t,
        segments: segs,
    }
}
