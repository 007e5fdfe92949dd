//! Local fan-out: which connections of this node receive which events.
//!
//! Events arrive already serialised ([`Event::frame`]); the hub hands each
//! recipient a reference-counted clone of the same bytes, so fan-out to a
//! thousand members serialises once. Each connection has a bounded outbound
//! queue; a connection whose queue is full is closed with 1013 (a slow consumer
//! must not grow memory or slow the others) — [`Conn::push`] never waits.
//!
//! Two kinds of topic reach connections:
//! - `Topic::Conv(id)`: open and group conversations. A connection is
//!   subscribed to the conversations its user belongs to; membership events
//!   update that set while the connection is open.
//! - `Topic::User(id)`: everything addressed to one user: direct messages
//!   (`dm:` conversations have exactly two members, so they route by user and
//!   need no subscription), membership changes, presence in direct conversations.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU16, AtomicU32, Ordering},
    },
};

use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::{
    metrics,
    protocol::{
        Outgoing, PresenceBatch, PresenceState, ReceiptBatch, ReceiptState, SenderRef, ServerFrame, Text, TypingBatch,
        close, kind, render, render_cuttable,
    },
};

mod batch;
mod queue;
pub mod streams;

use batch::Batch;
use queue::{Full, Queue};

/// Where an event is published.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Conv(Arc<str>),
    User(Arc<str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Message,
    /// A change of a message (v1.2): like a message, it carries a seq.
    Update,
    Receipt,
    Typing,
    Presence,
    /// The user of a `Topic::User` was added to (`member: true`) or removed from
    /// a group conversation: subscribe or unsubscribe their connections.
    Membership {
        conversation: Arc<str>,
        member: bool,
    },
    /// Close every connection of the user of a `Topic::User` with 4001 (the
    /// service API's `disconnect`). The frame is the error sent before it.
    Disconnect,
}

impl EventKind {
    pub fn frame_type(&self) -> &'static str {
        match self {
            EventKind::Message => kind::MESSAGE,
            EventKind::Update => kind::UPDATE,
            EventKind::Receipt => kind::RECEIPT,
            EventKind::Typing => kind::TYPING,
            EventKind::Presence => kind::PRESENCE,
            EventKind::Membership { .. } => kind::CONVERSATION,
            EventKind::Disconnect => kind::ERROR,
        }
    }
}

/// One serialised server frame on its way to every local recipient.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    /// Connections of this user do not receive it (typing, own presence).
    pub exclude_user: Option<Arc<str>>,
    pub frame: Text,
    /// For messages: when it was stored (µs since the epoch), for the fan-out
    /// latency histogram; it crosses nodes inside the pub/sub payload.
    pub stored_at_us: Option<i64>,
    /// A presence or receipt change in a large conversation: collected and
    /// pushed in batches (PROTOCOL v1.1, *Batching*), not one frame each.
    pub batch: bool,
}

impl Event {
    pub fn new(kind: EventKind, frame: Text) -> Self {
        Self { kind, exclude_user: None, frame, stored_at_us: None, batch: false }
    }
    pub fn excluding(mut self, user: &str) -> Self {
        self.exclude_user = Some(user.into());
        self
    }
    pub fn batched(mut self, batch: bool) -> Self {
        self.batch = batch;
        self
    }
}

pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Asks a connection to close with a code; the first request wins.
/// Allocation-free (it lives in every connection's [`Conn`]).
#[derive(Debug, Default)]
pub struct Closer {
    code: AtomicU16,
    closing: Notify,
}

impl Closer {
    /// Returns true if this call decided the code.
    pub fn close(&self, code: u16) -> bool {
        let won = self.code.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire).is_ok();
        self.closing.notify_waiters();
        won
    }
    pub fn code(&self) -> Option<u16> {
        match self.code.load(Ordering::Acquire) {
            0 => None,
            c => Some(c),
        }
    }
    /// Ready once [`close`](Self::close) was called (before or after).
    pub async fn closed(&self) {
        // A `Notified` sees every `notify_waiters` from its creation on, so
        // a close between this check and the wait is not missed.
        let notified = self.closing.notified();
        if self.code().is_none() {
            notified.await;
        }
    }
}

/// A local connection as the hub sees it.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub user: Arc<str>,
    /// Frames waiting for the writer (`limits.outbound_queue` frames and
    /// `limits.outbound_bytes` bytes at most).
    queue: Queue,
    pub closer: Closer,
    /// Conversation topics this connection is subscribed to.
    subs: Mutex<HashSet<Arc<str>>>,
    /// Membership events that added this connection's user to a group:
    /// lets the connect-time check see an addition that raced it.
    joins: AtomicU32,
}

