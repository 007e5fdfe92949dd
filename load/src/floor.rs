//! `floor-server`: the floor of a fan-out on this machine (issue 20). A
//! server that does only the socket work of a fan-out, so that crm-chat's
//! CPU per delivery and latency can be read as a ratio to it:
//!
//! - it answers just enough of the protocol for the `fanout` scenario:
//!   `/readyz`, the group PUT (stored nowhere), the upgrade at `/ws/chat`
//!   (the token is not checked: use `--jwt-secret` on the load side),
//!   `welcome`, and for each `send` one `ack` and one `message`;
//! - each message is rendered and framed once, and the same bytes are
//!   queued to every open WebSocket (a bounded queue each: a full one drops
//!   the connection, as crm-chat closes a slow consumer);
//! - each connection's writer writes its queue: one `write` per frame
//!   (`--writev false`, plain tokio), or every queued frame in one
//!   `writev` (`--writev true`).
//!
//! No storage, no membership, no presence, no receipts, no metrics: what it
//! costs is the floor. Loopback only; it ends after `--duration-s`.

use std::{
    io::IoSlice,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use clap::Args;
use serde::Deserialize;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp::OwnedReadHalf},
    sync::mpsc,
};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::{Fatal, fatal};

#[derive(Args, Clone, Debug)]
pub struct Opts {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:8700")]
    pub listen: SocketAddr,
    /// Write every queued frame of a connection in one `writev` (else one `write` per frame).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub writev: bool,
    /// Frames queued per connection before it is dropped (crm-chat's limits.outbound_queue).
    #[arg(long, default_value_t = 1024)]
    pub queue: usize,
}

/// A frame ready for the socket, shared by every recipient.
type Wire = Arc<[u8]>;

/// The open WebSockets, each with its queue.
#[derive(Default)]
struct Registry(std::sync::Mutex<Vec<(u64, mpsc::Sender<Wire>)>>);

impl Registry {
    fn add(&self, id: u64, tx: mpsc::Sender<Wire>) {
        self.0.lock().unwrap().push((id, tx));
    }

    fn remove(&self, id: u64) {
        self.0.lock().unwrap().retain(|(i, _)| *i != id);
    }

    /// Queues `frame` to every connection; drops those whose queue is full.
    fn fan_out(&self, frame: &Wire) {
        self.0.lock().unwrap().retain(|(_, tx)| tx.try_send(frame.clone()).is_ok());
    }
}

struct Server {
    opts: Opts,
    conns: Registry,
    next_id: AtomicU64,
    seq: AtomicU64,
}

pub async fn serve(opts: &Opts, duration: Duration) -> Result<(), Fatal> {
    if !opts.listen.ip().is_loopback() {
        return Err(fatal("floor-server listens on loopback only"));
    }
    let listener = TcpListener::bind(opts.listen).await.map_err(|e| fatal(format!("bind {}: {e}", opts.listen)))?;
    eprintln!("floor-server on {} (writev: {}), for {} s", opts.listen, opts.writev, duration.as_secs());
    let server = Arc::new(Server {
        opts: opts.clone(),
        conns: Registry::default(),
        next_id: AtomicU64::new(1),
        seq: AtomicU64::new(0),
    });
    let accept = async {
        loop {
            let Ok((sock, _)) = listener.accept().await else { continue };
            let _ = sock.set_nodelay(true);
            tokio::spawn(connection(server.clone(), sock));
        }
    };
    tokio::select! {
        _ = accept => Ok(()),
        _ = tokio::time::sleep(duration) => Ok(()),
    }
}

/// One request head: method, path, and the headers this server reads.
struct Head {
    method: String,
    path: String,
    content_length: usize,
    ws_key: Option<String>,
}

