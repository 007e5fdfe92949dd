//! The operations of the writer: what each change does inside the batch's
//! transaction, and what it leaves for after the commit (hot-state deltas,
//! events, answers).

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use rusqlite::{Transaction, params};
use tokio::sync::oneshot;

use super::State;
use crate::{
    engine::{
        Appended, Group, MembershipChange, NewMessage, NewUpdate, ReceiptOutcome, ReceiptRow, Route, UpdateOutcome,
        membership,
    },
    error::{EngineError, EngineResult},
    hub::{Event, EventKind},
    node::message_frame,
    protocol::{ConversationObject, ServerFrame, render},
};

pub(super) type Reply<T> = oneshot::Sender<EngineResult<T>>;

pub enum Op {
    /// A change of a message (v1.2).
    Update {
        update: NewUpdate,
        route: Route,
        reply: Reply<UpdateOutcome>,
    },
    Append {
        msg: NewMessage,
        route: Route,
        reply: Reply<Option<Appended>>,
    },
    Receipt {
        conversation: String,
        user: String,
        seq: i64,
        read: bool,
        reply: Reply<ReceiptOutcome>,
    },
    PutGroup {
        conversation: String,
        title: String,
        members: Vec<String>,
        reply: Reply<MembershipChange>,
    },
    UpdateGroup {
        conversation: String,
        add: Vec<String>,
        remove: Vec<String>,
        reply: Reply<Option<MembershipChange>>,
    },
    JoinOpen {
        conversation: String,
        user: String,
        reply: Reply<usize>,
    },
    /// Erases the body of every message `user` sent.
    EraseSender {
        user: String,
        reply: Reply<u64>,
    },
    /// Deletes a group with its history (the conversation keeps a new epoch).
    DeleteGroup {
        conversation: String,
        reply: Reply<Option<MembershipChange>>,
    },
    /// Commits what is queued, marks a clean stop and ends the thread.
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

impl Op {
    pub(super) fn fail(self, why: &str) {
        let e = || EngineError::Unavailable(why.to_string());
        match self {
            Op::Append { reply, .. } => drop(reply.send(Err(e()))),
            Op::Update { reply, .. } => drop(reply.send(Err(e()))),
            Op::Receipt { reply, .. } => drop(reply.send(Err(e()))),
            Op::PutGroup { reply, .. } => drop(reply.send(Err(e()))),
            Op::UpdateGroup { reply, .. } => drop(reply.send(Err(e()))),
            Op::JoinOpen { reply, .. } => drop(reply.send(Err(e()))),
            Op::EraseSender { reply, .. } => drop(reply.send(Err(e()))),
            Op::DeleteGroup { reply, .. } => drop(reply.send(Err(e()))),
            Op::Shutdown { reply } => drop(reply.send(())),
        }
    }
}

/// What a unit of work changed, applied to the hot state once committed.
#[derive(Clone)]
pub(super) struct Delta {
    pub(super) id: i64,
    pub(super) last_seq: u64,
    pub(super) group: Option<Arc<Group>>,
    pub(super) open_members: Arc<BTreeSet<String>>,
    pub(super) seq_dirty: bool,
    /// The history was deleted in this batch: receipts go, and this is the
    /// conversation's new epoch.
    pub(super) reset: Option<Arc<str>>,
}

/// An answer waiting for the commit.
pub(super) type Pending = Box<dyn FnOnce(Option<&str>) + Send>;

pub(super) fn pending<T: Send + 'static>(reply: Reply<T>, value: T) -> Pending {
    Box::new(move |err: Option<&str>| {
        let _ = reply.send(match err {
            None => Ok(value),
            Some(why) => Err(EngineError::Unavailable(why.to_string())),
        });
    })
}

#[derive(Default)]
pub(super) struct Batch {
    pub(super) convs: HashMap<String, Delta>,
    pub(super) receipts: HashMap<(String, String), (u64, u64)>,
    /// (user, conversation, added)
    pub(super) index: Vec<(String, String, bool)>,
    pub(super) events: Vec<(Route, Event)>,
    pub(super) pending: Vec<Pending>,
    /// Bodies were erased or history deleted: checkpoint the WAL after the
    /// commit, so the old pages leave it too.
    pub(super) checkpoint: bool,
}

/// The conversation as this batch sees it; created when `create`.
pub(super) fn conv<'b>(
    tx: &Transaction,
    state: &State,
    b: &'b mut Batch,
    name: &str,
    create: bool,
) -> rusqlite::Result<Option<&'b mut Delta>> {
    if !b.convs.contains_key(name) {
        let existing = state.convs.read().get(name).map(|c| Delta {
            id: c.id,
            last_seq: c.last_seq,
            group: c.group.clone(),
            open_members: c.open_members.clone(),
            seq_dirty: false,
            reset: None,
        });
        let d = match existing {
            Some(d) => d,
            None if create => {
                let id = tx
                    .prepare_cached("INSERT INTO conversations (name) VALUES (?1) RETURNING id")?
                    .query_row([name], |r| r.get(0))?;
                Delta { id, last_seq: 0, group: None, open_members: Arc::default(), seq_dirty: false, reset: None }
            }
            None => return Ok(None),
        };
        b.convs.insert(name.to_string(), d);
    }
    Ok(b.convs.get_mut(name))
}

