//! Preference data: JSONL, one record per line, in the forms people have.
//!
//!   {"prompt": "...", "chosen": "...", "rejected": "..."}          TRL's standard form
//!   {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}       TRL's conversational form
//!   {"chosen": [msgs], "rejected": [msgs]}                         implicit prompt: the shared
//!                                                                  leading messages
//!   {"chosen": "\n\nHuman: … \n\nAssistant: …", "rejected": …}     HH-RLHF dialogues: split
//!                                  after the last "\n\nAssistant:" the two dialogues share
//!   {"prompt": …, "completion": …, "label": true|false}            unpaired (KTO)
//!
//! A pair may carry `"margin": number` (reward models). Content that cannot train — chosen equal
//! to rejected, an empty completion, a dialogue that cannot be split, a prompt that leaves no
//! room for the completion within the length limit — is skipped with a warning naming
//! `file:line` and counted (an error under `--strict`); a line of the wrong shape is an error.
//!
//! With a chat template (a chat model, or `--chat-template`) text is rendered as a conversation:
//! a string prompt becomes one user message (an HH-RLHF prompt its turns), a completion one
//! assistant message, and only the completion's assistant tokens are scored.

use super::sft::{Example, Formatter, Outcome, Tokenized};
use crate::chat::Message;
use crate::rng::fnv1a;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// A prompt or a completion: plain text, or messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Text {
    Plain(String),
    Messages(Vec<Message>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Pair {
        prompt: Text,
        chosen: Text,
        rejected: Text,
        margin: Option<f64>,
    },
    Unpaired {
        prompt: Text,
        completion: Text,
        label: bool,
    },
}

impl Record {
    /// Whether any part is a message list (so a chat template is needed).
    pub fn has_messages(&self) -> bool {
        let m = |t: &Text| matches!(t, Text::Messages(_));
        match self {
            Record::Pair {
                prompt,
                chosen,
                rejected,
                ..
            } => m(prompt) || m(chosen) || m(rejected),
            Record::Unpaired {
                prompt, completion, ..
            } => m(prompt) || m(completion),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sourced {
    pub record: Record,
    /// `file:line`
    pub at: String,
}

/// Why a record cannot train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    Identical,
    Empty,
    Unsplittable,
    NoRoom,
}

impl Skip {
    pub fn why(self) -> &'static str {
        match self {
            Skip::Identical => "chosen and rejected are identical",
            Skip::Empty => "an empty completion",
            Skip::Unsplittable => {
                "the two dialogues share no prompt ending in \"\\n\\nAssistant:\" (or no leading messages)"
            }
            Skip::NoRoom => "no room for the completion within the length limit",
        }
    }
}

/// Records read and sequences kept, and skipped records by reason.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub read: usize,
    pub kept: usize,
    pub truncated: usize,
    pub identical: usize,
    pub empty: usize,
    pub unsplittable: usize,
    pub no_room: usize,
}

impl Counts {
    fn add(&mut self, s: Skip) {
        *match s {
            Skip::Identical => &mut self.identical,
            Skip::Empty => &mut self.empty,
            Skip::Unsplittable => &mut self.unsplittable,
            Skip::NoRoom => &mut self.no_room,
        } += 1;
    }

    pub fn skipped(&self) -> usize {
        self.identical + self.empty + self.unsplittable + self.no_room
    }

    pub fn summary(&self) -> String {
        format!(
            "{} read, {} kept ({} truncated), {} skipped ({} identical, {} empty, {} unsplittable, {} without room)",
            self.read,
            self.kept,
            self.truncated,
            self.skipped(),
            self.identical,
            self.empty,
            self.unsplittable,
            self.no_room
        )
    }
}

/// Where skip warnings go: printed and counted, or (`strict`) the first one is an error.
pub struct Warn<'a> {
    pub strict: bool,
    pub say: &'a dyn Fn(&str),
}

impl Warn<'_> {
    fn skip(&self, at: &str, why: &str) -> Result<()> {
        if self.strict {
            bail!("{at}: {why} (--strict)");
        }
        (self.say)(&format!("{at}: skipped: {why}"));
        Ok(())
    }
}

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

