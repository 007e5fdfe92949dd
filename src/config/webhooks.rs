//! `webhooks.*`: signed webhooks to the CRM backend, each field with its
//! documented default.

use serde::{Deserialize, Serialize};

use std::path::PathBuf;

use super::Secret;

/// Signed webhooks to the CRM backend (PROTOCOL v1.1, *Webhooks*; the
/// delivery model is in [`crate::webhooks`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Where events are POSTed (`http://` or `https://`). Unset (default): no
    /// webhooks, no cost. Redacted in logs: it may carry a token.
    pub url: Option<Secret>,
    /// The signing key: at least 32 bytes, required with `url`. A value
    /// `whsec_<base64>` (the Standard Webhooks form) is the base64-decoded
    /// key; any other value is used as its UTF-8 bytes.
    pub secret: Option<Secret>,
    /// File holding `secret`. Trailing newline trimmed.
    pub secret_file: Option<PathBuf>,
    /// Event types sent: a list or a comma-separated string. Default: every
    /// type but `user.online`/`user.offline`.
    #[serde(deserialize_with = "list_or_csv")]
    pub events: Vec<String>,
    /// Also send `user.online` and `user.offline`. Default false.
    pub presence: bool,
    /// Timeout of one delivery attempt, milliseconds. Default 5000.
    pub timeout_ms: u64,
    /// An event not delivered after this many seconds is dropped (counted and
    /// logged). Default 86400.
    pub max_age_s: u64,
    /// `message.unread` after a member has not delivered a message for this
    /// many seconds. Default 60.
    pub unread_after_s: u64,
    /// Longest wait between two attempts (the backoff doubles from 1 s up to
    /// this). Default 600.
    pub max_backoff_s: u64,
    /// Events waiting for delivery at most (per node on the embedded engine,
    /// per cluster on Valkey); past it the oldest are dropped and counted.
    /// Default 100000.
    pub outbox_max: usize,
    /// Bytes of events (their JSON) waiting for delivery at most, counted as
    /// `outbox_max` is; past it the oldest are dropped and counted
    /// (`outbox_full`). Default 67108864 (64 MiB).
    pub outbox_max_bytes: usize,
    /// Deliveries in flight per node at most. Default 16.
    pub concurrency: usize,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            url: None,
            secret: None,
            secret_file: None,
            events: Vec::new(),
            presence: false,
            timeout_ms: 5000,
            max_age_s: 86_400,
            unread_after_s: 60,
            max_backoff_s: 600,
            outbox_max: 100_000,
            outbox_max_bytes: 64 << 20,
            concurrency: 16,
        }
    }
}

/// A list setting given as a list (TOML, `[a, b]` in the environment) or as
/// a comma-separated string (`a,b` in the environment).
fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCsv {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match ListOrCsv::deserialize(d)? {
        ListOrCsv::List(v) => v,
        ListOrCsv::Csv(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
    })
}
