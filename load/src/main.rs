//! `crm-chat-load`: a load generator for crm-chat that speaks only the public
//! protocol: the WebSocket at `/ws/chat`, the service API and dev tokens (or
//! HS256 tokens it signs itself with `--jwt-secret`).
//!
//! Scenarios (each bounded in time by `--duration-s` and in size by its options):
//! - `conns`: N authenticated idle connections; handshakes/s and server RSS per connection.
//! - `fanout`: one group of M members, S senders, K messages at R msgs/s; delivery,
//!   loss, duplicates, order and latency at every member.
//! - `pairs`: P direct conversations ping-ponging; round trips/s and latency.
//!
//! It prints exactly one JSON line of figures on stdout; progress goes to stderr.
//! Several `--url`s make clients alternate between nodes.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    net::IpAddr,
    process::ExitCode,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use serde::Deserialize;
use serde_json::{Value, json, value::RawValue};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::{Semaphore, mpsc},
    time::{Instant, sleep, sleep_until, timeout},
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest, http::HeaderValue, protocol::WebSocketConfig},
};
use tokio_util::sync::CancellationToken;

/// Hard ceilings, whatever the options say.
const MAX_CONNS: usize = 50_000;
const MAX_MESSAGES: usize = 10_000_000;
const MAX_DURATION_S: u64 = 3_600;
/// One connect + upgrade + welcome may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// File descriptors the tool needs beyond one per connection.
const FD_SLACK: u64 = 64;

#[derive(Parser)]
#[command(
    name = "crm-chat-load",
    version,
    about = "Load generator for crm-chat (public protocol only). Prints one JSON line of figures on stdout."
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
struct Common {
    /// Node URL `http://host:port`. Several (comma-separated or repeated; `--urls` works too) make
    /// clients alternate between nodes.
    #[arg(long = "url", alias = "urls", value_delimiter = ',', default_value = "http://127.0.0.1:8000", global = true)]
    urls: Vec<String>,
    /// Allow targets that are not loopback addresses.
    #[arg(long, global = true)]
    allow_remote: bool,
    /// Service API key (`auth.api_key`).
    #[arg(long, default_value = "crm-chat-local-development-api-key", global = true)]
    api_key: String,
    /// Sign HS256 tokens with this secret (`auth.jwt_secret`) instead of asking
    /// `POST /api/v1/dev/token` for each user (faster; needed when dev tokens are off).
    #[arg(long, global = true)]
    jwt_secret: Option<String>,
    /// Cap on the scenario's run time in seconds (pairs: the ping-pong time).
    /// Defaults: conns 300, fanout 120, pairs 10.
    #[arg(long, global = true, value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION_S))]
    duration_s: Option<u64>,
    /// Connection attempts in flight at once during the ramp.
    #[arg(long, default_value_t = 200, global = true, value_parser = clap::value_parser!(u64).range(1..=5000))]
    concurrency: u64,
    /// Prefix of the user and conversation ids this run creates (default: random, so runs never collide).
    #[arg(long, global = true)]
    prefix: Option<String>,
    /// Server process id(s) whose VmRSS is read before and after (comma-separated or repeated).
    #[arg(long = "server-pid", value_delimiter = ',', global = true)]
    server_pids: Vec<u32>,
}

#[derive(Subcommand, Clone)]
enum Scenario {
    /// Open N authenticated idle connections, hold them, report handshakes/s and RSS per connection.
    Conns {
        /// Connections to open.
        #[arg(long, default_value_t = 1000)]
        n: usize,
        /// Seconds to hold them open once the ramp is over.
        #[arg(long, default_value_t = 10)]
        hold_s: u64,
    },
    /// One group of M members; S of them send K messages in total at R messages/s.
    Fanout {
        /// Members of the group (all connected; the first S send).
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// Members that send.
        #[arg(long, default_value_t = 10)]
        senders: usize,
        /// Messages in total.
        #[arg(long, default_value_t = 1000)]
        messages: usize,
        /// Messages per second in total (spread over the senders).
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Pad bodies to about this many bytes (0: just the timestamp).
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
        /// Milliseconds to wait after the ramp (presence storms settle) before sending.
        #[arg(long, default_value_t = 1000)]
        settle_ms: u64,
        /// Seconds without a new delivery after which missing deliveries count as lost.
        #[arg(long, default_value_t = 5)]
        drain_s: u64,
    },
    /// P direct conversations `dm:<a>:<b>`; in each, a sends, b replies on receipt, and so on.
    Pairs {
        /// Number of pairs.
        #[arg(long, default_value_t = 10)]
        pairs: usize,
        /// Seconds allowed for tokens and connections before the ping-pong starts.
        #[arg(long, default_value_t = 60)]
        setup_timeout_s: u64,
        /// Seconds a round trip may take before it counts as timed out (and the next starts).
        #[arg(long, default_value_t = 5)]
        rt_timeout_s: u64,
    },
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Conns { .. } => "conns",
            Scenario::Fanout { .. } => "fanout",
            Scenario::Pairs { .. } => "pairs",
        }
    }
}

// ---------------------------------------------------------------- time, output

static START: OnceLock<std::time::Instant> = OnceLock::new();

/// Microseconds since the tool started (monotonic; every client is in this process).
fn now_us() -> u64 {
    START.get_or_init(std::time::Instant::now).elapsed().as_micros() as u64
}

/// A failure that ends the run: printed as the one JSON line, exit code 1.
struct Fatal(String);

impl<E: std::fmt::Display> From<E> for Fatal {
    fn from(e: E) -> Self {
        Fatal(e.to_string())
    }
}

fn fatal(msg: impl Into<String>) -> Fatal {
    Fatal(msg.into())
}

type Counts = BTreeMap<String, u64>;

fn bump(c: &mut Counts, key: impl Into<String>) {
    *c.entry(key.into()).or_default() += 1;
}

fn merge(into: &mut Counts, from: Counts) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

/// Latencies in microseconds; percentiles by sorting.
#[derive(Default)]
struct Hist(Vec<u32>);

impl Hist {
    fn record_us(&mut self, us: u64) {
        self.0.push(us.min(u32::MAX as u64) as u32);
    }
    fn merge(&mut self, other: Hist) {
        self.0.extend(other.0);
    }
    fn summary(mut self) -> Value {
        if self.0.is_empty() {
            return json!({"count": 0});
        }
        self.0.sort_unstable();
        let n = self.0.len();
        let at = |p: f64| {
            let i = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            ms(self.0[i] as u64)
        };
        let mean = self.0.iter().map(|&v| v as u64).sum::<u64>() / n as u64;
        json!({
            "count": n,
            "p50_ms": at(0.50),
            "p90_ms": at(0.90),
            "p99_ms": at(0.99),
            "max_ms": ms(self.0[n - 1] as u64),
            "mean_ms": ms(mean),
        })
    }
}

/// Microseconds as milliseconds (3 decimals).
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---------------------------------------------------------------- targets

#[derive(Clone, Debug)]
struct Target {
    /// `http://host:port`
    base: String,
    /// `host:port`
    authority: String,
    /// `ws://host:port/ws/chat`
    ws: String,
}