fn object(name: &str, d: &Delta) -> ConversationObject {
    let g = d.group.as_deref();
    ConversationObject {
        id: name.to_string(),
        title: g.map(|g| g.title.clone()).unwrap_or_default(),
        members: g.map(|g| g.members.clone()).unwrap_or_default(),
        last_seq: d.last_seq,
    }
}

fn index(tx: &Transaction, b: &mut Batch, conv: &str, added: &[String], removed: &[String]) -> rusqlite::Result<()> {
    let mut ins = tx.prepare_cached("INSERT OR IGNORE INTO user_conversations (user, conv) VALUES (?1, ?2)")?;
    for u in added {
        ins.execute(params![u, conv])?;
        b.index.push((u.clone(), conv.to_string(), true));
    }
    let mut del = tx.prepare_cached("DELETE FROM user_conversations WHERE user = ?1 AND conv = ?2")?;
    for u in removed {
        del.execute(params![u, conv])?;
        b.index.push((u.clone(), conv.to_string(), false));
    }
    Ok(())
}

fn set_members(tx: &Transaction, id: i64, kind: i64, added: &[String], removed: &[String]) -> rusqlite::Result<()> {
    let mut ins = tx.prepare_cached("INSERT OR IGNORE INTO members (conv, kind, user) VALUES (?1, ?2, ?3)")?;
    for u in added {
        ins.execute(params![id, kind, u])?;
    }
    let mut del = tx.prepare_cached("DELETE FROM members WHERE conv = ?1 AND kind = ?2 AND user = ?3")?;
    for u in removed {
        del.execute(params![id, kind, u])?;
    }
    Ok(())
}

