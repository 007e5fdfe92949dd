//! The demo page and `chat.js` end to end in real headless Chromium.
//!
//! Two browsers (alice and bob) drive `static/index.html` against a real
//! `crm-chat` process through chromedriver: dev sign-in, the console greeting,
//! a direct conversation, send-to-display latency, ticks (one, two, two blue),
//! unread badges, typing, right-to-left text, and a server restart on the same
//! port with a message sent while the server was down.
//!
//! Needs Debian's `/usr/bin/chromium` and `/usr/bin/chromedriver`
//! (`apt-get install chromium chromium-driver`; `$CHROME_BIN` and
//! `$CHROMEDRIVER` override the paths). The test fails, never skips, without them.
//!
//! WebDriver goes through fantoccini; chromedriver's `POST /session/{id}/se/log`
//! (the browser console, which has no typed fantoccini API) is a custom
//! `WebDriverCompatibleCommand` sent with `Client::issue_cmd`.
//! Screenshots land in `tests/artifacts/`; `docs/screenshot.png` is written
//! when missing or when `UPDATE_DOCS_SCREENSHOT=1`.
//!
//! The other tests (one browser test at a time: they share a lock) cover
//! PROTOCOL v1.1 in the client: `tests/browser_chatjs.js` drives the real
//! `chat.js` in a page against a scripted server (batched frames, epochs,
//! `reset`, refresh, 4001, `max_body_chars`, erased messages), and three tests
//! against the real server check an epoch change across a restart, batched
//! receipts and presence, and token refresh. Each of those first asks the
//! server whether it has the feature and fails with a message naming it
//! when it does not.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream as StdTcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Ended, Server};
use fantoccini::{Client, Locator, error::CmdError, wd::WebDriverCompatibleCommand, wd::WindowHandle};
use reqwest::{Method, Url};
use serde::Deserialize;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);
const RECONNECT_WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);
const DM: &str = "dm:alice:bob";

/// One browser test at a time: each runs a server, chromedriver and Chromium
/// processes, and the latency checks assume a quiet machine.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(())).lock().await
}

// ------------------------------------------------------------------ relay

/// A TCP relay in front of a server. The pages load and connect through it,
/// so a test can keep them away (connections are refused) while it prepares
/// the server behind, then point it at another server process.
struct Relay {
    port: u16,
    backend: Arc<Mutex<std::net::SocketAddr>>,
    open: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(backend: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let backend = Arc::new(Mutex::new(backend));
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (b, o) = (backend.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the browser sees the connection fail
                }
                let to = *b.lock().unwrap();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Relay { port, backend, open, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn hold(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn release(&self, backend: std::net::SocketAddr) {
        *self.backend.lock().unwrap() = backend;
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts");
    std::fs::create_dir_all(&dir).expect("create tests/artifacts");
    dir
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{}-{nanos}", std::process::id())
}

// ------------------------------------------------------------ chromedriver

/// A chromedriver process on a free port. Dropping it ends every session it
/// still has (so Chromium quits), then kills chromedriver and anything left
/// in its process group.
struct Chromedriver {
    child: Child,
    port: u16,
    url: String,
    chrome: String,
    http: reqwest::Client,
    sessions: Arc<Mutex<Vec<String>>>,
    profiles: Mutex<Vec<PathBuf>>,
}

fn require_binary(env_var: &str, default: &str) -> String {
    let path = std::env::var(env_var).unwrap_or_else(|_| default.to_string());
    assert!(
        Path::new(&path).exists(),
        "{path} not found: the browser test needs Chromium and chromedriver \
         (run `apt-get install chromium chromium-driver`, or set ${env_var})"
    );
    path
}

impl Chromedriver {
    async fn start() -> Chromedriver {
        let chrome = require_binary("CHROME_BIN", "/usr/bin/chromium");
        let driver = require_binary("CHROMEDRIVER", "/usr/bin/chromedriver");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(artifacts().join("chromedriver.log")).unwrap();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&driver)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {driver}: {e} (apt-get install chromium chromium-driver)"))
        };
        let mut cd = Chromedriver {
            child,
            port,
            url: format!("http://127.0.0.1:{port}"),
            chrome,
            http: common::http_client(),
            sessions: Arc::default(),
            profiles: Mutex::default(),
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(r) = cd.http.get(format!("{}/status", cd.url)).send().await
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == true
            {
                return cd;
            }
            if let Some(status) = cd.child.try_wait().unwrap() {
                panic!("chromedriver exited ({status}); see tests/artifacts/chromedriver.log");
            }
            assert!(Instant::now() < deadline, "chromedriver did not answer on port {port} within {WAIT:?}");
            tokio::time::sleep(POLL).await;
        }
    }

    /// A new headless Chromium with its own fresh profile.
    async fn browser(&self, name: &'static str) -> Browser {
        let profile = std::env::temp_dir().join(format!("crm-chat-browser-{name}-{}", unique_suffix()));
        std::fs::create_dir_all(&profile).unwrap();
        self.profiles.lock().unwrap().push(profile.clone());
        let Value::Object(caps) = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": self.chrome,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }) else {
            unreachable!()
        };
        let client = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("new session for {name}: {e}"));
        let id = client.session_id().await.unwrap().unwrap_or_else(|| panic!("new session for {name}: no id"));
        self.sessions.lock().unwrap().push(id.clone());
        Browser { name, client, id, sessions: self.sessions.clone(), console: Mutex::default() }
    }
}

/// `DELETE /session/{id}` with plain std I/O (usable inside `Drop`).
fn delete_session_blocking(port: u16, id: &str) {
    let Ok(mut s) = StdTcpStream::connect(("127.0.0.1", port)) else { return };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = format!(
        "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return;
    }
    // chromedriver keeps the connection open: read exactly one response.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            return;
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        for id in self.sessions.lock().unwrap().drain(..) {
            delete_session_blocking(self.port, &id);
        }
        // chromedriver and whatever is left in its process group (Chromium,
        // after a failed quit); the group id is chromedriver's pid, not yet reaped.
        let _ =
            Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in self.profiles.lock().unwrap().drain(..) {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

// ----------------------------------------------------------------- browser

#[derive(Debug, Clone)]
struct ConsoleEntry {
    level: String,
    source: String,
    message: String,
}

/// One WebDriver session (one Chromium).
struct Browser {
    name: &'static str,
    client: Client,
    id: String,
    sessions: Arc<Mutex<Vec<String>>>,
    /// Every console entry read so far (chromedriver hands each out once).
    console: Mutex<Vec<ConsoleEntry>>,
}

/// A message as the page shows it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
struct Shown {
    seq: Option<String>,
    conversation: String,
    sender: String,
    body: String,
    ticks: Option<String>,
    cmid: Option<String>,
}

const SHOWN_JS: &str = "return [...document.querySelectorAll('#messages li.msg')].map((li) => ({
    seq: li.dataset.seq ?? null, conversation: li.dataset.conversation, sender: li.dataset.sender,
    body: li.querySelector('.body').textContent,
    ticks: li.querySelector('.ticks') ? li.querySelector('.ticks').dataset.ticks : null,
    cmid: li.dataset.clientMsgId ?? null }));";