fn parse_target(url: &str, allow_remote: bool) -> Result<Target, Fatal> {
    let url = url.trim().trim_end_matches('/');
    if url.starts_with("https://") || url.starts_with("wss://") {
        return Err(fatal(format!("{url}: TLS is not supported; point --url at a node's plain HTTP port")));
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or_else(|| fatal(format!("{url}: expected http://host:port")))?;
    let authority = rest.split('/').next().unwrap_or_default().to_string();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(|| fatal(format!("{url}: bad IPv6 address")))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or("80"))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.clone(), "80"),
        }
    };
    let port: u16 = port.parse().map_err(|_| fatal(format!("{url}: bad port")))?;
    let loopback = host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback && !allow_remote {
        return Err(fatal(format!(
            "{url}: '{host}' is not a loopback address; pass --allow-remote to load a remote server \
             (only ever one you run yourself)"
        )));
    }
    let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    Ok(Target { base: format!("http://{authority}"), ws: format!("ws://{authority}/ws/chat"), authority })
}

// ---------------------------------------------------------------- HTTP/1.1 client (keep-alive)

struct Http {
    target: Target,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    fn new(target: &Target) -> Http {
        Http { target: target.clone(), conn: None }
    }

    /// One request; reconnects once if the kept-alive connection was closed.
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nContent-Length: {}\r\n",
            self.target.authority,
            body.len()
        );
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        if let Some(b) = bearer {
            head.push_str(&format!("Authorization: Bearer {b}\r\n"));
        }
        head.push_str("\r\n");
        head.push_str(&body);
        let mut last = String::new();
        for _ in 0..2 {
            match timeout(HTTP_TIMEOUT, self.exchange(head.as_bytes())).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => last = e,
                Err(_) => last = "timeout".into(),
            }
            self.conn = None;
        }
        Err(format!("{method} {}{path}: {last}", self.target.base))
    }

    async fn exchange(&mut self, request: &[u8]) -> Result<(u16, Value), String> {
        if self.conn.is_none() {
            let s = TcpStream::connect(&self.target.authority).await.map_err(|e| e.to_string())?;
            s.set_nodelay(true).ok();
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().expect("connected");
        conn.get_mut().write_all(request).await.map_err(|e| e.to_string())?;
        let mut line = String::new();
        if conn.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection closed".into());
        }
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("bad status line")?;
        let (mut len, mut chunked, mut close) = (None, false, false);
        loop {
            line.clear();
            conn.read_line(&mut line).await.map_err(|e| e.to_string())?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
                match k.as_str() {
                    "content-length" => len = v.parse::<usize>().ok(),
                    "transfer-encoding" => chunked = v.contains("chunked"),
                    "connection" => close = v.contains("close"),
                    _ => {}
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                conn.read_line(&mut line).await.map_err(|e| e.to_string())?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| "bad chunk size".to_string())?;
                let mut chunk = vec![0; size + 2];
                conn.read_exact(&mut chunk).await.map_err(|e| e.to_string())?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(n) = len {
            body.resize(n, 0);
            conn.read_exact(&mut body).await.map_err(|e| e.to_string())?;
        } else {
            conn.read_to_end(&mut body).await.map_err(|e| e.to_string())?;
            close = true;
        }
        if close {
            self.conn = None;
        }
        let text = String::from_utf8_lossy(&body);
        Ok((status, serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.into_owned()))))
    }
}

// ---------------------------------------------------------------- tokens

#[derive(Clone)]
enum TokenSource {
    Sign(jsonwebtoken::EncodingKey),
    Dev(Target),
}

/// Tokens for `users` (in order): signed here, or from `POST /api/v1/dev/token`
/// over a few kept-alive connections.
async fn tokens(src: &TokenSource, users: &[String], lifetime_s: u64) -> Result<Vec<String>, Fatal> {
    match src {
        TokenSource::Sign(key) => {
            let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + lifetime_s;
            let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            users
                .iter()
                .map(|u| {
                    jsonwebtoken::encode(&header, &json!({"sub": u, "name": u, "exp": exp}), key)
                        .map_err(|e| fatal(format!("signing a token: {e}")))
                })
                .collect()
        }
        TokenSource::Dev(target) => {
            let users = Arc::new(users.to_vec());
            let next = Arc::new(AtomicUsize::new(0));
            let out = Arc::new(Mutex::new(vec![String::new(); users.len()]));
            let mut workers = Vec::new();
            for _ in 0..users.len().clamp(1, 8) {
                let (users, next, out, target) = (users.clone(), next.clone(), out.clone(), target.clone());
                workers.push(tokio::spawn(async move {
                    let mut http = Http::new(&target);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(u) = users.get(i) else { return Ok::<(), String>(()) };
                        let (status, v) = http
                            .request("POST", "/api/v1/dev/token", None, Some(&json!({"user": u, "name": u})))
                            .await?;
                        match v["token"].as_str() {
                            Some(t) if status == 200 => out.lock().unwrap()[i] = t.to_string(),
                            _ => {
                                return Err(format!(
                                    "POST /api/v1/dev/token answered {status} {v} (dev tokens off? use --jwt-secret)"
                                ));
                            }
                        }
                    }
                }));
            }
            for w in workers {
                w.await?.map_err(Fatal)?;
            }
            let out = std::mem::take(&mut *out.lock().unwrap());
            Ok(out)
        }
    }
}

// ---------------------------------------------------------------- WebSocket clients

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type WsTx = SplitSink<Ws, Message>;
type WsRx = SplitStream<Ws>;

fn classify(e: tungstenite::Error) -> String {
    use tungstenite::Error as E;
    match e {
        E::Http(r) => format!("http_{}", r.status().as_u16()),
        E::Io(e) => format!("io_{:?}", e.kind()),
        E::ConnectionClosed | E::AlreadyClosed => "closed".into(),
        E::Protocol(p) => format!("protocol: {p}"),
        E::Capacity(c) => format!("capacity: {c}"),
        other => other.to_string(),
    }
}

/// Connects with the token at upgrade and waits for `welcome`.
async fn open_ws(target: &Target, token: &str, read_buffer: usize) -> Result<Ws, String> {
    let fut = async {
        let mut req = target.ws.as_str().into_client_request().map_err(classify)?;
        let auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?;
        req.headers_mut().insert("authorization", auth);
        let cfg = WebSocketConfig::default().read_buffer_size(read_buffer);
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(cfg), true).await.map_err(classify)?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return match serde_json::from_str::<Frame>(&t) {
                        Ok(f) if f.ty == "welcome" => Ok(ws),
                        Ok(f) => Err(format!("first frame {} {}", f.ty, f.code.as_deref().unwrap_or(""))),
                        Err(_) => Err("first frame unparseable".into()),
                    };
                }
                Some(Ok(Message::Close(f))) => return Err(format!("close_{}", f.map_or(1005, |f| u16::from(f.code)))),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(classify(e)),
                None => return Err("eof before welcome".into()),
            }
        }
    };
    timeout(CONNECT_TIMEOUT, fut).await.unwrap_or_else(|_| Err("timeout".into()))
}

/// The fields of server frames this tool looks at (borrowed: no copies).
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default)]
    id: Option<u64>,
    /// An id (string) in most frames, an object in `conversation` events.
    #[serde(default, borrow)]
    conversation: Option<&'a RawValue>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    client_msg_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
    #[serde(default)]
    duplicate: Option<bool>,
}

impl Frame<'_> {
    /// Whether this frame names the conversation whose JSON-quoted id is `quoted`.
    fn in_conv(&self, quoted: &str) -> bool {
        self.conversation.is_some_and(|c| c.get() == quoted)
    }
    /// The send time (µs, tool clock) embedded in a body `t=<us>;...`.
    fn sent_us(&self) -> Option<u64> {
        let b = self.body.as_deref()?.strip_prefix("t=")?;
        b[..b.find(';').unwrap_or(b.len())].parse().ok()
    }
}

