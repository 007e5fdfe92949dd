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

mod engines;
mod limits;
mod validate;
mod webhooks;

pub use engines::{ChatConfig, Fsync, ValkeyConfig};
pub use limits::LimitsConfig;
pub use webhooks::WebhooksConfig;

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