/// Records, inside the page, when each message body first appeared, every
/// tick state each message went through and when #send was clicked
/// (Date.now(): both browsers run on this machine, so the clocks agree).
const RECORDER_JS: &str = "if (!window.__e2e) {
  const e2e = window.__e2e = { seen: {}, ticks: [], clicks: [] };
  const scan = () => {
    for (const li of document.querySelectorAll('#messages li.msg')) {
      const text = li.querySelector('.body').textContent;
      if (!(text in e2e.seen)) e2e.seen[text] = Date.now();
      const t = li.querySelector('.ticks');
      if (t && t.dataset.ticks && li.__e2eTicks !== t.dataset.ticks) {
        li.__e2eTicks = t.dataset.ticks;
        e2e.ticks.push([text, t.dataset.ticks]);
      }
    }
  };
  new MutationObserver(scan).observe(document.getElementById('messages'),
    { subtree: true, childList: true, attributes: true, characterData: true });
  document.addEventListener('click', (ev) => {
    if (ev.target.closest && ev.target.closest('#send')) e2e.clicks.push(Date.now());
  }, true);
  scan();
}
return true;";

fn truthy(v: &Value) -> bool {
    !matches!(v, Value::Null | Value::Bool(false)) && v != &json!(0) && v != &json!("")
}

/// chromedriver's `POST /session/{id}/se/log {"type": "browser"}`: the
/// browser console entries since the last call.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &Url, session: Option<&str>) -> Result<Url, <Url as std::str::FromStr>::Err> {
        base.join(&format!("session/{}/se/log", session.expect("a WebDriver session")))
    }

    fn method_and_body(&self, _: &Url) -> (Method, Option<String>) {
        (Method::POST, Some(json!({"type": "browser"}).to_string()))
    }
}

impl Browser {
    /// The result of a WebDriver command, or a panic naming the browser.
    fn ok<T>(&self, what: &str, r: Result<T, CmdError>) -> T {
        r.unwrap_or_else(|e| panic!("{}: webdriver {what}: {e}", self.name))
    }

