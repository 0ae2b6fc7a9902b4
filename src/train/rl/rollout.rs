//! A rollout: responses sampled from the policy for a batch of prompts (k per prompt, in
//! consecutive groups), their rewards, and per response token the log-probs the update needs —
//! the policy's before the update ("old", from a forward pass with dropout off, as TRL computes
//! them, not the sampler's), the reference's, and the value head's estimates.
//!
//! A rollout serves every optimizer step until the next one, so a checkpoint taken between
//! those steps saves it (it cannot be re-sampled: the weights have moved since).

use super::prompts::Prompt;
use super::rewards::{Rewards, Sample};
use crate::data::sft::Tokenized;
use crate::generate::{generate_chunked, Sampling, Stop};
use crate::model::layers::Linear;
use crate::model::DecoderModel;
use crate::train::logps::{completion_states, token_logps, Reference, SeqBatch};
use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Rollout {
    /// Which rollout of the run this is (0, 1, …).
    pub index: u64,
    /// Per row: the prompt's index.
    pub prompt: Vec<usize>,
    /// Per row: prompt tokens then response tokens.
    pub seqs: Vec<Vec<u32>>,
    pub prompt_len: Vec<usize>,
    /// Ended with EOS (the EOS is the last response token).
    pub eos: Vec<bool>,
    pub texts: Vec<String>,
    /// Total reward of each row (before any KL term), and each source's.
    pub scores: Vec<f64>,
    pub per_source: Vec<Vec<f64>>,
    /// Per row, per response token: the sampler's log-probs; the policy's before the update
    /// (empty when the rollout serves one step: the step's own forward gives them); the
    /// reference's (empty without a reference); the values (PPO).
    pub sampled: Vec<Vec<f32>>,
    pub old: Vec<Vec<f32>>,
    pub refs: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    /// Per row, per response token: advantages and value targets.
    pub adv: Vec<Vec<f32>>,
    pub returns: Vec<Vec<f32>>,
}

impl Rollout {
    pub fn rows(&self) -> usize {
        self.seqs.len()
    }

    /// Rejects a rollout (read from a checkpoint) whose parts do not fit together: `rows` rows
    /// over `prompts` prompts, every per-token field empty or one value per response token.
    pub fn check(&self, rows: usize, prompts: usize) -> Result<()> {
        let n = self.seqs.len();
        let per_row = [
            self.prompt.len(),
            self.prompt_len.len(),
            self.eos.len(),
            self.texts.len(),
            self.scores.len(),
            self.sampled.len(),
        ];
        if n != rows || per_row.iter().any(|&l| l != n) {
            anyhow::bail!("{n} rows where {rows} are expected, or fields of other lengths");
        }
        for i in 0..n {
            let p = self.prompt_len[i];
            if self.prompt[i] >= prompts || p == 0 || p >= self.seqs[i].len() {
                anyhow::bail!("row {i} has no response or an unknown prompt");
            }
            let len = self.response_len(i);
            let fields = [
                &self.sampled,
                &self.old,
                &self.refs,
                &self.values,
                &self.adv,
                &self.returns,
            ];
            for f in fields {
                if !f.is_empty() && (f.len() != n || f[i].len() != len) {
                    anyhow::bail!(
                        "row {i}: per-token values do not match its {len} response tokens"
                    );
                }
            }
        }
        Ok(())
    }

    /// Row r's per-token k1 estimate of KL(π_old ‖ π_ref): log π_old − log π_ref.
    pub fn k1(&self, r: usize) -> Vec<f32> {
        let k1 = crate::losses::rl::KlEstimator::K1;
        self.old[r]
            .iter()
            .zip(&self.refs[r])
            .map(|(&o, &f)| crate::losses::rl::kl(k1, o, f))
            .collect()
    }

    pub fn response_len(&self, r: usize) -> usize {
        self.seqs[r].len() - self.prompt_len[r]
    }

