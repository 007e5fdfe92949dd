//! Test harness of the load tool: real `crm-chat` processes on ephemeral ports
//! (the server package's binary), real Valkey servers (the server's own test
//! harness, `tests/common/valkey.rs`). Nothing is mocked.
#![allow(dead_code)]

#[path = "../../../tests/common/valkey.rs"]
pub mod valkey;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

pub const TIMEOUT: Duration = Duration::from_secs(10);
pub const API_KEY: &str = "test-api-key-0123456789-0123456789";
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789-0123456789";

/// The load tool under test.
pub const LOAD_BIN: &str = env!("CARGO_BIN_EXE_crm-chat-load");

/// The server binary: `$CRM_CHAT_SERVER_BIN`, else `crm-chat` next to the load
/// tool (same target directory and profile: `cargo test --workspace` builds
/// both before any test runs; `cargo test -p crm-chat-load` alone builds only
/// the load tool, so build the server first with `cargo build -p crm-chat`).
/// Nothing is built here: a missing binary fails the test and says why.
pub fn server_binary() -> PathBuf {
    let p = match std::env::var_os("CRM_CHAT_SERVER_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::path::Path::new(LOAD_BIN).with_file_name(format!("crm-chat{}", std::env::consts::EXE_SUFFIX)),
    };
    assert!(
        p.is_file(),
        "no server binary at {}: build it first (`cargo build -p crm-chat`; `cargo test --workspace` does), \
         or point CRM_CHAT_SERVER_BIN at one",
        p.display()
    );
    p
}

/// One `crm-chat` process.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    /// Starts the server with test defaults overridden by `env`.
    pub async fn start(env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(server_binary());
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CHAT_SERVER__LISTEN", "127.0.0.1:0")
            .env("CHAT_AUTH__API_KEY", API_KEY)
            .env("CHAT_AUTH__JWT_SECRET", JWT_SECRET)
            .env("CHAT_LOG__LEVEL", "crm_chat=debug,warn")
            .env("CHAT_SERVER__DRAIN_S", "1")
            .env("CHAT_SERVER__SHUTDOWN_DELAY_S", "0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn crm-chat");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let mut t = tail.lock().unwrap();
                    if t.len() >= 200 {
                        t.pop_front();
                    }
                    t.push_back(l);
                }
            });
        }
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("crm-chat listening on http://") {
                    return Some(rest.parse::<SocketAddr>().unwrap());
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(addr) = addr else {
            let status = child.try_wait().ok().flatten();
            let tail: Vec<String> = tail.lock().unwrap().iter().cloned().collect();
            panic!("crm-chat did not start (exit {status:?}); stderr:\n{}", tail.join("\n"));
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server { child: Some(child), addr, stderr_tail: tail }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running")
    }

    pub fn logs(&self) -> String {
        self.stderr_tail.lock().unwrap().iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

/// `nodes` servers on one Valkey (`url`), node ids `node0`, `node1`, ...
pub async fn start_nodes(nodes: usize, url: &str, env: &[(&str, &str)]) -> Vec<Server> {
    let mut servers = Vec::new();
    for i in 0..nodes {
        let node_id = format!("node{i}");
        let mut e: Vec<(&str, &str)> =
            vec![("CHAT_VALKEY__URL", url), ("CHAT_SERVER__NODE_ID", &node_id), ("CHAT_VALKEY__NODE_LEASE_S", "5")];
        e.extend_from_slice(env);
        servers.push(Server::start(&e).await);
    }
    servers
}
