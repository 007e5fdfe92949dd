//! The WebSocket endpoint `GET /ws/chat` and the per-connection session.
//!
//! A session goes through three phases:
//! 1. *Authenticate*: the token came at upgrade (header or cookie), or the
//!    first frame must be `hello` within `auth.hello_timeout_s`.
//! 2. *Set up*: register with the hub, subscribe to the user's topics, then
//!    write `welcome` straight to the socket, so it is always the first frame.
//! 3. *Run*: a writer task drains the bounded outbound queue (batching frames
//!    into one flush) and sends heartbeat pings; the reader handles one frame
//!    at a time and closes a connection silent for 2 x heartbeat with 1001.
//!
//! Any side may decide to close: the [`Closer`](crate::hub::Closer) carries the
//! first code chosen (1013 from a full queue, 1012 from drain, 4008, 1009, ...)
//! and the writer sends it.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::{
        ConnectInfo, State, WebSocketUpgrade,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket},
    },
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
};
use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use serde_json::Value;
use tokio::{sync::mpsc, time::timeout};
use tracing::Instrument;

use super::{api_error, client_ip};
use crate::{
    engine::Page,
    error::{ChatError, ErrorCode},
    hub::{Conn, Topic},
    metrics,
    node::{Kind, Node},
    protocol::{self, Ack, Command, Inbound, UserRef, Welcome},
};

pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_IDLE: u16 = 1001;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_INTERNAL: u16 = 1011;
pub const CLOSE_RESTART: u16 = 1012;
pub const CLOSE_TRY_LATER: u16 = 1013;
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
pub const CLOSE_POLICY: u16 = 4008;

fn close_reason(code: u16) -> &'static str {
    match code {
        CLOSE_IDLE => "idle timeout",
        CLOSE_TOO_BIG => "frame too big",
        CLOSE_INTERNAL => "internal error",
        CLOSE_RESTART => "service restart",
        CLOSE_TRY_LATER => "try again later",
        CLOSE_UNAUTHORIZED => "unauthorized",
        CLOSE_POLICY => "policy violation",
        _ => "",
    }
}

fn close_message(code: u16) -> Message {
    Message::Close(Some(CloseFrame { code, reason: close_reason(code).into() }))
}

/// Frames written per flush at most (one syscall for a burst of fan-out).
const WRITE_BATCH: usize = 128;
/// Typing events forwarded per conversation and connection: one per this.
const TYPING_EVERY: Duration = Duration::from_secs(1);
/// How long a write may block before the peer counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The token a client presented before the upgrade, if any.
fn upgrade_token<'a>(headers: &'a HeaderMap, cookie_name: &str) -> Option<&'a str> {
    // A Bearer token wins; any other Authorization scheme (say, Basic auth of
    // a staging proxy) leaves the cookie to speak.
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    if bearer.is_some() {
        return bearer;
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == cookie_name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// `GET /ws/chat`.
pub async fn upgrade(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if node.is_draining() {
        metrics::upgrade_rejected("draining");
        return api_error(&ChatError::new(ErrorCode::Unavailable, "node is draining; reconnect to another node"));
    }
    let allowed = &node.cfg.server.allowed_origins;
    if !allowed.is_empty()
        && let Some(origin) = headers.get(header::ORIGIN)
    {
        let ok = origin.to_str().is_ok_and(|o| allowed.iter().any(|a| a.eq_ignore_ascii_case(o)));
        if !ok {
            metrics::upgrade_rejected("origin");
            return api_error(&ChatError::forbidden("origin not allowed"));
        }
    }
    let user = match upgrade_token(&headers, &node.cfg.auth.cookie_name) {
        None => None,
        Some(token) => match node.auth.verify(token) {
            Ok(u) => Some(u),
            Err(e) => {
                metrics::upgrade_rejected("token");
                return api_error(&ChatError::unauthorized(e.to_string()));
            }
        },
    };
    if let Some(u) = &user
        && node.hub.user_connections(&u.id) >= node.cfg.limits.connections_per_user
    {
        metrics::upgrade_rejected("connections_per_user");
        return api_error(&too_many_connections(node.cfg.limits.connections_per_user));
    }
    let ip = client_ip(&node.cfg.server.trusted_proxies, peer.ip(), &headers);
    let max = node.cfg.limits.max_frame_bytes;
    ws.max_frame_size(max)
        .max_message_size(max)
        // Frames are small; the buffer grows for a large one. Keeps idle
        // connections cheap.
        .read_buffer_size(1024)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| {
            let tracked = node.sessions.track_future(run(node.clone(), socket, user, ip));
            tracked.instrument(tracing::info_span!("ws", %ip))
        })
        .into_response()
}

