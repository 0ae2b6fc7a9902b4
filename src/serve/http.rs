//! Just enough HTTP/1.1 for a JSON API and a few pages: one request per connection (every
//! response says `Connection: close`), bodies by `Content-Length` only, and hard limits on
//! everything a client sends — the request head, the body, the time to send them — so a slow or
//! hostile client costs one bounded connection and never the model thread.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The request line and headers together.
pub const MAX_HEAD_BYTES: usize = 32 << 10;
/// A client has this long to send its whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Request {
    pub method: String,
    /// The path without its query.
    pub path: String,
    pub query: String,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Values of `key` in the query string, percent-decoded.
    pub fn query_values(&self, key: &str) -> Vec<String> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| percent_decode(v, true))
            .collect()
    }
}

/// Why a request could not be read: the status to answer with, if the client is still there.
pub struct BadRequest {
    pub status: u16,
    pub message: String,
}

fn bad(status: u16, message: impl Into<String>) -> BadRequest {
    BadRequest {
        status,
        message: message.into(),
    }
}

/// A stream whose reads share one deadline: a client sending a byte now and then cannot hold
/// a connection past `READ_TIMEOUT`.
struct Deadline<'a> {
    stream: &'a TcpStream,
    until: std::time::Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request took too long to arrive",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        (&*self.stream).read(buf)
    }
}

/// Reads one request; `max_body` bounds its body.
pub fn read_request(stream: &TcpStream, max_body: usize) -> Result<Request, BadRequest> {
    let deadline = Deadline {
        stream,
        until: std::time::Instant::now() + READ_TIMEOUT,
    };
    let mut r = BufReader::new(deadline.take((MAX_HEAD_BYTES + max_body) as u64));
    let mut head_len = 0;
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = (&mut r)
            .take((MAX_HEAD_BYTES - head_len) as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| bad(408, format!("reading the request: {e}")))?;
        if n == 0 {
            return Err(bad(400, "the connection closed before the request ended"));
        }
        head_len += n;
        if head_len > MAX_HEAD_BYTES {
            return Err(bad(
                431,
                format!("the request head is over {MAX_HEAD_BYTES} bytes"),
            ));
        }
        let text =
            String::from_utf8(line).map_err(|_| bad(400, "the request head is not UTF-8"))?;
        let text = text.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            if lines.is_empty() {
                continue; // stray CRLF before a request line is allowed (RFC 9112 2.2)
            }
            break;
        }
        lines.push(text.to_string());
    }
    let mut first = lines[0].split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (first.next(), first.next(), first.next(), first.next())
    else {
        return Err(bad(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad(505, format!("unsupported protocol {version}")));
    }
    let mut headers = Vec::new();
    for l in &lines[1..] {
        let Some((k, v)) = l.split_once(':') else {
            return Err(bad(400, format!("malformed header line: {l}")));
        };
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut req = Request {
        method: method.to_string(),
        path: percent_decode(path, false),
        query: query.to_string(),
        headers,
        body: Vec::new(),
    };
    if req.header("transfer-encoding").is_some() {
        return Err(bad(
            411,
            "send the body with a Content-Length (chunked bodies are not taken)",
        ));
    }
    let len = match req.header("content-length") {
        None => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| bad(400, format!("invalid Content-Length: {v}")))?,
    };
    if len > max_body {
        return Err(bad(
            413,
            format!(
                "the body is {len} bytes; this server takes at most {max_body} (--max-body-bytes)"
            ),
        ));
    }
    if req
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        let _ = (&*stream).write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    req.body.resize(len, 0);
    r.read_exact(&mut req.body)
        .map_err(|e| bad(400, format!("reading the {len}-byte body: {e}")))?;
    Ok(req)
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

/// Writes a whole response.
pub fn respond(
    mut w: &TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// Starts a server-sent-events response (the body ends when the connection closes).
pub fn start_events(mut w: &TcpStream) -> std::io::Result<()> {
    w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
          X-Accel-Buffering: no\r\nConnection: close\r\n\r\n",
    )?;
    w.flush()
}

/// One server-sent event (`data: …`); `data` holds no newline (compact JSON).
pub fn event(mut w: &TcpStream, data: &str) -> std::io::Result<()> {
    w.write_all(format!("data: {data}\n\n").as_bytes())?;
    w.flush()
}

/// After an early answer (a body too large): closes the sending side and reads what the client
/// is still sending, for a bounded time and amount. Closing a socket with unread data resets the
/// connection, and the client would lose the answer with it.
pub fn discard_rest(stream: &TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = std::io::copy(&mut stream.take(64 << 20), &mut std::io::sink());
}

/// Reads what the client has sent so far without waiting (at most 64 KiB).
pub fn drain_now(stream: &TcpStream) {
    if stream.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 8192];
        for _ in 0..8 {
            if !matches!((&*stream).read(&mut buf), Ok(n) if n > 0) {
                break;
            }
        }
        let _ = stream.set_nonblocking(false);
    }
}

/// Whether the peer has closed its side (a read would return end of file): checked without
/// blocking while a request waits for the model.
pub fn peer_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    let closed = match stream.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

/// Decodes `%XX` escapes (and with `form`, `+` as a space: query strings).
fn percent_decode(s: &str, form: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if form => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_decoding() {
        assert_eq!(super::percent_decode("a%2Fb+c%zz%4", true), "a/b c%zz%4");
        assert_eq!(super::percent_decode("a+b%20", false), "a+b ");
    }
}
