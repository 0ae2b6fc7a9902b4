//! Continuous batching (Orca, Yu et al. 2022, iteration-level scheduling): one thread owns the
//! model and runs one decode step for every admitted request at a time; between steps, requests
//! that finished leave the batch and waiting ones join it, so a short answer never waits for a
//! long one and a new request waits at most one step plus its own prefill.
//!
//! The batch shares one KV cache with left-padded rows (the layout `generate::batch` decodes):
//! a request is prefilled alone, then its cache rows are appended (`KvCache::append_rows`: the
//! shorter side gets zero columns its padding mask hides), each row keeps its own positions
//! (`Packing::left_padded`), and padding no row needs any more is dropped after rows leave.
//! Sampling is `generate::sample_logp` per row from the row's own stream, keyed by its seed as
//! `lmforge generate` keys it, after OpenAI's `logit_bias` and presence/frequency penalties.
//!
//! Deliberate limits: the prefill is not chunked (a long prompt holds the batch for its
//! prefill); requests for another model wait until the batch drains, then it is loaded in place
//! of the current one (the dashboard's playground switches checkpoints this way).

use super::catalog::Catalog;
use super::text::{Detok, Incremental};
use crate::chat::Message;
use crate::generate::{check_finite, sample_logp, Sampling};
use crate::model::hf::LoadedModel;
use crate::model::{ForwardOpts, KvCache, Packing};
use crate::rng::Rng;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;

/// What a request asks the model for.
pub enum Input {
    /// Rendered through the model's chat template (with the generation prompt).
    Chat(Vec<Message>),
    /// Raw text, tokenized with the tokenizer's special tokens (as `generate` does).
    Text(String),
}