/// Which seqs a connection saw in one conversation.
#[derive(Default)]
struct SeqTrack {
    bits: Vec<u64>,
    max: u64,
    distinct: u64,
    dup: u64,
    out_of_order: u64,
}

impl SeqTrack {
    /// Records a seq; true when it is new.
    fn see(&mut self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        if self.bits[w] & (1 << b) != 0 {
            self.dup += 1;
            return false;
        }
        self.bits[w] |= 1 << b;
        self.distinct += 1;
        if seq < self.max {
            self.out_of_order += 1;
        }
        self.max = self.max.max(seq);
        true
    }
}

fn close_key(f: Option<tungstenite::protocol::CloseFrame>) -> String {
    format!("close_{}", f.map_or(1005, |f| u16::from(f.code)))
}

// ---------------------------------------------------------------- process figures

/// (soft, hard) of RLIMIT_NOFILE of a process, from /proc.
fn fd_limits(pid: &str) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let l = s.lines().find(|l| l.starts_with("Max open files"))?;
    let mut it = l.split_whitespace().skip(3);
    let soft = it.next()?;
    let hard = it.next()?;
    let parse = |v: &str| if v == "unlimited" { Some(u64::MAX) } else { v.parse().ok() };
    Some((parse(soft)?, parse(hard)?))
}

/// VmRSS in KiB.
fn rss_kib(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// utime + stime of a process in seconds (clock ticks of 1/100 s, as on Linux).
fn cpu_s(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// CPU time of the servers and of this tool at one moment, to report what a phase cost.
struct CpuMark {
    at: Instant,
    servers: Option<f64>,
    client: Option<f64>,
}

impl CpuMark {
    fn now(pids: &[u32]) -> CpuMark {
        let servers = if pids.is_empty() { None } else { pids.iter().map(|p| cpu_s(&p.to_string())).sum() };
        CpuMark { at: Instant::now(), servers, client: cpu_s("self") }
    }
    /// `{"wall_s", "server_cpu_s", "client_cpu_s"}` since this mark.
    fn since(&self, pids: &[u32]) -> Value {
        let end = CpuMark::now(pids);
        let d = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => json!(round2(b - a)),
            _ => Value::Null,
        };
        json!({
            "wall_s": round2(end.at.duration_since(self.at).as_secs_f64()),
            "server_cpu_s": d(self.servers, end.servers),
            "client_cpu_s": d(self.client, end.client),
        })
    }
}

fn servers_rss_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| rss_kib(&p.to_string())).sum()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Refuses to start when this process cannot hold `conns` sockets.
fn check_fds(conns: usize, pids: &[u32]) -> Result<(), Fatal> {
    let need = conns as u64 + FD_SLACK;
    if let Some((soft, hard)) = fd_limits("self")
        && soft < need
    {
        let advice = if hard >= need {
            format!("run `ulimit -n {hard}` in this shell first (the hard limit is {hard})")
        } else {
            format!(
                "the hard limit is {hard}: lower the count, or raise the hard limit (limits.conf / systemd LimitNOFILE)"
            )
        };
        return Err(fatal(format!(
            "{conns} connections need about {need} file descriptors but the soft limit (RLIMIT_NOFILE) is {soft}: {advice}"
        )));
    }
    for pid in pids {
        if let Some((soft, _)) = fd_limits(&pid.to_string()) {
            let share = conns as u64 / pids.len() as u64 + FD_SLACK;
            if soft < share {
                eprintln!(
                    "warning: server pid {pid} may open only {soft} files; it needs about {share} \
                     (start it after `ulimit -n 20000`)"
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- context

struct Ctx {
    targets: Vec<Target>,
    tokens: TokenSource,
    api_key: String,
    prefix: String,
    concurrency: usize,
    server_pids: Vec<u32>,
}

impl Ctx {
    /// The node a client with this index talks to (alternating).
    fn target(&self, i: usize) -> &Target {
        &self.targets[i % self.targets.len()]
    }

    async fn tokens(&self, users: &[String], lifetime_s: u64) -> Result<Vec<String>, Fatal> {
        let t0 = Instant::now();
        let out = tokens(&self.tokens, users, lifetime_s).await?;
        eprintln!("{} tokens in {:.1} s", out.len(), t0.elapsed().as_secs_f64());
        Ok(out)
    }

    /// What `/readyz` says of each node (engine, node id).
    async fn nodes(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for t in &self.targets {
            let v = match Http::new(t).request("GET", "/readyz", None, None).await {
                Ok((status, v)) => json!({"url": t.base, "status": status, "engine": v["engine"], "node": v["node"]}),
                Err(e) => json!({"url": t.base, "error": e}),
            };
            out.push(v);
        }
        out
    }
}

/// Runs `connect(i)` for `0..n` with at most `concurrency` in flight, until
/// `deadline`. Returns the handles of the started tasks and how many were started.
async fn ramp<F, Fut, T>(n: usize, concurrency: usize, deadline: Instant, connect: F) -> Vec<tokio::task::JoinHandle<T>>
where
    F: Fn(usize, tokio::sync::OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => p.expect("semaphore open"),
            _ = sleep_until(deadline) => break,
        };
        handles.push(tokio::spawn(connect(i, permit)));
    }
    // Every attempt finished (each holds its permit until connected or failed).
    let _ = timeout(deadline.saturating_duration_since(Instant::now()) + CONNECT_TIMEOUT, async {
        let _all = sem.acquire_many(concurrency as u32).await;
    })
    .await;
    handles
}

/// Prints `label: <count>` to stderr every second until cancelled.
fn progress(label: &'static str, count: Arc<AtomicUsize>, total: usize, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => eprintln!("{label}: {}/{total}", count.load(Ordering::Relaxed)),
            }
        }
    });
}

// ---------------------------------------------------------------- conns

#[derive(Default)]
struct HoldResult {
    connect: Option<Result<u64, String>>,
    dropped: Option<String>,
    frames: u64,
}

