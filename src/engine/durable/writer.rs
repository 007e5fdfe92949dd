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
//! a slow fsync never holds up a commit; in both modes that thread, not the
//! writer, checkpoints the WAL into the database.

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use rusqlite::{Connection, ErrorCode, TransactionBehavior, params};
use tokio::sync::mpsc;

use super::{
    ConvState, State,
    ops::{Batch, Op, apply},
    store,
};
use crate::{
    config::Fsync,
    engine::Route,
    hub::{Event, Hub, now_us},
};

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 2048;
/// Messages considered per conversation and pass by the age pruning.
const PRUNE_BATCH: usize = 5000;

pub struct Settings {
    pub dir: PathBuf,
    pub fsync: Fsync,
    pub max_messages: u64,
    pub max_age_ms: i64,
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

/// WAL size past which the syncer also restarts the log: the passive
/// checkpoint never catches up with a writer that commits all the time, so
/// without it the WAL would grow for as long as the load lasts.
const WAL_RESTART_BYTES: u64 = 16 << 20;

/// The syncer thread, once a second until `alive` turns false:
/// - `everysec` (`fsync_wal`): fsyncs the WAL when something was committed;
/// - checkpoints the WAL into the database on its own connection, so the
///   writer never does (`wal_autocheckpoint=0`, [`store::set_sync`]): an
///   automatic checkpoint ran in the writer's commit about every 1,000 pages,
///   with two fsyncs each, and every caller of that batch waited for them
///   (pairs on the durable engine: 150 fsyncs/s in the writer).
///   A passive checkpoint copies what it can while the writer goes on; when
///   the WAL has grown past [`WAL_RESTART_BYTES`] a restart checkpoint holds
///   the writer for the (short) rest so the log starts over.
pub fn syncer(dir: PathBuf, fsync_wal: bool, unsynced: Arc<AtomicBool>, alive: Arc<AtomicBool>) {
    let wal = store::wal_path(&dir);
    let mut conn = None;
    while alive.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_secs(1));
        if fsync_wal
            && unsynced.swap(false, Ordering::AcqRel)
            && let Err(e) = std::fs::File::open(&wal).and_then(|f| f.sync_data())
        {
            unsynced.store(true, Ordering::Release);
            tracing::warn!(error = %e, "fsync of the WAL failed; retrying in a second");
        }
        if conn.is_none() {
            conn = store::open_checkpointer(&dir)
                .inspect_err(
                    |e| tracing::warn!(error = %e, "cannot open the store to checkpoint; retrying in a second"),
                )
                .ok();
        }
        let Some(c) = &conn else { continue };
        let big = std::fs::metadata(&wal).is_ok_and(|m| m.len() > WAL_RESTART_BYTES);
        for mode in if big { &["PASSIVE", "RESTART"][..] } else { &["PASSIVE"][..] } {
            // Busy (a reader on an old snapshot, the writer's own erasure
            // checkpoint): the next second tries again.
            if let Err(e) = c.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(())) {
                tracing::debug!(error = %e, mode, "WAL checkpoint did not complete; retrying in a second");
            }
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
            let mut delete_updates = tx.prepare_cached("DELETE FROM updates WHERE conv = ?1 AND seq <= ?2")?;
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
                    delete_updates.execute(params![id, seq])?;
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
                let mut prune_updates = tx.prepare_cached("DELETE FROM updates WHERE conv = ?1 AND seq <= ?2")?;
                // Retention counts messages and updates: the newest seqs stay.
                for d in b.convs.values().filter(|d| d.seq_dirty) {
                    upd.execute(params![d.id, d.last_seq as i64])?;
                    if d.last_seq > self.settings.max_messages {
                        let upto = (d.last_seq - self.settings.max_messages) as i64;
                        prune.execute(params![d.id, upto])?;
                        prune_updates.execute(params![d.id, upto])?;
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