fn too_many_connections(limit: usize) -> ChatError {
    ChatError {
        code: ErrorCode::RateLimited,
        message: format!("too many connections for this user (limit {limit})"),
        retry_after_ms: Some(5000),
    }
}

/// Writes one frame straight to the socket (phases 1 and 2).
async fn write_direct(socket: &mut WebSocket, frame: Utf8Bytes, ty: &str) -> bool {
    metrics::frames_out(ty, 1);
    matches!(timeout(WRITE_TIMEOUT, socket.send(Message::Text(frame))).await, Ok(Ok(())))
}

async fn close_direct(mut socket: WebSocket, code: u16) {
    metrics::close(code);
    let _ = timeout(Duration::from_secs(2), socket.send(close_message(code))).await;
    let _ = timeout(Duration::from_secs(2), socket.close()).await;
}

fn is_too_big(e: axum::Error) -> bool {
    e.into_inner().downcast::<tungstenite::Error>().is_ok_and(|e| matches!(*e, tungstenite::Error::Capacity(_)))
}

/// Counts bad frames; over `limits.max_bad_frames` the connection is closed 4008.
struct Strikes {
    bad: u32,
    rate: u32,
    max: u32,
}

impl Strikes {
    /// Records a bad frame; true when the connection must close.
    fn bad_frame(&mut self) -> bool {
        self.bad += 1;
        self.bad > self.max
    }
}

/// Phase 1: wait for `hello`. `None` when the connection is over.
async fn authenticate(
    node: &Node,
    socket: &mut WebSocket,
    strikes: &mut Strikes,
) -> Result<(UserRef, Option<Value>), u16> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(node.cfg.auth.hello_timeout_s);
    loop {
        let msg = match tokio::time::timeout_at(deadline, socket.recv()).await {
            Err(_) => return Err(CLOSE_UNAUTHORIZED),
            Ok(None) | Ok(Some(Ok(Message::Close(_)))) => return Err(0),
            Ok(Some(Err(e))) => return Err(if is_too_big(e) { CLOSE_TOO_BIG } else { 0 }),
            Ok(Some(Ok(m))) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => {
                metrics::frame_in("binary");
                let f = protocol::error_code(None, ErrorCode::BadRequest, "binary frames are not accepted");
                if !write_direct(socket, f, "error").await || strikes.bad_frame() {
                    return Err(CLOSE_POLICY);
                }
                continue;
            }
            _ => continue,
        };
        match protocol::parse(&text) {
            Ok(Inbound { id, cmd: Command::Hello { token } }) => {
                metrics::frame_in("hello");
                return match node.auth.verify(&token) {
                    Ok(user) => Ok((user, id)),
                    Err(e) => {
                        let f = protocol::error_code(id.as_ref(), ErrorCode::Unauthorized, &e.to_string());
                        write_direct(socket, f, "error").await;
                        Err(CLOSE_UNAUTHORIZED)
                    }
                };
            }
            Ok(Inbound { id, cmd }) => {
                metrics::frame_in(cmd.kind());
                let f = protocol::error_code(id.as_ref(), ErrorCode::Unauthorized, "authenticate with hello first");
                write_direct(socket, f, "error").await;
                return Err(CLOSE_UNAUTHORIZED);
            }
            // A JSON object that is not a usable hello (no token, unknown
            // type, ...) is "another frame before authentication".
            Err(e) if e.is_object => {
                metrics::frame_in("invalid");
                let f = protocol::error_code(e.id.as_ref(), ErrorCode::Unauthorized, &e.message);
                write_direct(socket, f, "error").await;
                return Err(CLOSE_UNAUTHORIZED);
            }
            Err(e) => {
                metrics::frame_in("invalid");
                let f = protocol::error_code(e.id.as_ref(), ErrorCode::BadRequest, &e.message);
                if !write_direct(socket, f, "error").await || strikes.bad_frame() {
                    return Err(CLOSE_POLICY);
                }
            }
        }
    }
}

