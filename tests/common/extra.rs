//! Extra harness pieces for the abuse suite (tests/abuse.rs): servers started
//! with a second (internal) listener, a command prefix (e.g. `prlimit`) or
//! allowed to fail at start; a raw WebSocket client with full control over
//! framing, masking and the socket's receive buffer that tells a close frame
//! from a reset; process memory and metrics readers; locally signed tokens.
//! Nothing here changes the behaviour of the existing helpers.

use std::{io::ErrorKind, net::SocketAddr, time::Duration};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{JWT_SECRET, Server, TIMEOUT, display_name};

/// A node started by [`launch`]: the server and, when asked for, the address
/// of its internal listener (`server.internal_listen`).
pub struct Node {
    pub server: Server,
    pub internal: Option<SocketAddr>,
}

impl Node {
    /// A URL on the internal listener (the public one when there is none).
    pub fn internal_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.internal.unwrap_or(self.server.addr))
    }

    /// `/metrics` from the internal listener.
    pub async fn metrics(&self) -> String {
        self.server.http.get(self.internal_url("/metrics")).send().await.unwrap().text().await.unwrap()
    }
}

/// What became of a process started by [`launch`].
pub enum Launch {
    Up(Box<Node>),
    /// It exited (or never printed its listening line within the timeout).
    Exited {
        code: Option<i32>,
        stderr: String,
    },
}

/// Starts `crm-chat` like [`Server::start`] (same defaults, then `env`), run
/// through `prefix` when not empty (`["prlimit", "--as=...", "--"]`: the
/// prefix must exec the binary so the pid stays the server's). With
/// `internal`, also waits for `crm-chat internal listening on http://ADDR`
/// (set `CHAT_SERVER__INTERNAL_LISTEN` in `env`). Never panics when the
/// process fails to start: returns its exit code and stderr instead.
pub async fn launch(env: &[(&str, &str)], prefix: &[&str], internal: bool) -> Launch {
    match Server::launch(env, prefix, internal).await {
        Ok(server) => Launch::Up(Box::new(Node { internal: server.internal, server })),
        Err(e) => Launch::Exited { code: e.code, stderr: e.stderr },
    }
}

/// [`launch`] that must succeed.
pub async fn launch_up(env: &[(&str, &str)], prefix: &[&str], internal: bool) -> Node {
    match launch(env, prefix, internal).await {
        Launch::Up(n) => *n,
        Launch::Exited { code, stderr } => {
            panic!("crm-chat did not start (exit {code:?}, internal listener expected: {internal}); stderr:\n{stderr}")
        }
    }
}

/// `VmRSS` of a process in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// `VmSize` (address space) of a process in KiB.
pub fn vm_size_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmSize:")
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Whether a process is still running (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with(|c| c != 'Z' && c != 'X')))
        .unwrap_or(false)
}

