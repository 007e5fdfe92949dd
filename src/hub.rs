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
        atomic::{AtomicU16, AtomicUsize, Ordering},
    },
};

use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics,
    protocol::{
        Outgoing, PresenceBatch, PresenceState, ReceiptBatch, ReceiptState, ServerFrame, Text, close, kind, render,
        render_cuttable,
    },
};

/// Where an event is published.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Conv(Arc<str>),
    User(Arc<str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Message,
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
#[derive(Debug, Default)]
pub struct Closer {
    code: AtomicU16,
    token: CancellationToken,
}

impl Closer {
    /// Returns true if this call decided the code.
    pub fn close(&self, code: u16) -> bool {
        let won = self.code.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire).is_ok();
        self.token.cancel();
        won
    }
    pub fn code(&self) -> Option<u16> {
        match self.code.load(Ordering::Acquire) {
            0 => None,
            c => Some(c),
        }
    }
    pub async fn closed(&self) {
        self.token.cancelled().await
    }
}

/// A local connection as the hub sees it.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub user: Arc<str>,
    tx: mpsc::Sender<Outgoing>,
    /// Bytes queued and not yet taken by the writer.
    queued_bytes: AtomicUsize,
    /// The byte budget of the queue (`limits.outbound_bytes`).
    max_bytes: usize,
    pub closer: Closer,
    /// Conversation topics this connection is subscribed to.
    subs: Mutex<HashSet<Arc<str>>>,
}

impl Conn {
    /// A connection whose outbound queue holds at most `queue` frames and
    /// `max_bytes` bytes.
    pub fn new(id: u64, user: Arc<str>, queue: usize, max_bytes: usize) -> (Arc<Conn>, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(queue);
        let conn = Arc::new(Conn {
            id,
            user,
            tx,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            closer: Closer::default(),
            subs: Mutex::default(),
        });
        (conn, rx)
    }

    /// Queues a frame without waiting. A full queue (in frames or bytes)
    /// closes the connection with 1013 (slow consumer). Returns whether the
    /// frame was queued.
    pub fn push(&self, frame: impl Into<Outgoing>) -> bool {
        let frame = frame.into();
        let len = frame.len();
        let before = self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if before + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.slow_consumer("outbound bytes over limits.outbound_bytes");
            return false;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(e) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                if let mpsc::error::TrySendError::Full(_) = e {
                    self.slow_consumer("outbound queue full");
                }
                false
            }
        }
    }

    /// The writer took a frame of `len` bytes off the queue.
    pub fn taken(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
    }

    fn slow_consumer(&self, why: &'static str) {
        if self.closer.close(close::TRY_LATER) {
            metrics::slow_consumer_close();
            tracing::warn!(conn = self.id, user = %self.user, why, "slow consumer: closing 1013");
        }
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
}

/// The latest state per user of one conversation since the last flush.
#[derive(Default)]
struct Batch {
    presence: BTreeMap<Arc<str>, bool>,
    receipts: BTreeMap<Arc<str>, (u64, u64)>,
}