pub(crate) fn text_of(v: &Value, key: &str, at: &str) -> Result<Option<Text>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(Text::Plain(s.clone()))),
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for (i, m) in items.iter().enumerate() {
                let field = |k: &str| -> Result<String> {
                    match m.get(k) {
                        Some(Value::String(s)) => Ok(s.clone()),
                        _ => bail!("{at}: \"{key}\" message {i} needs a string \"{k}\""),
                    }
                };
                let role = field("role")?;
                if !["system", "user", "assistant"].contains(&role.as_str()) {
                    bail!("{at}: \"{key}\" message {i} has unknown role {role:?}");
                }
                out.push(Message {
                    role,
                    content: field("content")?,
                });
            }
            Ok(Some(Text::Messages(out)))
        }
        Some(other) => bail!("{at}: \"{key}\" must be a string or a list of messages, got {other}"),
    }
}

fn is_blank(t: &Text) -> bool {
    match t {
        Text::Plain(s) => s.trim().is_empty(),
        Text::Messages(m) => m.iter().all(|m| m.content.trim().is_empty()),
    }
}

/// Splits two HH-RLHF dialogues after the last "\n\nAssistant:" inside their common prefix:
/// (prompt, chosen completion, rejected completion).
pub fn split_dialogues(chosen: &str, rejected: &str) -> Option<(String, String, String)> {
    let common = chosen
        .char_indices()
        .zip(rejected.chars())
        .find(|((_, a), b)| a != b)
        .map_or(chosen.len().min(rejected.len()), |((i, _), _)| i);
    let cut = chosen[..common].rfind(ASSISTANT)? + ASSISTANT.len();
    Some((
        chosen[..cut].to_string(),
        chosen[cut..].to_string(),
        rejected[cut..].to_string(),
    ))
}

/// An HH-RLHF prompt ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") as messages.
pub fn dialogue_messages(prompt: &str) -> Option<Vec<Message>> {
    let body = prompt.strip_suffix(ASSISTANT)?;
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (role, tag) = if rest.starts_with(HUMAN) {
            ("user", HUMAN)
        } else if rest.starts_with(ASSISTANT) {
            ("assistant", ASSISTANT)
        } else {
            return None;
        };
        rest = &rest[tag.len()..];
        let end = [rest.find(HUMAN), rest.find(ASSISTANT)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(rest.len());
        out.push(Message::new(role, rest[..end].trim()));
        rest = &rest[end..];
    }
    (out.last().map(|m| m.role.as_str()) == Some("user")).then_some(out)
}

/// Parses one line: `Ok(Err(skip))` for a record that cannot train (the caller warns and counts).
pub fn parse_line(line: &str, at: &str) -> Result<std::result::Result<Record, Skip>> {
    let v: Value = serde_json::from_str(line).with_context(|| format!("{at}: invalid JSON"))?;
    if !v.is_object() {
        bail!("{at}: expected a JSON object");
    }
    let prompt = text_of(&v, "prompt", at)?;
    let margin = match v.get("margin") {
        None | Some(Value::Null) => None,
        Some(m) => match m.as_f64() {
            Some(x) if x.is_finite() => Some(x),
            _ => bail!("{at}: \"margin\" must be a finite number, got {m}"),
        },
    };
    if let Some(label) = v.get("label") {
        let Some(label) = label.as_bool() else {
            bail!("{at}: \"label\" must be true or false, got {label}");
        };
        let (Some(prompt), Some(completion)) = (prompt, text_of(&v, "completion", at)?) else {
            bail!("{at}: an unpaired example needs \"prompt\", \"completion\" and \"label\"");
        };
        return Ok(if is_blank(&completion) {
            Err(Skip::Empty)
        } else {
            Ok(Record::Unpaired {
                prompt,
                completion,
                label,
            })
        });
    }
    let (Some(chosen), Some(rejected)) = (text_of(&v, "chosen", at)?, text_of(&v, "rejected", at)?)
    else {
        bail!(
            "{at}: expected {{\"prompt\", \"chosen\", \"rejected\"}}, {{\"chosen\", \"rejected\"}} or {{\"prompt\", \"completion\", \"label\"}}"
        );
    };
    let (prompt, chosen, rejected) = match (prompt, chosen, rejected) {
        (Some(p @ Text::Plain(_)), c @ Text::Plain(_), r @ Text::Plain(_)) => (p, c, r),
        (Some(p @ Text::Messages(_)), c @ Text::Messages(_), r @ Text::Messages(_)) => (p, c, r),
        (None, Text::Plain(c), Text::Plain(r)) => match split_dialogues(&c, &r) {
            Some((p, c, r)) => (Text::Plain(p), Text::Plain(c), Text::Plain(r)),
            None => return Ok(Err(Skip::Unsplittable)),
        },
        (None, Text::Messages(c), Text::Messages(r)) => {
            let k = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if k == 0 || k == c.len() || k == r.len() {
                return Ok(Err(Skip::Unsplittable));
            }
            (
                Text::Messages(c[..k].to_vec()),
                Text::Messages(c[k..].to_vec()),
                Text::Messages(r[k..].to_vec()),
            )
        }
        _ => bail!("{at}: prompt, chosen and rejected must all be strings or all message lists"),
    };
    if is_blank(&chosen) || is_blank(&rejected) {
        return Ok(Err(Skip::Empty));
    }
    if chosen == rejected {
        return Ok(Err(Skip::Identical));
    }
    Ok(Ok(Record::Pair {
        prompt,
        chosen,
        rejected,
        margin,
    }))
}