/// The sum of every sample of metric `name` (all label sets) in a Prometheus
/// text page; `None` when it has no sample.
pub fn metric_sum(page: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in page.lines() {
        let Some(rest) = l.strip_prefix(name) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// A token signed here with the harness secret, valid for an hour.
pub fn sign_token(user: &str) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "name": display_name(user), "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// How a raw connection ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A close frame arrived (its code; `None` when it carried none).
    Close(Option<u16>),
    /// FIN without a close frame.
    Eof,
    /// The TCP connection was reset (or another socket error).
    Reset(String),
    /// Nothing ended it within the time given.
    Timeout,
}

/// Builds a client frame; `mask` false makes an (illegal) unmasked one.
pub fn frame_bytes(fin: bool, opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    let m = if mask { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        f.push(m | len as u8);
    } else if len < 65536 {
        f.push(m | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(m | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if mask {
        let key = [0x5a, 0x13, 0xc4, 0x7e];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Opens a TCP connection, optionally with a small receive buffer (set before
/// connecting so the window is small from the handshake on).
pub async fn tcp(addr: SocketAddr, recv_buffer: Option<u32>) -> std::io::Result<TcpStream> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    if let Some(n) = recv_buffer {
        sock.set_recv_buffer_size(n)?;
    }
    sock.connect(addr).await
}

/// A raw WebSocket client connection (after a successful upgrade).
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// The upgrade was not answered 101: status and response head.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub head: String,
}

impl Raw {
    /// Upgrades `stream` at `/ws/chat` with `extra_headers` (each ending in CRLF).
    pub async fn upgrade(mut stream: TcpStream, addr: SocketAddr, extra_headers: &str) -> Result<Raw, Refused> {
        let req = format!(
            "GET /ws/chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        );
        if let Err(e) = stream.write_all(req.as_bytes()).await {
            return Err(Refused { status: 0, head: format!("write failed: {e}") });
        }
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = match tokio::time::timeout(TIMEOUT, stream.read(&mut chunk)).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(Refused { status: 0, head: format!("read failed: {e}") }),
                Err(_) => return Err(Refused { status: 0, head: "no response head within 10 s".into() }),
            };
            if n == 0 {
                return Err(Refused { status: 0, head: format!("EOF after {:?}", String::from_utf8_lossy(&buf)) });
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                if status != 101 {
                    return Err(Refused { status, head });
                }
                buf.drain(..end + 4);
                return Ok(Raw { stream, buf });
            }
        }
    }

    /// Connects and upgrades with `Authorization: Bearer <token>` (`None`: no
    /// token, the connection must say `hello`).
    pub async fn connect(addr: SocketAddr, token: Option<&str>, recv_buffer: Option<u32>) -> Result<Raw, Refused> {
        let stream =
            tcp(addr, recv_buffer).await.map_err(|e| Refused { status: 0, head: format!("connect failed: {e}") })?;
        let headers = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        Raw::upgrade(stream, addr, &headers).await
    }

    /// [`Raw::connect`] that must succeed.
    pub async fn open(addr: SocketAddr, token: Option<&str>) -> Raw {
        Raw::connect(addr, token, None).await.unwrap_or_else(|r| panic!("upgrade refused: {r:?}"))
    }

    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        self.write(&frame_bytes(true, opcode, payload, true)).await
    }

    pub async fn send_json(&mut self, v: &Value) -> std::io::Result<()> {
        self.send_frame(0x1, v.to_string().as_bytes()).await
    }

    /// A complete frame from the buffer: `(opcode, payload)`.
    fn take_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let opcode = b[0] & 0x0f;
        let (len, head) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize, 10),
            n if n < 126 => (n as usize, 2),
            _ => return None,
        };
        if b.len() < head + len {
            return None;
        }
        let payload = b[head..head + len].to_vec();
        self.buf.drain(..head + len);
        Some((opcode, payload))
    }

    /// The next frame; `Err` with how the connection ended (a close frame is
    /// returned as a frame with opcode 8).
    pub async fn read_frame(&mut self, within: Duration) -> Result<(u8, Vec<u8>), End> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(f) = self.take_frame() {
                return Ok(f);
            }
            let mut chunk = vec![0u8; 16384];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(End::Timeout),
                Ok(Ok(0)) => return Err(End::Eof),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(End::Reset(format!("{:?}: {e}", e.kind()))),
            }
        }
    }

    /// The next text frame as JSON; answers pings; a close frame ends it.
    pub async fn next_json(&mut self, within: Duration) -> Result<Value, End> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (op, p) = self.read_frame(left).await?;
            match op {
                0x1 => return Ok(serde_json::from_slice(&p).expect("server text frames are JSON")),
                0x8 => return Err(End::Close((p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])))),
                0x9 => {
                    let _ = self.send_frame(0xA, &p).await;
                }
                _ => {}
            }
        }
    }

    /// The next JSON frame matching `pred` (others are dropped).
    pub async fn expect(&mut self, what: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_json(left).await {
                Ok(v) if pred(&v) => return v,
                Ok(_) => {}
                Err(e) => panic!("waiting for {what}: connection {e:?}"),
            }
        }
    }

    /// Reads until the connection ends, writing `writer(i)` every `every`
    /// meanwhile (`None`: stop writing; write errors are ignored, the read
    /// side tells what happened). Reading starts only after `quiet`: a client
    /// busy writing does not read, which is when a server that drops the
    /// socket right after its close frame shows a reset instead. Answers a
    /// close frame with a close frame. Returns the frames seen before the end
    /// and the end.
    pub async fn finish_while_writing(
        &mut self,
        within: Duration,
        quiet: Duration,
        every: Duration,
        mut writer: impl FnMut(u32) -> Option<Vec<u8>>,
    ) -> (Vec<(u8, Vec<u8>)>, End) {
        let start = tokio::time::Instant::now();
        let deadline = start + within;
        let read_from = start + quiet;
        let mut seen = Vec::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut i = 0u32;
        let mut writing = true;
        let mut reading = quiet.is_zero();
        loop {
            if reading {
                while let Some((op, p)) = self.take_frame() {
                    if op == 0x8 {
                        let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                        let reply = frame_bytes(true, 0x8, &p[..p.len().min(2)], true);
                        let _ = tokio::time::timeout(Duration::from_millis(500), self.stream.write_all(&reply)).await;
                        return (seen, End::Close(code));
                    }
                    seen.push((op, p));
                }
            }
            let mut chunk = vec![0u8; 16384];
            let (mut rd, mut wr) = self.stream.split();
            tokio::select! {
                r = tokio::time::timeout_at(deadline, rd.read(&mut chunk)), if reading => match r {
                    Err(_) => return (seen, End::Timeout),
                    Ok(Ok(0)) => return (seen, End::Eof),
                    Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                    Ok(Err(e)) => return (seen, End::Reset(format!("{:?}: {e}", e.kind()))),
                },
                _ = tokio::time::sleep_until(read_from), if !reading => reading = true,
                _ = tick.tick(), if writing => {
                    match writer(i) {
                        Some(bytes) => {
                            // A write that cannot complete (window closed) must not stall reading.
                            let _ = tokio::time::timeout(every, wr.write_all(&bytes)).await;
                        }
                        None => writing = false,
                    }
                    i += 1;
                }
            }
        }
    }

    /// Reads (discarding) until the connection ends, without writing.
    pub async fn finish(&mut self, within: Duration) -> (Vec<(u8, Vec<u8>)>, End) {
        self.finish_while_writing(within, Duration::ZERO, Duration::from_secs(3600), |_| None).await
    }
}

/// Whether an I/O error means the peer reset or closed the connection.
pub fn is_reset(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted)
}
