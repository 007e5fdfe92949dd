//! `--transport http`: the HTTP streaming transport (PROTOCOL v1.2) behind
//! the same `Stream`/`Sink` of WebSocket messages the scenarios use. The
//! stream is `POST /stream/chat` with the token as Bearer, read as chunked
//! Server-Sent Events over a raw TCP connection; frames sent go to
//! `POST /stream/chat/<session>` (queued frames travel as one array of up to
//! 100). A `close` event becomes a close frame; each `: ping` comment is
//! answered with a `ping` frame, so idle streams stay open.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::{Sink, Stream};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};
use tokio_tungstenite::tungstenite::{
    self,
    protocol::{CloseFrame, frame::coding::CloseCode},
};

use crate::{target::Target, ws::Message};

type Item = Result<Message, tungstenite::Error>;

pub struct HttpLink {
    events: mpsc::Receiver<Item>,
    frames: Option<mpsc::UnboundedSender<String>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for HttpLink {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl HttpLink {
    /// Ends the stream (the server sees the response's connection close).
    pub async fn close(&mut self, _frame: Option<CloseFrame>) -> Result<(), tungstenite::Error> {
        self.frames = None;
        for t in &self.tasks {
            t.abort();
        }
        Ok(())
    }
}

impl Stream for HttpLink {
    type Item = Item;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.events.poll_recv(cx)
    }
}

impl Sink<Message> for HttpLink {
    type Error = tungstenite::Error;
    fn poll_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        match item {
            Message::Text(t) => match &self.frames {
                Some(f) if f.send(t.to_string()).is_ok() => Ok(()),
                _ => Err(tungstenite::Error::AlreadyClosed),
            },
            Message::Close(_) => {
                self.frames = None;
                Ok(())
            }
            _ => Ok(()),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.frames = None;
        Poll::Ready(Ok(()))
    }
}

fn http_client() -> reqwest::Client {
    static C: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    C.get_or_init(|| reqwest::Client::builder().pool_max_idle_per_host(4096).build().expect("http client")).clone()
}

/// Reads one chunk of a chunked body; `None` at its end.
async fn chunk(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let size = usize::from_str_radix(line.trim(), 16).map_err(|_| std::io::ErrorKind::InvalidData)?;
    if size == 0 {
        return Ok(None);
    }
    let mut buf = vec![0u8; size + 2];
    r.read_exact(&mut buf).await?;
    buf.truncate(size);
    Ok(Some(buf))
}

/// One SSE event: its data, or a comment (`None`).
fn event(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("data: "))
}

/// Opens a stream with the token as Bearer and waits for `welcome`.
pub async fn open(target: &Target, token: &str) -> Result<HttpLink, String> {
    let host = target.base.trim_start_matches("http://").trim_end_matches('/').to_string();
    let tcp = TcpStream::connect(&host).await.map_err(|e| format!("io_{:?}", e.kind()))?;
    let _ = tcp.set_nodelay(true);
    let mut r = BufReader::with_capacity(4096, tcp);
    let req = format!(
        "POST /stream/chat HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    );
    r.get_mut().write_all(req.as_bytes()).await.map_err(|e| format!("io_{:?}", e.kind()))?;
    let mut status = 0;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.map_err(|e| format!("io_{:?}", e.kind()))? == 0 {
            return Err("eof before welcome".into());
        }
        if status == 0 {
            status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(1);
        }
        if line == "\r\n" {
            break;
        }
    }
    if status != 200 {
        return Err(format!("http_{status}"));
    }
    let mut pending = String::new();
    let (events_tx, events) = mpsc::channel::<Item>(1024);
    let welcome = loop {
        let c = chunk(&mut r).await.map_err(|e| format!("io_{:?}", e.kind()))?.ok_or("eof before welcome")?;
        pending.push_str(&String::from_utf8_lossy(&c));
        if let Some(at) = pending.find("\n\n") {
            let ev: String = pending.drain(..at + 2).collect();
            if let Some(d) = event(&ev) {
                break d.to_string();
            }
        }
    };
    let v: serde_json::Value = serde_json::from_str(&welcome).map_err(|_| "first frame unparseable")?;
    if v["type"] != "welcome" {
        return Err(format!("first frame {} {}", v["type"], v["code"]));
    }
    let session = v["session"].as_str().ok_or("welcome without session")?.to_string();
    let _ = events_tx.try_send(Ok(Message::Text(welcome.into())));
    let (frames_tx, mut frames_rx) = mpsc::unbounded_channel::<String>();
    let pinger = frames_tx.clone();
    let reader = tokio::spawn(async move {
        loop {
            // Every whole event of `pending`, in one pass; the rest stays.
            let mut from = 0;
            while let Some(at) = pending[from..].find("\n\n") {
                let ev = &pending[from..from + at + 2];
                from += at + 2;
                match event(ev) {
                    None => {
                        let _ = pinger.send(r#"{"type":"ping"}"#.into());
                    }
                    Some(d) => {
                        let close = d
                            .starts_with(r#"{"type":"close""#)
                            .then(|| serde_json::from_str::<serde_json::Value>(d).ok())
                            .flatten()
                            .map(|v| v["code"].as_u64().unwrap_or(1006) as u16);
                        let msg = match close {
                            Some(code) => {
                                Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: "".into() }))
                            }
                            None => Message::Text(d.to_string().into()),
                        };
                        if events_tx.send(Ok(msg)).await.is_err() || close.is_some() {
                            return;
                        }
                    }
                }
            }
            pending.drain(..from);
            match chunk(&mut r).await {
                Ok(Some(c)) => pending.push_str(&String::from_utf8_lossy(&c)),
                Ok(None) => return,
                Err(e) => {
                    let _ = events_tx.send(Err(tungstenite::Error::Io(e))).await;
                    return;
                }
            }
        }
    });
    let url = format!("{}/stream/chat/{session}", target.base.trim_end_matches('/'));
    let writer = tokio::spawn(async move {
        let http = http_client();
        while let Some(first) = frames_rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < 100 {
                match frames_rx.try_recv() {
                    Ok(f) => batch.push(f),
                    Err(_) => break,
                }
            }
            let body =
                if batch.len() == 1 { batch.pop().unwrap_or_default() } else { format!("[{}]", batch.join(",")) };
            loop {
                let r = http.post(&url).header("content-type", "application/json").body(body.clone()).send().await;
                match r.map(|r| r.status().as_u16()) {
                    Ok(202) => break,
                    Ok(429) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
                    _ => return,
                }
            }
        }
    });
    Ok(HttpLink { events, frames: Some(frames_tx), tasks: vec![reader, writer] })
}
