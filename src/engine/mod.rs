//! The engine boundary: storage and fan-out behind four narrow traits.
//!
//! The transport (WebSocket sessions, service API) talks to [`crate::node::Node`]
//! only; the node talks to an [`Engine`], which is the sum of four concerns,
//! each with its contract documented on the trait:
//! - [`MessageStore`]: messages (append, history, `last_seq`), receipts,
//!   per-user counters and the per-user conversation list.
//! - [`Groups`]: membership of group conversations (managed by the platform)
//!   and known members of open conversations.
//! - [`Broker`]: events to every node's local connections, and this node's
//!   subscriptions.
//! - [`Presence`]: who is online, counted in connections per node.
//!
//! [`Engine`] itself only adds the lifecycle (name, readiness, upkeep,
//! shutdown). Two engines implement all of it:
//! - [`memory::MemoryEngine`]: in-process, single node, bounded history in memory.
//! - `valkey::ValkeyEngine`: durable history and cross-node fan-out on Valkey.
//!
//! Both run the same contract tests (`tests/engine_conformance.rs`).
//!
//! # The one cross-cutting rule
//! [`MessageStore::append`] stores a message and assigns the next gap-free
//! `seq` of its conversation, *atomically* with the idempotency record of
//! `(sender, client_msg_id)`; it returns only after the message is stored, and
//! a repeat returns the first `seq` with `duplicate: true` and publishes
//! nothing. The store publishes the `message` frame itself (through the
//! engine's broker), in `seq` order per conversation: storing and publishing
//! are one step so that no two nodes can deliver a conversation's messages
//! out of order. Every other event goes through [`Broker::publish`].
//! Engines deliver events to this node's [`Hub`](crate::hub::Hub).

pub mod changes;
pub mod durable;
pub(crate) mod local;
pub(crate) mod membership;
pub mod memory;
pub mod valkey;

use std::sync::Arc;

use async_trait::async_trait;

pub use self::changes::{Change, NewUpdate, Reaction, Refusal, StoredUpdate, UpdateOutcome};
use crate::{
    error::EngineResult,
    hub::{Event, Topic},
    protocol::{ConversationObject, UserRef},
};

/// The topics an event for one conversation goes to.
pub type Route = Vec<Topic>;

#[derive(Debug, Clone)]
pub struct NewMessage {
    pub conversation: String,
    pub sender: UserRef,
    pub body: String,
    pub client_msg_id: String,
    /// Server time at arrival, milliseconds since the epoch.
    pub ts_ms: i64,
    /// Direct conversations: the two participants, indexed once it holds a message.
    pub participants: Option<[String; 2]>,
    /// Group conversations: store only if the sender is a member (checked in
    /// the same atomic step as the write).
    pub require_member: bool,
    /// Draw one token from the sender's send budget (`limits.send_per_s`,
    /// `limits.send_burst`) where the engine keeps it (the Valkey engine's
    /// cluster-wide bucket): true for a WebSocket `send`, false for the
    /// service API, which is not rate-limited (docs/protocol.md).
    pub send_budget: bool,
    /// The seq of the message this one replies to (the node checked it is a
    /// message of the conversation: [`MessageStore::is_message`]).
    pub reply_to: Option<u64>,
}

impl NewMessage {
    /// The message as stored under `seq` (no edit, reaction or erasure yet).
    pub fn stored(&self, seq: u64) -> StoredMessage {
        StoredMessage {
            seq,
            ts_ms: self.ts_ms,
            sender_id: self.sender.id.as_str().into(),
            sender_name: self.sender.name.as_str().into(),
            body: self.body.as_str().into(),
            client_msg_id: self.client_msg_id.as_str().into(),
            reply_to: self.reply_to,
            ..StoredMessage::default()
        }
    }
}

/// What became of a receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptOutcome {
    /// `seq` is below 1 or above the conversation's `last_seq`.
    OutOfRange {
        last_seq: u64,
    },
    /// The stored marks were already at or above `seq`.
    Unchanged,
    Changed(ReceiptRow),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub ts_ms: i64,
    pub duplicate: bool,
}

