//! Starting a real `crm-chat` process on an ephemeral port: the one spawn
//! of the server's suites (`tests/common`) and the load tool's
//! (`load/tests/common`, which includes this file by path).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::Path,
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

/// The last lines the process wrote to stderr.
pub type StderrTail = Arc<Mutex<VecDeque<String>>>;

/// A process that printed its listening line(s).
pub struct Started {
    pub child: Child,
    pub addr: SocketAddr,
    /// The internal listener, when `server.internal_listen` is set.
    pub internal: Option<SocketAddr>,
    pub stderr_tail: StderrTail,
}

/// A process that exited, or never printed its listening line in time.
#[derive(Debug)]
pub struct Exited {
    pub code: Option<i32>,
    pub stderr: String,
}

/// Starts `bin` with the test defaults, then `env`, run through `prefix`
/// when not empty (`["prlimit", "--as=...", "--"]`: the prefix must exec
/// the binary so the pid stays the server's). Waits for `crm-chat listening
/// on http://ADDR` and, with `wait_internal`, for the internal listener's
/// line too (it comes first when there is one). Never panics when the
/// process fails to start.
pub async fn spawn(bin: &Path, prefix: &[&str], env: &[(&str, &str)], wait_internal: bool) -> Result<Started, Exited> {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CHAT_SERVER__LISTEN", "127.0.0.1:0")
        .env("CHAT_AUTH__API_KEY", API_KEY)
        .env("CHAT_AUTH__JWT_SECRET", JWT_SECRET)
        .env("CHAT_LOG__LEVEL", "crm_chat=debug,warn")
        .env("CHAT_SERVER__DRAIN_S", "1")
        .env("CHAT_SERVER__SHUTDOWN_DELAY_S", "0")
        // History in memory unless a test asks for a data directory (the
        // local profile would otherwise share ./data between test servers).
        .env("CHAT_CHAT__DATA_DIR", "memory");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn crm-chat");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let tail: StderrTail = Arc::default();
    let stderr_task = {
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
        })
    };
    let mut lines = BufReader::new(stdout).lines();
    let (mut public, mut internal) = (None, None);
    let _ = tokio::time::timeout(TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("crm-chat listening on http://") {
                public = rest.trim().parse::<SocketAddr>().ok();
            } else if let Some(rest) = line.strip_prefix("crm-chat internal listening on http://") {
                internal = rest.trim().parse::<SocketAddr>().ok();
            }
            if public.is_some() && (!wait_internal || internal.is_some()) {
                return;
            }
        }
    })
    .await;
    match public {
        Some(addr) if !wait_internal || internal.is_some() => {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok(Started { child, addr, internal, stderr_tail: tail })
        }
        _ => {
            let code = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(Ok(status)) => status.code(),
                _ => {
                    let _ = child.start_kill();
                    None
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), stderr_task).await;
            let stderr = tail.lock().unwrap().iter().cloned().collect::<Vec<_>>().join("\n");
            Err(Exited { code, stderr })
        }
    }
}
