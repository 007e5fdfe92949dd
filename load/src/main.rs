//! `crm-chat-load`: a load generator for crm-chat that speaks only the public
//! protocol: the WebSocket at `/ws/chat`, the service API and dev tokens (or
//! HS256 tokens it signs itself with `--jwt-secret`).
//!
//! Scenarios (each bounded in time by `--duration-s` and in size by its options):
//! - `conns`: N authenticated idle connections; handshakes/s and server RSS per connection.
//! - `fanout`: one group of M members, S senders, K messages at R msgs/s; delivery,
//!   loss, duplicates, order and latency at every member.
//! - `pairs`: P direct conversations ping-ponging; round trips/s and latency.
//! - `floor-server`: not a load but a server: the floor of a fan-out (only the
//!   socket work), to run `fanout` against (see [`floor`]).
//! - `reactions`: the reaction storm (v1.2): M members each toggle a reaction on
//!   one message within a second; every member must end with the stored state.
//! - `storm`: a reconnect storm: M members of one group drop, miss K messages,
//!   reconnect at once and `sync`; time to all synced, nothing lost.
//!
//! It prints exactly one JSON line of figures on stdout; progress goes to stderr.
//! Several `--url`s make clients alternate between nodes.
//!
//! Modules: [`target`] (node URLs, HTTP to the service API, tokens), [`ws`]
//! (connect, upgrade, welcome; the server frames read), [`stats`] (latency
//! histograms, counters, seqs seen), [`sys`] (process figures from /proc, file
//! descriptor limits) and one module per scenario.

mod conns;
mod fanout;
mod floor;
mod http;
mod pairs;
mod reactions;
mod stats;
mod storm;
mod sys;
mod target;
mod ws;

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use tokio::{
    sync::Semaphore,
    time::{Instant, sleep_until, timeout},
};
use tokio_util::sync::CancellationToken;

use crate::target::{Http, Target, TokenSource};

/// Hard ceilings, whatever the options say.
pub const MAX_CONNS: usize = 50_000;
pub const MAX_MESSAGES: usize = 10_000_000;
pub const MAX_DURATION_S: u64 = 3_600;

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
    /// Transport of every client: `ws` (WebSocket) or `http` (HTTP streaming:
    /// an SSE stream per client, frames by POST).
    #[arg(long, default_value = "ws", value_parser = ["ws", "http"], global = true)]
    transport: String,
    /// Server process id(s) whose VmRSS is read before and after (comma-separated or repeated).
    #[arg(long = "server-pid", value_delimiter = ',', global = true)]
    server_pids: Vec<u32>,
}

#[derive(Subcommand, Clone)]
enum Scenario {
    /// Open N authenticated idle connections, hold them, report handshakes/s and RSS per connection.
    Conns(conns::Opts),
    /// One group of M members; S of them send K messages in total at R messages/s.
    Fanout(fanout::Opts),
    /// P direct conversations `dm:<a>:<b>`; in each, a sends, b replies on receipt, and so on.
    Pairs(pairs::Opts),
    /// Serve the floor of a fan-out (only its socket work) for `fanout --jwt-secret x` to run against.
    FloorServer(floor::Opts),
    /// The reaction storm: M members each toggle a reaction on the same message within `--window-ms`.
    Reactions(reactions::Opts),
    /// A reconnect storm: M members of one group drop, miss K messages, reconnect at once and `sync`.
    Storm(storm::Opts),
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Conns(_) => "conns",
            Scenario::Fanout(_) => "fanout",
            Scenario::Pairs(_) => "pairs",
            Scenario::Reactions(_) => "reactions",
            Scenario::FloorServer(_) => "floor-server",
            Scenario::Storm(_) => "storm",
        }
    }

    /// Connections the scenario opens.
    fn conns_needed(&self) -> usize {
        match self {
            Scenario::Conns(o) => o.n,
            Scenario::Fanout(o) => o.members,
            Scenario::Pairs(o) => o.pairs.saturating_mul(2),
            Scenario::Reactions(o) => o.members,
            Scenario::Storm(o) => o.members,
            Scenario::FloorServer(_) => 0,
        }
    }

    /// The scenario's run time: `--duration-s` or its default.
    fn duration(&self, duration_s: Option<u64>) -> Duration {
        let default = match self {
            Scenario::Conns(_) => 300,
            Scenario::Fanout(_) => 120,
            Scenario::Pairs(_) => 10,
            Scenario::Reactions(_) => 120,
            Scenario::Storm(_) => 300,
            Scenario::FloorServer(_) => 600,
        };
        Duration::from_secs(duration_s.unwrap_or(default))
    }

    /// Seconds after which the watchdog ends the run, whatever happens.
    fn watchdog_s(&self, duration_s: Option<u64>) -> u64 {
        let d = self.duration(duration_s).as_secs();
        match self {
            Scenario::Conns(_)
            | Scenario::Fanout(_)
            | Scenario::Reactions(_)
            | Scenario::Storm(_)
            | Scenario::FloorServer(_) => d + 60,
            Scenario::Pairs(o) => d + o.setup_timeout_s + o.rt_timeout_s + 60,
        }
    }
}

// ---------------------------------------------------------------- failures

/// A failure that ends the run: printed as the one JSON line, exit code 1.
pub struct Fatal(String);

impl<E: std::fmt::Display> From<E> for Fatal {
    fn from(e: E) -> Self {
        Fatal(e.to_string())
    }
}

