//! The embedded engine: one node, everything in process memory.
//!
//! History is bounded per conversation (`chat.history_max_messages`, oldest
//! dropped first; `chat.history_max_age_s`, dropped by [`Engine::maintain`]
//! once a second, so an idle conversation is trimmed too) and lost on restart; the server says so in its start-up log,
//! and every start has a new epoch, so clients drop what they held. A group
//! deleted through the service API and created again gets an epoch of its
//! own (its `seq` starts again at 1).
//! Nothing is allocated for a conversation that does not exist or holds
//! nothing: receipts, typing, history and presence there only read.
//! Each conversation has its own lock; a message is stored and handed to the
//! hub under that lock, so every connection sees a conversation's messages in
//! `seq` order. A change (v1.2) is decided, stored with its target's new
//! state and handed to the hub under the same lock ([`log`]).

mod log;

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};

use self::log::{Conversation, Decided, Entry};
use super::local::LocalPresence;
use super::{
    Appended, Counters, Engine, Group, Groups, MembershipChange, MessagePage, MessageStore, NewMessage, NewUpdate,
    Page, ReceiptOutcome, ReceiptRow, Refusal, Route, StoredMessage, UpdateOutcome, membership,
};
use crate::{
    error::EngineResult,
    hub::{Event, EventKind, Hub, now_us},
    node::{message_frame, update_frame},
    protocol::{ConversationObject, ServerFrame, render},
};

pub struct MemoryEngine {
    hub: Arc<Hub>,
    max_messages: usize,
    /// Messages older than this are dropped by [`Engine::maintain`] (0: no age limit).
    max_age_ms: i64,
    convs: RwLock<HashMap<String, Arc<Mutex<Conversation>>>>,
    /// user -> group conversations and direct conversations with messages.
    user_index: RwLock<HashMap<String, BTreeSet<String>>>,
    /// user -> open connections on this node.
    presence: LocalPresence,
    /// This process's epoch: history does not outlive it.
    epoch: Arc<str>,
}

impl MemoryEngine {
    pub fn new(hub: Arc<Hub>, max_messages: usize) -> Self {
        Self {
            hub,
            max_messages: max_messages.max(1),
            max_age_ms: 0,
            convs: RwLock::default(),
            user_index: RwLock::default(),
            presence: LocalPresence::default(),
            epoch: super::new_epoch().into(),
        }
    }

    /// Drops messages older than `max_age_s` seconds (0: keep them), on the
    /// maintenance timer.
    pub fn with_max_age(mut self, max_age_s: u64) -> Self {
        self.max_age_ms = (max_age_s as i64).saturating_mul(1000);
        self
    }

    /// Drops every retained event stored before `cutoff_ms` (see
    /// `Conversation::drop_older_than`); `last_seq` and the epoch stay.
    /// Returns how many messages went.
    fn drop_older_than(&self, cutoff_ms: i64) -> u64 {
        let convs: Vec<_> = self.convs.read().values().cloned().collect();
        let mut dropped = 0;
        for conv in convs {
            dropped += conv.lock().drop_older_than(cutoff_ms);
        }
        dropped
    }

    fn conv(&self, id: &str) -> Arc<Mutex<Conversation>> {
        if let Some(c) = self.convs.read().get(id) {
            return c.clone();
        }
        self.convs.write().entry(id.to_string()).or_default().clone()
    }

    fn existing(&self, id: &str) -> Option<Arc<Mutex<Conversation>>> {
        self.convs.read().get(id).cloned()
    }

    fn dispatch(&self, route: &Route, event: &Event) {
        for topic in route {
            self.hub.dispatch(topic, event);
        }
    }

    fn index_members(&self, conv: &str, added: &[String], removed: &[String]) {
        let mut idx = self.user_index.write();
        for u in added {
            idx.entry(u.clone()).or_default().insert(conv.to_string());
        }
        for u in removed {
            if let Some(set) = idx.get_mut(u) {
                set.remove(conv);
            }
        }
    }
}

fn is_member(g: &Group, user: &str) -> bool {
    membership::contains(&g.members, user)
}

