//! One session, from the upgraded socket (or the opened HTTP stream) to the
//! closed connection. Generic over its [`Wire`] (WebSocket or HTTP streaming,
//! see `wire.rs`), and the WebSocket over the byte stream, so unit tests drive
//! it over an in-memory pipe under a paused clock. Every rule below holds on
//! both transports: there is one state machine.
//!
//! A session goes through three phases, in one task that owns the socket:
//! 1. *Authenticate*: the token came at upgrade (header or cookie), or the
//!    first frame must be a valid `hello` within `auth.hello_timeout_s`; any
//!    other frame gets `unauthorized` and close 4001.
//! 2. *Open*: [`Node::open_session`] subscribes and reads membership, then
//!    `welcome` is written straight to the socket, so it is the first frame.
//! 3. *Run*: one `select!` reads frames, writes the bounded outbound queue
//!    (batched into one flush), sends heartbeat pings, closes an idle
//!    connection (1001) and one whose token expired (4001).
//!
//! Every cost is bounded: the outbound queue in frames and bytes (1013 past
//! either), each write by `limits.write_timeout_s` (a peer that stops reading
//! never pins a session), requests by a per-connection token bucket.
//!
//! Closing follows RFC 6455: the close frame carries the first code decided
//! (see [`Closer`](crate::hub::Closer)); afterwards the session keeps reading
//! and discarding until the client's close frame or 2 s, then ends the TCP
//! connection, so the code reaches the client instead of a reset.

mod budget;
mod closing;
mod echo;
mod hello;
pub mod sse;
mod wire;
mod writer;

use budget::{Bucket, Strikes};
pub use closing::{End, finish};
use closing::{LINGER, close_message, drain_raw, read_error};
pub use echo::echo;
use hello::authenticate;
pub use wire::{Read, Wire, WsWire};

use std::{io, sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::{Instant, sleep_until, timeout, timeout_at},
};
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;
use tungstenite::{
    Message,
    error::ProtocolError,
    protocol::{CloseFrame, frame::coding::CloseCode},
};

use crate::{
    auth::Verified,
    engine::Page,
    error::{ChatError, ErrorCode},
    hub::{Conn, Receiver},
    metrics,
    node::Node,
    protocol::{self, Ack, Command, Inbound, Outgoing, Refreshed, ServerFrame, Text, UserRef, Welcome, close, kind},
};
use writer::{Framing, Writer, stalled};

/// The byte stream under a session.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// Makes the coming close abortive (RST): for a peer that stopped reading,
    /// so no unsent data keeps the connection alive after the session.
    fn reset(&self) {}
}

impl Transport for tokio::io::DuplexStream {}
impl Transport for hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {}

/// Frames written per flush at most (one syscall for a burst of fan-out).
const WRITE_BATCH: usize = 128;
/// Bytes written per flush at most.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// A session from the upgraded socket (or opened stream) to the closed
/// connection. `pre_auth`: the token given before the session (at upgrade,
/// or in the HTTP request), already verified, and the id of its `hello`.
///
/// Not an `async fn`: the arguments of one are copied into its future's
/// state next to the originals, and this future lives as long as the
/// connection (the WebSocket alone is 328 bytes). An `async move` block
/// keeps one copy.
#[allow(clippy::manual_async_fn, reason = "an async fn would keep its arguments twice")]
pub fn run<W: Wire>(
    node: Arc<Node>,
    mut wire: W,
    mut pre_auth: Option<(Verified, Option<Value>)>,
) -> impl Future<Output = ()> {
    async move { run_inner(&node, &mut wire, &mut pre_auth).await }
}