/// A session from upgrade to close.
pub async fn run(node: Arc<Node>, mut socket: WebSocket, pre_auth: Option<UserRef>, _ip: std::net::IpAddr) {
    let mut strikes = Strikes { bad: 0, rate: 0, max: node.cfg.limits.max_bad_frames };
    let (user, hello_id) = match pre_auth {
        Some(u) => (u, None),
        None => match authenticate(&node, &mut socket, &mut strikes).await {
            Ok(x) => x,
            Err(0) => return,
            Err(code) => return close_direct(socket, code).await,
        },
    };
    if node.is_draining() {
        return close_direct(socket, CLOSE_RESTART).await;
    }
    let limits = &node.cfg.limits;
    if node.hub.user_connections(&user.id) >= limits.connections_per_user {
        let f = protocol::error(hello_id.as_ref(), &too_many_connections(limits.connections_per_user));
        write_direct(&mut socket, f, "error").await;
        return close_direct(socket, CLOSE_POLICY).await;
    }
    let (conn, rx) = Conn::new(node.next_conn_id(), user.id.as_str().into(), limits.outbound_queue);
    let span = tracing::info_span!("session", conn = conn.id, user = %user.id);
    async move {
        node.hub.register(&conn);
        match setup(&node, &conn, &user).await {
            Ok((entries, online)) => {
                let welcome = protocol::render(&Welcome {
                    ty: "welcome",
                    id: hello_id.as_ref(),
                    user: &user,
                    heartbeat_s: node.cfg.server.heartbeat_s,
                    conversations: &entries,
                });
                metrics::connection_opened();
                tracing::debug!(conversations = entries.len(), "connected");
                if online && let Err(e) = node.announce_presence(&user.id, true).await {
                    tracing::debug!(error = %e, "presence announcement failed");
                }
                if write_direct(&mut socket, welcome, "welcome").await {
                    let (sink, stream) = socket.split();
                    let writer = tokio::spawn(writer(sink, rx, conn.clone(), node.cfg.server.heartbeat_s));
                    reader(&node, stream, &conn, &user, &mut strikes).await;
                    conn.closer.close(CLOSE_NORMAL);
                    let _ = writer.await;
                }
                metrics::connection_closed();
                teardown(&node, &conn, true).await;
            }
            Err(e) => {
                teardown(&node, &conn, false).await;
                let code = if e.code == ErrorCode::Internal { CLOSE_INTERNAL } else { CLOSE_TRY_LATER };
                write_direct(&mut socket, protocol::error(hello_id.as_ref(), &e), "error").await;
                close_direct(socket, code).await;
            }
        }
        tracing::debug!(code = conn.closer.code(), "closed");
    }
    .instrument(span)
    .await
}

/// Phase 2: subscriptions, presence and the welcome entries.
async fn setup(
    node: &Node,
    conn: &Arc<Conn>,
    user: &UserRef,
) -> Result<(Vec<protocol::ConversationEntry>, bool), ChatError> {
    for c in &node.cfg.chat.open_conversations {
        node.engine.join_open(c, &user.id).await?;
    }
    let ids = node.conversation_ids(&user.id).await?;
    let convs: Vec<Arc<str>> = ids
        .iter()
        .filter(|id| matches!(node.classify(id), Ok(Kind::Open | Kind::Group)))
        .map(|id| Arc::from(id.as_str()))
        .collect();
    node.hub.subscribe(conn, convs.iter().cloned());
    let mut topics = vec![Topic::User(conn.user.clone())];
    topics.extend(convs.into_iter().map(Topic::Conv));
    // Subscribed before the counters are read: nothing stored after the
    // welcome's `last_seq` can be missed.
    node.engine.subscribe(&topics).await?;
    let entries = node.entries(&user.id, &ids).await?;
    let online = node.engine.presence_up(&user.id).await?;
    Ok((entries, online))
}

