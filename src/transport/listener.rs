//! The accept loop of one listener: HTTP/1.1 with upgrades, bounded before
//! authentication.
//!
//! - A request head must arrive within `server.header_timeout_s` (idle or
//!   trickling connections are closed; slowloris); a body is bounded by the
//!   routers' timeouts (`server.body_timeout_s`, see [`super`]).
//! - Plain HTTP connections (not upgraded: page loads, API calls, upgrades not
//!   yet answered) are counted apart from upgraded WebSockets: at most
//!   `limits.max_http_connections` per listener. One more arriving closes the
//!   *oldest* plain connection instead of being refused, so idle or slow
//!   requests can never crowd out a WebSocket upgrade: a new connection is
//!   always accepted, and an attacker must open that many connections in the
//!   time a real client takes to send its request head to push it out.
//!   Upgraded WebSockets leave the count (`limits.max_connections` bounds them
//!   at the upgrade).
//! - As a file-descriptor backstop, at most `limits.max_connections` + twice
//!   `limits.max_http_connections` TCP connections are open on a listener;
//!   beyond that a new connection is closed at once, so the internal listener
//!   (health, metrics) keeps answering.
//! - On stop, idle keep-alive connections are closed and requests in flight
//!   finish; upgraded WebSockets are drained by the node, not here.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, extract::ConnectInfo};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::metrics;

/// Settings of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    /// TCP connections open at most (the backstop).
    pub max_tcp: usize,
    /// Plain HTTP connections open at most; one more evicts the oldest.
    pub max_http: usize,
    /// `SO_SNDBUF` of accepted connections; 0: the OS's autotuning.
    pub send_buffer: usize,
}

impl Limits {
    /// The limits of `cfg`.
    pub fn of(cfg: &crate::config::Config) -> Limits {
        let l = &cfg.limits;
        Limits {
            header_timeout: Duration::from_secs(cfg.server.header_timeout_s),
            max_tcp: l.max_connections.saturating_add(l.max_http_connections.saturating_mul(2)),
            max_http: l.max_http_connections,
            send_buffer: l.socket_send_buffer,
        }
    }
}

/// The plain HTTP connections of a listener, oldest first: each can be told
/// to close.
#[derive(Default)]
struct Plain {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, CancellationToken>>,
}

impl Plain {
    /// Counts a new connection in; closes the oldest beyond `max`.
    fn enter(self: &Arc<Self>, max: usize) -> PlainGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evict = CancellationToken::new();
        let mut open = self.open.lock();
        open.insert(id, evict.clone());
        while open.len() > max {
            let Some((_, oldest)) = open.pop_first() else { break };
            oldest.cancel();
            metrics::http_evicted();
        }
        PlainGuard { plain: self.clone(), id, evict }
    }
}

/// A connection's place among the plain ones; left when it closes or upgrades.
struct PlainGuard {
    plain: Arc<Plain>,
    id: u64,
    evict: CancellationToken,
}

/// In every request's extensions: a plain HTTP connection whose response
/// becomes a long-lived stream (`/stream/chat`, counted among the
/// connections like a WebSocket) leaves the plain pool, so newer plain
/// requests cannot push it out.
#[derive(Clone)]
pub struct PlainSlot(Arc<PlainGuard>);

impl PlainSlot {
    pub fn leave(&self) {
        self.0.plain.open.lock().remove(&self.0.id);
    }
}

impl Drop for PlainGuard {
    fn drop(&mut self) {
        self.plain.open.lock().remove(&self.id);
    }
}

/// A TCP stream that counts itself while open (it lives on inside an
/// upgraded WebSocket).
pub struct Counted {
    tcp: TcpStream,
    open: Arc<AtomicUsize>,
    /// Cancelled: the connection is dropped with an RST (see [`Abort`]).
    abort: CancellationToken,
}

/// In every request's extensions: cancelling it drops the HTTP connection at
/// once with an RST (an HTTP stream whose reader stopped; hyper has no write
/// deadline of its own).
#[derive(Clone)]
pub struct Abort(pub CancellationToken);

