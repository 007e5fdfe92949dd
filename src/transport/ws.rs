//! `GET /ws/chat`: the checks before the upgrade, the upgrade itself, and the
//! hand-off to [`session::run`](crate::session::run).
//!
//! The upgrade is done here rather than through axum's `WebSocketUpgrade` so
//! the session owns the raw byte stream: after a close frame it can keep
//! reading raw bytes (RFC 6455 lingering close) even when the client broke
//! the framing.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;
use tungstenite::protocol::{Role, WebSocketConfig};

use super::{api_error, client_ip, listener::Counted};
use crate::{auth::Verified, error::ChatError, metrics, node::Node, session};

/// The token a client presented before the upgrade, and whether it came in a
/// cookie (which a browser attaches to cross-site requests too).
pub(super) fn upgrade_token<'a>(headers: &'a HeaderMap, cookie_name: &str) -> Option<(&'a str, bool)> {
    // A Bearer token wins; any other Authorization scheme (say, Basic auth of
    // a staging proxy) leaves the cookie to speak.
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    if let Some(b) = bearer {
        return Some((b, false));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == cookie_name)
        .map(|(_, v)| (v.trim_matches('"'), true))
}

/// The host (and port) part of an origin `scheme://host[:port]`.
fn origin_host(origin: &str) -> Option<&str> {
    origin.split_once("://").map(|(_, rest)| rest.trim_end_matches('/'))
}

/// Cross-site WebSocket hijacking guard. With `server.allowed_origins` set, a
/// browser `Origin` must be listed. With it empty, a cookie token (which a
/// browser sends cross-site) needs an `Origin` whose host is the request's
/// `Host`. A request without `Origin` is not a browser and passes.
pub(super) fn origin_allowed(allowed: &[String], headers: &HeaderMap, cookie: bool) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let Ok(origin) = origin.to_str() else { return false };
    if !allowed.is_empty() {
        return allowed.iter().any(|a| a.eq_ignore_ascii_case(origin));
    }
    if !cookie {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    matches!((origin_host(origin), host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// Whether the request asks for a WebSocket upgrade we can do; the key.
pub fn handshake_key(headers: &HeaderMap) -> Result<&HeaderValue, &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err("a WebSocket upgrade request is expected here (Connection: Upgrade, Upgrade: websocket)");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
        return Err("Sec-WebSocket-Version 13 is required");
    }
    headers.get(header::SEC_WEBSOCKET_KEY).ok_or("Sec-WebSocket-Key is required")
}

/// `GET /ws/chat`.
pub async fn upgrade(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let headers = req.headers();
    if node.is_draining() {
        metrics::upgrade_rejected("draining");
        return api_error(&ChatError::unavailable("node is draining; reconnect to another node"));
    }
    let key = match handshake_key(headers) {
        Ok(k) => k.clone(),
        Err(why) => {
            let mut r = api_error(&ChatError::bad_request(why));
            *r.status_mut() = StatusCode::UPGRADE_REQUIRED;
            r.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            return r;
        }
    };
    let token = upgrade_token(headers, &node.cfg.auth.cookie_name);
    if !origin_allowed(&node.cfg.server.allowed_origins, headers, token.is_some_and(|t| t.1)) {
        metrics::upgrade_rejected("origin");
        return api_error(&ChatError::forbidden("origin not allowed"));
    }
    let verified: Option<Verified> = match token {
        None => None,
        Some((token, _)) => match node.auth.verify_token(token) {
            Ok(v) => Some(v),
            Err(e) => {
                metrics::upgrade_rejected("token");
                return api_error(&ChatError::unauthorized(e.to_string()));
            }
        },
    };
    if let Some(v) = &verified
        && node.hub.user_connections(&v.user.id) >= node.cfg.limits.connections_per_user
    {
        metrics::upgrade_rejected("connections_per_user");
        let limit = node.cfg.limits.connections_per_user;
        return api_error(
            &ChatError::rate_limited(5000).with_message(format!("too many connections for this user (limit {limit})")),
        );
    }
    if let Some(v) = &verified
        && let Err(e) = node.check_connect_rate(&v.user.id).await
    {
        metrics::upgrade_rejected("connect_rate");
        return api_error(&e);
    }
    let Some(slot) = node.session_slot() else {
        metrics::upgrade_rejected("max_connections");
        return api_error(&ChatError::unavailable("this node is at limits.max_connections; retry later"));
    };
    let ip = client_ip(&node.cfg.server.trusted_proxies, peer.ip(), headers);
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return api_error(&ChatError::bad_request("this connection cannot be upgraded"));
    };
    // What the task keeps lives as long as the connection: the WebSocket
    // settings are made inside it, and the upgrade's leftover bytes are
    // copied out in a scope of their own (see `session::run` on the size).
    let tracked = {
        let node = node.clone();
        async move {
            let _slot = slot;
            let io = match on_upgrade.await {
                Ok(io) => io,
                Err(e) => {
                    tracing::debug!(error = %e, "websocket upgrade failed");
                    return;
                }
            };
            // Our own TCP stream back (so the session can reset it), with any
            // bytes the client sent right after the request.
            match io.downcast::<TokioIo<Counted>>() {
                Ok(parts) => {
                    // Copied and dropped here: `read_buf` is a view of hyper's
                    // whole request buffer, which would otherwise stay
                    // allocated for the life of the session.
                    let (io, early) = {
                        let hyper::upgrade::Parts { io, read_buf, .. } = parts;
                        (io.into_inner(), read_buf.to_vec())
                    };
                    let config = websocket_config(node.cfg.limits.max_frame_bytes);
                    let ws = WebSocketStream::from_partially_read(io, early, Role::Server, Some(config)).await;
                    session::run(node, session::WsWire::new(ws), verified.map(|v| (v, None))).await;
                }
                Err(io) => {
                    let config = websocket_config(node.cfg.limits.max_frame_bytes);
                    let ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, Some(config)).await;
                    session::run(node, session::WsWire::new(ws), verified.map(|v| (v, None))).await;
                }
            }
        }
    };
    node.sessions.spawn(tracked.instrument(tracing::info_span!("ws", %ip)));
    switching_protocols(&key)
}