/// A message in its current state (v1.2: edits, deletion and reactions
/// applied; see [`changes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub ts_ms: i64,
    pub sender_id: Arc<str>,
    pub sender_name: Arc<str>,
    /// Empty once erased.
    pub body: Arc<str>,
    pub client_msg_id: Arc<str>,
    /// The body was erased ([`MessageStore::erase_sender`]): `seq`, `ts`,
    /// sender and `client_msg_id` remain, the body is gone from storage.
    /// Also set by a `delete` update.
    pub deleted: bool,
    pub reply_to: Option<u64>,
    /// When it was last edited.
    pub edited_at: Option<i64>,
    /// In the order the first reaction of each emoji came.
    pub reactions: Vec<Reaction>,
    /// The seq of the last update applied to it (0: none), what a no-op
    /// change answers with.
    pub last_update: u64,
}

/// Which page of a conversation's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// Messages with `seq < before` (all when `None`), the newest `limit` of them.
    Before(Option<u64>, usize),
    /// Messages with `seq > after`, the oldest `limit` of them.
    After(u64, usize),
    /// Messages *and updates* with `seq > after`, the oldest `limit` of them
    /// together (`sync`, v1.2).
    Sync(u64, usize),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessagePage {
    /// Ascending by `seq`, each in its current state.
    pub messages: Vec<StoredMessage>,
    /// [`Page::Sync`] only: the updates of the page, ascending by `seq`
    /// (interleaved with `messages` by seq, together at most `limit`).
    pub updates: Vec<StoredUpdate>,
    pub has_more: bool,
    /// The epoch of the conversation's stored history (see [`new_epoch`]).
    pub epoch: Arc<str>,
}

/// A fresh epoch: 16 hex digits, random. A conversation's epoch changes only
/// when its stored history was lost and `seq` starts again from 1 (PROTOCOL
/// v1.1, *Epochs*); clients that hold another epoch drop their copy.
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRow {
    pub user: String,
    pub delivered_seq: u64,
    pub read_seq: u64,
}

/// A group conversation (managed by the platform through the service API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub title: String,
    /// Sorted, unique.
    pub members: Vec<String>,
}

/// What `welcome` lists of a group ([`Groups::group_heads`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupHead {
    pub title: String,
    /// Whether the user asked about is a member.
    pub member: bool,
    /// The members, when there are few enough to list.
    pub members: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipChange {
    pub conversation: ConversationObject,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// Per-user counters of one conversation (for `welcome`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub last_seq: u64,
    pub read_seq: u64,
    pub unread: u64,
    pub epoch: Arc<str>,
}

