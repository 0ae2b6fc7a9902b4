//! The OpenAI API's shapes: `/v1/chat/completions` and `/v1/completions` requests (checked field
//! by field: an unknown or unsupported parameter is a 400 naming it, as OpenAI answers), their
//! responses and streamed chunks, `/v1/models`, and errors as `{"error": {message, type, param,
//! code}}`. Parameters keep OpenAI's names, defaults and ranges (temperature 1, top_p 1,
//! penalties in [-2, 2], `logit_bias` in [-100, 100], at most 4 stop strings); `top_k` is the
//! extension llama.cpp's and vLLM's servers accept.

use super::batcher::{Ask, Finish, Input, Refusal};
use crate::chat::Message;
use crate::generate::Sampling;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub model: String,
    messages: Option<Vec<ChatMessage>>,
    prompt: Option<Value>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    n: Option<usize>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    stop: Option<Value>,
    seed: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<BTreeMap<String, f32>>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    echo: Option<bool>,
    best_of: Option<usize>,
    suffix: Option<Value>,
    response_format: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    /// Accepted and ignored: they change nothing without tools or storage.
    #[allow(dead_code)]
    parallel_tool_calls: Option<Value>,
    #[allow(dead_code)]
    store: Option<Value>,
    #[allow(dead_code)]
    metadata: Option<Value>,
    #[allow(dead_code)]
    service_tier: Option<Value>,
    /// Accepted and ignored, as a label for the caller's own bookkeeping.
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Other fields of a message (`tool_call_id`, `tool_calls`, `refusal`) are ignored: an
/// assistant message copied back from a response must be accepted.
#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    /// A string, a list of `{"type": "text", "text": …}` parts, or null (an assistant turn).
    content: Option<Value>,
    #[allow(dead_code)]
    name: Option<String>,
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// Parses a request body. Errors name the field.
pub fn parse(body: &[u8]) -> Result<Params, Refusal> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            Refusal::invalid(format!("the body is not valid JSON: {inner}"))
        } else if path == "." {
            Refusal::invalid(format!("invalid request: {inner}"))
        } else {
            Refusal::invalid(format!("{path}: {inner}"))
        }
    })
}

/// Longest stop string (each is looked for at every token of every row).
const MAX_STOP_BYTES: usize = 256;

impl Params {
    pub fn streaming(&self) -> bool {
        self.stream.unwrap_or(false)
    }
}

/// What the request asks for, checked against the server's limits, and whether a streamed
/// answer ends with a usage chunk.
pub fn check(p: &Params, ep: Endpoint, max_tokens_limit: usize) -> Result<(Ask, bool), Refusal> {
    let input = match ep {
        Endpoint::Chat => {
            if p.prompt.is_some() {
                return Err(Refusal::invalid(
                    "prompt: /v1/chat/completions takes messages; send prompt to /v1/completions",
                ));
            }
            let Some(msgs) = &p.messages else {
                return Err(Refusal::invalid("messages: required"));
            };
            if msgs.is_empty() {
                return Err(Refusal::invalid(
                    "messages: at least one message is required",
                ));
            }
            let mut out = Vec::with_capacity(msgs.len());
            for (i, m) in msgs.iter().enumerate() {
                let role = match m.role.as_str() {
                    "developer" => "system",
                    r @ ("system" | "user" | "assistant" | "tool") => r,
                    r => return Err(Refusal::invalid(format!("messages[{i}].role: unknown role {r:?} (system, developer, user, assistant, tool)"))),
                };
                out.push(Message::new(role, &content_text(&m.content, i)?));
            }
            Input::Chat(out)
        }
        Endpoint::Completions => {
            if p.messages.is_some() {
                return Err(Refusal::invalid(
                    "messages: /v1/completions takes prompt; send messages to /v1/chat/completions",
                ));
            }
            let text = match &p.prompt {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    a[0].as_str().unwrap_or_default().to_string()
                }
                Some(Value::Array(_)) => {
                    return Err(Refusal::invalid("prompt: give one string (batches of prompts and token-id prompts are not supported; send one request per prompt)"))
                }
                Some(_) => return Err(Refusal::invalid("prompt: must be a string")),
                None => return Err(Refusal::invalid("prompt: required")),
            };
            if p.echo == Some(true) {
                return Err(Refusal::invalid("echo: not supported"));
            }
            Input::Text(text)
        }
    };
    if p.n.is_some_and(|n| n != 1) {
        return Err(Refusal::invalid(
            "n: only 1 choice per request is supported; send several requests",
        ));
    }
    // Parameters with nothing to do at their default values, refused otherwise.
    let unset = |v: &Option<Value>| {
        v.as_ref().is_none_or(|v| {
            v.is_null() || *v == Value::Bool(false) || *v == json!(0) || *v == json!([])
        })
    };
    for (name, v) in [
        ("logprobs", &p.logprobs),
        ("top_logprobs", &p.top_logprobs),
        ("suffix", &p.suffix),
        ("tools", &p.tools),
    ] {
        if !unset(v) {
            return Err(Refusal::invalid(format!("{name}: not supported")));
        }
    }
    if p.best_of.is_some_and(|b| b != 1) {
        return Err(Refusal::invalid("best_of: only 1 is supported"));
    }
    if p.response_format
        .as_ref()
        .is_some_and(|f| !f.is_null() && f.get("type") != Some(&json!("text")))
    {
        return Err(Refusal::invalid(
            "response_format: only {\"type\": \"text\"} is supported (no JSON mode or schemas)",
        ));
    }
    if p.tool_choice
        .as_ref()
        .is_some_and(|c| !c.is_null() && *c != json!("none") && *c != json!("auto"))
    {
        return Err(Refusal::invalid("tool_choice: tools are not supported"));
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(Refusal::invalid(format!(
            "temperature: {temperature} is outside [0, 2]"
        )));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Refusal::invalid(format!(
            "top_p: {top_p} is outside (0, 1]"
        )));
    }
    for (name, v) in [
        ("presence_penalty", p.presence_penalty),
        ("frequency_penalty", p.frequency_penalty),
    ] {
        if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(Refusal::invalid(format!("{name}: outside [-2, 2]")));
        }
    }
    let max_new = p
        .max_completion_tokens
        .or(p.max_tokens)
        .unwrap_or(max_tokens_limit);
    // More than the server's limit is cut to it (the answer then ends with "length"), as
    // clients send large defaults; zero is refused.
    if max_new == 0 {
        return Err(Refusal::invalid("max_tokens: must be at least 1"));
    }
    let max_new = max_new.min(max_tokens_limit);
    let stop = match &p.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        Some(_) => {
            return Err(Refusal::invalid(
                "stop: a string or a list of at most 4 strings",
            ))
        }
    };
    if stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(Refusal::invalid(format!(
            "stop: each stop string may have at most {MAX_STOP_BYTES} bytes"
        )));
    }
    let mut logit_bias = Vec::new();
    for (k, &b) in p.logit_bias.iter().flatten() {
        let id: u32 = k
            .parse()
            .map_err(|_| Refusal::invalid(format!("logit_bias: key {k:?} is not a token id")))?;
        if !(-100.0..=100.0).contains(&b) {
            return Err(Refusal::invalid(format!(
                "logit_bias[{k}]: {b} is outside [-100, 100]"
            )));
        }
        logit_bias.push((id, b));
    }
    let seed = match p.seed {
        Some(s) => s as u64,
        None => fresh_seed(),
    };
    let include_usage = p
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let ask = Ask {
        input,
        sampling: Sampling {
            max_new_tokens: max_new,
            temperature,
            top_k: p.top_k,
            top_p: Some(top_p),
            seed,
        },
        stop,
        logit_bias,
        presence_penalty: p.presence_penalty.unwrap_or(0.0),
        frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
    };
    Ok((ask, include_usage))
}

