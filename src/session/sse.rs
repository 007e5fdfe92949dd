//! The HTTP streaming wire (PROTOCOL v1.2, "the same chat over plain HTTP"):
//! server frames are Server-Sent Events on a long response body, client
//! frames arrive by `POST /stream/chat/<session>` into the session's
//! [`Inbox`].
//!
//! The body is fed through a channel of one chunk: when the client stops
//! reading, hyper stops taking chunks, the channel stays full and the write
//! makes no progress, so `limits.write_timeout_s` ends the session as on a
//! WebSocket. Resetting cancels the listener's connection (an RST), as hyper
//! has no write deadline of its own.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use axum::body::Bytes;
use base64::Engine as _;
use tokio_util::sync::{CancellationToken, PollSender};

use super::*;
use crate::hub::{
    Hub,
    streams::{Inbox, Offer},
};

/// The SSE comment that keeps proxies from timing out an idle stream.
const PING: &[u8] = b": ping\n\n";

/// A chunk of the response body, or the error that aborts it.
pub type Chunk = io::Result<Bytes>;

/// Writes into the response body, one chunk per write.
pub struct BodyWriter {
    tx: PollSender<Chunk>,
}

impl AsyncWrite for BodyWriter {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Err(_closed) = std::task::ready!(self.tx.poll_reserve(cx)) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n: usize = bufs.iter().map(|b| b.len()).sum();
        let mut chunk = Vec::with_capacity(n);
        for b in bufs {
            chunk.extend_from_slice(b);
        }
        match self.tx.send_item(Ok(Bytes::from(chunk))) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

/// A new session id: 128 random bits, then the holding node's id (so any
/// node can route a POST to it without a lookup), both base64url.
pub fn new_session_id(node_id: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!("{}.{}", b64.encode(rand::random::<[u8; 16]>()), b64.encode(node_id))
}

/// The node a session id names; `None` for anything that is not a session
/// id (which is then unknown everywhere, at no cost).
pub fn session_node(id: &str) -> Option<String> {
    let (random, node) = id.split_once('.')?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    if random.len() != 22 || node.is_empty() || node.len() > 200 {
        return None;
    }
    b64.decode(random).ok()?;
    String::from_utf8(b64.decode(node).ok()?).ok()
}

/// A session's wire over HTTP streaming.
pub struct SseWire {
    id: Arc<str>,
    hub: Arc<Hub>,
    inbox: Arc<Inbox>,
    body: BodyWriter,
    /// Drops the HTTP connection at once (RST) when cancelled.
    abort: Option<CancellationToken>,
}

impl SseWire {
    /// Registers a new session on this node's hub; returns its wire and the
    /// receiving end of its response body. Client frames of one POST may
    /// hold `inbox_bytes` at most, queued.
    pub fn open(
        hub: Arc<Hub>,
        node_id: &str,
        inbox_bytes: usize,
        abort: Option<CancellationToken>,
    ) -> (SseWire, mpsc::Receiver<Chunk>) {
        let (tx, rx) = mpsc::channel(1);
        let id: Arc<str> = new_session_id(node_id).into();
        let inbox = Inbox::new(inbox_bytes);
        hub.streams.insert(id.clone(), inbox.clone());
        (SseWire { id, hub, inbox, body: BodyWriter { tx: PollSender::new(tx) }, abort }, rx)
    }

    /// Hands frames to this session directly (tests).
    pub fn offer(&self, frames: Vec<Text>) -> Offer {
        self.hub.streams.offer(&self.id, frames)
    }

    async fn write_raw(&mut self, bytes: &[u8], stall: Duration) -> io::Result<()> {
        stalled(stall, self.body.write_all(bytes)).await
    }
}

impl Drop for SseWire {
    fn drop(&mut self) {
        self.hub.streams.remove(&self.id);
    }
}

impl Wire for SseWire {
    const TRANSPORT: &'static str = "http";
    const FRAMING: Framing = Framing::Sse;

    fn session_id(&self) -> Option<&str> {
        Some(&self.id)
    }

    async fn recv(&mut self) -> Read {
        let closed = async {
            match self.body.tx.get_ref() {
                Some(tx) => tx.closed().await,
                None => {}
            }
        };
        tokio::select! {
            f = self.inbox.recv() => Read::Text(f),
            // The response is gone (the client went away).
            _ = closed => Read::Ended(End::Gone),
        }
    }

    async fn write(&mut self, out: &mut Writer, stall: Duration) -> io::Result<()> {
        out.write_to(&mut self.body, stall).await
    }

    async fn ping(&mut self, stall: Duration) -> io::Result<()> {
        self.write_raw(PING, stall).await
    }

    async fn send_close(&mut self, code: u16, stall: Duration) -> io::Result<()> {
        let frame = serde_json::json!({"type": "close", "code": code, "reason": close::reason(code)});
        let mut out = Writer::new(Framing::Sse);
        out.push(Text::from(frame.to_string()));
        out.write_to(&mut self.body, stall).await
    }

    async fn linger(&mut self, _deadline: Instant) {
        // No close handshake: the end of the response is the end.
    }

    async fn violation(&mut self, code: u16) {
        let _ = self.send_close(code, LINGER).await;
    }

    async fn gone(&mut self) {}

    fn reset(&mut self) {
        self.body.tx.close();
        if let Some(abort) = &self.abort {
            abort.cancel();
        }
    }

    async fn shutdown(&mut self) {
        self.body.tx.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_carry_their_node() {
        let id = new_session_id("node-a.example");
        assert_eq!(session_node(&id).as_deref(), Some("node-a.example"));
        assert!(id.len() >= 22 + 2);
        assert_ne!(new_session_id("n"), new_session_id("n"));
        for junk in ["", ".", "abc", "x.bm9kZQ", &"A".repeat(22), &format!("{}.", "A".repeat(22))] {
            assert_eq!(session_node(junk), None, "{junk}");
        }
    }
}