async fn conns(ctx: &Ctx, n: usize, hold_s: u64, duration: Duration) -> Result<Value, Fatal> {
    let deadline = Instant::now() + duration;
    let users: Vec<String> = (0..n).map(|i| format!("{}-c{i}", ctx.prefix)).collect();
    let tokens = ctx.tokens(&users, duration.as_secs() + 3600).await?;
    let rss_before = servers_rss_kib(&ctx.server_pids);
    let stop = CancellationToken::new();
    let established = Arc::new(AtomicUsize::new(0));
    progress("connected", established.clone(), n, stop.clone());
    let ramp_start = Instant::now();
    let cpu = CpuMark::now(&ctx.server_pids);
    let handles = ramp(n, ctx.concurrency, deadline, |i, permit| {
        let (target, token, stop, established) =
            (ctx.target(i).clone(), tokens[i].clone(), stop.clone(), established.clone());
        async move {
            let mut r = HoldResult::default();
            let t0 = now_us();
            let ws = open_ws(&target, &token, 4096).await;
            // Counted before the permit goes: the ramp is over when every permit is back.
            let mut ws = match ws {
                Ok(ws) => ws,
                Err(e) => {
                    r.connect = Some(Err(e));
                    return r;
                }
            };
            r.connect = Some(Ok(now_us() - t0));
            established.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            // Hold: keep reading (tungstenite answers the server's pings).
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    m = ws.next() => match m {
                        Some(Ok(Message::Close(f))) => { r.dropped = Some(close_key(f)); break }
                        Some(Ok(_)) => r.frames += 1,
                        Some(Err(e)) => { r.dropped = Some(classify(e)); break }
                        None => { r.dropped = Some("eof".into()); break }
                    }
                }
            }
            if r.dropped.is_none() {
                let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
            }
            r
        }
    })
    .await;
    let ramp_s = ramp_start.elapsed().as_secs_f64();
    let ramp_cpu = cpu.since(&ctx.server_pids);
    let up = established.load(Ordering::Relaxed);
    eprintln!("ramp: {up}/{n} connected in {ramp_s:.1} s; holding {hold_s} s");
    let hold_until = (Instant::now() + Duration::from_secs(hold_s)).min(deadline.max(Instant::now()));
    sleep(Duration::from_secs(1).min(hold_until.saturating_duration_since(Instant::now()))).await;
    let rss_after_ramp = servers_rss_kib(&ctx.server_pids);
    sleep_until(hold_until).await;
    let rss_after_hold = servers_rss_kib(&ctx.server_pids);
    let client_rss = rss_kib("self");
    stop.cancel();

    let mut hs = Hist::default();
    let mut failures = Counts::new();
    let mut dropped = Counts::new();
    let mut frames = 0;
    let started = handles.len();
    for h in handles {
        let Ok(Ok(r)) = timeout(Duration::from_secs(10), h).await else { continue };
        match r.connect {
            Some(Ok(us)) => hs.record_us(us),
            Some(Err(e)) => bump(&mut failures, e),
            None => {}
        }
        if let Some(d) = r.dropped {
            bump(&mut dropped, d);
        }
        frames += r.frames;
    }
    let ok = hs.0.len();
    let per_conn = match (rss_before, rss_after_hold) {
        (Some(b), Some(a)) if ok > 0 => json!(round2((a as f64 - b as f64) / ok as f64)),
        _ => Value::Null,
    };
    let dropped_n: u64 = dropped.values().sum();
    Ok(json!({
        "requested": n,
        "attempted": started,
        "established": ok,
        "failed": started - ok,
        "not_attempted": n - started,
        "failures": failures,
        "ramp_s": round2(ramp_s),
        "ramp_cpu": ramp_cpu,
        "handshakes_per_s": round2(ok as f64 / ramp_s.max(1e-6)),
        "handshake_ms": hs.summary(),
        "hold_s": hold_s,
        "dropped_during_hold": dropped,
        "open_at_end": ok as u64 - dropped_n,
        "frames_received_while_idle": frames,
        "server_rss_kib": {"before": rss_before, "after_ramp": rss_after_ramp, "after_hold": rss_after_hold},
        "server_rss_per_conn_kib": per_conn,
        "client_rss_kib": client_rss,
        "concurrency": ctx.concurrency,
    }))
}

// ---------------------------------------------------------------- fanout

const PENDING: u8 = 0;
const ACKED: u8 = 1;
const FAILED: u8 = 2;

struct FanShared {
    group_quoted: String,
    /// Per message: last send time (µs) and state.
    send_us: Vec<AtomicU64>,
    state: Vec<AtomicU8>,
    /// Distinct deliveries over all receivers.
    delivered: AtomicU64,
    last_delivery_us: AtomicU64,
    max_acked_seq: AtomicU64,
}

/// What a sender's own connection reports to its sending task.
enum SenderNote {
    RateLimited {
        k: usize,
        retry_after_ms: u64,
    },
    /// Acked or failed for good.
    Answered(usize),
}

#[derive(Default)]
struct RecvStats {
    track: SeqTrack,
    latency: Hist,
    ack_latency: Hist,
    acks: u64,
    duplicate_acks: u64,
    rate_limited: u64,
    errors: Counts,
    other_frames: Counts,
    ended: Option<String>,
}