/// Reads one HTTP/1.1 request head (at most 16 KiB); leftover bytes stay in `buf`.
async fn read_head(r: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> Option<Head> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let mut lines = text.split("\r\n");
            let mut first = lines.next()?.split(' ');
            let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
            let mut head = Head { method, path, content_length: 0, ws_key: None };
            for l in lines {
                let Some((k, v)) = l.split_once(':') else { continue };
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => head.content_length = v.trim().parse().unwrap_or(0),
                    "sec-websocket-key" => head.ws_key = Some(v.trim().to_string()),
                    _ => {}
                }
            }
            return Some(head);
        }
        if buf.len() > 16 << 10 {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = r.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// HTTP requests on one connection (kept alive), until an upgrade.
async fn connection(server: Arc<Server>, sock: TcpStream) {
    let (mut r, mut w) = sock.into_split();
    let mut buf = Vec::new();
    loop {
        let Some(head) = read_head(&mut r, &mut buf).await else { return };
        while buf.len() < head.content_length {
            let mut chunk = [0u8; 8192];
            match r.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        buf.drain(..head.content_length);
        if let (Some(key), true) = (&head.ws_key, head.path.starts_with("/ws/chat")) {
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            );
            if w.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            return websocket(server, r, w, buf).await;
        }
        let (status, body) = match (head.method.as_str(), head.path.as_str()) {
            ("GET", "/readyz") => (200, json!({"status": "ready", "engine": "floor", "node": "floor"})),
            ("PUT", p) if p.starts_with("/api/v1/conversations/") => {
                let id = &p["/api/v1/conversations/".len()..];
                (200, json!({"id": id, "title": id, "members": [], "last_seq": 0}))
            }
            _ => (404, json!({"error": {"code": "not_found", "message": "the floor server has no such route"}})),
        };
        let body = body.to_string();
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if w.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A server frame: FIN + text opcode, unmasked, the payload.
fn frame(payload: &[u8]) -> Wire {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x81);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out.into()
}

#[derive(Deserialize)]
struct Send<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    conversation: &'a str,
    #[serde(default)]
    client_msg_id: &'a str,
    #[serde(default)]
    body: std::borrow::Cow<'a, str>,
}

/// One WebSocket: its writer task drains the queue, this task reads frames.
async fn websocket(server: Arc<Server>, mut r: OwnedReadHalf, w: tokio::net::tcp::OwnedWriteHalf, mut buf: Vec<u8>) {
    let id = server.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<Wire>(server.opts.queue);
    let _ = tx.try_send(frame(br#"{"type":"welcome","conversations":[]}"#));
    server.conns.add(id, tx.clone());
    let writer = tokio::spawn(write_queue(rx, w, server.opts.writev));
    'read: loop {
        // Parse every complete (masked) client frame in the buffer.
        while let Some((opcode, payload, used)) = client_frame(&buf) {
            buf.drain(..used);
            match opcode {
                0x1 => on_text(&server, &tx, &payload),
                0x8 => break 'read,
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        match r.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    server.conns.remove(id);
    drop(tx);
    writer.abort();
}

/// A `send`: one ack to the sender, one message frame to every connection.
fn on_text(server: &Server, own: &mpsc::Sender<Wire>, payload: &[u8]) {
    let Ok(s) = serde_json::from_slice::<Send>(payload) else { return };
    if s.ty != "send" {
        return;
    }
    let seq = server.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let ack =
        json!({"type": "ack", "id": s.id, "conversation": s.conversation, "seq": seq, "ts": ts, "duplicate": false});
    let _ = own.try_send(frame(ack.to_string().as_bytes()));
    let msg = json!({"type": "message", "conversation": s.conversation, "seq": seq, "ts": ts,
                     "sender": {"id": "floor", "name": "Floor"}, "body": s.body, "client_msg_id": s.client_msg_id});
    server.conns.fan_out(&frame(msg.to_string().as_bytes()));
}

/// Opcode, unmasked payload and bytes used of the first complete client frame.
fn client_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let mask: [u8; 4] = if masked {
        let m = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        m
    } else {
        [0; 4]
    };
    let data = buf.get(at..at + len)?;
    let payload = data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
    Some((b0 & 0x0f, payload, at + len))
}

/// Writes a connection's queue: a frame per write, or all queued in one writev.
async fn write_queue(mut rx: mpsc::Receiver<Wire>, mut w: tokio::net::tcp::OwnedWriteHalf, writev: bool) {
    let mut batch: Vec<Wire> = Vec::with_capacity(64);
    while let Some(first) = rx.recv().await {
        if !writev {
            if w.write_all(&first).await.is_err() {
                return;
            }
            continue;
        }
        batch.push(first);
        while batch.len() < 64
            && let Ok(f) = rx.try_recv()
        {
            batch.push(f);
        }
        if write_all_vectored(&mut w, &batch).await.is_err() {
            return;
        }
        batch.clear();
    }
}

/// `writev` until every byte of `frames` is written.
async fn write_all_vectored(w: &mut tokio::net::tcp::OwnedWriteHalf, frames: &[Wire]) -> std::io::Result<()> {
    let (mut i, mut off) = (0usize, 0usize);
    while i < frames.len() {
        let mut slices: Vec<IoSlice> = Vec::with_capacity(frames.len() - i);
        slices.push(IoSlice::new(&frames[i][off..]));
        slices.extend(frames[i + 1..].iter().map(|f| IoSlice::new(f)));
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while i < frames.len() && n >= frames[i].len() - off {
            n -= frames[i].len() - off;
            i += 1;
            off = 0;
        }
        off += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_are_unmasked_and_server_frames_carry_their_length() {
        let payload = b"{\"type\":\"send\"}";
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![0x81, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f.extend_from_slice(&[0x81]); // the start of the next frame
        let (op, p, used) = client_frame(&f).expect("a whole frame");
        assert_eq!((op, p.as_slice(), used), (1, &payload[..], f.len() - 1));
        assert!(client_frame(&f[..5]).is_none(), "a partial frame waits for more bytes");
        let big = frame(&[b'x'; 300]);
        assert_eq!(&big[..4], &[0x81, 126, 1, 44]);
        assert_eq!(big.len(), 304);
    }
}
