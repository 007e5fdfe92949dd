//! Test harness of the load tool: real `crm-chat` processes on ephemeral ports
//! (the server package's binary), real Valkey servers (the server's own test
//! harness, `tests/common/valkey.rs`). Nothing is mocked.
#![allow(dead_code)]

#[path = "../../../tests/common/process.rs"]
pub mod process;
#[path = "../../../tests/common/valkey.rs"]
pub mod valkey;

use std::{net::SocketAddr, path::PathBuf};

use tokio::process::Child;

pub use process::{API_KEY, JWT_SECRET};

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
    stderr_tail: process::StderrTail,
}

impl Server {
    /// Starts the server with test defaults overridden by `env`.
    pub async fn start(env: &[(&str, &str)]) -> Server {
        match process::spawn(&server_binary(), &[], env, false).await {
            Ok(p) => Server { child: Some(p.child), addr: p.addr, stderr_tail: p.stderr_tail },
            Err(e) => panic!("crm-chat did not start (exit {:?}); stderr:\n{}", e.code, e.stderr),
        }
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
