//! HTTP and WebSocket transport: the router and what its handlers share.
//!
//! The transport knows nothing about storage: handlers call [`Node`], which
//! calls the engine.

pub mod api;
pub mod assets;
pub mod health;
pub mod listener;
pub mod stream;
pub mod ws;

use std::{net::IpAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::DefaultBodyLimit,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode},
    middleware::from_fn_with_state,
    response::{IntoResponse, Response},
    routing::{delete, get, patch, post, put},
};
use ipnet::IpNet;
use serde_json::json;
use tower_http::{
    set_header::SetResponseHeaderLayer,
    timeout::TimeoutLayer,
    trace::{DefaultOnFailure, TraceLayer},
};

use crate::{error::ChatError, node::Node};

/// The routes of the public listener: the WebSocket, the demo page and its
/// files, and dev tokens (a 404 unless `auth.dev_tokens`).
fn public_routes(node: &Arc<Node>) -> Router<Arc<Node>> {
    Router::new()
        .route("/ws/chat", get(ws::upgrade))
        .route("/stream/chat", post(stream::open_post).get(stream::open_get))
        .route("/stream/chat/{session}", post(stream::send))
        .route("/api/v1/dev/token", post(api::dev_token))
        .route("/", get(assets::index))
        .route("/static/{*path}", get(assets::file))
        .layer(body_timeout(node))
}

/// A request (its body included) must be read and answered within
/// `server.body_timeout_s`: a body still trickling in then gets 408 and the
/// connection is closed (its body was not read to the end). The service API
/// has its own, longer bound ([`API_TIMEOUT`]).
fn body_timeout(node: &Node) -> TimeoutLayer {
    TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(node.cfg.server.body_timeout_s))
}

/// The routes of the internal listener: the service API, health and metrics.
fn internal_routes(node: &Arc<Node>) -> Router<Arc<Node>> {
    let service = Router::new()
        .route(
            "/conversations/{id}",
            put(api::put_conversation).get(api::get_conversation).delete(api::delete_conversation),
        )
        .route("/conversations/{id}/members", post(api::post_members))
        .route("/conversations/{id}/messages", post(api::post_message).get(api::get_messages))
        .route("/conversations/{id}/messages/{seq}", patch(api::patch_message).delete(api::delete_message))
        .route("/users/{id}/conversations", get(api::get_user_conversations))
        .route("/users/{id}/messages", delete(api::delete_user_messages))
        .route("/users/{id}/disconnect", post(api::post_disconnect))
        .route_layer(from_fn_with_state(node.clone(), api::require_api_key))
        // A slow request body cannot hold a handler forever.
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, API_TIMEOUT));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .layer(body_timeout(node))
        .nest("/api/v1", service)
}

/// How long one service API request may take, body included.
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP surface of a node: `(public, internal)`. With
/// `server.internal_listen` unset, every route is on the public router and
/// there is no internal one.
pub fn routers(node: Arc<Node>) -> (Router, Option<Router>) {
    let split = node.cfg.server.internal_listen.is_some();
    if split {
        let public = finish(public_routes(&node), &node, Side::Public);
        let internal = finish(internal_routes(&node), &node, Side::Internal);
        (public, Some(internal))
    } else {
        (finish(public_routes(&node).merge(internal_routes(&node)), &node, Side::Public), None)
    }
}

/// Every route on one router (tests, single-port setups).
pub fn router(node: Arc<Node>) -> Router {
    finish(public_routes(&node).merge(internal_routes(&node)), &node, Side::Public)
}

/// Which listener a router serves: it decides what `x-chat-node` says.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Reachable by anyone (a single-port setup is public too).
    Public,
    /// `server.internal_listen`: operators and the CRM backend.
    Internal,
}

/// The `x-chat-node` of the public listener: an opaque tag of the node,
/// `n-` and 16 hex digits of HMAC-SHA256(`auth.jwt_secret`, node id). Stable
/// per node (a client or load-balancer log can still tell nodes apart) but
/// reveals nothing of the host name, and cannot be confirmed against guessed
/// host names without the secret. The internal listener says the node id.
pub fn public_node_tag(node_id: &str, jwt_secret: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(jwt_secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"x-chat-node\n");
    mac.update(node_id.as_bytes());
    let tag = mac.finalize().into_bytes();
    format!("n-{}", tag[..8].iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn finish(routes: Router<Arc<Node>>, node: &Arc<Node>, side: Side) -> Router {
    let name = match side {
        Side::Public => public_node_tag(&node.node_id, node.cfg.jwt_secret()),
        Side::Internal => node.node_id.clone(),
    };
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(node.cfg.limits.api_body_bytes))
        // 5xx are expected while draining (503) and logged where they arise;
        // the request log stays at debug.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)))
        // Which node answered (upgrade responses included): for operators
        // behind a load balancer, and for tests that must cross nodes. The
        // public listener says an opaque tag, not the host name.
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("x-chat-node"),
            HeaderValue::from_str(&name).unwrap_or_else(|_| HeaderValue::from_static("invalid-node-id")),
        ))
        .with_state(node.clone())
}

/// `{"error":{"code","message"}}` with the status of the code.
pub fn api_error(e: &ChatError) -> Response {
    let status = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = json!({"error": {"code": e.code, "message": e.message}});
    if let Some(ms) = e.retry_after_ms {
        body["error"]["retry_after_ms"] = json!(ms);
    }
    let mut resp = (status, Json(body)).into_response();
    if let Some(ms) = e.retry_after_ms {
        let secs = ms.div_ceil(1000).max(1);
        resp.headers_mut().insert("retry-after", secs.into());
    }
    resp
}

impl IntoResponse for ChatError {
    fn into_response(self) -> Response {
        api_error(&self)
    }
}

async fn not_found() -> Response {
    api_error(&ChatError::not_found("no such route"))
}

async fn method_not_allowed() -> Response {
    let mut r = api_error(&ChatError::bad_request("method not allowed on this route"));
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r
}

/// The client's address: the peer, or — when the peer is a trusted proxy —
/// the right-most address in `X-Forwarded-For` that is not a trusted proxy.
pub fn client_ip(trusted: &[IpNet], peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    hops.into_iter().rev().find(|ip| !is_trusted(ip)).unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4, 5.6.7.8, 10.0.0.3".parse().unwrap());
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let stranger: IpAddr = "9.9.9.9".parse().unwrap();
        assert_eq!(client_ip(&trusted, proxy, &h), "5.6.7.8".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(&trusted, stranger, &h), stranger);
        assert_eq!(client_ip(&[], proxy, &h), proxy);
    }
}