fn content_text(c: &Option<Value>, i: usize) -> Result<String, Refusal> {
    match c {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    _ => {
                        return Err(Refusal::invalid(format!(
                            "messages[{i}].content[{j}]: only text parts ({{\"type\": \"text\", \"text\": …}}) are supported"
                        )))
                    }
                }
            }
            Ok(s)
        }
        Some(_) => Err(Refusal::invalid(format!(
            "messages[{i}].content: a string or a list of text parts"
        ))),
    }
}

fn fresh_seed() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    crate::rng::Rng::keyed(&[t, N.fetch_add(1, Ordering::Relaxed)]).next_u64()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A response id: `chatcmpl-…` / `cmpl-…`, unique within the server's life.
pub fn response_id(ep: Endpoint) -> String {
    static N: AtomicU64 = AtomicU64::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    match ep {
        Endpoint::Chat => format!("chatcmpl-{:x}{n:06}", now()),
        Endpoint::Completions => format!("cmpl-{:x}{n:06}", now()),
    }
}

pub fn error_body(r: &Refusal) -> String {
    let kind = match r.status {
        401 => "authentication_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    json!({"error": {"message": r.message, "type": kind, "param": null, "code": r.code}})
        .to_string()
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The whole (non-streamed) response.
pub fn full(
    ep: Endpoint,
    id: &str,
    model: &str,
    text: &str,
    finish: Finish,
    prompt: usize,
    completion: usize,
) -> Value {
    let created = now();
    match ep {
        Endpoint::Chat => json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": fingerprint(),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": null, "finish_reason": finish.name()}],
            "usage": usage(prompt, completion),
        }),
        Endpoint::Completions => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": fingerprint(),
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish.name()}],
            "usage": usage(prompt, completion),
        }),
    }
}

/// One streamed chunk: `text` (chat: the first chunk carries the role), or the last one with
/// its finish reason.
pub fn chunk(
    ep: Endpoint,
    id: &str,
    model: &str,
    text: Option<&str>,
    first: bool,
    finish: Option<Finish>,
) -> Value {
    let created = now();
    let reason = finish.map(Finish::name);
    match ep {
        Endpoint::Chat => {
            let delta = match (first, text) {
                (true, t) => json!({"role": "assistant", "content": t.unwrap_or("")}),
                (false, Some(t)) => json!({"content": t}),
                (false, None) => json!({}),
            };
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": fingerprint(),
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason}]})
        }
        Endpoint::Completions => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": fingerprint(),
            "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason}]}),
    }
}

/// The usage chunk `stream_options.include_usage` asks for (no choices).
pub fn usage_chunk(ep: Endpoint, id: &str, model: &str, prompt: usize, completion: usize) -> Value {
    let object = match ep {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    json!({"id": id, "object": object, "created": now(), "model": model, "choices": [],
           "usage": usage(prompt, completion)})
}

fn fingerprint() -> String {
    format!("lmforge-{}", env!("CARGO_PKG_VERSION"))
}

pub fn models(ids: &[String]) -> Value {
    json!({"object": "list", "data": ids.iter().map(|id| json!({
        "id": id, "object": "model", "created": 0, "owned_by": "lmforge"})).collect::<Vec<_>>()})
}
