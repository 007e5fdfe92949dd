//! The durable embedded engine: one node, history on disk (`chat.data_dir`).
//!
//! - Store: SQLite (bundled) in WAL mode, one file `chat.db` (see
//!   [`store`] for the schema and the epoch rules); the directory is `0700`
//!   and its files `0600` whatever the umask ([`perms`]).
//! - Writes: one writer thread owns the write connection and commits every
//!   queued change in one transaction (group commit, [`writer`]); callers
//!   get their answer (the `ack`) only after the commit returned, and with
//!   `chat.fsync = always` after it was fsync'd.
//! - Reads: history pages and unread counts from read-only connections on
//!   the blocking pool; everything else from the hot state in memory
//!   (per-conversation `last_seq`, groups, members, receipts, the per-user
//!   index), loaded at start without reading message bodies.
//! - Fan-out stays in process: after the commit the writer queues the
//!   batch's `message` events in the outbox and answers; each caller delivers
//!   the outbox (commit order, one deliverer at a time) before it acks, so
//!   delivery is `seq` order and a message is delivered before its `ack`.
//! - A full disk fails the batch (`unavailable`, nothing acked); reads go on
//!   and writes succeed again once space returns.

mod changes;
mod ops;
mod perms;
mod store;
mod writer;

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot};

pub use self::store::DB_FILE;
use self::{
    ops::Op,
    writer::{Outbox, Settings, Writer},
};
use super::{
    Appended, Counters, Engine, Group, Groups, MembershipChange, MessagePage, MessageStore, NewMessage, NewUpdate,
    Page, ReceiptOutcome, ReceiptRow, Route, UpdateOutcome, local::LocalPresence, membership,
};
use crate::{
    config::Config,
    error::{EngineError, EngineResult},
    hub::Hub,
};

/// Changes queued for the writer before senders wait.
const QUEUE: usize = 8192;
/// Idle read connections kept.
const IDLE_READERS: usize = 8;

/// A conversation's hot state.
pub(crate) struct ConvState {
    id: i64,
    last_seq: u64,
    group: Option<Arc<Group>>,
    open_members: Arc<BTreeSet<String>>,
    /// user -> (delivered_seq, read_seq)
    receipts: HashMap<String, (u64, u64)>,
    /// Its own epoch once its history was deleted; else the store's.
    epoch: Option<Arc<str>>,
}

/// Written by the writer thread only, after each commit.
pub(crate) struct State {
    convs: RwLock<HashMap<String, ConvState>>,
    user_index: RwLock<HashMap<String, BTreeSet<String>>>,
}

struct Readers {
    dir: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

pub struct DurableEngine {
    hub: Arc<Hub>,
    state: Arc<State>,
    tx: mpsc::Sender<Op>,
    outbox: Arc<Outbox>,
    readers: Arc<Readers>,
    epoch: Arc<str>,
    presence: LocalPresence,
    alive: Arc<AtomicBool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held for the life of the engine: one process per directory.
    _lock: std::fs::File,
}

fn read_error(e: rusqlite::Error) -> EngineError {
    EngineError::Unavailable(format!("store read failed: {e}"))
}

fn gone() -> EngineError {
    EngineError::Unavailable("store writer stopped".into())
}

impl DurableEngine {
    /// Opens the store in `dir` (created if missing) and starts the writer.
    pub fn open(cfg: &Config, dir: PathBuf, hub: Arc<Hub>) -> anyhow::Result<Self> {
        let started = std::time::Instant::now();
        let opened = store::open(&dir, cfg.chat.fsync)?;
        let state = Arc::new(opened.state);
        let (messages, conversations) = {
            let convs = state.convs.read();
            (convs.values().map(|c| c.last_seq).sum::<u64>(), convs.len())
        };
        match opened.new_epoch {
            Some(why) => tracing::warn!(epoch = %opened.epoch, dir = %dir.display(), why, "store: new epoch"),
            None => tracing::info!(epoch = %opened.epoch, dir = %dir.display(), "store: epoch kept"),
        }
        tracing::info!(
            dir = %dir.display(),
            fsync = cfg.chat.fsync.as_str(),
            conversations,
            seqs_assigned = messages,
            storage_bytes = store::storage_bytes(&dir),
            open_ms = started.elapsed().as_millis() as u64,
            "durable embedded engine: single node, history on disk"
        );
        let alive = Arc::new(AtomicBool::new(true));
        let (tx, rx) = mpsc::channel(QUEUE);
        let settings = Settings {
            dir: dir.clone(),
            fsync: cfg.chat.fsync,
            max_messages: cfg.chat.history_max_messages.max(1) as u64,
            max_age_ms: (cfg.chat.history_max_age_s as i64).saturating_mul(1000),
        };
        let outbox = Arc::new(Outbox::new(hub.clone()));
        // Delivers what a caller that went away left in the outbox.
        let weak = Arc::downgrade(&outbox);
        tokio::runtime::Handle::current().spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
            while let Some(o) = {
                tick.tick().await;
                weak.upgrade()
            } {
                o.flush();
            }
        });
        let unsynced = Arc::new(AtomicBool::new(false));
        {
            let fsync_wal = cfg.chat.fsync == crate::config::Fsync::Everysec;
            let (dir, unsynced, alive) = (dir.clone(), unsynced.clone(), alive.clone());
            std::thread::Builder::new()
                .name("chat-store-sync".into())
                .spawn(move || writer::syncer(dir, fsync_wal, unsynced, alive))?;
        }
        let w = Writer::new(opened.conn, state.clone(), outbox.clone(), settings, alive.clone(), unsynced);
        let handle = std::thread::Builder::new().name("chat-store-writer".into()).spawn(move || w.run(rx))?;
        Ok(DurableEngine {
            hub,
            state,
            tx,
            outbox,
            readers: Arc::new(Readers { dir, idle: Mutex::default() }),
            epoch: opened.epoch.into(),
            presence: LocalPresence::default(),
            alive,
            writer: Mutex::new(Some(handle)),
            _lock: opened.lock,
        })
    }

    /// Sends `op` to the writer and waits for its answer (after the commit).
    async fn write<T>(&self, make: impl FnOnce(oneshot::Sender<EngineResult<T>>) -> Op) -> EngineResult<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| gone())?;
        let out = rx.await.map_err(|_| gone())?;
        // Deliver (in commit order) before answering: the `message` before the `ack`.
        self.outbox.flush();
        out
    }

    /// Runs `f` on a read connection on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> EngineResult<T> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match readers.idle.lock().pop() {
                Some(c) => c,
                None => store::open_reader(&readers.dir).map_err(read_error)?,
            };
            let out = f(&conn).map_err(read_error);
            let mut idle = readers.idle.lock();
            if idle.len() < IDLE_READERS {
                idle.push(conn);
            }
            out
        })
        .await
        .map_err(|e| EngineError::Internal(format!("store read task: {e}")))?
    }

    fn conv_id(&self, conversation: &str) -> Option<(i64, u64)> {
        self.state.convs.read().get(conversation).map(|c| (c.id, c.last_seq))
    }

    /// The epoch of a conversation's history.
    fn epoch_of(&self, conversation: &str) -> Arc<str> {
        self.state.convs.read().get(conversation).and_then(|c| c.epoch.clone()).unwrap_or_else(|| self.epoch.clone())
    }
}