impl Conn {
    /// A connection whose outbound queue holds at most `queue` frames and
    /// `max_bytes` bytes.
    pub fn new(id: u64, user: Arc<str>, queue: usize, max_bytes: usize) -> (Arc<Conn>, Receiver) {
        let conn = Arc::new(Conn {
            id,
            user,
            queue: Queue::new(queue, max_bytes),
            closer: Closer::default(),
            subs: Mutex::default(),
            joins: AtomicU32::new(0),
        });
        let rx = Receiver(conn.clone());
        (conn, rx)
    }

    /// Queues a frame without waiting. A full queue (in frames or bytes)
    /// closes the connection with 1013 (slow consumer). Returns whether the
    /// frame was queued.
    pub fn push(&self, frame: impl Into<Outgoing>) -> bool {
        self.push_then(frame.into(), Queue::wake)
    }

    /// Queues a frame like [`Conn::push`], leaving the writer's wake-up to
    /// `wakes` (see [`Wakes`]).
    pub fn push_deferred(self: &Arc<Self>, frame: Outgoing, wakes: &mut Wakes) -> bool {
        self.push_then(frame, |_| wakes.0.push(self.clone()))
    }

    fn push_then(&self, frame: Outgoing, wake: impl FnOnce(&Queue)) -> bool {
        match self.queue.push_quiet(frame) {
            Ok(woken) => {
                if woken {
                    wake(&self.queue);
                }
                true
            }
            Err(Full::Bytes) => {
                self.slow_consumer("outbound bytes over limits.outbound_bytes");
                false
            }
            Err(Full::Frames) => {
                self.slow_consumer("outbound queue full");
                false
            }
        }
    }

    /// How many membership events added this user to a group while the
    /// connection was registered.
    pub fn joins(&self) -> u32 {
        self.joins.load(Ordering::Acquire)
    }

    fn slow_consumer(&self, why: &'static str) {
        if self.closer.close(close::TRY_LATER) {
            metrics::slow_consumer_close();
            tracing::warn!(conn = self.id, user = %self.user, why, "slow consumer: closing 1013");
        }
    }
}

/// Writers to wake once a run of fan-outs is queued: each connection whose
/// queue a deferred push found empty, woken when this is flushed or dropped.
///
/// A node that delivers messages one after another (the Valkey engine's
/// pub/sub receiver) queues a run of them before any writer runs, so each
/// writer sends the run in one write instead of racing the fan-out frame by
/// frame. The caller bounds the run; it must flush before it waits.
#[derive(Default)]
pub struct Wakes(Vec<Arc<Conn>>);

impl Wakes {
    /// Wakes every writer recorded so far.
    pub fn flush(&mut self) {
        for c in self.0.drain(..) {
            c.queue.wake();
        }
    }
}

impl Drop for Wakes {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The taking end of a connection's outbound queue: its writer's, one per
/// connection.
#[derive(Debug)]
pub struct Receiver(Arc<Conn>);

impl Receiver {
    /// The next frame, waiting for one (cancel-safe).
    pub async fn recv(&self) -> Outgoing {
        self.0.queue.recv().await
    }
    pub fn try_recv(&self) -> Option<Outgoing> {
        self.0.queue.try_recv()
    }
    /// See [`Queue::drain`].
    pub fn drain(&self, room: impl FnMut(&Outgoing) -> bool, put: impl FnMut(Outgoing)) {
        self.0.queue.drain(room, put)
    }
    pub fn len(&self) -> usize {
        self.0.queue.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Payload bytes waiting.
    pub fn bytes(&self) -> usize {
        self.0.queue.bytes()
    }
}

type ConnSet = HashMap<u64, Arc<Conn>>;

#[derive(Default)]
pub struct Hub {
    users: RwLock<HashMap<Arc<str>, ConnSet>>,
    convs: RwLock<HashMap<Arc<str>, ConnSet>>,
    /// Presence and receipt changes of large conversations waiting for the
    /// next [`Hub::flush_batches`]; only conversations with local subscribers.
    batches: Mutex<HashMap<Arc<str>, Batch>>,
    /// Open HTTP streaming sessions, by session id (their inboxes).
    pub streams: streams::Streams,
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    /// Registers a connection for its user's topic. Returns how many
    /// connections the user now has on this node.
    pub fn register(&self, conn: &Arc<Conn>) -> usize {
        let mut users = self.users.write();
        let set = users.entry(conn.user.clone()).or_default();
        set.insert(conn.id, conn.clone());
        set.len()
    }

    /// Subscribes a connection to conversation topics.
    pub fn subscribe(&self, conn: &Arc<Conn>, convs: impl IntoIterator<Item = Arc<str>>) {
        let mut map = self.convs.write();
        let mut subs = conn.subs.lock();
        for c in convs {
            map.entry(c.clone()).or_default().insert(conn.id, conn.clone());
            subs.insert(c);
        }
    }

    fn unsubscribe_locked(map: &mut HashMap<Arc<str>, ConnSet>, conn_id: u64, conv: &str) {
        if let Some(set) = map.get_mut(conv) {
            set.remove(&conn_id);
            if set.is_empty() {
                map.remove(conv);
            }
        }
    }