/// Undoes `setup`. `counted`: whether `presence_up` counted this connection.
async fn teardown(node: &Node, conn: &Conn, counted: bool) {
    node.hub.unregister(conn);
    node.engine.topics_changed();
    if !counted {
        return;
    }
    match node.engine.presence_down(&conn.user).await {
        Ok(true) => {
            if let Err(e) = node.announce_presence(&conn.user, false).await {
                tracing::debug!(error = %e, "presence announcement failed");
            }
        }
        Ok(false) => {}
        Err(e) => tracing::debug!(error = %e, "presence update failed"),
    }
    if let Some(code) = conn.closer.code()
        && code != CLOSE_NORMAL
    {
        metrics::close(code);
    }
}

/// Phase 3, writing side.
async fn writer(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Utf8Bytes>,
    conn: Arc<Conn>,
    heartbeat_s: u64,
) {
    let period = Duration::from_secs(heartbeat_s);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let healthy = loop {
        tokio::select! {
            biased;
            _ = conn.closer.closed() => break true,
            frame = rx.recv() => {
                let Some(frame) = frame else { break true };
                let depth = rx.len();
                if depth > 0 {
                    metrics::queue_depth(depth);
                }
                let mut batch = 1;
                let mut ok = sink.feed(Message::Text(frame)).await.is_ok();
                while ok && batch < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(f) => {
                            ok = sink.feed(Message::Text(f)).await.is_ok();
                            batch += 1;
                        }
                        Err(_) => break,
                    }
                }
                if !ok {
                    break false;
                }
                // A peer that stops reading blocks the flush; the closer (or the
                // timeout) ends the wait instead of the queue growing. An
                // interrupted flush keeps its place, so the close frame can
                // still follow what was already written.
                tokio::select! {
                    r = timeout(WRITE_TIMEOUT, sink.flush()) => if !matches!(r, Ok(Ok(()))) { break false },
                    _ = conn.closer.closed() => break true,
                }
            }
            _ = ping.tick() => {
                if !matches!(timeout(WRITE_TIMEOUT, sink.send(Message::Ping(Default::default()))).await, Ok(Ok(()))) {
                    break false;
                }
            }
        }
    };
    if healthy && let Some(code) = conn.closer.code() {
        // Bounded: a peer that never reads again is dropped without the frame.
        let _ = timeout(WRITE_TIMEOUT, async {
            // Replies queued before the decision (the error that explains a
            // 4008, say) go out first; a slow consumer's backlog does not.
            if code != CLOSE_TRY_LATER {
                while let Ok(f) = rx.try_recv() {
                    sink.feed(Message::Text(f)).await?;
                }
            }
            sink.send(close_message(code)).await
        })
        .await;
    }
    let _ = timeout(Duration::from_secs(2), sink.close()).await;
}

/// Queues a reply to the client's own frame.
fn reply(conn: &Conn, ty: &str, frame: Utf8Bytes) {
    if conn.push(frame) {
        metrics::frames_out(ty, 1);
    }
}