#[async_trait]
impl MessageStore for DurableEngine {
    async fn append(&self, msg: NewMessage, route: &Route) -> EngineResult<Option<Appended>> {
        if msg.require_member && self.conv_id(&msg.conversation).is_none() {
            // A send to a group that does not exist creates nothing.
            return Ok(None);
        }
        let route = route.clone();
        self.write(|reply| Op::Append { msg, route, reply }).await
    }

    async fn history(&self, conversation: &str, page: Page) -> EngineResult<MessagePage> {
        let epoch = self.epoch_of(conversation);
        let Some((id, _)) = self.conv_id(conversation) else {
            return Ok(MessagePage { epoch, ..MessagePage::default() });
        };
        let (messages, updates, has_more) = self.read(move |c| changes::page_of(c, id, page)).await?;
        Ok(MessagePage { messages, updates, has_more, epoch })
    }

    async fn update(&self, update: NewUpdate, route: &Route) -> EngineResult<UpdateOutcome> {
        let route = route.clone();
        self.write(|reply| Op::Update { update, route, reply }).await
    }

    async fn is_message(&self, conversation: &str, seq: u64) -> EngineResult<bool> {
        let Some((id, last_seq)) = self.conv_id(conversation) else {
            return Ok(false);
        };
        if seq == 0 || seq > last_seq {
            return Ok(false);
        }
        self.read(move |c| {
            c.prepare_cached("SELECT 1 FROM messages WHERE conv = ?1 AND seq = ?2")?.exists(params![id, seq as i64])
        })
        .await
    }

    async fn last_seq(&self, conversation: &str) -> EngineResult<u64> {
        Ok(self.conv_id(conversation).map_or(0, |c| c.1))
    }

    async fn set_receipt(&self, conversation: &str, user: &str, seq: i64, read: bool) -> EngineResult<ReceiptOutcome> {
        // Answered from the hot state when nothing would change.
        {
            let convs = self.state.convs.read();
            let Some(c) = convs.get(conversation) else {
                return Ok(ReceiptOutcome::OutOfRange { last_seq: 0 });
            };
            if seq < 1 || seq as u64 > c.last_seq {
                return Ok(ReceiptOutcome::OutOfRange { last_seq: c.last_seq });
            }
            if let Some(&(d, r)) = c.receipts.get(user)
                && d >= seq as u64
                && (!read || r >= seq as u64)
            {
                return Ok(ReceiptOutcome::Unchanged);
            }
        }
        let (conversation, user) = (conversation.to_string(), user.to_string());
        self.write(|reply| Op::Receipt { conversation, user, seq, read, reply }).await
    }