pub fn fatal(msg: impl Into<String>) -> Fatal {
    Fatal(msg.into())
}

// ---------------------------------------------------------------- what the scenarios share

/// The run's targets, tokens and settings.
pub struct Ctx {
    pub targets: Vec<Target>,
    pub http: Http,
    pub tokens: TokenSource,
    pub api_key: String,
    pub prefix: String,
    pub concurrency: usize,
    pub server_pids: Vec<u32>,
}

impl Ctx {
    /// The node a client with this index talks to (alternating).
    pub fn target(&self, i: usize) -> &Target {
        &self.targets[i % self.targets.len()]
    }

    /// Tokens for `users` (in order), with the time they took on stderr.
    pub async fn tokens(&self, users: &[String], lifetime_s: u64) -> Result<Vec<String>, Fatal> {
        let t0 = Instant::now();
        let out = target::tokens(&self.tokens, &self.http, users, lifetime_s).await?;
        eprintln!("{} tokens in {:.1} s", out.len(), t0.elapsed().as_secs_f64());
        Ok(out)
    }
}

/// Runs `connect(i)` for `0..n` with at most `concurrency` in flight, until
/// `deadline`. Returns the handles of the started tasks.
pub async fn ramp<F, Fut, T>(
    n: usize,
    concurrency: usize,
    deadline: Instant,
    connect: F,
) -> Vec<tokio::task::JoinHandle<T>>
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
    let _ = timeout(deadline.saturating_duration_since(Instant::now()) + ws::CONNECT_TIMEOUT, async {
        let _all = sem.acquire_many(concurrency as u32).await;
    })
    .await;
    handles
}

/// Prints `label: <count>/<total>` to stderr every second until cancelled.
pub fn progress(label: &'static str, count: Arc<AtomicUsize>, total: usize, stop: CancellationToken) {
    every_second(stop, move || format!("{label}: {}/{total}", count.load(Ordering::Relaxed)));
}

/// Prints `line()` to stderr every second until `stop`.
pub fn every_second(
    stop: CancellationToken,
    line: impl Fn() -> String + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => eprintln!("{}", line()),
            }
        }
    })
}

// ---------------------------------------------------------------- main

fn main() -> ExitCode {
    stats::start_clock();
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
    let cap = cli.scenario.watchdog_s(cli.common.duration_s);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(cap));
        println!("{}", json!({"scenario": scenario, "error": format!("watchdog: still running after {cap} s")}));
        std::process::exit(3);
    });
    if let Scenario::FloorServer(o) = &cli.scenario {
        let d = cli.scenario.duration(cli.common.duration_s);
        return match rt.block_on(floor::serve(o, d)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(Fatal(e)) => {
                eprintln!("crm-chat-load: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let started = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let load = sys::loadavg();
    let result = rt.block_on(run(cli));
    let code = match result {
        Ok((common, mut figures)) => {
            if let Value::Object(m) = &mut figures {
                let mut out = serde_json::Map::new();
                out.insert("scenario".into(), json!(scenario));
                out.insert("started".into(), json!(started));
                out.insert("loadavg_start".into(), json!(load));
                out.insert("loadavg_end".into(), json!(sys::loadavg()));
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

/// Checks the options and the nodes, runs the scenario; returns the figures
/// common to every scenario and the scenario's own.
async fn run(cli: Cli) -> Result<(Value, Value), Fatal> {
    let c = cli.common;
    ws::HTTP_TRANSPORT.store(c.transport == "http", Ordering::Relaxed);
    let targets = c.urls.iter().map(|u| target::parse(u, c.allow_remote)).collect::<Result<Vec<_>, _>>()?;
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
        http: Http::new()?,
        tokens,
        api_key: c.api_key.clone(),
        prefix,
        concurrency: c.concurrency as usize,
        server_pids: c.server_pids.clone(),
    };
    // Limits first: a run that cannot hold its connections should not start.
    let conns_needed = cli.scenario.conns_needed();
    if conns_needed == 0 || conns_needed > MAX_CONNS {
        return Err(fatal(format!("between 1 and {MAX_CONNS} connections per run (asked for {conns_needed})")));
    }
    sys::check_fds(conns_needed, &ctx.server_pids)?;
    let nodes = target::readyz(&ctx.http, &ctx.targets).await;
    if let Some(bad) = nodes.iter().find(|n| n.get("error").is_some()) {
        return Err(fatal(format!("node not reachable: {bad}")));
    }
    let common = json!({
        "urls": ctx.targets.iter().map(|t| t.base.clone()).collect::<Vec<_>>(),
        "nodes": nodes,
        "prefix": ctx.prefix,
        "tokens": if c.jwt_secret.is_some() { "signed" } else { "dev" },
        "transport": c.transport,
    });
    let duration = cli.scenario.duration(c.duration_s);
    let figures = match &cli.scenario {
        Scenario::Conns(o) => conns::run(&ctx, o, duration).await?,
        Scenario::Fanout(o) => fanout::run(&ctx, o, duration).await?,
        Scenario::Pairs(o) => pairs::run(&ctx, o, duration).await?,
        Scenario::Reactions(o) => reactions::run(&ctx, o, duration).await?,
        Scenario::Storm(o) => storm::run(&ctx, o, duration).await?,
        Scenario::FloorServer(_) => return Err(fatal("floor-server is served by main")),
    };
    Ok((common, figures))
}