#[async_trait]
impl MessageStore for MemoryEngine {
    async fn append(&self, msg: NewMessage, route: &Route) -> EngineResult<Option<Appended>> {
        // A send to a group that does not exist creates nothing.
        let conv = if msg.require_member {
            match self.existing(&msg.conversation) {
                Some(c) => c,
                None => return Ok(None),
            }
        } else {
            self.conv(&msg.conversation)
        };
        let first_message;
        let appended = {
            let mut c = conv.lock();
            if msg.require_member && !c.group.as_ref().is_some_and(|g| is_member(g, &msg.sender.id)) {
                return Ok(None);
            }
            let sender: Arc<str> = msg.sender.id.as_str().into();
            let cmid: Arc<str> = msg.client_msg_id.as_str().into();
            if let Some((seq, ts_ms)) = c.repeat(&sender, &cmid) {
                return Ok(Some(Appended { seq, ts_ms, duplicate: true }));
            }
            let seq = c.last_seq + 1;
            let stored = StoredMessage {
                seq,
                ts_ms: msg.ts_ms,
                sender_id: sender,
                sender_name: msg.sender.name.as_str().into(),
                body: msg.body.as_str().into(),
                client_msg_id: cmid,
                reply_to: msg.reply_to,
                ..StoredMessage::default()
            };
            let frame = render(&ServerFrame::Message(message_frame(&msg.conversation, &stored)));
            c.push(Entry::Message(stored), self.max_messages);
            first_message = seq == 1;
            let mut event = Event::new(EventKind::Message, frame);
            event.stored_at_us = Some(now_us());
            // Under the conversation lock: delivery order is seq order.
            let _fanout = tracing::debug_span!("fanout", kind = "message").entered();
            self.dispatch(route, &event);
            Appended { seq, ts_ms: msg.ts_ms, duplicate: false }
        };
        if first_message && let Some(pair) = &msg.participants {
            self.index_members(&msg.conversation, pair, &[]);
        }
        Ok(Some(appended))
    }

    async fn history(&self, conversation: &str, page: Page) -> EngineResult<MessagePage> {
        let Some(conv) = self.existing(conversation) else {
            return Ok(MessagePage { epoch: self.epoch.clone(), ..MessagePage::default() });
        };
        let c = conv.lock();
        let epoch = c.epoch(&self.epoch);
        Ok(c.page_with(page, epoch))
    }

    async fn update(&self, u: NewUpdate, route: &Route) -> EngineResult<UpdateOutcome> {
        let Some(conv) = self.existing(&u.conversation) else {
            let why = if u.require_member { Refusal::NotMember } else { Refusal::NoTarget };
            return Ok(UpdateOutcome::Refused(why));
        };
        let mut c = conv.lock();
        if u.require_member && !c.group.as_ref().is_some_and(|g| is_member(g, &u.user.id)) {
            return Ok(UpdateOutcome::Refused(Refusal::NotMember));
        }
        Ok(match c.change(&u, self.max_messages) {
            Decided::Refused(r) => UpdateOutcome::Refused(r),
            Decided::Same(seq, ts_ms) => UpdateOutcome::Applied(Appended { seq, ts_ms, duplicate: true }),
            Decided::Stored(up) => {
                let frame = render(&ServerFrame::Update(update_frame(&u.conversation, &up)));
                let mut event = Event::new(EventKind::Update, frame);
                event.stored_at_us = Some(now_us());
                // Under the conversation lock: delivery order is seq order.
                let _fanout = tracing::debug_span!("fanout", kind = "update").entered();
                self.dispatch(route, &event);
                UpdateOutcome::Applied(Appended { seq: up.seq, ts_ms: up.ts_ms, duplicate: false })
            }
        })
    }

    async fn is_message(&self, conversation: &str, seq: u64) -> EngineResult<bool> {
        Ok(self.existing(conversation).is_some_and(|c| c.lock().message(seq).is_some()))
    }

    async fn last_seq(&self, conversation: &str) -> EngineResult<u64> {
        Ok(self.existing(conversation).map_or(0, |c| c.lock().last_seq))
    }

    async fn set_receipt(&self, conversation: &str, user: &str, seq: i64, read: bool) -> EngineResult<ReceiptOutcome> {
        let Some(conv) = self.existing(conversation) else {
            return Ok(ReceiptOutcome::OutOfRange { last_seq: 0 });
        };
        let mut c = conv.lock();
        let last_seq = c.last_seq;
        if seq < 1 || seq as u64 > last_seq {
            return Ok(ReceiptOutcome::OutOfRange { last_seq });
        }
        let seq = seq as u64;
        let entry = c.receipts.entry(user.to_string()).or_default();
        let before = *entry;
        entry.0 = entry.0.max(seq);
        if read {
            entry.1 = entry.1.max(seq);
        }
        let after = *entry;
        Ok(if after == before {
            ReceiptOutcome::Unchanged
        } else {
            ReceiptOutcome::Changed(ReceiptRow { user: user.to_string(), delivered_seq: after.0, read_seq: after.1 })
        })
    }

    async fn receipts(&self, conversation: &str) -> EngineResult<Vec<ReceiptRow>> {
        let Some(conv) = self.existing(conversation) else {
            return Ok(Vec::new());
        };
        let c = conv.lock();
        let mut rows: Vec<ReceiptRow> = c
            .receipts
            .iter()
            .map(|(u, (d, r))| ReceiptRow { user: u.clone(), delivered_seq: *d, read_seq: *r })
            .collect();
        rows.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(rows)
    }

    async fn user_conversations(&self, user: &str) -> EngineResult<Vec<String>> {
        Ok(self.user_index.read().get(user).map(|s| s.iter().cloned().collect()).unwrap_or_default())
    }

    async fn erase_sender(&self, user: &str) -> EngineResult<u64> {
        // Every conversation's retained messages are looked at (a rare admin
        // operation); each conversation is erased under its own lock.
        let convs: Vec<Arc<Mutex<Conversation>>> = self.convs.read().values().cloned().collect();
        Ok(convs.into_iter().map(|c| c.lock().erase(user)).sum())
    }