    /// Unsubscribes a connection from conversation topics.
    pub fn unsubscribe(&self, conn: &Conn, convs: &[Arc<str>]) {
        let mut map = self.convs.write();
        let mut subs = conn.subs.lock();
        for c in convs {
            subs.remove(c);
            Self::unsubscribe_locked(&mut map, conn.id, c);
        }
    }

    /// Conversation topics a connection is subscribed to now.
    pub fn subscriptions(&self, conn: &Conn) -> Vec<Arc<str>> {
        conn.subs.lock().iter().cloned().collect()
    }

    /// Removes a connection everywhere. Returns how many connections its user
    /// still has on this node.
    pub fn unregister(&self, conn: &Conn) -> usize {
        {
            let mut map = self.convs.write();
            for c in conn.subs.lock().drain() {
                Self::unsubscribe_locked(&mut map, conn.id, &c);
            }
        }
        let mut users = self.users.write();
        match users.get_mut(&conn.user) {
            Some(set) => {
                set.remove(&conn.id);
                let left = set.len();
                if left == 0 {
                    users.remove(&conn.user);
                }
                left
            }
            None => 0,
        }
    }

    /// Connections of a user on this node.
    pub fn user_connections(&self, user: &str) -> usize {
        self.users.read().get(user).map_or(0, HashMap::len)
    }

    /// Every local connection (for drain).
    pub fn connections(&self) -> Vec<Arc<Conn>> {
        self.users.read().values().flat_map(|s| s.values().cloned()).collect()
    }

    /// Topics some local connection needs (what a distributed engine subscribes to).
    pub fn topics(&self) -> Vec<Topic> {
        let mut out: Vec<Topic> = self.users.read().keys().map(|u| Topic::User(u.clone())).collect();
        out.extend(self.convs.read().keys().map(|c| Topic::Conv(c.clone())));
        out
    }

    /// Whether some local connection needs this topic.
    pub fn wants(&self, topic: &Topic) -> bool {
        match topic {
            Topic::User(u) => self.users.read().contains_key(u),
            Topic::Conv(c) => self.convs.read().contains_key(c),
        }
    }

    /// Delivers an event to the local connections of a topic. Returns the
    /// number of connections it was queued to.
    pub fn dispatch(&self, topic: &Topic, event: &Event) -> usize {
        self.dispatch_with(topic, event, |c, f| c.push(f))
    }

    /// [`Hub::dispatch`], with the writers' wake-ups left to `wakes`.
    pub fn dispatch_deferred(&self, topic: &Topic, event: &Event, wakes: &mut Wakes) -> usize {
        self.dispatch_with(topic, event, |c, f| c.push_deferred(f, wakes))
    }

    fn dispatch_with(&self, topic: &Topic, event: &Event, mut push: impl FnMut(&Arc<Conn>, Outgoing) -> bool) -> usize {
        let exclude = event.exclude_user.as_deref();
        let deliver = |set: &ConnSet| {
            let mut n = 0usize;
            for c in set.values() {
                if exclude.is_some_and(|u| *u == *c.user) {
                    continue;
                }
                if push(c, event.frame.clone().into()) {
                    n += 1;
                }
            }
            n
        };
        if event.batch
            && let Topic::Conv(conv) = topic
        {
            self.collect(conv, event);
            return 0;
        }
        let n = match topic {
            Topic::Conv(conv) => self.convs.read().get(conv).map_or(0, deliver),
            Topic::User(user) => {
                if let EventKind::Membership { conversation, member } = &event.kind {
                    self.apply_membership(user, conversation, *member);
                }
                let n = self.users.read().get(user).map_or(0, deliver);
                if event.kind == EventKind::Disconnect {
                    for c in self.users.read().get(user).into_iter().flat_map(|s| s.values()) {
                        c.closer.close(close::UNAUTHORIZED);
                    }
                }
                n
            }
        };
        if n > 0 {
            metrics::deliveries(n as u64);
            metrics::frames_out(event.kind.frame_type(), n as u64);
            if let Some(at) = event.stored_at_us {
                metrics::fanout_latency(((now_us() - at).max(0) as f64) / 1e6);
            }
        }
        n
    }

    fn apply_membership(&self, user: &str, conv: &Arc<str>, member: bool) {
        let conns: Vec<Arc<Conn>> = match self.users.read().get(user) {
            Some(set) => set.values().cloned().collect(),
            None => return,
        };
        if member {
            for c in &conns {
                self.subscribe(c, [conv.clone()]);
                c.joins.fetch_add(1, Ordering::AcqRel);
            }
        } else {
            let mut map = self.convs.write();
            for c in &conns {
                c.subs.lock().remove(conv);
                Self::unsubscribe_locked(&mut map, c.id, conv);
            }
        }
    }
}

#[cfg(test)]
mod tests;
