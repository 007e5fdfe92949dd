//! The Valkey engine: durable history and fan-out across any number of nodes
//! sharing one Valkey (or Redis 7+), standalone, behind Sentinel, or Cluster.
//!
//! # Key layout
//! Every key of a conversation carries the hash tag `{c:<id>}`, so a Cluster
//! keeps them on one slot and each Lua script touches one slot only:
//! - `<p>:{c:<id>}:meta`  hash: `last` (last seq), `group`, `title`
//! - `<p>:{c:<id>}:msgs`  stream: entry `<seq>-0` with the rendered frame
//! - `<p>:{c:<id>}:idem`  hash: `<sender>\n<client_msg_id>` -> seq
//! - `<p>:{c:<id>}:mem`   set: group members
//! - `<p>:{c:<id>}:rcpt`  hash: user -> `delivered:read`
//! - `<p>:{c:<id>}:open`  set: known members of an open conversation
//! - `<p>:{c:<id>}:own:<user>` sorted set of the user's own seqs (unread counts)
//! - `<p>:{u:<user>}:convs` set: the user's groups and direct conversations
//! - `<p>:{presence}:nodes` / `<p>:{presence}:n:<node>`: node leases and
//!   per-node connection counts
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
//! and a repeat is dropped ([`deliver_message`]).

mod scripts;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
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
use serde::Deserialize;
use tracing::Instrument;

use super::{
    Appended, Broker, Counters, Engine, Group, Groups, MembershipChange, MessagePage, MessageStore, NewMessage, Page,
    Presence, ReceiptOutcome, ReceiptRow, Route, StoredMessage,
};
use crate::{
    config::Config,
    error::{EngineError, EngineResult},
    hub::{Event, EventKind, Hub, Topic, now_us},
    ids,
    protocol::{ConversationObject, Text, format_ts},
    telemetry,
};

/// Maps a client error to the engine's two kinds: the storage could not be
/// reached (retry later) or answered nonsense (a bug).
fn err(e: fred::error::Error) -> EngineError {
    use fred::error::ErrorKind as K;
    let transient = match e.kind() {
        K::IO | K::Timeout | K::Canceled | K::Routing | K::Cluster | K::Sentinel | K::Backpressure | K::Replica => true,
        K::Tls | K::Auth => true,
        _ => {
            let d = e.details();
            ["OOM", "LOADING", "MASTERDOWN", "READONLY", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS"]
                .iter()
                .any(|p| d.contains(p))
        }
    };
    if transient { EngineError::Unavailable(e.to_string()) } else { EngineError::Internal(e.to_string()) }
}

/// Key and channel names.
#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn conv(&self, id: &str, part: &str) -> String {
        format!("{}:{{c:{id}}}:{part}", self.prefix)
    }
    fn user_convs(&self, user: &str) -> String {
        format!("{}:{{u:{user}}}:convs", self.prefix)
    }
    fn channel(&self, topic: &Topic) -> String {
        match topic {
            Topic::Conv(c) => format!("{}:{{c:{c}}}:ev", self.prefix),
            Topic::User(u) => format!("{}:{{u:{u}}}:ev", self.prefix),
        }
    }
    fn topic(&self, channel: &str) -> Option<Topic> {
        let rest = channel.strip_prefix(self.prefix.as_str())?.strip_prefix(":{")?.strip_suffix("}:ev")?;
        if let Some(c) = rest.strip_prefix("c:") {
            Some(Topic::Conv(c.into()))
        } else {
            rest.strip_prefix("u:").map(|u| Topic::User(u.into()))
        }
    }
    fn nodes(&self) -> String {
        format!("{}:{{presence}}:nodes", self.prefix)
    }
    fn node_prefix(&self) -> String {
        format!("{}:{{presence}}:n:", self.prefix)
    }
}

/// The pub/sub payload:
/// `kind \t exclude \t stored_us \t conversation \t traceparent \t extra \n frame`,
/// where `extra` is the seq of a message or the member flag of a membership
/// change, and `traceparent` (W3C, may be empty) joins the receiving node's
/// fan-out span to the sender's trace.
fn encode(event: &Event) -> String {
    let (kind, conv, extra) = match &event.kind {
        EventKind::Message => ("m", "", String::new()),
        EventKind::Receipt if event.batch => ("R", "", String::new()),
        EventKind::Receipt => ("r", "", String::new()),
        EventKind::Typing => ("t", "", String::new()),
        EventKind::Presence if event.batch => ("P", "", String::new()),
        EventKind::Presence => ("p", "", String::new()),
        EventKind::Membership { conversation, member } => {
            ("c", &**conversation, (if *member { "1" } else { "0" }).into())
        }
        EventKind::Disconnect => ("d", "", String::new()),
    };
    format!(
        "{kind}\t{}\t{}\t{conv}\t{}\t{extra}\n{}",
        event.exclude_user.as_deref().unwrap_or(""),
        event.stored_at_us.map(|u| u.to_string()).unwrap_or_default(),
        telemetry::traceparent().unwrap_or_default(),
        event.frame.as_str()
    )
}

/// The last message delivered of a (topic, conversation): its epoch and seq.
type Mark = (Arc<str>, u64);

/// A message's conversation, epoch and seq, as carried in its payload header.
type MessageSeq = (Arc<str>, Arc<str>, u64);

/// A decoded payload.
struct Decoded<'a> {
    event: Event,
    /// For messages: conversation and seq.
    seq: Option<MessageSeq>,
    traceparent: Option<&'a str>,
}