/// Reads a preference JSONL file (blank lines skipped).
pub fn read(path: &Path, warn: &Warn, counts: &mut Counts) -> Result<Vec<Sourced>> {
    let mut out = Vec::new();
    for item in crate::input::lines(path)? {
        let (i, line) = item?;
        if line.trim().is_empty() {
            continue;
        }
        counts.read += 1;
        let at = format!("{}:{i}", path.display());
        match parse_line(&line, &at)? {
            Ok(record) => out.push(Sourced { record, at }),
            Err(reason) => {
                counts.add(reason);
                warn.skip(&at, reason.why())?;
            }
        }
    }
    if counts.read == 0 {
        bail!("{}: no records", path.display());
    }
    Ok(out)
}

/// A tokenized pair: both sequences share the prompt; `train` marks completion tokens.
#[derive(Debug, Clone)]
pub struct TokPair {
    pub chosen: Tokenized,
    pub rejected: Tokenized,
    pub margin: Option<f32>,
    /// Hash of the prompt's text (held-out splits by prompt).
    pub prompt_key: u64,
    pub at: String,
}

/// A tokenized unpaired example (KTO).
#[derive(Debug, Clone)]
pub struct TokOne {
    pub seq: Tokenized,
    pub label: bool,
    /// Tokens before the completion.
    pub prompt_len: usize,
}

fn prompt_hash(p: &Text) -> u64 {
    match p {
        Text::Plain(s) => fnv1a(s.as_bytes()),
        Text::Messages(m) => fnv1a(
            m.iter()
                .flat_map(|m| [m.role.as_str(), "\u{0}", m.content.as_str(), "\u{1}"])
                .collect::<String>()
                .as_bytes(),
        ),
    }
}

/// The example that scores `completion` after `prompt`: text for plain models, a conversation
/// through the template for chat models.
pub(crate) fn example(prompt: &Text, completion: &Text, chat: bool, at: &str) -> Result<Example> {
    Ok(match (prompt, completion) {
        (Text::Plain(p), Text::Plain(c)) if !chat => Example::PromptCompletion {
            prompt: p.clone(),
            completion: c.clone(),
        },
        (Text::Plain(p), Text::Plain(c)) => Example::Reply {
            context: dialogue_messages(p).unwrap_or_else(|| vec![Message::new("user", p)]),
            reply: vec![Message::new("assistant", c.trim())],
        },
        (Text::Messages(p), Text::Messages(c)) => Example::Reply {
            context: p.clone(),
            reply: c.clone(),
        },
        _ => bail!("{at}: prompt and completion must both be text or both messages"),
    })
}

