//! `/healthz` (the process serves), `/readyz` (storage answers and the node is
//! not draining) and `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::{metrics, node::Node};

pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "draining"}))).into_response();
    }
    if !node.engine_ready().await {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "storage unavailable"}))).into_response();
    }
    Json(json!({"status": "ready", "engine": node.engine_name(), "node": node.node_id})).into_response()
}

pub async fn metrics() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics::render()).into_response()
}