async fn run_inner<W: Wire>(node: &Arc<Node>, ws: &mut W, pre_auth: &mut Option<(Verified, Option<Value>)>) {
    let write_timeout = Duration::from_secs(node.cfg.limits.write_timeout_s);
    let mut strikes = Strikes { bad: 0, rate: 0, max: node.cfg.limits.max_bad_frames };
    // A token given at upgrade took its connect token there.
    let via_hello = pre_auth.is_none();
    let (token, hello_id) = match pre_auth.take() {
        Some(x) => x,
        // Boxed sub-futures: only the running phase's state stays in the
        // session's future for the connection's life (memory per connection).
        None => match Box::pin(authenticate(node, ws, write_timeout)).await {
            Ok(x) => x,
            Err(end) => return Box::pin(finish(ws, end, None, write_timeout)).await,
        },
    };
    if node.is_draining() {
        return Box::pin(finish(ws, End::Close(close::RESTART), None, write_timeout)).await;
    }
    let user = token.user.clone();
    let limits = &node.cfg.limits;
    if node.hub.user_connections(&user.id) >= limits.connections_per_user {
        let f = protocol::error(hello_id.as_ref(), &too_many_connections(limits.connections_per_user));
        Box::pin(write_direct(ws, f, kind::ERROR, write_timeout)).await;
        return Box::pin(finish(ws, End::Close(close::POLICY), None, write_timeout)).await;
    }
    if via_hello && let Err(e) = node.check_connect_rate(&user.id).await {
        Box::pin(write_direct(ws, protocol::error(hello_id.as_ref(), &e), kind::ERROR, write_timeout)).await;
        return Box::pin(finish(ws, End::Close(close::POLICY), None, write_timeout)).await;
    }
    let (conn, rx) =
        Conn::new(node.next_conn_id(), user.id.as_str().into(), limits.outbound_queue, limits.outbound_bytes);
    let span = tracing::info_span!("session", conn = conn.id, user = %user.id, transport = W::TRANSPORT);
    async move {
        let opened = match Box::pin(node.open_session(&conn, &user)).await {
            Ok(o) => o,
            Err(e) => {
                Box::pin(node.close_session(&conn, false, &[])).await;
                let code = if e.code == ErrorCode::Internal { close::INTERNAL } else { close::TRY_LATER };
                Box::pin(write_direct(ws, protocol::error(hello_id.as_ref(), &e), kind::ERROR, write_timeout)).await;
                return Box::pin(finish(ws, End::Close(code), None, write_timeout)).await;
            }
        };
        let welcome = protocol::render(&ServerFrame::Welcome(Welcome {
            id: hello_id.as_ref(),
            user: &user,
            heartbeat_s: node.cfg.server.heartbeat_s,
            max_body_chars: node.cfg.limits.max_body_chars,
            exp: token.exp,
            session: ws.session_id(),
            conversations: &opened.entries,
        }));
        metrics::connection_opened(W::TRANSPORT);
        tracing::debug!(conversations = opened.entries.len(), "connected");
        let mut out = Writer::new(W::FRAMING);
        let end = if Box::pin(write_direct(ws, welcome, kind::WELCOME, write_timeout)).await {
            if opened.came_online {
                let convs = node.hub.subscriptions(&conn);
                if let Err(e) = Box::pin(node.announce_presence(&user.id, true, &convs, &opened.dm_partners)).await {
                    tracing::debug!(error = %e, "presence announcement failed");
                }
            }
            let mut s = Session { node, conn: &conn, user: &user, exp: token.exp, strikes: &mut strikes };
            Box::pin(s.run(ws, &mut out, &rx)).await
        } else {
            End::Stalled
        };
        // The close handshake, then presence (which may wait on storage).
        conn.closer.close(close::NORMAL);
        Box::pin(finish(ws, end, Some((&mut out, &rx)), write_timeout)).await;
        metrics::connection_closed(W::TRANSPORT);
        Box::pin(node.close_session(&conn, opened.counted, &opened.dm_partners)).await;
        tracing::debug!(?end, "closed");
    }
    .instrument(span)
    .await
}

fn too_many_connections(limit: usize) -> ChatError {
    ChatError::rate_limited(5000).with_message(format!("too many connections for this user (limit {limit})"))
}

