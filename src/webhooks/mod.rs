//! Signed webhooks to the CRM backend (PROTOCOL v1.1, *Webhooks*).
//!
//! # Flow
//! An action ([`crate::node::Node`]: a stored message, a read mark, a group
//! change, presence) calls [`Webhooks::emit`], which only builds the event
//! (id, body, the action's trace) and hands it to a bounded in-process queue:
//! emitting never waits, so `send` -> `ack` does not slow down, whatever the
//! receiver does. The emitter task moves queued events to the engine's
//! [`Outbox`] in batches; the delivery task takes events from the outbox,
//! POSTs them signed (Standard Webhooks: `webhook-id`, `webhook-timestamp`,
//! `webhook-signature`), and retries failures with exponential backoff (1 s,
//! doubling, at most `webhooks.max_backoff_s`) until `webhooks.max_age_s`,
//! when they are dropped (metric and log line).
//!
//! # Guarantees
//! - At least once, the same `webhook-id` on every attempt; the signature's
//!   timestamp is the attempt's (receivers refuse stale timestamps).
//! - Valkey engine: the outbox is a stream with a consumer group shared by
//!   every node, so each event is taken by one node; events a node took and
//!   did not finish (it died) are claimed by another after
//!   `2 x webhooks.timeout_ms + 10 s`, and retries wait in Valkey, so a
//!   restart of any node loses none. What is lost: events still in the
//!   emitting node's hand-off queue when it is killed (milliseconds' worth).
//! - Embedded engine: the outbox is in process memory ([`MemoryOutbox`]);
//!   events not delivered yet are lost when the process stops.
//! - Bounded: the hand-off queue holds [`QUEUE`] events (past it new events
//!   are dropped, counted as `queue_full`: the outbox is unreachable); the
//!   outbox holds `webhooks.outbox_max` events and `webhooks.outbox_max_bytes`
//!   bytes (past either the oldest are dropped,
//!   counted as `outbox_full`: the receiver has been down for long).
//!
//! # Erasure
//! `message.created` events carry the message body. An erasure of a user
//! (`DELETE /api/v1/users/{id}/messages`) rewrites every such event of the
//! user not delivered yet, wherever it waits (outbox, retries, a node's
//! hand-off queue, an attempt in flight that fails): it is still sent, once,
//! under its `webhook-id`, with `body` empty and `deleted: true`, as history
//! shows the message ([`Webhooks::erase`], [`Outbox::erase`]).
//!
//! # `message.unread`
//! Storing a message asks for a check of its conversation
//! `webhooks.unread_after_s` later (one pending check per conversation, not a
//! timer per message). When it comes due, one node compares each member's
//! delivered mark with the conversation's messages (`node/webhooks.rs`).

mod delivery;
mod outbox;
mod sign;

use std::sync::{
    Arc,
    atomic::{AtomicI64, AtomicU64, Ordering},
};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
};

pub use outbox::{Claimed, Envelope, Erasable, MemoryOutbox, Outbox};
pub use sign::{sign, signing_key};

use crate::{config::WebhooksConfig, metrics, protocol};

/// Events waiting in one node's hand-off queue at most.
pub const QUEUE: usize = 16_384;
/// The least time between two warnings of the same kind of drop.
const WARN_EVERY_MS: i64 = 10_000;

/// A warning that comes at most every [`WARN_EVERY_MS`], with the number of
/// drops since the last one (a flood logged a line per push or per event:
/// 85,000 lines in 10 s). The metric counts every drop.
struct Throttled {
    last_ms: AtomicI64,
    unreported: AtomicU64,
}

impl Throttled {
    fn new() -> Self {
        Throttled { last_ms: AtomicI64::new(i64::MIN / 2), unreported: AtomicU64::new(0) }
    }

    /// Counts `n` drops; the number to report when a line is due now.
    fn drops(&self, n: u64) -> Option<u64> {
        self.unreported.fetch_add(n, Ordering::Relaxed);
        let now = protocol::now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = now.saturating_sub(last) >= WARN_EVERY_MS
            && self.last_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok();
        due.then(|| self.unreported.swap(0, Ordering::Relaxed))
    }
}

/// The event types (PROTOCOL v1.1, *Webhooks*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    MessageCreated,
    MessageRead,
    ConversationUpdated,
    MessageUnread,
    UserOnline,
    UserOffline,
    /// v1.2: a message was edited, deleted or reacted to.
    MessageUpdated,
}

