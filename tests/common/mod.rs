//! Test harness: real `crm-chat` processes on ephemeral ports, real WebSocket
//! and HTTP clients. Nothing is mocked.
#![allow(dead_code)]

pub mod extra;
pub mod process;
pub mod stream;
pub mod valkey;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{net::TcpStream, process::Child};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{
        Message,
        client::IntoClientRequest,
        http::{HeaderName, HeaderValue, Request},
        protocol::frame::coding::CloseCode,
    },
};

pub use process::{API_KEY, JWT_SECRET, TIMEOUT};

/// An HTTP client for the tests (the server's reqwest brings rustls without
/// a default crypto provider: ring, as in the server).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// One `crm-chat` process.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The internal listener, when `server.internal_listen` is set.
    pub internal: Option<SocketAddr>,
    pub http: reqwest::Client,
    stderr_tail: process::StderrTail,
}

impl Server {
    /// Starts the binary with test defaults overridden by `env`.
    pub async fn start(env: &[(&str, &str)]) -> Server {
        match Server::launch(env, &[], false).await {
            Ok(s) => s,
            Err(e) => panic!("crm-chat did not start (exit {:?}); stderr:\n{}", e.code, e.stderr),
        }
    }

    /// [`process::spawn`] of this package's binary: never panics when the
    /// process fails to start.
    pub async fn launch(env: &[(&str, &str)], prefix: &[&str], wait_internal: bool) -> Result<Server, process::Exited> {
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_crm-chat"));
        let p = process::spawn(bin, prefix, env, wait_internal).await?;
        Ok(Server {
            child: Some(p.child),
            addr: p.addr,
            internal: p.internal,
            http: http_client(),
            stderr_tail: p.stderr_tail,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A URL on the internal listener (service API, health, metrics): the
    /// public one when the server has no internal listener.
    pub fn internal_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.internal.unwrap_or(self.addr))
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws/chat", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running")
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status();
        assert!(ok.unwrap().success());
    }

