//! What online RL maximises: rules that check a response (a verifiable reward), a trained reward
//! model (`lmforge reward`), or a Rust closure (library users); several are summed with weights,
//! as TRL's `reward_funcs` / `reward_weights`.
//!
//! Rules (`--reward RULE`, repeatable), each 1 when it holds and 0 when it does not:
//!   number          the response's last number equals the record's "answer" (its last number)
//!   contains:TEXT   the response contains TEXT          avoids:TEXT   it does not
//!   length:MIN-MAX  the response has MIN..=MAX tokens    json          it parses as JSON
//!   eos             the response ended with EOS (within --max-new-tokens)

use super::prompts::Prompt;
use crate::data::preference::{example, Text};
use crate::data::sft::{Formatter, Outcome};
use crate::model::backbone::{load_head_model, HeadModel};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::Path;

/// A rule reward.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    Number,
    Contains(String),
    Avoids(String),
    Length { min: usize, max: usize },
    Json,
    Eos,
}

impl std::str::FromStr for Rule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let need = |a: Option<&str>| -> Result<String> {
            match a {
                Some(t) if !t.is_empty() => Ok(t.to_string()),
                _ => bail!("reward rule {s:?}: {name} needs text after ':' ({name}:TEXT)"),
            }
        };
        Ok(match (name, arg) {
            ("number", None) => Rule::Number,
            ("json", None) => Rule::Json,
            ("eos", None) => Rule::Eos,
            ("contains", a) => Rule::Contains(need(a)?),
            ("avoids", a) => Rule::Avoids(need(a)?),
            ("length", Some(a)) => {
                let parsed = a.split_once('-').and_then(|(lo, hi)| {
                    Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?))
                });
                match parsed {
                    Some((min, max)) if min <= max => Rule::Length { min, max },
                    _ => bail!("reward rule {s:?}: expected length:MIN-MAX with MIN <= MAX"),
                }
            }
            _ => bail!(
                "unknown reward rule {s:?}: expected number, contains:TEXT, avoids:TEXT, length:MIN-MAX, json or eos"
            ),
        })
    }
}

/// One response to score.
pub struct Sample<'a> {
    pub prompt: &'a Prompt,
    /// The decoded response (EOS and special tokens left out).
    pub response: &'a str,
    /// Response tokens, the EOS included.
    pub tokens: usize,
    /// Ended with EOS (not cut by the length limit).
    pub eos: bool,
}

/// The last number in `s` ("1,234.5" → 1234.5), if any.
pub fn last_number(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let mut last = None;
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = if i > 0 && b[i - 1] == b'-' { i - 1 } else { i };
            let mut j = i;
            while j < b.len()
                && (b[j].is_ascii_digit()
                    || (matches!(b[j], b',' | b'.')
                        && j + 1 < b.len()
                        && b[j + 1].is_ascii_digit()))
            {
                j += 1;
            }
            let text: String = s[start..j].chars().filter(|&c| c != ',').collect();
            last = text.parse::<f64>().ok().or(last);
            i = j;
        } else {
            i += 1;
        }
    }
    last
}

fn is_json(s: &str) -> bool {
    let t = s.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|x| x.trim_end().strip_suffix("```"))
        .unwrap_or(t);
    serde_json::from_str::<serde_json::Value>(t.trim()).is_ok()
}

impl Rule {
    pub fn score(&self, s: &Sample) -> Result<f64> {
        let yes = |b: bool| if b { 1.0 } else { 0.0 };
        Ok(match self {
            Rule::Number => {
                let want = s
                    .prompt
                    .answer
                    .as_deref()
                    .and_then(last_number)
                    .with_context(|| {
                        format!(
                            "{}: the number reward needs a numeric \"answer\"",
                            s.prompt.at
                        )
                    })?;
                yes(last_number(s.response).is_some_and(|x| (x - want).abs() < 1e-9))
            }
            Rule::Contains(t) => yes(s.response.contains(t.as_str())),
            Rule::Avoids(t) => yes(!s.response.contains(t.as_str())),
            Rule::Length { min, max } => yes((*min..=*max).contains(&s.tokens)),
            Rule::Json => yes(is_json(s.response)),
            Rule::Eos => yes(s.eos),
        })
    }

    pub fn name(&self) -> String {
        match self {
            Rule::Number => "number".into(),
            Rule::Contains(t) => format!("contains:{t}"),
            Rule::Avoids(t) => format!("avoids:{t}"),
            Rule::Length { min, max } => format!("length:{min}-{max}"),
            Rule::Json => "json".into(),
            Rule::Eos => "eos".into(),
        }
    }
}

/// A reward model (`…ForSequenceClassification` with one label, or a PEFT adapter of one)
/// scoring prompt + response as it was trained: through its chat template if it has one.
pub struct RewardModel {
    hm: HeadModel,
    max_len: usize,
    path: String,
}

impl RewardModel {
    pub fn load(path: &Path, base: Option<&Path>, dev: &Device) -> Result<Self> {
        let hm = load_head_model(path, base, dev, false)?;
        if hm.head.out_dim != 1 {
            bail!(
                "{}: the head has {} outputs; a reward model has 1",
                path.display(),
                hm.head.out_dim
            );
        }
        let max_len = hm.m.body.max_len();
        Ok(Self {
            hm,
            max_len,
            path: path.display().to_string(),
        })
    }

