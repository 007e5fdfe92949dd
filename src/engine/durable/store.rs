//! The on-disk layout: one SQLite database in WAL mode, its schema, opening
//! it (the lock, the epoch rules) and loading the hot state.

use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, bail};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{ConvState, State};
use crate::{config::Fsync, engine::Group};

/// The database file inside `chat.data_dir`.
pub const DB_FILE: &str = "chat.db";
/// Held (flock) for as long as a process uses the directory.
const LOCK_FILE: &str = "LOCK";
const SCHEMA_VERSION: &str = "2";

/// Bodies are kept with a `deleted` flag so erasing a user's messages keeps
/// `seq`, `ts` and `client_msg_id` (and so idempotency and gap-free paging).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    last_seq INTEGER NOT NULL DEFAULT 0,
    is_group INTEGER NOT NULL DEFAULT 0,
    title TEXT NOT NULL DEFAULT '',
    -- Set when the conversation's history was deleted (a deleted group): its
    -- own epoch from then on, so a group created again under the id never
    -- reuses a seq under the store's epoch. NULL: the store's epoch.
    epoch TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    conv INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    sender_id TEXT NOT NULL,
    sender_name TEXT NOT NULL,
    body TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    -- v1.2 (schema 2): the current state of a message people can change.
    reply_to INTEGER,
    edited_at INTEGER,
    reactions TEXT NOT NULL DEFAULT '',
    last_update INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conv, seq)
);
-- v1.2: every change of a message, under the conversation's seq counter
-- (seqs of `messages` and `updates` never overlap).
CREATE TABLE IF NOT EXISTS updates (
    conv INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    target INTEGER NOT NULL,
    kind TEXT NOT NULL,
    user_id TEXT NOT NULL,
    user_name TEXT NOT NULL,
    body TEXT,
    emoji TEXT,
    on_ INTEGER,
    PRIMARY KEY (conv, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency ON messages (conv, sender_id, client_msg_id);
CREATE TABLE IF NOT EXISTS receipts (
    conv INTEGER NOT NULL,
    user TEXT NOT NULL,
    delivered_seq INTEGER NOT NULL,
    read_seq INTEGER NOT NULL,
    PRIMARY KEY (conv, user)
) WITHOUT ROWID;
-- kind 0: group member, 1: known member of an open conversation.
CREATE TABLE IF NOT EXISTS members (
    conv INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    user TEXT NOT NULL,
    PRIMARY KEY (conv, kind, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_conversations (
    user TEXT NOT NULL,
    conv TEXT NOT NULL,
    PRIMARY KEY (user, conv)
) WITHOUT ROWID;
";

/// Schema 1 to 2 (v1.2): `updates` comes from [`SCHEMA`], the new columns here.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE messages ADD COLUMN reply_to INTEGER;
ALTER TABLE messages ADD COLUMN edited_at INTEGER;
ALTER TABLE messages ADD COLUMN reactions TEXT NOT NULL DEFAULT '';
ALTER TABLE messages ADD COLUMN last_update INTEGER NOT NULL DEFAULT 0;
";

pub fn db_path(dir: &Path) -> PathBuf {
    dir.join(DB_FILE)
}

pub fn wal_path(dir: &Path) -> PathBuf {
    dir.join(format!("{DB_FILE}-wal"))
}

/// Bytes the store takes on disk (database, WAL and shared-memory index).
pub fn storage_bytes(dir: &Path) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|s| std::fs::metadata(dir.join(format!("{DB_FILE}{s}"))).ok())
        .map(|m| m.len())
        .sum()
}

/// This boot of the machine (Linux); `None` elsewhere.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

/// The write connection's page cache (`cache_size`, negative: KiB). Small on
/// purpose: inserting into the idempotency index at random places (clients
/// send random UUIDs) splits b-tree pages out of page-number order, SQLite
/// renumbers them through the locking page's number, and the next COMMIT then
/// walks every page in the cache (`pcache1TruncateUnsafe`), whatever it wrote.
/// That walk grows with the cache, not with the commit: with random ids the
/// store alone (`examples/store_floor.rs`, batches of 16) costs 21.9 µs per
/// message with 16 MiB and 12.4 µs with 2 MiB, 35.8-37.5 against 18.3-24.9 µs
/// at a million messages (BENCHMARKS.md). A page it misses is a `pread` from the
/// OS's cache, far cheaper than walking thousands of pages at every commit.
const WRITER_CACHE_KIB: i64 = 2 << 10;

/// The write connection's settings for `fsync`: WAL, and `synchronous=FULL`
/// (every commit fsyncs the WAL) or `NORMAL` (commits reach the OS; the
/// syncer thread fsyncs the WAL once a second). In both the writer never
/// checkpoints (`wal_autocheckpoint=0`): the syncer thread does, on its own
/// connection ([`open_checkpointer`], `writer::syncer`).
pub fn set_sync(conn: &Connection, fsync: Fsync) -> rusqlite::Result<()> {
    conn.pragma_update(None, "synchronous", if fsync == Fsync::Always { "FULL" } else { "NORMAL" })?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
}

/// The syncer thread's connection, for checkpoints only: read-write, never
/// creating the database; waits briefly for the writer's own checkpoints.
pub fn open_checkpointer(dir: &Path) -> rusqlite::Result<Connection> {
    let conn = open_existing(dir, OpenFlags::SQLITE_OPEN_READ_WRITE, std::time::Duration::from_millis(200))?;
    // A checkpoint syncs the WAL before it copies and the database after,
    // as the writer's own did (`synchronous=NORMAL` and `FULL` alike).
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// A read-only connection for history pages and counters.
pub fn open_reader(dir: &Path) -> rusqlite::Result<Connection> {
    open_existing(dir, OpenFlags::SQLITE_OPEN_READ_ONLY, std::time::Duration::from_secs(5))
}

/// A further connection to the store the writer opened (`mode`: read-only
/// or read-write, never create), waiting up to `busy` for a lock.
fn open_existing(dir: &Path, mode: OpenFlags, busy: std::time::Duration) -> rusqlite::Result<Connection> {
    let conn =
        Connection::open_with_flags(db_path(dir), mode | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI)?;
    conn.busy_timeout(busy)?;
    Ok(conn)
}

pub struct Opened {
    pub conn: Connection,
    pub epoch: String,
    pub state: State,
    /// Why the epoch is new, when it is.
    pub new_epoch: Option<&'static str>,
    pub lock: File,
}

/// The page size of a new store (SQLite's default is 4,096). Each commit
/// writes every page it touched to the WAL whole: a group commit of a few
/// messages touches about three pages per message (the rows, the `(conv,
/// seq)` key, the idempotency index), so smaller pages write and checksum a
/// quarter of the bytes. Pairs on the durable engine: 7,100-8,500 round
/// trips/s at 4,096, 8,600-9,800 at 1,024 (BENCHMARKS.md). A store created
/// before keeps its page size (SQLite changes it only by a VACUUM).
const PAGE_SIZE: i64 = 1024;

/// Opens (or creates) the store in `dir`, takes its lock, applies the epoch
/// rules and loads the hot state. Refuses to start, naming the file, when
/// the database cannot be read.
pub fn open(dir: &Path, fsync: Fsync) -> anyhow::Result<Opened> {
    super::perms::prepare_dir(dir)?;
    let lock = lock(dir)?;
    let path = db_path(dir);
    // 0600 before SQLite opens it: the WAL and its index inherit the mode.
    super::perms::prepare_db(&path)?;
    let unreadable = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "chat.data_dir: {} cannot be read as a crm-chat store ({e}). Nothing was changed. Restore a backup, or \
             move the directory aside to start an empty history (clients then see a new epoch and reload)",
            path.display()
        )
    };
    let conn = Connection::open(&path).map_err(|e| unreadable(&e))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "page_size", PAGE_SIZE).map_err(|e| unreadable(&e))?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(|e| unreadable(&e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("chat.data_dir: {} does not support SQLite's WAL mode (journal_mode {mode})", path.display());
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Erased bodies and deleted history are overwritten with zeros in the
    // file, not only unlinked from the b-tree (erasure must remove them).
    conn.pragma_update(None, "secure_delete", "ON")?;
    // After a checkpoint the WAL shrinks back to this: disk use stays bounded.
    conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
    conn.execute_batch(SCHEMA).map_err(|e| unreadable(&e))?;

    let meta = |k: &str| -> rusqlite::Result<Option<String>> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0)).optional()
    };
    let version = meta("schema_version").map_err(|e| unreadable(&e))?;
    if version.as_deref() == Some("1") {
        // Schema 1 (v1.1) to 2: the current-state columns of messages.
        conn.execute_batch(MIGRATE_1_TO_2).map_err(|e| unreadable(&e))?;
    } else if let Some(v) = &version
        && v != SCHEMA_VERSION
    {
        bail!("chat.data_dir: {} has store schema {v}; this build reads schema {SCHEMA_VERSION}", path.display());
    }
    let stored_epoch = meta("epoch")?;
    let clean = meta("clean_shutdown")?.as_deref() == Some("1");
    let last_fsync = meta("fsync")?;
    let stored_boot = meta("boot_id")?;
    let boot = boot_id();
    let (epoch, new_epoch) = match stored_epoch {
        None => (crate::engine::new_epoch(), Some("new store")),
        // The last run acked before fsync and did not stop cleanly: if the
        // machine went down since (another boot), acked messages may be lost.
        Some(_) if !clean && last_fsync.as_deref() != Some("always") && (boot.is_none() || stored_boot != boot) => (
            crate::engine::new_epoch(),
            Some("unclean stop with fsync=everysec across a reboot: recent writes may be lost"),
        ),
        Some(e) => (e, None),
    };
    {
        let tx = conn.unchecked_transaction()?;
        let mut put = tx.prepare("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
        put.execute(params!["schema_version", SCHEMA_VERSION])?;
        put.execute(params!["epoch", epoch])?;
        put.execute(params!["clean_shutdown", "0"])?;
        put.execute(params!["fsync", fsync.as_str()])?;
        put.execute(params!["boot_id", boot.unwrap_or_default()])?;
        drop(put);
        // synchronous=FULL: the epoch and the unclean marker are on disk
        // before anything is acked.
        tx.commit().context("writing the store's epoch (is the disk full?)")?;
    }
    set_sync(&conn, fsync)?;
    let state = load(&conn).map_err(|e| unreadable(&e))?;
    Ok(Opened { conn, epoch, state, new_epoch, lock })
}

