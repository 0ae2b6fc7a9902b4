//! `lmforge generate --prompts FILE`: every prompt of a JSONL file (the prompt format of online
//! RL: `{"prompt": …}`, pairs, conversations) decoded `batch` rows at a time, `samples` each;
//! one JSON line per response, and the decoding throughput (new tokens per second of decoding).

use super::{generate_batch, Sampling, Stop};
use crate::chat::ChatTemplate;
use crate::model::LoadedModel;
use crate::train::rl::prompts;
use anyhow::Result;
use serde_json::json;
use std::io::Write;
use std::path::Path;

pub struct Throughput {
    pub responses: usize,
    pub new_tokens: usize,
    /// Seconds spent decoding (tokenization and output excluded).
    pub seconds: f64,
}

impl Throughput {
    pub fn tokens_per_s(&self) -> f64 {
        self.new_tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Decodes the prompts of `path` and writes one JSON line per response to `out`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    m: &LoadedModel,
    path: &Path,
    template: Option<&ChatTemplate>,
    s: &Sampling,
    batch: usize,
    samples: usize,
    max_prompt_len: usize,
    out: &mut dyn Write,
) -> Result<Throughput> {
    let ps = prompts::read(path)?;
    let mut rows = Vec::with_capacity(ps.len() * samples);
    for (i, p) in ps.iter().enumerate() {
        let (ids, _) = prompts::tokenize(p, &m.tok, template, max_prompt_len)?;
        for k in 0..samples {
            rows.push((i, k, ids.clone()));
        }
    }
    let mut t = Throughput {
        responses: 0,
        new_tokens: 0,
        seconds: 0.0,
    };
    for (c, chunk) in rows.chunks(batch.max(1)).enumerate() {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|r| r.2.clone()).collect();
        let sc = Sampling {
            seed: crate::rng::Rng::keyed(&[s.seed, c as u64]).next_u64(),
            ..s.clone()
        };
        let t0 = std::time::Instant::now();
        let res = generate_batch(&m.model, &ids, &sc, &m.stop_ids())?;
        t.seconds += t0.elapsed().as_secs_f64();
        for ((i, k, _), o) in chunk.iter().zip(res) {
            t.responses += 1;
            t.new_tokens += o.tokens.len();
            let text_ids = match o.stop {
                Stop::Eos => &o.tokens[..o.tokens.len() - 1],
                _ => &o.tokens[..],
            };
            let stop = match o.stop {
                Stop::Eos => "eos",
                Stop::MaxTokens => "max_tokens",
                Stop::ContextFull => "context_full",
            };
            writeln!(
                out,
                "{}",
                json!({"at": ps[*i].at, "sample": k, "response": m.tok.decode(text_ids, true)?,
                    "tokens": o.tokens.len(), "stop": stop})
            )?;
        }
    }
    Ok(t)
}