/// Tokenizes one completion: None when the prompt leaves it no room.
fn tokenize_one(
    f: &Formatter,
    prompt: &Text,
    completion: &Text,
    max_len: usize,
    at: &str,
) -> Result<Option<(Tokenized, bool)>> {
    let chat = f.template.is_some();
    if matches!(completion, Text::Messages(_)) && !chat {
        bail!("{at}: a conversation needs a chat template (the model has none; pass --chat-template FILE)");
    }
    Ok(
        match f.tokenize(&example(prompt, completion, chat, at)?, max_len, at)? {
            Outcome::Kept(t) => Some((t, false)),
            Outcome::Truncated(t) => Some((t, true)),
            Outcome::Dropped => None,
        },
    )
}

/// Tokenizes the pairs (unpaired records are refused: KTO reads them with `tokenize_unpaired`);
/// no records give no pairs, records that all fail to tokenize an error.
pub fn tokenize_pairs(
    f: &Formatter,
    records: &[Sourced],
    max_len: usize,
    warn: &Warn,
    counts: &mut Counts,
) -> Result<Vec<TokPair>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for s in records {
        let Record::Pair {
            prompt,
            chosen,
            rejected,
            margin,
        } = &s.record
        else {
            bail!(
                "{}: an unpaired example (\"label\"); this method needs pairs (\"chosen\", \"rejected\")",
                s.at
            );
        };
        let c = tokenize_one(f, prompt, chosen, max_len, &s.at)?;
        let r = tokenize_one(f, prompt, rejected, max_len, &s.at)?;
        let (Some((c, tc)), Some((r, tr))) = (c, r) else {
            counts.add(Skip::NoRoom);
            warn.skip(&s.at, Skip::NoRoom.why())?;
            continue;
        };
        counts.kept += 1;
        counts.truncated += usize::from(tc || tr);
        out.push(TokPair {
            chosen: c,
            rejected: r,
            margin: margin.map(|m| m as f32),
            prompt_key: prompt_hash(prompt),
            at: s.at.clone(),
        });
    }
    if out.is_empty() {
        bail!("no usable pairs ({})", counts.summary());
    }
    Ok(out)
}

/// Tokenizes unpaired examples; a pair becomes two (chosen desirable, rejected undesirable), as
/// TRL's `unpair_preference_dataset` does.
pub fn tokenize_unpaired(
    f: &Formatter,
    records: &[Sourced],
    max_len: usize,
    warn: &Warn,
    counts: &mut Counts,
) -> Result<Vec<TokOne>> {
    let mut out = Vec::new();
    for s in records {
        let items: Vec<(&Text, &Text, bool)> = match &s.record {
            Record::Pair {
                prompt,
                chosen,
                rejected,
                ..
            } => vec![(prompt, chosen, true), (prompt, rejected, false)],
            Record::Unpaired {
                prompt,
                completion,
                label,
            } => vec![(prompt, completion, *label)],
        };
        for (prompt, completion, label) in items {
            let Some((seq, truncated)) = tokenize_one(f, prompt, completion, max_len, &s.at)?
            else {
                counts.add(Skip::NoRoom);
                warn.skip(&s.at, Skip::NoRoom.why())?;
                continue;
            };
            counts.kept += 1;
            counts.truncated += usize::from(truncated);
            let prompt_len = seq.train.iter().position(|&t| t).unwrap_or(seq.ids.len());
            out.push(TokOne {
                seq,
                label,
                prompt_len,
            });
        }
    }
    if out.is_empty() {
        bail!("no usable examples ({})", counts.summary());
    }
    Ok(out)
}

/// Splits items by prompt into (train, held-out): a prompt's items all land on one side, about
/// `fraction` of the prompts held out (by a hash of the prompt and the seed).
pub fn split_by_prompt<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> u64,
    fraction: f64,
    seed: u64,
) -> (Vec<T>, Vec<T>) {
    if fraction <= 0.0 {
        return (items, Vec::new());
    }
    let cut = (fraction.min(1.0) * u64::MAX as f64) as u64;
    items.into_iter().partition(|x| {
        let h = crate::rng::Rng::keyed(&[seed, key(x)]).next_u64();
        h >= cut
    })
}