fn decode(payload: &str) -> Option<Decoded<'_>> {
    let (head, frame) = payload.split_once('\n')?;
    let mut p = head.split('\t');
    let (kind, exclude, us, conv, tp, extra) = (p.next()?, p.next()?, p.next()?, p.next()?, p.next()?, p.next()?);
    let (kind, batch) = match kind {
        "m" => (EventKind::Message, false),
        "r" => (EventKind::Receipt, false),
        "R" => (EventKind::Receipt, true),
        "t" => (EventKind::Typing, false),
        "p" => (EventKind::Presence, false),
        "P" => (EventKind::Presence, true),
        "c" => (EventKind::Membership { conversation: conv.into(), member: extra == "1" }, false),
        "d" => (EventKind::Disconnect, false),
        _ => return None,
    };
    let seq = match kind {
        // `<seq>:<epoch>`
        EventKind::Message => {
            let (seq, epoch) = extra.split_once(':')?;
            Some((Arc::<str>::from(conv), Arc::<str>::from(epoch), seq.parse().ok()?))
        }
        _ => None,
    };
    let event = Event {
        kind,
        exclude_user: (!exclude.is_empty()).then(|| exclude.into()),
        frame: Text::from(frame.to_string()),
        stored_at_us: us.parse().ok(),
        batch,
    };
    Some(Decoded { event, seq, traceparent: (!tp.is_empty()).then_some(tp) })
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("strings and user refs serialise")
}

/// The fields of a stored frame needed to rebuild a [`StoredMessage`].
#[derive(Deserialize)]
struct FrameFields {
    seq: u64,
    sender: SenderFields,
    body: String,
    client_msg_id: String,
}

#[derive(Deserialize)]
struct SenderFields {
    id: String,
    name: String,
}

type StreamEntry = (String, HashMap<String, String>);

fn stored(entry: &StreamEntry) -> EngineResult<(StoredMessage, String)> {
    let frame = entry.1.get("f").ok_or_else(|| EngineError::Internal(format!("entry {} has no frame", entry.0)))?;
    let f: FrameFields =
        serde_json::from_str(frame).map_err(|e| EngineError::Internal(format!("entry {}: {e}", entry.0)))?;
    let ts_ms = entry.1.get("t").and_then(|t| t.parse().ok()).unwrap_or(0);
    let m = StoredMessage {
        seq: f.seq,
        ts_ms,
        sender_id: f.sender.id.into(),
        sender_name: f.sender.name.into(),
        body: f.body.into(),
        client_msg_id: f.client_msg_id.into(),
    };
    Ok((m, frame.clone()))
}

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
    /// Cluster-wide per-user send quota (checked in the append script).
    send_per_s: f64,
    send_burst: u32,
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
            send_per_s: cfg.limits.send_per_s,
            send_burst: cfg.limits.send_burst,
            scripts: scripts::Scripts::new(),
            active: tokio::sync::Mutex::default(),
            delivered: Mutex::default(),
            healthy_at_ms: AtomicI64::new(crate::protocol::now_ms()),
            presence_lost: AtomicBool::new(true),
        });
        let engine = ValkeyEngine { inner: inner.clone(), tasks: Mutex::default() };
        engine.tasks.lock().push(tokio::spawn(receive(inner.clone())));
        engine.tasks.lock().push(tokio::spawn(watch_reconnects(inner)));
        tracing::info!(
            retention_max_messages = v.retention_max_messages,
            retention_max_age_s = v.retention_max_age_s,
            node_lease_s = v.node_lease_s,
            "valkey engine: durable history, fan-out across nodes"
        );
        Ok(engine)
    }
}