    /// Waits for the process to exit and returns its code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let status = tokio::time::timeout(within, child.wait()).await.expect("exit in time").unwrap();
        self.child = None;
        status.code()
    }

    pub fn logs(&self) -> String {
        self.stderr_tail.lock().unwrap().iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// A dev token from the server.
    pub async fn token(&self, user: &str) -> String {
        let r = self
            .http
            .post(self.url("/api/v1/dev/token"))
            .json(&json!({"user": user, "name": display_name(user)}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "dev token for {user}");
        r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string()
    }

    /// Connects and authenticates with `hello`.
    pub async fn client(&self, user: &str) -> Client {
        let token = self.token(user).await;
        let mut c = Client::connect(&self.ws_url(), None).await.expect("connect");
        c.send(json!({"type":"hello","id":"hello","token":token})).await;
        let w = c.next().await;
        assert_eq!(w["type"], "welcome", "{w}\nserver log:\n{}", self.logs());
        c.user = user.to_string();
        c.welcome = w;
        c
    }

    /// Service API call with the API key.
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, self.internal_url(path)).bearer_auth(API_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn put_group(&self, id: &str, members: &[&str]) -> Value {
        let (s, v) = self
            .api(
                reqwest::Method::PUT,
                &format!("/api/v1/conversations/{id}"),
                Some(json!({"title": id, "members": members})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v
    }

    /// Every stored message of a conversation (oldest first), page by page
    /// through the service API.
    pub async fn stored(&self, conv: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let path = format!("/api/v1/conversations/{conv}/messages?after={after}&limit=200");
            let (status, v) = self.api(reqwest::Method::GET, &path, None).await;
            assert_eq!(status, 200, "{v}");
            let page = v["messages"].as_array().unwrap().clone();
            if let Some(last) = page.last() {
                after = last["seq"].as_u64().unwrap();
            }
            all.extend(page);
            if v["has_more"] != true {
                return all;
            }
        }
    }

    pub async fn metrics(&self) -> String {
        self.http.get(self.internal_url("/metrics")).send().await.unwrap().text().await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

pub fn display_name(user: &str) -> String {
    let mut c = user.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct TempDir {
    path: std::path::PathBuf,
    text: String,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("crm-chat-{}-{}", std::process::id(), unique(prefix)));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temporary directory");
        let text = path.display().to_string();
        TempDir { path, text }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn path_str(&self) -> &str {
        &self.text
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What ended a connection, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Close(u16),
    /// The TCP connection ended without a close frame.
    Dropped,
}

/// A WebSocket client that keeps frames it was not waiting for.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
    /// The user of the welcome (empty before it).
    pub user: String,
    /// `x-chat-node` of the upgrade response: which node serves this connection.
    pub node: String,
    pending: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    pub async fn connect(
        url: &str,
        headers: Option<Vec<(&str, String)>>,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut req: Request<()> = url.into_client_request()?;
        for (k, v) in headers.unwrap_or_default() {
            req.headers_mut().insert(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(&v).unwrap());
        }
        let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
        let node = resp.headers().get("x-chat-node").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        Ok(Client { ws, welcome: Value::Null, user: String::new(), node, pending: VecDeque::new(), next_id: 1000 })
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string().into())).await.expect("send frame");
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send raw");
    }

    /// The next text frame from the wire (not the pending buffer).
    async fn read(&mut self, within: Duration) -> Option<Result<Value, Ended>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) | Ok(Some(Err(_))) => return Some(Err(Ended::Dropped)),
                Ok(Some(Ok(m))) => m,
            };
            match m {
                Message::Text(t) => return Some(Ok(serde_json::from_str(&t).expect("server frames are JSON"))),
                Message::Close(f) => {
                    return Some(Err(Ended::Close(f.map_or(1005, |f| u16::from(f.code)))));
                }
                Message::Binary(_) => panic!("server sent a binary frame"),
                _ => continue,
            }
        }
    }

    /// The next frame (buffered first).
    pub async fn next(&mut self) -> Value {
        if let Some(v) = self.pending.pop_front() {
            return v;
        }
        match self.read(TIMEOUT).await {
            Some(Ok(v)) => v,
            Some(Err(e)) => panic!("connection ended while waiting for a frame: {e:?}"),
            None => panic!("no frame within {TIMEOUT:?}"),
        }
    }

    /// The first frame matching `pred`; other frames stay buffered in order.
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.pending.iter().position(&pred) {
            return self.pending.remove(i).unwrap();
        }
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                Some(Ok(v)) if pred(&v) => return v,
                Some(Ok(v)) => self.pending.push_back(v),
                Some(Err(e)) => panic!("connection ended while waiting for {what}: {e:?}; got {:?}", self.pending),
                None => panic!("no {what} within {TIMEOUT:?}; got {:?}", self.pending),
            }
        }
    }

    pub async fn expect_type(&mut self, ty: &str) -> Value {
        self.expect(ty, |v| v["type"] == ty).await
    }

    /// Sends a frame with a fresh id and returns the reply carrying that id.
    pub async fn request(&mut self, mut v: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        v["id"] = json!(id);
        self.send(v).await;
        self.expect("reply", |r| r["id"] == json!(id)).await
    }

    /// Like [`Client::request`], but `None` when the connection ends (or
    /// fails) before the reply: for traffic into a server that gets killed.
    pub async fn try_request(&mut self, mut v: Value) -> Option<Value> {
        self.next_id += 1;
        let id = json!(self.next_id);
        v["id"] = id.clone();
        self.ws.send(Message::Text(v.to_string().into())).await.ok()?;
        loop {
            match self.read(TIMEOUT).await {
                Some(Ok(r)) if r["id"] == id => return Some(r),
                Some(Ok(r)) => self.pending.push_back(r),
                _ => return None,
            }
        }
    }

    /// `send` and its `ack` (or error).
    pub async fn say(&mut self, conversation: &str, body: &str) -> Value {
        let cmid = unique("cm");
        self.request(json!({"type":"send","conversation":conversation,"client_msg_id":cmid,"body":body})).await
    }

    /// Round trip proving every frame the server queued before it has arrived.
    pub async fn barrier(&mut self) {
        let r = self.request(json!({"type":"ping"})).await;
        assert_eq!(r["type"], "pong");
    }

    /// Asserts nothing but what `ignore` accepts arrives for `d`.
    pub async fn assert_quiet(&mut self, d: Duration, ignore: impl Fn(&Value) -> bool) {
        self.pending.retain(|v| !ignore(v));
        assert!(self.pending.is_empty(), "unexpected frames: {:?}", self.pending);
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.read(left).await {
                None => return,
                Some(Ok(v)) if ignore(&v) => {}
                Some(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Frames already buffered or arriving within `d`.
    pub async fn drain(&mut self, d: Duration) -> Vec<Value> {
        let mut out: Vec<Value> = self.pending.drain(..).collect();
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                Some(Ok(v)) => out.push(v),
                _ => return out,
            }
        }
    }

    /// Reads until the connection ends; returns the frames seen and how it ended.
    pub async fn until_closed(&mut self, within: Duration) -> (Vec<Value>, Ended) {
        let mut frames: Vec<Value> = self.pending.drain(..).collect();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                Some(Ok(v)) => frames.push(v),
                Some(Err(e)) => return (frames, e),
                None => panic!("connection still open after {within:?}; frames: {frames:?}"),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while self.ws.next().await.is_some() {} }).await;
    }

    /// Drops buffered frames matching `pred` (frames a test does not look at).
    pub fn discard(&mut self, pred: impl Fn(&Value) -> bool) {
        self.pending.retain(|v| !pred(v));
    }

    pub fn conversation<'a>(&'a self, id: &str) -> Option<&'a Value> {
        self.welcome["conversations"].as_array()?.iter().find(|c| c["id"] == id)
    }
}