    async fn counters(&self, user: &str, conversations: &[String]) -> EngineResult<Vec<Counters>> {
        Ok(conversations
            .iter()
            .map(|id| {
                let Some(conv) = self.existing(id) else {
                    return Counters { epoch: self.epoch.clone(), ..Counters::default() };
                };
                let c = conv.lock();
                let read_seq = c.receipts.get(user).map_or(0, |r| r.1);
                let unread = c.unread(user, read_seq);
                Counters { last_seq: c.last_seq, read_seq, unread, epoch: c.epoch(&self.epoch) }
            })
            .collect())
    }
}

#[async_trait]
impl Groups for MemoryEngine {
    async fn group(&self, conversation: &str) -> EngineResult<Option<Arc<Group>>> {
        Ok(self.existing(conversation).and_then(|c| c.lock().group.clone()))
    }

    async fn is_member(&self, conversation: &str, user: &str) -> EngineResult<bool> {
        Ok(self.existing(conversation).is_some_and(|c| c.lock().group.as_ref().is_some_and(|g| is_member(g, user))))
    }

    async fn put_group(&self, conversation: &str, title: &str, members: Vec<String>) -> EngineResult<MembershipChange> {
        let conv = self.conv(conversation);
        let change = {
            let mut c = conv.lock();
            let old = c.group.as_ref().map(|g| g.members.as_slice()).unwrap_or_default();
            let (members, added, removed) = membership::replace(old, members);
            c.group = Some(Arc::new(Group { title: title.to_string(), members }));
            MembershipChange { conversation: c.object(conversation), added, removed }
        };
        self.index_members(conversation, &change.added, &change.removed);
        Ok(change)
    }

    async fn update_group(
        &self,
        conversation: &str,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> EngineResult<Option<MembershipChange>> {
        let Some(conv) = self.existing(conversation) else {
            return Ok(None);
        };
        let change = {
            let mut c = conv.lock();
            let Some(group) = c.group.as_mut() else {
                return Ok(None);
            };
            let (members, added, removed) = membership::update(&group.members, add, remove);
            *group = Arc::new(Group { title: group.title.clone(), members });
            MembershipChange { conversation: c.object(conversation), added, removed }
        };
        self.index_members(conversation, &change.added, &change.removed);
        Ok(Some(change))
    }

    async fn delete_group(&self, conversation: &str) -> EngineResult<Option<MembershipChange>> {
        let Some(conv) = self.existing(conversation) else {
            return Ok(None);
        };
        let change = {
            let mut c = conv.lock();
            let Some(group) = c.group.take().map(Arc::unwrap_or_clone) else {
                return Ok(None);
            };
            // Reset in place, under the lock: a send that raced the delete
            // finds no group (and stores nothing), a read finds no history.
            // The entry stays, holding the epoch a new group of this id gets.
            c.reset(super::new_epoch().into());
            MembershipChange {
                conversation: ConversationObject {
                    id: conversation.to_string(),
                    title: group.title,
                    members: Vec::new(),
                    last_seq: 0,
                },
                added: Vec::new(),
                removed: group.members,
            }
        };
        self.index_members(conversation, &[], &change.removed);
        Ok(Some(change))
    }

    async fn join_open(&self, conversation: &str, user: &str) -> EngineResult<usize> {
        let conv = self.conv(conversation);
        let mut c = conv.lock();
        if !c.open_members.contains(user) {
            c.open_members.insert(user.to_string());
        }
        Ok(c.open_members.len())
    }

    async fn open_members(&self, conversation: &str) -> EngineResult<Vec<String>> {
        Ok(self.existing(conversation).map(|c| c.lock().open_members.iter().cloned().collect()).unwrap_or_default())
    }

    async fn member_count(&self, conversation: &str, open: bool) -> EngineResult<usize> {
        Ok(self.existing(conversation).map_or(0, |c| {
            let c = c.lock();
            if open { c.open_members.len() } else { c.group.as_ref().map_or(0, |g| g.members.len()) }
        }))
    }
}

crate::engine::local::single_node_broker_and_presence!(MemoryEngine);

#[async_trait]
impl Engine for MemoryEngine {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn ready(&self) -> bool {
        true
    }

    /// Age retention (`chat.history_max_age_s`).
    async fn maintain(&self) -> EngineResult<Vec<String>> {
        if self.max_age_ms > 0 {
            let dropped = self.drop_older_than(crate::protocol::now_ms().saturating_sub(self.max_age_ms));
            if dropped > 0 {
                tracing::debug!(dropped, "messages older than chat.history_max_age_s dropped");
            }
        }
        Ok(Vec::new())
    }

    fn maintenance_interval(&self) -> Option<std::time::Duration> {
        (self.max_age_ms > 0).then_some(RETENTION_EVERY)
    }

    async fn shutdown(&self) {}
}

/// How often age retention runs (memory and Valkey engines): a message
/// outlives `max_age` by at most about this.
pub(crate) const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
