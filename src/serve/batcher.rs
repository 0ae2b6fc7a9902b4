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

use super::catalog::{Catalog, Spec};
use super::text::Answer;
use crate::chat::Message;
use crate::generate::{check_finite, last_logits, sample_logp, Sampling};
use crate::model::hf::LoadedModel;
use crate::model::{KvCache, Packing};
use crate::rng::Rng;
use anyhow::{Context, Result};
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

/// What a request asks the model for, checked by the API layer (`openai::check`) except for
/// what needs the model (the prompt's tokens, the vocabulary).
pub struct Ask {
    pub input: Input,
    pub sampling: Sampling,
    /// OpenAI's `stop`: the answer ends before the first of these.
    pub stop: Vec<String>,
    pub logit_bias: Vec<(u32, f32)>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

impl Ask {
    /// The prompt's text, in bytes (before the template).
    pub fn input_bytes(&self) -> usize {
        match &self.input {
            Input::Chat(msgs) => msgs.iter().map(|m| m.content.len() + m.role.len()).sum(),
            Input::Text(t) => t.len(),
        }
    }
}

/// A request on its way to the model thread.
pub struct Job {
    /// The model's id, and what it loads (looked up once, by the connection).
    pub model: String,
    pub spec: Spec,
    pub ask: Ask,
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

impl Refusal {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid_request_error`: the request itself is wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    /// 500 `server_error`.
    pub fn server(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", message)
    }
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
    /// Starts the model thread. `first` (a model of the catalog) is loaded before it returns,
    /// so a model that does not load stops the server at start-up, not at the first request.
    /// Also returns the first model's context.
    pub fn start(
        catalog: Arc<Catalog>,
        limits: Limits,
        first: Option<(String, Spec)>,
    ) -> Result<(Self, Option<usize>)> {
        let (tx, rx) = std::sync::mpsc::sync_channel(limits.queue + limits.max_batch);
        let (queue, max_batch) = (limits.queue, limits.max_batch);
        let stats = Arc::new(Stats::default());
        let loaded = match first {
            Some((id, spec)) => Some(Loaded::new(id, catalog.load(&spec)?)),
            None => None,
        };
        let ctx = loaded.as_ref().map(|l| l.m.model.context());
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
    answer: Answer,
}

/// The model on the thread, under its id, with the ids that end an answer.
struct Loaded {
    id: String,
    m: LoadedModel,
    stop_ids: Vec<u32>,
}

impl Loaded {
    fn new(id: String, m: LoadedModel) -> Self {
        Self {
            id,
            stop_ids: m.stop_ids(),
            m,
        }
    }
}

struct Engine {
    catalog: Arc<Catalog>,
    limits: Limits,
    stats: Arc<Stats>,
    loaded: Option<Loaded>,
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
                    let _ = r
                        .job
                        .events
                        .send(Event::Failed(Refusal::server(msg.clone())));
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
            let other_model = self.loaded.as_ref().is_none_or(|l| l.id != job.model);
            if other_model && !self.rows.is_empty() {
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
            if other_model {
                // Drop the old model before loading the next: one set of weights in memory.
                self.loaded = None;
                self.cache = KvCache::new(0);
                match self.catalog.load(&job.spec) {
                    Ok(m) => self.loaded = Some(Loaded::new(job.model.clone(), m)),
                    Err(e) => {
                        let _ = job.events.send(Event::Failed(Refusal::new(
                            500,
                            "model_load_failed",
                            format!("loading model {}: {e:#}", job.model),
                        )));
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
        let bad = |e: anyhow::Error| Refusal::invalid(format!("{e:#}"));
        let server = |e: anyhow::Error| Refusal::server(format!("{e:#}"));
        let Some(Loaded { id, m, .. }) = self.loaded.as_ref() else {
            return Err(Refusal::server("no model is loaded"));
        };
        let prompt = match &job.ask.input {
            Input::Chat(msgs) => {
                let text = m.chat(id).and_then(|t| t.render(msgs, true)).map_err(bad)?;
                m.tok.encode(&text, false).map_err(server)?
            }
            Input::Text(t) => m.tok.encode(t, true).map_err(server)?,
        };
        let ctx = m.model.context();
        let limit = self.limits.max_prompt_tokens.min(ctx.saturating_sub(1));
        if prompt.is_empty() {
            return Err(Refusal::invalid("the prompt is empty after tokenization"));
        }
        if prompt.len() > limit {
            return Err(Refusal::new(
                400,
                "context_length_exceeded",
                format!(
                    "the prompt has {} tokens; this server takes at most {limit} (model context {ctx}, --max-prompt-tokens {})",
                    prompt.len(),
                    self.limits.max_prompt_tokens
                ),
            ));
        }
        let vocab = m.model.cfg.vocab_size;
        if let Some((t, _)) = job
            .ask
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= vocab)
        {
            return Err(Refusal::invalid(format!(
                "logit_bias: token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        let prompt_len = prompt.len();
        let mut cache = KvCache::new(m.model.cfg.num_layers);
        let logits = last_logits(&m.model, prompt, (1, prompt_len), &mut cache, None)
            .and_then(|l| check_finite(&l, 0).map(|()| l))
            .map_err(server)?;
        let _ = job.events.send(Event::Started {
            prompt_tokens: prompt_len,
        });
        let mut row = Row {
            rng: Rng::keyed(&[job.ask.sampling.seed, 0x5A3F]),
            answer: Answer::new(job.ask.stop.clone()),
            job,
            pad: 0,
            prompt_len,
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
        let Loaded { m, stop_ids, .. } = self.loaded.as_ref()?;
        self.stats.tokens.fetch_add(1, Ordering::Relaxed);
        if stop_ids.contains(&id) {
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
        if row.tokens.len() >= row.job.ask.sampling.max_new_tokens
            || row.prompt_len + row.tokens.len() >= ctx
        {
            let _ = flush(row, m, true);
            return Some(Finish::Length);
        }
        None
    }

    /// One decode step of every row: feed each row's last token, sample the next.
    fn step(&mut self) -> Result<()> {
        let Some(Loaded { m, .. }) = self.loaded.as_ref() else {
            return Ok(());
        };
        let ctx = m.model.context();
        let n = self.rows.len();
        self.stats.peak_batch.fetch_max(n, Ordering::Relaxed);
        let ids: Vec<u32> = self.rows.iter().map(|r| r.next).collect();
        let pads: Vec<usize> = self.rows.iter().map(|r| r.pad).collect();
        let packing = Packing::left_padded(&pads, self.cache.len(), 1, m.model.device())?;
        let logits = last_logits(&m.model, ids, (n, 1), &mut self.cache, Some(&packing))?;
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
                    let _ = r.job.events.send(Event::Failed(Refusal::server(message)));
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
    let ask = &row.job.ask;
    for &(t, b) in &ask.logit_bias {
        logits[t as usize] += b;
    }
    let (pp, fp) = (ask.presence_penalty, ask.frequency_penalty);
    if pp != 0.0 || fp != 0.0 {
        for (&t, &c) in &row.counts {
            logits[t as usize] -= pp + fp * c as f32;
        }
    }
    sample_logp(&logits, &ask.sampling, &mut row.rng).0
}

/// Sends the row's text that is safe to show; `Ok(true)` when a stop string ended it,
/// `Err` when the client is gone.
fn flush(row: &mut Row, m: &LoadedModel, last: bool) -> std::result::Result<bool, ()> {
    let tok = &m.tok.inner;
    let (delta, stopped) = row.answer.push(&row.tokens, last, |t| {
        tok.decode(t, true).unwrap_or_default()
    });
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