pub fn is_presence(v: &Value) -> bool {
    v["type"] == "presence" && v.get("id").is_none()
}

/// Which engine a suite runs on.
#[derive(Debug, Clone, Copy)]
pub enum Engine {
    /// One node, embedded engine, history in memory.
    Memory,
    /// One node, embedded engine, history on disk in a temporary `chat.data_dir`.
    Durable,
    /// `nodes` nodes sharing one real Valkey/Redis; clients and API calls
    /// alternate between nodes, so every cross-client check crosses nodes.
    Valkey { nodes: usize },
    /// `nodes` nodes on a real three-master Valkey/Redis Cluster.
    ValkeyCluster { nodes: usize },
}

/// A chat service under test: one or more nodes that must behave as one.
pub struct Chat {
    pub nodes: Vec<Server>,
    /// The durable engine's directory (removed on drop, after the nodes).
    pub data_dir: Option<TempDir>,
    pub valkey: Option<valkey::Valkey>,
    pub cluster: Option<valkey::ValkeyCluster>,
    rr: AtomicUsize,
}

pub async fn start_nodes(nodes: usize, url: &str, cluster: bool, env: &[(&str, &str)]) -> Vec<Server> {
    let mut servers = Vec::new();
    for i in 0..nodes {
        let node_id = format!("node{i}");
        let mut e: Vec<(&str, &str)> =
            vec![("CHAT_VALKEY__URL", url), ("CHAT_SERVER__NODE_ID", &node_id), ("CHAT_VALKEY__NODE_LEASE_S", "5")];
        if cluster {
            e.push(("CHAT_VALKEY__CLUSTER", "true"));
        }
        e.extend_from_slice(env);
        servers.push(Server::start(&e).await);
    }
    servers
}