/// Messages, receipts and the per-user view of conversations.
///
/// # Contract
/// - `seq` is per conversation, starts at 1 and has no gaps; a conversation
///   that was never written has `last_seq` 0.
/// - [`append`](MessageStore::append) is atomic with its idempotency record
///   and publishes the `message` frame itself (see the module docs); with
///   `require_member` it stores only for a member of the group (checked in
///   the same step) and answers `None` otherwise, storing and publishing
///   nothing.
/// - Every history page carries the conversation's epoch: the same on every
///   call for as long as the stored history lasts (see [`new_epoch`]).
/// - Receipts only rise, and only up to `last_seq` (checked in the same step).
/// - Updates share the messages' `seq` counter; `history` pages
///   ([`Page::Before`], [`Page::After`]) hold messages only, in their current
///   state, and cost what their messages cost (no update is replayed);
///   [`Page::Sync`] holds messages and updates. Retention
///   (`chat.history_max_messages`) counts both.
/// - [`erase_sender`](MessageStore::erase_sender) removes bodies from storage
///   for good, never a message: every erased message keeps its `seq`, `ts`,
///   sender and `client_msg_id` (so its idempotency record still answers a
///   retry as a duplicate), and reads as `deleted` with an empty body in every
///   page and gap fill afterwards. Each conversation's erasure becomes
///   visible in one atomic step: a concurrent read sees it entirely before or
///   entirely after, and sends to it go on meanwhile.
///
/// [`user_conversations`](MessageStore::user_conversations) lives here, not
/// in [`Groups`]: it is the per-user list of conversations a user reads from
/// (the one `welcome` shows with its [`counters`](MessageStore::counters)),
/// and direct conversations enter it by their first stored message, in the
/// store's own write. Group changes ([`Groups`]) feed it too, but it grants
/// nothing: the node verifies every group in it against the group's member
/// set, so an engine may leave a stale entry after a fault, never miss one.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Stores a message and publishes it to `route`. `None` when
    /// `msg.require_member` and the sender is not a member.
    async fn append(&self, msg: NewMessage, route: &Route) -> EngineResult<Option<Appended>>;

    async fn history(&self, conversation: &str, page: Page) -> EngineResult<MessagePage>;

    /// Stores a change of a message (v1.2) under the next `seq`, atomically
    /// with the target's new current state, and publishes its `update` frame
    /// to `route`; the rules of [`changes::check`] decide in the same step.
    /// A change that changes nothing stores and publishes nothing
    /// (`duplicate: true`); a refused one neither.
    async fn update(&self, update: NewUpdate, route: &Route) -> EngineResult<UpdateOutcome>;

    /// Whether `seq` is a retained message (not an update) of the
    /// conversation: what `reply_to` may name.
    async fn is_message(&self, conversation: &str, seq: u64) -> EngineResult<bool>;

    async fn last_seq(&self, conversation: &str) -> EngineResult<u64>;

    /// Raises `user`'s delivered (and, when `read`, read) mark to `seq`, after
    /// checking `1 <= seq <= last_seq` in the same step.
    async fn set_receipt(&self, conversation: &str, user: &str, seq: i64, read: bool) -> EngineResult<ReceiptOutcome>;

    /// Every user of the conversation who has sent a receipt, sorted by user.
    async fn receipts(&self, conversation: &str) -> EngineResult<Vec<ReceiptRow>>;

    /// `last_seq`, `read_seq` and unread count (messages of *other* users
    /// above `read_seq`) of `user` in each conversation, in order.
    async fn counters(&self, user: &str, conversations: &[String]) -> EngineResult<Vec<Counters>>;

    /// Group conversations the user belongs to and direct conversations of the
    /// user that hold a message, sorted.
    async fn user_conversations(&self, user: &str) -> EngineResult<Vec<String>>;

    /// Erases the body of every retained message `user` sent, in every
    /// conversation (groups, direct and open ones), stored before the call,
    /// and the body of every edit update `user` made (those are not counted).
    /// Returns how many messages this call erased: a repeat answers 0. Nothing
    /// is published (clients see the erasure on their next history or sync).
    async fn erase_sender(&self, user: &str) -> EngineResult<u64>;
}

