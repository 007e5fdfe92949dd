//! The transport-agnostic core: membership rules, sending, receipts, typing,
//! history, presence and the service API's operations. WebSocket sessions and
//! HTTP handlers both call into a [`Node`]; the node calls its [`Engine`].

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

mod bytes;
mod changes;
mod groups;
mod reads;
mod sessions;
mod streams;
mod webhooks;

use parking_lot::Mutex;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use serde_json::Value;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::{
    auth::Authenticator,
    config::{Config, RATE_MAX, RATE_MIN},
    engine::{Appended, Engine, MembershipChange, MessagePage, NewMessage, Page, ReceiptOutcome, Route},
    error::{ChatError, EngineResult},
    hub::{Conn, Event, EventKind, Hub, Topic},
    ids::{self, Dm},
    metrics,
    protocol::{
        self, ConversationEntry, ConversationEvent, ConversationObject, HistoryPage, MessageFrame, PresenceChange,
        PresenceReply, ReceiptState, SenderRef, ServerFrame, Text, UserRef,
    },
};

/// What kind of conversation an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    /// `dm:<a>:<b>`: exactly those two users.
    Direct(&'a str, &'a str),
    /// Listed in `chat.open_conversations`: every authenticated user.
    Open,
    /// Managed by the platform through the service API.
    Group,
}

impl Kind<'_> {
    pub fn route(&self, conversation: &str) -> Route {
        match self {
            Kind::Direct(a, b) => vec![Topic::User((*a).into()), Topic::User((*b).into())],
            Kind::Open | Kind::Group => vec![Topic::Conv(conversation.into())],
        }
    }
}

pub struct Node {
    pub cfg: Arc<Config>,
    /// Only the node talks to the engine: the transport goes through the
    /// node's methods (see the `impl Node` block "The engine door").
    engine: Arc<dyn Engine>,
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    pub node_id: String,
    open: HashSet<String>,
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
    /// Per-user connect bucket on this node (`limits.connects_per_s`).
    connects: DefaultKeyedRateLimiter<Arc<str>>,
    /// `limits.send_bytes_per_s`: bytes of message bodies per user.
    bytes_limiter: DefaultKeyedRateLimiter<Arc<str>>,
    draining: AtomicBool,
    next_conn: AtomicU64,
    /// Every WebSocket session task, so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// WebSocket sessions open on this node (for `limits.max_connections`).
    sessions_open: Arc<AtomicUsize>,
    /// (user, conversation) -> when a typing event was last forwarded.
    typing_seen: Mutex<HashMap<UserConversation, Instant>>,
    /// conversation -> (member count, when read): decides batching.
    member_counts: Mutex<HashMap<Arc<str>, (usize, Instant)>>,
    /// Webhooks to the CRM backend, when `webhooks.url` is set.
    webhooks: Option<Arc<crate::webhooks::Webhooks>>,
}

/// A (user, conversation) pair.
type UserConversation = (Arc<str>, Arc<str>);

/// A token-bucket quota that cannot panic for any rate validation accepts
/// (and clamps what it does not).
pub fn quota(per_s: f64, burst: u32) -> Quota {
    let per_s = if per_s.is_finite() { per_s.clamp(RATE_MIN, RATE_MAX) } else { RATE_MAX };
    let period = Duration::from_secs_f64(1.0 / per_s).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX)).allow_burst(burst)
}

/// Typing is forwarded at most once per this, per user and conversation.
const TYPING_EVERY: Duration = Duration::from_secs(1);
/// How long a conversation's member count is trusted for batching decisions.
const MEMBER_COUNT_TTL: Duration = Duration::from_secs(5);
/// Entries kept in the small per-node caches before they are pruned.
const CACHE_MAX: usize = 10_000;