impl Engine {
    pub async fn start(self, env: &[(&str, &str)]) -> Chat {
        match self {
            Engine::Memory => Chat {
                nodes: vec![Server::start(env).await],
                data_dir: None,
                valkey: None,
                cluster: None,
                rr: AtomicUsize::new(0),
            },
            Engine::Durable => {
                let dir = TempDir::new("chat-data");
                let mut e: Vec<(&str, &str)> = vec![("CHAT_CHAT__DATA_DIR", dir.path_str())];
                e.extend_from_slice(env);
                let nodes = vec![Server::start(&e).await];
                Chat { nodes, data_dir: Some(dir), valkey: None, cluster: None, rr: AtomicUsize::new(0) }
            }
            Engine::Valkey { nodes } => {
                let v = valkey::Valkey::start().await;
                let servers = start_nodes(nodes, &v.url(), false, env).await;
                Chat { nodes: servers, data_dir: None, valkey: Some(v), cluster: None, rr: AtomicUsize::new(0) }
            }
            Engine::ValkeyCluster { nodes } => {
                let c = valkey::ValkeyCluster::start(3).await;
                let servers = start_nodes(nodes, &c.url(), true, env).await;
                Chat { nodes: servers, data_dir: None, valkey: None, cluster: Some(c), rr: AtomicUsize::new(0) }
            }
        }
    }
}

impl Chat {
    /// The next node, round robin.
    pub fn node(&self) -> &Server {
        &self.nodes[self.rr.fetch_add(1, Ordering::Relaxed) % self.nodes.len()]
    }

    pub async fn client(&self, user: &str) -> Client {
        self.node().client(user).await
    }

    pub async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.node().api(method, path, body).await
    }

    pub async fn put_group(&self, id: &str, members: &[&str]) -> Value {
        self.node().put_group(id, members).await
    }
}

/// Generates one `#[tokio::test]` per engine for each suite function
/// `async fn name(engine: Engine)`.
#[macro_export]
macro_rules! engine_suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Engine::Memory).await
                }
            )*
        }
        mod durable {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Engine::Durable).await
                }
            )*
        }
        mod valkey_two_nodes {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Engine::Valkey { nodes: 2 }).await
                }
            )*
        }
        mod valkey_cluster_two_nodes {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Engine::ValkeyCluster { nodes: 2 }).await
                }
            )*
        }
    };
}

/// A hand-rolled WebSocket client: sends exactly the bytes a test asks for
/// and never answers pings by itself (tungstenite does, which hides idleness).
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    pub async fn connect(addr: SocketAddr, extra_headers: &str) -> RawWs {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /ws/chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = tokio::time::timeout(TIMEOUT, stream.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0, "connection closed during handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                buf.drain(..end + 4);
                return RawWs { stream, buf };
            }
        }
    }

    /// Sends one frame (masked, as a client must) with FIN set.
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let mut f = vec![0x80 | opcode];
        let len = payload.len();
        if len < 126 {
            f.push(0x80 | len as u8);
        } else if len < 65536 {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&f).await.unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(0x1, text.as_bytes()).await;
    }

    /// The next frame `(opcode, payload)`; `None` at EOF or after `within`.
    pub async fn read_frame(&mut self, within: Duration) -> Option<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.buf.len() >= 2 {
                let opcode = self.buf[0] & 0x0f;
                let (len, head) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    n if n < 126 => (n as usize, 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.buf.len() >= head + len {
                    let payload = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    return Some((opcode, payload));
                }
            }
            let mut chunk = [0u8; 8192];
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Reads frames until a close frame; returns its code (None: none came).
    pub async fn close_code(&mut self, within: Duration) -> (Vec<(u8, Vec<u8>)>, Option<u16>) {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        while let Some((op, p)) = self.read_frame(deadline.saturating_duration_since(tokio::time::Instant::now())).await
        {
            if op == 0x8 {
                return (seen, (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])));
            }
            seen.push((op, p));
        }
        (seen, None)
    }
}