/// Membership: group conversations (created and changed by the platform
/// through the service API) and the known members of open conversations.
///
/// # Contract
/// - Member lists are sorted and unique.
/// - [`put_group`](Groups::put_group) and [`update_group`](Groups::update_group)
///   are atomic per group and report exactly who was added and removed
///   compared with the members just before; a user removed and added in one
///   update is no change.
/// - A group that does not exist has no members:
///   [`is_member`](Groups::is_member) is false, [`member_count`](Groups::member_count)
///   0, [`update_group`](Groups::update_group) `None`.
/// - [`delete_group`](Groups::delete_group) removes a group with its whole
///   history (messages, erased ones, receipts, idempotency records, members)
///   in one atomic step. A group created again under the same id starts at
///   `seq` 1 under a new epoch, never the deleted one's (PROTOCOL v1.1,
///   *Epochs*): a `seq` is never reused within an epoch.
#[async_trait]
pub trait Groups: Send + Sync + 'static {
    /// The group, shared: a group of 15,000 members is not copied for every
    /// reader (a reconnect storm read it twice per member).
    async fn group(&self, conversation: &str) -> EngineResult<Option<Arc<Group>>>;

    /// Several groups at once, in order (one round trip where the engine can).
    async fn groups(&self, conversations: &[String]) -> EngineResult<Vec<Option<Arc<Group>>>> {
        let mut out = Vec::with_capacity(conversations.len());
        for c in conversations {
            out.push(self.group(c).await?);
        }
        Ok(out)
    }

    /// What `welcome` needs of several groups, in order: the title, whether
    /// `user` is a member, and the members only when `user` is one and there
    /// are at most `members_up_to` (`None` for a group that does not exist). An engine
    /// that stores groups remotely answers without sending the member sets of
    /// big groups: every connect of a 15,000-member group's members read it.
    async fn group_heads(
        &self,
        conversations: &[String],
        user: &str,
        members_up_to: usize,
    ) -> EngineResult<Vec<Option<GroupHead>>> {
        Ok(self
            .groups(conversations)
            .await?
            .into_iter()
            .map(|g| {
                g.map(|g| {
                    let member = membership::contains(&g.members, user);
                    let members = (member && g.members.len() <= members_up_to).then(|| g.members.clone());
                    GroupHead { title: g.title.clone(), member, members }
                })
            })
            .collect())
    }

    /// Whether `user` is a member of the group (false when it does not exist).
    async fn is_member(&self, conversation: &str, user: &str) -> EngineResult<bool>;

    /// For each of `users`, whether it is a member of the group (all false
    /// when it does not exist).
    async fn are_members(&self, conversation: &str, users: &[&str]) -> EngineResult<Vec<bool>> {
        let g = self.group(conversation).await?;
        Ok(users.iter().map(|u| g.as_ref().is_some_and(|g| membership::contains(&g.members, u))).collect())
    }

    /// Creates or replaces a group (title and the whole member list).
    async fn put_group(&self, conversation: &str, title: &str, members: Vec<String>) -> EngineResult<MembershipChange>;

    /// Adds and removes members. `None` when the group does not exist.
    async fn update_group(
        &self,
        conversation: &str,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> EngineResult<Option<MembershipChange>>;

    /// Deletes a group and its history. `None` when no group has this id
    /// (a repeat, or a direct or open conversation: those are left alone);
    /// otherwise the change that removed every member (`removed`: the members
    /// just before; `conversation`: its id and title, no members, `last_seq` 0).
    async fn delete_group(&self, conversation: &str) -> EngineResult<Option<MembershipChange>>;

    /// Records that `user` belongs to the open conversation (idempotent);
    /// returns its number of known members.
    async fn join_open(&self, conversation: &str, user: &str) -> EngineResult<usize>;

    /// Known members of an open conversation, sorted.
    async fn open_members(&self, conversation: &str) -> EngineResult<Vec<String>>;

    /// Members of a group, or known members of an open conversation.
    async fn member_count(&self, conversation: &str, open: bool) -> EngineResult<usize>;
}

/// Fan-out of events to the local connections of every node.
///
/// # Contract
/// - [`publish`](Broker::publish) hands the event to the [`Hub`](crate::hub::Hub)
///   of every node subscribed to one of the route's topics. It is best
///   effort: a node that missed events re-sends stored messages or tells its
///   clients to `sync`.
/// - Once [`subscribe`](Broker::subscribe) returns, every event published
///   afterwards to those topics reaches this node.
/// - [`topics_changed`](Broker::topics_changed) never drops a topic the hub
///   still wants; it may keep an unwanted one for a while.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publishes an event to every node.
    async fn publish(&self, route: &Route, event: Event) -> EngineResult<()>;

    /// Publishes several events (one round trip where the engine can).
    async fn publish_all(&self, events: Vec<(Route, Event)>) -> EngineResult<()> {
        for (route, event) in events {
            self.publish(&route, event).await?;
        }
        Ok(())
    }

    /// Publishes one event to each of `users` (their [`Topic::User`]), as a
    /// membership change goes to every member added or removed. Time and
    /// bytes grow linearly with `users.len()`: the event's frame travels
    /// once, never once per user (a group of n members would otherwise cost
    /// n² bytes, as each `conversation` frame lists every member).
    async fn publish_users(&self, users: &[String], event: Event) -> EngineResult<()> {
        let route: Route = users.iter().map(|u| Topic::User(u.as_str().into())).collect();
        self.publish(&route, event).await
    }

    /// Makes sure this node receives `topics` (the hub already wants them);
    /// returns once the subscription is active.
    async fn subscribe(&self, topics: &[Topic]) -> EngineResult<()>;

    /// The hub dropped interest in some topics; unsubscribe lazily.
    fn topics_changed(&self);

    /// Hands client frames to the HTTP streaming session `session` held by
    /// node `node` (another node: the caller checked its own hub), answering
    /// only once that node queued them (or refused). A node that holds no
    /// live lease, or does not know the session, answers
    /// [`Offer::Unknown`](crate::hub::streams::Offer::Unknown). An engine
    /// with one node has no other node to ask.
    async fn forward(
        &self,
        _node: &str,
        _session: &str,
        _frames: Vec<crate::protocol::Text>,
    ) -> EngineResult<crate::hub::streams::Offer> {
        Ok(crate::hub::streams::Offer::Unknown)
    }

    /// Whether a typing event of `user` in `conversation` may go out now:
    /// at most one per `every` across the cluster. The node checks its own
    /// throttle first; an engine with one node has nothing to add.
    async fn typing_gate(&self, _user: &str, _conversation: &str, _every: std::time::Duration) -> EngineResult<bool> {
        Ok(true)
    }
}