/// A WebSocket session's place under `limits.max_connections`; freed on drop.
pub struct SessionSlot(Arc<AtomicUsize>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a session needs after [`Node::open_session`].
pub struct OpenSession {
    pub entries: Vec<ConversationEntry>,
    /// The user went from offline to online (on any node).
    pub came_online: bool,
    /// The other participants of the user's direct conversations (presence).
    pub dm_partners: Vec<String>,
    /// Presence counted this connection (false when storage was full): pass
    /// to [`Node::close_session`].
    pub counted: bool,
}

fn title_case(id: &str) -> String {
    let mut c = id.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

impl Node {
    pub fn new(cfg: Arc<Config>, engine: Arc<dyn Engine>, hub: Arc<Hub>) -> Arc<Node> {
        Self::with_webhooks(cfg, engine, hub, None)
    }

    /// A node that sends `webhooks` (see [`crate::webhooks::Webhooks::new`]).
    pub fn with_webhooks(
        cfg: Arc<Config>,
        engine: Arc<dyn Engine>,
        hub: Arc<Hub>,
        webhooks: Option<Arc<crate::webhooks::Webhooks>>,
    ) -> Arc<Node> {
        let l = &cfg.limits;
        let quota = quota(l.send_per_s, l.send_burst);
        Arc::new(Node {
            typing_seen: Mutex::default(),
            member_counts: Mutex::default(),
            sessions_open: Arc::new(AtomicUsize::new(0)),
            auth: Authenticator::new(&cfg),
            node_id: cfg.node_id(),
            open: cfg.chat.open_conversations.iter().cloned().collect(),
            limiter: RateLimiter::keyed(quota),
            connects: RateLimiter::keyed(self::quota(l.connects_per_s, l.connects_burst)),
            bytes_limiter: RateLimiter::keyed(self::quota(
                l.send_bytes_per_s as f64,
                u32::try_from(l.send_bytes_burst).unwrap_or(u32::MAX),
            )),
            draining: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            sessions: TaskTracker::new(),
            cfg,
            engine,
            hub,
            webhooks,
        })
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes a session slot, or `None` when `limits.max_connections`
    /// sessions are open on this node.
    pub fn session_slot(&self) -> Option<SessionSlot> {
        let max = self.cfg.limits.max_connections;
        let prev = self.sessions_open.fetch_add(1, Ordering::AcqRel);
        let slot = SessionSlot(self.sessions_open.clone());
        (prev < max).then_some(slot)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub async fn ready(&self) -> bool {
        !self.is_draining() && self.engine.ready().await
    }

    /// Takes one send token of `user`; the error says when to retry.
    pub fn check_send_rate(&self, user: &Arc<str>) -> Result<(), ChatError> {
        self.limiter.check_key(user).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            ChatError::rate_limited(wait.as_millis() as u64)
        })
    }

    /// Forgets rate-limit state of idle users and stale cache entries
    /// (called periodically).
    pub fn prune_rate_limits(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.connects.retain_recent();
        self.connects.shrink_to_fit();
        self.bytes_limiter.retain_recent();
        self.bytes_limiter.shrink_to_fit();
        let now = Instant::now();
        self.typing_seen.lock().retain(|_, t| now.duration_since(*t) < TYPING_EVERY);
        self.member_counts.lock().retain(|_, (_, t)| now.duration_since(*t) < MEMBER_COUNT_TTL);
    }

    /// Whether a typing event of `user` in `conversation` may be forwarded
    /// now: at most one per second per user and conversation on this node,
    /// however many connections the user has.
    fn typing_allowed(&self, user: &str, conversation: &str) -> bool {
        let now = Instant::now();
        let mut seen = self.typing_seen.lock();
        if seen.len() >= CACHE_MAX {
            seen.retain(|_, t| now.duration_since(*t) < TYPING_EVERY);
        }
        let key: (Arc<str>, Arc<str>) = (user.into(), conversation.into());
        match seen.get(&key) {
            Some(t) if now.duration_since(*t) < TYPING_EVERY => false,
            _ => {
                // Still full of fresh entries (a flood of distinct ids): refuse
                // rather than grow.
                if seen.len() >= CACHE_MAX {
                    return false;
                }
                seen.insert(key, now);
                true
            }
        }
    }

    /// Whether presence, receipt and typing pushes of a conversation are batched
    /// (more than `limits.batch_members` members). Direct conversations never are.
    async fn batched(&self, kind: Kind<'_>, conversation: &str) -> Result<bool, ChatError> {
        let open = match kind {
            Kind::Direct(..) => return Ok(false),
            Kind::Open => true,
            Kind::Group => false,
        };
        Ok(self.member_count(conversation, open).await? > self.cfg.limits.batch_members)
    }

    /// A conversation's member count, cached for a few seconds.
    async fn member_count(&self, conversation: &str, open: bool) -> Result<usize, ChatError> {
        let now = Instant::now();
        if let Some((n, at)) = self.member_counts.lock().get(conversation)
            && now.duration_since(*at) < MEMBER_COUNT_TTL
        {
            return Ok(*n);
        }
        let n = self.engine.member_count(conversation, open).await?;
        self.remember_member_count(conversation, n);
        Ok(n)
    }

    fn remember_member_count(&self, conversation: &str, n: usize) {
        let mut cache = self.member_counts.lock();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(conversation.into(), (n, Instant::now()));
    }

    /// Validates a conversation id and says what kind it is.
    pub fn classify<'a>(&self, conversation: &'a str) -> Result<Kind<'a>, ChatError> {
        if !ids::valid_conversation_id(conversation) {
            return Err(ChatError::bad_request("conversation id must be 1-128 chars of [A-Za-z0-9_.:@-]"));
        }
        match ids::parse_dm(conversation) {
            Dm::Pair(a, b) => Ok(Kind::Direct(a, b)),
            Dm::Malformed(why) => Err(ChatError::bad_request(why)),
            Dm::NotDm if self.open.contains(conversation) => Ok(Kind::Open),
            Dm::NotDm => Ok(Kind::Group),
        }
    }

    /// Checks that `user` may use the conversation. A conversation the user
    /// may not see answers `forbidden` whether it exists or not.
    pub async fn authorize<'a>(&self, user: &str, conversation: &'a str) -> Result<Kind<'a>, ChatError> {
        let kind = self.classify(conversation)?;
        let allowed = match kind {
            Kind::Direct(a, b) => user == a || user == b,
            Kind::Open => true,
            Kind::Group => self.engine.is_member(conversation, user).await?,
        };
        if allowed { Ok(kind) } else { Err(ChatError::forbidden(format!("not a member of '{conversation}'"))) }
    }

    /// Checks `client_msg_id` and `body` of a send.
    pub fn validate_message(&self, client_msg_id: &str, body: &str) -> Result<(), ChatError> {
        let n = client_msg_id.chars().count();
        if n == 0 || n > 64 {
            return Err(ChatError::bad_request("client_msg_id must be 1-64 characters"));
        }
        if body.chars().all(char::is_whitespace) {
            return Err(ChatError::bad_request("body must not be empty or only white space"));
        }
        let max = self.cfg.limits.max_body_chars;
        if body.chars().nth(max).is_some() {
            return Err(ChatError::too_large(format!("body longer than {max} characters")));
        }
        Ok(())
    }

    /// Stores a message and broadcasts it to every member's connections: the
    /// service API's post, which is not rate-limited (it draws nothing from
    /// the sender's send budget).
    pub async fn send(
        &self,
        sender: &UserRef,
        conversation: &str,
        client_msg_id: String,
        body: String,
        reply_to: Option<i64>,
    ) -> Result<Appended, ChatError> {
        self.validate_message(&client_msg_id, &body)?;
        self.append(sender, conversation, client_msg_id, body, reply_to, false).await
    }

    /// A WebSocket `send` whose fields were validated already: like
    /// [`Node::send`], and it draws from the sender's send budget where the
    /// engine keeps one across nodes (the session checked this node's).
    pub async fn store_message(
        &self,
        sender: &UserRef,
        conversation: &str,
        client_msg_id: String,
        body: String,
        reply_to: Option<i64>,
    ) -> Result<Appended, ChatError> {
        self.append(sender, conversation, client_msg_id, body, reply_to, true).await
    }

    async fn append(
        &self,
        sender: &UserRef,
        conversation: &str,
        client_msg_id: String,
        body: String,
        reply_to: Option<i64>,
        send_budget: bool,
    ) -> Result<Appended, ChatError> {
        // Group membership is checked by the engine in the same step as the write.
        let kind = self.classify(conversation)?;
        let participants = match kind {
            Kind::Direct(a, b) if sender.id == a || sender.id == b => Some([a.to_string(), b.to_string()]),
            Kind::Direct(..) => return Err(ChatError::forbidden(format!("not a member of '{conversation}'"))),
            _ => None,
        };
        if reply_to.is_some() {
            if kind == Kind::Group {
                self.authorize(&sender.id, conversation).await?;
            }
            self.check_reply_to(conversation, reply_to).await?;
        }
        let route = kind.route(conversation);
        // Kept for the webhook only when it is sent.
        let hook = self.wants_created().then(|| (body.clone(), client_msg_id.clone()));
        let msg = NewMessage {
            conversation: conversation.to_string(),
            sender: sender.clone(),
            body,
            client_msg_id,
            ts_ms: protocol::now_ms(),
            participants,
            require_member: kind == Kind::Group,
            send_budget,
            reply_to: reply_to.map(|r| r as u64),
        };
        let span = tracing::debug_span!("store", conversation, seq = tracing::field::Empty);
        let stored = self.engine.append(msg, &route).instrument(span.clone()).await?;
        let Some(appended) = stored else {
            return Err(ChatError::forbidden(format!("not a member of '{conversation}'")));
        };
        span.record("seq", appended.seq);
        if !appended.duplicate {
            metrics::message_stored();
            let (body, client_msg_id) = hook.as_ref().map_or(("", ""), |(b, c)| (b.as_str(), c.as_str()));
            self.on_stored(
                &MessageFrame {
                    conversation,
                    seq: appended.seq,
                    ts: appended.ts_ms,
                    sender: SenderRef { id: &sender.id, name: &sender.name },
                    body,
                    client_msg_id,
                    deleted: false,
                    reply_to: reply_to.map(|r| r as u64),
                    edited_at: None,
                    reactions: &[],
                },
                kind,
            );
        }
        tracing::debug!(user = %sender.id, conversation, seq = appended.seq, duplicate = appended.duplicate, "message stored");
        Ok(appended)
    }

    /// `delivered` / `read`: raises the user's marks and broadcasts the receipt.
    pub async fn receipt(&self, user: &str, conversation: &str, seq: i64, read: bool) -> Result<(), ChatError> {
        let kind = self.authorize(user, conversation).await?;
        let row = match self.engine.set_receipt(conversation, user, seq, read).await? {
            ReceiptOutcome::Changed(row) => row,
            ReceiptOutcome::Unchanged => return Ok(()),
            ReceiptOutcome::OutOfRange { last_seq: 0 } => {
                return Err(ChatError::bad_request(format!("'{conversation}' has no messages yet")));
            }
            ReceiptOutcome::OutOfRange { last_seq } => {
                return Err(ChatError::bad_request(format!("seq must be between 1 and {last_seq}")));
            }
        };
        let frame = protocol::render(&protocol::ServerFrame::Receipt(protocol::Receipt {
            conversation,
            user,
            delivered_seq: row.delivered_seq,
            read_seq: row.read_seq,
        }));
        let batch = self.batched(kind, conversation).await?;
        self.engine.publish(&kind.route(conversation), Event::new(EventKind::Receipt, frame).batched(batch)).await?;
        // A read mark that rose (a `read` at or below it changes nothing).
        if read && row.read_seq == seq as u64 {
            self.on_read(conversation, user, row.read_seq);
        }
        Ok(())
    }

    /// Forwards a typing event (at most one per second per user and
    /// conversation; extra ones are dropped silently, as typing is ephemeral).
    pub async fn typing(&self, user: &UserRef, conversation: &str) -> Result<(), ChatError> {
        let kind = self.authorize(&user.id, conversation).await?;
        if !self.typing_allowed(&user.id, conversation)
            || !self.engine.typing_gate(&user.id, conversation, TYPING_EVERY).await?
        {
            return Ok(());
        }
        let frame = protocol::render(&protocol::ServerFrame::Typing(protocol::Typing {
            conversation,
            user: SenderRef { id: &user.id, name: &user.name },
        }));
        let route: Route = match kind {
            // Only the other participant's topic.
            Kind::Direct(a, b) => vec![Topic::User(if a == user.id { b } else { a }.into())],
            _ => kind.route(conversation),
        };
        // Large conversations: collected and pushed once per interval (hub/batch.rs).
        let batch = self.batched(kind, conversation).await?;
        let event = Event::new(EventKind::Typing, frame).excluding(&user.id).batched(batch);
        self.engine.publish(&route, event).await?;
        Ok(())
    }
}

pub use self::changes::{Changed, MAX_EMOJI_CHARS, SYSTEM_USER, update_frame};

pub fn message_frame<'a>(conversation: &'a str, m: &'a crate::engine::StoredMessage) -> MessageFrame<'a> {
    MessageFrame {
        conversation,
        seq: m.seq,
        ts: m.ts_ms,
        sender: SenderRef { id: &m.sender_id, name: &m.sender_name },
        deleted: m.deleted,
        body: &m.body,
        client_msg_id: &m.client_msg_id,
        reply_to: m.reply_to,
        edited_at: m.edited_at,
        reactions: &m.reactions,
    }
}
