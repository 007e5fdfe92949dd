//! The writer thread: owns the write connection, takes every change from a
//! bounded channel and commits all that is queued in ONE transaction (group
//! commit: with `fsync = always` one fsync per batch, not per message).
//!
//! It assigns `seq`s, checks membership and idempotency inside that
//! transaction, and after the commit returned it updates the hot state, puts
//! the batch's `message` events in the [`Outbox`] and answers the callers.
//! Each caller then delivers what the outbox holds, in commit order, before
//! it acks (as the in-memory engine delivers in the sender's task: no extra
//! hop through another thread or task), so delivery is `seq` order per
//! conversation and a message is delivered before its `ack`.
//!
//! With `everysec` the WAL is fsync'd once a second by the syncer thread, so
//! a slow fsync never holds up a commit.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::{ConvState, State, store};
use crate::{
    config::Fsync,
    engine::{Appended, Group, MembershipChange, NewMessage, ReceiptOutcome, ReceiptRow, Route, membership},
    error::{EngineError, EngineResult},
    hub::{Event, EventKind, Hub, now_us},
    protocol::{ConversationObject, MessageFrame, SenderRef, ServerFrame, render},
};

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 2048;
/// Messages considered per conversation and pass by the age pruning.
const PRUNE_BATCH: usize = 5000;

type Reply<T> = oneshot::Sender<EngineResult<T>>;

pub enum Op {
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
    fn fail(self, why: &str) {
        let e = || EngineError::Unavailable(why.to_string());
        match self {
            Op::Append { reply, .. } => drop(reply.send(Err(e()))),
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

pub struct Settings {
    pub dir: PathBuf,
    pub fsync: Fsync,
    pub max_messages: u64,
    pub max_age_ms: i64,
}

/// What a unit of work changed, applied to the hot state once committed.
#[derive(Clone)]
struct Delta {
    id: i64,
    last_seq: u64,
    group: Option<Arc<Group>>,
    open_members: Arc<BTreeSet<String>>,
    seq_dirty: bool,
    /// The history was deleted in this batch: receipts go, and this is the
    /// conversation's new epoch.
    reset: Option<Arc<str>>,
}

/// An answer waiting for the commit.
type Pending = Box<dyn FnOnce(Option<&str>) + Send>;

fn pending<T: Send + 'static>(reply: Reply<T>, value: T) -> Pending {
    Box::new(move |err: Option<&str>| {
        let _ = reply.send(match err {
            None => Ok(value),
            Some(why) => Err(EngineError::Unavailable(why.to_string())),
        });
    })
}

#[derive(Default)]
struct Batch {
    convs: HashMap<String, Delta>,
    receipts: HashMap<(String, String), (u64, u64)>,
    /// (user, conversation, added)
    index: Vec<(String, String, bool)>,
    events: Vec<(Route, Event)>,
    pending: Vec<Pending>,
    /// Bodies were erased or history deleted: checkpoint the WAL after the
    /// commit, so the old pages leave it too.
    checkpoint: bool,
}

pub struct Writer {
    conn: Connection,
    state: Arc<State>,
    outbox: Arc<Outbox>,
    settings: Settings,
    alive: Arc<AtomicBool>,
    /// Commits not yet fsync'd (everysec), for the syncer thread.
    unsynced: Arc<AtomicBool>,
    last_prune: Instant,
}

/// Committed events waiting for delivery, in commit order.
pub struct Outbox {
    hub: Arc<Hub>,
    queue: Mutex<VecDeque<Vec<(Route, Event)>>>,
    /// Held while delivering: one deliverer at a time keeps commit order.
    turn: Mutex<()>,
}

impl Outbox {
    pub fn new(hub: Arc<Hub>) -> Self {
        Outbox { hub, queue: Mutex::default(), turn: Mutex::default() }
    }

    fn push(&self, events: Vec<(Route, Event)>) {
        if !events.is_empty() {
            self.queue.lock().push_back(events);
        }
    }

    /// Delivers every committed event not delivered yet, in commit order.
    /// When it returns, everything committed before the call was delivered.
    pub fn flush(&self) {
        let _turn = self.turn.lock();
        while let Some(events) = self.queue.lock().pop_front() {
            for (route, mut event) in events {
                event.stored_at_us = Some(now_us());
                let _fanout = tracing::debug_span!("fanout", kind = "message").entered();
                for topic in &route {
                    self.hub.dispatch(topic, &event);
                }
            }
        }
    }
}

/// The syncer thread (everysec): fsyncs the WAL once a second when something
/// was committed since, until `alive` turns false.
pub fn syncer(dir: PathBuf, unsynced: Arc<AtomicBool>, alive: Arc<AtomicBool>) {
    let wal = store::wal_path(&dir);
    while alive.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_secs(1));
        if unsynced.swap(false, Ordering::AcqRel)
            && let Err(e) = std::fs::File::open(&wal).and_then(|f| f.sync_data())
        {
            unsynced.store(true, Ordering::Release);
            tracing::warn!(error = %e, "fsync of the WAL failed; retrying in a second");
        }
    }
}