    /// Rewards of `samples`, 8 at a time.
    pub fn score(&self, samples: &[Sample]) -> Result<Vec<f64>> {
        let tpl = self.hm.m.chat_template.clone().map(|s| self.hm.m.chat(s));
        let fmt = Formatter {
            tok: &self.hm.m.tok,
            template: tpl.as_ref(),
            train_on_prompt: true,
            eos: None,
        };
        let mut rows = Vec::with_capacity(samples.len());
        for s in samples {
            let at = &s.prompt.at;
            if tpl.is_none() && matches!(s.prompt.text, Text::Messages(_)) {
                bail!(
                    "{at}: a conversation needs a chat template, and the reward model {} has none",
                    self.path
                );
            }
            // The response as the prompt's kind: a reply to a conversation, or more text.
            let response = match &s.prompt.text {
                Text::Messages(_) => {
                    Text::Messages(vec![crate::chat::Message::new("assistant", s.response)])
                }
                Text::Plain(_) => Text::Plain(s.response.to_string()),
            };
            let ex = example(&s.prompt.text, &response, tpl.is_some(), at)?;
            let mut ids = match fmt.tokenize(&ex, usize::MAX, at)? {
                Outcome::Kept(t) | Outcome::Truncated(t) => t.ids,
                Outcome::Dropped => bail!("{at}: nothing to score"),
            };
            // The reward is read at the last token: keep the end.
            if ids.len() > self.max_len {
                ids.drain(..ids.len() - self.max_len);
            }
            rows.push(ids);
        }
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(8) {
            let f = self
                .hm
                .m
                .body
                .features(chunk, self.hm.pad, self.hm.head.weight.device())?;
            let r: Vec<f32> = self
                .hm
                .head
                .forward(&f)?
                .squeeze(1)?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            if let Some(x) = r.iter().find(|x| !x.is_finite()) {
                bail!("{}: a reward is not finite ({x})", self.path);
            }
            out.extend(r.iter().map(|&x| x as f64));
        }
        Ok(out)
    }
}

/// A reward written in Rust (library use): any function of a sample.
pub type RewardFn = Box<dyn Fn(&Sample) -> f64 + Send + Sync>;

pub enum Source {
    Rule(Rule),
    Model(Box<RewardModel>),
    Custom { name: String, f: RewardFn },
}

impl Source {
    pub fn name(&self) -> String {
        match self {
            Source::Rule(r) => r.name(),
            Source::Model(m) => format!("model:{}", m.path),
            Source::Custom { name, .. } => name.clone(),
        }
    }
}

/// The weighted sum of several reward sources.
#[derive(Default)]
pub struct Rewards {
    pub sources: Vec<(Source, f64)>,
}

impl Rewards {
    /// Per sample: the total, and each source's value.
    pub fn score(&self, samples: &[Sample]) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
        if self.sources.is_empty() {
            bail!("no reward: give --reward RULE and/or --reward-model DIR");
        }
        let mut total = vec![0.0; samples.len()];
        let mut each = Vec::with_capacity(self.sources.len());
        for (src, w) in &self.sources {
            let v = match src {
                Source::Rule(r) => samples.iter().map(|s| r.score(s)).collect::<Result<_>>()?,
                Source::Model(m) => m.score(samples)?,
                Source::Custom { f, .. } => samples.iter().map(f).collect(),
            };
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                bail!(
                    "{}: the reward {} is not finite ({}) for this prompt's response",
                    samples[i].prompt.at,
                    src.name(),
                    v[i]
                );
            }
            for (t, x) in total.iter_mut().zip(&v) {
                *t += w * x;
            }
            each.push(v);
        }
        Ok((total, each))
    }

    /// Fails early when a rule needs what the prompts lack.
    pub fn check(&self, prompts: &[Prompt]) -> Result<()> {
        let number = self
            .sources
            .iter()
            .any(|(s, _)| matches!(s, Source::Rule(Rule::Number)));
        if number {
            if let Some(p) = prompts
                .iter()
                .find(|p| p.answer.as_deref().and_then(last_number).is_none())
            {
                bail!(
                    "{}: the number reward needs a numeric \"answer\" in every record",
                    p.at
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_score() {
        assert_eq!(last_number("so 12 + 3 = 1,215.5."), Some(1215.5));
        assert_eq!(last_number("it is -7"), Some(-7.0));
        assert_eq!(last_number("none"), None);
        let p = Prompt {
            text: Text::Plain("q".into()),
            answer: Some("#### 42".into()),
            at: "f:1".into(),
        };
        let s = |r: &'static str, eos| Sample {
            prompt: &p,
            response: r,
            tokens: 5,
            eos,
        };
        let r = |x: &str| x.parse::<Rule>().unwrap();
        assert_eq!(
            r("number").score(&s("the answer is 42", true)).unwrap(),
            1.0
        );
        assert_eq!(r("number").score(&s("42 or 43", true)).unwrap(), 0.0);
        assert_eq!(r("contains:an").score(&s("answer", true)).unwrap(), 1.0);
        assert_eq!(r("avoids:an").score(&s("answer", true)).unwrap(), 0.0);
        assert_eq!(r("length:5-9").score(&s("x", true)).unwrap(), 1.0);
        assert_eq!(r("length:6-9").score(&s("x", true)).unwrap(), 0.0);
        assert_eq!(
            r("json")
                .score(&s("```json\n{\"a\": 1}\n```", true))
                .unwrap(),
            1.0
        );
        assert_eq!(r("json").score(&s("{a: 1}", true)).unwrap(), 0.0);
        assert_eq!(r("eos").score(&s("x", false)).unwrap(), 0.0);
        for bad in ["contains", "length:9-5", "length:x", "nope", "json:1"] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
    }
}