    async fn receipts(&self, conversation: &str) -> EngineResult<Vec<ReceiptRow>> {
        let convs = self.state.convs.read();
        let mut rows: Vec<ReceiptRow> = convs
            .get(conversation)
            .map(|c| {
                c.receipts
                    .iter()
                    .map(|(u, (d, r))| ReceiptRow { user: u.clone(), delivered_seq: *d, read_seq: *r })
                    .collect()
            })
            .unwrap_or_default();
        rows.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(rows)
    }

    async fn counters(&self, user: &str, conversations: &[String]) -> EngineResult<Vec<Counters>> {
        // (id, last_seq, read_seq) from the hot state; unread counts from disk.
        let (known, epochs): (Vec<Option<(i64, u64, u64)>>, Vec<Arc<str>>) = {
            let convs = self.state.convs.read();
            conversations
                .iter()
                .map(|id| {
                    let c = convs.get(id);
                    (
                        c.map(|c| (c.id, c.last_seq, c.receipts.get(user).map_or(0, |r| r.1))),
                        c.and_then(|c| c.epoch.clone()).unwrap_or_else(|| self.epoch.clone()),
                    )
                })
                .unzip()
        };
        let user = user.to_string();
        let lookups = known.clone();
        let unread = self
            .read(move |c| {
                let mut s = c.prepare_cached(
                    "SELECT count(*) FROM messages WHERE conv = ?1 AND seq > ?2 AND seq <= ?3 AND sender_id <> ?4",
                )?;
                lookups
                    .iter()
                    .map(|k| match k {
                        Some((id, last, read)) if last > read => {
                            s.query_row(params![id, *read as i64, *last as i64, user], |r| r.get::<_, i64>(0))
                        }
                        _ => Ok(0),
                    })
                    .collect::<rusqlite::Result<Vec<i64>>>()
            })
            .await?;
        Ok(known
            .iter()
            .zip(unread)
            .zip(epochs)
            .map(|((k, unread), epoch)| match k {
                Some((_, last_seq, read_seq)) => {
                    Counters { last_seq: *last_seq, read_seq: *read_seq, unread: unread as u64, epoch }
                }
                None => Counters { epoch, ..Counters::default() },
            })
            .collect())
    }

    async fn erase_sender(&self, user: &str) -> EngineResult<u64> {
        let user = user.to_string();
        self.write(|reply| Op::EraseSender { user, reply }).await
    }

    async fn user_conversations(&self, user: &str) -> EngineResult<Vec<String>> {
        Ok(self.state.user_index.read().get(user).map(|s| s.iter().cloned().collect()).unwrap_or_default())
    }
}

#[async_trait]
impl Groups for DurableEngine {
    async fn group(&self, conversation: &str) -> EngineResult<Option<Arc<Group>>> {
        Ok(self.state.convs.read().get(conversation).and_then(|c| c.group.clone()))
    }

    async fn is_member(&self, conversation: &str, user: &str) -> EngineResult<bool> {
        Ok(self
            .state
            .convs
            .read()
            .get(conversation)
            .and_then(|c| c.group.as_ref())
            .is_some_and(|g| membership::contains(&g.members, user)))
    }

    async fn put_group(&self, conversation: &str, title: &str, members: Vec<String>) -> EngineResult<MembershipChange> {
        let (conversation, title) = (conversation.to_string(), title.to_string());
        self.write(|reply| Op::PutGroup { conversation, title, members, reply }).await
    }

    async fn update_group(
        &self,
        conversation: &str,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> EngineResult<Option<MembershipChange>> {
        let conversation = conversation.to_string();
        self.write(|reply| Op::UpdateGroup { conversation, add, remove, reply }).await
    }

    async fn delete_group(&self, conversation: &str) -> EngineResult<Option<MembershipChange>> {
        if self.state.convs.read().get(conversation).is_none_or(|c| c.group.is_none()) {
            return Ok(None);
        }
        let conversation = conversation.to_string();
        self.write(|reply| Op::DeleteGroup { conversation, reply }).await
    }

    async fn join_open(&self, conversation: &str, user: &str) -> EngineResult<usize> {
        if let Some(c) = self.state.convs.read().get(conversation)
            && c.open_members.contains(user)
        {
            return Ok(c.open_members.len());
        }
        let (conversation, user) = (conversation.to_string(), user.to_string());
        self.write(|reply| Op::JoinOpen { conversation, user, reply }).await
    }

    async fn open_members(&self, conversation: &str) -> EngineResult<Vec<String>> {
        Ok(self
            .state
            .convs
            .read()
            .get(conversation)
            .map(|c| c.open_members.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn member_count(&self, conversation: &str, open: bool) -> EngineResult<usize> {
        Ok(self
            .state
            .convs
            .read()
            .get(conversation)
            .map_or(0, |c| if open { c.open_members.len() } else { c.group.as_ref().map_or(0, |g| g.members.len()) }))
    }
}

super::local::single_node_broker_and_presence!(DurableEngine);

#[async_trait]
impl Engine for DurableEngine {
    fn name(&self) -> &'static str {
        "durable"
    }

    /// Ready while the writer runs. A full disk keeps the node ready: reads
    /// are served and sends answer `unavailable` until space returns.
    async fn ready(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Op::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.writer.lock().take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}