/// The fields of a single-change presence or receipt frame (v1 form), read
/// back when the change joins a batch.
#[derive(Deserialize)]
struct Change {
    user: Arc<str>,
    online: Option<bool>,
    delivered_seq: Option<u64>,
    read_seq: Option<u64>,
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
        let exclude = event.exclude_user.as_deref();
        let deliver = |set: &ConnSet| {
            let mut n = 0usize;
            for c in set.values() {
                if exclude.is_some_and(|u| *u == *c.user) {
                    continue;
                }
                if c.push(event.frame.clone()) {
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

    /// Adds a batchable change to its conversation's batch (dropped when no
    /// local connection follows the conversation).
    fn collect(&self, conv: &Arc<str>, event: &Event) {
        if !self.convs.read().contains_key(conv) {
            return;
        }
        let Ok(c) = serde_json::from_str::<Change>(event.frame.as_str()) else {
            tracing::warn!("unreadable batchable frame");
            return;
        };
        let mut batches = self.batches.lock();
        let b = batches.entry(conv.clone()).or_default();
        match (event.kind.clone(), c.online, c.delivered_seq, c.read_seq) {
            (EventKind::Presence, Some(online), ..) => {
                b.presence.insert(c.user, online);
            }
            (EventKind::Receipt, _, Some(d), Some(r)) => {
                let e = b.receipts.entry(c.user).or_default();
                *e = (e.0.max(d), e.1.max(r));
            }
            _ => {}
        }
    }

    /// Pushes every pending batch: one presence and one receipt frame per
    /// conversation to each subscribed connection, carrying the latest state
    /// per user. A connection does not hear its own user's presence.
    pub fn flush_batches(&self) {
        let batches = std::mem::take(&mut *self.batches.lock());
        for (conv, b) in batches {
            let conns: Vec<Arc<Conn>> = match self.convs.read().get(&conv) {
                Some(set) => set.values().cloned().collect(),
                None => continue,
            };
            if !b.receipts.is_empty() {
                let frame = render(&ServerFrame::ReceiptBatch(ReceiptBatch {
                    conversation: &conv,
                    receipts: b
                        .receipts
                        .iter()
                        .map(|(u, (d, r))| ReceiptState { user: u, delivered_seq: *d, read_seq: *r })
                        .collect(),
                }));
                self.push_all(&conns, kind::RECEIPT, |_| Some(frame.clone().into()));
            }
            if !b.presence.is_empty() {
                // One rendering for everyone; a connection whose user is in
                // the batch gets it with that entry cut out (no copy).
                let changes: Vec<PresenceState> =
                    b.presence.iter().map(|(u, online)| PresenceState { user: u, online: *online }).collect();
                let empty =
                    render(&ServerFrame::PresenceBatch(PresenceBatch { conversation: &conv, changes: Vec::new() }));
                let (all, cuts) = render_cuttable(empty, &changes);
                self.push_all(&conns, kind::PRESENCE, |c| match changes.binary_search_by(|p| p.user.cmp(&*c.user)) {
                    Ok(_) if changes.len() == 1 => None,
                    Ok(i) => Some(Outgoing::cut(&all, cuts[i].clone())),
                    Err(_) => Some(all.clone().into()),
                });
            }
        }
    }

    fn push_all(&self, conns: &[Arc<Conn>], ty: &'static str, mut frame: impl FnMut(&Conn) -> Option<Outgoing>) {
        let mut n = 0u64;
        for c in conns {
            if let Some(f) = frame(c)
                && c.push(f)
            {
                n += 1;
            }
        }
        if n > 0 {
            metrics::deliveries(n);
            metrics::frames_out(ty, n);
        }
    }

    fn apply_membership(&self, user: &str, conv: &Arc<str>, member: bool) {
        let conns: Vec<Arc<Conn>> = match self.users.read().get(user) {
            Some(set) => set.values().cloned().collect(),
            None => return,
        };
        if member {
            for c in &conns {
                self.subscribe(c, [conv.clone()]);
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
mod tests {
    use super::*;

    fn frame(s: &str) -> Text {
        Text::from(s.to_string())
    }

    #[test]
    fn conv_fanout_excludes_and_counts() {
        let hub = Hub::new();
        let (a, mut ra) = Conn::new(1, "alice".into(), 8, 1 << 20);
        let (b, mut rb) = Conn::new(2, "bob".into(), 8, 1 << 20);
        hub.register(&a);
        hub.register(&b);
        hub.subscribe(&a, ["g".into()]);
        hub.subscribe(&b, ["g".into()]);
        let topic = Topic::Conv("g".into());
        assert_eq!(hub.dispatch(&topic, &Event::new(EventKind::Message, frame("m"))), 2);
        assert_eq!(hub.dispatch(&topic, &Event::new(EventKind::Typing, frame("t")).excluding("alice")), 1);
        assert_eq!(ra.try_recv().unwrap().to_text(), "m");
        assert!(ra.try_recv().is_err());
        assert_eq!(rb.try_recv().unwrap().to_text(), "m");
        assert_eq!(rb.try_recv().unwrap().to_text(), "t");
        assert_eq!(hub.unregister(&a), 0);
        assert_eq!(hub.dispatch(&topic, &Event::new(EventKind::Message, frame("m2"))), 1);
        assert!(hub.wants(&topic));
        hub.unregister(&b);
        assert!(!hub.wants(&topic));
        assert!(hub.topics().is_empty());
    }

    #[test]
    fn full_queue_closes_1013_without_blocking_others() {
        let hub = Hub::new();
        let (slow, _rs) = Conn::new(1, "slow".into(), 8, 1 << 20);
        let (fast, mut rf) = Conn::new(2, "fast".into(), 64, 1 << 20);
        for c in [&slow, &fast] {
            hub.register(c);
            hub.subscribe(c, ["g".into()]);
        }
        for _ in 0..20 {
            hub.dispatch(&Topic::Conv("g".into()), &Event::new(EventKind::Message, frame("m")));
        }
        assert_eq!(slow.closer.code(), Some(1013));
        let mut got = 0;
        while rf.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 20);
    }

    #[test]
    fn byte_budget_closes_1013_and_frees_on_take() {
        let (c, mut rx) = Conn::new(1, "u".into(), 64, 100);
        assert!(c.push(frame(&"a".repeat(60))));
        // 60 + 60 > 100: refused, and the connection is a slow consumer.
        assert!(!c.push(frame(&"b".repeat(60))));
        assert_eq!(c.closer.code(), Some(1013));
        let f = rx.try_recv().unwrap();
        c.taken(f.len());
        assert_eq!(c.queued_bytes.load(Ordering::Acquire), 0);
    }

    #[test]
    fn batches_carry_the_latest_state_per_user_once_per_flush() {
        let hub = Hub::new();
        let (a, mut ra) = Conn::new(1, "alice".into(), 64, 1 << 20);
        let (b, mut rb) = Conn::new(2, "bob".into(), 64, 1 << 20);
        for c in [&a, &b] {
            hub.register(c);
            hub.subscribe(c, ["general".into()]);
        }
        let topic = Topic::Conv("general".into());
        let presence = |user: &str, online: bool| {
            let f = render(&crate::protocol::ServerFrame::PresenceChange(crate::protocol::PresenceChange {
                conversation: "general",
                user,
                online,
            }));
            Event::new(EventKind::Presence, f).excluding(user).batched(true)
        };
        let receipt = |user: &str, d: u64, r: u64| {
            let f = render(&crate::protocol::ServerFrame::Receipt(crate::protocol::Receipt {
                conversation: "general",
                user,
                delivered_seq: d,
                read_seq: r,
            }));
            Event::new(EventKind::Receipt, f).batched(true)
        };
        for e in [presence("carol", true), presence("carol", false), presence("alice", true), presence("dave", true)] {
            assert_eq!(hub.dispatch(&topic, &e), 0, "collected, not sent");
        }
        hub.dispatch(&topic, &receipt("carol", 3, 1));
        hub.dispatch(&topic, &receipt("carol", 5, 2));
        assert!(ra.try_recv().is_err(), "nothing before the flush");
        hub.flush_batches();
        let all = |rx: &mut mpsc::Receiver<Outgoing>| -> Vec<serde_json::Value> {
            std::iter::from_fn(|| rx.try_recv().ok()).map(|f| serde_json::from_str(&f.to_text()).unwrap()).collect()
        };
        let got_b = all(&mut rb);
        assert_eq!(got_b.len(), 2, "one receipt and one presence frame: {got_b:?}");
        assert_eq!(got_b[0]["receipts"], serde_json::json!([{"user":"carol","delivered_seq":5,"read_seq":2}]));
        assert_eq!(
            got_b[1]["changes"],
            serde_json::json!([
                {"user":"alice","online":true},{"user":"carol","online":false},{"user":"dave","online":true}
            ])
        );
        // Alice does not hear her own presence.
        let got_a = all(&mut ra);
        assert_eq!(
            got_a[1]["changes"],
            serde_json::json!([{"user":"carol","online":false},{"user":"dave","online":true}])
        );
        hub.flush_batches();
        assert!(rb.try_recv().is_err(), "a flush with nothing new sends nothing");
        // A conversation nobody here follows collects nothing.
        hub.dispatch(&Topic::Conv("elsewhere".into()), &presence("x", true));
        assert!(hub.batches.lock().is_empty());
    }

    #[test]
    fn disconnect_closes_every_connection_of_the_user_4001() {
        let hub = Hub::new();
        let (a1, mut r1) = Conn::new(1, "alice".into(), 8, 1 << 20);
        let (a2, _r2) = Conn::new(2, "alice".into(), 8, 1 << 20);
        let (b, _rb) = Conn::new(3, "bob".into(), 8, 1 << 20);
        for c in [&a1, &a2, &b] {
            hub.register(c);
        }
        hub.dispatch(&Topic::User("alice".into()), &Event::new(EventKind::Disconnect, frame("bye")));
        assert_eq!((a1.closer.code(), a2.closer.code(), b.closer.code()), (Some(4001), Some(4001), None));
        assert_eq!(r1.try_recv().unwrap().to_text(), "bye");
    }

    #[test]
    fn membership_event_moves_subscriptions() {
        let hub = Hub::new();
        let (c, mut rx) = Conn::new(1, "carol".into(), 8, 1 << 20);
        hub.register(&c);
        let conv: Arc<str> = "deal".into();
        let user = Topic::User("carol".into());
        let join = Event::new(EventKind::Membership { conversation: conv.clone(), member: true }, frame("joined"));
        hub.dispatch(&user, &join);
        assert_eq!(hub.dispatch(&Topic::Conv(conv.clone()), &Event::new(EventKind::Message, frame("m"))), 1);
        let leave = Event::new(EventKind::Membership { conversation: conv.clone(), member: false }, frame("left"));
        hub.dispatch(&user, &leave);
        assert_eq!(hub.dispatch(&Topic::Conv(conv), &Event::new(EventKind::Message, frame("m"))), 0);
        let got: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok()).map(|f| f.to_text().to_string()).collect();
        assert_eq!(got, ["joined", "m", "left"]);
    }
}