/// Who is online: open connections per user, counted per node.
///
/// # Contract
/// - [`presence_up`](Presence::presence_up) is true exactly when the user
///   went from no connection on any node to one;
///   [`presence_down`](Presence::presence_down) exactly when the last one
///   closed. The node calls `down` once per `up`, never without one.
/// - [`online`](Presence::online) answers sorted; with a list, only users of
///   it.
/// - [`online`](Presence::online) and
///   [`connection_count`](Presence::connection_count) count the nodes that
///   hold a live lease: a node takes it in [`Engine::maintain`], which the
///   app runs at start and then every
///   [`maintenance_interval`](Engine::maintenance_interval). A node that stops
///   answering loses its users when its lease expires (`maintain` on the
///   other nodes reports them).
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// A connection of `user` opened on this node. Returns true when the user
    /// went from offline to online (on any node).
    async fn presence_up(&self, user: &str) -> EngineResult<bool>;

    /// A connection of `user` closed on this node. Returns true when the user
    /// went offline everywhere.
    async fn presence_down(&self, user: &str) -> EngineResult<bool>;

    /// Which of `users` are online; every online user when `None`.
    async fn online(&self, users: Option<&[String]>) -> EngineResult<Vec<String>>;

    /// Open connections of `user` on every node (this node's for an engine
    /// that has one node).
    async fn connection_count(&self, user: &str) -> EngineResult<usize>;

    /// Takes one connect token of `user` across the cluster (a token bucket of
    /// `per_s` and `burst`), or fails with [`EngineError::RateLimited`]. The
    /// node checks its own bucket first; an engine with one node has nothing
    /// to add.
    ///
    /// [`EngineError::RateLimited`]: crate::error::EngineError::RateLimited
    async fn connect_gate(&self, _user: &str, _per_s: f64, _burst: u32) -> EngineResult<()> {
        Ok(())
    }
}

/// A whole engine: the four concerns plus its lifecycle. Used as
/// `Arc<dyn Engine>`; the methods of the four traits are called on it with
/// those traits in scope.
#[async_trait]
pub trait Engine: MessageStore + Groups + Broker + Presence {
    /// `memory` or `valkey`, for logs and metrics.
    fn name(&self) -> &'static str;

    /// Whether storage answers (for /readyz).
    async fn ready(&self) -> bool;

    /// Periodic upkeep (node leases, expired nodes). Returns users who went
    /// offline everywhere because their node stopped answering.
    async fn maintain(&self) -> EngineResult<Vec<String>> {
        Ok(Vec::new())
    }

    /// How often [`Engine::maintain`] runs; `None`: never.
    fn maintenance_interval(&self) -> Option<std::time::Duration> {
        None
    }

    /// The webhook outbox shared by every node of the cluster; `None`: each
    /// node keeps one in process memory (see [`crate::webhooks`]).
    fn outbox(&self) -> Option<Arc<dyn crate::webhooks::Outbox>> {
        None
    }

    /// Stops background work (leases, subscriptions) before exit.
    async fn shutdown(&self);
}