/// Phase 3, reading side: returns when the connection is over.
async fn reader(
    node: &Node,
    mut stream: SplitStream<WebSocket>,
    conn: &Arc<Conn>,
    user: &UserRef,
    strikes: &mut Strikes,
) {
    let idle = Duration::from_secs(node.cfg.server.heartbeat_s * 2);
    let mut typing = HashMap::new();
    loop {
        let next = tokio::select! {
            biased;
            _ = conn.closer.closed() => return,
            r = timeout(idle, stream.next()) => r,
        };
        let msg = match next {
            Err(_) => {
                conn.closer.close(CLOSE_IDLE);
                return;
            }
            Ok(None) | Ok(Some(Ok(Message::Close(_)))) => return,
            Ok(Some(Err(e))) => {
                if is_too_big(e) {
                    conn.closer.close(CLOSE_TOO_BIG);
                }
                return;
            }
            Ok(Some(Ok(m))) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => {
                metrics::frame_in("binary");
                reply(
                    conn,
                    "error",
                    protocol::error_code(None, ErrorCode::BadRequest, "binary frames are not accepted"),
                );
                if strikes.bad_frame() {
                    conn.closer.close(CLOSE_POLICY);
                }
                continue;
            }
            // Pings are answered by the WebSocket layer; any frame counts as life.
            _ => continue,
        };
        let inbound = match protocol::parse(&text) {
            Ok(i) => i,
            Err(e) => {
                metrics::frame_in("invalid");
                let id = if e.replies { e.id.as_ref() } else { None };
                reply(conn, "error", protocol::error_code(id, ErrorCode::BadRequest, &e.message));
                if strikes.bad_frame() {
                    conn.closer.close(CLOSE_POLICY);
                }
                continue;
            }
        };
        metrics::frame_in(inbound.cmd.kind());
        // Each frame is its own trace, linked to the connection's span.
        let span = tracing::debug_span!(parent: None, "frame", frame_type = inbound.cmd.kind(), conn = conn.id, user = %user.id);
        span.follows_from(tracing::Span::current().id());
        let handled = handle(node, conn, user, &inbound, strikes, &mut typing).instrument(span).await;
        if let Err(e) = handled {
            let replies =
                !matches!(inbound.cmd, Command::Delivered { .. } | Command::Read { .. } | Command::Typing { .. });
            let id = if replies { inbound.id.as_ref() } else { None };
            reply(conn, "error", protocol::error(id, &e));
            let abuse = match e.code {
                ErrorCode::BadRequest | ErrorCode::TooLarge => strikes.bad_frame(),
                ErrorCode::RateLimited => strikes.rate > strikes.max,
                _ => false,
            };
            if abuse {
                conn.closer.close(CLOSE_POLICY);
            }
            if e.code == ErrorCode::Internal {
                tracing::error!(frame = inbound.cmd.kind(), "internal error answering a frame");
            }
        }
    }
}

/// Handles one authenticated frame; replies go to the connection's queue.
async fn handle(
    node: &Node,
    conn: &Conn,
    user: &UserRef,
    inbound: &Inbound,
    strikes: &mut Strikes,
    typing: &mut HashMap<String, tokio::time::Instant>,
) -> Result<(), ChatError> {
    let id = inbound.id.as_ref();
    match &inbound.cmd {
        Command::Hello { .. } => return Err(ChatError::bad_request("already authenticated")),
        Command::Send { conversation, client_msg_id, body } => {
            node.validate_message(client_msg_id, body)?;
            node.classify(conversation)?;
            if let Err(e) = node.check_send_rate(&conn.user) {
                strikes.rate += 1;
                return Err(e);
            }
            strikes.rate = 0;
            let a = node.store_message(user, conversation, client_msg_id.clone(), body.clone()).await?;
            let ack = Ack { ty: "ack", id, conversation, seq: a.seq, ts: a.ts_ms, duplicate: a.duplicate };
            reply(conn, "ack", protocol::render(&ack));
        }
        Command::Delivered { conversation, seq } => node.receipt(&user.id, conversation, *seq, false).await?,
        Command::Read { conversation, seq } => node.receipt(&user.id, conversation, *seq, true).await?,
        Command::Typing { conversation } => {
            // At most one typing event per conversation per second from a
            // connection: a typing flood must not fill everyone's queue.
            let now = tokio::time::Instant::now();
            let fresh = typing.get(conversation.as_str()).is_none_or(|t| now.duration_since(*t) >= TYPING_EVERY);
            if fresh {
                node.typing(user, conversation).await?;
                if typing.len() >= 64 {
                    typing.retain(|_, t| now.duration_since(*t) < TYPING_EVERY);
                }
                typing.insert(conversation.clone(), now);
            }
        }
        Command::History { conversation, before, limit } => {
            let f = node.history(&user.id, id, conversation, Page::Before(*before, *limit)).await?;
            reply(conn, "history", f);
        }
        Command::Sync { conversation, after, limit } => {
            let f = node.history(&user.id, id, conversation, Page::After(*after, *limit)).await?;
            reply(conn, "history", f);
        }
        Command::Presence { conversation } => {
            let f = node.presence(&user.id, id, conversation).await?;
            reply(conn, "presence", f);
        }
        Command::Ping => reply(conn, "pong", protocol::pong(id)),
    }
    Ok(())
}
