//! The Valkey engine: durable history and fan-out across any number of nodes
//! sharing one Valkey (or Redis 7+), standalone, behind Sentinel, or Cluster.
//!
//! # Key layout
//! Every key of a conversation carries the hash tag `{c:<id>}`, so a Cluster
//! keeps them on one slot and each Lua script touches one slot only:
//! - `<p>:{c:<id>}:meta`  hash: `last` (last seq), `group`, `title`
//!   (and `epoch`; `prev`: the epoch a history regression replaced, `lost.rs`)
//! - `<p>:{c:<id>}:msgs`  stream: entry `<seq>-0` with the rendered frame
//!   (`f`), ts (`t`), sender (`u`) and idempotency key (`k`); an erased
//!   message's entry holds its erased frame and `d` = 1 (`erase.lua` rewrites
//!   the whole stream through the scratch key `<p>:{c:<id>}:msgs-erasing`
//!   under the lock `<p>:{c:<id>}:erasing`, as XDEL leaves an entry's bytes
//!   in place)
//! - `<p>:{c:<id>}:idem`  hash: `<sender>\n<client_msg_id>` -> seq
//! - `<p>:{c:<id>}:mem`   set: group members
//! - `<p>:{c:<id>}:rcpt`  hash: user -> `delivered:read`
//! - `<p>:{c:<id>}:open`  set: known members of an open conversation
//! - `<p>:{c:<id>}:own:<user>` sorted set of the user's own seqs (unread
//!   counts; erasure finds a user's conversations by SCAN for these keys)
//! - `<p>:{u:<user>}:convs` set: the user's groups and direct conversations
//! - `<p>:{u:<user>}:connects` hash: the user's connect bucket
//!   (`limits.connects_per_s`, `connect.lua`), expiring when full again
//! - `<p>:{presence}:nodes` / `<p>:{presence}:n:<node>`: node leases and
//!   per-node connection counts
//! - `<p>:{n:<node>}:ctl` channel: a node's control channel (HTTP streaming
//!   POSTs forwarded to the node holding the session, and their answers;
//!   `forward.rs`)
//! - `<p>:{wh}:out` stream (consumer group `delivery`), `<p>:{wh}:retry`,
//!   `<p>:{wh}:retry:age` sorted sets, `<p>:{wh}:retry:e` hash,
//!   `<p>:{wh}:bytes` (the bytes waiting) and `<p>:{wh}:erased` (erasures:
//!   user -> ms): the webhook outbox; `<p>:{wh}:unread` sorted set and
//!   `<p>:{wh}:unread:n:<id>` hashes: the `message.unread` schedule
//!
//! # Fan-out
//! Channels `<p>:{c:<id>}:ev` (open and group conversations) and
//! `<p>:{u:<user>}:ev` (users: direct messages, membership, presence in direct
//! conversations), sharded pub/sub on Cluster. A node subscribes only to the
//! channels its local connections need (the hub's topics). Messages are
//! published by the append script itself, so each channel carries a
//! conversation's messages in seq order (on Cluster, direct messages are
//! published right after the script instead, as a shard channel must live on
//! the script's slot).
//!
//! # Missed traffic
//! When the subscriber connection comes back after an outage (or the local
//! receiver lagged), the node re-reads every conversation its clients follow
//! and re-sends, in order, the messages it had not delivered (by the last seq
//! it delivered, else by time since it was last known healthy). Clients
//! deduplicate by seq, so an overlap is harmless and a silent gap impossible.
//! Live delivery is in order per topic and conversation: a message that skips
//! ahead of the last one delivered waits for the gap to be read from storage,
//! and a repeat is dropped (`fanout.rs`).
//!
//! # Files
//! - `mod.rs`: [`ValkeyEngine`], its shared state, connecting, lifecycle.
//! - `keys.rs`: key and channel names.
//! - `payload.rs`: the pub/sub payload and stored message entries.
//! - `errors.rs`: client errors mapped to the engine's error kinds.
//! - `store.rs` ([`MessageStore`](super::MessageStore)), `groups.rs`
//!   ([`Groups`](super::Groups)), `fanout.rs` ([`Broker`](super::Broker),
//!   receive loop, missed-traffic recovery), `presence.rs`
//!   ([`Presence`](super::Presence), leases, sweep), `retention.rs` (age
//!   retention on the maintenance timer), `outbox.rs` (the
//!   webhook [`Outbox`](crate::webhooks::Outbox)).
//! - `scripts.rs` and `lua/`: the atomic scripts.
//! - `lost.rs`: a history that went back after a failover is announced
//!   (new epoch, followers reconnect), never a silent gap.
//! - `acks.rs`: acks after replication (`valkey.ack_replicas`, group commit
//!   over `WAIT`); [`Inner::replicated`] is the hook a write calls before
//!   its client is answered.

