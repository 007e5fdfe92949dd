//! `chat.*` (the embedded engines: open conversations, retention, the
//! durable store) and `valkey.*` (the Valkey engine), each field with its
//! documented default.

use serde::{Deserialize, Serialize};

use super::Secret;

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
