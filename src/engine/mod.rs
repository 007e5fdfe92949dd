//! The engine boundary: storage and fan-out behind one small interface.
//!
//! The transport (WebSocket sessions, service API) talks to [`crate::node::Node`],
//! which talks to an [`Engine`]. Two engines implement it:
//! - [`memory::MemoryEngine`]: in-process, single node, bounded history in memory.
//! - `valkey::ValkeyEngine`: durable history and cross-node fan-out on Valkey.
//!
//! # Contract
//! - [`Engine::append`] stores a message and assigns the next gap-free `seq` of
//!   its conversation, *atomically* with the idempotency record of
//!   `(sender, client_msg_id)`; it returns only after the message is stored, and
//!   a repeat returns the first `seq` with `duplicate: true` and publishes
//!   nothing. The engine publishes the `message` frame itself, in `seq` order
//!   per conversation.
//! - [`Engine::publish`] delivers an event to every node's local connections of
//!   the route's topics (best effort: a node that missed events tells its
//!   clients to `sync`).
//! - Engines deliver events to this node's [`Hub`](crate::hub::Hub).

pub mod memory;
pub mod valkey;

use std::sync::Arc;

use async_trait::async_trait;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub ts_ms: i64,
    pub sender_id: Arc<str>,
    pub sender_name: Arc<str>,
    pub body: Arc<str>,
    pub client_msg_id: Arc<str>,
}

/// Which page of a conversation's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// Messages with `seq < before` (all when `None`), the newest `limit` of them.
    Before(Option<u64>, usize),
    /// Messages with `seq > after`, the oldest `limit` of them.
    After(u64, usize),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessagePage {
    /// Ascending by `seq`.
    pub messages: Vec<StoredMessage>,
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

#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// `memory` or `valkey`, for logs and metrics.
    fn name(&self) -> &'static str;

    /// Whether storage answers (for /readyz).
    async fn ready(&self) -> bool;

    /// Stores a message (see the module contract) and publishes it to `route`.
    /// `None` when `msg.require_member` and the sender is not a member.
    async fn append(&self, msg: NewMessage, route: &Route) -> EngineResult<Option<Appended>>;

    async fn history(&self, conversation: &str, page: Page) -> EngineResult<MessagePage>;

    async fn last_seq(&self, conversation: &str) -> EngineResult<u64>;

    /// Raises `user`'s delivered (and, when `read`, read) mark to `seq`, after
    /// checking `1 <= seq <= last_seq` in the same step.
    async fn set_receipt(&self, conversation: &str, user: &str, seq: i64, read: bool) -> EngineResult<ReceiptOutcome>;

    /// Every user of the conversation who has sent a receipt.
    async fn receipts(&self, conversation: &str) -> EngineResult<Vec<ReceiptRow>>;

    async fn group(&self, conversation: &str) -> EngineResult<Option<Group>>;

    /// Whether `user` is a member of the group (false when it does not exist).
    async fn is_member(&self, conversation: &str, user: &str) -> EngineResult<bool>;

    /// Several groups at once (one round trip where the engine can).
    async fn groups(&self, conversations: &[String]) -> EngineResult<Vec<Option<Group>>> {
        let mut out = Vec::with_capacity(conversations.len());
        for c in conversations {
            out.push(self.group(c).await?);
        }
        Ok(out)
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

    /// Group conversations the user belongs to and direct conversations of the
    /// user that hold a message.
    async fn user_conversations(&self, user: &str) -> EngineResult<Vec<String>>;

    /// `last_seq`, `read_seq` and unread count of `user` in each conversation.
    async fn counters(&self, user: &str, conversations: &[String]) -> EngineResult<Vec<Counters>>;

    /// Records that `user` belongs to the open conversation; returns its
    /// number of known members.
    async fn join_open(&self, conversation: &str, user: &str) -> EngineResult<usize>;

    /// Known members of an open conversation.
    async fn open_members(&self, conversation: &str) -> EngineResult<Vec<String>>;

    /// Publishes an event to every node.
    async fn publish(&self, route: &Route, event: Event) -> EngineResult<()>;

    /// Publishes several events (one round trip where the engine can).
    async fn publish_all(&self, events: Vec<(Route, Event)>) -> EngineResult<()> {
        for (route, event) in events {
            self.publish(&route, event).await?;
        }
        Ok(())
    }

    /// Whether a typing event of `user` in `conversation` may go out now:
    /// at most one per `every` across the cluster. The node checks its own
    /// throttle first; an engine with one node has nothing to add.
    async fn typing_gate(&self, _user: &str, _conversation: &str, _every: std::time::Duration) -> EngineResult<bool> {
        Ok(true)
    }

    /// Members of a group, or known members of an open conversation.
    async fn member_count(&self, conversation: &str, open: bool) -> EngineResult<usize>;

    /// Open connections of `user` on every node (this node's for an engine
    /// that has one node).
    async fn connection_count(&self, user: &str) -> EngineResult<usize>;

    /// Makes sure this node receives `topics` (the hub already wants them);
    /// returns once the subscription is active.
    async fn subscribe(&self, topics: &[Topic]) -> EngineResult<()>;

    /// The hub dropped interest in some topics; unsubscribe lazily.
    fn topics_changed(&self);

    /// A connection of `user` opened on this node. Returns true when the user
    /// went from offline to online (on any node).
    async fn presence_up(&self, user: &str) -> EngineResult<bool>;

    /// A connection of `user` closed on this node. Returns true when the user
    /// went offline everywhere.
    async fn presence_down(&self, user: &str) -> EngineResult<bool>;

    /// Which of `users` are online; every online user when `None`.
    async fn online(&self, users: Option<&[String]>) -> EngineResult<Vec<String>>;

    /// Periodic upkeep (node leases, expired nodes). Returns users who went
    /// offline everywhere because their node stopped answering.
    async fn maintain(&self) -> EngineResult<Vec<String>> {
        Ok(Vec::new())
    }

    /// How often [`Engine::maintain`] runs; `None`: never.
    fn maintenance_interval(&self) -> Option<std::time::Duration> {
        None
    }

    /// Stops background work (leases, subscriptions) before exit.
    async fn shutdown(&self);
}
