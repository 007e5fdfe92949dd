//! Issue 22, findings 4, 5, 7 and 9 (the attack suite's second pass, kept
//! apart from `abuse.rs` so parallel work merges cleanly): real `crm-chat`
//! processes, real sockets, loopback only, each test bounded in time.
//!
//! - 4: the durable store's directory is 0700 and its files 0600 whatever
//!   the umask; an existing directory open to others gets a warning.
//! - 5: a slow request body is ended on every listener, and slow plain HTTP
//!   connections never crowd out a WebSocket upgrade.
//! - 7: a per-user connect rate (`limits.connects_per_s`), on every engine
//!   (across nodes on Valkey); `connect_churn_cost` (ignored) measures a
//!   bystander while one user in 300 groups churns connects.
//! - 9: the public `x-chat-node` is opaque; a JWT with `crit` is refused.

mod common;

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    time::{Duration, Instant},
};

use common::{
    Engine, JWT_SECRET, TIMEOUT, TempDir,
    extra::{End, Raw, launch_up, sign_token},
};
use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[path = "hardening/churn.rs"]
mod churn;

// ---------------------------------------------------------------------------
// Helpers

/// An HTTP response read off a raw socket: status, head, body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Sends `request` on a fresh connection and reads one response (head, and
/// the body by `Content-Length`).
async fn exchange(addr: SocketAddr, request: &str) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                return Answer { status, head, body };
            }
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk)).await.expect("an answer").unwrap();
        assert!(n > 0, "EOF before a whole answer: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A WebSocket upgrade request with `Authorization: Bearer <token>`.
fn upgrade_request(addr: SocketAddr, token: &str) -> String {
    format!(
        "GET /ws/chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    )
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Connects with a token at upgrade and reads `welcome`; `Err` with the
/// refusal otherwise.
async fn connect_welcome(addr: SocketAddr, token: &str) -> Result<Raw, String> {
    let mut r = Raw::connect(addr, Some(token), None).await.map_err(|e| format!("{e:?}"))?;
    let w = r.next_json(TIMEOUT).await.map_err(|e| format!("{e:?}"))?;
    assert_eq!(w["type"], "welcome", "{w}");
    Ok(r)
}

/// Authenticates with `hello` after the upgrade: the frames until the
/// connection ends (or `welcome`), and how it ended.
async fn hello(addr: SocketAddr, token: &str) -> (Vec<Value>, Option<End>) {
    let mut r = Raw::open(addr, None).await;
    r.send_json(&json!({"type":"hello","id":"h","token":token})).await.unwrap();
    let mut seen = Vec::new();
    loop {
        match r.next_json(TIMEOUT).await {
            Ok(v) if v["type"] == "welcome" => {
                seen.push(v);
                return (seen, None);
            }
            Ok(v) => seen.push(v),
            Err(e) => return (seen, Some(e)),
        }
    }
}

// ---------------------------------------------------------------------------
// Finding 4: the durable store is private.

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_store_is_private_whatever_the_umask() {
    let base = TempDir::new("private-store");
    let dir = base.path().join("new").join("data");
    let dir_s = dir.display().to_string();
    // umask 000: whatever the engine leaves to the umask ends world-readable.
    let prefix = ["sh", "-c", "umask 000 && exec \"$@\"", "sh"];
    let env = [("CHAT_CHAT__DATA_DIR", dir_s.as_str())];
    let node = launch_up(&env, &prefix, false).await;
    let mut a = node.server.client("alice").await;
    assert_eq!(a.say("general", "on disk").await["type"], "ack");
    assert_eq!(mode(&dir), 0o700, "a data directory the engine creates is 0700 (umask 000)");
    let mut names = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        names.push(p.file_name().unwrap().to_string_lossy().to_string());
        assert_eq!(mode(&p), 0o600, "{} must be 0600 (umask 000)", p.display());
    }
    names.sort();
    for want in ["LOCK", "chat.db", "chat.db-wal"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    drop(a);
    drop(node);

    // An existing directory open to others is kept as it is, with a warning
    // that names the fix; the files in it are still 0600.
    let open = TempDir::new("open-store");
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let node = launch_up(&[("CHAT_CHAT__DATA_DIR", open.path_str())], &[], false).await;
    let mut a = node.server.client("alice").await;
    assert_eq!(a.say("general", "on disk").await["type"], "ack");
    let logs = node.server.logs();
    let fix = format!("chmod 700 {}", open.path_str());
    assert!(logs.contains(&fix), "the start warns and names the fix ({fix}); logs:\n{logs}");
    assert_eq!(mode(&open.path().join("chat.db")), 0o600);
}

// ---------------------------------------------------------------------------
// Finding 5: slow bodies end, and never crowd out upgrades.

/// Sends `head` (announcing a body), then one body byte a second until the
/// server closes; how long after `opened` that was (None: still open at `cap`).
async fn trickle_body(addr: SocketAddr, head: String, cap: Duration) -> Option<Duration> {
    let opened = Instant::now();
    let Ok(mut s) = TcpStream::connect(addr).await else { return Some(Duration::ZERO) };
    if s.write_all(head.as_bytes()).await.is_err() {
        return Some(opened.elapsed());
    }
    let (mut rd, mut wr) = s.split();
    let mut b = [0u8; 1024];
    loop {
        tokio::select! {
            r = tokio::time::timeout_at((opened + cap).into(), rd.read(&mut b)) => match r {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(opened.elapsed()),
                Ok(Ok(_)) => {} // a 408: the close follows
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if wr.write_all(b"x").await.is_err() {
                    return Some(opened.elapsed());
                }
            }
        }
    }
}

fn post_head(path: &str, extra: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n{extra}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_end_and_never_crowd_out_upgrades() {
    let node = launch_up(
        &[
            ("CHAT_LIMITS__MAX_CONNECTIONS", "20"),
            ("CHAT_SERVER__BODY_TIMEOUT_S", "2"),
            ("CHAT_SERVER__INTERNAL_LISTEN", "127.0.0.1:0"),
        ],
        &[],
        true,
    )
    .await;
    let (public, internal) = (node.server.addr, node.internal.unwrap());
    let cap = Duration::from_secs(12);
    // Every route family, on both listeners: a body the handler reads (dev
    // token), one it never reads (an unknown route, health), and the service API.
    let probes = [
        ("public POST /api/v1/dev/token", public, post_head("/api/v1/dev/token", "")),
        ("public POST /nowhere", public, post_head("/nowhere", "")),
        ("public GET / with a body", public, post_head("/", "").replacen("POST", "GET", 1)),
        ("internal GET /healthz with a body", internal, post_head("/healthz", "").replacen("POST", "GET", 1)),
    ];
    let probes: Vec<_> = probes
        .into_iter()
        .map(|(what, addr, head)| (what, tokio::spawn(async move { trickle_body(addr, head, cap).await })))
        .collect();
    // 1,100 slow dev-token bodies: more than limits.max_http_connections
    // (1024) and than the old TCP cap (max_connections + 1024).
    let mut flood = Vec::new();
    for _ in 0..1100 {
        let head = post_head("/api/v1/dev/token", "");
        flood.push(tokio::spawn(async move { trickle_body(public, head, cap).await }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let t = Instant::now();
    let real = connect_welcome(public, &sign_token("real")).await;
    let took = t.elapsed();
    let flood: Vec<Option<Duration>> = join_all(flood).await.into_iter().map(|r| r.unwrap()).collect();
    let still_open = flood.iter().filter(|l| l.is_none()).count();
    let slowest = flood.iter().flatten().max().copied().unwrap_or_default();
    eprintln!("slow bodies: real connect {took:?} ({}), slowest flood close {slowest:?}", real.is_ok());
    assert!(real.is_ok(), "a real WebSocket connect must pass 1,100 slow bodies: {:?}", real.err());
    assert_eq!(still_open, 0, "slow dev-token bodies still open after {cap:?}");
    let bound = Duration::from_secs(2 + 3);
    assert!(slowest <= bound, "a slow body must be ended within body_timeout_s=2 (+3 s); the last took {slowest:?}");
    for (what, p) in probes {
        let l = p.await.unwrap();
        assert!(l.is_some_and(|l| l <= bound), "{what}: a trickling body must be ended within {bound:?}; took {l:?}");
    }
}

// ---------------------------------------------------------------------------
// Finding 7: the connect rate, on every engine.

async fn connects_are_rate_limited_per_user(engine: Engine) {
    let chat = engine.start(&[("CHAT_LIMITS__CONNECTS_PER_S", "0.5"), ("CHAT_LIMITS__CONNECTS_BURST", "4")]).await;
    let addr = |i: usize| chat.nodes[i % chat.nodes.len()].addr;
    let token = sign_token("churner");
    // The burst, spread over the nodes: every connect passes.
    for i in 0..4 {
        let r = connect_welcome(addr(i), &token).await;
        assert!(r.is_ok(), "connect {i} of the burst (4) refused: {:?}", r.err());
    }
    // The next one, on either node: 429 at the upgrade, the protocol's error
    // body and a retry hint.
    for i in 0..2 {
        let a = exchange(addr(i), &upgrade_request(addr(i), &token)).await;
        assert_eq!(a.status, 429, "connect past the burst on node {i}: {}\n{}", a.head, a.body);
        let body: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        let ms = body["error"]["retry_after_ms"].as_u64().unwrap_or(0);
        assert!((1..=2000).contains(&ms), "retry_after_ms within one refill (2 s): {body}");
        assert!(header(&a.head, "retry-after").is_some(), "Retry-After: {}", a.head);
    }
    // With the token in `hello`: the error frame, then close 4008.
    let (frames, end) = hello(addr(1), &token).await;
    assert_eq!(end, Some(End::Close(Some(4008))), "{frames:?}");
    assert_eq!(frames.first().map(|f| f["code"].clone()), Some(json!("rate_limited")), "{frames:?}");
    assert!(frames[0]["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{frames:?}");
    // Other users are not affected.
    assert!(connect_welcome(addr(0), &sign_token("bystander")).await.is_ok());
    // A token is back after the refill (0.5/s).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = connect_welcome(addr(1), &token).await;
    assert!(r.is_ok(), "after the refill the user connects again: {:?}", r.err());
}

engine_suite!(connects_are_rate_limited_per_user);

// ---------------------------------------------------------------------------
// Finding 9: small things.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_node_header_is_opaque_and_the_internal_one_names_the_node() {
    let id = "db-host-7.corp.internal";
    let node =
        launch_up(&[("CHAT_SERVER__NODE_ID", id), ("CHAT_SERVER__INTERNAL_LISTEN", "127.0.0.1:0")], &[], true).await;
    let tag = crm_chat::transport::public_node_tag(id, JWT_SECRET);
    let public = node.server.http.get(node.server.url("/")).send().await.unwrap();
    let upgrade = Raw::connect(node.server.addr, Some("bad"), None).await.err().unwrap();
    for (what, got) in [
        ("GET /", public.headers().get("x-chat-node").map(|v| v.to_str().unwrap().to_string())),
        ("an upgrade answer", header(&upgrade.head, "x-chat-node").map(str::to_string)),
    ] {
        let got = got.unwrap_or_else(|| panic!("{what}: no x-chat-node"));
        assert!(!got.contains("db-host") && !got.contains("corp"), "{what}: x-chat-node reveals the host: {got}");
        assert_eq!(got, tag, "{what}: the public tag of the node");
    }
    let internal = node.server.http.get(node.internal_url("/healthz")).send().await.unwrap();
    assert_eq!(internal.headers()["x-chat-node"], id, "the internal listener names the node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_a_critical_header_extension_is_refused() {
    let node = launch_up(&[], &[], false).await;
    let addr = node.server.addr;
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.crit = Some(vec!["x-must-understand".into()]);
    h.extras.insert("x-must-understand".into(), "yes".into());
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    let crit = jsonwebtoken::encode(&h, &json!({"sub":"alice","exp":exp}), &key).unwrap();
    let a = exchange(addr, &upgrade_request(addr, &crit)).await;
    assert_eq!(a.status, 401, "{}\n{}", a.head, a.body);
    let body: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    let (frames, end) = hello(addr, &crit).await;
    assert_eq!(end, Some(End::Close(Some(4001))), "{frames:?}");
    assert_eq!(frames.first().map(|f| f["code"].clone()), Some(json!("unauthorized")), "{frames:?}");
    // The same claims without `crit` pass.
    h.crit = None;
    let plain = jsonwebtoken::encode(&h, &json!({"sub":"alice","exp":exp}), &key).unwrap();
    assert!(connect_welcome(addr, &plain).await.is_ok());
}