/// Reads one member's connection until `stop`.
async fn fan_receive(
    mut rx: WsRx,
    shared: Arc<FanShared>,
    notes: Option<mpsc::UnboundedSender<SenderNote>>,
    pending: Option<Arc<AtomicUsize>>,
    stop: CancellationToken,
) -> RecvStats {
    let mut s = RecvStats::default();
    loop {
        let m = tokio::select! {
            biased;
            m = rx.next() => m,
            _ = stop.cancelled() => break,
        };
        let text = match m {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => {
                s.ended = Some(close_key(f));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                s.ended = Some(classify(e));
                break;
            }
            None => {
                s.ended = Some("eof".into());
                break;
            }
        };
        let now = now_us();
        let Ok(f) = serde_json::from_str::<Frame>(&text) else {
            bump(&mut s.other_frames, "unparseable");
            continue;
        };
        match &*f.ty {
            "message" if f.in_conv(&shared.group_quoted) => {
                let Some(seq) = f.seq else { continue };
                if s.track.see(seq) {
                    shared.delivered.fetch_add(1, Ordering::Relaxed);
                    shared.last_delivery_us.fetch_max(now, Ordering::Relaxed);
                    if let Some(t) = f.sent_us() {
                        s.latency.record_us(now.saturating_sub(t));
                    }
                }
            }
            "ack" if f.in_conv(&shared.group_quoted) => {
                let Some(k) = f.id.map(|k| k as usize).filter(|k| *k < shared.state.len()) else { continue };
                s.acks += 1;
                if f.duplicate == Some(true) {
                    s.duplicate_acks += 1;
                }
                s.ack_latency.record_us(now.saturating_sub(shared.send_us[k].load(Ordering::Relaxed)));
                if let Some(n) = &notes {
                    let _ = n.send(SenderNote::Answered(k));
                }
                shared.max_acked_seq.fetch_max(f.seq.unwrap_or(0), Ordering::Relaxed);
                if shared.state[k].swap(ACKED, Ordering::AcqRel) == PENDING
                    && let Some(p) = &pending
                {
                    p.fetch_sub(1, Ordering::AcqRel);
                }
            }
            "error" => {
                let code = f.code.as_deref().unwrap_or("unknown").to_string();
                let k = f.id.map(|k| k as usize).filter(|k| *k < shared.state.len());
                match (code.as_str(), k, &notes) {
                    ("rate_limited", Some(k), Some(notes)) => {
                        s.rate_limited += 1;
                        let _ =
                            notes.send(SenderNote::RateLimited { k, retry_after_ms: f.retry_after_ms.unwrap_or(100) });
                    }
                    _ => {
                        bump(&mut s.errors, code);
                        if let (Some(k), Some(n)) = (k, &notes) {
                            let _ = n.send(SenderNote::Answered(k));
                        }
                        if let Some(k) = k
                            && shared.state[k]
                                .compare_exchange(PENDING, FAILED, Ordering::AcqRel, Ordering::Acquire)
                                .is_ok()
                            && let Some(p) = &pending
                        {
                            p.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                }
            }
            other => bump(&mut s.other_frames, other),
        }
    }
    s
}

#[derive(Default)]
struct SendStats {
    sent: u64,
    retries: u64,
    unsent: u64,
    last_send_us: u64,
    error: Option<String>,
}

struct SendPlan {
    sender: usize,
    senders: usize,
    messages: usize,
    rate: f64,
    t0: Instant,
    deadline: Instant,
    /// After the last first send: how long to wait for outstanding acks.
    ack_grace: Duration,
    acks_by: Instant,
    pad: String,
    prefix: String,
    group: String,
}

impl SendPlan {
    fn frame(&self, k: usize, shared: &FanShared) -> String {
        let t = now_us();
        shared.send_us[k].store(t, Ordering::Relaxed);
        format!(
            r#"{{"type":"send","id":{k},"conversation":"{}","client_msg_id":"{}-{k}","body":"t={t};k={k}{}"}}"#,
            self.group, self.prefix, self.pad
        )
    }
}

/// One sender: its messages k = sender, sender + S, ... go at t0 + k/R. A
/// `rate_limited` answer pauses it for `retry_after_ms`, the message is retried,
/// and from then on the sender waits for each answer before the next send
/// (stop-and-wait), so it never collects the consecutive rate-limit strikes
/// that get a connection closed 4008.
async fn fan_send(
    mut plan: SendPlan,
    mut tx: WsTx,
    mut notes: mpsc::UnboundedReceiver<SenderNote>,
    pending: Arc<AtomicUsize>,
    shared: Arc<FanShared>,
) -> SendStats {
    const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
    let mut st = SendStats::default();
    let mut retry: std::collections::VecDeque<usize> = Default::default();
    let mut pause_until = Instant::now();
    let mut next = plan.sender;
    let mut grace_started = false;
    let mut careful = false;
    let mut awaiting: Option<(usize, Instant)> = None;
    loop {
        let all_sent = next >= plan.messages;
        if !grace_started && all_sent && retry.is_empty() {
            // Everything sent: wait for the outstanding acks at most this long.
            grace_started = true;
            plan.acks_by = plan.acks_by.min(Instant::now() + plan.ack_grace);
        }
        if all_sent && retry.is_empty() && (pending.load(Ordering::Acquire) == 0 || Instant::now() >= plan.acks_by) {
            break;
        }
        if awaiting.is_some_and(|(_, at)| at.elapsed() >= ANSWER_TIMEOUT) {
            awaiting = None;
        }
        let blocked = awaiting.is_some();
        let due = if let Some((_, at)) = awaiting {
            at + ANSWER_TIMEOUT
        } else if !retry.is_empty() {
            pause_until
        } else if !all_sent {
            (plan.t0 + Duration::from_secs_f64(next as f64 / plan.rate)).max(pause_until)
        } else {
            // Waiting for acks or retry notes.
            Instant::now() + Duration::from_millis(20)
        };
        tokio::select! {
            biased;
            note = notes.recv() => {
                match note {
                    Some(SenderNote::RateLimited { k, retry_after_ms }) => {
                        careful = true;
                        if awaiting.is_some_and(|(a, _)| a == k) {
                            awaiting = None;
                        }
                        pause_until = pause_until.max(Instant::now() + Duration::from_millis(retry_after_ms + 1));
                        retry.push_back(k);
                    }
                    Some(SenderNote::Answered(k)) => {
                        if awaiting.is_some_and(|(a, _)| a == k) {
                            awaiting = None;
                        }
                    }
                    None => break,
                }
                continue;
            }
            _ = sleep_until(plan.deadline) => break,
            _ = sleep_until(due) => {}
        }
        if blocked {
            continue;
        }
        let k = if let Some(k) = retry.pop_front() {
            st.retries += 1;
            k
        } else if !all_sent {
            let k = next;
            next += plan.senders;
            k
        } else {
            continue;
        };
        let frame = plan.frame(k, &shared);
        if let Err(e) = tx.send(Message::text(frame)).await {
            st.error = Some(classify(e));
            break;
        }
        if careful {
            awaiting = Some((k, Instant::now()));
        }
        st.sent += 1;
        st.last_send_us = now_us();
    }
    let mut k = next;
    while k < plan.messages {
        st.unsent += 1;
        k += plan.senders;
    }
    st.unsent += retry.len() as u64;
    // Dropping the writing half keeps the connection: its reader still counts deliveries.
    drop(tx);
    st
}

#[allow(clippy::too_many_arguments)]
async fn fanout(
    ctx: &Ctx,
    members: usize,
    senders: usize,
    messages: usize,
    rate: f64,
    body_bytes: usize,
    settle_ms: u64,
    drain_s: u64,
    duration: Duration,
) -> Result<Value, Fatal> {
    if senders == 0 || senders > members {
        return Err(fatal("--senders must be between 1 and --members"));
    }
    if !(rate > 0.0 && rate <= 1e6) {
        return Err(fatal("--rate must be in (0, 1000000]"));
    }
    let deadline = Instant::now() + duration;
    let group = format!("{}-fanout", ctx.prefix);
    let users: Vec<String> = (0..members).map(|i| format!("{}-m{i}", ctx.prefix)).collect();
    let mut http = Http::new(&ctx.targets[0]);
    let (status, v) = http
        .request(
            "PUT",
            &format!("/api/v1/conversations/{group}"),
            Some(&ctx.api_key),
            Some(&json!({"title": "load fanout", "members": users})),
        )
        .await?;
    if status != 200 {
        return Err(fatal(format!("PUT /api/v1/conversations/{group}: {status} {v}")));
    }
    let tokens = ctx.tokens(&users, duration.as_secs() + 3600).await?;
    let shared = Arc::new(FanShared {
        group_quoted: format!("\"{group}\""),
        send_us: (0..messages).map(|_| AtomicU64::new(0)).collect(),
        state: (0..messages).map(|_| AtomicU8::new(PENDING)).collect(),
        delivered: AtomicU64::new(0),
        last_delivery_us: AtomicU64::new(0),
        max_acked_seq: AtomicU64::new(0),
    });
    let stop = CancellationToken::new();
    let progress_stop = CancellationToken::new();
    let connected = Arc::new(AtomicUsize::new(0));
    progress("connected", connected.clone(), members, progress_stop.clone());
    // Sender connections hand their writing half (and note channel) to the sending tasks.
    type SenderSide = (usize, WsTx, mpsc::UnboundedReceiver<SenderNote>, Arc<AtomicUsize>);
    let (side_tx, mut side_rx) = mpsc::unbounded_channel::<SenderSide>();
    let ramp_start = Instant::now();
    let handles = ramp(members, ctx.concurrency, deadline, |i, permit| {
        let (target, token, shared, stop, connected, side_tx) = (
            ctx.target(i).clone(),
            tokens[i].clone(),
            shared.clone(),
            stop.clone(),
            connected.clone(),
            side_tx.clone(),
        );
        async move {
            let ws = open_ws(&target, &token, 64 * 1024).await?;
            connected.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = ws.split();
            let (notes, pending) = if i < senders {
                let (ntx, nrx) = mpsc::unbounded_channel();
                let own = (i..messages).step_by(senders).count();
                let pending = Arc::new(AtomicUsize::new(own));
                let _ = side_tx.send((i, tx, nrx, pending.clone()));
                (Some(ntx), Some(pending))
            } else {
                drop(tx);
                (None, None)
            };
            drop(side_tx);
            // Counted (and a sender's side handed over) before the permit goes.
            drop(permit);
            Ok::<_, String>(fan_receive(rx, shared, notes, pending, stop).await)
        }
    })
    .await;
    drop(side_tx);
    progress_stop.cancel();
    let ramp_s = ramp_start.elapsed().as_secs_f64();
    let up = connected.load(Ordering::Relaxed);
    let mut sides = Vec::new();
    while let Ok(s) = side_rx.try_recv() {
        sides.push(s);
    }
    eprintln!("ramp: {up}/{members} members connected in {ramp_s:.1} s ({} senders)", sides.len());
    sleep(Duration::from_millis(settle_ms).min(deadline.saturating_duration_since(Instant::now()))).await;

    // Send.
    let pad: String = "x".repeat(body_bytes.saturating_sub(24));
    let t0 = Instant::now();
    let first_send_us = now_us();
    let cpu = CpuMark::now(&ctx.server_pids);
    eprintln!("sending {messages} messages at {rate}/s from {} senders", sides.len());
    let mut send_handles = Vec::new();
    let mut unconnected_senders_msgs = (0..senders)
        .filter(|s| !sides.iter().any(|(i, ..)| i == s))
        .map(|s| (s..messages).step_by(senders).count() as u64)
        .sum::<u64>();
    for (i, tx, nrx, pending) in sides {
        let plan = SendPlan {
            sender: i,
            senders,
            messages,
            rate,
            t0,
            deadline,
            ack_grace: Duration::from_secs(drain_s.max(1)),
            acks_by: deadline,
            pad: pad.clone(),
            prefix: ctx.prefix.clone(),
            group: group.clone(),
        };
        send_handles.push(tokio::spawn(fan_send(plan, tx, nrx, pending, shared.clone())));
    }
    let delivered_progress = {
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => eprintln!(
                        "delivered {} (acked seq {})",
                        shared.delivered.load(Ordering::Relaxed),
                        shared.max_acked_seq.load(Ordering::Relaxed)
                    ),
                }
            }
        })
    };
    let mut sent = SendStats::default();
    let mut send_errors = Counts::new();
    for h in send_handles {
        if let Ok(s) = h.await {
            sent.sent += s.sent;
            sent.retries += s.retries;
            sent.unsent += s.unsent;
            sent.last_send_us = sent.last_send_us.max(s.last_send_us);
            if let Some(e) = s.error {
                bump(&mut send_errors, format!("send_{e}"));
            }
        }
    }
    let send_s = (sent.last_send_us.saturating_sub(first_send_us)) as f64 / 1e6;
    // Wait for the deliveries: every member should see every stored message.
    let stored = shared.max_acked_seq.load(Ordering::Relaxed);
    let expected_now = stored * up as u64;
    let mut last = (shared.delivered.load(Ordering::Relaxed), Instant::now());
    loop {
        let d = shared.delivered.load(Ordering::Relaxed);
        if d >= expected_now || Instant::now() >= deadline {
            break;
        }
        if d != last.0 {
            last = (d, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(drain_s) {
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    let run_cpu = cpu.since(&ctx.server_pids);
    stop.cancel();
    delivered_progress.abort();

    let mut lat = Hist::default();
    let mut ack_lat = Hist::default();
    let mut errors = send_errors;
    let mut ended = Counts::new();
    let mut other = Counts::new();
    let mut connect_failures = Counts::new();
    let (mut delivered, mut dup, mut ooo, mut lost, mut acks, mut dup_acks, mut rate_limited) = (0, 0, 0, 0, 0, 0, 0);
    let mut receivers = 0u64;
    for h in handles {
        match timeout(Duration::from_secs(10), h).await {
            Ok(Ok(Ok(s))) => {
                receivers += 1;
                delivered += s.track.distinct;
                dup += s.track.dup;
                ooo += s.track.out_of_order;
                // Seqs at or below the last acked one that this member never saw.
                let seen_le_stored = (1..=stored)
                    .filter(|q| s.track.bits.get((q / 64) as usize).is_some_and(|w| w & (1 << (q % 64)) != 0))
                    .count() as u64;
                lost += stored - seen_le_stored;
                lat.merge(s.latency);
                ack_lat.merge(s.ack_latency);
                acks += s.acks;
                dup_acks += s.duplicate_acks;
                rate_limited += s.rate_limited;
                merge(&mut errors, s.errors);
                merge(&mut other, s.other_frames);
                if let Some(e) = s.ended {
                    bump(&mut ended, e);
                }
            }
            Ok(Ok(Err(e))) => bump(&mut connect_failures, e),
            _ => bump(&mut errors, "receiver_task"),
        }
    }
    // Connections the server closed during the run are errors (1013: slow consumer).
    for (k, v) in &ended {
        *errors.entry(k.clone()).or_default() += v;
    }
    if !connect_failures.is_empty() {
        for (k, v) in &connect_failures {
            *errors.entry(format!("connect_{k}")).or_default() += v;
        }
    }
    let failed_msgs = shared.state.iter().filter(|s| s.load(Ordering::Relaxed) == FAILED).count() as u64;
    let unacked = shared.state.iter().filter(|s| s.load(Ordering::Relaxed) == PENDING).count() as u64;
    unconnected_senders_msgs = unconnected_senders_msgs.min(unacked);
    let last_delivery = shared.last_delivery_us.load(Ordering::Relaxed);
    let delivery_s = last_delivery.saturating_sub(first_send_us) as f64 / 1e6;
    let mut limited_by = Vec::<String>::new();
    if rate_limited > 0 {
        limited_by.push(format!(
            "server per-user send limit: {rate_limited} sends answered rate_limited (limits.send_per_s / send_burst, \
             default 50/s burst 100 per user per node; each sender was asked for {:.1}/s)",
            rate / senders as f64
        ));
    }
    if send_s > 0.0 && (sent.sent as f64 / send_s) < rate * 0.9 && messages as f64 / rate > 1.0 {
        limited_by.push(format!(
            "sending fell behind the schedule: {:.0}/s achieved of {rate}/s asked",
            sent.sent as f64 / send_s
        ));
    }
    if ended.contains_key("close_1013") {
        limited_by.push("slow consumers: the server closed connections 1013 (outbound queue full)".into());
    }
    Ok(json!({
        "members": members,
        "members_connected": up,
        "senders": senders,
        "messages": messages,
        "rate_asked": rate,
        "ramp_s": round2(ramp_s),
        "sent_frames": sent.sent,
        "retries": sent.retries,
        "unsent": sent.unsent,
        "unsent_no_sender_connection": unconnected_senders_msgs,
        "acked": acks - dup_acks,
        "duplicate_acks": dup_acks,
        "failed": failed_msgs,
        "unacked": unacked,
        "stored_last_seq": stored,
        "send_s": round2(send_s),
        "send_rate_achieved": round2(if send_s > 0.0 { sent.sent as f64 / send_s } else { 0.0 }),
        "expected_deliveries": (messages * members) as u64,
        "expected_deliveries_of_stored": stored * receivers,
        "delivered": delivered,
        "lost": lost,
        "duplicated": dup,
        "out_of_order": ooo,
        "deliveries_per_s": round2(if delivery_s > 0.0 { delivered as f64 / delivery_s } else { 0.0 }),
        "delivery_window_s": round2(delivery_s),
        "cpu": run_cpu,
        "latency": lat.summary(),
        "ack_latency": ack_lat.summary(),
        "rate_limited": rate_limited,
        "limited_by": limited_by,
        "errors": errors,
        "other_frames": other,
        "body_bytes": body_bytes,
    }))
}

// ---------------------------------------------------------------- pairs

#[derive(Default)]
struct PairStats {
    rtt: Hist,
    one_way: Hist,
    round_trips: u64,
    timeouts: u64,
    rate_limited: u64,
    errors: Counts,
    a: SeqTrack,
    b: SeqTrack,
    stored: u64,
}

struct PairSide {
    tx: WsTx,
    rx: WsRx,
}

/// One pair's ping-pong until `until`, then a short drain so every message
/// reached both sides.
async fn pair_run(
    i: usize,
    prefix: String,
    conv: String,
    a: Ws,
    b: Ws,
    until: Instant,
    rt_timeout: Duration,
) -> PairStats {
    let mut st = PairStats::default();
    let quoted = format!("\"{conv}\"");
    let (atx, arx) = a.split();
    let (btx, brx) = b.split();
    let mut a = PairSide { tx: atx, rx: arx };
    let mut b = PairSide { tx: btx, rx: brx };
    let frame = |side: char, n: u64| {
        format!(
            r#"{{"type":"send","id":{n},"conversation":"{conv}","client_msg_id":"{prefix}-p{i}{side}{n}","body":"t={};n={n}"}}"#,
            now_us()
        )
    };
    let cmid = |side: char, n: u64| format!("{prefix}-p{i}{side}{n}");
    let mut n: u64 = 0;
    let mut ping_at = now_us();
    // Waiting for: b to see ping n ('a'), or a to see reply n ('b'); None: done.
    let mut waiting: Option<char> = Some('a');
    let mut since = Instant::now();
    if a.tx.send(Message::text(frame('a', n))).await.is_err() {
        bump(&mut st.errors, "send_failed");
        return st;
    }
    let mut drain_until: Option<Instant> = None;
    loop {
        if let Some(d) = drain_until
            && (Instant::now() >= d || (st.a.distinct >= st.stored && st.b.distinct >= st.stored))
        {
            break;
        }
        let wake = drain_until.unwrap_or(since + rt_timeout);
        let (side, m) = tokio::select! {
            m = a.rx.next() => ('a', m),
            m = b.rx.next() => ('b', m),
            _ = sleep_until(wake) => {
                if drain_until.is_some() {
                    break;
                }
                st.timeouts += 1;
                if Instant::now() >= until {
                    drain_until = Some(Instant::now() + Duration::from_secs(2));
                    continue;
                }
                n += 1;
                ping_at = now_us();
                waiting = Some('a');
                since = Instant::now();
                if a.tx.send(Message::text(frame('a', n))).await.is_err() {
                    bump(&mut st.errors, "send_failed");
                    break;
                }
                continue;
            }
        };
        let text = match m {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => {
                bump(&mut st.errors, close_key(f));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                bump(&mut st.errors, classify(e));
                break;
            }
            None => {
                bump(&mut st.errors, "eof");
                break;
            }
        };
        let now = now_us();
        let Ok(f) = serde_json::from_str::<Frame>(&text) else { continue };
        match &*f.ty {
            "message" if f.in_conv(&quoted) => {
                let Some(seq) = f.seq else { continue };
                let track = if side == 'a' { &mut st.a } else { &mut st.b };
                track.see(seq);
                let from = f.client_msg_id.as_deref().unwrap_or("");
                let from_other = (side == 'b' && waiting == Some('a') && from == cmid('a', n))
                    || (side == 'a' && waiting == Some('b') && from == cmid('b', n));
                if !from_other {
                    continue;
                }
                if let Some(t) = f.sent_us() {
                    st.one_way.record_us(now.saturating_sub(t));
                }
                if side == 'b' {
                    // b got the ping: reply.
                    waiting = Some('b');
                    if b.tx.send(Message::text(frame('b', n))).await.is_err() {
                        bump(&mut st.errors, "send_failed");
                        break;
                    }
                } else {
                    // a got the reply: one round trip.
                    st.rtt.record_us(now.saturating_sub(ping_at));
                    st.round_trips += 1;
                    if Instant::now() >= until {
                        waiting = None;
                        drain_until = Some(Instant::now() + Duration::from_secs(2));
                        continue;
                    }
                    n += 1;
                    ping_at = now_us();
                    waiting = Some('a');
                    since = Instant::now();
                    if a.tx.send(Message::text(frame('a', n))).await.is_err() {
                        bump(&mut st.errors, "send_failed");
                        break;
                    }
                }
            }
            "ack" if f.in_conv(&quoted) => st.stored = st.stored.max(f.seq.unwrap_or(0)),
            "error" => {
                let code = f.code.as_deref().unwrap_or("unknown");
                if code == "rate_limited" {
                    st.rate_limited += 1;
                    sleep(Duration::from_millis(f.retry_after_ms.unwrap_or(100) + 1)).await;
                    // Retry the same message (same client_msg_id).
                    let s = if side == 'a' { &mut a } else { &mut b };
                    let retry_n = f.id.unwrap_or(n);
                    if s.tx.send(Message::text(frame(side, retry_n))).await.is_err() {
                        bump(&mut st.errors, "send_failed");
                        break;
                    }
                    since = Instant::now();
                } else {
                    bump(&mut st.errors, code);
                }
            }
            _ => {}
        }
    }
    let _ = timeout(Duration::from_secs(1), a.tx.close()).await;
    let _ = timeout(Duration::from_secs(1), b.tx.close()).await;
    st
}

async fn pairs(
    ctx: &Ctx,
    pairs: usize,
    duration: Duration,
    setup_timeout: Duration,
    rt_timeout: Duration,
) -> Result<Value, Fatal> {
    let setup_deadline = Instant::now() + setup_timeout;
    // a < b byte-wise: same prefix, then 'a' < 'b'.
    let users: Vec<String> =
        (0..pairs).flat_map(|i| [format!("{}-a{i}", ctx.prefix), format!("{}-b{i}", ctx.prefix)]).collect();
    let tokens = timeout(setup_timeout, ctx.tokens(&users, duration.as_secs() + 3600))
        .await
        .map_err(|_| fatal("setup timeout while getting tokens"))??;
    let connected = Arc::new(AtomicUsize::new(0));
    let progress_stop = CancellationToken::new();
    progress("connected", connected.clone(), users.len(), progress_stop.clone());
    let handles = ramp(users.len(), ctx.concurrency, setup_deadline, |i, permit| {
        let (target, token, connected) = (ctx.target(i).clone(), tokens[i].clone(), connected.clone());
        async move {
            let r = open_ws(&target, &token, 16 * 1024).await;
            if r.is_ok() {
                connected.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
            r
        }
    })
    .await;
    progress_stop.cancel();
    let mut conns = Vec::new();
    let mut connect_failures = Counts::new();
    for h in handles {
        match h.await {
            Ok(Ok(ws)) => conns.push(Some(ws)),
            Ok(Err(e)) => {
                bump(&mut connect_failures, e);
                conns.push(None);
            }
            Err(e) => {
                bump(&mut connect_failures, e.to_string());
                conns.push(None);
            }
        }
    }
    conns.resize_with(users.len(), || None);
    eprintln!(
        "{} of {} clients connected; ping-pong for {} s",
        connected.load(Ordering::Relaxed),
        users.len(),
        duration.as_secs()
    );
    let start = Instant::now();
    let cpu = CpuMark::now(&ctx.server_pids);
    let until = start + duration;
    let mut tasks = Vec::new();
    let mut pairs_up = 0;
    let mut it = conns.into_iter();
    for i in 0..pairs {
        let (Some(Some(a)), Some(Some(b))) = (it.next(), it.next()) else { continue };
        pairs_up += 1;
        let conv = format!("dm:{}:{}", users[2 * i], users[2 * i + 1]);
        tasks.push(tokio::spawn(pair_run(i, ctx.prefix.clone(), conv, a, b, until, rt_timeout)));
    }
    let mut rtt = Hist::default();
    let mut one_way = Hist::default();
    let (mut rts, mut timeouts, mut rate_limited, mut lost, mut dup, mut ooo, mut stored) = (0, 0, 0, 0, 0, 0, 0);
    let mut errors = Counts::new();
    for (k, v) in connect_failures {
        errors.insert(format!("connect_{k}"), v);
    }
    for t in tasks {
        match timeout(duration + rt_timeout + Duration::from_secs(10), t).await {
            Ok(Ok(s)) => {
                rtt.merge(s.rtt);
                one_way.merge(s.one_way);
                rts += s.round_trips;
                timeouts += s.timeouts;
                rate_limited += s.rate_limited;
                stored += s.stored;
                for tr in [&s.a, &s.b] {
                    lost += s.stored.saturating_sub(tr.distinct);
                    dup += tr.dup;
                    ooo += tr.out_of_order;
                }
                merge(&mut errors, s.errors);
            }
            _ => bump(&mut errors, "pair_task"),
        }
    }
    let run_cpu = cpu.since(&ctx.server_pids);
    let elapsed = start.elapsed().as_secs_f64().min(duration.as_secs_f64() + rt_timeout.as_secs_f64());
    let ping_pong_s = duration.as_secs_f64().min(elapsed);
    let mut limited_by = Vec::<String>::new();
    if rate_limited > 0 {
        limited_by.push(format!(
            "server per-user send limit: {rate_limited} sends answered rate_limited (limits.send_per_s / send_burst, \
             default 50/s burst 100 per user per node)"
        ));
    }
    Ok(json!({
        "pairs": pairs,
        "pairs_connected": pairs_up,
        "duration_s": duration.as_secs(),
        "round_trips": rts,
        "round_trips_per_s": round2(rts as f64 / ping_pong_s.max(1e-6)),
        "rtt": rtt.summary(),
        "cpu": run_cpu,
        "one_way": one_way.summary(),
        "messages_stored": stored,
        "timeouts": timeouts,
        "lost": lost,
        "duplicated": dup,
        "out_of_order": ooo,
        "rate_limited": rate_limited,
        "limited_by": limited_by,
        "errors": errors,
    }))
}

// ---------------------------------------------------------------- main

fn main() -> ExitCode {
    START.get_or_init(std::time::Instant::now);
    let cli = Cli::parse();
    let scenario = cli.scenario.name();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crm-chat-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A watchdog: whatever happens, the run ends.
    let cap = match &cli.scenario {
        Scenario::Conns { .. } => cli.common.duration_s.unwrap_or(300) + 60,
        Scenario::Fanout { .. } => cli.common.duration_s.unwrap_or(120) + 60,
        Scenario::Pairs { setup_timeout_s, rt_timeout_s, .. } => {
            cli.common.duration_s.unwrap_or(10) + setup_timeout_s + rt_timeout_s + 60
        }
    };
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(cap));
        println!("{}", json!({"scenario": scenario, "error": format!("watchdog: still running after {cap} s")}));
        std::process::exit(3);
    });
    let started = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let load = loadavg();
    let result = rt.block_on(run(cli));
    let code = match result {
        Ok((common, mut figures)) => {
            if let Value::Object(m) = &mut figures {
                let mut out = serde_json::Map::new();
                out.insert("scenario".into(), json!(scenario));
                out.insert("started".into(), json!(started));
                out.insert("loadavg_start".into(), json!(load));
                out.insert("loadavg_end".into(), json!(loadavg()));
                out.extend(common.as_object().cloned().unwrap_or_default());
                out.append(m);
                figures = Value::Object(out);
            }
            println!("{figures}");
            ExitCode::SUCCESS
        }
        Err(Fatal(e)) => {
            eprintln!("crm-chat-load: {e}");
            println!("{}", json!({"scenario": scenario, "error": e}));
            ExitCode::FAILURE
        }
    };
    // Open sockets and tasks go with the runtime.
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

async fn run(cli: Cli) -> Result<(Value, Value), Fatal> {
    let c = cli.common;
    let targets = c.urls.iter().map(|u| parse_target(u, c.allow_remote)).collect::<Result<Vec<_>, _>>()?;
    if targets.is_empty() {
        return Err(fatal("no --url"));
    }
    let prefix = c.prefix.unwrap_or_else(|| format!("lt{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    if prefix.is_empty() || prefix.len() > 32 || !prefix.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
        return Err(fatal("--prefix must be 1-32 chars of [A-Za-z0-9_]"));
    }
    let tokens = match &c.jwt_secret {
        Some(s) => TokenSource::Sign(jsonwebtoken::EncodingKey::from_secret(s.as_bytes())),
        None => TokenSource::Dev(targets[0].clone()),
    };
    let ctx = Ctx {
        targets,
        tokens,
        api_key: c.api_key.clone(),
        prefix,
        concurrency: c.concurrency as usize,
        server_pids: c.server_pids.clone(),
    };
    // Limits first: a run that cannot hold its connections should not start.
    let conns_needed = match &cli.scenario {
        Scenario::Conns { n, .. } => *n,
        Scenario::Fanout { members, .. } => *members,
        Scenario::Pairs { pairs, .. } => pairs.saturating_mul(2),
    };
    if conns_needed == 0 || conns_needed > MAX_CONNS {
        return Err(fatal(format!("between 1 and {MAX_CONNS} connections per run (asked for {conns_needed})")));
    }
    check_fds(conns_needed, &ctx.server_pids)?;
    let nodes = ctx.nodes().await;
    if let Some(bad) = nodes.iter().find(|n| n.get("error").is_some()) {
        return Err(fatal(format!("node not reachable: {bad}")));
    }
    let common = json!({
        "urls": ctx.targets.iter().map(|t| t.base.clone()).collect::<Vec<_>>(),
        "nodes": nodes,
        "prefix": ctx.prefix,
        "tokens": if c.jwt_secret.is_some() { "signed" } else { "dev" },
    });
    let figures = match cli.scenario {
        Scenario::Conns { n, hold_s } => {
            let d = Duration::from_secs(c.duration_s.unwrap_or(300));
            conns(&ctx, n, hold_s.min(MAX_DURATION_S), d).await?
        }
        Scenario::Fanout { members, senders, messages, rate, body_bytes, settle_ms, drain_s } => {
            if messages == 0 || messages > MAX_MESSAGES {
                return Err(fatal(format!("--messages must be 1..={MAX_MESSAGES}")));
            }
            if body_bytes > 3900 {
                return Err(fatal("--body-bytes must be at most 3900 (limits.max_body_chars is 4000 by default)"));
            }
            let d = Duration::from_secs(c.duration_s.unwrap_or(120));
            fanout(&ctx, members, senders, messages, rate, body_bytes, settle_ms.min(60_000), drain_s.min(600), d)
                .await?
        }
        Scenario::Pairs { pairs: p, setup_timeout_s, rt_timeout_s } => {
            let d = Duration::from_secs(c.duration_s.unwrap_or(10));
            pairs(
                &ctx,
                p,
                d,
                Duration::from_secs(setup_timeout_s.clamp(1, 600)),
                Duration::from_secs(rt_timeout_s.clamp(1, 60)),
            )
            .await?
        }
    };
    Ok((common, figures))
}
