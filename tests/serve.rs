//! `lmforge serve` over loopback with a raw HTTP client: answers equal `lmforge generate`'s
//! (alone and batched with others), streams end as OpenAI's do, errors are OpenAI-style 4xx,
//! the queue is bounded (429), a client that leaves frees its place, and the dashboard serves
//! its page, its runs and their reports.
mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tiny Llama with a chat template and a long context (`ctx` positions).
fn chat_model(d: &Path, ctx: usize) -> PathBuf {
    let m = d.join("tiny-chat");
    std::fs::create_dir_all(&m).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture("llama_tiny").join(f), m.join(f)).unwrap();
    }
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama_tiny").join("config.json")).unwrap(),
    )
    .unwrap();
    cfg["max_position_embeddings"] = json!(ctx);
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(
        m.join("chat_template.jinja"),
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    )
    .unwrap();
    m
}

struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(cmd: &str, args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .arg(cmd)
        .args(["--port", "0"])
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut port = None;
    let mut head = String::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        head.push_str(&l);
        head.push('\n');
        if let Some(rest) = l.split("listening on http://127.0.0.1:").nth(1) {
            port = Some(
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse::<u16>()
                    .unwrap(),
            );
            break;
        }
    }
    let port = port.unwrap_or_else(|| panic!("the server did not start:\n{head}"));
    let log = Arc::new(Mutex::new(head));
    let l2 = log.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            l2.lock().unwrap().push_str(&(l + "\n"));
        }
    });
    Server { child, port, log }
}

fn send(port: u16, method: &str, path: &str, body: &str, headers: &[&str]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|h| h.starts_with("Host:")) {
        req.push_str("Host: 127.0.0.1\r\n");
    }
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    s
}

