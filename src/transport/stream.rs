//! HTTP streaming (PROTOCOL v1.2, "the same chat over plain HTTP"):
//! `POST /stream/chat` (or `GET` with the cookie) opens a session whose
//! server frames are Server-Sent Events; `POST /stream/chat/<session>` sends
//! client frames to it, on whichever node holds it.
//!
//! The checks before the stream are the upgrade's (token, cookie Origin rule,
//! per-user cap, `limits.max_connections`, drain); the session is
//! [`session::run`], the WebSocket's, over an [`SseWire`].

use std::sync::Arc;

use axum::{
    body::{Body, to_bytes},
    extract::{Path, Request, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures_util::FutureExt;
use serde_json::value::RawValue;
use tracing::Instrument;

use super::{
    api_error,
    listener::{Abort, PlainSlot},
    ws::{origin_allowed, upgrade_token},
};
use crate::{
    auth::Verified,
    error::ChatError,
    hub::streams::Offer,
    metrics,
    node::Node,
    protocol::{self, Command, Inbound, Text},
    session::{self, sse::SseWire},
};

/// Frames one `POST /stream/chat/<session>` may carry.
pub const MAX_POST_FRAMES: usize = 100;

/// Bytes of client frames a session holds queued, and so the largest POST
/// body: 16 frames of the largest size (1 MiB by default).
pub fn inbox_bytes(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_mul(16)
}

fn unauthorized(message: impl Into<String>) -> Response {
    metrics::upgrade_rejected("token");
    api_error(&ChatError::unauthorized(message))
}

/// `POST /stream/chat`: a `hello` body, or an empty body and the token as
/// `Authorization: Bearer` or the cookie.
pub async fn open_post(State(node): State<Arc<Node>>, req: Request) -> Response {
    open(node, req, true).await
}

/// `GET /stream/chat`: the cookie (for `EventSource`), or a Bearer token.
pub async fn open_get(State(node): State<Arc<Node>>, req: Request) -> Response {
    open(node, req, false).await
}

async fn open(node: Arc<Node>, req: Request, with_body: bool) -> Response {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    if node.is_draining() {
        metrics::upgrade_rejected("draining");
        return api_error(&ChatError::unavailable("node is draining; reconnect to another node"));
    }
    let mut hello: Option<(Option<serde_json::Value>, String)> = None;
    if with_body {
        let Ok(bytes) = to_bytes(body, node.cfg.limits.max_frame_bytes).await else {
            return api_error(&ChatError::too_large("a hello body is one frame of at most limits.max_frame_bytes"));
        };
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            let parsed = std::str::from_utf8(&bytes).ok().and_then(|t| protocol::parse(t).ok());
            match parsed {
                Some(Inbound { id, cmd: Command::Hello { token } }) => hello = Some((id, token)),
                _ => return unauthorized("the body opens a session: a hello frame, or empty with a token"),
            }
        }
    }
    let (token, cookie, hello_id) = match &hello {
        Some((id, token)) => (token.as_str(), false, id.clone()),
        None => match upgrade_token(headers, &node.cfg.auth.cookie_name) {
            Some((t, cookie)) => (t, cookie, None),
            None => return unauthorized("no token: send a hello body, Authorization: Bearer, or the cookie"),
        },
    };
    if !origin_allowed(&node.cfg.server.allowed_origins, headers, cookie) {
        metrics::upgrade_rejected("origin");
        return api_error(&ChatError::forbidden("origin not allowed"));
    }
    let verified: Verified = match node.auth.verify_token(token) {
        Ok(v) => v,
        Err(e) => return unauthorized(e.to_string()),
    };
    let limits = &node.cfg.limits;
    if node.hub.user_connections(&verified.user.id) >= limits.connections_per_user {
        metrics::upgrade_rejected("connections_per_user");
        let limit = limits.connections_per_user;
        return api_error(
            &ChatError::rate_limited(5000).with_message(format!("too many connections for this user (limit {limit})")),
        );
    }
    // The same per-user connect rate as a WebSocket upgrade (the session
    // checks it only for a token that arrives in `hello`).
    if let Err(e) = node.check_connect_rate(&verified.user.id).await {
        metrics::upgrade_rejected("connect_rate");
        return api_error(&e);
    }
    let Some(slot) = node.session_slot() else {
        metrics::upgrade_rejected("max_connections");
        return api_error(&ChatError::unavailable("this node is at limits.max_connections; retry later"));
    };
    // A stream counts among the connections, like a WebSocket: it leaves the
    // plain HTTP pool, so newer plain requests cannot push it out.
    if let Some(plain) = parts.extensions.get::<PlainSlot>() {
        plain.leave();
    }
    let abort = parts.extensions.get::<Abort>().map(|a| a.0.clone());
    let (wire, body) = SseWire::open(node.hub.clone(), &node.node_id, inbox_bytes(limits.max_frame_bytes), abort);
    // The session's future itself, with the slot freed when it ends: an
    // `async move` block around the call would keep the token, the `hello`
    // id and the wire a second time for the stream's life (memory per
    // connection, as in `session::run`).
    let task = session::run(node.clone(), wire, Some((verified, hello_id))).map(move |()| drop(slot));
    node.sessions.spawn(task.instrument(tracing::info_span!("stream")));
    let body = Body::from_stream(body);
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// The client frames of a POST body: one frame, or a JSON array of up to
/// [`MAX_POST_FRAMES`]. Each is handed to the session as its text, so junk
/// gets the session's answer (`bad_request`, strikes) as on a WebSocket.
fn frames(body: &str, max_frame: usize) -> Result<Vec<Text>, ChatError> {
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return Err(ChatError::bad_request("the body is one client frame or a JSON array of frames"));
    }
    if trimmed.starts_with('[')
        && let Ok(list) = serde_json::from_str::<Vec<&RawValue>>(trimmed)
    {
        if list.is_empty() {
            return Err(ChatError::bad_request("an empty array of frames"));
        }
        if list.len() > MAX_POST_FRAMES {
            return Err(ChatError::too_large(format!("at most {MAX_POST_FRAMES} frames per POST")));
        }
        if list.iter().any(|f| f.get().len() > max_frame) {
            return Err(ChatError::too_large(format!("a frame is over limits.max_frame_bytes ({max_frame})")));
        }
        return Ok(list.iter().map(|f| Text::from(f.get().to_string())).collect());
    }
    if body.len() > max_frame {
        return Err(ChatError::too_large(format!("a frame is over limits.max_frame_bytes ({max_frame})")));
    }
    Ok(vec![Text::from(body.to_string())])
}

/// `POST /stream/chat/<session>`: 202 once the frames are queued to the
/// session (on the node that holds it), 404 unknown or closed session, 413
/// over the size bounds, 429 while its inbox is full.
pub async fn send(State(node): State<Arc<Node>>, Path(id): Path<String>, body: Body) -> Response {
    let route = match node.stream_route(&id) {
        // Refused before the body is read: nothing is allocated for it.
        None => {
            metrics::stream_post(404, "local");
            return api_error(&ChatError::not_found("no such session: open a new stream"));
        }
        Some(true) => "local",
        Some(false) => "forwarded",
    };
    let limits = &node.cfg.limits;
    let answer = async {
        let bytes = to_bytes(body, inbox_bytes(limits.max_frame_bytes))
            .await
            .map_err(|_| ChatError::too_large("the body is over 16 x limits.max_frame_bytes"))?;
        let text = std::str::from_utf8(&bytes).map_err(|_| ChatError::bad_request("frames are UTF-8 text"))?;
        let frames = frames(text, limits.max_frame_bytes)?;
        let n = frames.len();
        match node.offer_stream(&id, frames).await? {
            Offer::Accepted => Ok(n),
            Offer::Unknown => Err(ChatError::not_found("no such session: open a new stream")),
            Offer::Full(ms) => Err(ChatError::rate_limited(ms).with_message("the session's inbox is full; retry")),
        }
    }
    .await;
    match answer {
        Ok(n) => {
            metrics::stream_post(202, route);
            (StatusCode::ACCEPTED, axum::Json(serde_json::json!({"accepted": n}))).into_response()
        }
        Err(e) => {
            metrics::stream_post(e.code.http_status(), route);
            api_error(&e)
        }
    }
}
