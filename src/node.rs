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
            draining: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            sessions: TaskTracker::new(),
            cfg,
            engine,
            hub,
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

    /// Whether presence and receipt pushes of a conversation are batched
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

    /// Stores a message and broadcasts it to every member's connections.
    pub async fn send(
        &self,
        sender: &UserRef,
        conversation: &str,
        client_msg_id: String,
        body: String,
    ) -> Result<Appended, ChatError> {
        self.validate_message(&client_msg_id, &body)?;
        self.store_message(sender, conversation, client_msg_id, body).await
    }

    /// [`Node::send`] for a message whose fields were validated already.
    pub async fn store_message(
        &self,
        sender: &UserRef,
        conversation: &str,
        client_msg_id: String,
        body: String,
    ) -> Result<Appended, ChatError> {
        // Group membership is checked by the engine in the same step as the write.
        let kind = self.classify(conversation)?;
        let participants = match kind {
            Kind::Direct(a, b) if sender.id == a || sender.id == b => Some([a.to_string(), b.to_string()]),
            Kind::Direct(..) => return Err(ChatError::forbidden(format!("not a member of '{conversation}'"))),
            _ => None,
        };
        let route = kind.route(conversation);
        let msg = NewMessage {
            conversation: conversation.to_string(),
            sender: sender.clone(),
            body,
            client_msg_id,
            ts_ms: protocol::now_ms(),
            participants,
            require_member: kind == Kind::Group,
        };
        let span = tracing::debug_span!("store", conversation, seq = tracing::field::Empty);
        let stored = self.engine.append(msg, &route).instrument(span.clone()).await?;
        let Some(appended) = stored else {
            return Err(ChatError::forbidden(format!("not a member of '{conversation}'")));
        };
        span.record("seq", appended.seq);
        if !appended.duplicate {
            metrics::message_stored();
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
        self.engine.publish(&route, Event::new(EventKind::Typing, frame).excluding(&user.id)).await?;
        Ok(())
    }

    /// A `history` reply (for both `history` and `sync`), at most
    /// `limits.max_reply_bytes` of JSON: a page that would be larger is cut
    /// short (fewer messages, `has_more: true`), keeping the messages nearest
    /// the cursor. `client_epoch`: the epoch a `sync` carried; when it
    /// differs from the stored one the reply pages from seq 1 with `reset`.
    pub async fn history(
        &self,
        user: &str,
        id: Option<&Value>,
        conversation: &str,
        page: Page,
        client_epoch: Option<&str>,
    ) -> Result<Text, ChatError> {
        let kind = self.authorize(user, conversation).await?;
        let mut got = self.engine.history(conversation, page).await?;
        let reset = client_epoch.is_some_and(|e| *e != *got.epoch);
        if reset
            && let Page::After(after, limit) = page
            && after > 0
        {
            got = self.engine.history(conversation, Page::After(0, limit)).await?;
        }
        let mut receipts = self.engine.receipts(conversation).await?;
        if kind == Kind::Group {
            // Receipts of members only (a removed member's marks stay stored).
            let members = self.engine.group(conversation).await?.map(|g| g.members).unwrap_or_default();
            receipts.retain(|r| members.binary_search(&r.user).is_ok());
        }
        let budget = self.cfg.limits.max_reply_bytes;
        // Receipts take at most half the reply; beyond that the most advanced
        // marks are kept (a conversation with tens of thousands of readers).
        let receipt_bytes = |r: &crate::engine::ReceiptRow| r.user.len() + 60;
        if receipts.iter().map(receipt_bytes).sum::<usize>() > budget / 2 {
            receipts.sort_by(|a, b| b.read_seq.cmp(&a.read_seq).then(b.delivered_seq.cmp(&a.delivered_seq)));
            let mut used = 0;
            receipts.retain(|r| {
                used += receipt_bytes(r);
                used <= budget / 2
            });
            receipts.sort_by(|a, b| a.user.cmp(&b.user));
        }
        let receipts: Vec<ReceiptState> = receipts
            .iter()
            .map(|r| ReceiptState { user: &r.user, delivered_seq: r.delivered_seq, read_seq: r.read_seq })
            .collect();
        let rendered: Vec<String> = got
            .messages
            .iter()
            .map(|m| serde_json::to_string(&message_frame(conversation, m)).expect("message frames serialise"))
            .collect();
        let head = protocol::render(&ServerFrame::History(HistoryPage {
            id,
            conversation,
            epoch: &got.epoch,
            reset,
            messages: Vec::new(),
            receipts: receipts.clone(),
            has_more: true,
        }));
        // What the messages may take: the budget less the rest of the reply
        // and a comma per message. The newest page keeps its newest messages,
        // a forward page its oldest; one message always fits (validated).
        let room = budget.saturating_sub(head.len());
        let mut keep = 0;
        let mut used = 0;
        let order: Box<dyn Iterator<Item = &String>> = match page {
            Page::Before(..) => Box::new(rendered.iter().rev()),
            Page::After(..) => Box::new(rendered.iter()),
        };
        for m in order {
            if keep > 0 && used + m.len() + 1 > room {
                break;
            }
            used += m.len() + 1;
            keep += 1;
        }
        let cut = keep < rendered.len();
        let kept: &[String] = match page {
            Page::Before(..) => &rendered[rendered.len() - keep..],
            Page::After(..) => &rendered[..keep],
        };
        let messages = kept
            .iter()
            .map(|m| serde_json::value::RawValue::from_string(m.clone()).expect("rendered JSON is valid"))
            .collect::<Vec<_>>();
        Ok(protocol::render(&ServerFrame::History(HistoryPage {
            id,
            conversation,
            epoch: &got.epoch,
            reset,
            messages: messages.iter().map(|m| &**m).collect(),
            receipts,
            has_more: got.has_more || cut,
        })))
    }

    pub async fn presence(&self, user: &str, id: Option<&Value>, conversation: &str) -> Result<Text, ChatError> {
        let kind = self.authorize(user, conversation).await?;
        let online = match kind {
            Kind::Direct(a, b) => self.engine.online(Some(&[a.to_string(), b.to_string()])).await?,
            Kind::Open => self.engine.online(None).await?,
            Kind::Group => {
                let members = self.engine.group(conversation).await?.map(|g| g.members).unwrap_or_default();
                self.engine.online(Some(&members)).await?
            }
        };
        Ok(protocol::render(&ServerFrame::PresenceReply(PresenceReply { id, conversation, online: &online })))
    }

    /// Conversation ids of a user: open ones first, then groups and direct
    /// conversations holding a message.
    pub async fn conversation_ids(&self, user: &str) -> Result<Vec<String>, ChatError> {
        let mut ids: Vec<String> = self.cfg.chat.open_conversations.clone();
        ids.extend(self.engine.user_conversations(user).await?);
        Ok(ids)
    }

    /// The entries `welcome` lists for these conversation ids.
    pub async fn entries(&self, user: &str, ids: &[String]) -> Result<Vec<ConversationEntry>, ChatError> {
        let counters = self.engine.counters(user, ids).await?;
        let groups: Vec<String> =
            ids.iter().filter(|id| matches!(self.classify(id), Ok(Kind::Group))).cloned().collect();
        let group_info = self.engine.groups(&groups).await?;
        let mut group_info = groups.iter().zip(group_info);
        let limit = self.cfg.limits.presence_max_members;
        let mut out = Vec::with_capacity(ids.len());
        for (id, c) in ids.iter().zip(counters) {
            let c = &c;
            let (title, kind, members) = match self.classify(id)? {
                Kind::Open => (title_case(id), "open", None),
                // Listed once it holds a message (an index entry left by a
                // failed first send does not count).
                Kind::Direct(..) if c.last_seq == 0 => continue,
                Kind::Direct(a, b) => {
                    (if a == user { b } else { a }.to_string(), "direct", Some(vec![a.to_string(), b.to_string()]))
                }
                Kind::Group => match group_info.next() {
                    // Membership is read from the group's own member set: an
                    // index entry left by a failed write grants nothing.
                    Some((_, Some(g))) if g.members.binary_search_by(|m| m.as_str().cmp(user)).is_ok() => {
                        let members = (g.members.len() <= limit).then_some(g.members);
                        (g.title, "group", members)
                    }
                    // Removed between the two reads, or never a member: not listed.
                    _ => continue,
                },
            };
            out.push(ConversationEntry {
                id: id.clone(),
                title,
                kind,
                last_seq: c.last_seq,
                read_seq: c.read_seq,
                unread: c.unread,
                epoch: c.epoch.to_string(),
                members,
            });
        }
        Ok(out)
    }

    pub async fn conversations_for(&self, user: &str) -> Result<Vec<ConversationEntry>, ChatError> {
        let ids = self.conversation_ids(user).await?;
        self.entries(user, &ids).await
    }

    /// Opens a session. The connect-time ordering rule, which makes
    /// membership exact under races and faults, lives here and nowhere else:
    ///
    /// 1. **Subscribe the user topic**: the connection is registered and the
    ///    user's topic subscribed, so membership events (added, removed)
    ///    reach it from now on. Open conversations are joined (fresh member
    ///    counts).
    /// 2. **Read membership**: the user's conversations are read from the
    ///    per-user index, and the candidate groups (and open conversations)
    ///    are **subscribed** before anything is verified, so a message sent
    ///    from here on arrives live.
    /// 3. **Verify against the group's member set**: each group's own member
    ///    set decides (the per-user index alone grants nothing); counters for
    ///    `welcome` are read in the same pass.
    /// 4. **Unsubscribe stale**: groups the user is not in are unsubscribed.
    /// 5. Presence is counted up here, but **announced after `welcome`** by
    ///    the caller ([`OpenSession::came_online`]): `welcome` is the
    ///    session's first frame, and the others hear the user came online
    ///    only once it is written.
    ///
    /// A removal after (3) arrives as an event on the user's topic (1); one
    /// before it is seen by (3).
    pub async fn open_session(&self, conn: &Arc<Conn>, user: &UserRef) -> Result<OpenSession, ChatError> {
        self.hub.register(conn);
        let user_topic = Topic::User(conn.user.clone());
        self.engine.subscribe(std::slice::from_ref(&user_topic)).await?;
        for c in &self.cfg.chat.open_conversations {
            // The exact count, fresh: whether this user's presence goes out
            // (and batched or not) is decided from it.
            let n = self.engine.join_open(c, &user.id).await?;
            self.remember_member_count(c, n);
        }
        let ids = self.conversation_ids(&user.id).await?;
        let convs: Vec<Arc<str>> = ids
            .iter()
            .filter(|id| matches!(self.classify(id), Ok(Kind::Open | Kind::Group)))
            .map(|id| Arc::from(id.as_str()))
            .collect();
        self.hub.subscribe(conn, convs.iter().cloned());
        let topics: Vec<Topic> = convs.into_iter().map(Topic::Conv).collect();
        self.engine.subscribe(&topics).await?;
        let entries = self.entries(&user.id, &ids).await?;
        let listed: HashSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let stale: Vec<Arc<str>> = topics
            .iter()
            .filter_map(|t| match t {
                Topic::Conv(c) if !listed.contains(&**c) && !self.open.contains(&**c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        if !stale.is_empty() {
            self.hub.unsubscribe(conn, &stale);
            self.engine.topics_changed();
        }
        let dm_partners = entries
            .iter()
            .filter_map(|e| match self.classify(&e.id) {
                Ok(Kind::Direct(a, b)) => Some(if a == user.id { b } else { a }.to_string()),
                _ => None,
            })
            .collect();
        let came_online = self.engine.presence_up(&user.id).await?;
        Ok(OpenSession { entries, came_online, dm_partners })
    }

    /// Undoes [`Node::open_session`]: unregisters the connection and, when
    /// `counted` and it was the user's last connection anywhere, announces
    /// the user offline.
    pub async fn close_session(&self, conn: &Conn, counted: bool, dm_partners: &[String]) {
        let convs = self.hub.subscriptions(conn);
        self.hub.unregister(conn);
        self.engine.topics_changed();
        if !counted {
            return;
        }
        match self.engine.presence_down(&conn.user).await {
            Ok(true) => {
                if let Err(e) = self.announce_presence(&conn.user, false, &convs, dm_partners).await {
                    tracing::debug!(error = %e, "presence announcement failed");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "presence update failed"),
        }
    }

    /// Pushes a user's presence change to the other members of `convs` (open
    /// and group conversations) and to `dm_partners`, in one engine round
    /// trip where the engine can, whatever their number. Conversations with
    /// more than `limits.presence_max_members` members get nothing; those with
    /// more than `limits.batch_members` get it batched.
    pub async fn announce_presence(
        &self,
        user: &str,
        online: bool,
        convs: &[Arc<str>],
        dm_partners: &[String],
    ) -> Result<(), ChatError> {
        let limit = self.cfg.limits.presence_max_members;
        let mut events = Vec::with_capacity(convs.len() + dm_partners.len());
        for conv in convs {
            let open = self.open.contains(&**conv);
            let n = self.member_count(conv, open).await?;
            if n > limit {
                continue;
            }
            let frame =
                protocol::render(&ServerFrame::PresenceChange(PresenceChange { conversation: conv, user, online }));
            let event =
                Event::new(EventKind::Presence, frame).excluding(user).batched(n > self.cfg.limits.batch_members);
            events.push((vec![Topic::Conv(conv.clone())], event));
        }
        for other in dm_partners {
            let id = ids::dm_id(user, other);
            let frame =
                protocol::render(&ServerFrame::PresenceChange(PresenceChange { conversation: &id, user, online }));
            events.push((vec![Topic::User(other.as_str().into())], Event::new(EventKind::Presence, frame)));
        }
        self.engine.publish_all(events).await?;
        Ok(())
    }

    /// A user whose node stopped answering went offline: tell their
    /// conversations (read from storage, as no session of theirs is here).
    pub async fn announce_offline(&self, user: &str) -> Result<(), ChatError> {
        let entries = self.conversations_for(user).await?;
        let mut convs = Vec::new();
        let mut partners = Vec::new();
        for e in &entries {
            match self.classify(&e.id)? {
                Kind::Direct(a, b) => partners.push(if a == user { b } else { a }.to_string()),
                _ => convs.push(Arc::from(e.id.as_str())),
            }
        }
        self.announce_presence(user, false, &convs, &partners).await
    }

    /// Closes every connection of `user` on every node with 4001 (the service
    /// API's `disconnect`). Returns how many were open across the cluster
    /// just before (as the engine counts them).
    pub async fn disconnect_user(&self, user: &str) -> Result<usize, ChatError> {
        let n = self.engine.connection_count(user).await?;
        let frame = protocol::error_code(None, crate::error::ErrorCode::Unauthorized, "signed out by the platform");
        self.engine.publish(&vec![Topic::User(user.into())], Event::new(EventKind::Disconnect, frame)).await?;
        Ok(n)
    }

    // ---- service API operations ----

    /// Checks an id for the group routes: valid, and neither direct nor open.
    pub fn group_id<'a>(&self, conversation: &'a str) -> Result<&'a str, ChatError> {
        match self.classify(conversation)? {
            Kind::Group => Ok(conversation),
            Kind::Direct(..) => {
                Err(ChatError::bad_request("direct conversations exist implicitly; they have no managed members"))
            }
            Kind::Open => Err(ChatError::bad_request(format!(
                "'{conversation}' is open to every user (chat.open_conversations); it has no managed members"
            ))),
        }
    }

    pub fn validate_members<'a>(&self, users: impl IntoIterator<Item = &'a String>) -> Result<(), ChatError> {
        for u in users {
            if !ids::valid_user_id(u) {
                let shown: String = u.chars().take(40).collect();
                return Err(ChatError::bad_request(format!(
                    "'{shown}' is not a user id (1-128 chars of [A-Za-z0-9_.@-])"
                )));
            }
        }
        Ok(())
    }

    /// Sends `conversation` events to members added and removed.
    pub async fn announce_membership(&self, change: &MembershipChange) -> Result<(), ChatError> {
        let conv: Arc<str> = change.conversation.id.as_str().into();
        for (users, member) in [(&change.added, true), (&change.removed, false)] {
            if users.is_empty() {
                continue;
            }
            let frame = protocol::render(&ServerFrame::Conversation(ConversationEvent {
                conversation: &change.conversation,
                member,
            }));
            for u in users {
                let event = Event::new(EventKind::Membership { conversation: conv.clone(), member }, frame.clone());
                self.engine.publish(&vec![Topic::User(u.as_str().into())], event).await?;
            }
        }
        Ok(())
    }

    /// The conversation object of any kind of conversation, `None` when a
    /// group does not exist.
    pub async fn conversation_object(&self, conversation: &str) -> Result<Option<ConversationObject>, ChatError> {
        let kind = self.classify(conversation)?;
        let (title, members) = match kind {
            Kind::Direct(a, b) => (String::new(), vec![a.to_string(), b.to_string()]),
            Kind::Open => (title_case(conversation), self.engine.open_members(conversation).await?),
            Kind::Group => match self.engine.group(conversation).await? {
                Some(g) => (g.title, g.members),
                None => return Ok(None),
            },
        };
        let last_seq = self.engine.last_seq(conversation).await?;
        Ok(Some(ConversationObject { id: conversation.to_string(), title, members, last_seq }))
    }
}

/// The engine door: everything outside the node (service API, health, the
/// app's upkeep and shutdown) reaches the engine through these methods, so
/// the transport never sees an [`Engine`]. Engine failures map to
/// [`ChatError`] as everywhere else in the node (`From<EngineError>`), except
/// for upkeep, whose caller only logs.
impl Node {
    /// The engine's name (`memory` or `valkey`), for logs and `/readyz`.
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Whether storage answers (for `/readyz`; draining is checked apart).
    pub async fn engine_ready(&self) -> bool {
        self.engine.ready().await
    }

    /// Creates or replaces a group (title and the whole member list).
    pub async fn put_group(
        &self,
        conversation: &str,
        title: &str,
        members: Vec<String>,
    ) -> Result<MembershipChange, ChatError> {
        Ok(self.engine.put_group(conversation, title, members).await?)
    }

    /// Adds and removes members of a group; `None` when it does not exist.
    pub async fn update_group(
        &self,
        conversation: &str,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<Option<MembershipChange>, ChatError> {
        Ok(self.engine.update_group(conversation, add, remove).await?)
    }

    /// Whether a group conversation exists.
    pub async fn group_exists(&self, conversation: &str) -> Result<bool, ChatError> {
        Ok(self.engine.group(conversation).await?.is_some())
    }

    /// One page of stored history, without authorization or reply budget
    /// (the service API's message list; sessions use [`Node::history`]).
    pub async fn history_page(&self, conversation: &str, page: Page) -> Result<MessagePage, ChatError> {
        Ok(self.engine.history(conversation, page).await?)
    }

    /// How often [`Node::maintain`] must run; `None`: never.
    pub fn maintenance_interval(&self) -> Option<Duration> {
        self.engine.maintenance_interval()
    }

    /// The engine's periodic upkeep. Returns users who went offline
    /// everywhere because their node stopped answering (announce them with
    /// [`Node::announce_offline`]).
    pub async fn maintain(&self) -> EngineResult<Vec<String>> {
        self.engine.maintain().await
    }

    /// Stops the engine's background work before exit.
    pub async fn shutdown_engine(&self) {
        self.engine.shutdown().await
    }
}

pub fn message_frame<'a>(conversation: &'a str, m: &'a crate::engine::StoredMessage) -> MessageFrame<'a> {
    MessageFrame {
        conversation,
        seq: m.seq,
        ts: m.ts_ms,
        sender: SenderRef { id: &m.sender_id, name: &m.sender_name },
        body: &m.body,
        client_msg_id: &m.client_msg_id,
    }
}