/// The WebSocket layer's settings of a session: messages (and frames) up to
/// `max_frame_bytes`, a small read buffer and no write buffer (the session
/// writes through its own [`Writer`](crate::session)).
pub fn websocket_config(max_frame_bytes: usize) -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.max_frame_size = Some(max_frame_bytes);
    config.max_message_size = Some(max_frame_bytes);
    // Frames are small; the buffer grows for a large one. Keeps idle
    // connections cheap.
    config.read_buffer_size = 512;
    config.write_buffer_size = 0;
    config
}

/// The 101 answer to an upgrade request with this `Sec-WebSocket-Key`.
pub fn switching_protocols(key: &HeaderValue) -> Response {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static("websocket")),
            (header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).expect("base64 is a valid header")),
        ],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn cookie_tokens_need_a_same_host_or_listed_origin() {
        let none: Vec<String> = Vec::new();
        let evil = headers(&[("origin", "https://evil.example"), ("host", "chat.example.com")]);
        let same = headers(&[("origin", "https://chat.example.com"), ("host", "chat.example.com")]);
        let bare = headers(&[("host", "chat.example.com")]);
        assert!(!origin_allowed(&none, &evil, true), "cross-site cookie upgrade");
        assert!(origin_allowed(&none, &evil, false), "a header or hello token is not ambient");
        assert!(origin_allowed(&none, &same, true));
        assert!(origin_allowed(&none, &bare, true), "no Origin: not a browser");
        let listed = vec!["https://crm.example.com".to_string()];
        assert!(!origin_allowed(&listed, &same, true));
        let crm = headers(&[("origin", "https://crm.example.com"), ("host", "chat.example.com")]);
        assert!(origin_allowed(&listed, &crm, true));
    }

    #[test]
    fn bearer_wins_over_cookie() {
        let h = headers(&[("authorization", "Bearer abc"), ("cookie", "chat_token=def")]);
        assert_eq!(upgrade_token(&h, "chat_token"), Some(("abc", false)));
        let h = headers(&[("authorization", "Basic x"), ("cookie", "a=1; chat_token=\"def\"")]);
        assert_eq!(upgrade_token(&h, "chat_token"), Some(("def", true)));
    }
}
