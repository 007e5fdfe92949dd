//! The transport-agnostic core: membership rules, sending, receipts, typing,
//! history, presence and the service API's operations. WebSocket sessions and
//! HTTP handlers both call into a [`Node`]; the node calls its [`Engine`].

use std::{
    collections::HashSet,
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use serde_json::Value;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::{
    auth::Authenticator,
    config::Config,
    engine::{Appended, Engine, MembershipChange, NewMessage, Page, ReceiptOutcome, Route},
    error::ChatError,
    hub::{Event, EventKind, Hub, Topic},
    ids::{self, Dm},
    metrics,
    protocol::{
        self, ConversationEntry, ConversationEvent, ConversationObject, HistoryPage, MessageFrame, PresenceChange,
        PresenceReply, ReceiptState, SenderRef, UserRef,
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
    pub engine: Arc<dyn Engine>,
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    pub node_id: String,
    open: HashSet<String>,
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
    draining: AtomicBool,
    next_conn: AtomicU64,
    /// Every WebSocket session task, so shutdown can wait for them.
    pub sessions: TaskTracker,
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
        let period = Duration::from_secs_f64(1.0 / l.send_per_s);
        let quota = Quota::with_period(period)
            .expect("send_per_s is validated positive")
            .allow_burst(NonZeroU32::new(l.send_burst).expect("send_burst is validated >= 1"));
        Arc::new(Node {
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

    /// Forgets rate-limit state of idle users (called periodically).
    pub fn prune_rate_limits(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn is_open(&self, conversation: &str) -> bool {
        self.open.contains(conversation)
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
        let frame = protocol::render(&protocol::Receipt {
            ty: "receipt",
            conversation,
            user,
            delivered_seq: row.delivered_seq,
            read_seq: row.read_seq,
        });
        self.engine.publish(&kind.route(conversation), Event::new(EventKind::Receipt, frame)).await?;
        Ok(())
    }

    pub async fn typing(&self, user: &UserRef, conversation: &str) -> Result<(), ChatError> {
        let kind = self.authorize(&user.id, conversation).await?;
        let frame = protocol::render(&protocol::Typing {
            ty: "typing",
            conversation,
            user: SenderRef { id: &user.id, name: &user.name },
        });
        let route: Route = match kind {
            // Only the other participant's topic.
            Kind::Direct(a, b) => vec![Topic::User(if a == user.id { b } else { a }.into())],
            _ => kind.route(conversation),
        };
        self.engine.publish(&route, Event::new(EventKind::Typing, frame).excluding(&user.id)).await?;
        Ok(())
    }

    /// A `history` reply (for both `history` and `sync`).
    pub async fn history(
        &self,
        user: &str,
        id: Option<&Value>,
        conversation: &str,
        page: Page,
    ) -> Result<axum::extract::ws::Utf8Bytes, ChatError> {
        let kind = self.authorize(user, conversation).await?;
        let page = self.engine.history(conversation, page).await?;
        let mut receipts = self.engine.receipts(conversation).await?;
        if kind == Kind::Group {
            // Receipts of members only (a removed member's marks stay stored).
            let members = self.engine.group(conversation).await?.map(|g| g.members).unwrap_or_default();
            receipts.retain(|r| members.binary_search(&r.user).is_ok());
        }
        Ok(protocol::render(&HistoryPage {
            ty: "history",
            id,
            conversation,
            messages: page.messages.iter().map(|m| message_frame(conversation, m)).collect(),
            receipts: receipts
                .iter()
                .map(|r| ReceiptState { user: &r.user, delivered_seq: r.delivered_seq, read_seq: r.read_seq })
                .collect(),
            has_more: page.has_more,
        }))
    }

    pub async fn presence(
        &self,
        user: &str,
        id: Option<&Value>,
        conversation: &str,
    ) -> Result<axum::extract::ws::Utf8Bytes, ChatError> {
        let kind = self.authorize(user, conversation).await?;
        let online = match kind {
            Kind::Direct(a, b) => self.engine.online(Some(&[a.to_string(), b.to_string()])).await?,
            Kind::Open => self.engine.online(None).await?,
            Kind::Group => {
                let members = self.engine.group(conversation).await?.map(|g| g.members).unwrap_or_default();
                self.engine.online(Some(&members)).await?
            }
        };
        Ok(protocol::render(&PresenceReply { ty: "presence", id, conversation, online: &online }))
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
            let (title, kind, members) = match self.classify(id)? {
                Kind::Open => (title_case(id), "open", None),
                // Listed once it holds a message (an index entry left by a
                // failed first send does not count).
                Kind::Direct(..) if c.last_seq == 0 => continue,
                Kind::Direct(a, b) => {
                    (if a == user { b } else { a }.to_string(), "direct", Some(vec![a.to_string(), b.to_string()]))
                }
                Kind::Group => match group_info.next() {
                    Some((_, Some(g))) => {
                        let members = (g.members.len() <= limit).then_some(g.members);
                        (g.title, "group", members)
                    }
                    // Removed between the two reads: not listed.
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
                members,
            });
        }
        Ok(out)
    }

    pub async fn conversations_for(&self, user: &str) -> Result<Vec<ConversationEntry>, ChatError> {
        let ids = self.conversation_ids(user).await?;
        self.entries(user, &ids).await
    }

    /// Pushes a user's presence change to the members of their conversations
    /// (those with at most `limits.presence_max_members` members).
    pub async fn announce_presence(&self, user: &str, online: bool) -> Result<(), ChatError> {
        let limit = self.cfg.limits.presence_max_members;
        for id in self.conversation_ids(user).await? {
            let route: Route = match self.classify(&id)? {
                Kind::Direct(a, b) => vec![Topic::User(if a == user { b } else { a }.into())],
                Kind::Open => {
                    if self.engine.join_open(&id, user).await? > limit {
                        continue;
                    }
                    vec![Topic::Conv(id.as_str().into())]
                }
                Kind::Group => {
                    match self.engine.group(&id).await? {
                        Some(g) if g.members.len() <= limit => {}
                        _ => continue,
                    }
                    vec![Topic::Conv(id.as_str().into())]
                }
            };
            let frame = protocol::render(&PresenceChange { ty: "presence", conversation: &id, user, online });
            self.engine.publish(&route, Event::new(EventKind::Presence, frame).excluding(user)).await?;
        }
        Ok(())
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
            let frame =
                protocol::render(&ConversationEvent { ty: "conversation", conversation: &change.conversation, member });
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

pub fn message_frame<'a>(conversation: &'a str, m: &'a crate::engine::StoredMessage) -> MessageFrame<'a> {
    MessageFrame {
        ty: "message",
        conversation,
        seq: m.seq,
        ts: m.ts_ms,
        sender: SenderRef { id: &m.sender_id, name: &m.sender_name },
        body: &m.body,
        client_msg_id: &m.client_msg_id,
    }
}
