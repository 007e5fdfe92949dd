//! One conversation's retained events in memory: messages (each in its
//! current state) and updates under one gap-free `seq`, with an index of the
//! message seqs so a history page costs its messages only.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Arc,
};

use crate::{
    engine::{
        Group, MessagePage, Page, StoredMessage, StoredUpdate,
        changes::{self, Change, NewUpdate, Refusal},
    },
    protocol::ConversationObject,
};

/// A stored event.
pub(super) enum Entry {
    Message(StoredMessage),
    Update(StoredUpdate),
}

impl Entry {
    fn seq(&self) -> u64 {
        match self {
            Entry::Message(m) => m.seq,
            Entry::Update(u) => u.seq,
        }
    }
}

#[derive(Default)]
pub(super) struct Conversation {
    /// Retained events, ascending; `entries[i].seq() == first_seq + i`.
    entries: VecDeque<Entry>,
    /// The seqs of the retained messages, ascending (history pages).
    message_seqs: VecDeque<u64>,
    pub(super) last_seq: u64,
    /// `(sender, client_msg_id)` -> seq, for retained messages.
    idempotency: HashMap<(Arc<str>, Arc<str>), u64>,
    pub(super) receipts: HashMap<String, (u64, u64)>,
    pub(super) group: Option<Arc<Group>>,
    pub(super) open_members: BTreeSet<String>,
    /// Set when the conversation was deleted: its history starts again under
    /// this epoch instead of the process's.
    pub(super) epoch: Option<Arc<str>>,
}

impl Conversation {
    fn first_seq(&self) -> u64 {
        self.entries.front().map_or(self.last_seq + 1, Entry::seq)
    }

    fn index_of(&self, seq: u64) -> usize {
        // seq <= first: 0; seq beyond the end: len.
        (seq.saturating_sub(self.first_seq()) as usize).min(self.entries.len())
    }

    fn entry(&self, seq: u64) -> Option<&Entry> {
        let first = self.first_seq();
        if seq < first {
            return None;
        }
        self.entries.get((seq - first) as usize)
    }

    /// The retained message with this seq (not an update).
    pub(super) fn message(&self, seq: u64) -> Option<&StoredMessage> {
        match self.entry(seq)? {
            Entry::Message(m) => Some(m),
            Entry::Update(_) => None,
        }
    }

    fn message_mut(&mut self, seq: u64) -> Option<&mut StoredMessage> {
        let first = self.first_seq();
        match self.entries.get_mut(seq.checked_sub(first)? as usize)? {
            Entry::Message(m) => Some(m),
            Entry::Update(_) => None,
        }
    }

    pub(super) fn epoch(&self, process: &Arc<str>) -> Arc<str> {
        self.epoch.clone().unwrap_or_else(|| process.clone())
    }

    pub(super) fn object(&self, id: &str) -> ConversationObject {
        let g = self.group.as_ref();
        ConversationObject {
            id: id.to_string(),
            title: g.map(|g| g.title.clone()).unwrap_or_default(),
            members: g.map(|g| g.members.clone()).unwrap_or_default(),
            last_seq: self.last_seq,
        }
    }

    /// The first message's seq and ts for a repeated `(sender, client_msg_id)`.
    pub(super) fn repeat(&self, sender: &Arc<str>, cmid: &Arc<str>) -> Option<(u64, i64)> {
        let seq = *self.idempotency.get(&(sender.clone(), cmid.clone()))?;
        Some((seq, self.message(seq).map_or(0, |m| m.ts_ms)))
    }

    /// Appends an event under the next seq, then drops the oldest beyond `max`.
    pub(super) fn push(&mut self, entry: Entry, max: usize) {
        self.last_seq = entry.seq();
        if let Entry::Message(m) = &entry {
            self.message_seqs.push_back(m.seq);
            self.idempotency.insert((m.sender_id.clone(), m.client_msg_id.clone()), m.seq);
        }
        self.entries.push_back(entry);
        while self.entries.len() > max {
            if let Some(Entry::Message(old)) = self.entries.pop_front() {
                self.message_seqs.pop_front();
                self.idempotency.remove(&(old.sender_id, old.client_msg_id));
            }
        }
    }

