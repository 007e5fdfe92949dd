//! The browser client and demo page, compiled into the binary from `static/`.
//!
//! Every asset carries a strong ETag (its SHA-256) and `Cache-Control:
//! no-cache`, so browsers revalidate cheaply and never run a stale `chat.js`.
//! HTML gets a Content-Security-Policy that allows only the page's own scripts
//! and styles and WebSocket connections to its own host.

use axum::{
    extract::Path,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use rust_embed::RustEmbed;

use super::api_error;
use crate::error::ChatError;

#[derive(RustEmbed)]
#[folder = "static/"]
struct Assets;

/// A Host header value safe to echo into a CSP (host, optional port).
fn safe_host(headers: &HeaderMap) -> Option<&str> {
    let h = headers.get(header::HOST)?.to_str().ok()?;
    let ok = !h.is_empty()
        && h.len() <= 255
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    ok.then_some(h)
}

pub fn csp(headers: &HeaderMap) -> String {
    let connect = match safe_host(headers) {
        Some(h) => format!("'self' ws://{h} wss://{h}"),
        None => "'self'".into(),
    };
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src {connect}; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    )
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(file) = Assets::get(path) else {
        return api_error(&ChatError::not_found("no such asset"));
    };
    let hash = file.metadata.sha256_hash();
    let etag = format!("\"{}\"", hash.iter().take(16).map(|b| format!("{b:02x}")).collect::<String>());
    let mime = file.metadata.mimetype();
    let mut out = HeaderMap::new();
    out.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex etag"));
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    out.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    out.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    let content_type = match mime {
        m if m.starts_with("text/") || m.ends_with("javascript") => format!("{m}; charset=utf-8"),
        m => m.to_string(),
    };
    out.insert(header::CONTENT_TYPE, HeaderValue::from_str(&content_type).expect("mime is a header value"));
    if mime == "text/html" {
        out.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_str(&csp(headers)).expect("sanitised host"));
        out.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if fresh {
        return (StatusCode::NOT_MODIFIED, out).into_response();
    }
    (out, file.data.into_owned()).into_response()
}

pub async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

pub async fn file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}