impl EventType {
    pub const ALL: [EventType; 7] = [
        EventType::MessageCreated,
        EventType::MessageRead,
        EventType::ConversationUpdated,
        EventType::MessageUnread,
        EventType::UserOnline,
        EventType::UserOffline,
        EventType::MessageUpdated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::MessageCreated => "message.created",
            EventType::MessageRead => "message.read",
            EventType::ConversationUpdated => "conversation.updated",
            EventType::MessageUnread => "message.unread",
            EventType::UserOnline => "user.online",
            EventType::UserOffline => "user.offline",
            EventType::MessageUpdated => "message.updated",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// `user.online` / `user.offline`: off unless asked for.
    pub fn is_presence(self) -> bool {
        matches!(self, EventType::UserOnline | EventType::UserOffline)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// What the emitter task moves to the outbox.
enum Queued {
    Event(Envelope),
    Unread { conversation: String, due_ms: i64 },
}

/// A node's webhook sender: present when `webhooks.url` is set.
pub struct Webhooks {
    cfg: WebhooksConfig,
    /// Bit per [`EventType`] sent.
    enabled: u8,
    tx: mpsc::Sender<Queued>,
    rx: Mutex<Option<mpsc::Receiver<Queued>>>,
    outbox: Arc<dyn Outbox>,
    /// Wakes the delivery task when this node queued events.
    wake: Notify,
    key: Vec<u8>,
    url: reqwest::Url,
    client: reqwest::Client,
    /// Warnings of events dropped by a full hand-off queue, by a full outbox.
    queue_full: Throttled,
    outbox_full: Throttled,
}

#[derive(Serialize)]
struct Body<'a, T: Serialize> {
    #[serde(rename = "type")]
    ty: &'static str,
    timestamp: &'a str,
    data: &'a T,
}

impl Webhooks {
    /// The node's webhook sender, or `None` when `webhooks.url` is unset.
    /// `outbox`: the engine's shared outbox; `None`: one in process memory.
    pub fn new(cfg: &WebhooksConfig, outbox: Option<Arc<dyn Outbox>>) -> anyhow::Result<Option<Arc<Webhooks>>> {
        let Some(url) = &cfg.url else { return Ok(None) };
        // https:// receivers: rustls with ring, as everywhere in the process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = reqwest::Url::parse(url.expose())?;
        let secret = cfg.secret.as_ref().ok_or_else(|| anyhow::anyhow!("webhooks.secret is required with url"))?;
        let key = signing_key(secret.expose()).map_err(|e| anyhow::anyhow!("webhooks.secret: {e}"))?;
        let mut enabled = 0;
        for e in &cfg.events {
            if let Some(t) = EventType::parse(e) {
                enabled |= t.bit();
            }
        }
        if cfg.presence {
            enabled |= EventType::UserOnline.bit() | EventType::UserOffline.bit();
        }
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(std::time::Duration::from_millis(cfg.timeout_ms))
            // A redirect is a failed attempt: the signed request goes only
            // where it was configured to.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("crm-chat/", env!("CARGO_PKG_VERSION"), " (webhooks)"))
            .pool_max_idle_per_host(cfg.concurrency)
            .build()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = outbox.is_some();
        let outbox = outbox.unwrap_or_else(|| Arc::new(MemoryOutbox::default()));
        tracing::info!(
            host = url.host_str().unwrap_or_default(),
            events = ?cfg.events,
            presence = cfg.presence,
            outbox = if shared { "valkey (shared by every node)" } else { "in process (lost on restart)" },
            "webhooks on"
        );
        Ok(Some(Arc::new(Webhooks {
            cfg: cfg.clone(),
            enabled,
            tx,
            rx: Mutex::new(Some(rx)),
            outbox,
            wake: Notify::new(),
            key,
            url,
            client,
            queue_full: Throttled::new(),
            outbox_full: Throttled::new(),
        })))
    }

    pub fn wants(&self, ty: EventType) -> bool {
        self.enabled & ty.bit() != 0
    }

    pub fn outbox(&self) -> &Arc<dyn Outbox> {
        &self.outbox
    }

    pub fn unread_after_ms(&self) -> i64 {
        (self.cfg.unread_after_s as i64).saturating_mul(1000)
    }

    /// Queues an event of type `ty` with `data`, when that type is sent.
    /// Never waits; a full hand-off queue drops the event (counted).
    pub fn emit<T: Serialize>(&self, ty: EventType, data: &T) {
        self.emit_erasable(ty, data, None)
    }

    /// [`Webhooks::emit`] for an event carrying a message body of `author`,
    /// so that an erasure of the author finds it ([`Webhooks::erase`]).
    pub fn emit_erasable<T: Serialize>(&self, ty: EventType, data: &T, author: Option<Erasable>) {
        if !self.wants(ty) {
            return;
        }
        let now = protocol::now_ms();
        let body = match serde_json::to_string(&Body { ty: ty.as_str(), timestamp: &protocol::format_ts(now), data }) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, event = ty.as_str(), "webhook body not serialisable");
                return;
            }
        };
        let envelope = Envelope {
            erasable: author,
            id: format!("msg_{now:012x}{:016x}", rand::random::<u64>()),
            created_ms: now,
            attempt: 0,
            body,
            trace: crate::telemetry::traceparent(),
        };
        if self.tx.try_send(Queued::Event(envelope)).is_ok() {
            metrics::webhook_queued(ty.as_str());
        } else {
            metrics::webhook_dropped("queue_full", 1);
            if let Some(dropped) = self.queue_full.drops(1) {
                tracing::warn!(
                    dropped,
                    event = ty.as_str(),
                    "webhook hand-off queue full: events dropped (this line comes at most every 10 s)"
                );
            }
        }
    }

    /// `sender`'s messages that arrived up to `upto_ms` were erased: so are
    /// their bodies in every `message.created` not delivered yet (they go
    /// out with an empty body and `deleted: true`). Returns how many waiting
    /// events were rewritten.
    pub async fn erase(&self, sender: &str, upto_ms: i64) -> crate::error::EngineResult<u64> {
        // Events older than webhooks.max_age_s are dropped anyway.
        let keep_ms = (self.cfg.max_age_s as i64).saturating_mul(1000);
        let n = self.outbox.erase(sender, upto_ms, keep_ms).await?;
        if n > 0 {
            tracing::info!(user = sender, events = n, "erased bodies removed from webhook events not delivered yet");
        }
        Ok(n)
    }

    /// A message was stored in `conversation` at `stored_ms`: check its
    /// members' delivery `webhooks.unread_after_s` later.
    pub fn schedule_unread(&self, conversation: &str, stored_ms: i64) {
        if !self.wants(EventType::MessageUnread) {
            return;
        }
        let due_ms = stored_ms.saturating_add(self.unread_after_ms());
        // A full queue: the next message of the conversation asks again.
        let _ = self.tx.try_send(Queued::Unread { conversation: conversation.to_string(), due_ms });
    }

    /// Starts the emitter and delivery tasks (once).
    pub fn spawn(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let Some(rx) = self.rx.lock().take() else { return Vec::new() };
        vec![tokio::spawn(self.clone().emit_loop(rx)), tokio::spawn(self.clone().deliver_loop())]
    }

    /// Moves queued events to the outbox in batches. While the outbox is
    /// unreachable the batch waits and the hand-off queue fills (then drops).
    async fn emit_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Queued>) {
        let mut buf = Vec::with_capacity(256);
        while rx.recv_many(&mut buf, 256).await > 0 {
            let mut events = Vec::new();
            let mut unread: Vec<(String, i64)> = Vec::new();
            for q in buf.drain(..) {
                match q {
                    Queued::Event(e) => events.push(e),
                    Queued::Unread { conversation, due_ms } => {
                        // The earliest per conversation is what counts.
                        match unread.iter_mut().find(|(c, _)| *c == conversation) {
                            Some((_, d)) => *d = (*d).min(due_ms),
                            None => unread.push((conversation, due_ms)),
                        }
                    }
                }
            }
            let mut wait = std::time::Duration::from_millis(100);
            while !events.is_empty() {
                match self.outbox.push(&events, self.cfg.outbox_max, self.cfg.outbox_max_bytes).await {
                    Ok(dropped) => {
                        if dropped > 0 {
                            metrics::webhook_dropped("outbox_full", dropped);
                            if let Some(dropped) = self.outbox_full.drops(dropped) {
                                tracing::warn!(
                                    dropped,
                                    outbox_max = self.cfg.outbox_max,
                                    outbox_max_bytes = self.cfg.outbox_max_bytes,
                                    "webhook outbox full: oldest events dropped (this line comes at most every 10 s)"
                                );
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, events = events.len(), "webhook outbox unavailable; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(std::time::Duration::from_secs(2));
                    }
                }
            }
            for (conversation, due_ms) in unread {
                if let Err(e) = self.outbox.schedule_unread(&conversation, due_ms).await {
                    tracing::warn!(error = %e, conversation, "cannot schedule the unread check");
                }
            }
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;

    #[test]
    fn a_throttled_warning_comes_once_per_period_with_the_drops_since() {
        let t = Throttled::new();
        assert_eq!(t.drops(3), Some(3), "the first drop is reported at once");
        assert_eq!(t.drops(2), None);
        assert_eq!(t.drops(5), None);
        // The period is over: the next line carries the 7 dropped meanwhile plus its own.
        t.last_ms.store(protocol::now_ms() - WARN_EVERY_MS, Ordering::Relaxed);
        assert_eq!(t.drops(1), Some(8));
        assert_eq!(t.drops(1), None);
    }
}