    async fn goto(&self, url: &str) {
        self.ok("goto", self.client.goto(url).await);
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page.
    async fn js(&self, script: &str, args: Value) -> Value {
        let Value::Array(args) = args else { panic!("js args must be an array: {args}") };
        self.ok("execute", self.client.execute(script, args).await)
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{}: no element {css}: {e}", self.name))
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.ok("click", el.click().await);
    }

    /// Types like a user (real key events, so `input` handlers run).
    async fn type_text(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.ok("send keys", el.send_keys(text).await);
    }

    async fn screenshot(&self, path: &Path) {
        let png = self.ok("screenshot", self.client.screenshot().await);
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    async fn snap(&self, file: &str) {
        self.screenshot(&artifacts().join(file)).await;
    }

    /// Polls `script` every 50 ms until it returns something truthy.
    async fn wait_js(&self, what: &str, script: &str, args: Value, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.js(script, args.clone()).await;
            if truthy(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                let shot = artifacts().join(format!("browser-failure-{}.png", self.name));
                self.screenshot(&shot).await;
                panic!("{}: no {what} within {within:?} (last: {v}); screenshot {}", self.name, shot.display());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_state(&self, state: &str, within: Duration) {
        self.wait_js(
            &format!("#conn-state[data-state={state}]"),
            "return document.getElementById('conn-state').dataset.state === arguments[0];",
            json!([state]),
            within,
        )
        .await;
    }

    /// Reads the browser console (chromedriver's log endpoint) into `console`.
    async fn read_console(&self) -> Vec<ConsoleEntry> {
        let v = self.ok("se/log", self.client.issue_cmd(BrowserLog).await);
        let mut all = self.console.lock().unwrap();
        for e in v.as_array().expect("log entries") {
            all.push(ConsoleEntry {
                level: e["level"].as_str().unwrap_or_default().to_string(),
                source: e["source"].as_str().unwrap_or_default().to_string(),
                message: e["message"].as_str().unwrap_or_default().to_string(),
            });
        }
        all.clone()
    }

    /// The `Chat WebSocket Connected` console lines so far, each checked for
    /// its `%c` style: chromedriver renders a console.info call as
    /// `<url> <line:col> "%cChat WebSocket Connected" "color: green; ..."`.
    async fn connected_logs(&self) -> usize {
        let mut n = 0;
        for e in self.read_console().await {
            let Some(at) = e.message.find("\"%cChat WebSocket Connected\"") else { continue };
            let style = &e.message[at + "\"%cChat WebSocket Connected\"".len()..];
            assert_eq!(e.level, "INFO", "{}: {e:?}", self.name);
            assert_eq!(e.source, "console-api", "{}: {e:?}", self.name);
            assert!(style.contains("color: green"), "{}: connected log without a green style: {e:?}", self.name);
            n += 1;
        }
        n
    }

    async fn wait_connected_logs(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let have = self.connected_logs().await;
            if have >= n {
                assert_eq!(have, n, "{}: more 'Chat WebSocket Connected' lines than connections", self.name);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {have} 'Chat WebSocket Connected' console lines, expected {n}; console: {:?}",
                self.name,
                self.console.lock().unwrap()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn shown(&self) -> Vec<Shown> {
        serde_json::from_value(self.js(SHOWN_JS, json!([])).await).unwrap()
    }

    async fn wait_body(&self, body: &str) -> Shown {
        self.wait_js(
            &format!("message {body:?}"),
            "return [...document.querySelectorAll('#messages li.msg .body')].some((b) => b.textContent === arguments[0]);",
            json!([body]),
            WAIT,
        )
        .await;
        self.shown().await.into_iter().find(|m| m.body == body).unwrap()
    }

    async fn wait_ticks(&self, body: &str, state: &str) {
        self.wait_js(
            &format!("ticks={state} on {body:?}"),
            "const li = [...document.querySelectorAll('#messages li.msg')]
               .find((li) => li.querySelector('.body').textContent === arguments[0]);
             const t = li && li.querySelector('.ticks');
             return !!t && t.dataset.ticks === arguments[1];",
            json!([body, state]),
            WAIT,
        )
        .await;
    }

    /// The tick states a message went through, in order, as the recorder saw them.
    async fn tick_history(&self, body: &str) -> Vec<String> {
        let all = self.js("return window.__e2e.ticks;", json!([])).await;
        let mut out: Vec<String> = Vec::new();
        for pair in all.as_array().unwrap() {
            if pair[0] == body {
                let s = pair[1].as_str().unwrap().to_string();
                if out.last() != Some(&s) {
                    out.push(s);
                }
            }
        }
        out
    }

    /// Signs in through the dev form and waits for the connection.
    async fn login(&self, server: &Server, user: &str, name: &str) {
        self.login_at(&server.url("/"), user, name).await;
    }

    /// Like `login`, with the page at `url` (e.g. through a relay).
    async fn login_at(&self, url: &str, user: &str, name: &str) {
        self.goto(url).await;
        self.wait_js("the sign-in form", "return !document.getElementById('login-view').hidden;", json!([]), WAIT)
            .await;
        self.type_text("#login-user", user).await;
        self.type_text("#login-name", name).await;
        self.click("#login-submit").await;
        self.wait_state("connected", WAIT).await;
        self.wait_js(
            "the signed-in name",
            "return document.getElementById('whoami').textContent.includes(arguments[0]);",
            json!([user]),
            WAIT,
        )
        .await;
    }

    /// Opens a conversation listed in the sidebar and waits until it is loaded.
    async fn open_listed(&self, id: &str) {
        self.click(&format!("#conversations li[data-conversation='{id}'] button")).await;
        self.wait_js(
            "the conversation, loaded",
            "const li = document.querySelector(`#conversations li[data-conversation='${arguments[0]}']`);
             return !!li && li.querySelector('button').getAttribute('aria-current') === 'true'
               && !document.getElementById('composer').disabled
               && document.getElementById('history-status').textContent !== 'Loading…';",
            json!([id]),
            WAIT,
        )
        .await;
        self.js(RECORDER_JS, json!([])).await;
    }

    /// Opens the direct conversation with `other` through the sidebar form.
    async fn open_dm(&self, other: &str) {
        self.type_text("#dm-user", other).await;
        self.click("#dm-open").await;
        self.wait_js(
            "the direct conversation, loaded",
            "const li = document.querySelector(`#conversations li[data-conversation='${arguments[0]}']`);
             return !!li && li.querySelector('button').getAttribute('aria-current') === 'true'
               && !document.getElementById('composer').disabled
               && document.getElementById('history-status').textContent !== 'Loading…';",
            json!([DM]),
            WAIT,
        )
        .await;
        self.js(RECORDER_JS, json!([])).await;
    }

    async fn send(&self, body: &str) {
        self.type_text("#composer", body).await;
        self.click("#send").await;
    }

    async fn window(&self) -> WindowHandle {
        self.ok("window", self.client.window().await)
    }

    async fn new_tab(&self) -> WindowHandle {
        self.ok("new tab", self.client.new_window(true).await).handle
    }

    async fn switch_to(&self, handle: &WindowHandle) {
        self.ok("switch to window", self.client.switch_to_window(handle.clone()).await);
    }

    async fn has_focus(&self) -> bool {
        self.js("return document.hasFocus();", json!([])).await == true
    }

    async fn quit(self) {
        let _ = self.client.close().await;
        self.sessions.lock().unwrap().retain(|s| s != &self.id);
    }
}

/// Computed style of the first element matching `css`.
async fn computed(b: &Browser, css: &str, prop: &str) -> String {
    let v = b
        .js(
            "const el = document.querySelector(arguments[0]);
             return el ? getComputedStyle(el).getPropertyValue(arguments[1]) : null;",
            json!([css, prop]),
        )
        .await;
    v.as_str().unwrap_or_else(|| panic!("{}: no element {css}", b.name)).to_string()
}

fn parse_rgb(s: &str) -> (u8, u8, u8) {
    let inner = s.trim().trim_start_matches("rgba(").trim_start_matches("rgb(").trim_end_matches(')');
    let n: Vec<u8> = inner.split(',').take(3).map(|p| p.trim().parse().unwrap()).collect();
    (n[0], n[1], n[2])
}

/// Every page shows each stored message once, in seq order, as stored.
fn assert_matches_server(who: &str, shown: &[Shown], stored: &[Value]) {
    let seen: Vec<(Option<String>, &str)> = shown.iter().map(|m| (m.seq.clone(), m.body.as_str())).collect();
    let want: Vec<(Option<String>, &str)> =
        stored.iter().map(|m| (Some(m["seq"].to_string()), m["body"].as_str().unwrap())).collect();
    assert_eq!(seen, want, "{who}'s page differs from the server's history");
}

// -------------------------------------------------------------------- test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_chat_through_a_server_restart() {
    let _serial = serial().await;
    let started = Instant::now();
    let mut server = Server::start(&[]).await;
    let port = server.addr.port();
    let driver = Chromedriver::start().await;
    let (alice, bob) = tokio::join!(driver.browser("alice"), driver.browser("bob"));

    // 1-2. Dev sign-in; the console greets each connection in green.
    tokio::join!(alice.login(&server, "alice", "Alice"), bob.login(&server, "bob", "Bob"));
    alice.wait_connected_logs(1).await;
    bob.wait_connected_logs(1).await;

    // 3. Both open dm:alice:bob from the sidebar form.
    tokio::join!(alice.open_dm("bob"), bob.open_dm("alice"));
    for b in [&alice, &bob] {
        let title = b.js("return document.getElementById('conv-title').textContent;", json!([])).await;
        let other = if b.name == "alice" { "bob" } else { "alice" };
        assert!(title.as_str().unwrap().eq_ignore_ascii_case(other), "{}: title {title}", b.name);
    }
    // Headless Chromium gives each browser's only tab the focus, which the
    // page needs to send `read` (document.hasFocus()).
    assert!(bob.has_focus().await, "bob's page should have focus");

    // 4. alice -> bob: typing indicator, then the message within 1 s.
    let m1 = "Hi Bob! Did Acme send the signed contract back?";
    alice.type_text("#composer", m1).await;
    bob.wait_js(
        "the typing indicator",
        "return document.getElementById('typing').textContent.includes('typing');",
        json!([]),
        WAIT,
    )
    .await;
    let clicked = Instant::now();
    alice.click("#send").await;
    bob.wait_body(m1).await;
    let outer = clicked.elapsed();
    let click_ms = alice.js("return window.__e2e.clicks[window.__e2e.clicks.length - 1];", json!([])).await;
    let seen_ms = bob.js("return window.__e2e.seen[arguments[0]];", json!([m1])).await;
    let latency = seen_ms.as_i64().unwrap() - click_ms.as_i64().unwrap();
    println!(
        "send -> display: {latency} ms in the pages (click on alice's #send to the element in bob's DOM); {outer:?} as seen through WebDriver polling"
    );
    assert!((0..1000).contains(&latency), "bob saw the message {latency} ms after alice clicked send");
    assert!(outer < Duration::from_secs(1), "bob's page showed the message {outer:?} after the click");
    let shown = bob.shown().await;
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!((shown[0].conversation.as_str(), shown[0].sender.as_str()), (DM, "alice"));
    assert_eq!(shown[0].ticks, None, "ticks only on own messages");
    bob.wait_js(
        "the typing indicator to clear",
        "return document.getElementById('typing').textContent === '';",
        json!([]),
        WAIT,
    )
    .await;
    // bob's page is visible and focused on the conversation: read at once.
    alice.wait_ticks(m1, "read").await;

    let m2 = "Yes, this morning. It is attached to deal #42.";
    bob.send(m2).await;
    alice.wait_body(m2).await;
    bob.wait_ticks(m2, "read").await;

    // 5. One tick when stored, two when bob has it, two blue when he read it.
    // bob switches to another tab: his chat tab loses focus (document.hasFocus()
    // turns false and 'blur' fires), so his page receives but does not read.
    let bob_chat = bob.window().await;
    let bob_other = bob.new_tab().await;
    bob.switch_to(&bob_other).await;
    let m3 = "Great, I will let finance know.";
    alice.send(m3).await;
    alice.wait_ticks(m3, "delivered").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice.wait_ticks(m3, "delivered").await; // still not read
    alice.snap("browser-alice-ticks-delivered.png").await;
    bob.switch_to(&bob_chat).await; // focus comes back: 'focus' event -> read
    assert!(bob.has_focus().await, "bob's chat tab should have the focus back");
    alice.wait_ticks(m3, "read").await;
    let history = alice.tick_history(m3).await;
    assert_eq!(history, ["pending", "sent", "delivered", "read"], "tick states alice's page showed for m3");
    let read_color = parse_rgb(&computed(&alice, "#messages .ticks[data-ticks=read]", "color").await);
    let text_color = parse_rgb(&computed(&alice, "#messages li.msg.own .meta", "color").await);
    println!("read ticks {read_color:?}, other own meta {text_color:?}");
    let (r, g, bl) = read_color;
    assert!(bl >= 200 && bl > r + 80 && bl > g + 50, "read ticks are not blue: {read_color:?}");
    assert_ne!(read_color, text_color);
    alice.snap("browser-alice-ticks.png").await;

    // Unread badge: bob looks at #general while alice writes in the DM.
    bob.click("#conversations li[data-conversation='general'] button").await;
    let m4 = "Also, the Dubai office asked for an Arabic greeting on the portal.";
    alice.send(m4).await;
    alice.wait_ticks(m4, "delivered").await;
    let badge = bob
        .wait_js(
            "an unread badge on the DM",
            "const u = document.querySelector(`#conversations li[data-conversation='${arguments[0]}'] .unread`);
             return u ? u.textContent : null;",
            json!([DM]),
            WAIT,
        )
        .await;
    assert_eq!(badge, "1");
    bob.click(&format!("#conversations li[data-conversation='{DM}'] button")).await;
    bob.wait_body(m4).await;
    alice.wait_ticks(m4, "read").await;
    bob.wait_js(
        "the unread badge to go",
        "return !document.querySelector(`#conversations li[data-conversation='${arguments[0]}'] .unread`);",
        json!([DM]),
        WAIT,
    )
    .await;

    // 6. Arabic is laid out right to left; Latin stays left to right.
    let arabic = "مرحبا، كيف حالك؟";
    bob.send(arabic).await;
    alice.wait_body(arabic).await;
    bob.wait_ticks(arabic, "read").await;
    for b in [&alice, &bob] {
        let v = b
            .js(
                "return [...document.querySelectorAll('#messages li.msg .body')].map((el) =>
                   [el.textContent, el.getAttribute('dir'), getComputedStyle(el).direction]);",
                json!([]),
            )
            .await;
        for row in v.as_array().unwrap() {
            assert_eq!(row[1], "auto", "{}: {row}", b.name);
            let want = if row[0] == arabic { "rtl" } else { "ltr" };
            assert_eq!(row[2], want, "{}: {row}", b.name);
        }
    }
    bob.snap("browser-bob-arabic.png").await;
    // Without the composer's focus ring, for the README.
    alice.js("document.activeElement.blur(); return true;", json!([])).await;
    alice.snap("browser-alice-conversation.png").await;
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshot.png");
    if !docs.exists() || std::env::var_os("UPDATE_DOCS_SCREENSHOT").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(docs.parent().unwrap()).unwrap();
        alice.screenshot(&docs).await;
    }

    // Bodies are text, never markup.
    let markup = "<b>not bold</b> & <img src=x onerror=alert(1)>";
    alice.send(markup).await;
    bob.wait_body(markup).await;
    let children = bob
        .js(
            "const b = [...document.querySelectorAll('#messages li.msg .body')].find((b) => b.textContent === arguments[0]);
             return b.children.length;",
            json!([markup]),
        )
        .await;
    assert_eq!(children, 0, "a message body was parsed as HTML");
    alice.wait_ticks(markup, "read").await;

    let before: Vec<Value> = {
        let (s, v) =
            server.api(reqwest::Method::GET, &format!("/api/v1/conversations/{DM}/messages?after=0"), None).await;
        assert_eq!(s, 200, "{v}");
        v["messages"].as_array().unwrap().clone()
    };
    assert_eq!(before.len(), 6);
    assert_matches_server("alice", &alice.shown().await, &before);
    assert_matches_server("bob", &bob.shown().await, &before);
    for b in [&alice, &bob] {
        let problems: Vec<ConsoleEntry> =
            b.read_console().await.into_iter().filter(|e| e.level != "INFO" && e.level != "DEBUG").collect();
        assert!(problems.is_empty(), "{}: console warnings/errors before the restart: {problems:?}", b.name);
    }

    // 7. Restart: SIGTERM drains (close 1012), exit 0; both pages notice.
    server.signal("TERM");
    tokio::join!(alice.wait_state("reconnecting", WAIT), bob.wait_state("reconnecting", WAIT));
    assert_eq!(server.wait_exit(WAIT).await, Some(0), "crm-chat exit code after SIGTERM");
    let down_at = Instant::now();

    // alice writes while the server is down: the outbox holds it.
    let gap = "Sent while the server was down.";
    alice.send(gap).await;
    let pending = alice.wait_body(gap).await;
    assert_eq!(pending.ticks.as_deref(), Some("pending"));
    assert_eq!(pending.seq, None);
    let gap_cmid = pending.cmid.clone().expect("client_msg_id on the pending message");
    alice.snap("browser-alice-offline.png").await;

    // A new process on the same port (the embedded engine starts empty).
    let listen = format!("127.0.0.1:{port}");
    let server = Server::start(&[("CHAT_SERVER__LISTEN", &listen)]).await;
    assert_eq!(server.addr.port(), port);
    tokio::join!(alice.wait_state("connected", RECONNECT_WAIT), bob.wait_state("connected", RECONNECT_WAIT));
    println!("both pages reconnected {:?} after the old server exited", down_at.elapsed());
    alice.wait_connected_logs(2).await;
    bob.wait_connected_logs(2).await;

    // The gap message: stored once, with the client_msg_id it was first sent with.
    let got = bob.wait_body(gap).await;
    alice.wait_ticks(gap, "read").await;
    let after: Vec<Value> = {
        let (s, v) =
            server.api(reqwest::Method::GET, &format!("/api/v1/conversations/{DM}/messages?after=0"), None).await;
        assert_eq!(s, 200, "{v}");
        v["messages"].as_array().unwrap().clone()
    };
    assert_eq!(after.len(), 1, "the restarted server holds only the gap message: {after:?}");
    assert_eq!(after[0]["client_msg_id"], gap_cmid.as_str(), "re-sent with the same client_msg_id");
    assert_eq!(got.seq.as_deref(), Some("1"));

    // Then live traffic again.
    let m5 = "Back online, all good.";
    bob.send(m5).await;
    alice.wait_body(m5).await;
    bob.wait_ticks(m5, "read").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let any duplicate show up
    let (s, v) = server.api(reqwest::Method::GET, &format!("/api/v1/conversations/{DM}/messages?after=0"), None).await;
    assert_eq!(s, 200);
    let stored = v["messages"].as_array().unwrap();
    assert_eq!(stored.len(), 2);
    let (a_shown, b_shown) = (alice.shown().await, bob.shown().await);
    println!("after the restart alice shows {a_shown:?}");
    assert_matches_server("alice", &a_shown, stored);
    assert_matches_server("bob", &b_shown, stored);
    // The sidebar previews follow too (not the last message from before the restart).
    for (b, want) in [(&alice, m5.to_string()), (&bob, format!("You: {m5}"))] {
        let preview = b
            .js(
                "return document.querySelector(`#conversations li[data-conversation='${arguments[0]}'] .preview`).textContent;",
                json!([DM]),
            )
            .await;
        assert_eq!(preview, want.as_str(), "{}'s sidebar preview", b.name);
    }
    alice.snap("browser-reconnected.png").await;
    bob.snap("browser-reconnected-bob.png").await;

    tokio::join!(alice.quit(), bob.quit());
    drop(driver);
    println!("browser test took {:?}", started.elapsed());
}

// ------------------------------------------------------------- v1.1 tests

// ---------------------------------------------------- HTTP streaming fallback

/// Debian's nginx, started with a temporary configuration on an ephemeral
/// port: it refuses every WebSocket upgrade on `/ws/` (403, as a proxy that
/// cannot pass `Upgrade` would fail it) and proxies `/stream/` with response
/// buffering off, as `nginx/` in the repository does.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    fn start(backend: std::net::SocketAddr) -> Nginx {
        let bin = require_binary("NGINX", "/usr/sbin/nginx");
        let dir = std::env::temp_dir().join(format!("crm-chat-nginx-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\nerror_log {d}/error.log warn;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port};\n\
                 location /ws/ {{ return 403; }}\n\
                 location /stream/ {{\n      proxy_pass http://{backend};\n      proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n      proxy_set_header Host $http_host;\n\
                   proxy_buffering off;\n      proxy_request_buffering off;\n      proxy_read_timeout 1h;\n    }}\n\
                 location / {{\n      proxy_pass http://{backend};\n      proxy_set_header Host $http_host;\n    }}\n\
               }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(bin)
            .args(["-e", &format!("{d}/error.log"), "-p", &d.to_string(), "-c", &path.display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        let deadline = Instant::now() + WAIT;
        while StdTcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen on {port}");
            std::thread::sleep(POLL);
        }
        Nginx { child, port, dir }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Browser {
    /// The `Chat connected over HTTP streaming` console lines (green), and
    /// the WebSocket ones.
    async fn transport_logs(&self) -> (usize, usize) {
        let (mut http, mut ws) = (0, 0);
        for e in self.read_console().await {
            if let Some(at) = e.message.find("\"%cChat connected over HTTP streaming\"") {
                let style = &e.message[at..];
                assert!(style.contains("color: green"), "{}: HTTP streaming log without green: {e:?}", self.name);
                assert_eq!(e.level, "INFO", "{}: {e:?}", self.name);
                http += 1;
            }
            if e.message.contains("\"%cChat WebSocket Connected\"") {
                ws += 1;
            }
        }
        (http, ws)
    }
}

/// PROTOCOL v1.2: behind a proxy that refuses WebSocket upgrades, the demo
/// page still signs in (after two failed upgrades, over HTTP streaming),
/// says so in green on the console, sends, and shows both ticks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_chats_over_http_streaming_when_nginx_refuses_websockets() {
    let _serial = serial().await;
    let server = Server::start(&[]).await;
    let nginx = Nginx::start(server.addr);
    let refused = reqwest::get(nginx.url("/ws/chat")).await.unwrap().status();
    assert_eq!(refused, 403, "the proxy refuses /ws/");
    let driver = Chromedriver::start().await;
    let (alice, bob) = tokio::join!(driver.browser("alice"), driver.browser("bob"));
    let page = nginx.url("/");
    tokio::join!(alice.login_at(&page, "alice", "Alice"), bob.login_at(&page, "bob", "Bob"));
    for b in [&alice, &bob] {
        let (http, ws) = b.transport_logs().await;
        assert_eq!((http, ws), (1, 0), "{}: console {:?}", b.name, b.console.lock().unwrap());
        let t = b.js("return window.__chat ? window.__chat.transport : null;", json!([])).await;
        assert!(t.is_null() || t == "http", "{t}");
    }
    tokio::join!(alice.open_dm("bob"), bob.open_dm("alice"));
    let m1 = "Sent over HTTP streaming through nginx";
    alice.send(m1).await;
    bob.wait_body(m1).await;
    alice.wait_ticks(m1, "read").await;
    let history = alice.tick_history(m1).await;
    assert!(history.ends_with(&["read".to_string()]), "{history:?}");
    let m2 = "And back";
    bob.send(m2).await;
    alice.wait_body(m2).await;
    bob.wait_ticks(m2, "read").await;
    alice.snap("browser-http-streaming.png").await;
    let m = server.metrics().await;
    assert!(
        m.lines().any(|l| l.starts_with("chat_connections{") && l.contains("transport=\"http\"") && l.ends_with(" 2")),
        "two sessions over HTTP streaming:\n{m}"
    );
    tokio::join!(alice.quit(), bob.quit());
}

/// Fails the test naming a server feature of PROTOCOL v1.1 that is missing,
/// so a red run says what the server lacks rather than timing out somewhere.
fn server_lacks(feature: &str, detail: impl std::fmt::Display) -> ! {
    panic!(
        "the server does not implement {feature} (PROTOCOL.md v1.1), which this browser check needs: {detail}. \
         This is a server (src/) gap, not a client failure."
    )
}

/// Whether the binary accepts these settings (`--print-config` shows each key).
fn require_settings(env: &[(&str, &str)], keys: &[&str]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crm-chat"));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).arg("--print-config");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run crm-chat --print-config");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() || keys.iter().any(|k| !text.contains(k)) {
        let names: Vec<&str> = env.iter().map(|(k, _)| *k).collect();
        server_lacks(&format!("the settings {keys:?}"), format!("crm-chat --print-config with {names:?}: {text}"));
    }
}

/// The epoch `dm:alice:bob` has on `server`: from the service API's list for
/// alice, else from a welcome (a short extra connection of alice).
async fn dm_epoch(server: &Server) -> String {
    let (s, v) = server.api(Method::GET, "/api/v1/users/alice/conversations", None).await;
    assert_eq!(s, 200, "{v}");
    let entry = v["conversations"].as_array().and_then(|l| l.iter().find(|c| c["id"] == DM)).cloned();
    if let Some(e) = entry.as_ref().and_then(|e| e["epoch"].as_str()) {
        return e.to_string();
    }
    let c = server.client("alice").await;
    let epoch = c.conversation(DM).and_then(|e| e["epoch"].as_str()).map(str::to_string);
    c.close().await;
    epoch.unwrap_or_else(|| server_lacks("conversation epochs", format!("no `epoch` for {DM} in {entry:?}")))
}

async fn stored_messages(server: &Server, conversation: &str) -> Vec<Value> {
    let (s, v) = server.api(Method::GET, &format!("/api/v1/conversations/{conversation}/messages?after=0"), None).await;
    assert_eq!(s, 200, "{v}");
    v["messages"].as_array().unwrap().clone()
}

/// The real `chat.js` in a page, against a server scripted in the page
/// (`tests/browser_chatjs.js`): every v1.1 frame form on demand, whatever
/// the real server implements yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_js_against_a_scripted_server() {
    let _serial = serial().await;
    let server = Server::start(&[]).await;
    let driver = Chromedriver::start().await;
    let b = driver.browser("scripted").await;
    b.goto(&server.url("/")).await;
    let timeouts = fantoccini::wd::TimeoutConfiguration::new(Some(Duration::from_secs(90)), None, None);
    b.ok("timeouts", b.client.update_timeouts(timeouts).await);
    let script = include_str!("browser_chatjs.js");
    let results = b.ok("execute_async", b.client.execute_async(script, vec![json!("/static/chat.js")]).await);
    let results = results.as_array().unwrap_or_else(|| panic!("no results: {results}"));
    let mut failed = Vec::new();
    for r in results {
        let ok = r["ok"] == true;
        println!(
            "chat.js {}: {} ({})",
            if ok { "ok" } else { "FAILED" },
            r["name"],
            r["detail"].as_str().unwrap_or("")
        );
        if !ok {
            failed.push(r.clone());
        }
    }
    assert!(results.len() >= 6, "{results:?}");
    assert!(failed.is_empty(), "chat.js against the scripted server: {failed:#?}");
    b.quit().await;
}

/// The embedded engine restarts empty with a new epoch. The pages are kept
/// away (relay) until the new history is longer than their copy, so no
/// "last_seq went down" can give the loss away: only the epoch does. Both
/// pages must drop their copy and show exactly the new history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_epoch_replaces_the_pages_copy() {
    let _serial = serial().await;
    let mut first = Server::start(&[]).await;
    let relay = Relay::start(first.addr).await;
    let driver = Chromedriver::start().await;
    let (alice, bob) = tokio::join!(driver.browser("alice"), driver.browser("bob"));
    let page = relay.url("/");
    tokio::join!(alice.login_at(&page, "alice", "Alice"), bob.login_at(&page, "bob", "Bob"));
    tokio::join!(alice.open_dm("bob"), bob.open_dm("alice"));
    let old = ["Epoch one, first message.", "Epoch one, second message."];
    for m in old {
        alice.send(m).await;
        bob.wait_body(m).await;
        alice.wait_ticks(m, "read").await;
    }
    let epoch1 = dm_epoch(&first).await;

    relay.hold();
    first.signal("TERM");
    tokio::join!(alice.wait_state("reconnecting", WAIT), bob.wait_state("reconnecting", WAIT));
    assert_eq!(first.wait_exit(WAIT).await, Some(0), "crm-chat exit code after SIGTERM");
    let second = Server::start(&[]).await;
    let new = ["Epoch two: one.", "Epoch two: two.", "Epoch two: three."];
    for (i, body) in new.iter().enumerate() {
        let sender = if i % 2 == 0 { "alice" } else { "bob" };
        let (s, v) = second
            .api(
                Method::POST,
                &format!("/api/v1/conversations/{DM}/messages"),
                Some(json!({"sender": sender, "body": body, "client_msg_id": format!("epoch2-{i}")})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let epoch2 = dm_epoch(&second).await;
    println!("epochs of {DM}: {epoch1:?} before the restart, {epoch2:?} after");
    assert_ne!(epoch1, epoch2, "a restarted embedded engine must announce a new epoch");
    assert!(new.len() > old.len(), "the new history must outgrow the pages' copy");

    relay.release(second.addr);
    tokio::join!(alice.wait_state("connected", RECONNECT_WAIT), bob.wait_state("connected", RECONNECT_WAIT));
    tokio::join!(alice.wait_body(new[2]), bob.wait_body(new[2]));
    tokio::time::sleep(Duration::from_millis(300)).await; // let any stale message show up
    let stored = stored_messages(&second, DM).await;
    assert_matches_server("alice", &alice.shown().await, &stored);
    assert_matches_server("bob", &bob.shown().await, &stored);

    // Live traffic in the new epoch: seq 4, ticks as usual.
    let live = "And live traffic in the new epoch.";
    bob.send(live).await;
    alice.wait_body(live).await;
    bob.wait_ticks(live, "read").await;
    let stored = stored_messages(&second, DM).await;
    assert_eq!(stored.len(), 4);
    assert_matches_server("alice", &alice.shown().await, &stored);
    assert_matches_server("bob", &bob.shown().await, &stored);
    alice.snap("browser-epoch-alice.png").await;
    tokio::join!(alice.quit(), bob.quit());
}

/// With `limits.batch_members = 1` a group of two counts as large: presence
/// and receipts reach it batched (`changes`, `receipts`; direct conversations
/// never are). The page must still show who is online and one, two and two
/// blue ticks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_receipts_and_presence() {
    let _serial = serial().await;
    let env = [("CHAT_LIMITS__BATCH_MEMBERS", "1"), ("CHAT_LIMITS__BATCH_INTERVAL_MS", "200")];
    require_settings(&env, &["batch_members", "batch_interval_ms"]);
    let server = Server::start(&env).await;
    const GROUP: &str = "deal-42";
    server.put_group(GROUP, &["alice", "bob"]).await;
    let driver = Chromedriver::start().await;
    let alice = driver.browser("alice").await;
    alice.login(&server, "alice", "Alice").await;
    alice.open_listed(GROUP).await;
    let sub = "return document.getElementById('conv-sub').textContent;";
    let online = "return document.getElementById('conv-sub').textContent.endsWith(arguments[0]);";
    alice.wait_js("alice alone online in the group", online, json!(["1 online"]), WAIT).await;
    // alice's second connection sees the frames her page gets.
    let mut watcher = server.client("alice").await;

    let mut bob = server.client("bob").await;
    alice.wait_js("bob online in alice's page", online, json!(["2 online"]), WAIT).await;
    let in_group = |v: &Value| common::is_presence(v) && v["conversation"] == GROUP;
    let p = watcher.expect("a presence push in the group", in_group).await;
    if !p["changes"].is_array() {
        server_lacks(
            "batched presence (`changes`)",
            format!("presence push in a group of 2 with batch_members=1: {p}"),
        );
    }

    let m = "Batched receipts, please.";
    alice.send(m).await;
    let msg = bob.expect("alice's message", |v| v["type"] == "message" && v["body"] == m).await;
    let seq = msg["seq"].as_u64().unwrap();
    alice.wait_ticks(m, "sent").await;
    bob.send(json!({"type": "delivered", "conversation": GROUP, "seq": seq})).await;
    alice.wait_ticks(m, "delivered").await;
    bob.send(json!({"type": "read", "conversation": GROUP, "seq": seq})).await;
    alice.wait_ticks(m, "read").await;
    assert_eq!(alice.tick_history(m).await, ["pending", "sent", "delivered", "read"]);
    let names_bob = |v: &Value| {
        v["type"] == "receipt"
            && v["conversation"] == GROUP
            && (v["user"] == "bob" || v["receipts"].as_array().is_some_and(|l| l.iter().any(|r| r["user"] == "bob")))
    };
    let r = watcher.expect("a receipt naming bob", names_bob).await;
    if !r["receipts"].is_array() {
        server_lacks(
            "batched receipts (`receipts`)",
            format!("receipt push in a group of 2 with batch_members=1: {r}"),
        );
    }

    bob.close().await;
    alice.wait_js("bob offline in alice's page", online, json!(["1 online"]), WAIT).await;
    let gone = watcher.expect("bob's offline push", |v| in_group(v) && v.to_string().contains("bob")).await;
    assert!(gone["changes"].is_array(), "{gone}");
    println!("alice's header: {}", alice.js(sub, json!([])).await);
    assert_eq!(alice.connected_logs().await, 1);
    alice.snap("browser-batched-alice.png").await;
    watcher.close().await;
    alice.quit().await;
}

/// Dev tokens that live 5 s: a connection that does not refresh is closed
/// with 4001 at expiry, the page's connection refreshes and stays; the
/// service API's `disconnect` (4001) makes the page get a new token and
/// come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refresh_keeps_the_page_connected() {
    let _serial = serial().await;
    const TTL_S: u64 = 5;
    let env = [("CHAT_AUTH__DEV_TOKEN_TTL_S", TTL_S.to_string()), ("CHAT_LIMITS__MAX_BODY_CHARS", "60".to_string())];
    let server = Server::start(&env.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>()).await;
    let control = server.client("carol").await;
    if !control.welcome["exp"].is_u64() {
        server_lacks("`exp` in welcome", &control.welcome);
    }
    let control_start = Instant::now();
    let driver = Chromedriver::start().await;
    let alice = driver.browser("alice").await;
    alice.login(&server, "alice", "Alice").await;
    let alice_start = Instant::now();
    alice.wait_connected_logs(1).await;

    // A session that does not refresh ends at expiry (the server's leeway aside).
    let within = Duration::from_secs(TTL_S + 40);
    let mut control = control;
    let ended = match tokio::time::timeout(within, control.until_closed(within + WAIT)).await {
        Ok((_, ended)) => ended,
        Err(_) => server_lacks("closing sessions at token expiry", format!("still open after {within:?}")),
    };
    let lag = control_start.elapsed();
    println!("the session without refresh ended {ended:?} after {lag:?} (token lifetime {TTL_S} s)");
    if ended != Ended::Close(4001) {
        server_lacks("close 4001 at token expiry", format!("{ended:?}"));
    }
    // alice's first token is now as dead as carol's: she is still here only by refresh.
    let alive_until = alice_start + lag + Duration::from_secs(2);
    tokio::time::sleep_until(alive_until.into()).await;
    assert_eq!(
        alice.js("return document.getElementById('conn-state').dataset.state;", json!([])).await,
        "connected",
        "alice's page past her first token's expiry"
    );
    assert_eq!(alice.connected_logs().await, 1, "alice reconnected instead of refreshing");
    // The composer takes the server's max_body_chars (60 here) from welcome.
    alice.type_text("#composer", &"x".repeat(61)).await;
    let state = "return [document.getElementById('send').disabled,
                         document.getElementById('composer-error').textContent];";
    let v = alice.js(state, json!([])).await;
    assert_eq!(v[0], true, "send with 61 of 60 characters: {v}");
    assert!(v[1].as_str().unwrap().contains("at most 60 characters"), "{v}");
    alice.type_text("#composer", &char::from(fantoccini::key::Key::Backspace).to_string()).await;
    assert_eq!(alice.js(state, json!([])).await, json!([false, ""]));
    alice.js("document.getElementById('composer').value = ''; return true;", json!([])).await;
    alice.type_text("#composer", "Still here after my first token expired.").await;
    alice.click("#send").await;
    alice.wait_ticks("Still here after my first token expired.", "sent").await;

    // Signed out by the CRM (4001): a new token, then a new connection.
    let (s, v) = server.api(Method::POST, "/api/v1/users/alice/disconnect", None).await;
    if s != 200 {
        server_lacks("POST /api/v1/users/{id}/disconnect", format!("{s} {v}"));
    }
    alice.wait_connected_logs(2).await;
    alice.wait_state("connected", RECONNECT_WAIT).await;
    let problems: Vec<ConsoleEntry> =
        alice.read_console().await.into_iter().filter(|e| e.level != "INFO" && e.level != "DEBUG").collect();
    assert!(problems.is_empty(), "alice: console warnings/errors: {problems:?}");
    alice.quit().await;
}

/// Erasure (PROTOCOL v1.1): the CRM erases alice's messages through the
/// service API. Nothing is pushed; a page that loads the conversation again
/// (bob reloads) shows "message deleted", greyed and italic, in the erased
/// message's place, and keeps bob's own message as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erased_messages_show_as_deleted() {
    let _serial = serial().await;
    let server = Server::start(&[]).await;
    let driver = Chromedriver::start().await;
    let (alice, bob) = tokio::join!(driver.browser("alice"), driver.browser("bob"));
    tokio::join!(alice.login(&server, "alice", "Alice"), bob.login(&server, "bob", "Bob"));
    tokio::join!(alice.open_dm("bob"), bob.open_dm("alice"));
    let secret = "Alice's words, soon erased.";
    alice.send(secret).await;
    bob.wait_body(secret).await;
    let kept = "Bob's answer stays.";
    bob.send(kept).await;
    alice.wait_body(kept).await;

    let (s, v) = server.api(Method::DELETE, "/api/v1/users/alice/messages", None).await;
    assert_eq!((s, &v), (200, &json!({"erased": 1})));
    let stored = stored_messages(&server, DM).await;
    assert_eq!((&stored[0]["deleted"], &stored[0]["body"]), (&json!(true), &json!("")));

    bob.goto(&server.url("/")).await;
    bob.wait_state("connected", WAIT).await;
    bob.open_listed(DM).await;
    bob.wait_body("message deleted").await;
    let shown: Vec<(Option<String>, String)> = bob.shown().await.into_iter().map(|m| (m.seq, m.body)).collect();
    assert_eq!(
        shown,
        vec![(Some("1".into()), "message deleted".into()), (Some("2".into()), kept.into())],
        "bob's page after the reload"
    );
    let erased = "#messages li.msg[data-seq='1']";
    let is_deleted =
        bob.js(&format!("return document.querySelector(\"{erased}\").classList.contains('deleted');"), json!([])).await;
    assert_eq!(is_deleted, json!(true));
    assert_eq!(computed(&bob, &format!("{erased} .body"), "font-style").await, "italic");
    assert!(!bob.shown().await.iter().any(|m| m.body.contains(secret)));
    bob.snap("browser-erased-bob.png").await;
    tokio::join!(alice.quit(), bob.quit());
}

/// Presses a button from the keyboard: focus, then Enter (as a user tabbing to it).
async fn press(b: &Browser, css: &str) {
    let focused =
        b.js("const e = document.querySelector(arguments[0]); if (e) e.focus(); return !!e;", json!([css])).await;
    assert_eq!(focused, json!(true), "{}: no element {css}", b.name);
    let enter = char::from(fantoccini::key::Key::Enter).to_string();
    b.type_text(css, &enter).await;
}

/// Waits until `script` (with `arguments[0]` = the message's seq) is true.
async fn wait_on_message(b: &Browser, what: &str, seq: u64, check: &str) {
    let script = format!(
        "const li = document.querySelector(`#messages li.msg[data-seq='${{arguments[0]}}']`); return !!li && ({check});"
    );
    b.wait_js(what, &script, json!([seq.to_string()]), WAIT).await;
}

/// v1.2: alice edits, bob sees the new text and "edited"; bob reacts, alice
/// sees 👍 1; bob replies with a quote; everything survives a reload; alice
/// deletes and bob sees "message deleted", after a reload too. Every action
/// is taken from the keyboard (focus and Enter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_people_can_change() {
    let _serial = serial().await;
    let server = Server::start(&[]).await;
    let driver = Chromedriver::start().await;
    let (alice, bob) = tokio::join!(driver.browser("alice"), driver.browser("bob"));
    tokio::join!(alice.login(&server, "alice", "Alice"), bob.login(&server, "bob", "Bob"));
    tokio::join!(alice.open_dm("bob"), bob.open_dm("alice"));
    alice.send("The price is 100 שקל").await;
    bob.wait_body("The price is 100 שקל").await;
    let m = "#messages li.msg[data-seq='1']";