/// Why a write failed, for the `unavailable` answer and the log.
fn describe(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => "disk full: nothing was stored".into(),
        _ => format!("store write failed: {e}"),
    }
}

impl Writer {
    pub fn new(
        conn: Connection,
        state: Arc<State>,
        outbox: Arc<Outbox>,
        settings: Settings,
        alive: Arc<AtomicBool>,
        unsynced: Arc<AtomicBool>,
    ) -> Self {
        Writer { conn, state, outbox, settings, alive, unsynced, last_prune: Instant::now() }
    }

    /// The thread's body: runs until `Shutdown` or until every sender is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        /// Not ready once the writer is gone, even by a panic.
        struct Alive(Arc<AtomicBool>);
        impl Drop for Alive {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _alive = Alive(self.alive.clone());
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("writer runtime");
        let tick = Duration::from_secs(1);
        let mut next_tick = Instant::now() + tick;
        let mut shutdown = None;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let mut ops = Vec::new();
            let closed = match rt.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                Ok(Some(op)) => {
                    ops.push(op);
                    while ops.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(op) => ops.push(op),
                            Err(_) => break,
                        }
                    }
                    false
                }
                Ok(None) => true,
                Err(_) => false,
            };
            if let Some(i) = ops.iter().position(|o| matches!(o, Op::Shutdown { .. })) {
                let rest = ops.split_off(i);
                for op in rest {
                    match op {
                        Op::Shutdown { reply } if shutdown.is_none() => shutdown = Some(reply),
                        other => other.fail("shutting down"),
                    }
                }
            }
            if !ops.is_empty() {
                self.batch(ops);
            }
            if closed || shutdown.is_some() {
                break;
            }
            if Instant::now() >= next_tick {
                self.tick();
                next_tick = Instant::now() + tick;
            }
        }
        rx.close();
        while let Ok(op) = rx.try_recv() {
            op.fail("shutting down");
        }
        match store::close_cleanly(&self.conn) {
            Ok(()) => tracing::info!(dir = %self.settings.dir.display(), "store closed cleanly"),
            Err(e) => tracing::warn!(error = %e, "store not marked clean; the next start may begin a new epoch"),
        }
        if let Some(reply) = shutdown {
            let _ = reply.send(());
        }
    }

    /// Once a second: age pruning, the storage gauge.
    fn tick(&mut self) {
        if self.settings.max_age_ms > 0 && self.last_prune.elapsed() >= Duration::from_secs(10) {
            self.last_prune = Instant::now();
            if let Err(e) = self.prune_by_age() {
                tracing::warn!(error = %describe(&e), "pruning old messages failed; retrying later");
            }
        }
        crate::metrics::storage_bytes(store::storage_bytes(&self.settings.dir));
    }

    fn prune_by_age(&mut self) -> rusqlite::Result<()> {
        let cutoff = crate::protocol::now_ms() - self.settings.max_age_ms;
        let ids: Vec<i64> = self.state.convs.read().values().map(|c| c.id).collect();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut oldest =
                tx.prepare_cached("SELECT seq, ts_ms FROM messages WHERE conv = ?1 ORDER BY seq LIMIT ?2")?;
            let mut delete = tx.prepare_cached("DELETE FROM messages WHERE conv = ?1 AND seq <= ?2")?;
            for id in ids {
                let mut upto = None;
                let mut rows = oldest.query(params![id, PRUNE_BATCH as i64])?;
                while let Some(r) = rows.next()? {
                    if r.get::<_, i64>(1)? >= cutoff {
                        break;
                    }
                    upto = Some(r.get::<_, i64>(0)?);
                }
                drop(rows);
                if let Some(seq) = upto {
                    delete.execute(params![id, seq])?;
                }
            }
        }
        tx.commit()?;
        self.unsynced.store(true, Ordering::Release);
        Ok(())
    }

    fn batch(&mut self, ops: Vec<Op>) {
        let mut b = Batch::default();
        let result = (|| -> rusqlite::Result<()> {
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut ops = ops.into_iter();
            while let Some(op) = ops.next() {
                if let Err(e) = apply(&tx, &self.state, &mut b, op) {
                    let why = describe(&e);
                    ops.for_each(|op| op.fail(&why));
                    return Err(e);
                }
            }
            {
                let mut upd = tx.prepare_cached("UPDATE conversations SET last_seq = ?2 WHERE id = ?1")?;
                let mut prune = tx.prepare_cached("DELETE FROM messages WHERE conv = ?1 AND seq <= ?2")?;
                for d in b.convs.values().filter(|d| d.seq_dirty) {
                    upd.execute(params![d.id, d.last_seq as i64])?;
                    if d.last_seq > self.settings.max_messages {
                        prune.execute(params![d.id, (d.last_seq - self.settings.max_messages) as i64])?;
                    }
                }
            }
            tx.commit()
        })();
        match result {
            Ok(()) => {
                if self.settings.fsync == Fsync::Everysec {
                    self.unsynced.store(true, Ordering::Release);
                }
                if b.checkpoint
                    && let Err(e) = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                {
                    tracing::warn!(error = %e, "WAL checkpoint after an erasure failed; the next one removes the old pages");
                }
                self.publish(b);
            }
            Err(e) => {
                let why = describe(&e);
                tracing::warn!(error = %why, "store batch rolled back");
                // A failed COMMIT may leave the transaction open.
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                for p in b.pending {
                    p(Some(&why));
                }
            }
        }
    }

    /// After the commit: hot state, then the outbox, then the answers.
    fn publish(&self, b: Batch) {
        {
            let mut convs = self.state.convs.write();
            for (name, d) in b.convs {
                let c = convs.entry(name).or_insert_with(|| ConvState {
                    id: d.id,
                    last_seq: 0,
                    group: None,
                    open_members: Arc::default(),
                    receipts: HashMap::new(),
                    epoch: None,
                });
                c.last_seq = d.last_seq;
                c.group = d.group;
                c.open_members = d.open_members;
                if let Some(epoch) = d.reset {
                    c.receipts.clear();
                    c.epoch = Some(epoch);
                }
            }
            for ((conv, user), marks) in b.receipts {
                if let Some(c) = convs.get_mut(&conv) {
                    c.receipts.insert(user, marks);
                }
            }
        }
        if !b.index.is_empty() {
            let mut idx = self.state.user_index.write();
            for (user, conv, added) in b.index {
                if added {
                    idx.entry(user).or_default().insert(conv);
                } else if let Some(set) = idx.get_mut(&user) {
                    set.remove(&conv);
                }
            }
        }
        // Events before answers: a caller that wakes finds its own there.
        self.outbox.push(b.events);
        for p in b.pending {
            p(None);
        }
    }
}