/// Delivers pub/sub messages to the hub, in arrival order.
async fn receive(inner: Arc<Inner>) {
    let mut rx = inner.sub.message_rx();
    loop {
        match rx.recv().await {
            Ok(msg) => {
                let Some(topic) = inner.keys.topic(&msg.channel) else { continue };
                let Some(payload) = msg.value.as_str() else { continue };
                let Some(Decoded { event, seq, traceparent }) = decode(&payload) else {
                    tracing::warn!(channel = %msg.channel, "undecodable pub/sub payload");
                    continue;
                };
                // The fan-out on this node joins the sender's trace.
                let span =
                    tracing::debug_span!("fanout", kind = event.kind.frame_type(), recipients = tracing::field::Empty);
                if let Some(tp) = traceparent {
                    telemetry::join_remote(&span, tp);
                }
                if let Some((conv, epoch, seq)) = seq {
                    // Messages go through the in-order path (gap fill, no repeats).
                    let n = deliver_message(&inner, &topic, &conv, &epoch, seq, &event).instrument(span.clone()).await;
                    span.record("recipients", n);
                    continue;
                }
                let joined = match &event.kind {
                    EventKind::Membership { conversation, member } if inner.hub.wants(&topic) => {
                        Some((conversation.clone(), *member))
                    }
                    _ => None,
                };
                // A local user joined a group: subscribe to it before they hear
                // of it, so nothing sent after the event can be missed.
                if let Some((conv, true)) = &joined
                    && let Err(e) = inner.subscribe(&[Topic::Conv(conv.clone())]).await
                {
                    tracing::warn!(error = %e, conversation = %conv, "subscribe after join failed");
                }
                let n = span.in_scope(|| inner.hub.dispatch(&topic, &event));
                span.record("recipients", n);
                drop(span);
                if let Some((_, false)) = joined {
                    inner.clone().reconcile();
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "pub/sub receiver lagged; re-sending from storage");
                let inner = inner.clone();
                tokio::spawn(async move { recover(&inner).await });
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

enum Order {
    /// Delivered to this many local connections.
    Delivered(usize),
    /// Already delivered (or older): dropped.
    Repeat,
    /// Messages after this seq are missing before this one.
    GapAfter(u64),
}

/// Delivers one message of `conv` on `topic` if it is the next in seq order
/// of its epoch (or the first this node sees), under the lock that keeps the
/// mark and the delivery in step.
fn deliver_next(inner: &Inner, topic: &Topic, conv: &Arc<str>, epoch: &Arc<str>, seq: u64, event: &Event) -> Order {
    let mut marks = inner.delivered.lock();
    let key = (topic.clone(), conv.clone());
    // Another epoch: the history was lost and seqs start again. What was
    // delivered before says nothing about the new epoch.
    let mark = match marks.get(&key) {
        Some((e, m)) if e == epoch => Some(*m),
        Some(_) => Some(0),
        None => None,
    };
    match mark {
        Some(mark) if seq <= mark => Order::Repeat,
        Some(mark) if seq > mark + 1 => Order::GapAfter(mark),
        _ => {
            let n = inner.hub.dispatch(topic, event);
            marks.insert(key, (epoch.clone(), seq));
            Order::Delivered(n)
        }
    }
}

/// A live message: fills a gap before it from storage, drops a repeat.
/// Returns the connections it was delivered to.
async fn deliver_message(
    inner: &Inner,
    topic: &Topic,
    conv: &Arc<str>,
    epoch: &Arc<str>,
    seq: u64,
    event: &Event,
) -> usize {
    let mark = match deliver_next(inner, topic, conv, epoch, seq, event) {
        Order::Delivered(n) => return n,
        Order::Repeat => return 0,
        Order::GapAfter(mark) => mark,
    };
    let key = inner.keys.conv(conv, "msgs");
    let missing: Result<Vec<StreamEntry>, _> =
        inner.pool.next().xrange(&key, format!("{}-0", mark + 1), format!("{}-0", seq - 1), None).await;
    match missing {
        Ok(entries) => {
            for e in &entries {
                if let Ok((m, frame)) = stored(e) {
                    let event = Event::new(EventKind::Message, Text::from(frame));
                    deliver_next(inner, topic, conv, epoch, m.seq, &event);
                }
            }
            crate::metrics::pubsub_resent(entries.len() as u64);
        }
        Err(e) => tracing::warn!(error = %e, conversation = %conv, "cannot fill a pub/sub gap; clients will sync"),
    }
    // Delivered after the fill (or, if storage failed, anyway: clients see
    // the gap by seq and sync).
    match deliver_next(inner, topic, conv, epoch, seq, event) {
        Order::Delivered(n) => n,
        Order::Repeat => 0,
        Order::GapAfter(_) => {
            inner.delivered.lock().insert((topic.clone(), conv.clone()), (epoch.clone(), seq - 1));
            match deliver_next(inner, topic, conv, epoch, seq, event) {
                Order::Delivered(n) => n,
                _ => 0,
            }
        }
    }
}

/// After the subscriber reconnects: resubscribe, then re-send what was missed.
async fn watch_reconnects(inner: Arc<Inner>) {
    // Created after the initial connection: every event here is a reconnect.
    let mut rx = inner.sub.reconnect_rx();
    while let Ok(server) = rx.recv().await {
        tracing::warn!(%server, "pub/sub reconnected; resubscribing and re-sending missed messages");
        crate::metrics::pubsub_reconnect();
        // Subscriptions first (a Valkey still loading its AOF refuses them for
        // a while), then the catch-up from storage: whatever is published after
        // the subscriptions are active arrives live, whatever before is read.
        for attempt in 0..240 {
            match inner.sub.resubscribe_all().await {
                Ok(()) => break,
                Err(e) => {
                    if attempt % 20 == 0 {
                        tracing::warn!(error = %e, "resubscribe failed; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        inner.presence_lost.store(true, Ordering::Release);
        recover(&inner).await;
    }
}

/// Re-sends messages local clients may have missed while pub/sub was down.
/// Storage may come back later than pub/sub: reads are retried (bounded)
/// until every followed conversation has been checked.
async fn recover(inner: &Inner) {
    let since = inner.healthy_at_ms.load(Ordering::Acquire) - 5_000;
    let mut resent = 0usize;
    let mut pending: Option<Vec<(Topic, String)>> = None;
    for attempt in 0..120 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let convs = match pending.take() {
            Some(c) => c,
            None => match followed(inner).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "recovery: storage not back yet");
                    continue;
                }
            },
        };
        let mut failed = Vec::new();
        for (topic, conv) in convs {
            match resend(inner, &topic, &conv, since).await {
                Ok(n) => resent += n,
                Err(_) => failed.push((topic, conv)),
            }
        }
        if failed.is_empty() {
            inner.healthy_at_ms.store(crate::protocol::now_ms(), Ordering::Release);
            crate::metrics::pubsub_resent(resent as u64);
            tracing::info!(resent, "missed-traffic recovery done");
            return;
        }
        pending = Some(failed);
    }
    tracing::error!(resent, "missed-traffic recovery gave up: storage did not answer for 30 s; clients must sync");
}

/// Every (topic, conversation) local clients follow: subscribed
/// conversations, and the direct conversations of local users.
async fn followed(inner: &Inner) -> EngineResult<Vec<(Topic, String)>> {
    let mut out = Vec::new();
    for topic in inner.hub.topics() {
        match &topic {
            Topic::Conv(c) => {
                let c = c.to_string();
                out.push((topic, c));
            }
            Topic::User(u) => {
                let mine: Vec<String> = inner.pool.next().smembers(inner.keys.user_convs(u)).await.map_err(err)?;
                for c in mine {
                    if matches!(ids::parse_dm(&c), ids::Dm::Pair(..)) {
                        out.push((topic.clone(), c));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Re-sends, in order, the messages of one conversation this node has not
/// delivered on `topic` (all of the current epoch's when the epoch changed).
async fn resend(inner: &Inner, topic: &Topic, conv: &str, since_ms: i64) -> EngineResult<usize> {
    let conv: Arc<str> = conv.into();
    let client = inner.pool.next();
    let epoch: Option<String> = client.hget(inner.keys.conv(&conv, "meta"), "epoch").await.map_err(err)?;
    let Some(epoch) = epoch.map(Arc::<str>::from) else {
        // Nothing stored (or it was lost and nothing new came yet).
        return Ok(0);
    };
    let from = match inner.delivered.lock().get(&(topic.clone(), conv.clone())) {
        Some((e, seq)) if *e == epoch => Some(*seq),
        Some(_) => Some(0),
        None => None,
    };
    let key = inner.keys.conv(&conv, "msgs");
    let entries: Vec<StreamEntry> = match from {
        Some(seq) => client.xrange(&key, format!("{}-0", seq + 1), "+", Some(1000)).await.map_err(err)?,
        None => {
            let mut v: Vec<StreamEntry> = client.xrevrange(&key, "+", "-", Some(1000)).await.map_err(err)?;
            v.retain(|e| e.1.get("t").and_then(|t| t.parse::<i64>().ok()).is_some_and(|t| t >= since_ms));
            v.reverse();
            v
        }
    };
    let mut n = 0;
    for e in &entries {
        let (m, frame) = stored(e)?;
        let event = Event::new(EventKind::Message, Text::from(frame));
        if matches!(deliver_next(inner, topic, &conv, &epoch, m.seq, &event), Order::Delivered(_)) {
            n += 1;
        }
    }
    Ok(n)
}

impl Inner {
    /// Subscribes to the channels of `topics` not yet subscribed; returns once
    /// they are active.
    async fn subscribe(&self, topics: &[Topic]) -> EngineResult<()> {
        let mut active = self.active.lock().await;
        let missing: Vec<String> =
            topics.iter().map(|t| self.keys.channel(t)).filter(|c| !active.contains(c)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if self.cluster {
            // Shard channels of different slots cannot share one command.
            let each = missing.iter().map(|c| self.sub.ssubscribe(c.as_str()));
            futures_util::future::try_join_all(each).await.map_err(err)?;
        } else {
            self.sub.subscribe(missing.clone()).await.map_err(err)?;
        }
        active.extend(missing);
        Ok(())
    }

    /// Unsubscribes, in the background, from channels no local connection needs.
    fn reconcile(self: Arc<Self>) {
        tokio::spawn(async move {
            let mut active = self.active.lock().await;
            let wanted: HashSet<String> = self.hub.topics().iter().map(|t| self.keys.channel(t)).collect();
            let stale: Vec<String> = active.difference(&wanted).cloned().collect();
            if stale.is_empty() {
                return;
            }
            let r = if self.cluster {
                let each = stale.iter().map(|c| self.sub.sunsubscribe(c.as_str()));
                futures_util::future::try_join_all(each).await.map(|_| ())
            } else {
                self.sub.unsubscribe(stale.clone()).await
            };
            match r {
                Ok(()) => {
                    for c in &stale {
                        active.remove(c);
                    }
                    let wanted: HashSet<Topic> = self.hub.topics().into_iter().collect();
                    self.delivered.lock().retain(|(topic, _), _| wanted.contains(topic));
                }
                Err(e) => tracing::debug!(error = %e, "unsubscribe failed; retried on the next change"),
            }
        });
    }

    fn publish_cmd(&self) -> &'static str {
        if self.cluster { "s" } else { "p" }
    }

    async fn publish_payload(&self, route: &Route, payload: String) -> EngineResult<()> {
        let client = self.pool.next();
        for topic in route {
            let ch = self.keys.channel(topic);
            if self.cluster {
                client.spublish::<(), _, _>(ch, payload.as_str()).await.map_err(err)?;
            } else {
                client.publish::<(), _, _>(ch, payload.as_str()).await.map_err(err)?;
            }
        }
        Ok(())
    }

    async fn presence(&self, op: &str, users: &[&str]) -> EngineResult<fred::types::Value> {
        let mut args =
            vec![self.keys.node_prefix(), self.node_id.clone(), crate::protocol::now_ms().to_string(), op.into()];
        args.extend(users.iter().map(|u| u.to_string()));
        self.scripts.presence.run(&self.pool, vec![self.keys.nodes()], args).await
    }

    /// Writes this node's lease and, when it was lost, its connection counts.
    async fn refresh_lease(&self) -> EngineResult<()> {
        let expiry = crate::protocol::now_ms() + (self.lease.as_millis() as i64) * 2 / 3;
        let client = self.pool.next();
        let added: i64 = client
            .zadd(self.keys.nodes(), None, None, false, false, (expiry as f64, self.node_id.as_str()))
            .await
            .map_err(err)?;
        if added == 1 || self.presence_lost.swap(false, Ordering::AcqRel) {
            // Swept while we were away (or first start): write our users again.
            let mut counts: HashMap<String, i64> = HashMap::new();
            for c in self.hub.connections() {
                *counts.entry(c.user.to_string()).or_default() += 1;
            }
            let key = format!("{}{}", self.keys.node_prefix(), self.node_id);
            let _: () = client.del(&key).await.map_err(err)?;
            if !counts.is_empty() {
                let _: () = client.hset(&key, counts).await.map_err(err)?;
            }
        }
        Ok(())
    }

    /// Claims nodes whose lease expired; returns their users now offline everywhere.
    async fn sweep(&self) -> EngineResult<Vec<String>> {
        let now = crate::protocol::now_ms();
        let dead: Vec<String> =
            self.pool.next().zrangebyscore(self.keys.nodes(), "-inf", now as f64, false, None).await.map_err(err)?;
        let mut gone = Vec::new();
        for node in dead {
            if node == self.node_id {
                continue;
            }
            let users: Vec<String> = self
                .scripts
                .sweep
                .run(&self.pool, vec![self.keys.nodes()], vec![self.keys.node_prefix(), node.clone(), now.to_string()])
                .await?
                .convert()
                .map_err(err)?;
            if users.is_empty() {
                continue;
            }
            tracing::warn!(node, users = users.len(), "node lease expired; its users are offline");
            let refs: Vec<&str> = users.iter().map(String::as_str).collect();
            let still: Vec<String> = self.presence("online", &refs).await?.convert().map_err(err)?;
            gone.extend(users.into_iter().filter(|u| !still.contains(u)));
        }
        Ok(gone)
    }
}

#[async_trait]
impl MessageStore for ValkeyEngine {
    async fn append(&self, msg: NewMessage, route: &Route) -> EngineResult<Option<Appended>> {
        let i = &self.inner;
        let k = &i.keys;
        let conv = msg.conversation.as_str();
        // The frame is rendered around the seq the script assigns.
        let head = format!("{{\"type\":\"message\",\"conversation\":{},\"seq\":", json(conv));
        let tail = format!(
            ",\"ts\":\"{}\",\"sender\":{},\"body\":{},\"client_msg_id\":{}}}",
            format_ts(msg.ts_ms),
            json(&msg.sender),
            json(&msg.body),
            json(&msg.client_msg_id),
        );
        let min_ts = if i.retention_age_ms > 0 { msg.ts_ms - i.retention_age_ms as i64 } else { 0 };
        // On Cluster a shard channel must hash to the script's slot: direct
        // messages (user channels) are published after the script.
        let in_script = !(i.cluster && msg.participants.is_some());
        let stored_us = now_us();
        let traceparent = telemetry::traceparent().unwrap_or_default();
        let payload_head = format!("m\t\t{stored_us}\t{conv}\t{traceparent}\t");
        let mut args = vec![
            format!("{}\n{}", msg.sender.id, msg.client_msg_id),
            msg.ts_ms.to_string(),
            msg.sender.id.clone(),
            head.clone(),
            tail.clone(),
            i.retention_max.to_string(),
            min_ts.to_string(),
            if msg.require_member { "1" } else { "0" }.to_string(),
            k.conv(conv, "own:"),
            if in_script { i.publish_cmd() } else { "n" }.to_string(),
            payload_head.clone(),
            super::new_epoch(),
            i.send_per_s.to_string(),
            i.send_burst.to_string(),
        ];
        args.extend(route.iter().map(|t| k.channel(t)));
        if let Some(pair) = &msg.participants {
            // Indexed before the write: a crash in between leaves an empty
            // conversation in the index (welcome skips it), never hides one
            // that holds messages.
            self.index(conv, pair, true).await?;
        }
        // The send bucket: the user's own slot where keys may span slots;
        // on Cluster the script's keys share the conversation's slot, so the
        // bucket is per user and conversation there (the node-local limiter
        // still bounds a user across conversations on each node).
        let bucket = if i.cluster {
            format!("{}:{}", k.conv(conv, "rate"), msg.sender.id)
        } else {
            format!("{}:{{u:{}}}:rate", k.prefix, msg.sender.id)
        };
        let keys = vec![k.conv(conv, "meta"), k.conv(conv, "msgs"), k.conv(conv, "idem"), k.conv(conv, "mem"), bucket];
        let r: Vec<fred::types::Value> = i.scripts.append.run(&i.pool, keys, args).await?.convert().map_err(err)?;
        let int =
            |v: &fred::types::Value| v.as_i64().ok_or_else(|| EngineError::Internal(format!("append returned {r:?}")));
        let (seq, ts_ms, dup, epoch) = match r.as_slice() {
            [code] if int(code)? == -1 => return Ok(None),
            [code, wait] if int(code)? == -2 => return Err(EngineError::RateLimited(int(wait)?.max(1) as u64)),
            [seq, ts, dup, epoch] => (
                int(seq)? as u64,
                int(ts)?,
                int(dup)? == 1,
                epoch.as_string().ok_or_else(|| EngineError::Internal("append returned no epoch".into()))?,
            ),
            other => return Err(EngineError::Internal(format!("append returned {other:?}"))),
        };
        if !in_script && !dup {
            i.publish_payload(route, format!("{payload_head}{seq}:{epoch}\n{head}{seq}{tail}")).await?;
        }
        Ok(Some(Appended { seq, ts_ms, duplicate: dup }))
    }

    async fn history(&self, conversation: &str, page: Page) -> EngineResult<MessagePage> {
        let key = self.inner.keys.conv(conversation, "msgs");
        // The page and the epoch in one round trip.
        let pipe = self.inner.pool.next().pipeline();
        let (backwards, limit) = match page {
            Page::Before(before, limit) => {
                let end = match before {
                    Some(0 | 1) => None,
                    Some(b) => Some(format!("{}-0", b - 1)),
                    None => Some("+".into()),
                };
                match end {
                    Some(end) => {
                        let _: () = pipe.xrevrange(&key, end, "-", Some(limit as u64 + 1)).await.map_err(err)?;
                    }
                    // Nothing before seq 1: an empty read keeps the shape.
                    None => {
                        let _: () = pipe.xrange(&key, "0-1", "0-1", Some(1)).await.map_err(err)?;
                    }
                }
                (true, limit)
            }
            Page::After(after, limit) => {
                let start = format!("{}-0", after.saturating_add(1));
                let _: () = pipe.xrange(&key, start, "+", Some(limit as u64 + 1)).await.map_err(err)?;
                (false, limit)
            }
        };
        let _: () = pipe.hget(self.inner.keys.conv(conversation, "meta"), "epoch").await.map_err(err)?;
        let (mut entries, epoch): (Vec<StreamEntry>, Option<String>) = pipe.all().await.map_err(err)?;
        let has_more = entries.len() > limit;
        entries.truncate(limit);
        if backwards {
            entries.reverse();
        }
        let messages = entries.iter().map(|e| stored(e).map(|s| s.0)).collect::<EngineResult<_>>()?;
        Ok(MessagePage { messages, has_more, epoch: epoch.unwrap_or_default().into() })
    }

    async fn last_seq(&self, conversation: &str) -> EngineResult<u64> {
        let v: Option<u64> =
            self.inner.pool.next().hget(self.inner.keys.conv(conversation, "meta"), "last").await.map_err(err)?;
        Ok(v.unwrap_or(0))
    }

    async fn set_receipt(&self, conversation: &str, user: &str, seq: i64, read: bool) -> EngineResult<ReceiptOutcome> {
        let k = &self.inner.keys;
        let r: Vec<i64> = self
            .inner
            .scripts
            .receipt
            .run(
                &self.inner.pool,
                vec![k.conv(conversation, "rcpt"), k.conv(conversation, "meta")],
                vec![user.to_string(), seq.to_string(), if read { "1" } else { "0" }.to_string()],
            )
            .await?
            .convert()
            .map_err(err)?;
        Ok(match r.as_slice() {
            [-1, last] => ReceiptOutcome::OutOfRange { last_seq: *last as u64 },
            [0, ..] => ReceiptOutcome::Unchanged,
            [1, d, r] => ReceiptOutcome::Changed(ReceiptRow {
                user: user.to_string(),
                delivered_seq: *d as u64,
                read_seq: *r as u64,
            }),
            other => return Err(EngineError::Internal(format!("receipt returned {other:?}"))),
        })
    }

    async fn receipts(&self, conversation: &str) -> EngineResult<Vec<ReceiptRow>> {
        let all: HashMap<String, String> =
            self.inner.pool.next().hgetall(self.inner.keys.conv(conversation, "rcpt")).await.map_err(err)?;
        let mut rows: Vec<ReceiptRow> = all
            .into_iter()
            .filter_map(|(user, v)| {
                let (d, r) = v.split_once(':')?;
                Some(ReceiptRow { user, delivered_seq: d.parse().ok()?, read_seq: r.parse().ok()? })
            })
            .collect();
        rows.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(rows)
    }

    async fn user_conversations(&self, user: &str) -> EngineResult<Vec<String>> {
        let mut v: Vec<String> =
            self.inner.pool.next().smembers(self.inner.keys.user_convs(user)).await.map_err(err)?;
        v.sort();
        Ok(v)
    }

    async fn counters(&self, user: &str, conversations: &[String]) -> EngineResult<Vec<Counters>> {
        if conversations.is_empty() {
            return Ok(Vec::new());
        }
        let k = &self.inner.keys;
        let client = self.inner.pool.next();
        let pipe = client.pipeline();
        for c in conversations {
            let _: () = pipe.hget(k.conv(c, "meta"), "last").await.map_err(err)?;
            let _: () = pipe.hget(k.conv(c, "meta"), "epoch").await.map_err(err)?;
            let _: () = pipe.hget(k.conv(c, "rcpt"), user).await.map_err(err)?;
        }
        let first: Vec<Option<String>> = pipe.all().await.map_err(err)?;
        let mut base = Vec::with_capacity(conversations.len());
        let mut epochs = Vec::with_capacity(conversations.len());
        for triple in first.chunks(3) {
            let last: u64 = triple[0].as_deref().and_then(|s| s.parse().ok()).unwrap_or(0);
            let read: u64 =
                triple[2].as_deref().and_then(|s| s.split_once(':')).and_then(|(_, r)| r.parse().ok()).unwrap_or(0);
            base.push((last, read));
            epochs.push(Arc::<str>::from(triple[1].as_deref().unwrap_or_default()));
        }
        let pipe = client.pipeline();
        for (c, (_, read)) in conversations.iter().zip(&base) {
            let own = format!("{}{user}", k.conv(c, "own:"));
            let _: () = pipe.zcount(own, (*read + 1) as f64, f64::INFINITY).await.map_err(err)?;
        }
        let own: Vec<u64> = pipe.all().await.map_err(err)?;
        Ok(base
            .into_iter()
            .zip(own)
            .zip(epochs)
            .map(|(((last_seq, read_seq), own), epoch)| Counters {
                last_seq,
                read_seq,
                unread: last_seq.saturating_sub(read_seq).saturating_sub(own),
                epoch,
            })
            .collect())
    }
}

#[async_trait]
impl Groups for ValkeyEngine {
    async fn group(&self, conversation: &str) -> EngineResult<Option<Group>> {
        Ok(self.groups(&[conversation.to_string()]).await?.pop().flatten())
    }

    async fn groups(&self, conversations: &[String]) -> EngineResult<Vec<Option<Group>>> {
        if conversations.is_empty() {
            return Ok(Vec::new());
        }
        let k = &self.inner.keys;
        let pipe = self.inner.pool.next().pipeline();
        for c in conversations {
            let _: () = pipe.hmget(k.conv(c, "meta"), vec!["group", "title"]).await.map_err(err)?;
            let _: () = pipe.smembers(k.conv(c, "mem")).await.map_err(err)?;
        }
        let replies: Vec<fred::types::Value> = pipe.all().await.map_err(err)?;
        let mut out = Vec::with_capacity(conversations.len());
        for pair in replies.chunks(2) {
            let meta: Vec<Option<String>> = pair[0].clone().convert().map_err(err)?;
            if meta.first().cloned().flatten().as_deref() != Some("1") {
                out.push(None);
                continue;
            }
            let mut members: Vec<String> = pair[1].clone().convert().map_err(err)?;
            members.sort();
            out.push(Some(Group { title: meta.get(1).cloned().flatten().unwrap_or_default(), members }));
        }
        Ok(out)
    }

    async fn is_member(&self, conversation: &str, user: &str) -> EngineResult<bool> {
        self.inner.pool.next().sismember(self.inner.keys.conv(conversation, "mem"), user).await.map_err(err)
    }

    async fn put_group(&self, conversation: &str, title: &str, members: Vec<String>) -> EngineResult<MembershipChange> {
        // Members are indexed before they join and unindexed after they
        // leave, so a crash in between leaves an index entry that welcome
        // filters out, never a membership without its index entry.
        self.index(conversation, &members, true).await?;
        let mut args = vec!["put".to_string(), title.to_string()];
        args.extend(members);
        let change = self.run_group(conversation, args).await?.expect("put always returns a group");
        self.index(conversation, &change.removed, false).await?;
        Ok(change)
    }

    async fn update_group(
        &self,
        conversation: &str,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> EngineResult<Option<MembershipChange>> {
        self.index(conversation, &add, true).await?;
        let mut args = vec!["update".to_string(), add.len().to_string()];
        args.extend(add.iter().cloned());
        args.extend(remove);
        let Some(change) = self.run_group(conversation, args).await? else {
            // No such group: undo the optimistic index entries.
            self.index(conversation, &add, false).await?;
            return Ok(None);
        };
        self.index(conversation, &change.removed, false).await?;
        Ok(Some(change))
    }

    async fn join_open(&self, conversation: &str, user: &str) -> EngineResult<usize> {
        let key = self.inner.keys.conv(conversation, "open");
        let pipe = self.inner.pool.next().pipeline();
        let _: () = pipe.sadd(&key, user).await.map_err(err)?;
        let _: () = pipe.scard(&key).await.map_err(err)?;
        let r: (i64, usize) = pipe.all().await.map_err(err)?;
        Ok(r.1)
    }

    async fn open_members(&self, conversation: &str) -> EngineResult<Vec<String>> {
        let mut v: Vec<String> =
            self.inner.pool.next().smembers(self.inner.keys.conv(conversation, "open")).await.map_err(err)?;
        v.sort();
        Ok(v)
    }

    async fn member_count(&self, conversation: &str, open: bool) -> EngineResult<usize> {
        let key = self.inner.keys.conv(conversation, if open { "open" } else { "mem" });
        self.inner.pool.next().scard(key).await.map_err(err)
    }
}

#[async_trait]
impl Broker for ValkeyEngine {
    async fn publish(&self, route: &Route, event: Event) -> EngineResult<()> {
        self.inner.publish_payload(route, encode(&event)).await
    }

    async fn publish_all(&self, events: Vec<(Route, Event)>) -> EngineResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let i = &self.inner;
        let pipe = i.pool.next().pipeline();
        for (route, event) in &events {
            let payload = encode(event);
            for topic in route {
                let ch = i.keys.channel(topic);
                if i.cluster {
                    let _: () = pipe.spublish(ch, payload.as_str()).await.map_err(err)?;
                } else {
                    let _: () = pipe.publish(ch, payload.as_str()).await.map_err(err)?;
                }
            }
        }
        let _: Vec<fred::types::Value> = pipe.all().await.map_err(err)?;
        Ok(())
    }

    async fn typing_gate(&self, user: &str, conversation: &str, every: Duration) -> EngineResult<bool> {
        let key = format!("{}:{{u:{user}}}:typing:{conversation}", self.inner.keys.prefix);
        let set: Option<String> = self
            .inner
            .pool
            .next()
            .set(key, "1", Some(Expiration::PX(every.as_millis() as i64)), Some(SetOptions::NX), false)
            .await
            .map_err(err)?;
        Ok(set.is_some())
    }

    async fn subscribe(&self, topics: &[Topic]) -> EngineResult<()> {
        self.inner.subscribe(topics).await
    }

    fn topics_changed(&self) {
        self.inner.clone().reconcile();
    }
}

#[async_trait]
impl Presence for ValkeyEngine {
    async fn connection_count(&self, user: &str) -> EngineResult<usize> {
        let n: i64 = self.inner.presence("count", &[user]).await?.convert().map_err(err)?;
        Ok(n.max(0) as usize)
    }

    async fn presence_up(&self, user: &str) -> EngineResult<bool> {
        let r: i64 = self.inner.presence("up", &[user]).await?.convert().map_err(err)?;
        Ok(r == 1)
    }

    async fn presence_down(&self, user: &str) -> EngineResult<bool> {
        let r: i64 = self.inner.presence("down", &[user]).await?.convert().map_err(err)?;
        Ok(r == 1)
    }

    async fn online(&self, users: Option<&[String]>) -> EngineResult<Vec<String>> {
        let mut v: Vec<String> = match users {
            Some(list) => {
                if list.is_empty() {
                    return Ok(Vec::new());
                }
                let refs: Vec<&str> = list.iter().map(String::as_str).collect();
                self.inner.presence("online", &refs).await?.convert().map_err(err)?
            }
            None => self.inner.presence("all", &[]).await?.convert().map_err(err)?,
        };
        v.sort();
        Ok(v)
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
        if self.inner.sub.is_connected() {
            self.inner.healthy_at_ms.store(crate::protocol::now_ms(), Ordering::Release);
        }
        self.inner.sweep().await
    }

    fn maintenance_interval(&self) -> Option<Duration> {
        Some((self.inner.lease / 3).max(Duration::from_millis(500)))
    }

    async fn shutdown(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        let i = &self.inner;
        let client = i.pool.next();
        let _: Result<(), _> = client.zrem(i.keys.nodes(), i.node_id.as_str()).await;
        let _: Result<(), _> = client.del(format!("{}{}", i.keys.node_prefix(), i.node_id)).await;
        let _ = i.sub.quit().await;
        let _ = i.pool.quit().await;
    }
}

impl ValkeyEngine {
    /// Runs `group.lua` on a conversation; `None` when an update names no group.
    async fn run_group(&self, conversation: &str, args: Vec<String>) -> EngineResult<Option<MembershipChange>> {
        let k = &self.inner.keys;
        let keys = vec![k.conv(conversation, "mem"), k.conv(conversation, "meta")];
        let r = self.inner.scripts.group.run(&self.inner.pool, keys, args).await?;
        membership_change(conversation, r)
    }

    async fn index(&self, conversation: &str, users: &[String], add: bool) -> EngineResult<()> {
        if users.is_empty() {
            return Ok(());
        }
        let pipe = self.inner.pool.next().pipeline();
        for u in users {
            let key = self.inner.keys.user_convs(u);
            if add {
                let _: () = pipe.sadd(key, conversation).await.map_err(err)?;
            } else {
                let _: () = pipe.srem(key, conversation).await.map_err(err)?;
            }
        }
        let _: Vec<fred::types::Value> = pipe.all().await.map_err(err)?;
        Ok(())
    }
}

fn membership_change(conversation: &str, r: fred::types::Value) -> EngineResult<Option<MembershipChange>> {
    let parts: Vec<fred::types::Value> = r.convert().map_err(err)?;
    if parts.is_empty() {
        return Ok(None);
    }
    let [title, last, added, removed, members]: [fred::types::Value; 5] =
        parts.try_into().map_err(|_| EngineError::Internal("group script returned a wrong shape".into()))?;
    let mut added: Vec<String> = added.convert().map_err(err)?;
    let mut removed: Vec<String> = removed.convert().map_err(err)?;
    let mut members: Vec<String> = members.convert().map_err(err)?;
    added.sort();
    removed.sort();
    members.sort();
    Ok(Some(MembershipChange {
        conversation: ConversationObject {
            id: conversation.to_string(),
            title: title.convert().map_err(err)?,
            members,
            last_seq: last.convert().map_err(err)?,
        },
        added,
        removed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_roundtrip() {
        let mut e = Event::new(EventKind::Typing, Text::from("{\"x\":\"a\\nb\"}".to_string())).excluding("bob");
        e.stored_at_us = Some(42);
        let encoded = encode(&e);
        let d = decode(&encoded).unwrap();
        assert_eq!(d.event.kind, EventKind::Typing);
        assert_eq!(d.event.exclude_user.as_deref(), Some("bob"));
        assert_eq!(d.event.stored_at_us, Some(42));
        assert_eq!(d.event.frame.as_str(), e.frame.as_str());
        assert!(d.seq.is_none());
        assert!(d.traceparent.is_none(), "no trace without OpenTelemetry");
        let m =
            Event::new(EventKind::Membership { conversation: "deal".into(), member: true }, Text::from_static("{}"));
        let encoded = encode(&m);
        let d = decode(&encoded).unwrap();
        assert_eq!(d.event.kind, EventKind::Membership { conversation: "deal".into(), member: true });
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let raw = format!("m\t\t7\tgeneral\t{tp}\t12:e1\n{{\"a\":1}}");
        let d = decode(&raw).unwrap();
        assert_eq!(d.event.kind, EventKind::Message);
        assert_eq!(d.seq, Some(("general".into(), "e1".into(), 12)));
        assert_eq!(d.traceparent, Some(tp));
    }

    #[test]
    fn channel_names_map_back_to_topics() {
        let k = Keys { prefix: "chat".into() };
        for t in [Topic::Conv("deal:42@x".into()), Topic::User("alice".into())] {
            assert_eq!(k.topic(&k.channel(&t)), Some(t.clone()));
        }
        assert_eq!(k.conv("general", "meta"), "chat:{c:general}:meta");
        assert_eq!(k.topic("other:{c:x}:ev"), None);
    }
}