    // Alice edits from the keyboard; the composer holds the old text.
    press(&alice, &format!("{m} [data-action='edit']")).await;
    alice.js("document.getElementById('composer').value = '';", json!([])).await;
    alice.type_text("#composer", "The price is 120 שקל").await;
    alice.type_text("#composer", &char::from(fantoccini::key::Key::Enter).to_string()).await;
    bob.wait_body("The price is 120 שקל").await;
    wait_on_message(&bob, "the edited label", 1, "!!li.querySelector('.edited')").await;
    assert_eq!(computed(&bob, &format!("{m} .body"), "direction").await, "ltr", "dir=auto keeps mixed text readable");

    // Bob reacts 👍; alice sees it with its count.
    press(&bob, &format!("{m} [data-action='react']")).await;
    press(&bob, &format!("{m} [data-action='pick:👍']")).await;
    wait_on_message(&alice, "👍 1", 1, "[...li.querySelectorAll('.reaction')].some((r) => r.textContent === '👍 1')")
        .await;
    let who = alice.js(&format!("return document.querySelector(\"{m} .reaction\").title;"), json!([])).await;
    assert_eq!(who, json!("Bob"), "who reacted");

    // Bob replies with a quote.
    press(&bob, &format!("{m} [data-action='reply']")).await;
    bob.send("Deal").await;
    alice.wait_body("Deal").await;
    wait_on_message(
        &alice,
        "the quote",
        4,
        "li.querySelector('.quote') && li.querySelector('.quote').textContent.includes('The price is 120')",
    )
    .await;