/// The conversation as this batch sees it; created when `create`.
fn conv<'b>(
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
fn apply(tx: &Transaction, state: &State, b: &mut Batch, op: Op) -> rusqlite::Result<()> {
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
            let repeat: Option<(i64, i64)> = tx
                .prepare_cached(
                    "SELECT seq, ts_ms FROM messages WHERE conv = ?1 AND sender_id = ?2 AND client_msg_id = ?3",
                )?
                .query_row(params![id, msg.sender.id, msg.client_msg_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((seq, ts_ms)) = repeat {
                b.pending.push(pending(reply, Some(Appended { seq: seq as u64, ts_ms, duplicate: true })));
                return Ok(());
            }
            let seq = d.last_seq + 1;
            tx.prepare_cached(
                "INSERT INTO messages (conv, seq, ts_ms, sender_id, sender_name, body, client_msg_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                id,
                seq as i64,
                msg.ts_ms,
                msg.sender.id,
                msg.sender.name,
                msg.body,
                msg.client_msg_id
            ])?;
            d.last_seq = seq;
            d.seq_dirty = true;
            if seq == 1
                && let Some(pair) = &msg.participants
            {
                index(tx, b, &msg.conversation, pair, &[])?;
            }
            let frame = render(&ServerFrame::Message(MessageFrame {
                conversation: &msg.conversation,
                seq,
                ts: msg.ts_ms,
                sender: SenderRef { id: &msg.sender.id, name: &msg.sender.name },
                body: &msg.body,
                client_msg_id: &msg.client_msg_id,
                deleted: false,
            }));
            b.events.push((route, Event::new(EventKind::Message, frame)));
            b.pending.push(pending(reply, Some(Appended { seq, ts_ms: msg.ts_ms, duplicate: false })));
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
            b.checkpoint |= n > 0;
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
