//! The `crm-chat` binary: parses the command line and hands over to the library.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use crm_chat::{app, config::Config, telemetry};

/// jemalloc instead of glibc's malloc: frames are allocated on one worker
/// thread and freed on another, and glibc's arenas then serialise the
/// workers on their locks (BENCHMARKS.md, "allocator").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "crm-chat", version, about = "Real-time chat server for a CRM platform")]
struct Cli {
    /// TOML configuration file (layered between the defaults and CHAT_* variables).
    #[arg(long, env = "CHAT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Exit 0 when the local /healthz answers 200 (for containers without curl).
    Healthcheck {
        /// Address to probe; defaults to server.listen (0.0.0.0 becomes 127.0.0.1).
        #[arg(long)]
        addr: Option<SocketAddr>,
    },
    /// Print a token for a user, signed with auth.jwt_secret (for operators and scripts).
    Token {
        user: String,
        #[arg(long)]
        name: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("crm-chat: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        print!("{}", cfg.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cfg),
        Command::Healthcheck { addr } => healthcheck(&cfg, addr),
        Command::Token { user, name, ttl } => {
            if !crm_chat::ids::valid_user_id(&user) {
                eprintln!("crm-chat: '{user}' is not a user id (1-128 chars of [A-Za-z0-9_.@-])");
                return ExitCode::from(2);
            }
            let auth = crm_chat::auth::Authenticator::new(&cfg);
            println!("{}", auth.sign(&user, name.as_deref(), Some(ttl)));
            ExitCode::SUCCESS
        }
    }
}

fn serve(cfg: Config) -> ExitCode {
    let telemetry = telemetry::init(&cfg);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crm-chat: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let ignored = Config::ignored_env_vars();
        if !ignored.is_empty() {
            tracing::warn!(
                variables = ignored.join(","),
                "ignoring CHAT_* environment variables that name no setting (settings nest with __, \
                 e.g. CHAT_SERVER__LISTEN; Kubernetes service links look like these)"
            );
        }
        let listeners = app::Listeners::bind(&cfg)?;
        let local = listeners.public.local_addr()?;
        let internal = listeners.internal.as_ref().map(|l| l.local_addr()).transpose()?;
        let node = app::build(cfg).await?;
        let tag = crm_chat::transport::public_node_tag(&node.node_id, node.cfg.jwt_secret());
        tracing::info!(%local, internal = ?internal, node = %node.node_id, public_tag = %tag, engine = node.engine_name(), profile = ?node.cfg.profile, "crm-chat listening");
        // Machine-readable lines for scripts and tests that listen on port 0.
        if let Some(i) = internal {
            println!("crm-chat internal listening on http://{i}");
        }
        println!("crm-chat listening on http://{local}");
        app::serve(node, listeners, app::shutdown_signal()).await
    });
    drop(rt);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "crm-chat failed");
            eprintln!("crm-chat: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn healthcheck(cfg: &Config, addr: Option<SocketAddr>) -> ExitCode {
    // The internal listener carries /healthz when there is one.
    let configured = || cfg.internal_listen_addr().and_then(|i| i.map_or_else(|| cfg.listen_addr(), Ok));
    let mut addr = match addr.map(Ok).unwrap_or_else(configured) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("crm-chat: {e}");
            return ExitCode::from(2);
        }
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let probe = || -> std::io::Result<bool> {
        let t = Duration::from_secs(2);
        let mut s = TcpStream::connect_timeout(&addr, t)?;
        s.set_read_timeout(Some(t))?;
        s.set_write_timeout(Some(t))?;
        write!(s, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut head = [0u8; 16];
        let mut n = 0;
        while n < head.len() {
            match s.read(&mut head[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(head[..n].starts_with(b"HTTP/1.1 200"))
    };
    match probe() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("crm-chat: {addr}/healthz did not answer 200");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("crm-chat: {addr}/healthz: {e}");
            ExitCode::FAILURE
        }
    }
}
