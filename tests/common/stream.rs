//! A hand-rolled HTTP streaming client (PROTOCOL v1.2): opens
//! `POST /stream/chat` over a raw TCP connection (so a test can stop reading
//! it), decodes the chunked body into SSE events, and sends frames by
//! `POST /stream/chat/<session>` to any node.

use std::{collections::VecDeque, net::SocketAddr, time::Duration};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use super::TIMEOUT;

/// How a stream ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The response ended (last chunk) or the connection closed.
    Eof,
    /// The connection was reset, or another error.
    Error(String),
    /// Nothing came within the time given.
    Timeout,
}

pub struct Stream {
    r: BufReader<TcpStream>,
    /// Decoded body text not yet split into events.
    pending: String,
    events: VecDeque<Value>,
    /// `: ping` comments seen.
    pub pings: usize,
    pub welcome: Value,
    pub session: String,
    pub http: reqwest::Client,
    /// Where POSTs go (any node's base URL).
    pub post_base: String,
    pub headers: String,
}

/// Reads an HTTP response head; returns the status and the head text.
async fn head(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, String)> {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        text.push_str(&line);
    }
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, text))
}

impl Stream {
    /// Opens a stream: `POST /stream/chat` with `body` (or `GET` when `get`),
    /// extra header lines in `headers` (each ending in `\r\n`). A refusal
    /// comes back as its status and JSON body.
    pub async fn open_with(addr: SocketAddr, get: bool, body: &str, headers: &str) -> Result<Stream, (u16, Value)> {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let method = if get { "GET" } else { "POST" };
        let req = format!(
            "{method} /stream/chat HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n{headers}\r\n{body}",
            body.len()
        );
        let mut r = BufReader::new(tcp);
        r.get_mut().write_all(req.as_bytes()).await.unwrap();
        let (status, head_text) = tokio::time::timeout(TIMEOUT, head(&mut r)).await.expect("response head").unwrap();
        let lower = head_text.to_ascii_lowercase();
        if status != 200 {
            let len: usize = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut buf = vec![0u8; len];
            r.read_exact(&mut buf).await.unwrap();
            return Err((status, serde_json::from_slice(&buf).unwrap_or(Value::Null)));
        }
        let mut s = Stream {
            r,
            pending: String::new(),
            events: VecDeque::new(),
            pings: 0,
            welcome: Value::Null,
            session: String::new(),
            http: shared_http(),
            post_base: format!("http://{addr}"),
            headers: lower,
        };
        let w = s.next(TIMEOUT).await.expect("welcome");
        assert_eq!(w["type"], "welcome", "{w}");
        s.session = w["session"].as_str().expect("welcome carries session").to_string();
        s.welcome = w;
        Ok(s)
    }

    /// Opens with a `hello` body carrying `token`.
    pub async fn open(addr: SocketAddr, token: &str) -> Stream {
        let body = json!({"type":"hello","id":"h","token":token}).to_string();
        match Stream::open_with(addr, false, &body, "").await {
            Ok(s) => s,
            Err((status, body)) => panic!("stream refused: {status} {body}"),
        }
    }

    /// Reads one chunk of the body into `pending`.
    async fn read_chunk(&mut self) -> Result<(), Ended> {
        let mut line = String::new();
        match self.r.read_line(&mut line).await {
            Ok(0) => return Err(Ended::Eof),
            Ok(_) => {}
            Err(e) => return Err(Ended::Error(e.to_string())),
        }
        let size = usize::from_str_radix(line.trim(), 16).map_err(|_| Ended::Error(format!("chunk size {line:?}")))?;
        if size == 0 {
            return Err(Ended::Eof);
        }
        let mut buf = vec![0u8; size + 2];
        self.r.read_exact(&mut buf).await.map_err(|e| Ended::Error(e.to_string()))?;
        self.pending.push_str(std::str::from_utf8(&buf[..size]).expect("utf-8 body"));
        while let Some(at) = self.pending.find("\n\n") {
            let event: String = self.pending.drain(..at + 2).collect();
            for l in event.lines() {
                if let Some(data) = l.strip_prefix("data: ") {
                    self.events.push_back(serde_json::from_str(data).expect("an event is JSON"));
                } else if l.starts_with(':') {
                    self.pings += 1;
                }
            }
        }
        Ok(())
    }

    /// The next event within `within`.
    pub async fn next(&mut self, within: Duration) -> Result<Value, Ended> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(v) = self.events.pop_front() {
                return Ok(v);
            }
            match tokio::time::timeout_at(deadline, self.read_chunk()).await {
                Err(_) => return Err(Ended::Timeout),
                Ok(r) => r?,
            }
        }
    }

    /// The next event matching `pred` (others are dropped).
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            match self.next(TIMEOUT).await {
                Ok(v) if pred(&v) => return v,
                Ok(_) => {}
                Err(e) => panic!("waiting for {what}: {e:?}"),
            }
        }
    }

    pub async fn expect_type(&mut self, ty: &str) -> Value {
        self.expect(ty, |v| v["type"] == ty).await
    }

    /// Events until the stream ends; the `close` event's code, if one came.
    pub async fn until_end(&mut self, within: Duration) -> (Vec<Value>, Option<u64>, Ended) {
        let mut seen = Vec::new();
        loop {
            match self.next(within).await {
                Ok(v) => seen.push(v),
                Err(e) => {
                    let code = seen.iter().rev().find(|v| v["type"] == "close").and_then(|v| v["code"].as_u64());
                    return (seen, code, e);
                }
            }
        }
    }

    /// POSTs `body` (one frame or an array) to this session; status and JSON.
    pub async fn post(&self, body: &Value) -> (u16, Value) {
        self.post_raw(body.to_string()).await
    }

    pub async fn post_raw(&self, body: String) -> (u16, Value) {
        post_to(&self.http, &self.post_base, &self.session, body).await
    }

    /// Sends a frame with an `id` and waits for the reply carrying it.
    pub async fn request(&mut self, mut v: Value) -> Value {
        let id = format!("r{}", rand_id());
        v["id"] = json!(id);
        let (status, body) = self.post(&v).await;
        assert_eq!(status, 202, "{body}");
        // Other events stay queued, in order, for later expectations.
        let mut kept = Vec::new();
        let reply = loop {
            match self.next(TIMEOUT).await {
                Ok(r) if r["id"] == json!(id) => break r,
                Ok(r) => kept.push(r),
                Err(e) => panic!("waiting for the reply to {v}: {e:?}"),
            }
        };
        for r in kept.into_iter().rev() {
            self.events.push_front(r);
        }
        reply
    }
}

/// `POST /stream/chat/<session>` at `base`.
pub async fn post_to(http: &reqwest::Client, base: &str, session: &str, body: String) -> (u16, Value) {
    let r = http
        .post(format!("{base}/stream/chat/{session}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json::<Value>().await.unwrap_or(Value::Null))
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

/// One HTTP client for every stream of a test process.
pub fn shared_http() -> reqwest::Client {
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    HTTP.get_or_init(super::http_client).clone()
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
pub fn metric_with(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}
