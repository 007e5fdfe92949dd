//! Logging: `tracing` with human-readable output in `local` and JSON in
//! `production`, both on stderr (stdout carries only the one machine-readable
//! `listening on` line). Structured fields only (user, conversation, seq, conn); never
//! a message body or a token.

use tracing_subscriber::{EnvFilter, filter::LevelFilter, fmt, prelude::*};

use crate::config::{Config, LogFormat, Profile};

pub fn init(cfg: &Config) {
    let spec = cfg.log.level.clone().or_else(|| std::env::var("RUST_LOG").ok()).unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let production = cfg.profile == Profile::Production;
    // Debug logging is off in production, whatever the filter says.
    let cap = if production { LevelFilter::INFO } else { LevelFilter::TRACE };
    let format = cfg.log.format.unwrap_or(if production { LogFormat::Json } else { LogFormat::Text });
    let registry = tracing_subscriber::registry().with(filter).with(cap);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