    /// Rows as model inputs whose response tokens are scored. With `pack`, the rows of one
    /// prompt are packed into one sequence — the prompt once, then each response, seeing the
    /// prompt and itself (`Packing::shared_prompts`) — so k samples pay for their prompt once;
    /// the prompt's last token predicts every response's first. Otherwise (or without shared
    /// prompts): right-padded rows. Models with a sliding window must not pack: the window
    /// counts columns, and a later response sits further from its prompt than its positions say.
    pub fn batch(
        &self,
        rows: &[usize],
        pad: u32,
        dev: &candle_core::Device,
        pack: bool,
    ) -> Result<SeqBatch> {
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut slot = std::collections::HashMap::new();
        for &r in rows {
            let g = *slot.entry(self.prompt[r]).or_insert_with(|| {
                groups.push((self.prompt[r], Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push(r);
        }
        if !pack || groups.iter().all(|g| g.1.len() == 1) {
            let t: Vec<Tokenized> = rows
                .iter()
                .map(|&r| {
                    let (n, p) = (self.seqs[r].len(), self.prompt_len[r]);
                    Tokenized {
                        ids: self.seqs[r].clone(),
                        train: (0..n).map(|i| i >= p).collect(),
                    }
                })
                .collect();
            let refs: Vec<&Tokenized> = t.iter().collect();
            return Ok(SeqBatch::new(&refs, pad));
        }
        // Each packed row: the prompt, then every member's response but its last token (which
        // is only predicted). `offset[r]`: where row r's response inputs start in its row.
        let mut offset = std::collections::HashMap::new();
        let mut spec = Vec::with_capacity(groups.len());
        for (_, members) in &groups {
            let p = self.prompt_len[members[0]];
            let mut at = p;
            let mut lens = Vec::with_capacity(members.len());
            for &r in members {
                offset.insert(r, at);
                let l = self.response_len(r) - 1;
                lens.push(l);
                at += l;
            }
            spec.push((p, lens));
        }
        let t = spec
            .iter()
            .map(|(p, l)| p + l.iter().sum::<usize>())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut x = Vec::with_capacity(groups.len() * t);
        for (_, members) in &groups {
            let r0 = members[0];
            x.extend_from_slice(&self.seqs[r0][..self.prompt_len[r0]]);
            for &r in members {
                let resp = &self.seqs[r][self.prompt_len[r]..];
                x.extend_from_slice(&resp[..resp.len() - 1]);
            }
            x.resize(x.len().div_ceil(t) * t, pad);
        }
        let (mut at, mut targets, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        for &r in rows {
            let base = slot[&self.prompt[r]] * t;
            let (p, off) = (self.prompt_len[r], offset[&r]);
            let resp = &self.seqs[r][p..];
            for (j, &y) in resp.iter().enumerate() {
                at.push((base + if j == 0 { p - 1 } else { off + j - 1 }) as u32);
                targets.push(y);
            }
            counts.push(resp.len());
        }
        Ok(SeqBatch {
            x,
            b: groups.len(),
            t,
            at,
            targets,
            counts,
            packing: Some(crate::model::Packing::shared_prompts(&spec, t, dev)?),
        })
    }

    /// A per-token field of `rows`, flattened in `batch` order, as a tensor (N,).
    pub fn gather(
        &self,
        field: &[Vec<f32>],
        rows: &[usize],
        dev: &candle_core::Device,
    ) -> Result<Tensor> {
        let v: Vec<f32> = rows
            .iter()
            .flat_map(|&r| field[r].iter().copied())
            .collect();
        let n = v.len();
        Ok(Tensor::from_vec(v, n, dev)?)
    }
}

/// Samples the responses of `prompts` (indices into `ids`/`all`), `k` each, `chunk` rows per
/// generation batch, and scores them with `rewards`.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    model: &DecoderModel,
    tok: &crate::tokenizer::Tok,
    (all, ids): (&[Prompt], &[Vec<u32>]),
    prompts: &[usize],
    k: usize,
    s: &Sampling,
    eos: &[u32],
    chunk: usize,
    rewards: &Rewards,
) -> Result<Rollout> {
    // Decoding needs no graph: a detached view of the same weights.
    let model = &model.detached();
    let rows: Vec<usize> = prompts
        .iter()
        .flat_map(|&p| std::iter::repeat_n(p, k))
        .collect();
    let ps: Vec<Vec<u32>> = rows.iter().map(|&p| ids[p].clone()).collect();
    let mut r = Rollout::default();
    for (&p, o) in rows
        .iter()
        .zip(generate_chunked(model, &ps, s, eos, chunk)?)
    {
        r.texts.push(tok.decode(o.text_tokens(), true)?);
        r.prompt.push(p);
        r.prompt_len.push(ids[p].len());
        r.seqs
            .push(ids[p].iter().chain(&o.tokens).copied().collect());
        r.eos.push(o.stop == Stop::Eos);
        r.sampled.push(o.logps);
    }
    let samples: Vec<Sample> = (0..r.rows())
        .map(|i| Sample {
            prompt: &all[r.prompt[i]],
            response: &r.texts[i],
            tokens: r.response_len(i),
            eos: r.eos[i],
        })
        .collect();
    let (total, each) = rewards.score(&samples)?;
    r.scores = total;
    r.per_source = each;
    Ok(r)
}

/// The policy's per-token log-probs (N,) and values (N,) of a batch of rows, with a graph.
pub struct Forward {
    pub logps: Tensor,
    pub values: Option<Tensor>,
}

pub fn forward(
    model: &DecoderModel,
    head: Option<&Linear>,
    s: &SeqBatch,
    temperature: f64,
) -> Result<Forward> {
    let h = completion_states(model, s)?; // (N, C)
    let values = match head {
        Some(l) => Some(l.forward(&h)?.squeeze(1)?),
        None => None,
    };
    Ok(Forward {
        logps: token_logps(model, &h, s, temperature)?,
        values,
    })
}

/// Whether a model's update batches may pack a prompt's samples (no sliding window).
pub fn packs(model: &DecoderModel) -> bool {
    model.cfg.sliding_window.iter().all(Option::is_none)
}

/// Splits a flat (N,) tensor back into rows of `counts` tokens.
pub fn split_rows(t: &Tensor, counts: &[usize]) -> Result<Vec<Vec<f32>>> {
    let v: Vec<f32> = t.detach().to_dtype(DType::F32)?.to_vec1()?;
    let mut out = Vec::with_capacity(counts.len());
    let mut k = 0;
    for &c in counts {
        out.push(v[k..k + c].to_vec());
        k += c;
    }
    Ok(out)
}

/// Fills `old` (and `values`) with the policy's estimates, micro-batch by micro-batch in
/// `groups` — the first epoch's micro-batches, so the first update's forward repeats each one
/// exactly (ratio 1) — and `refs` with the reference's when there is one.
#[allow(clippy::too_many_arguments)]
pub fn score(
    r: &mut Rollout,
    model: &DecoderModel,
    head: Option<&Linear>,
    reference: Option<&Reference>,
    groups: &[Vec<usize>],
    pad: u32,
    temperature: f64,
    policy_pass: bool,
) -> Result<()> {
    // No gradient here either: detached views of the same weights.
    let model = &model.detached();
    let head = head.map(Linear::detached);
    let head = head.as_ref();
    let n = r.rows();
    if policy_pass {
        r.old = vec![Vec::new(); n];
        if head.is_some() {
            r.values = vec![Vec::new(); n];
        }
    }
    if reference.is_some() {
        r.refs = vec![Vec::new(); n];
    }
    for g in groups {
        let s = r.batch(g, pad, model.device(), packs(model))?;
        if policy_pass {
            let f = forward(model, head, &s, temperature)?;
            for (&row, v) in g.iter().zip(split_rows(&f.logps, &s.counts)?) {
                r.old[row] = v;
            }
            if let Some(v) = &f.values {
                for (&row, x) in g.iter().zip(split_rows(v, &s.counts)?) {
                    r.values[row] = x;
                }
            }
        }
        if let Some(rf) = reference {
            let t = rf.token_logps(model, &s, temperature)?;
            for (&row, v) in g.iter().zip(split_rows(&t, &s.counts)?) {
                r.refs[row] = v;
            }
        }
    }
    Ok(())
}
