//! RLAIF labelling (Lee et al. 2023, "RLAIF: Scaling Reinforcement Learning from Human Feedback
//! with AI Feedback"): a local judge model compares two responses to a prompt under a rubric,
//! and its preference becomes the label of a preference pair.
//!
//!   p₁ = P_judge("A" | rubric(x, y₁ as A, y₂ as B)),   p₂ = P_judge("A" | rubric(x, y₂ as A, y₁ as B))
//!   P(y₁ ≻ y₂) = (p₁ + (1 − p₂)) / 2
//!
//! P("A") is the judge's next-token distribution after the rubric, renormalised over the two
//! answers, each the sum over its spellings "A" and " A" (no free text is generated or parsed). Asking in both orders and
//! averaging cancels the judge's position bias (the paper's §3.1). Pairs with |P − ½| below
//! `--min-margin` are ties and are dropped. The rubric is a Jinja template with `prompt`,
//! `response_a` and `response_b`; chat models receive it as a user message through their chat
//! template, with the answer read at the start of the assistant's turn.
//!
//! Deliberate deviations from the paper: letters A/B instead of "1"/"2", and no chain-of-thought
//! or few-shot preamble (a 135M judge gains nothing from them; a rubric file can add examples).

use crate::chat::{render_sandboxed, Message};
use crate::data::preference::{dialogue_messages, parse_line, Record, Text};
use crate::model::{hf, ForwardOpts};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The default rubric: helpfulness and harmlessness, as in the HH-RLHF and RLAIF prompts.
pub const DEFAULT_RUBRIC: &str = "You are comparing two responses of an AI assistant to the same conversation. \
Choose the response that is more helpful, honest and harmless: it addresses what the user asked, is accurate, \
and does not help with anything dangerous, illegal or hateful.

Conversation:
{{ prompt }}

Response A:
{{ response_a }}

Response B:
{{ response_b }}

Which response is better? Answer with a single letter, A or B.";

/// What the judge said about one pair of responses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    /// P(first response better), averaged over both orders.
    pub p_first: f64,
    /// P("A") with the first response shown as A.
    pub p_a_first_shown_a: f64,
    /// P("A") with the second response shown as A.
    pub p_a_second_shown_a: f64,
}

pub struct Judge {
    m: hf::LoadedModel,
    rubric: String,
    chat: Option<crate::chat::ChatTemplate>,
    /// The single-token spellings of each answer ("A", " A"; "B", " B").
    a: Vec<u32>,
    b: Vec<u32>,
}

/// The ids of `letter` and " letter" that are single tokens: after "Answer:" a byte-level BPE
/// judge says " A", at the start of a chat turn "A"; both count.
fn letter_ids(tok: &crate::tokenizer::Tok, letter: &str) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for s in [letter.to_string(), format!(" {letter}")] {
        if let [id] = tok.encode(&s, false)?.as_slice() {
            if !ids.contains(id) {
                ids.push(*id);
            }
        }
    }
    if ids.is_empty() {
        bail!("the judge's tokenizer has no single token for {letter:?} or \" {letter}\"; it cannot answer A or B");
    }
    Ok(ids)
}