/// One operation inside the batch's transaction.
pub(super) fn apply(tx: &Transaction, state: &State, b: &mut Batch, op: Op) -> rusqlite::Result<()> {
    match op {
        Op::Append { msg, route, reply } => {
            let Some(d) = conv(tx, state, b, &msg.conversation, !msg.require_member)? else {
                b.pending.push(pending(reply, None));
                return Ok(());
            };
            if msg.require_member && !d.group.as_ref().is_some_and(|g| membership::contains(&g.members, &msg.sender.id))
            {
                b.pending.push(pending(reply, None));
                return Ok(());
            }
            let id = d.id;
            let seq = d.last_seq + 1;
            // Idempotency in the insert itself: a repeat of (sender,
            // client_msg_id) inserts nothing, and only then is the stored one
            // looked up (one index search per message, not two).
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO messages (conv, seq, ts_ms, sender_id, sender_name, body, client_msg_id, reply_to) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                     ON CONFLICT (conv, sender_id, client_msg_id) DO NOTHING",
                )?
                .execute(params![
                    id,
                    seq as i64,
                    msg.ts_ms,
                    msg.sender.id,
                    msg.sender.name,
                    msg.body,
                    msg.client_msg_id,
                    msg.reply_to.map(|r| r as i64)
                ])?;
            if inserted == 0 {
                let (seq, ts_ms): (i64, i64) = tx
                    .prepare_cached(
                        "SELECT seq, ts_ms FROM messages WHERE conv = ?1 AND sender_id = ?2 AND client_msg_id = ?3",
                    )?
                    .query_row(params![id, msg.sender.id, msg.client_msg_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
                b.pending.push(pending(reply, Some(Appended { seq: seq as u64, ts_ms, duplicate: true })));
                return Ok(());
            }
            d.last_seq = seq;
            d.seq_dirty = true;
            if seq == 1
                && let Some(pair) = &msg.participants
            {
                index(tx, b, &msg.conversation, pair, &[])?;
            }
            let stored = msg.stored(seq);
            let frame = render(&ServerFrame::Message(message_frame(&msg.conversation, &stored)));
            b.events.push((route, Event::new(EventKind::Message, frame)));
            b.pending.push(pending(reply, Some(Appended { seq, ts_ms: msg.ts_ms, duplicate: false })));
        }
        Op::Update { update, route, reply } => {
            let outcome = super::changes::apply_update(tx, state, b, &update, route)?;
            b.pending.push(pending(reply, outcome));
        }
        Op::Receipt { conversation, user, seq, read, reply } => {
            let Some(d) = conv(tx, state, b, &conversation, false)? else {
                b.pending.push(pending(reply, ReceiptOutcome::OutOfRange { last_seq: 0 }));
                return Ok(());
            };
            let (id, last_seq) = (d.id, d.last_seq);
            if seq < 1 || seq as u64 > last_seq {
                b.pending.push(pending(reply, ReceiptOutcome::OutOfRange { last_seq }));
                return Ok(());
            }
            let seq = seq as u64;
            let key = (conversation, user);
            let before = match b.receipts.get(&key) {
                Some(m) => *m,
                None => {
                    state.convs.read().get(&key.0).and_then(|c| c.receipts.get(&key.1).copied()).unwrap_or_default()
                }
            };
            let after = (before.0.max(seq), if read { before.1.max(seq) } else { before.1 });
            if after == before {
                b.pending.push(pending(reply, ReceiptOutcome::Unchanged));
                return Ok(());
            }
            tx.prepare_cached(
                "INSERT INTO receipts (conv, user, delivered_seq, read_seq) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (conv, user) DO UPDATE SET delivered_seq = excluded.delivered_seq, read_seq = excluded.read_seq",
            )?
            .execute(params![id, key.1, after.0 as i64, after.1 as i64])?;
            let row = ReceiptRow { user: key.1.clone(), delivered_seq: after.0, read_seq: after.1 };
            b.receipts.insert(key, after);
            b.pending.push(pending(reply, ReceiptOutcome::Changed(row)));
        }
        Op::PutGroup { conversation, title, members, reply } => {
            let d = conv(tx, state, b, &conversation, true)?.expect("created");
            let old = d.group.as_ref().map(|g| g.members.as_slice()).unwrap_or_default();
            let (members, added, removed) = membership::replace(old, members);
            let id = d.id;
            d.group = Some(Arc::new(Group { title: title.clone(), members }));
            let obj = object(&conversation, d);
            tx.prepare_cached("UPDATE conversations SET is_group = 1, title = ?2 WHERE id = ?1")?
                .execute(params![id, title])?;
            set_members(tx, id, 0, &added, &removed)?;
            index(tx, b, &conversation, &added, &removed)?;
            b.pending.push(pending(reply, MembershipChange { conversation: obj, added, removed }));
        }
        Op::UpdateGroup { conversation, add, remove, reply } => {
            let Some(d) = conv(tx, state, b, &conversation, false)? else {
                b.pending.push(pending(reply, None));
                return Ok(());
            };
            let Some(group) = d.group.as_mut() else {
                b.pending.push(pending(reply, None));
                return Ok(());
            };
            let (members, added, removed) = membership::update(&group.members, add, remove);
            Arc::make_mut(group).members = members;
            let id = d.id;
            let obj = object(&conversation, d);
            set_members(tx, id, 0, &added, &removed)?;
            index(tx, b, &conversation, &added, &removed)?;
            b.pending.push(pending(reply, Some(MembershipChange { conversation: obj, added, removed })));
        }
        Op::JoinOpen { conversation, user, reply } => {
            let d = conv(tx, state, b, &conversation, true)?.expect("created");
            if !d.open_members.contains(&user) {
                set_members(tx, d.id, 1, std::slice::from_ref(&user), &[])?;
                Arc::make_mut(&mut d.open_members).insert(user);
            }
            let n = d.open_members.len();
            b.pending.push(pending(reply, n));
        }
        Op::EraseSender { user, reply } => {
            // A scan of every message (no index by sender): erasure is rare.
            let n = tx
                .prepare_cached("UPDATE messages SET body = '', deleted = 1 WHERE sender_id = ?1 AND deleted = 0")?
                .execute([&user])?;
            // And the bodies of the user's edits (v1.2), not counted.
            let edits = tx
                .prepare_cached("UPDATE updates SET body = '' WHERE user_id = ?1 AND kind = 'edit' AND body <> ''")?
                .execute([&user])?;
            b.checkpoint |= n + edits > 0;
            b.pending.push(pending(reply, n as u64));
        }
        Op::DeleteGroup { conversation, reply } => {
            let Some(d) = conv(tx, state, b, &conversation, false)? else {
                b.pending.push(pending(reply, None));
                return Ok(());
            };
            let Some(group) = d.group.take() else {
                b.pending.push(pending(reply, None));
                return Ok(());
            };
            let id = d.id;
            let epoch: Arc<str> = crate::engine::new_epoch().into();
            d.last_seq = 0;
            d.seq_dirty = true;
            d.reset = Some(epoch.clone());
            for sql in [
                "DELETE FROM messages WHERE conv = ?1",
                "DELETE FROM updates WHERE conv = ?1",
                "DELETE FROM receipts WHERE conv = ?1",
                "DELETE FROM members WHERE conv = ?1 AND kind = 0",
            ] {
                tx.prepare_cached(sql)?.execute([id])?;
            }
            tx.prepare_cached("UPDATE conversations SET is_group = 0, title = '', epoch = ?2 WHERE id = ?1")?
                .execute(params![id, &*epoch])?;
            let group = Arc::unwrap_or_clone(group);
            index(tx, b, &conversation, &[], &group.members)?;
            // Receipts of this batch for the deleted history go too.
            b.receipts.retain(|(c, _), _| *c != conversation);
            b.checkpoint = true;
            let obj = ConversationObject { id: conversation, title: group.title, members: Vec::new(), last_seq: 0 };
            b.pending.push(pending(
                reply,
                Some(MembershipChange { conversation: obj, added: Vec::new(), removed: group.members }),
            ));
        }
        Op::Shutdown { reply } => {
            let _ = reply.send(());
        }
    }
    Ok(())
}