/// Marks a clean stop: everything is on disk and the epoch may be kept.
pub fn close_cleanly(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean_shutdown', '1')", [])?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

fn lock(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(LOCK_FILE);
    let f = super::perms::private_file(&path)?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!("chat.data_dir: {} is in use by another crm-chat process (one node per data directory)", dir.display());
    }
    Ok(f)
}

/// Everything but message bodies: conversations, groups, members, receipts
/// and the per-user index. Its size follows conversations and users, not
/// messages.
fn load(conn: &Connection) -> rusqlite::Result<State> {
    let mut convs: HashMap<String, ConvState> = HashMap::new();
    let mut names: HashMap<i64, String> = HashMap::new();
    let mut stmt = conn.prepare("SELECT id, name, last_seq, is_group, title, epoch FROM conversations")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let name: String = r.get(1)?;
        let group = if r.get::<_, i64>(3)? != 0 {
            Some(Arc::new(Group { title: r.get(4)?, members: Vec::new() }))
        } else {
            None
        };
        names.insert(id, name.clone());
        convs.insert(
            name,
            ConvState {
                id,
                last_seq: r.get::<_, i64>(2)? as u64,
                group,
                open_members: Arc::default(),
                receipts: HashMap::new(),
                epoch: r.get::<_, Option<String>>(5)?.map(Arc::from),
            },
        );
    }
    let mut groups: HashMap<i64, Vec<String>> = HashMap::new();
    let mut opens: HashMap<i64, BTreeSet<String>> = HashMap::new();
    let mut stmt = conn.prepare("SELECT conv, kind, user FROM members ORDER BY conv, kind, user")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (conv, kind, user): (i64, i64, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
        if kind == 0 {
            groups.entry(conv).or_default().push(user);
        } else {
            opens.entry(conv).or_default().insert(user);
        }
    }
    for (id, members) in groups {
        if let Some(c) = names.get(&id).and_then(|n| convs.get_mut(n))
            && let Some(g) = c.group.as_mut()
        {
            Arc::make_mut(g).members = members;
        }
    }
    for (id, set) in opens {
        if let Some(c) = names.get(&id).and_then(|n| convs.get_mut(n)) {
            c.open_members = Arc::new(set);
        }
    }
    let mut stmt = conn.prepare("SELECT conv, user, delivered_seq, read_seq FROM receipts")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        if let Some(c) = names.get(&id).and_then(|n| convs.get_mut(n)) {
            c.receipts.insert(r.get(1)?, (r.get::<_, i64>(2)? as u64, r.get::<_, i64>(3)? as u64));
        }
    }
    let mut index: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut stmt = conn.prepare("SELECT user, conv FROM user_conversations")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        index.entry(r.get(0)?).or_default().insert(r.get(1)?);
    }
    Ok(State { convs: convs.into(), user_index: index.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written by v1.1 (schema 1: no current-state columns, no
    /// `updates`) opens, keeps its epoch and messages, and takes changes.
    #[test]
    fn a_schema_1_store_is_migrated() {
        let dir = std::env::temp_dir().join(format!("crm-chat-schema1-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        {
            let conn = Connection::open(db_path(&dir)).unwrap();
            let v1 = SCHEMA
                .replace(
                    "    reply_to INTEGER,\n    edited_at INTEGER,\n    reactions TEXT NOT NULL DEFAULT '',\n    last_update INTEGER NOT NULL DEFAULT 0,\n",
                    "",
                );
            let v1 = &v1[..v1.find("-- v1.2: every change").unwrap()];
            assert!(!v1.contains("reply_to"), "the schema-1 shape");
            conn.execute_batch(v1).unwrap();
            conn.execute_batch(
                "INSERT INTO meta VALUES ('schema_version', '1'), ('epoch', 'e1'), ('clean_shutdown', '1'), ('fsync', 'always');
                 INSERT INTO conversations (id, name, last_seq) VALUES (1, 'general', 1);
                 INSERT INTO messages (conv, seq, ts_ms, sender_id, sender_name, body, client_msg_id)
                   VALUES (1, 1, 5, 'alice', 'Alice', 'hi', 'c1');",
            )
            .unwrap();
        }
        let opened = open(&dir, Fsync::Always).unwrap();
        assert_eq!(opened.epoch, "e1", "the epoch is kept");
        let (body, reactions, last): (String, String, i64) = opened
            .conn
            .query_row("SELECT body, reactions, last_update FROM messages WHERE seq = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((body.as_str(), reactions.as_str(), last), ("hi", "", 0));
        let n: i64 = opened.conn.query_row("SELECT count(*) FROM updates", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0);
        let v: String =
            opened.conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let page: i64 = opened.conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        assert_eq!(page, 4096, "a store made before keeps its page size");
        drop(opened);
        // And again: schema 2 opens as it is.
        drop(open(&dir, Fsync::Always).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A new store takes `PAGE_SIZE`, and keeps it across a restart with
    /// its messages; a body longer than a page (overflow pages) reads back.
    #[test]
    fn a_new_store_has_small_pages() {
        let dir = std::env::temp_dir().join(format!("crm-chat-pages-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let body = "é".repeat(4000);
        {
            let opened = open(&dir, Fsync::Always).unwrap();
            opened.conn.execute("INSERT INTO conversations (id, name, last_seq) VALUES (1, 'general', 1)", []).unwrap();
            opened
                .conn
                .execute(
                    "INSERT INTO messages (conv, seq, ts_ms, sender_id, sender_name, body, client_msg_id)
                     VALUES (1, 1, 5, 'alice', 'Alice', ?1, 'c1')",
                    [&body],
                )
                .unwrap();
        }
        let opened = open(&dir, Fsync::Always).unwrap();
        let page: i64 = opened.conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        assert_eq!(page, PAGE_SIZE);
        let back: String = opened.conn.query_row("SELECT body FROM messages WHERE seq = 1", [], |r| r.get(0)).unwrap();
        assert_eq!(back, body);
        drop(opened);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
