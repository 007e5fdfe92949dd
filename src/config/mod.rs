//! Configuration: built-in defaults, then an optional TOML file, then `CHAT_*`
//! environment variables (`__` separates nesting: `CHAT_AUTH__JWT_SECRET` is
//! `auth.jwt_secret`).
//!
//! Every field documents its default. [`Config::load`] validates the result and
//! names the offending key in its error, so a typo in a deployment fails at start,
//! not at the first message.

use std::{fmt, net::SocketAddr, path::PathBuf};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::ids;

mod validate;

/// Secret used to sign dev tokens when no `auth.jwt_secret` is configured in the
/// `local` profile. Public by design: the production profile refuses to start
/// without a real secret.
pub const LOCAL_DEV_JWT_SECRET: &str = "crm-chat-local-development-secret-do-not-use";
/// API key accepted in the `local` profile when none is configured.
pub const LOCAL_DEV_API_KEY: &str = "crm-chat-local-development-api-key";

/// Token bucket rates accepted by validation (tokens per second).
pub const RATE_MIN: f64 = 0.001;
pub const RATE_MAX: f64 = 1_000_000.0;

/// A string that never shows in `Debug`, logs or `--print-config`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Dev tokens on, human-readable logs, well-known dev secrets allowed.
    #[default]
    Local,
    /// Dev tokens refused, real secrets (>= 32 bytes) required, JSON logs at info.
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `local` (default) or `production`.
    pub profile: Profile,
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub chat: ChatConfig,
    pub valkey: ValkeyConfig,
    pub webhooks: WebhooksConfig,
    pub otel: OtelConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on. Default `0.0.0.0:8000`.
    pub listen: String,
    /// Browser origins allowed to open a WebSocket (exact `scheme://host[:port]`).
    /// Empty (default): every origin.
    pub allowed_origins: Vec<String>,
    /// Seconds between server WebSocket pings. Default 25. A connection silent
    /// for twice this is closed with 1001.
    pub heartbeat_s: u64,
    /// Seconds over which SIGTERM spreads close 1012 to open connections. Default 10.
    pub drain_s: u64,
    /// Proxies (CIDRs) whose `X-Forwarded-For` is trusted for the client address.
    /// Default: none.
    pub trusted_proxies: Vec<IpNet>,
    /// This node's id in logs, metrics and presence leases. Default: the host name.
    pub node_id: Option<String>,
    /// Address of the internal listener (`/api/v1`, `/metrics`, `/healthz`,
    /// `/readyz`), e.g. `0.0.0.0:9090`. Unset (default): every route is served
    /// on `listen`. The image sets it, so the public port carries only the
    /// WebSocket, the demo page and its static files.
    pub internal_listen: Option<String>,
    /// Seconds a client has to send a whole HTTP request head (slowloris
    /// guard). Default 10.
    pub header_timeout_s: u64,
    /// Seconds a request on the public listener (and `/healthz`, `/readyz`,
    /// `/metrics`) has, its body included, once its head arrived: a body still
    /// trickling in then gets 408 and the connection is closed. The service
    /// API allows 30 s. Default 10.
    pub body_timeout_s: u64,
    /// Seconds between SIGTERM and the start of the drain, during which
    /// `/readyz` answers 503 so load balancers stop routing here first.
    /// Default 5 (no `preStop` hook needed).
    pub shutdown_delay_s: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8000".into(),
            allowed_origins: Vec::new(),
            heartbeat_s: 25,
            drain_s: 10,
            trusted_proxies: Vec::new(),
            node_id: None,
            internal_listen: None,
            header_timeout_s: 10,
            body_timeout_s: 10,
            shutdown_delay_s: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret the CRM platform signs tokens with. Required in production.
    pub jwt_secret: Option<Secret>,
    /// File holding `jwt_secret` (Docker/Kubernetes secrets). Trailing newline trimmed.
    pub jwt_secret_file: Option<PathBuf>,
    /// Bearer key of the service API. Required in production.
    pub api_key: Option<Secret>,
    /// File holding `api_key`.
    pub api_key_file: Option<PathBuf>,
    /// Enables `POST /api/v1/dev/token`. Default: true in `local`, false (and
    /// refused) in `production`.
    pub dev_tokens: Option<bool>,
    /// Lifetime of dev tokens in seconds. Default 86400.
    pub dev_token_ttl_s: u64,
    /// Cookie carrying the token at upgrade. Default `chat_token`.
    pub cookie_name: String,
    /// Seconds an unauthenticated connection has to send `hello`. Default 10.
    pub hello_timeout_s: u64,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Required `aud` claim, when set.
    pub audience: Option<String>,
    /// Tokens whose `exp` lies further ahead than this many seconds are
    /// refused. Default 86400.
    pub max_token_ttl_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: None,
            jwt_secret_file: None,
            api_key: None,
            api_key_file: None,
            dev_tokens: None,
            dev_token_ttl_s: 86_400,
            cookie_name: "chat_token".into(),
            hello_timeout_s: 10,
            issuer: None,
            audience: None,
            max_token_ttl_s: 86_400,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest inbound frame (and reassembled message) in bytes. Default 65536.
    pub max_frame_bytes: usize,
    /// Longest message body in Unicode scalar values. Default 4000.
    pub max_body_chars: usize,
    /// Bad frames a connection may send before it is closed with 4008. Default 10.
    pub max_bad_frames: u32,
    /// Open connections per user on one node. Default 20.
    pub connections_per_user: usize,
    /// Sustained sends per second per user (token bucket refill). Default 50.
    pub send_per_s: f64,
    /// Token bucket size per user. Default 100.
    pub send_burst: u32,
    /// Sustained bytes of message bodies per second per user, counted as
    /// stored (JSON-escaped), across the cluster on Valkey; over it a send
    /// answers `rate_limited` with `retry_after_ms`. Sized so that chat never
    /// meets it while a flood of the largest bodies is cut from ~1.2 MB/s to
    /// this. Default 16384.
    pub send_bytes_per_s: u64,
    /// Byte bucket size per user: at least the largest body
    /// (`max_body_chars` x 6, every character escaped). Default 262144.
    pub send_bytes_burst: u64,
    /// Outbound frames queued per connection before it counts as a slow
    /// consumer and is closed with 1013. Default 1024.
    pub outbound_queue: usize,
    /// Presence changes are pushed only in conversations with at most this many
    /// members. Default 1000.
    pub presence_max_members: usize,
    /// Largest service API request body in bytes. Default 1 MiB.
    pub api_body_bytes: usize,
    /// `history`, `sync` and `presence` requests per second per connection
    /// (token bucket refill). Default 20.
    pub requests_per_s: f64,
    /// Request bucket size per connection. Default 40.
    pub requests_burst: u32,
    /// Largest `history`/`sync` reply in bytes of JSON; a page is cut short
    /// to fit. Default 1 MiB.
    pub max_reply_bytes: usize,
    /// Bytes waiting to be written to one connection before it counts as a
    /// slow consumer (close 1013). Default 4 MiB.
    pub outbound_bytes: usize,
    /// Seconds a socket write may make no progress before the connection is
    /// ended. Default 10.
    pub write_timeout_s: u64,
    /// Kernel send buffer of each accepted connection (`SO_SNDBUF`; Linux
    /// doubles it): what a client that stops reading can pin in kernel memory
    /// beyond `outbound_bytes`, and what it must drain before a close frame
    /// reaches it. 0: the OS's autotuning (up to `net.ipv4.tcp_wmem`, 4 MiB).
    /// Default 262144.
    pub socket_send_buffer: usize,
    /// WebSocket connections (authenticated or not) open on this node;
    /// further upgrades get HTTP 503. Default 16000.
    pub max_connections: usize,
    /// Plain HTTP connections (not upgraded: page loads, API calls, upgrade
    /// requests not yet answered) open per listener, counted apart from
    /// WebSockets. One more arriving closes the oldest plain connection, so
    /// slow or idle requests never crowd out an upgrade. Default 1024.
    pub max_http_connections: usize,
    /// Sustained WebSocket connects per second per user (token bucket
    /// refill; across the cluster on Valkey). Over it the upgrade gets HTTP
    /// 429 `rate_limited` with `retry_after_ms` (a `hello` gets the error
    /// frame and close 4008). Default 2.
    pub connects_per_s: f64,
    /// Connect bucket size per user. Default 30.
    pub connects_burst: u32,
    /// Conversations with more members than this get presence, receipt and
    /// typing pushes batched. Default 50.
    pub batch_members: usize,
    /// Milliseconds between batched presence/receipt/typing pushes. Default 1000.
    pub batch_interval_ms: u64,
    /// Members of one group conversation (service API PUT and members
    /// route; more is `400 bad_request`). Each `conversation` event lists
    /// every member, so this also bounds that frame (~10 bytes a member).
    /// Default 100000.
    pub max_group_members: usize,
    /// Seconds after its `ts` a message may still be edited by its sender
    /// (v1.2); 0: no limit. The service API's moderation is exempt. Default 86400.
    pub edit_window_s: u64,
    /// Distinct emoji one message may hold (v1.2). Default 20.
    pub reactions_per_message: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 65_536,
            max_body_chars: 4000,
            max_bad_frames: 10,
            connections_per_user: 20,
            send_per_s: 50.0,
            send_burst: 100,
            send_bytes_per_s: 16_384,
            send_bytes_burst: 256 << 10,
            outbound_queue: 1024,
            presence_max_members: 1000,
            api_body_bytes: 1 << 20,
            requests_per_s: 20.0,
            requests_burst: 40,
            max_reply_bytes: 1 << 20,
            outbound_bytes: 4 << 20,
            write_timeout_s: 10,
            socket_send_buffer: 256 << 10,
            max_connections: 16_000,
            max_http_connections: 1024,
            connects_per_s: 2.0,
            connects_burst: 30,
            batch_members: 50,
            batch_interval_ms: 1000,
            max_group_members: 100_000,
            edit_window_s: 86_400,
            reactions_per_message: 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Conversations every authenticated user belongs to. Default `["general"]`.
    pub open_conversations: Vec<String>,
    /// Embedded engine: messages kept per conversation (oldest dropped first).
    /// Default 10000.
    pub history_max_messages: usize,
    /// Embedded engine: messages older than this many seconds are dropped on
    /// a timer, idle conversations included (in memory every second, durable
    /// every 10 s; 0: no age limit). Default 0.
    pub history_max_age_s: u64,
    /// Embedded engine: directory of the durable store (history, receipts,
    /// groups, idempotency records survive restarts), or `memory` for history
    /// in memory only, lost on restart. Default: `./data` in the `local`
    /// profile, `memory` in `production` (the image sets `/var/lib/crm-chat`).
    /// Ignored with Valkey.
    pub data_dir: Option<String>,
    /// Durable store: `everysec` (default; a process crash loses nothing, an
    /// OS crash or power loss up to about one second of acked messages and
    /// starts a new epoch) or `always` (acked means on disk: nothing acked is
    /// ever lost; one fsync per batch of writes).
    pub fsync: Fsync,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            open_conversations: vec!["general".into()],
            history_max_messages: 10_000,
            history_max_age_s: 0,
            data_dir: None,
            fsync: Fsync::Everysec,
        }
    }
}