/// log Σ exp(l[i]) over `ids`.
fn log_sum(l: &[f32], ids: &[u32]) -> f64 {
    let m = ids
        .iter()
        .map(|&i| l[i as usize] as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    m + ids
        .iter()
        .map(|&i| (l[i as usize] as f64 - m).exp())
        .sum::<f64>()
        .ln()
}

/// A prompt as text for the rubric: plain text as given, messages as "role: content" lines.
pub fn plain(t: &Text) -> String {
    match t {
        Text::Plain(s) => match dialogue_messages(s) {
            Some(msgs) => plain(&Text::Messages(msgs)),
            None => s.trim().to_string(),
        },
        Text::Messages(m) => m
            .iter()
            .map(|m| {
                let who = match m.role.as_str() {
                    "user" => "User",
                    "assistant" => "Assistant",
                    _ => "System",
                };
                format!("{who}: {}", m.content.trim())
            })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// A response as text: plain text trimmed, messages' contents joined.
fn response(t: &Text) -> String {
    match t {
        Text::Plain(s) => s.trim().to_string(),
        Text::Messages(m) => m
            .iter()
            .map(|m| m.content.trim())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

impl Judge {
    pub fn new(m: hf::LoadedModel, rubric: Option<String>) -> Result<Self> {
        let chat = match m.chat_template {
            Some(_) => Some(m.chat("judge")?),
            None => None,
        };
        let rubric = rubric.unwrap_or_else(|| DEFAULT_RUBRIC.to_string());
        // A rubric that cannot render fails here, not after the first hundred pairs.
        render_sandboxed(
            &rubric,
            minijinja::context! { prompt => "", response_a => "", response_b => "" },
            "the rubric",
        )?;
        Ok(Self {
            a: letter_ids(&m.tok, "A")?,
            b: letter_ids(&m.tok, "B")?,
            m,
            rubric,
            chat,
        })
    }

    /// The judge's input ids for one order.
    fn input(&self, prompt: &str, a: &str, b: &str, max_len: usize) -> Result<Vec<u32>> {
        let ctx = minijinja::context! { prompt => prompt, response_a => a, response_b => b };
        let text = render_sandboxed(&self.rubric, ctx, "the rubric")?;
        let ids = match &self.chat {
            Some(t) => {
                let s = t.render(&[Message::new("user", &text)], true)?;
                self.m.tok.encode(&s, false)?
            }
            None => self.m.tok.encode(&format!("{text}\nAnswer:"), true)?,
        };
        if ids.len() > max_len {
            bail!("the judge's input is {} tokens, more than --max-len {max_len} (or the judge's context)", ids.len());
        }
        Ok(ids)
    }

    /// P("A") of each input, renormalised over the two letters.
    fn p_a(&self, inputs: &[Vec<u32>]) -> Result<Vec<f64>> {
        let model = &self.m.model;
        let dev = model.device();
        let t = inputs.iter().map(Vec::len).max().unwrap_or(1);
        let mut x = Vec::with_capacity(inputs.len() * t);
        let mut last = Vec::with_capacity(inputs.len());
        for (i, r) in inputs.iter().enumerate() {
            x.extend_from_slice(r);
            x.extend(std::iter::repeat_n(0u32, t - r.len()));
            last.push((i * t + r.len() - 1) as u32);
        }
        let x = Tensor::from_vec(x, (inputs.len(), t), dev)?;
        let h = model.hidden_states(&model.embed(&x)?, ForwardOpts::default())?;
        let c = model.cfg.hidden_size;
        let h = h
            .reshape((inputs.len() * t, c))?
            .index_select(&Tensor::from_vec(last, inputs.len(), dev)?, 0)?;
        let logits: Vec<Vec<f32>> = model.logits(&h)?.to_dtype(DType::F32)?.to_vec2()?;
        logits
            .iter()
            .map(|l| {
                let (la, lb) = (log_sum(l, &self.a), log_sum(l, &self.b));
                if !(la.is_finite() && lb.is_finite()) {
                    bail!("the judge's logits are not finite: its weights or config are broken");
                }
                Ok(1.0 / (1.0 + (lb - la).exp()))
            })
            .collect()
    }

    /// Judges `(prompt, first, second)` triples in both orders, `batch` inputs per forward.
    pub fn judge(
        &self,
        items: &[(String, String, String)],
        max_len: usize,
        batch: usize,
    ) -> Result<Vec<Judgement>> {
        let max_len = max_len.min(self.m.model.cfg.max_position_embeddings);
        let mut inputs = Vec::with_capacity(2 * items.len());
        for (p, y1, y2) in items {
            inputs.push(self.input(p, y1, y2, max_len)?);
            inputs.push(self.input(p, y2, y1, max_len)?);
        }
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(inputs[i].len()));
        let mut p = vec![0f64; inputs.len()];
        for chunk in order.chunks(batch.max(1)) {
            let rows: Vec<Vec<u32>> = chunk.iter().map(|&i| inputs[i].clone()).collect();
            for (&i, v) in chunk.iter().zip(self.p_a(&rows)?) {
                p[i] = v;
            }
        }
        Ok(p.chunks_exact(2)
            .map(|q| Judgement {
                p_first: (q[0] + 1.0 - q[1]) / 2.0,
                p_a_first_shown_a: q[0],
                p_a_second_shown_a: q[1],
            })
            .collect())
    }
}

/// `lmforge label`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct LabelArgs {
    /// The judge: an HF directory or a .gguf file (e.g. an instruct model).
    #[arg(long)]
    pub judge: PathBuf,
    /// JSONL: {"prompt", "responses": [a, b]} to label, or preference pairs (their labels are
    /// then compared with the judge's).
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write the labelled pairs (JSONL: prompt, chosen, rejected, judge's probabilities).
    #[arg(long)]
    pub out: PathBuf,
    /// A Jinja rubric with {{ prompt }}, {{ response_a }}, {{ response_b }} (default: helpful
    /// and harmless).
    #[arg(long)]
    pub rubric: Option<PathBuf>,
    /// Drop pairs whose preference is within this of ½ (ties).
    #[arg(long, default_value_t = 0.05)]
    pub min_margin: f64,
    /// Judge only this many records, a seeded sample.
    #[arg(long)]
    pub sample: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Judge inputs longer than this are an error.
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Replace an existing --out file.
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Instead of given responses: sample this many per prompt of --data (prompt records, as
    /// `grpo` reads them) from --policy; the judge compares every two of them and the best and
    /// the worst become a pair.
    #[arg(long, requires = "policy")]
    pub candidates: Option<usize>,
    /// With --candidates: the model to sample from (HF directory or .gguf).
    #[arg(long, requires = "candidates")]
    pub policy: Option<PathBuf>,
    /// With --candidates: sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// With --candidates: longest response, in tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
}

/// One record to label: the prompt, two responses, and which one people chose (if known).
struct Item {
    prompt: Text,
    first: Text,
    second: Text,
    /// `Some(true)`: the first response is the human-chosen one.
    human_first: Option<bool>,
    at: String,
}

fn read_items(path: &Path, say: &dyn Fn(&str)) -> Result<Vec<Item>> {
    let mut out = Vec::new();
    for item in crate::input::lines(path)? {
        let (i, line) = item?;
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{i}", path.display());
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("{at}: invalid JSON"))?;
        if let Some(r) = v.get("responses") {
            let Some([a, b]) = r.as_array().map(Vec::as_slice) else {
                bail!("{at}: \"responses\" must be a list of two responses");
            };
            let text = |x: &Value| -> Result<Text> {
                match x {
                    Value::String(s) => Ok(Text::Plain(s.clone())),
                    _ => bail!("{at}: each response must be a string"),
                }
            };
            let prompt = match v.get("prompt") {
                Some(Value::String(s)) => Text::Plain(s.clone()),
                _ => bail!("{at}: \"prompt\" must be a string"),
            };
            out.push(Item {
                prompt,
                first: text(a)?,
                second: text(b)?,
                human_first: None,
                at,
            });
            continue;
        }
        match parse_line(&line, &at)? {
            Ok(Record::Pair {
                prompt,
                chosen,
                rejected,
                ..
            }) => {
                // Alternate which side comes first, so "first" carries no label information.
                let swap = (i % 2) == 0;
                let (first, second) = if swap {
                    (rejected, chosen)
                } else {
                    (chosen, rejected)
                };
                out.push(Item {
                    prompt,
                    first,
                    second,
                    human_first: Some(!swap),
                    at,
                });
            }
            Ok(Record::Unpaired { .. }) => {
                bail!("{at}: an unpaired example; label needs two responses")
            }
            Err(reason) => say(&format!("{at}: skipped: {}", reason.why())),
        }
    }
    if out.is_empty() {
        bail!("{}: nothing to label", path.display());
    }
    Ok(out)
}

fn to_json(t: &Text) -> Value {
    match t {
        Text::Plain(s) => json!(s),
        Text::Messages(m) => json!(m),
    }
}

/// What `label` measured.
#[derive(Debug, Clone, Default)]
pub struct LabelReport {
    pub judged: usize,
    pub kept: usize,
    pub ties: usize,
    /// Pairs with a human label, and how many of them the judge agreed with (all / kept).
    pub labelled: usize,
    pub agree: usize,
    pub labelled_kept: usize,
    pub agree_kept: usize,
    /// Mean P("A") over all inputs: 0.5 for a judge without position bias.
    pub mean_p_a: f64,
    pub seconds: f64,
}

pub fn label(a: &LabelArgs, say: &dyn Fn(&str)) -> Result<LabelReport> {
    crate::outdir::check_file(&a.out, a.overwrite)?;
    // Fail now, not after hours of judging.
    if let Some(d) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !d.is_dir() {
            bail!(
                "--out {}: the directory {} does not exist",
                a.out.display(),
                d.display()
            );
        }
    }
    if a.sample == Some(0) {
        bail!("--sample 0 judges nothing");
    }
    if !(0.0..0.5).contains(&a.min_margin) {
        bail!("--min-margin must be in [0, 0.5), got {}", a.min_margin);
    }
    if let Some(n) = a.candidates {
        return label_candidates(a, n, say);
    }
    let mut items = read_items(&a.data, say)?;
    if a.sample.is_some() {
        let keep = sampled(a, items.len());
        let mut all: Vec<Option<Item>> = items.into_iter().map(Some).collect();
        items = keep.into_iter().filter_map(|i| all[i].take()).collect();
    }
    let dev = crate::device(&a.device)?;
    let judge = load_judge(a, &dev)?;
    let t0 = std::time::Instant::now();
    let triples: Vec<(String, String, String)> = items
        .iter()
        .map(|it| (plain(&it.prompt), response(&it.first), response(&it.second)))
        .collect();
    let verdicts = judge.judge(&triples, a.max_len, a.batch_size)?;
    let mut rep = LabelReport {
        judged: items.len(),
        ..Default::default()
    };
    let mut lines = String::new();
    for (it, j) in items.iter().zip(&verdicts) {
        rep.mean_p_a += (j.p_a_first_shown_a + j.p_a_second_shown_a) / (2 * items.len()) as f64;
        let tie = (j.p_first - 0.5).abs() < a.min_margin;
        let judge_first = j.p_first > 0.5;
        if let Some(h) = it.human_first {
            rep.labelled += 1;
            rep.agree += usize::from(h == judge_first);
            if !tie {
                rep.labelled_kept += 1;
                rep.agree_kept += usize::from(h == judge_first);
            }
        }
        if tie {
            rep.ties += 1;
            continue;
        }
        rep.kept += 1;
        let (c, r) = if judge_first {
            (&it.first, &it.second)
        } else {
            (&it.second, &it.first)
        };
        let p_chosen = if judge_first {
            j.p_first
        } else {
            1.0 - j.p_first
        };
        let mut line = json!({"prompt": to_json(&it.prompt), "chosen": to_json(c), "rejected": to_json(r),
            "judge_p_chosen": p_chosen, "judge_p_a": [j.p_a_first_shown_a, j.p_a_second_shown_a], "source": it.at});
        if let Some(h) = it.human_first {
            line["human_agrees"] = json!(h == judge_first);
        }
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    rep.seconds = t0.elapsed().as_secs_f64();
    crate::fsutil::write_file(&a.out, lines.as_bytes())?;
    Ok(rep)
}

/// The judge of `--judge` with the rubric of `--rubric` (or the default).
fn load_judge(a: &LabelArgs, dev: &candle_core::Device) -> Result<Judge> {
    let rubric = match &a.rubric {
        Some(p) => Some(crate::input::read_text(p, crate::input::MAX_CONFIG_BYTES)?),
        None => None,
    };
    Judge::new(hf::load(&a.judge, dev, &|_| true)?, rubric)
}

/// The indices a seeded `--sample` keeps of `n` records, in file order.
fn sampled(a: &LabelArgs, n: usize) -> Vec<usize> {
    match a.sample {
        Some(k) => {
            let mut keep: Vec<usize> = crate::rng::permutation(a.seed, 0, n)
                .into_iter()
                .take(k)
                .collect();
            keep.sort_unstable();
            keep
        }
        None => (0..n).collect(),
    }
}

/// `--candidates N`: N responses per prompt from the policy (batched), every two judged in both
/// orders; a candidate's score is its mean probability of beating the others (a Borda count),
/// and the best and worst of each prompt become a pair when the judge separates them by more
/// than `--min-margin`.
fn label_candidates(a: &LabelArgs, n: usize, say: &dyn Fn(&str)) -> Result<LabelReport> {
    use crate::generate::{generate_chunked, Sampling};
    use crate::train::rl::prompts;
    if n < 2 {
        bail!("--candidates must be at least 2, got {n}");
    }
    let policy = a
        .policy
        .as_ref()
        .context("--candidates needs --policy MODEL")?;
    let all = prompts::read(&a.data)?;
    let ps: Vec<prompts::Prompt> = sampled(a, all.len())
        .into_iter()
        .map(|i| all[i].clone())
        .collect();
    let dev = crate::device(&a.device)?;
    let t0 = std::time::Instant::now();
    // 1. Candidates, the policy freed before the judge loads.
    let responses: Vec<Vec<String>> = {
        let pm = hf::load(policy, &dev, &|_| true)?;
        let tpl = match &pm.chat_template {
            Some(_) => Some(pm.chat(&policy.display().to_string())?),
            None => None,
        };
        let ctx = pm.model.cfg.max_position_embeddings;
        let max_prompt = prompts::room(ctx, a.max_new_tokens, usize::MAX)?;
        let mut rows = Vec::with_capacity(ps.len() * n);
        for p in &ps {
            let (ids, _) = prompts::tokenize(p, &pm.tok, tpl.as_ref(), max_prompt)?;
            rows.extend(std::iter::repeat_n(ids, n));
        }
        let s = Sampling {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_k: None,
            top_p: None,
            seed: a.seed,
        };
        let mut texts = Vec::with_capacity(rows.len());
        for o in generate_chunked(&pm.model, &rows, &s, &pm.stop_ids(), 32)? {
            texts.push(pm.tok.decode(o.text_tokens(), true)?);
        }
        texts.chunks(n).map(<[String]>::to_vec).collect()
    };
    say(&format!(
        "sampled {} candidates for {} prompts in {:.1}s",
        ps.len() * n,
        ps.len(),
        t0.elapsed().as_secs_f64()
    ));
    // 2. Every two candidates of a prompt, judged.
    let judge = load_judge(a, &dev)?;
    let mut triples = Vec::new();
    let mut which = Vec::new();
    for (k, (p, rs)) in ps.iter().zip(&responses).enumerate() {
        for i in 0..n {
            for j in i + 1..n {
                triples.push((plain(&p.text), rs[i].clone(), rs[j].clone()));
                which.push((k, i, j));
            }
        }
    }
    let verdicts = judge.judge(&triples, a.max_len, a.batch_size)?;
    let mut wins = vec![vec![0f64; n]; ps.len()];
    let mut pair = std::collections::HashMap::new();
    let mut rep = LabelReport {
        judged: triples.len(),
        ..Default::default()
    };
    for (&(k, i, j), v) in which.iter().zip(&verdicts) {
        wins[k][i] += v.p_first;
        wins[k][j] += 1.0 - v.p_first;
        pair.insert((k, i, j), v.p_first);
        rep.mean_p_a += (v.p_a_first_shown_a + v.p_a_second_shown_a) / (2 * verdicts.len()) as f64;
    }
    // 3. Best against worst.
    let mut lines = String::new();
    for (k, p) in ps.iter().enumerate() {
        let w = &wins[k];
        let best = (0..n).max_by(|&x, &y| w[x].total_cmp(&w[y])).unwrap_or(0);
        let worst = (0..n).min_by(|&x, &y| w[x].total_cmp(&w[y])).unwrap_or(0);
        let p_best = match (best.min(worst), best.max(worst)) {
            (i, j) if i == best => pair.get(&(k, i, j)).copied(),
            (i, j) => pair.get(&(k, i, j)).map(|q| 1.0 - q),
        }
        .unwrap_or(0.5);
        let (c, r) = (&responses[k][best], &responses[k][worst]);
        if best == worst || c == r || (p_best - 0.5).abs() < a.min_margin {
            rep.ties += 1;
            continue;
        }
        rep.kept += 1;
        let answer = |t: &String| match &p.text {
            Text::Plain(_) => json!(t),
            Text::Messages(_) => json!([{"role": "assistant", "content": t}]),
        };
        let scores: Vec<f64> = w.iter().map(|x| x / (n - 1) as f64).collect();
        let line = json!({"prompt": to_json(&p.text), "chosen": answer(c), "rejected": answer(r),
            "judge_p_chosen": p_best, "candidate_scores": scores, "candidates": n, "source": p.at});
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    rep.seconds = t0.elapsed().as_secs_f64();
    crate::fsutil::write_file(&a.out, lines.as_bytes())?;
    Ok(rep)
}