mod acks;
mod broadcast;
mod changes;
mod errors;
mod fanout;
mod forward;
mod groups;
mod keys;
mod lost;
mod outbox;
mod payload;
mod presence;
mod retention;
mod scripts;
mod store;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use fred::{
    clients::SubscriberClient,
    prelude::*,
    types::config::{Config as FredConfig, ReconnectPolicy, Server, ServerConfig},
};
use parking_lot::Mutex;

use self::{
    broadcast::subscribe_broadcast,
    errors::err,
    fanout::{Mark, receive, watch_reconnects},
    keys::Keys,
};
use crate::{
    config::Config,
    engine::Engine,
    error::EngineResult,
    hub::{Hub, Topic},
};

/// State shared by the engine's trait impls (one file each) and its
/// background tasks (receive loop, reconnect watcher).
struct Inner {
    pool: Pool,
    sub: SubscriberClient,
    hub: Arc<Hub>,
    keys: Keys,
    cluster: bool,
    node_id: String,
    lease: Duration,
    retention_max: u64,
    retention_age_ms: u64,
    /// When this node last walked every conversation for age retention (ms).
    retention_walk_ms: AtomicI64,
    /// Cluster-wide per-user send quota (checked in the append script).
    send_per_s: f64,
    send_burst: u32,
    /// Cluster-wide per-user send byte budget (the same scripts).
    send_bytes_per_s: u64,
    send_bytes_burst: u64,
    scripts: scripts::Scripts,
    /// Channels the subscriber is subscribed to (guarded for ordered changes).
    active: tokio::sync::Mutex<HashSet<String>>,
    /// Per (topic, conversation): the seq up to which messages were delivered
    /// locally without a gap. Live messages beyond a gap wait for the gap to
    /// be filled from storage; messages at or below it (re-sent by recovery,
    /// or out-of-order) are not delivered twice.
    /// Marks are per epoch: a message of another epoch (the history was lost
    /// and seqs started again) starts a new mark at 0, never counts as a repeat.
    delivered: Mutex<HashMap<(Topic, Arc<str>), Mark>>,
    /// Last time the subscriber was known connected (ms since the epoch).
    healthy_at_ms: AtomicI64,
    /// Set when this node's presence must be written again (after a lease loss).
    presence_lost: AtomicBool,
    /// With `valkey.ack_replicas` > 0: confirms writes on replicas.
    acks: Option<acks::Acks>,
    /// Whether this node's control channel is subscribed (`forward.rs`).
    control_on: AtomicBool,
    /// Forwarded POSTs waiting for the holding node's answer, by request id.
    pending: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<crate::hub::streams::Offer>>>,
    next_request: AtomicU64,
}

