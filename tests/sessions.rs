//! PROTOCOL v1.1 *Sessions end when their token ends*, the two listeners and
//! the settings a Kubernetes pod gets, against real server processes.

mod common;

use std::time::Duration;

use common::{API_KEY, Client, Ended, JWT_SECRET, Server};
use reqwest::Method;
use serde_json::json;

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A token signed with the test secret.
fn token(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

async fn status(url: &str, headers: &[(&str, String)]) -> u16 {
    let mut req = common::http_client().get(url);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_tokens_need_an_allowed_origin() {
    let s = Server::start(&[]).await;
    let cookie = ("cookie", format!("chat_token={}", s.token("alice").await));
    let host = s.addr.to_string();
    let upgrade = |origin: Option<&str>| {
        let mut h = vec![cookie.clone()];
        if let Some(o) = origin {
            h.push(("origin", o.to_string()));
        }
        h
    };
    // Cross-site WebSocket hijacking: another site's page, the user's cookie.
    let evil = Client::connect(&s.ws_url(), Some(upgrade(Some("https://evil.example")))).await;
    match evil {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("cross-site cookie upgrade must get 403, got {:?}", other.map(|c| c.welcome)),
    }
    // The page's own origin, and a non-browser client without Origin, pass.
    for origin in [Some(format!("http://{host}")), None] {
        let mut c = Client::connect(&s.ws_url(), Some(upgrade(origin.as_deref()))).await.expect("same-site upgrade");
        assert_eq!(c.next().await["type"], "welcome");
    }
    // A token in a header is not ambient: any origin may use it.
    let bearer =
        vec![("authorization", format!("Bearer {}", s.token("bob").await)), ("origin", "https://x.example".into())];
    let mut c = Client::connect(&s.ws_url(), Some(bearer)).await.expect("bearer upgrade");
    assert_eq!(c.next().await["type"], "welcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_nbf_max_ttl_expiry_and_refresh() {
    let s = Server::start(&[]).await;
    let hello = |t: String| json!({"type":"hello","id":1,"token":t});
    let refused = |claims: serde_json::Value| {
        let url = s.ws_url();
        async move {
            let mut c = Client::connect(&url, None).await.unwrap();
            c.send(hello(token(claims))).await;
            let (frames, end) = c.until_closed(Duration::from_secs(5)).await;
            assert_eq!(frames[0]["code"], "unauthorized", "{frames:?}");
            assert_eq!(end, Ended::Close(4001));
            frames[0]["message"].as_str().unwrap().to_string()
        }
    };
    let why = refused(json!({"sub":"alice","exp":now() + 600,"nbf":now() + 300})).await;
    assert!(why.contains("nbf"), "{why}");
    let why = refused(json!({"sub":"alice","exp":now() + 86_400 * 7})).await;
    assert!(why.contains("max_token_ttl_s"), "{why}");
    // A session whose token expires is closed 4001, unless refreshed first.
    let mut short = Client::connect(&s.ws_url(), None).await.unwrap();
    short.send(hello(token(json!({"sub":"alice","exp":now() + 2})))).await;
    assert_eq!(short.next().await["type"], "welcome");
    let mut refreshed = Client::connect(&s.ws_url(), None).await.unwrap();
    refreshed.send(hello(token(json!({"sub":"alice","exp":now() + 2})))).await;
    let w = refreshed.next().await;
    assert!(w["exp"].as_u64().unwrap() >= now());
    assert!(w["max_body_chars"].as_u64().is_some());
    let later = now() + 600;
    let r = refreshed.request(json!({"type":"refresh","token":token(json!({"sub":"alice","exp":later}))})).await;
    assert_eq!((r["type"].as_str(), r["exp"].as_u64()), (Some("refreshed"), Some(later)));
    let (frames, end) = short.until_closed(Duration::from_secs(6)).await;
    assert_eq!(end, Ended::Close(4001));
    assert_eq!(frames.last().unwrap()["message"], "token expired");
    // The refreshed one lives on.
    let pong = refreshed.request(json!({"type":"ping"})).await;
    assert_eq!(pong["type"], "pong");
    // A refresh for another user ends the session.
    refreshed.send(json!({"type":"refresh","id":9,"token":token(json!({"sub":"mallory","exp":later}))})).await;
    let (frames, end) = refreshed.until_closed(Duration::from_secs(5)).await;
    assert_eq!((frames[0]["code"].as_str(), end), (Some("unauthorized"), Ended::Close(4001)));
}

/// `POST /api/v1/users/{id}/disconnect` closes the user's connections on every
/// node with 4001 and counts them across the cluster.
async fn disconnect_everywhere(chat: common::Chat) {
    let mut a1 = chat.client("alice").await;
    let mut a2 = chat.client("alice").await;
    let mut b = chat.client("bob").await;
    a1.barrier().await;
    a2.barrier().await;
    let (st, v) = chat.api(Method::POST, "/api/v1/users/alice/disconnect", None).await;
    assert_eq!((st, v["closed"].as_u64()), (200, Some(2)), "{v}");
    for c in [&mut a1, &mut a2] {
        let (frames, end) = c.until_closed(Duration::from_secs(5)).await;
        assert_eq!(end, Ended::Close(4001));
        assert!(frames.iter().any(|f| f["code"] == "unauthorized"), "{frames:?}");
    }
    assert_eq!(b.request(json!({"type":"ping"})).await["type"], "pong", "others stay");
    // Once the closes are through, there is nothing left to close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (st, v) = chat.api(Method::POST, "/api/v1/users/alice/disconnect", None).await;
        assert_eq!(st, 200);
        if v["closed"] == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still counted: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, _) = chat.api(Method::POST, "/api/v1/users/bad%20id/disconnect", None).await;
    assert_eq!(st, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_on_the_embedded_engine() {
    disconnect_everywhere(common::Engine::Memory.start(&[]).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_across_two_valkey_nodes() {
    disconnect_everywhere(common::Engine::Valkey { nodes: 2 }.start(&[]).await).await;
}

/// With `server.internal_listen`, the public port carries the chat only; the
/// service API, metrics and health are on the internal one. A release named
/// `chat` gets Kubernetes service-link variables that name no setting: they are
/// ignored with a warning, not fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_listener_and_kubernetes_service_links() {
    let s = Server::start(&[
        ("CHAT_SERVER__INTERNAL_LISTEN", "127.0.0.1:0"),
        ("CHAT_CRM_CHAT_PORT", "tcp://10.96.0.10:8000"),
        ("CHAT_CRM_CHAT_PORT_8000_TCP", "tcp://10.96.0.10:8000"),
        ("CHAT_CRM_CHAT_PORT_8000_TCP_ADDR", "10.96.0.10"),
        ("CHAT_CRM_CHAT_PORT_8000_TCP_PORT", "8000"),
        ("CHAT_CRM_CHAT_PORT_8000_TCP_PROTO", "tcp"),
        ("CHAT_CRM_CHAT_SERVICE_HOST", "10.96.0.10"),
        ("CHAT_CRM_CHAT_SERVICE_PORT", "8000"),
        ("CHAT_CRM_CHAT_SERVICE_PORT_HTTP", "8000"),
    ])
    .await;
    let internal = s.internal.expect("an internal listener");
    assert_ne!(internal, s.addr);
    let key = vec![("authorization", format!("Bearer {API_KEY}"))];
    for path in ["/healthz", "/readyz", "/metrics", "/api/v1/users/alice/conversations"] {
        assert_eq!(status(&s.url(path), &key).await, 404, "{path} is not public");
        assert_eq!(status(&s.internal_url(path), &key).await, 200, "{path} is internal");
    }
    assert_eq!(status(&s.url("/"), &[]).await, 200);
    assert_eq!(status(&s.internal_url("/"), &[]).await, 404);
    let mut c = s.client("alice").await;
    assert_eq!(c.request(json!({"type":"ping"})).await["type"], "pong");
    assert!(s.logs().contains("CHAT_CRM_CHAT_PORT"), "one warning names them:\n{}", s.logs());
}