/// One request, validated by the API layer (`openai.rs`) except for what needs the model.
pub struct Job {
    pub model: String,
    pub input: Input,
    pub sampling: Sampling,
    /// OpenAI's `stop`: the answer ends before the first of these.
    pub stop: Vec<String>,
    pub logit_bias: Vec<(u32, f32)>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub events: Sender<Event>,
    /// Set by the connection when its client goes away: the row leaves at the next step.
    pub cancel: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` or the context.
    Length,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the model thread tells a request, in order: `Started`, `Text`…, `Done` — or `Failed`
/// before `Started` (bad prompt, model that does not load).
pub enum Event {
    Started {
        prompt_tokens: usize,
    },
    Text(String),
    Done {
        finish: Finish,
        completion_tokens: usize,
    },
    Failed(Refusal),
}

/// Why a request was refused; `status` is its HTTP status, `code` OpenAI's error code.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

/// Server-wide limits on one request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Requests decoded together.
    pub max_batch: usize,
    /// Requests waiting for a place in the batch (more: 429).
    pub queue: usize,
    /// Largest `max_tokens` a request may ask for (and the default).
    pub max_tokens: usize,
    /// Longest prompt in tokens (also capped by the model's context).
    pub max_prompt_tokens: usize,
}

/// Counters for `/health` and the load test.
#[derive(Default)]
pub struct Stats {
    pub active: AtomicUsize,
    /// The most rows one step has decoded together.
    pub peak_batch: AtomicUsize,
    pub queued: AtomicUsize,
    pub served: AtomicU64,
    pub cancelled: AtomicU64,
    pub tokens: AtomicU64,
}

/// The handle connections hold: submit a job, or learn that the queue is full.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Job>,
    queue: usize,
    max_batch: usize,
    pub stats: Arc<Stats>,
}

impl Batcher {
    /// Starts the model thread. `first` (a model id of the catalog) is loaded before it returns,
    /// so a model that does not load stops the server at start-up, not at the first request.
    /// Also returns the first model's context.
    pub fn start(
        catalog: Arc<Catalog>,
        limits: Limits,
        first: Option<&str>,
    ) -> Result<(Self, Option<usize>)> {
        let (tx, rx) = std::sync::mpsc::sync_channel(limits.queue + limits.max_batch);
        let (queue, max_batch) = (limits.queue, limits.max_batch);
        let stats = Arc::new(Stats::default());
        let loaded = match first {
            Some(id) => Some((id.to_string(), catalog.load(id)?)),
            None => None,
        };
        let ctx = loaded.as_ref().map(|(_, m)| m.model.context());
        let st = stats.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .build()
            .context("starting the thread pool")?;
        std::thread::Builder::new()
            .name("lmforge-model".into())
            .spawn(move || {
                // Decoding ops started from a pool thread run at once (see `cmd_generate`).
                pool.install(|| {
                    let mut engine = Engine {
                        catalog,
                        limits,
                        stats: st,
                        loaded,
                        rows: Vec::new(),
                        cache: KvCache::new(0),
                        pending: None,
                    };
                    engine.run(rx)
                })
            })
            .context("starting the model thread")?;
        Ok((
            Self {
                tx,
                stats,
                queue,
                max_batch,
            },
            ctx,
        ))
    }

    /// Queues `job`; `Err(true)` when the queue is full, `Err(false)` when the model thread is
    /// gone. The queue holds `--queue` requests beyond the batch's free places (requests the
    /// model thread has not picked up yet are counted as waiting, not as refused).
    pub fn submit(&self, job: Job) -> std::result::Result<(), bool> {
        let room = self.queue
            + self
                .max_batch
                .saturating_sub(self.stats.active.load(Ordering::SeqCst));
        let counted = self
            .stats
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < room).then_some(q + 1)
            });
        if counted.is_err() {
            return Err(true);
        }
        let full = match self.tx.try_send(job) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(_)) => true,
            Err(TrySendError::Disconnected(_)) => false,
        };
        self.stats.queued.fetch_sub(1, Ordering::SeqCst);
        Err(full)
    }
}

/// A request in the batch.
struct Row {
    job: Job,
    /// Left padding of its cache row.
    pad: usize,
    prompt_len: usize,
    tokens: Vec<u32>,
    /// Sampled, not yet run through the model.
    next: u32,
    rng: Rng,
    counts: std::collections::HashMap<u32, u32>,
    /// The answer's text so far (released by `inc`, sent as `detok` allows).
    text: String,
    inc: Incremental,
    detok: Detok,
}

struct Engine {
    catalog: Arc<Catalog>,
    limits: Limits,
    stats: Arc<Stats>,
    loaded: Option<(String, LoadedModel)>,
    rows: Vec<Row>,
    cache: KvCache,
    /// A job for another model, waiting for the batch to drain.
    pending: Option<Job>,
}

impl Engine {
    fn run(&mut self, rx: Receiver<Job>) {
        loop {
            // Nothing to decode: sleep until a request comes (or every sender is gone).
            if self.rows.is_empty() && self.pending.is_none() {
                match rx.recv() {
                    Ok(j) => self.pending = Some(j),
                    Err(_) => return,
                }
            }
            // A panic in a prefill or a step (a bug, or a kernel meeting a shape it should not)
            // fails the rows it touched, not the server: the thread would take the queue with it.
            let admitted =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.admit(&rx)));
            let stepped = match admitted {
                Ok(()) if self.rows.is_empty() => Ok(Ok(())),
                Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step())),
                Err(p) => Err(p),
            };
            let failure = match stepped {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(p) => Some(panic_message(p.as_ref())),
            };
            if let Some(msg) = failure {
                // A failing step (out of memory, a broken model) fails every row in it.
                eprintln!("error: decoding step failed: {msg}");
                for r in self.rows.drain(..) {
                    let _ = r.job.events.send(Event::Failed(Refusal {
                        status: 500,
                        code: "server_error",
                        message: msg.clone(),
                    }));
                }
                self.cache = KvCache::new(0);
            }
            self.stats.active.store(self.rows.len(), Ordering::SeqCst);
        }
    }

    /// Fills free places of the batch from the pending job and the queue.
    fn admit(&mut self, rx: &Receiver<Job>) {
        while self.rows.len() < self.limits.max_batch {
            let job = match self.pending.take() {
                Some(j) => j,
                None => match rx.try_recv() {
                    Ok(j) => j,
                    Err(_) => return,
                },
            };
            if self.loaded.as_ref().is_none_or(|(id, _)| *id != job.model) && !self.rows.is_empty()
            {
                // Another model: it waits (still queued) until the batch drains.
                self.pending = Some(job);
                return;
            }
            // Counted as active from here (its prefill may take a while): the queue's room is
            // computed from both counters.
            self.stats
                .active
                .store(self.rows.len() + 1, Ordering::SeqCst);
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            if job.cancel.load(Ordering::SeqCst) {
                self.stats.active.store(self.rows.len(), Ordering::SeqCst);
                self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            if self.loaded.as_ref().is_none_or(|(id, _)| *id != job.model) {
                // Drop the old model before loading the next: one set of weights in memory.
                self.loaded = None;
                self.cache = KvCache::new(0);
                match self.catalog.load(&job.model) {
                    Ok(m) => self.loaded = Some((job.model.clone(), m)),
                    Err(e) => {
                        let _ = job.events.send(Event::Failed(Refusal {
                            status: 500,
                            code: "model_load_failed",
                            message: format!("loading model {}: {e:#}", job.model),
                        }));
                        self.stats.active.store(self.rows.len(), Ordering::SeqCst);
                        continue;
                    }
                }
            }
            let events = job.events.clone();
            if let Err(r) = self.prefill(job) {
                let _ = events.send(Event::Failed(r));
            }
            self.stats.active.store(self.rows.len(), Ordering::SeqCst);
        }
    }

    /// Tokenizes a job, runs its prompt alone, samples its first token and adds it to the batch.
    fn prefill(&mut self, job: Job) -> std::result::Result<(), Refusal> {
        let bad = |message: String| Refusal {
            status: 400,
            code: "invalid_request_error",
            message,
        };
        let server = |e: anyhow::Error| Refusal {
            status: 500,
            code: "server_error",
            message: format!("{e:#}"),
        };
        let Some((id, m)) = self.loaded.as_ref() else {
            return Err(server(anyhow::anyhow!("no model is loaded")));
        };
        let prompt = match &job.input {
            Input::Chat(msgs) => {
                let tpl = m.chat(id).map_err(|e| bad(format!("{e:#}")))?;
                let text = tpl.render(msgs, true).map_err(|e| bad(format!("{e:#}")))?;
                m.tok.encode(&text, false).map_err(server)?
            }
            Input::Text(t) => m.tok.encode(t, true).map_err(server)?,
        };
        let ctx = m.model.context();
        let limit = self.limits.max_prompt_tokens.min(ctx.saturating_sub(1));
        if prompt.is_empty() {
            return Err(bad("the prompt is empty after tokenization".into()));
        }
        if prompt.len() > limit {
            return Err(Refusal {
                status: 400,
                code: "context_length_exceeded",
                message: format!(
                    "the prompt has {} tokens; this server takes at most {limit} (model context {ctx}, --max-prompt-tokens {})",
                    prompt.len(),
                    self.limits.max_prompt_tokens
                ),
            });
        }
        let vocab = m.model.cfg.vocab_size;
        if let Some((t, _)) = job.logit_bias.iter().find(|(t, _)| *t as usize >= vocab) {
            return Err(bad(format!(
                "logit_bias: token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        let dev = m.model.device();
        let mut cache = KvCache::new(m.model.cfg.num_layers);
        let logits = (|| -> Result<Vec<f32>> {
            let ids = Tensor::from_vec(prompt.clone(), (1, prompt.len()), dev)?;
            let opts = ForwardOpts {
                cache: Some(&mut cache),
                ..Default::default()
            };
            let h = m.model.hidden_states(&m.model.embed(&ids)?, opts)?;
            let last = h.narrow(1, prompt.len() - 1, 1)?;
            let l = m.model.logits(&last)?.flatten_all()?;
            let l: Vec<f32> = l.to_dtype(DType::F32)?.to_vec1()?;
            check_finite(&l, 0)?;
            Ok(l)
        })()
        .map_err(server)?;
        let _ = job.events.send(Event::Started {
            prompt_tokens: prompt.len(),
        });
        let mut row = Row {
            rng: Rng::keyed(&[job.sampling.seed, 0x5A3F]),
            text: String::new(),
            inc: Incremental::default(),
            detok: Detok::new(job.stop.clone()),
            job,
            pad: 0,
            prompt_len: prompt.len(),
            tokens: Vec::new(),
            next: 0,
            counts: Default::default(),
        };
        let id = pick(&mut row, logits);
        if let Some(f) = self.after_token(&mut row, id, ctx) {
            finish(&self.stats, row, f);
            return Ok(());
        }
        let (pad_old, pad_new) = self.cache.append_rows(cache).map_err(server)?;
        for r in &mut self.rows {
            r.pad += pad_old;
        }
        row.pad = pad_new;
        self.rows.push(row);
        Ok(())
    }

    /// Records a sampled token; `Some` when the row is finished (its text already sent).
    fn after_token(&self, row: &mut Row, id: u32, ctx: usize) -> Option<Finish> {
        let m = &self.loaded.as_ref()?.1;
        self.stats.tokens.fetch_add(1, Ordering::Relaxed);
        if m.stop_ids().contains(&id) {
            let _ = flush(row, m, true);
            return Some(Finish::Stop);
        }
        row.tokens.push(id);
        *row.counts.entry(id).or_default() += 1;
        row.next = id;
        match flush(row, m, false) {
            Err(()) => return Some(Finish::Stop), // the client is gone; `finish` counts it
            Ok(true) => return Some(Finish::Stop),
            Ok(false) => {}
        }
        if row.tokens.len() >= row.job.sampling.max_new_tokens
            || row.prompt_len + row.tokens.len() >= ctx
        {
            let _ = flush(row, m, true);
            return Some(Finish::Length);
        }
        None
    }

    /// One decode step of every row: feed each row's last token, sample the next.
    fn step(&mut self) -> Result<()> {
        let Some((_, m)) = self.loaded.as_ref() else {
            return Ok(());
        };
        let dev = m.model.device();
        let ctx = m.model.context();
        let n = self.rows.len();
        self.stats.peak_batch.fetch_max(n, Ordering::Relaxed);
        let ids: Vec<u32> = self.rows.iter().map(|r| r.next).collect();
        let pads: Vec<usize> = self.rows.iter().map(|r| r.pad).collect();
        let ids = Tensor::from_vec(ids, (n, 1), dev)?;
        let packing = Packing::left_padded(&pads, self.cache.len(), 1, dev)?;
        let opts = ForwardOpts {
            cache: Some(&mut self.cache),
            packing: Some(&packing),
            ..Default::default()
        };
        let h = m.model.hidden_states(&m.model.embed(&ids)?, opts)?;
        let logits: Vec<f32> = m
            .model
            .logits(&h)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let v = m.model.cfg.vocab_size;
        // A row whose logits are not finite fails alone; the others go on.
        let picks: Vec<std::result::Result<u32, String>> = self
            .rows
            .par_iter_mut()
            .enumerate()
            .map(|(i, r)| {
                let l = &logits[i * v..(i + 1) * v];
                match check_finite(l, r.tokens.len()) {
                    Ok(()) => Ok(pick(r, l.to_vec())),
                    Err(e) => Err(format!("{e:#}")),
                }
            })
            .collect();
        let mut keep = Vec::with_capacity(n);
        let rows = std::mem::take(&mut self.rows);
        for (i, (mut r, id)) in rows.into_iter().zip(picks).enumerate() {
            let id = match id {
                Ok(id) => id,
                Err(message) => {
                    let _ = r.job.events.send(Event::Failed(Refusal {
                        status: 500,
                        code: "server_error",
                        message,
                    }));
                    continue;
                }
            };
            let done = if r.job.cancel.load(Ordering::SeqCst) {
                Some(Finish::Stop)
            } else {
                self.after_token(&mut r, id, ctx)
            };
            match done {
                Some(f) => finish(&self.stats, r, f),
                None => {
                    keep.push(i as u32);
                    self.rows.push(r);
                }
            }
        }
        if self.rows.is_empty() {
            self.cache = KvCache::new(0);
            return Ok(());
        }
        if keep.len() < n {
            self.cache.keep_rows(&keep)?;
            let common = self.rows.iter().map(|r| r.pad).min().unwrap_or(0);
            self.cache.drop_front(common)?;
            for r in &mut self.rows {
                r.pad -= common;
            }
        }
        Ok(())
    }
}

/// Samples a row's next token from its logits after its bias and penalties.
fn pick(row: &mut Row, mut logits: Vec<f32>) -> u32 {
    for &(t, b) in &row.job.logit_bias {
        logits[t as usize] += b;
    }
    let (pp, fp) = (row.job.presence_penalty, row.job.frequency_penalty);
    if pp != 0.0 || fp != 0.0 {
        for (&t, &c) in &row.counts {
            logits[t as usize] -= pp + fp * c as f32;
        }
    }
    sample_logp(&logits, &row.job.sampling, &mut row.rng).0
}

/// Sends the row's text that is safe to show; `Ok(true)` when a stop string ended it,
/// `Err` when the client is gone.
fn flush(row: &mut Row, m: &LoadedModel, last: bool) -> std::result::Result<bool, ()> {
    let tok = &m.tok.inner;
    let new = row.inc.next(&row.tokens, last, |t| {
        tok.decode(t, true).unwrap_or_default()
    });
    row.text.push_str(&new);
    let (delta, stopped) = row.detok.advance(&row.text, last);
    if !delta.is_empty() && row.job.events.send(Event::Text(delta)).is_err() {
        row.job.cancel.store(true, Ordering::SeqCst);
        return Err(());
    }
    Ok(stopped)
}

fn finish(stats: &Stats, row: Row, f: Finish) {
    if row.job.cancel.load(Ordering::SeqCst) {
        stats.cancelled.fetch_add(1, Ordering::SeqCst);
        return;
    }
    stats.served.fetch_add(1, Ordering::SeqCst);
    let _ = row.job.events.send(Event::Done {
        finish: f,
        completion_tokens: row.tokens.len(),
    });
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".into());
    format!("internal error (panic): {what}")
}