impl Inner {
    /// The hook every stored write a client waits on calls before it is
    /// answered (a message, a repeat of one, an update): returns once
    /// `valkey.ack_replicas` replicas hold every write this node completed in
    /// the conversation's slot, `unavailable` when they did not confirm in
    /// `valkey.ack_timeout_ms` (the write stays stored; a retry with the same
    /// idempotency key finds it). At once with `ack_replicas` 0.
    pub(super) async fn replicated(&self, conversation: &str) -> EngineResult<()> {
        match &self.acks {
            Some(acks) => acks.confirm(&self.keys.conv(conversation, "ack")).await,
            None => Ok(()),
        }
    }
}

pub struct ValkeyEngine {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn fred_config(cfg: &Config) -> anyhow::Result<FredConfig> {
    let v = &cfg.valkey;
    let url = v.url.as_ref().map(|u| u.expose().to_string());
    let mut fc = if v.cluster {
        FredConfig::from_url_clustered(url.as_deref().unwrap_or_default())?
    } else {
        FredConfig::from_url(url.as_deref().unwrap_or("redis://127.0.0.1:6379"))?
    };
    if !v.sentinels.is_empty() {
        let hosts = v
            .sentinels
            .iter()
            .map(|s| {
                let (h, p) = s.rsplit_once(':').unwrap_or((s, "26379"));
                Ok(Server::new(
                    h,
                    p.parse::<u16>().map_err(|_| anyhow::anyhow!("valkey.sentinels: bad port in '{s}'"))?,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        fc.server =
            ServerConfig::Sentinel { hosts, service_name: v.service_name.clone().expect("validated with sentinels") };
    }
    fc.fail_fast = false;
    Ok(fc)
}

impl ValkeyEngine {
    /// Connects (waiting a bounded time; a Valkey that is down at start makes
    /// the node start unready and connect when it can).
    pub async fn connect(cfg: &Config, hub: Arc<Hub>) -> anyhow::Result<ValkeyEngine> {
        let v = &cfg.valkey;
        let fc = fred_config(cfg)?;
        let timeout = Duration::from_millis(v.command_timeout_ms);
        let mut builder = Builder::from_config(fc);
        builder
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
                // Command clients only carry connection events: a shallow
                // buffer (each client preallocates 8 channels of this size).
                p.broadcast_channel_capacity = 32;
            })
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(3);
                c.internal_command_timeout = timeout;
                // A command is never re-sent after a reconnect: not every write
                // here is idempotent (presence counts are not).
                c.max_command_attempts = 1;
                c.tcp.nodelay = Some(true);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
        let pool = builder.build_pool(v.pool_size)?;
        // Acks after replication: a client of its own, as WAIT blocks its
        // connection (acks.rs); its commands may take the WAIT's timeout.
        let acks = if v.ack_replicas > 0 {
            let ack_timeout = Duration::from_millis(v.ack_timeout_ms as u64);
            builder.with_performance_config(|p| p.default_command_timeout = timeout + ack_timeout);
            let client = builder.build()?;
            client.connect();
            let bump = format!("{}:ack:{}", v.key_prefix, cfg.node_id());
            Some(acks::Acks::new(client, v.ack_replicas, v.ack_timeout_ms, timeout, bump))
        } else {
            None
        };
        // The subscriber's message channel absorbs bursts while the receive
        // task dispatches; a lag beyond it triggers the re-send recovery.
        builder.with_performance_config(|p| {
            p.default_command_timeout = timeout;
            p.broadcast_channel_capacity = 1 << 14;
        });
        let sub = builder.build_subscriber_client()?;
        pool.connect();
        sub.connect();
        let up = tokio::time::timeout(Duration::from_secs(10), async {
            pool.wait_for_connect().await?;
            sub.wait_for_connect().await
        })
        .await;
        match up {
            Ok(Ok(())) => tracing::info!(cluster = v.cluster, sentinel = !v.sentinels.is_empty(), "valkey connected"),
            Ok(Err(e)) => tracing::error!(error = %e, "valkey: cannot connect yet; retrying in the background"),
            Err(_) => tracing::error!("valkey: not reachable within 10 s; retrying in the background"),
        }
        let inner = Arc::new(Inner {
            pool,
            sub,
            hub,
            keys: Keys { prefix: v.key_prefix.clone() },
            cluster: v.cluster,
            node_id: cfg.node_id(),
            lease: Duration::from_secs(v.node_lease_s),
            retention_max: v.retention_max_messages,
            retention_age_ms: v.retention_max_age_s * 1000,
            retention_walk_ms: AtomicI64::new(0),
            send_per_s: cfg.limits.send_per_s,
            send_burst: cfg.limits.send_burst,
            send_bytes_per_s: cfg.limits.send_bytes_per_s,
            send_bytes_burst: cfg.limits.send_bytes_burst,
            scripts: scripts::Scripts::new(),
            active: tokio::sync::Mutex::default(),
            delivered: Mutex::default(),
            healthy_at_ms: AtomicI64::new(crate::protocol::now_ms()),
            presence_lost: AtomicBool::new(true),
            acks,
            control_on: AtomicBool::new(false),
            pending: Mutex::default(),
            next_request: AtomicU64::new(1),
        });
        if let Err(e) = inner.subscribe_control().await {
            tracing::warn!(error = %e, "cannot subscribe the control channel yet; retried by maintenance");
        }
        let engine = ValkeyEngine { inner: inner.clone(), tasks: Mutex::default() };
        engine.tasks.lock().push(tokio::spawn(receive(inner.clone())));
        let bcast = inner.clone();
        engine.tasks.lock().push(tokio::spawn(async move { subscribe_broadcast(&bcast).await }));
        engine.tasks.lock().push(tokio::spawn(watch_reconnects(inner)));
        tracing::info!(
            retention_max_messages = v.retention_max_messages,
            retention_max_age_s = v.retention_max_age_s,
            node_lease_s = v.node_lease_s,
            ack_replicas = v.ack_replicas,
            "valkey engine: durable history, fan-out across nodes"
        );
        Ok(engine)
    }
}

#[async_trait]
impl Engine for ValkeyEngine {
    fn name(&self) -> &'static str {
        "valkey"
    }

    async fn ready(&self) -> bool {
        let ping = async {
            let pool_ok = self.inner.pool.next().ping::<String>(None).await.is_ok();
            pool_ok && self.inner.sub.is_connected()
        };
        tokio::time::timeout(Duration::from_secs(2), ping).await.unwrap_or(false)
    }

    async fn maintain(&self) -> EngineResult<Vec<String>> {
        self.inner.refresh_lease().await?;
        self.inner.subscribe_control().await?;
        if self.inner.sub.is_connected() {
            self.inner.healthy_at_ms.store(crate::protocol::now_ms(), Ordering::Release);
        }
        let gone = self.inner.sweep().await?;
        if let Err(e) = self.inner.retain().await {
            tracing::warn!(error = %e, "age retention failed; retrying at the next maintenance");
        }
        Ok(gone)
    }

    fn maintenance_interval(&self) -> Option<Duration> {
        let mut every = (self.inner.lease / 3).max(Duration::from_millis(500));
        if self.inner.retention_age_ms > 0 {
            every = every.min(self.inner.retention_every());
        }
        Some(every)
    }

    fn outbox(&self) -> Option<Arc<dyn crate::webhooks::Outbox>> {
        Some(Arc::new(outbox::ValkeyOutbox::new(self.inner.clone())))
    }

    async fn shutdown(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        let i = &self.inner;
        if let Some(acks) = &i.acks {
            acks.shutdown();
        }
        let client = i.pool.next();
        let _: Result<(), _> = client.zrem(i.keys.nodes(), i.node_id.as_str()).await;
        let _: Result<(), _> = client.del(format!("{}{}", i.keys.node_prefix(), i.node_id)).await;
        let _ = i.sub.quit().await;
        let _ = i.pool.quit().await;
    }
}
