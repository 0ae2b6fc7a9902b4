//! `lmforge generate --prompts FILE`: every prompt of a JSONL file (the prompt format of online
//! RL: `{"prompt": …}`, pairs, conversations) decoded `batch` rows at a time, `samples` each;
//! one JSON line per response, and the decoding throughput (new tokens per second of decoding).

use super::{generate_chunked, Sampling};
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
    let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.2.clone()).collect();
    let t0 = std::time::Instant::now();
    let res = generate_chunked(&m.model, &ids, s, &m.stop_ids(), batch)?;
    let t = Throughput {
        responses: res.len(),
        new_tokens: res.iter().map(|o| o.tokens.len()).sum(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    for ((i, k, _), o) in rows.iter().zip(&res) {
        writeln!(
            out,
            "{}",
            json!({"at": ps[*i].at, "sample": k, "response": m.tok.decode(o.text_tokens(), true)?,
                "tokens": o.tokens.len(), "stop": o.stop.name()})
        )?;
    }
    Ok(t)
}