/// A whole response: status and body.
fn call(port: u16, method: &str, path: &str, body: &str, headers: &[&str]) -> (u16, String) {
    let mut s = send(port, method, path, body, headers);
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw[9..12].parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn post(port: u16, path: &str, body: &Value) -> (u16, Value) {
    let (st, b) = call(port, "POST", path, &body.to_string(), &[]);
    (
        st,
        serde_json::from_str(&b).unwrap_or_else(|_| panic!("not JSON: {b}")),
    )
}

/// The `data:` payloads of a streamed response, read to its end.
fn events(port: u16, path: &str, body: &Value) -> Vec<String> {
    let s = send(port, "POST", path, &body.to_string(), &[]);
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.contains(" 200 "), "{status}");
    r.lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// What `lmforge generate` answers (greedy, or sampled with a seed).
fn generated(model: &Path, prompt: &str, n: usize, temperature: f64, seed: u64) -> String {
    let o = lmforge(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        &n.to_string(),
        "--temperature",
        &temperature.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    out.strip_prefix(prompt)
        .unwrap()
        .strip_suffix('\n')
        .unwrap()
        .to_string()
}

/// A served answer as `generate` prints it: `generate` streams characters as they complete and
/// leaves out an unfinished one at the end, where the server sends the whole decoded text
/// (U+FFFD for it, as transformers' `decode` does).
fn as_printed(v: &Value) -> String {
    v.as_str().unwrap().trim_end_matches('\u{FFFD}').to_string()
}

fn health(port: u16) -> Value {
    serde_json::from_str(&call(port, "GET", "/health", "", &[]).1).unwrap()
}

#[test]
fn answers_equal_generate_alone_and_batched() {
    let d = tmpdir("serve_answers");
    let m = chat_model(&d, 512);
    let srv = start(
        "serve",
        &["--model", m.to_str().unwrap(), "--max-batch", "4"],
    );
    let port = srv.port;
    let prompts = [
        "To be, or not",
        "Hamlet",
        "the king's ghost walks at night and",
        "O",
    ];
    let want: Vec<String> = prompts
        .iter()
        .map(|p| generated(&m, p, 200, 0.0, 0))
        .collect();
    // Alone: greedy, and sampled with a seed (the same stream `generate --seed` draws from).
    let (st, r) = post(
        port,
        "/v1/completions",
        &json!({"model": "tiny-chat", "prompt": prompts[0], "max_tokens": 200, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(as_printed(&r["choices"][0]["text"]), want[0]);
    assert_eq!(r["object"], "text_completion");
    let toks = r["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=200).contains(&toks));
    let fin = r["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(fin, if toks == 200 { "length" } else { "stop" });
    let (_, r) = post(
        port,
        "/v1/completions",
        &json!({"model": "tiny-chat", "prompt": "Hamlet", "max_tokens": 200, "temperature": 0.8, "seed": 7}),
    );
    assert_eq!(
        as_printed(&r["choices"][0]["text"]),
        generated(&m, "Hamlet", 200, 0.8, 7)
    );
    // Four at once, joining and leaving one batch: each answer is its own.
    let got: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(move || {
                let (st, r) = post(port, "/v1/completions", &json!({"model": "tiny-chat", "prompt": p, "max_tokens": 200, "temperature": 0}));
                assert_eq!(st, 200, "{r}");
                as_printed(&r["choices"][0]["text"])
            }))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(got, want);
    // (They did share the batch.)
    assert!(health(port)["peak_batch"].as_u64().unwrap() >= 2);
    // Chat, streamed: role first, content deltas, a finish reason, usage, [DONE]; the deltas
    // make the answer the whole response has.
    let chat = json!({"model": "tiny-chat", "messages": [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Who is Hamlet?"}]}],
        "max_tokens": 20, "temperature": 0});
    let (st, whole) = post(port, "/v1/chat/completions", &chat);
    assert_eq!(st, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let ev = events(port, "/v1/chat/completions", &streamed);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let n = chunks.len();
    assert_eq!(
        chunks[n - 2]["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert_eq!(chunks[n - 1]["usage"], whole["usage"]);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    // A stop string ends the answer before it (the greedy answer's own text as the stop).
    let full = &want[0];
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(
        chars.len() >= 8,
        "a longer greedy answer is needed: {full:?}"
    );
    let (cut, end) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 3].0);
    let stop = &full[cut..end];
    let (_, r) = post(
        port,
        "/v1/completions",
        &json!({"model": "tiny-chat", "prompt": prompts[0], "max_tokens": 200, "temperature": 0, "stop": [stop]}),
    );
    let t = r["choices"][0]["text"].as_str().unwrap();
    let first = full.find(stop).unwrap();
    assert_eq!(t, &full[..first], "stop {stop:?}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    wait_for("an empty batch", 10, || health(port)["active"] == 0);
    let h = health(port);
    assert!(h["served"].as_u64().unwrap() >= 8, "{h}");
}

#[test]
fn bad_requests_get_openai_errors() {
    let d = tmpdir("serve_errors");
    let m = chat_model(&d, 64);
    let srv = start(
        "serve",
        &[
            "--model",
            m.to_str().unwrap(),
            "--name",
            "tiny",
            "--max-tokens",
            "32",
            "--max-prompt-tokens",
            "40",
            "--max-body-bytes",
            "4096",
            "--api-key",
            "sesame",
        ],
    );
    let port = srv.port;
    let key = "Authorization: Bearer sesame";
    let err = |st: u16, b: &str| -> (u16, Value) {
        (
            st,
            serde_json::from_str(b).unwrap_or_else(|_| panic!("{b}")),
        )
    };
    let ask = |body: &str| {
        let (st, b) = call(port, "POST", "/v1/completions", body, &[key]);
        err(st, &b)
    };
    // No key, a wrong key.
    let (st, b) = call(port, "GET", "/v1/models", "", &[]);
    assert_eq!(
        (st, err(st, &b).1["error"]["code"].as_str().unwrap()),
        (401, "invalid_api_key")
    );
    assert_eq!(
        call(
            port,
            "GET",
            "/v1/models",
            "",
            &["Authorization: Bearer sesamf"]
        )
        .0,
        401
    );
    let (st, b) = call(port, "GET", "/v1/models", "", &[key]);
    assert_eq!(st, 200);
    assert_eq!(err(st, &b).1["data"][0]["id"], "tiny");
    let cases: Vec<(String, u16, &str, &str)> = vec![
        (
            "{\"model\": \"tiny\", \"prompt\": ".into(),
            400,
            "invalid_request_error",
            "not valid JSON",
        ),
        (
            json!({"model": "gpt-4", "prompt": "hi"}).to_string(),
            404,
            "model_not_found",
            "gpt-4",
        ),
        (
            json!({"model": "tiny", "prompt": "hi", "temprature": 0.5}).to_string(),
            400,
            "invalid_request_error",
            "temprature",
        ),
        (
            json!({"model": "tiny", "prompt": "hi", "max_tokens": 0}).to_string(),
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        (
            json!({"model": "tiny", "prompt": "hi", "temperature": 3}).to_string(),
            400,
            "invalid_request_error",
            "temperature",
        ),
        (
            json!({"model": "tiny", "prompt": "hi", "n": 2}).to_string(),
            400,
            "invalid_request_error",
            "n:",
        ),
        (
            json!({"model": "tiny", "prompt": "hi", "logit_bias": {"99999": 5}}).to_string(),
            400,
            "invalid_request_error",
            "99999",
        ),
        (
            json!({"model": "tiny", "messages": []}).to_string(),
            400,
            "invalid_request_error",
            "/v1/chat/completions",
        ),
        (
            json!({"model": "tiny", "prompt": "word ".repeat(60)}).to_string(),
            400,
            "context_length_exceeded",
            "at most 40",
        ),
    ];
    for (body, status, code, says) in &cases {
        let (st, v) = ask(body);
        assert_eq!(st, *status, "{body}: {v}");
        let e = &v["error"];
        assert_eq!(e["code"], *code, "{body}: {v}");
        assert!(e["message"].as_str().unwrap().contains(says), "{body}: {v}");
        assert_eq!(e["type"], "invalid_request_error", "{body}: {v}");
    }
    // max_tokens over the server's limit is cut to it.
    let (st, v) = ask(
        &json!({"model": "tiny", "prompt": "hi", "max_tokens": 1000, "logit_bias": {"0": -100}})
            .to_string(),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 32, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // Another host name (DNS rebinding) or a foreign web page's request: refused on loopback.
    let (st, _) = call(
        port,
        "GET",
        "/v1/models",
        "",
        &[key, "Host: evil.example:80"],
    );
    assert_eq!(st, 403);
    let (st, _) = call(
        port,
        "GET",
        "/v1/models",
        "",
        &[key, "Origin: http://evil.example"],
    );
    assert_eq!(st, 403);
    let (st, _) = call(
        port,
        "GET",
        "/v1/models",
        "",
        &[key, "Host: localhost:1", "Origin: http://localhost:1"],
    );
    assert_eq!(st, 200);
    // Too big a body, a wrong method, an unknown route.
    let (st, _) = ask(&json!({"model": "tiny", "prompt": "x".repeat(5000)}).to_string());
    assert_eq!(st, 413);
    assert_eq!(call(port, "GET", "/v1/completions", "", &[key]).0, 405);
    assert_eq!(call(port, "GET", "/v1/nothing", "", &[key]).0, 404);
    // A chat request to a model without a chat template says so.
    let plain = start(
        "serve",
        &["--model", fixture("llama_tiny").to_str().unwrap()],
    );
    let (st, v) = post(
        plain.port,
        "/v1/chat/completions",
        &json!({"model": "llama_tiny", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no chat template"),
        "{v}"
    );
    // The server still answers after all that.
    let (st, v) = ask(&json!({"model": "tiny", "prompt": "hi", "max_tokens": 3}).to_string());
    assert_eq!(st, 200, "{v}");
    // Nothing but loopback unless asked.
    assert!(srv
        .log
        .lock()
        .unwrap()
        .contains("listening on http://127.0.0.1:"));
}

/// Reads a streamed response's head and first event.
fn open_stream(port: u16, body: &Value) -> BufReader<TcpStream> {
    let s = send(port, "POST", "/v1/completions", &body.to_string(), &[]);
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{line}");
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with("data: ") {
            return r;
        }
    }
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_queue_is_bounded_and_a_client_that_leaves_frees_its_place() {
    let d = tmpdir("serve_queue");
    let m = chat_model(&d, 60_000);
    let srv = start(
        "serve",
        &[
            "--model",
            m.to_str().unwrap(),
            "--name",
            "tiny",
            "--max-batch",
            "1",
            "--queue",
            "1",
            "--max-tokens",
            "50000",
        ],
    );
    let port = srv.port;
    // EOS (id 0) banned: these answers run to 50,000 tokens unless their clients leave.
    let long = json!({"model": "tiny", "prompt": "Once", "max_tokens": 50000, "stream": true,
        "logit_bias": {"0": -100}, "temperature": 0});
    let a = open_stream(port, &long);
    let b = send(port, "POST", "/v1/completions", &long.to_string(), &[]);
    wait_for("the second request to queue", 10, || {
        health(port)["queued"] == 1
    });
    let (st, v) = post(
        port,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    // A leaves mid-stream: its place goes to B at once.
    drop(a);
    let mut b = BufReader::new(b);
    let mut line = String::new();
    b.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{line}");
    wait_for("the first stream's cancellation", 10, || {
        health(port)["cancelled"] == 1
    });
    drop(b);
    wait_for("the second stream's cancellation", 10, || {
        health(port)["cancelled"] == 2
    });
    let (st, v) = post(
        port,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(st, 200, "{v}");
    // (The model thread counts its batch after the step that answered.)
    wait_for("an empty batch and queue", 10, || {
        let h = health(port);
        h["active"] == 0 && h["queued"] == 0
    });
    let h = health(port);
    // Neither long answer ran anywhere near its end.
    assert!(h["generated_tokens"].as_u64().unwrap() < 40_000, "{h}");
}

#[test]
fn the_dashboard_lists_runs_and_serves_their_reports_and_models() {
    let d = tmpdir("serve_dashboard");
    let runs = d.join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let m = chat_model(&d, 64);
    let data = tiny_sft(&d, 8);
    let out = runs.join("sft-a");
    let mut args = tiny_sft_args(&data, &out, &["--set", "train.max_steps=3"]);
    args[2] = m.to_str().unwrap().to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&args);
    let srv = start("dashboard", &["--runs", runs.to_str().unwrap()]);
    let port = srv.port;
    let (st, page) = call(port, "GET", "/", "", &[]);
    assert_eq!(st, 200);
    assert!(page.contains("lmforge dashboard") && !page.contains("src=\"http"));
    let (_, v) = call(port, "GET", "/api/runs", "", &[]);
    let v: Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["runs"][0]["name"], "sft-a", "{v}");
    let models: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(!models.is_empty(), "{v}");
    let (st, html) = call(port, "GET", "/api/report?run=sft-a", "", &[]);
    assert_eq!(st, 200, "{html}");
    assert!(html.contains("lmforge-report") && html.contains("<svg"));
    // Names are looked up, not opened.
    assert_eq!(
        call(port, "GET", "/api/report?run=..%2F..%2Fetc", "", &[]).0,
        404
    );
    // The playground's request: the run's model (loaded on demand), streamed.
    let ev = events(
        port,
        "/v1/chat/completions",
        &json!({"model": models[0], "stream": true, "max_tokens": 5,
        "messages": [{"role": "user", "content": "Q1: who?"}]}),
    );
    assert_eq!(ev.last().unwrap(), "[DONE]");
}
