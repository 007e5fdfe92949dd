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

use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Bytes;
use base64::Engine as _;
use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::hub::{
    Hub,
    streams::{Inbox, Offer},
};

/// The SSE comment that keeps proxies from timing out an idle stream.
const PING: &[u8] = b": ping\n\n";

/// A chunk of the response body, or the error that aborts it.
pub type Chunk = io::Result<Bytes>;

/// The hand-off between the session and hyper: one chunk at most (an idle
/// stream keeps no buffer; a tokio channel would keep a block of 32 slots).
#[derive(Default)]
struct Slot {
    chunk: parking_lot::Mutex<Option<Chunk>>,
    /// The session ended the body.
    done: AtomicBool,
    /// hyper dropped the body (the client went away).
    gone: AtomicBool,
    /// The body's reader (hyper) waits for a chunk.
    to_body: AtomicWaker,
    /// The session waits for room, or for the body to go.
    to_session: AtomicWaker,
}

/// Writes into the response body, one chunk per write.
pub struct BodyWriter {
    slot: Arc<Slot>,
}

impl BodyWriter {
    fn close(&self) {
        self.slot.done.store(true, Ordering::Release);
        self.slot.to_body.wake();
    }

    /// Resolves once hyper dropped the body.
    fn gone(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(|cx| {
            if self.slot.gone.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.slot.to_session.register(cx.waker());
            if self.slot.gone.load(Ordering::Acquire) { Poll::Ready(()) } else { Poll::Pending }
        })
    }
}

impl AsyncWrite for BodyWriter {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let slot = &self.slot;
        let broken = || Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        if slot.gone.load(Ordering::Acquire) || slot.done.load(Ordering::Acquire) {
            return broken();
        }
        let mut chunk = slot.chunk.lock();
        if chunk.is_some() {
            slot.to_session.register(cx.waker());
            // Re-checked under the lock: the reader takes under it too.
            if chunk.is_some() {
                return if slot.gone.load(Ordering::Acquire) { broken() } else { Poll::Pending };
            }
        }
        let n: usize = bufs.iter().map(|b| b.len()).sum();
        let mut bytes = Vec::with_capacity(n);
        for b in bufs {
            bytes.extend_from_slice(b);
        }
        *chunk = Some(Ok(Bytes::from(bytes)));
        drop(chunk);
        slot.to_body.wake();
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close();
        Poll::Ready(Ok(()))
    }
}

/// The response body: the chunks the session writes, until it ends.
pub struct BodyStream {
    slot: Arc<Slot>,
}

impl futures_util::Stream for BodyStream {
    type Item = Chunk;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        let slot = &self.slot;
        let take = || {
            let c = slot.chunk.lock().take();
            if c.is_some() {
                slot.to_session.wake();
            }
            c
        };
        if let Some(c) = take() {
            return Poll::Ready(Some(c));
        }
        if slot.done.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        slot.to_body.register(cx.waker());
        match take() {
            Some(c) => Poll::Ready(Some(c)),
            None if slot.done.load(Ordering::Acquire) => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

impl Drop for BodyStream {
    fn drop(&mut self) {
        self.slot.gone.store(true, Ordering::Release);
        self.slot.to_session.wake();
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
    ) -> (SseWire, BodyStream) {
        let slot = Arc::new(Slot::default());
        let id: Arc<str> = new_session_id(node_id).into();
        let inbox = Inbox::new(inbox_bytes);
        hub.streams.insert(id.clone(), inbox.clone());
        (SseWire { id, hub, inbox, body: BodyWriter { slot: slot.clone() }, abort }, BodyStream { slot })
    }

    /// Hands frames to this session directly (tests).
    pub fn offer(&self, frames: Vec<Text>) -> Offer {
        self.hub.streams.offer(&self.id, frames)
    }

    async fn write_raw(&mut self, bytes: &[u8], stall: Duration) -> io::Result<()> {
        stalled(stall, self.body.write_all(bytes)).await
    }

    /// The session takes no more frames: a POST from now on gets 404, not a
    /// 202 for a frame nobody reads. Done before the client can see the
    /// close (the `close` event, the end of the response or a reset); the
    /// session's own end (presence, storage) comes later.
    fn unroute(&self) {
        self.hub.streams.remove(&self.id);
    }
}

impl Drop for SseWire {
    fn drop(&mut self) {
        self.unroute();
    }
}

impl Wire for SseWire {
    const TRANSPORT: &'static str = "http";
    const FRAMING: Framing = Framing::Sse;

    fn session_id(&self) -> Option<&str> {
        Some(&self.id)
    }

    async fn recv(&mut self) -> Read {
        tokio::select! {
            f = self.inbox.recv() => Read::Text(f),
            // The response is gone (the client went away).
            _ = self.body.gone() => Read::Ended(End::Gone),
        }
    }

    async fn write(&mut self, out: &mut Writer, stall: Duration) -> io::Result<()> {
        out.write_to(&mut self.body, stall).await
    }

    async fn ping(&mut self, stall: Duration) -> io::Result<()> {
        self.write_raw(PING, stall).await
    }

    async fn send_close(&mut self, code: u16, stall: Duration) -> io::Result<()> {
        self.unroute();
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
        self.unroute();
        self.body.close();
        if let Some(abort) = &self.abort {
            abort.cancel();
        }
    }

    async fn shutdown(&mut self) {
        self.unroute();
        self.body.close();
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