/// Writes one frame straight to the wire (phases 1 and 2). On failure the
/// connection will end with a reset: the frame may be cut short.
async fn write_direct<W: Wire>(ws: &mut W, frame: Text, ty: &str, within: Duration) -> bool {
    metrics::frames_out(ty, 1);
    let mut w = Writer::new(W::FRAMING);
    w.push(frame);
    let ok = ws.write(&mut w, within).await.is_ok();
    if !ok {
        ws.reset();
    }
    ok
}

/// Phase 3: the state of an authenticated, open session.
struct Session<'a> {
    node: &'a Node,
    conn: &'a Arc<Conn>,
    user: &'a UserRef,
    /// When the token expires (seconds since the epoch); `refresh` moves it.
    exp: u64,
    strikes: &'a mut Strikes,
}

/// The instant a token's `exp` (Unix seconds) falls on, on tokio's clock.
fn expiry_instant(exp: u64) -> Instant {
    let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
    let left_ms = (exp.saturating_mul(1000)).saturating_sub(now);
    // Far-future tokens are refused by max_token_ttl_s; cap anyway.
    Instant::now() + Duration::from_millis(left_ms.min(400 * 86_400_000))
}

impl Session<'_> {
    async fn run<W: Wire>(&mut self, ws: &mut W, out: &mut Writer, rx: &Receiver) -> End {
        let cfg = &self.node.cfg;
        let heartbeat = Duration::from_secs(cfg.server.heartbeat_s);
        let write_timeout = Duration::from_secs(cfg.limits.write_timeout_s);
        let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        // Two timers for the connection's life, re-armed only when they fire
        // (idle) or on `refresh` (expiry): a busy connection wakes many times a
        // second and must not register timers on every wake-up.
        let mut last_seen = Instant::now();
        let idle = sleep_until(last_seen + heartbeat * 2);
        let expiry = sleep_until(expiry_instant(self.exp));
        tokio::pin!(idle, expiry);
        let never = || Instant::now() + Duration::from_secs(400 * 86_400);
        let mut requests = Bucket::new(cfg.limits.requests_per_s, cfg.limits.requests_burst);
        loop {
            tokio::select! {
                biased;
                _ = self.conn.closer.closed() => {
                    return End::Close(self.conn.closer.code().unwrap_or(close::NORMAL));
                }
                _ = &mut expiry => {
                    self.reply(kind::ERROR, protocol::error_code(None, ErrorCode::Unauthorized, "token expired"));
                    self.conn.closer.close(close::UNAUTHORIZED);
                    expiry.as_mut().reset(never());
                }
                frame = rx.recv() => {
                    // A close decided while a write is blocked (a slow
                    // consumer, a drain) is acted on at once.
                    let written = tokio::select! {
                        biased;
                        _ = self.conn.closer.closed() => None,
                        r = write_batch(ws, out, rx, frame, write_timeout) => Some(r),
                    };
                    match written {
                        None => return End::Close(self.conn.closer.code().unwrap_or(close::NORMAL)),
                        Some(Ok(())) => {}
                        Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut => return End::Stalled,
                        Some(Err(_)) => return End::Gone,
                    }
                }
                _ = ping.tick() => {
                    match ws.ping(write_timeout).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::TimedOut => return End::Stalled,
                        Err(_) => return End::Gone,
                    }
                }
                _ = &mut idle => {
                    let due = last_seen + heartbeat * 2;
                    if Instant::now() >= due {
                        self.conn.closer.close(close::IDLE);
                        idle.as_mut().reset(never());
                    } else {
                        idle.as_mut().reset(due);
                    }
                }
                msg = ws.recv() => {
                    let msg = match msg {
                        Read::Ended(end) => return end,
                        Read::NotUtf8 => return End::Violation(close::INVALID_DATA),
                        m => m,
                    };
                    // Any frame, Pongs included, counts as life.
                    last_seen = Instant::now();
                    match msg {
                        Read::Text(t) => {
                            if let Some(exp) = Box::pin(self.frame(&t, &mut requests)).await {
                                self.exp = exp;
                                expiry.as_mut().reset(expiry_instant(exp));
                            }
                        }
                        Read::Binary => {
                            metrics::frame_in("binary");
                            let f = protocol::error_code(None, ErrorCode::BadRequest, "binary frames are not accepted");
                            self.reply(kind::ERROR, f);
                            if self.strikes.bad_frame() {
                                self.conn.closer.close(close::POLICY);
                            }
                        }
                        Read::Alive | Read::NotUtf8 | Read::Ended(_) => {}
                    }
                }
            }
        }
    }

    /// Queues a reply to the client's own frame.
    fn reply(&self, ty: &str, frame: Text) {
        if self.conn.push(frame) {
            metrics::frames_out(ty, 1);
        }
    }

    /// Handles one text frame. Returns a new token expiry after a `refresh`.
    async fn frame(&mut self, text: &str, requests: &mut Bucket) -> Option<u64> {
        let inbound = match protocol::parse(text) {
            Ok(i) => i,
            Err(e) => {
                metrics::frame_in("invalid");
                let id = if e.replies { e.id.as_ref() } else { None };
                self.reply(kind::ERROR, protocol::error_code(id, ErrorCode::BadRequest, &e.message));
                if self.strikes.bad_frame() {
                    self.conn.closer.close(close::POLICY);
                }
                return None;
            }
        };
        let kind = inbound.cmd.kind();
        metrics::frame_in(kind);
        // Each frame is its own trace, linked to the connection's span.
        let span =
            tracing::debug_span!(parent: None, "frame", frame_type = kind, conn = self.conn.id, user = %self.user.id);
        span.follows_from(tracing::Span::current().id());
        let handled = self.handle(&inbound, requests).instrument(span).await;
        match handled {
            Ok(exp) => exp,
            Err(e) => {
                let replies =
                    !matches!(inbound.cmd, Command::Delivered { .. } | Command::Read { .. } | Command::Typing { .. });
                let id = if replies { inbound.id.as_ref() } else { None };
                self.reply(kind::ERROR, protocol::error(id, &e));
                let close_with = match e.code {
                    ErrorCode::BadRequest | ErrorCode::TooLarge => self.strikes.bad_frame().then_some(close::POLICY),
                    ErrorCode::RateLimited => self.strikes.limited().then_some(close::POLICY),
                    ErrorCode::Unauthorized => Some(close::UNAUTHORIZED),
                    _ => None,
                };
                if let Some(code) = close_with {
                    self.conn.closer.close(code);
                }
                if e.code == ErrorCode::Internal {
                    tracing::error!(frame = kind, "internal error answering a frame");
                }
                None
            }
        }
    }

    /// Takes one send from the user's budget, and the bytes of its body
    /// (a message's, an edit's) from the byte budget (messages and changes
    /// alike). Past a budget too often in a row: close 4008.
    fn send_budget(&mut self, body: Option<&str>) -> Result<(), ChatError> {
        let limited = match self.node.check_send_rate(&self.conn.user) {
            Ok(()) => match body {
                Some(b) => self.node.check_send_bytes(&self.conn.user, b).err(),
                None => None,
            },
            Err(e) => Some(e),
        };
        if let Some(e) = limited {
            if e.code == ErrorCode::RateLimited && self.strikes.limited() {
                self.conn.closer.close(close::POLICY);
            }
            return Err(e);
        }
        self.strikes.rate = 0;
        Ok(())
    }

    /// Handles one authenticated frame; replies go to the connection's queue.
    async fn handle(&mut self, inbound: &Inbound, requests: &mut Bucket) -> Result<Option<u64>, ChatError> {
        let node = self.node;
        let user = self.user;
        let id = inbound.id.as_ref();
        if matches!(inbound.cmd, Command::History { .. } | Command::Sync { .. } | Command::Presence { .. }) {
            if let Err(ms) = requests.take() {
                return Err(ChatError::rate_limited(ms));
            }
            self.strikes.rate = 0;
        }
        match &inbound.cmd {
            Command::Hello { .. } => return Err(ChatError::bad_request("already authenticated")),
            Command::Refresh { token } => {
                let v = node.auth.verify_token(token).map_err(|e| ChatError::unauthorized(e.to_string()))?;
                if v.user.id != user.id {
                    return Err(ChatError::unauthorized("refresh token names another user"));
                }
                self.reply(kind::REFRESHED, protocol::render(&ServerFrame::Refreshed(Refreshed { id, exp: v.exp })));
                return Ok(Some(v.exp));
            }
            Command::Send { conversation, client_msg_id, body, reply_to } => {
                node.validate_message(client_msg_id, body)?;
                node.classify(conversation)?;
                self.send_budget(Some(body))?;
                let a = node.store_message(user, conversation, client_msg_id.clone(), body.clone(), *reply_to).await?;
                let ack = Ack { id, conversation, seq: a.seq, ts: a.ts_ms, duplicate: a.duplicate };
                self.reply(kind::ACK, protocol::render(&ServerFrame::Ack(ack)));
            }
            // v1.2: changes draw from the send budget (limits.send_per_s and
            // limits.send_burst, per user), like messages; an edit's body
            // from the byte budget too (limits.send_bytes_per_s).
            Command::Edit { conversation, seq, .. }
            | Command::Delete { conversation, seq }
            | Command::React { conversation, seq, .. } => {
                let change = node.change_of(&inbound.cmd)?;
                node.classify(conversation)?;
                let body = match &inbound.cmd {
                    Command::Edit { body, .. } => Some(body.as_str()),
                    _ => None,
                };
                self.send_budget(body)?;
                let a = node.change(user, conversation, *seq, change).await?;
                let ack = Ack { id, conversation, seq: a.seq, ts: a.ts_ms, duplicate: a.duplicate };
                self.reply(kind::ACK, protocol::render(&ServerFrame::Ack(ack)));
            }
            Command::Delivered { conversation, seq } => node.receipt(&user.id, conversation, *seq, false).await?,
            Command::Read { conversation, seq } => node.receipt(&user.id, conversation, *seq, true).await?,
            Command::Typing { conversation } => node.typing(user, conversation).await?,
            Command::History { conversation, before, limit } => {
                let f = node.history(&user.id, id, conversation, Page::Before(*before, *limit), None).await?;
                self.reply(kind::HISTORY, f);
            }
            Command::Sync { conversation, after, limit, epoch } => {
                let page = Page::Sync(*after, *limit);
                let f = node.history(&user.id, id, conversation, page, epoch.as_deref()).await?;
                self.reply(kind::HISTORY, f);
            }
            Command::Presence { conversation } => {
                let f = node.presence(&user.id, id, conversation).await?;
                self.reply(kind::PRESENCE, f);
            }
            Command::Ping => self.reply(kind::PONG, protocol::pong(id)),
        }
        Ok(None)
    }
}

/// Writes `first` and whatever else is queued (up to a batch), then flushes.
/// False when the socket failed.
async fn write_batch<W: Wire>(
    ws: &mut W,
    out: &mut Writer,
    rx: &Receiver,
    first: Outgoing,
    stall: Duration,
) -> io::Result<()> {
    let depth = rx.len();
    if depth > 0 {
        metrics::queue_depth(depth);
    }
    let (mut n, mut bytes) = (1, first.len());
    out.push(first);
    rx.drain(
        |f| {
            let room = n < WRITE_BATCH && bytes < WRITE_BATCH_BYTES;
            if room {
                n += 1;
                bytes += f.len();
            }
            room
        },
        |f| out.push(f),
    );
    ws.write(out, stall).await
}

#[cfg(test)]
mod tests;
