//! Batching in large conversations (PROTOCOL v1.1): presence and receipt
//! changes are collected per conversation and pushed at most once per
//! `limits.batch_interval_ms`, carrying the latest state per user; so is
//! typing (issue 22: who typed since the last push).

use super::*;

/// The latest state per user of one conversation since the last flush.
#[derive(Default)]
pub(super) struct Batch {
    presence: BTreeMap<Arc<str>, bool>,
    receipts: BTreeMap<Arc<str>, (u64, u64)>,
    /// Who typed: user id -> display name.
    typing: BTreeMap<Arc<str>, Arc<str>>,
}

/// The user of a single typing frame, read back when it joins a batch.
#[derive(Deserialize)]
struct Typist {
    user: TypistRef,
}

#[derive(Deserialize)]
struct TypistRef {
    id: Arc<str>,
    name: Arc<str>,
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
    /// Adds a batchable change to its conversation's batch (dropped when no
    /// local connection follows the conversation).
    pub(super) fn collect(&self, conv: &Arc<str>, event: &Event) {
        if !self.convs.read().contains_key(conv) {
            return;
        }
        if event.kind == EventKind::Typing {
            let Ok(t) = serde_json::from_str::<Typist>(event.frame.as_str()) else {
                tracing::warn!("unreadable batchable frame");
                return;
            };
            let mut batches = self.batches.lock();
            batches.entry(conv.clone()).or_default().typing.insert(t.user.id, t.user.name);
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

    /// Pushes every pending batch: one presence, one receipt and one typing
    /// frame per conversation to each subscribed connection, carrying the
    /// latest state per user. A connection does not hear its own user's
    /// presence or typing.
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
            if !b.typing.is_empty() {
                // Sorted by id, as `presence` is: the same cut per recipient.
                let users: Vec<SenderRef> = b.typing.iter().map(|(id, name)| SenderRef { id, name }).collect();
                let empty = render(&ServerFrame::TypingBatch(TypingBatch { conversation: &conv, users: Vec::new() }));
                let (all, cuts) = render_cuttable(empty, &users);
                self.push_all(&conns, kind::TYPING, |c| match users.binary_search_by(|u| u.id.cmp(&*c.user)) {
                    Ok(_) if users.len() == 1 => None,
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
}