impl crate::session::Transport for Counted {
    fn reset(&self) {
        // Closing now sends RST and frees the socket, instead of the kernel
        // holding unsent data for a peer that does not read.
        let _ = self.tcp.set_zero_linger();
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self.abort.is_cancelled() {
            let _ = self.tcp.set_zero_linger();
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Serves `router` on `listener` until `stop` is cancelled; the task ends
/// once the HTTP connections are closed (bounded by a few seconds).
pub fn spawn(listener: TcpListener, router: Router, limits: Limits, stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let open = Arc::new(AtomicUsize::new(0));
        let plain = Arc::new(Plain::default());
        let conns = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if open.fetch_add(1, Ordering::AcqRel) >= limits.max_tcp {
                open.fetch_sub(1, Ordering::AcqRel);
                metrics::upgrade_rejected("tcp_limit");
                drop(tcp);
                continue;
            }
            // No Nagle: a chat frame must leave now, not wait for the peer's
            // delayed ACK (~22 ms per hop otherwise).
            let _ = tcp.set_nodelay(true);
            // A bounded kernel send buffer: a client that stops reading pins
            // at most this much kernel memory, and drains at most this much
            // before the close frame that ends it.
            if limits.send_buffer > 0 {
                let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(limits.send_buffer);
            }
            let abort = CancellationToken::new();
            let io = TokioIo::new(Counted { tcp, open: open.clone(), abort: abort.clone() });
            let guard = Arc::new(plain.enter(limits.max_http));
            conns.spawn(serve_one(io, peer, router.clone(), limits, stop.clone(), guard, abort));
        }
        conns.close();
        if tokio::time::timeout(Duration::from_secs(5), conns.wait()).await.is_err() {
            tracing::warn!("http connections still open after stop");
        }
    })
}

/// One HTTP connection. The connection is built here and only what the
/// future awaits is moved into it: an `async fn` would keep its arguments
/// (the socket, the router, the limits, the peer) beside the connection
/// that already owns them, for as long as the connection lives (an HTTP
/// stream: the session's life). Per connection: a 512-byte task and a
/// 704-byte connection (768 with jemalloc's size classes), where the
/// `async fn` was a 1,408-byte task (1,536), release build.
fn serve_one(
    io: TokioIo<Counted>,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
    plain: Arc<PlainGuard>,
    abort: CancellationToken,
) -> impl Future<Output = ()> + Send {
    let on_request = abort.clone();
    let slot = PlainSlot(plain.clone());
    let service = router.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(Abort(on_request.clone()));
        req.extensions_mut().insert(slot.clone());
        req
    });
    // Boxed: pinned inside the future it would be kept twice (the captured
    // value and the pinned one).
    let mut conn = Box::pin(
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(io, TowerToHyperService::new(service))
            .with_upgrades(),
    );
    async move {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, %peer, "http connection ended with an error");
                }
            }
            _ = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::select! {
                    r = tokio::time::timeout(Duration::from_secs(5), conn) => r.ok(),
                    _ = abort.cancelled() => None,
                };
            }
            // Dropping the connection resets it (see `Counted`'s drop).
            _ = abort.cancelled() => {}
            // Pushed out by newer plain connections: closed now (dropping the
            // connection closes the socket).
            _ = plain.evict.cancelled() => {
                tracing::debug!(%peer, "oldest plain http connection closed (limits.max_http_connections)");
            }
        }
        // Closed, or upgraded: the WebSocket no longer counts as plain HTTP.
        drop(plain);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_plain_pool_closes_its_oldest_connection() {
        let plain = Arc::new(Plain::default());
        let first = plain.enter(2);
        let second = plain.enter(2);
        assert!(!first.evict.is_cancelled());
        let third = plain.enter(2);
        assert!(first.evict.is_cancelled(), "the oldest makes room");
        assert!(!second.evict.is_cancelled() && !third.evict.is_cancelled());
        // One that closed (or upgraded) leaves the count: no eviction then.
        drop(second);
        let fourth = plain.enter(2);
        assert!(!third.evict.is_cancelled() && !fourth.evict.is_cancelled());
        assert_eq!(plain.open.lock().len(), 2);
    }
}
