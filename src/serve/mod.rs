//! `lmforge serve`: an OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/completions`,
//! streamed as server-sent events or whole, `/v1/models`), and `lmforge dashboard`: the same
//! server with a web page of the runs in a directory, their reports, and a chat playground.
//!
//! One thread per connection (at most `--max-connections`) parses and checks a request, then
//! hands it to the model thread (`batcher`: continuous batching) through a bounded queue — full:
//! 429 — and relays what comes back. It binds to 127.0.0.1 unless told otherwise; `--api-key`
//! (or `LMFORGE_API_KEY`) makes every `/v1` and `/api` route ask for `Authorization: Bearer KEY`.

pub mod batcher;
pub mod catalog;
mod dashboard;
pub mod http;
pub mod openai;
pub mod text;

use anyhow::{bail, Context, Result};
use batcher::{Batcher, Event, Job, Limits, Refusal};
use catalog::{Catalog, Spec};
use clap::Args;
use http::Request;
use openai::Endpoint;
use serde_json::json;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The model to serve: an HF directory or a .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT adapter directory applied to --model.
    #[arg(long, requires = "model")]
    pub adapter: Option<PathBuf>,
    /// The id clients name the model by (default: the model's or adapter's directory name).
    #[arg(long, requires = "model")]
    pub name: Option<String>,
    /// The address to listen on; anything but a loopback address exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0: any free port (printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` (default: the LMFORGE_API_KEY variable, if set).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests decoded together (continuous batching).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Requests waiting for a place in the batch; more are answered 429.
    #[arg(long, default_value_t = 32)]
    pub queue: usize,
    /// Most new tokens one request may ask for (also the default of max_tokens).
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Longest prompt in tokens (default: the model's context − 1).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Largest request body.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Connections handled at once; more are answered 503.
    #[arg(long, default_value_t = 128)]
    pub max_connections: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct DashboardArgs {
    /// The directory of runs to show (searched 3 levels deep for metrics.jsonl).
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    #[command(flatten)]
    pub serve: ServeArgs,
}

struct Server {
    batcher: Batcher,
    catalog: Arc<Catalog>,
    limits: Limits,
    api_key: Option<String>,
    max_body: usize,
    dashboard: bool,
    /// Longest prompt text taken to the model thread (tokenizing it there holds the batch).
    prompt_bytes: usize,
    /// Bound to loopback: requests must name a loopback host and come from no other web origin.
    loopback: bool,
    connections: AtomicUsize,
    max_connections: usize,
}

/// `lmforge serve`.
pub fn serve(a: ServeArgs) -> Result<()> {
    if a.model.is_none() {
        bail!("--model is required (an HF directory or a .gguf file)");
    }
    run(a, None)
}

/// `lmforge dashboard`.
pub fn dashboard(a: DashboardArgs) -> Result<()> {
    if !a.runs.is_dir() {
        bail!("{}: not a directory (--runs)", a.runs.display());
    }
    run(a.serve, Some(a.runs))
}

fn run(a: ServeArgs, runs: Option<PathBuf>) -> Result<()> {
    if a.max_batch == 0 || a.max_tokens == 0 || a.max_connections == 0 || a.queue == 0 {
        bail!("--max-batch, --queue, --max-tokens and --max-connections must be at least 1");
    }
    let device = crate::device(&a.device)?;
    let fixed = match &a.model {
        Some(m) => {
            let name = a.name.clone().unwrap_or_else(|| {
                let named = a.adapter.as_ref().unwrap_or(m);
                named
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| named.display().to_string())
            });
            Some((
                name,
                Spec {
                    model: m.clone(),
                    adapter: a.adapter.clone(),
                },
            ))
        }
        None => None,
    };
    let first = fixed.as_ref().map(|(n, _)| n.clone());
    let catalog = Arc::new(Catalog::new(fixed.clone(), runs.clone(), device));
    let limits = Limits {
        max_batch: a.max_batch,
        queue: a.queue,
        max_tokens: a.max_tokens,
        max_prompt_tokens: a.max_prompt_tokens.unwrap_or(usize::MAX),
    };
    let t0 = Instant::now();
    let (batcher, first_ctx) = Batcher::start(catalog.clone(), limits.clone(), fixed)?;
    let limits_prompt = limits
        .max_prompt_tokens
        .min(first_ctx.unwrap_or(usize::MAX));
    let api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("LMFORGE_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let listener = TcpListener::bind((a.host.as_str(), a.port))
        .with_context(|| format!("binding {}:{}", a.host, a.port))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && api_key.is_none() {
        eprintln!(
            "warning: listening on {addr}, reachable from other machines, with no API key (--api-key)"
        );
    }
    let what = match (&first, &runs) {
        (Some(m), Some(r)) => format!("model {m} and the runs in {}", r.display()),
        (Some(m), None) => format!("model {m}"),
        (None, Some(r)) => format!("the runs in {}", r.display()),
        (None, None) => "no model yet".to_string(),
    };
    eprintln!(
        "lmforge {}: {what} (loaded in {:.1}s); listening on http://{addr}{}",
        if runs.is_some() { "dashboard" } else { "serve" },
        t0.elapsed().as_secs_f64(),
        if runs.is_some() { "/" } else { "/v1" }
    );
    let server = Arc::new(Server {
        batcher,
        catalog,
        limits,
        api_key,
        max_body: a.max_body_bytes,
        dashboard: runs.is_some(),
        prompt_bytes: 64 * limits_prompt.min(1 << 17),
        loopback: addr.ip().is_loopback(),
        connections: AtomicUsize::new(0),
        max_connections: a.max_connections,
    });
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            // Out of file descriptors or a connection reset before accept: not a busy loop.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
        if server.connections.fetch_add(1, Ordering::SeqCst) >= server.max_connections {
            server.connections.fetch_sub(1, Ordering::SeqCst);
            // What the request sent so far is read first: closing with unread data resets the
            // connection, and the client would not see the 503.
            http::drain_now(&stream);
            let _ = reply_error(
                &stream,
                &overloaded(
                    503,
                    format!(
                        "all {} connections are in use (--max-connections)",
                        server.max_connections
                    ),
                ),
            );
            continue;
        }
        let s = server.clone();
        let spawned = std::thread::Builder::new()
            .name("lmforge-conn".into())
            .spawn(move || {
                handle(&s, &stream);
                s.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            server.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
    Ok(())
}

/// 503 when every connection is taken, 429 when the queue is full (OpenAI's "slow down").
fn overloaded(status: u16, message: String) -> Refusal {
    Refusal::new(status, "server_busy", format!("{message}; retry later"))
}

fn reply_error(stream: &TcpStream, r: &Refusal) -> std::io::Result<()> {
    http::respond(
        stream,
        r.status,
        "application/json",
        openai::error_body(r).as_bytes(),
    )
}

fn reply_json(stream: &TcpStream, v: &serde_json::Value) {
    let _ = http::respond(stream, 200, "application/json", v.to_string().as_bytes());
}

fn handle(s: &Server, stream: &TcpStream) {
    let req = match http::read_request(stream, s.max_body) {
        Ok(r) => r,
        Err(b) => {
            let _ = reply_error(
                stream,
                &Refusal::new(b.status, "invalid_request_error", b.message),
            );
            http::discard_rest(stream);
            return;
        }
    };
    let path = req.path.as_str();
    if s.loopback {
        if let Err(r) = same_machine(&req) {
            let _ = reply_error(stream, &r);
            return;
        }
    }
    let guarded = path.starts_with("/v1/") || path.starts_with("/api/");
    if guarded && !authorized(s, &req) {
        let r = Refusal::new(
            401,
            "invalid_api_key",
            "missing or wrong API key (send Authorization: Bearer KEY)",
        );
        let _ = reply_error(stream, &r);
        return;
    }
    let result = match (req.method.as_str(), path) {
        ("GET", "/health") => {
            let st = &s.batcher.stats;
            reply_json(
                stream,
                &json!({"status": "ok",
                "active": st.active.load(Ordering::SeqCst), "peak_batch": st.peak_batch.load(Ordering::SeqCst), "queued": st.queued.load(Ordering::SeqCst),
                "served": st.served.load(Ordering::SeqCst), "cancelled": st.cancelled.load(Ordering::SeqCst),
                "generated_tokens": st.tokens.load(Ordering::SeqCst)}),
            );
            Ok(())
        }
        ("GET", "/v1/models") => {
            let ids: Vec<String> = s.catalog.list().into_iter().map(|(n, _)| n).collect();
            reply_json(stream, &openai::models(&ids));
            Ok(())
        }
        ("POST", "/v1/chat/completions") => complete(s, stream, &req, Endpoint::Chat),
        ("POST", "/v1/completions") => complete(s, stream, &req, Endpoint::Completions),
        (_, "/v1/models" | "/v1/chat/completions" | "/v1/completions" | "/health") => {
            Err(Refusal::new(
                405,
                "method_not_allowed",
                format!("{} is not allowed on {path}", req.method),
            ))
        }
        _ if s.dashboard => dashboard::route(&s.catalog, stream, &req),
        _ => Err(Refusal::new(404, "not_found", format!("no route {path}"))),
    };
    if let Err(r) = result {
        let _ = reply_error(stream, &r);
    }
}

/// On loopback, the request must name a loopback host (a web page that rebinds its own domain
/// name to 127.0.0.1 sends that name) and, when a browser says where it comes from, come from
/// this server's own pages: other web pages cannot use a model on this machine.
fn same_machine(req: &Request) -> Result<(), Refusal> {
    let local = |hostport: &str| {
        let host = match hostport.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => hostport.split(':').next().unwrap_or(""),
        };
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    let host = req.header("host").unwrap_or("");
    if !host.is_empty() && !local(host) {
        return Err(Refusal::new(
            403,
            "forbidden",
            format!("this server answers on loopback only, not to Host: {host}"),
        ));
    }
    if let Some(origin) = req.header("origin") {
        let from = origin.split("://").nth(1).unwrap_or("");
        if origin != "null" && from != host {
            return Err(Refusal::new(
                403,
                "forbidden",
                format!("requests from the web page {origin} are refused (cross-origin)"),
            ));
        }
    }
    Ok(())
}

/// The API key check, in constant time over the key's length.
fn authorized(s: &Server, req: &Request) -> bool {
    let Some(key) = &s.api_key else {
        return true;
    };
    let given = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Marks its request cancelled when the connection's handler returns before the answer ended.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Waits for the next event of a request while watching its client: `None` once it left.
/// (Every path of the model thread ends a request with `Done` or `Failed`; a request dropped
/// without either is answered as failed.)
fn next_event(
    rx: &std::sync::mpsc::Receiver<Event>,
    stream: &TcpStream,
    checked: &mut Instant,
) -> Option<Event> {
    loop {
        // Every 0.1 s, also while events flow: a non-streamed answer writes nothing until it ends.
        if checked.elapsed() >= Duration::from_millis(100) {
            if http::peer_closed(stream) {
                return None;
            }
            *checked = Instant::now();
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(e) => return Some(e),
            Err(RecvTimeoutError::Timeout) => {}
            // The model thread dropped the request without a word (a panic in its prefill).
            Err(RecvTimeoutError::Disconnected) => {
                return Some(Event::Failed(Refusal::server(
                    "the model thread dropped the request (see the server's log)",
                )))
            }
        }
    }
}

fn complete(s: &Server, stream: &TcpStream, req: &Request, ep: Endpoint) -> Result<(), Refusal> {
    let p = openai::parse(&req.body)?;
    let Some(spec) = s.catalog.find(&p.model) else {
        return Err(Refusal::new(
            404,
            "model_not_found",
            format!(
                "the model `{}` does not exist (GET /v1/models lists them)",
                p.model
            ),
        ));
    };
    let (ask, include_usage) = openai::check(&p, ep, s.limits.max_tokens)?;
    let bytes = ask.input_bytes();
    if bytes > s.prompt_bytes {
        return Err(Refusal::new(
            400,
            "context_length_exceeded",
            format!(
                "the prompt is {bytes} bytes; this server takes at most {} (64 bytes per token of its prompt limit)",
                s.prompt_bytes
            ),
        ));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let job = Job {
        model: p.model.clone(),
        spec,
        ask,
        events: tx,
        cancel,
    };
    match s.batcher.submit(job) {
        Ok(()) => {}
        Err(true) => {
            let (n, q) = (s.limits.max_batch, s.limits.queue);
            let why = format!("{n} requests are being decoded and the queue of {q} is full");
            return Err(overloaded(429, format!("{why} (--max-batch, --queue)")));
        }
        Err(false) => return Err(overloaded(503, "the model thread has stopped".into())),
    }
    let id = openai::response_id(ep);
    let mut checked = Instant::now();
    let prompt_tokens = match next_event(&rx, stream, &mut checked) {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Failed(r)) => return Err(r),
        _ => return Ok(()),
    };
    if !p.streaming() {
        let mut text = String::new();
        loop {
            match next_event(&rx, stream, &mut checked) {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Done {
                    finish,
                    completion_tokens,
                }) => {
                    let v = openai::full(
                        ep,
                        &id,
                        &p.model,
                        &text,
                        finish,
                        prompt_tokens,
                        completion_tokens,
                    );
                    reply_json(stream, &v);
                    return Ok(());
                }
                Some(Event::Failed(r)) => return Err(r),
                Some(Event::Started { .. }) | None => return Ok(()),
            }
        }
    }
    let send = |v: serde_json::Value| http::event(stream, &v.to_string()).is_ok();
    if http::start_events(stream).is_err() {
        return Ok(());
    }
    // Chat streams open with the assistant's role, as OpenAI's do.
    if ep == Endpoint::Chat && !send(openai::chunk(ep, &id, &p.model, None, true, None)) {
        return Ok(());
    }
    loop {
        match next_event(&rx, stream, &mut checked) {
            Some(Event::Text(t)) => {
                if !send(openai::chunk(ep, &id, &p.model, Some(&t), false, None)) {
                    return Ok(());
                }
            }
            Some(Event::Done {
                finish,
                completion_tokens,
            }) => {
                let _ = send(openai::chunk(ep, &id, &p.model, None, false, Some(finish)))
                    && (!include_usage
                        || send(openai::usage_chunk(
                            ep,
                            &id,
                            &p.model,
                            prompt_tokens,
                            completion_tokens,
                        )))
                    && http::event(stream, "[DONE]").is_ok();
                return Ok(());
            }
            Some(Event::Failed(r)) => {
                // Headers are gone: the error travels as an event, as OpenAI's streams do.
                let _ = http::event(stream, &openai::error_body(&r));
                return Ok(());
            }
            Some(Event::Started { .. }) | None => return Ok(()),
        }
    }
}
