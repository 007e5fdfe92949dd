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
    /// WebSocket connections (authenticated or not) open on this node;
    /// further upgrades get HTTP 503. Default 16000.
    pub max_connections: usize,
    /// Conversations with more members than this get presence and receipt
    /// pushes batched. Default 50.
    pub batch_members: usize,
    /// Milliseconds between batched presence/receipt pushes. Default 1000.
    pub batch_interval_ms: u64,
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
            outbound_queue: 1024,
            presence_max_members: 1000,
            api_body_bytes: 1 << 20,
            requests_per_s: 20.0,
            requests_burst: 40,
            max_reply_bytes: 1 << 20,
            outbound_bytes: 4 << 20,
            write_timeout_s: 10,
            max_connections: 16_000,
            batch_members: 50,
            batch_interval_ms: 1000,
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
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self { open_conversations: vec!["general".into()], history_max_messages: 10_000 }
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
    /// Drop messages older than this many seconds (0: keep). Default 0.
    pub retention_max_age_s: u64,
    /// Seconds after which a silent node's users count as offline. Default 30.
    pub node_lease_s: u64,
    /// Timeout of one Valkey command in milliseconds. Default 5000.
    pub command_timeout_ms: u64,
    /// Prefix of every key, so several deployments can share one Valkey.
    /// Default `chat`.
    pub key_prefix: String,
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
        }
    }
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
        Ok(())
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        let prod = self.profile == Profile::Production;
        let dev = self.auth.dev_tokens.unwrap_or(!prod);
        if prod && dev {
            return Err(err("auth.dev_tokens", "dev tokens are refused in the production profile"));
        }
        self.auth.dev_tokens = Some(dev);
        for (key, v, public) in [
            ("auth.jwt_secret", &self.auth.jwt_secret, LOCAL_DEV_JWT_SECRET),
            ("auth.api_key", &self.auth.api_key, LOCAL_DEV_API_KEY),
        ] {
            let env = key.replace('.', "__").to_uppercase();
            let how = format!(
                "set CHAT_{env} (or CHAT_{env}_FILE, a file holding it) to a random string of at least 32 bytes, \
                 e.g. the output of `openssl rand -hex 32`; or run with CHAT_PROFILE=local for development only"
            );
            match v {
                None if prod => return Err(err(key, format!("required in the production profile: {how}"))),
                Some(s) if prod && s.0 == public => {
                    return Err(err(key, format!("the public development value is refused in production: {how}")));
                }
                Some(s) if prod && s.0.len() < 32 => {
                    return Err(err(key, format!("must be at least 32 bytes in the production profile: {how}")));
                }
                Some(s) if s.0.is_empty() => return Err(err(key, "must not be empty")),
                _ => {}
            }
        }
        let s = &self.server;
        if s.heartbeat_s == 0 || s.heartbeat_s > 3600 {
            return Err(err("server.heartbeat_s", "must be between 1 and 3600"));
        }
        if s.drain_s > 3600 {
            return Err(err("server.drain_s", "must be at most 3600"));
        }
        for o in &s.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                return Err(err(
                    "server.allowed_origins",
                    format!("'{o}' is not an origin like https://crm.example.com"),
                ));
            }
        }
        if let Some(addr) = &s.internal_listen {
            let parsed: SocketAddr =
                addr.parse().map_err(|_| err("server.internal_listen", format!("'{addr}' is not host:port")))?;
            if parsed.port() != 0 && Some(parsed) == s.listen.parse().ok() {
                return Err(err("server.internal_listen", "must differ from server.listen"));
            }
        }
        if !(1..=3600).contains(&s.header_timeout_s) {
            return Err(err("server.header_timeout_s", "must be between 1 and 3600"));
        }
        if s.shutdown_delay_s > 3600 {
            return Err(err("server.shutdown_delay_s", "must be at most 3600"));
        }
        if let Some(n) = &s.node_id
            && (n.is_empty() || n.len() > 128 || n.contains(char::is_whitespace))
        {
            return Err(err("server.node_id", "1-128 characters without white space"));
        }
        let a = &self.auth;
        if a.hello_timeout_s == 0 {
            return Err(err("auth.hello_timeout_s", "must be at least 1"));
        }
        if a.cookie_name.is_empty()
            || !a.cookie_name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(err("auth.cookie_name", "letters, digits, '_' and '-' only"));
        }
        if !(60..=366 * 86_400).contains(&a.max_token_ttl_s) {
            return Err(err("auth.max_token_ttl_s", "must be between 60 and 31622400"));
        }
        if a.dev_token_ttl_s == 0 || a.dev_token_ttl_s > a.max_token_ttl_s {
            return Err(err("auth.dev_token_ttl_s", "must be between 1 and auth.max_token_ttl_s"));
        }
        let l = &self.limits;
        if !(256..=16 << 20).contains(&l.max_frame_bytes) {
            return Err(err("limits.max_frame_bytes", "must be between 256 and 16777216"));
        }
        if l.max_body_chars == 0 {
            return Err(err("limits.max_body_chars", "must be at least 1"));
        }
        if l.connections_per_user == 0 {
            return Err(err("limits.connections_per_user", "must be at least 1"));
        }
        for (key, rate, burst) in [
            ("limits.send_per_s", l.send_per_s, ("limits.send_burst", l.send_burst)),
            ("limits.requests_per_s", l.requests_per_s, ("limits.requests_burst", l.requests_burst)),
        ] {
            // The bounds the token buckets are built for: at most one token
            // per 1000 s, at most a million per second.
            if !(RATE_MIN..=RATE_MAX).contains(&rate) {
                return Err(err(key, "must be between 0.001 and 1000000"));
            }
            if !(1..=1_000_000).contains(&burst.1) {
                return Err(err(burst.0, "must be between 1 and 1000000"));
            }
        }
        if !(8..=1 << 20).contains(&l.outbound_queue) {
            return Err(err("limits.outbound_queue", "must be between 8 and 1048576"));
        }
        if !(1024..=64 << 20).contains(&l.api_body_bytes) {
            return Err(err("limits.api_body_bytes", "must be between 1024 and 67108864"));
        }
        if l.max_body_chars > 1_000_000 {
            return Err(err("limits.max_body_chars", "must be at most 1000000"));
        }
        // One message always fits in a reply (escaped JSON: at most 6 bytes a
        // character), so paging always makes progress.
        let one_message = l.max_body_chars * 6 + 4096;
        if l.max_reply_bytes < one_message || l.max_reply_bytes > 256 << 20 {
            return Err(err(
                "limits.max_reply_bytes",
                format!("must be between {one_message} (one message of max_body_chars) and 268435456"),
            ));
        }
        if l.outbound_bytes < l.max_reply_bytes + 65_536 || l.outbound_bytes > 1 << 30 {
            return Err(err("limits.outbound_bytes", "must be at least limits.max_reply_bytes + 65536, at most 1 GiB"));
        }
        if !(1..=3600).contains(&l.write_timeout_s) {
            return Err(err("limits.write_timeout_s", "must be between 1 and 3600"));
        }
        if !(1..=10_000_000).contains(&l.max_connections) {
            return Err(err("limits.max_connections", "must be between 1 and 10000000"));
        }
        if !(10..=60_000).contains(&l.batch_interval_ms) {
            return Err(err("limits.batch_interval_ms", "must be between 10 and 60000"));
        }
        for c in &self.chat.open_conversations {
            if !ids::valid_conversation_id(c) || c.starts_with("dm:") {
                return Err(err(
                    "chat.open_conversations",
                    format!("'{c}' is not a conversation id (1-128 of [A-Za-z0-9_.:@-], not dm:...)"),
                ));
            }
        }
        if self.chat.history_max_messages == 0 {
            return Err(err("chat.history_max_messages", "must be at least 1"));
        }
        let v = &self.valkey;
        if let Some(url) = &v.url
            && !(url.0.starts_with("redis://")
                || url.0.starts_with("rediss://")
                || url.0.starts_with("valkey://")
                || url.0.starts_with("valkeys://"))
        {
            return Err(err("valkey.url", "must start with redis://, rediss://, valkey:// or valkeys://"));
        }
        if !v.sentinels.is_empty() && v.service_name.is_none() {
            return Err(err("valkey.service_name", "required with valkey.sentinels"));
        }
        if v.cluster && !v.sentinels.is_empty() {
            return Err(err("valkey.cluster", "cluster and sentinel modes exclude each other"));
        }
        if (v.cluster) && v.url.is_none() {
            return Err(err("valkey.url", "cluster mode needs a seed node url"));
        }
        if v.pool_size == 0 || v.pool_size > 64 {
            return Err(err("valkey.pool_size", "must be between 1 and 64"));
        }
        if v.retention_max_messages == 0 {
            return Err(err("valkey.retention_max_messages", "must be at least 1"));
        }
        if v.node_lease_s < 3 {
            return Err(err("valkey.node_lease_s", "must be at least 3"));
        }
        if v.key_prefix.is_empty() || v.key_prefix.contains(['{', '}', ' ']) {
            return Err(err("valkey.key_prefix", "non-empty, without braces or spaces"));
        }
        if !(0.0..=1.0).contains(&self.otel.sample_ratio) {
            return Err(err("otel.sample_ratio", "must be between 0.0 and 1.0"));
        }
        if let Some(lvl) = &self.log.level
            && tracing_subscriber::EnvFilter::try_new(lvl).is_err()
        {
            return Err(err("log.level", format!("'{lvl}' is not a tracing filter")));
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
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid_and_local() {
        Jail::expect_with(|_| {
            let c = Config::load(None).unwrap();
            assert_eq!(c.profile, Profile::Local);
            assert!(c.dev_tokens());
            assert_eq!(c.server.listen, "0.0.0.0:8000");
            assert_eq!(c.limits.outbound_queue, 1024);
            assert_eq!(c.chat.open_conversations, vec!["general".to_string()]);
            Ok(())
        });
    }

    #[test]
    fn env_overrides_file_which_overrides_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file("chat.toml", "[server]\nheartbeat_s = 7\ndrain_s = 3\n[limits]\nmax_body_chars = 10\n")?;
            jail.set_env("CHAT_SERVER__HEARTBEAT_S", "9");
            jail.set_env("CHAT_CHAT__OPEN_CONVERSATIONS", "[\"general\",\"random\"]");
            jail.set_env("CHAT_CONFIG", "ignored-by-figment");
            let c = Config::load(Some("chat.toml".as_ref())).unwrap();
            assert_eq!(c.server.heartbeat_s, 9);
            assert_eq!(c.server.drain_s, 3);
            assert_eq!(c.limits.max_body_chars, 10);
            assert_eq!(c.chat.open_conversations, vec!["general", "random"]);
            Ok(())
        });
    }

    #[test]
    fn production_requires_long_secrets_and_refuses_dev_tokens() {
        Jail::expect_with(|jail| {
            jail.set_env("CHAT_PROFILE", "production");
            let e = Config::load(None).unwrap_err();
            assert_eq!(e.key, "auth.jwt_secret");
            jail.set_env("CHAT_AUTH__JWT_SECRET", "short");
            let e = Config::load(None).unwrap_err();
            assert!(e.problem.contains("32 bytes"), "{e}");
            jail.set_env("CHAT_AUTH__JWT_SECRET", "x".repeat(32));
            jail.create_file("key", &format!("{}\n", "k".repeat(40)))?;
            jail.set_env("CHAT_AUTH__API_KEY_FILE", "key");
            let c = Config::load(None).unwrap();
            assert_eq!(c.api_key(), "k".repeat(40));
            assert!(!c.dev_tokens());
            jail.set_env("CHAT_AUTH__DEV_TOKENS", "true");
            assert_eq!(Config::load(None).unwrap_err().key, "auth.dev_tokens");
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("CHAT_LIMITS__OUTBOUND_QUEUE", "2");
            assert_eq!(Config::load(None).unwrap_err().key, "limits.outbound_queue");
            jail.set_env("CHAT_LIMITS__OUTBOUND_QUEUE", "notanumber");
            assert_eq!(Config::load(None).unwrap_err().key, "limits.outbound_queue");
            jail.set_env("CHAT_LIMITS__OUTBOUND_QUEUE", "64");
            jail.set_env("CHAT_SERVER__LISTEN", "nonsense");
            assert_eq!(Config::load(None).unwrap_err().key, "server.listen");
            jail.set_env("CHAT_SERVER__LISTEN", "127.0.0.1:0");
            jail.set_env("CHAT_SERVER__NO_SUCH_KEY", "1");
            let e = Config::load(None).unwrap_err();
            assert!(e.problem.contains("no_such_key"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn service_link_variables_are_ignored_nested_typos_stay_fatal() {
        Jail::expect_with(|jail| {
            // What Kubernetes injects for a Service named `chat-crm-chat`.
            jail.set_env("CHAT_CRM_CHAT_PORT", "tcp://10.0.0.1:8000");
            jail.set_env("CHAT_CRM_CHAT_PORT_8000_TCP_ADDR", "10.0.0.1");
            jail.set_env("CHAT_CRM_CHAT_SERVICE_HOST", "10.0.0.1");
            jail.set_env("CHAT_CRM_CHAT_SERVICE_PORT", "8000");
            jail.set_env("CHAT_PROFILE", "local");
            let c = Config::load(None).unwrap();
            assert_eq!(c.profile, Profile::Local);
            let ignored = Config::ignored_env_vars();
            assert!(ignored.contains(&"CHAT_CRM_CHAT_PORT".to_string()), "{ignored:?}");
            assert!(!ignored.iter().any(|v| v == "CHAT_PROFILE"));
            jail.set_env("CHAT_SERVER__LISTNE", "0.0.0.0:1");
            assert!(Config::load(None).unwrap_err().problem.contains("listne"));
            Ok(())
        });
    }

    #[test]
    fn production_refuses_the_public_development_strings() {
        Jail::expect_with(|jail| {
            jail.set_env("CHAT_PROFILE", "production");
            jail.set_env("CHAT_AUTH__JWT_SECRET", LOCAL_DEV_JWT_SECRET);
            jail.set_env("CHAT_AUTH__API_KEY", "k".repeat(40));
            let e = Config::load(None).unwrap_err();
            assert_eq!(e.key, "auth.jwt_secret");
            assert!(e.problem.contains("openssl rand"), "says how: {e}");
            jail.set_env("CHAT_AUTH__JWT_SECRET", "j".repeat(40));
            jail.set_env("CHAT_AUTH__API_KEY", LOCAL_DEV_API_KEY);
            assert_eq!(Config::load(None).unwrap_err().key, "auth.api_key");
            Ok(())
        });
    }

    proptest::proptest! {
        /// Whatever the limits, validation either refuses them naming a key
        /// or the node builds (no panic from any value it accepts).
        #[test]
        fn every_valid_limit_builds_a_node(
            send_per_s in proptest::prop_oneof![
                proptest::num::f64::ANY,
                1e-12f64..1e12,
                proptest::sample::select(vec![0.0, -1.0, f64::MIN_POSITIVE, 1e-3, 1e6, 1e6 + 1.0, f64::MAX]),
            ],
            requests_per_s in 1e-6f64..1e9,
            send_burst in proptest::num::u32::ANY,
            requests_burst in proptest::num::u32::ANY,
            max_body_chars in 0usize..2_000_000,
            max_reply_bytes in 0usize..(300 << 20),
            outbound_bytes in 0usize..(2 << 30),
            outbound_queue in 0usize..(2 << 20),
        ) {
            let mut c = Config::default();
            c.limits.send_per_s = send_per_s;
            c.limits.requests_per_s = requests_per_s;
            c.limits.send_burst = send_burst;
            c.limits.requests_burst = requests_burst;
            c.limits.max_body_chars = max_body_chars;
            c.limits.max_reply_bytes = max_reply_bytes;
            c.limits.outbound_bytes = outbound_bytes;
            c.limits.outbound_queue = outbound_queue;
            if let Err(e) = c.validate() {
                proptest::prop_assert!(e.key.starts_with("limits."), "{e}");
            } else {
                let hub = crate::hub::Hub::new();
                let engine = std::sync::Arc::new(crate::engine::memory::MemoryEngine::new(hub.clone(), 10));
                let node = crate::node::Node::new(std::sync::Arc::new(c), engine, hub);
                proptest::prop_assert!(node.check_send_rate(&"u".into()).is_ok());
            }
        }
    }

    #[test]
    fn secrets_are_redacted() {
        Jail::expect_with(|jail| {
            jail.set_env("CHAT_AUTH__JWT_SECRET", "super-secret-value");
            jail.set_env("CHAT_VALKEY__URL", "redis://:pw@localhost:6379");
            let c = Config::load(None).unwrap();
            let shown = format!("{} {:?}", c.to_redacted_toml(), c);
            assert!(!shown.contains("super-secret-value"));
            assert!(!shown.contains(":pw@"));
            assert!(shown.contains("[redacted]"));
            Ok(())
        });
    }
}