/// When the durable store forces writes to the disk (`chat.fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Every commit (one per batch of writes) is fsync'd before its acks.
    Always,
    /// Commits reach the OS at once; fsync once a second.
    #[default]
    Everysec,
}

impl Fsync {
    pub fn as_str(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::Everysec => "everysec",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValkeyConfig {
    /// `redis://[user:pass@]host:port/db` or `rediss://` for TLS. Unset: the
    /// embedded single-node engine.
    pub url: Option<Secret>,
    /// Sentinel addresses `host:port`; with `service_name`, Sentinel mode.
    pub sentinels: Vec<String>,
    /// Sentinel master name.
    pub service_name: Option<String>,
    /// Cluster mode: `url` names one seed node.
    pub cluster: bool,
    /// Command connections. Default 4.
    pub pool_size: usize,
    /// Keep at most this many messages per conversation. Default 100000.
    pub retention_max_messages: u64,
    /// Drop messages older than this many seconds (0: keep): on each write,
    /// and on the maintenance timer for idle conversations. Default 0.
    pub retention_max_age_s: u64,
    /// Seconds after which a silent node's users count as offline. Default 30.
    pub node_lease_s: u64,
    /// Timeout of one Valkey command in milliseconds. Default 5000.
    pub command_timeout_ms: u64,
    /// Prefix of every key, so several deployments can share one Valkey.
    /// Default `chat`.
    pub key_prefix: String,
    /// Replicas that must confirm a stored write (`WAIT`) before the client
    /// is answered (a `send`'s ack, the service API's post). Default 0: the
    /// primary's word is enough. Signed so a negative value is refused by
    /// name rather than by the parser.
    pub ack_replicas: i64,
    /// How long the replicas may take to confirm, in milliseconds; past it
    /// the answer is `unavailable` (the client retries with the same
    /// `client_msg_id`). Default 1000.
    pub ack_timeout_ms: i64,
}

impl Default for ValkeyConfig {
    fn default() -> Self {
        Self {
            url: None,
            sentinels: Vec::new(),
            service_name: None,
            cluster: false,
            pool_size: 4,
            retention_max_messages: 100_000,
            retention_max_age_s: 0,
            node_lease_s: 30,
            command_timeout_ms: 5000,
            key_prefix: "chat".into(),
            ack_replicas: 0,
            ack_timeout_ms: 1000,
        }
    }
}

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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtelConfig {
    /// OTLP endpoint (e.g. `http://collector:4317`). Unset: no export, no cost.
    pub endpoint: Option<String>,
    /// Fraction of traces sampled, 0.0..=1.0. Default 1.0.
    pub sample_ratio: f64,
    /// `service.name` resource attribute. Default `crm-chat`.
    pub service_name: String,
}

impl Default for OtelConfig {
    fn default() -> Self {
        Self { endpoint: None, sample_ratio: 1.0, service_name: "crm-chat".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter (`info`, `crm_chat=debug`, ...). Default: `RUST_LOG`,
    /// else `info`. Debug levels are capped at info in production.
    pub level: Option<String>,
    /// `text` or `json`. Default: text in local, json in production.
    pub format: Option<LogFormat>,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

/// Whether the part of a `CHAT_*` variable after the prefix can name a
/// setting: a nested key (`SERVER__LISTEN`) or the one top-level key,
/// `PROFILE`. `CHAT_CONFIG` names the file and is read by the command line.
fn is_setting_name(rest: &str) -> bool {
    rest.contains("__") || rest.eq_ignore_ascii_case("profile")
}

fn err(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), problem: problem.into() }
}

impl Config {
    /// The layered figment: defaults, then `file` (when given), then `CHAT_*`.
    pub fn figment(file: Option<&std::path::Path>) -> Figment {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            fig = fig.merge(Toml::file_exact(path));
        }
        fig.merge(Env::prefixed("CHAT_").filter(|k| is_setting_name(k.as_str())).split("__"))
    }

    /// `CHAT_*` environment variables that cannot be settings and are ignored
    /// (Kubernetes service links such as `CHAT_CRM_CHAT_PORT` for a Service
    /// named `chat-crm-chat`, or a stray variable): names without `__` other
    /// than `CHAT_PROFILE`. Listed once in a warning at start.
    pub fn ignored_env_vars() -> Vec<String> {
        let mut v: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter(|k| {
                k.strip_prefix("CHAT_").is_some_and(|rest| {
                    !rest.is_empty() && !is_setting_name(rest) && !rest.eq_ignore_ascii_case("config")
                })
            })
            .collect();
        v.sort();
        v
    }

    /// Loads, resolves `*_file` secrets and validates.
    pub fn load(file: Option<&std::path::Path>) -> Result<Config, ConfigError> {
        Self::from_figment(Self::figment(file))
    }

    pub fn from_figment(fig: Figment) -> Result<Config, ConfigError> {
        let mut cfg: Config = fig.extract().map_err(|e| {
            let key = e.path.join(".");
            let key = if key.is_empty() { "config".into() } else { key };
            err(&key, e.kind.to_string())
        })?;
        cfg.resolve_files()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_files(&mut self) -> Result<(), ConfigError> {
        fn read(key: &str, path: &std::path::Path) -> Result<Secret, ConfigError> {
            let s =
                std::fs::read_to_string(path).map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))?;
            Ok(Secret(s.trim_end_matches(['\r', '\n']).to_string()))
        }
        if let Some(p) = &self.auth.jwt_secret_file {
            if self.auth.jwt_secret.is_some() {
                return Err(err("auth.jwt_secret_file", "set either jwt_secret or jwt_secret_file, not both"));
            }
            self.auth.jwt_secret = Some(read("auth.jwt_secret_file", p)?);
        }
        if let Some(p) = &self.auth.api_key_file {
            if self.auth.api_key.is_some() {
                return Err(err("auth.api_key_file", "set either api_key or api_key_file, not both"));
            }
            self.auth.api_key = Some(read("auth.api_key_file", p)?);
        }
        if let Some(p) = &self.webhooks.secret_file {
            if self.webhooks.secret.is_some() {
                return Err(err("webhooks.secret_file", "set either secret or secret_file, not both"));
            }
            self.webhooks.secret = Some(read("webhooks.secret_file", p)?);
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server
            .listen
            .parse()
            .map_err(|_| err("server.listen", format!("'{}' is not host:port", self.server.listen)))
    }

    /// The internal listener's address, when one is configured.
    pub fn internal_listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        self.server
            .internal_listen
            .as_deref()
            .map(|a| a.parse().map_err(|_| err("server.internal_listen", format!("'{a}' is not host:port"))))
            .transpose()
    }

    /// The durable store's directory: `None` for history in memory
    /// (`chat.data_dir` unset or `memory`).
    pub fn data_dir(&self) -> Option<PathBuf> {
        self.chat.data_dir.as_deref().filter(|d| *d != "memory").map(PathBuf::from)
    }

    pub fn dev_tokens(&self) -> bool {
        self.auth.dev_tokens.unwrap_or(self.profile == Profile::Local)
    }

    /// The signing secret in force (the well-known dev secret in `local` when unset).
    pub fn jwt_secret(&self) -> &str {
        self.auth.jwt_secret.as_ref().map_or(LOCAL_DEV_JWT_SECRET, Secret::expose)
    }

    /// The service API key in force (the well-known dev key in `local` when unset).
    pub fn api_key(&self) -> &str {
        self.auth.api_key.as_ref().map_or(LOCAL_DEV_API_KEY, Secret::expose)
    }

    pub fn node_id(&self) -> String {
        self.server.node_id.clone().unwrap_or_else(|| {
            hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "crm-chat".into())
        })
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests;