    // A reload: the state comes back from history (current state) and sync.
    bob.goto(&server.url("/")).await;
    bob.wait_state("connected", WAIT).await;
    bob.open_listed(DM).await;
    bob.wait_body("The price is 120 שקל").await;
    wait_on_message(&bob, "edited after reload", 1, "!!li.querySelector('.edited')").await;
    wait_on_message(
        &bob,
        "👍 1 after reload",
        1,
        "li.querySelector('.reaction') && li.querySelector('.reaction').textContent === '👍 1'",
    )
    .await;
    wait_on_message(
        &bob,
        "the quote after reload",
        4,
        "li.querySelector('.quote') && li.querySelector('.quote').textContent.includes('The price is 120')",
    )
    .await;

    // Alice deletes; bob sees "message deleted", the quote too.
    press(&alice, &format!("{m} [data-action='delete']")).await;
    wait_on_message(&bob, "message deleted", 1, "li.querySelector('.body').textContent === 'message deleted'").await;
    wait_on_message(
        &bob,
        "the quote of a deleted message",
        4,
        "li.querySelector('.quote').textContent.includes('message deleted')",
    )
    .await;
    bob.goto(&server.url("/")).await;
    bob.wait_state("connected", WAIT).await;
    bob.open_listed(DM).await;
    wait_on_message(
        &bob,
        "message deleted after reload",
        1,
        "li.querySelector('.body').textContent === 'message deleted'",
    )
    .await;
    let shown: Vec<(Option<String>, String)> = bob.shown().await.into_iter().map(|m| (m.seq, m.body)).collect();
    assert_eq!(shown, vec![(Some("1".into()), "message deleted".into()), (Some("4".into()), "Deal".into())]);
    let errors: Vec<ConsoleEntry> = alice.read_console().await.into_iter().filter(|e| e.level == "SEVERE").collect();
    assert!(errors.is_empty(), "alice's console: {errors:?}");
    bob.snap("browser-changes-bob.png").await;
    tokio::join!(alice.quit(), bob.quit());
}