    /// Drops every retained event (message or update) stored before
    /// `cutoff_ms`, oldest first, with the idempotency records of its
    /// messages; `last_seq` stays (seqs are never reused). Returns how many
    /// messages went.
    pub(super) fn drop_older_than(&mut self, cutoff_ms: i64) -> u64 {
        let mut dropped = 0;
        while self.entries.front().is_some_and(|e| match e {
            Entry::Message(m) => m.ts_ms < cutoff_ms,
            Entry::Update(u) => u.ts_ms < cutoff_ms,
        }) {
            if let Some(Entry::Message(old)) = self.entries.pop_front() {
                self.message_seqs.pop_front();
                self.idempotency.remove(&(old.sender_id, old.client_msg_id));
                dropped += 1;
            }
        }
        dropped
    }

    /// Decides a change against its target's current state; on a change,
    /// stores the update and the target's new state together.
    pub(super) fn change(&mut self, u: &NewUpdate, max: usize) -> Decided {
        let Some(m) = self.message(u.target) else {
            return Decided::Refused(Refusal::NoTarget);
        };
        match changes::check(m, u) {
            Err(r) => Decided::Refused(r),
            Ok(false) => {
                let seq = changes::duplicate_seq(m);
                let ts = match self.entry(seq) {
                    Some(Entry::Update(up)) => up.ts_ms,
                    _ => m.ts_ms,
                };
                Decided::Same(seq, ts)
            }
            Ok(true) => {
                let seq = self.last_seq + 1;
                if let Some(m) = self.message_mut(u.target) {
                    changes::apply(m, u, seq);
                }
                let up = changes::stored_update(u, seq);
                self.push(Entry::Update(up.clone()), max);
                Decided::Stored(up)
            }
        }
    }

    pub(super) fn page(&self, page: Page) -> (Vec<StoredMessage>, Vec<StoredUpdate>, bool) {
        let seqs = &self.message_seqs;
        let messages = |from: usize, to: usize| -> Vec<StoredMessage> {
            seqs.range(from..to).filter_map(|s| self.message(*s).cloned()).collect()
        };
        match page {
            Page::Before(before, limit) => {
                let end = before.map_or(seqs.len(), |b| seqs.partition_point(|s| *s < b));
                let start = end.saturating_sub(limit);
                (messages(start, end), Vec::new(), start > 0)
            }
            Page::After(after, limit) => {
                let start = seqs.partition_point(|s| *s <= after);
                let end = (start + limit).min(seqs.len());
                (messages(start, end), Vec::new(), end < seqs.len())
            }
            Page::Sync(after, limit) => {
                let start = self.index_of(after.saturating_add(1));
                let end = (start + limit).min(self.entries.len());
                let (mut ms, mut us) = (Vec::new(), Vec::new());
                for e in self.entries.range(start..end) {
                    match e {
                        Entry::Message(m) => ms.push(m.clone()),
                        Entry::Update(u) => us.push(u.clone()),
                    }
                }
                (ms, us, end < self.entries.len())
            }
        }
    }

    pub(super) fn page_with(&self, page: Page, epoch: Arc<str>) -> MessagePage {
        let (messages, updates, has_more) = self.page(page);
        MessagePage { messages, updates, has_more, epoch }
    }

    /// Messages of others above `read_seq`.
    pub(super) fn unread(&self, user: &str, read_seq: u64) -> u64 {
        let from = self.message_seqs.partition_point(|s| *s <= read_seq);
        self.message_seqs.range(from..).filter(|s| self.message(**s).is_some_and(|m| &*m.sender_id != user)).count()
            as u64
    }

    /// Drops the whole history (a deleted group): starts again under `epoch`,
    /// keeping the known members of an open conversation.
    pub(super) fn reset(&mut self, epoch: Arc<str>) {
        let open_members = std::mem::take(&mut self.open_members);
        *self = Conversation { open_members, epoch: Some(epoch), ..Conversation::default() };
    }

    /// Erases `user`'s message bodies and edit bodies; returns the messages.
    pub(super) fn erase(&mut self, user: &str) -> u64 {
        let empty: Arc<str> = Arc::from("");
        let mut erased = 0;
        for e in self.entries.iter_mut() {
            match e {
                Entry::Message(m) if !m.deleted && &*m.sender_id == user => {
                    m.body = empty.clone();
                    m.deleted = true;
                    erased += 1;
                }
                Entry::Update(u) if &*u.user_id == user => {
                    if let Change::Edit(body) = &mut u.change {
                        *body = empty.clone();
                    }
                }
                _ => {}
            }
        }
        erased
    }
}

/// What [`Conversation::change`] decided.
pub(super) enum Decided {
    Refused(Refusal),
    /// Nothing to change: the seq and ts to answer with.
    Same(u64, i64),
    Stored(StoredUpdate),
}
