//! The floor of the durable engine's store (issue 20, goal 5): what SQLite
//! itself costs per message on this machine, with nothing of crm-chat around
//! it. One thread writes group commits the way the store's writer does
//! (`src/engine/durable`): 1 KiB pages, WAL, `synchronous=NORMAL`, no
//! checkpoint in the writer (a second thread checkpoints once a second, as the
//! syncer does), a 16 MiB cache, one `UPDATE` of `last_seq` per conversation
//! per commit. Each `--layout` stores the same messages:
//!
//! - `store`: the store's layout (schema 2): a rowid table keyed by `(conv,
//!   seq)` and the idempotency index, with the engine's `INSERT ... ON CONFLICT
//!   DO NOTHING`;
//! - `keyed`: the store's table without the idempotency index;
//! - `unkeyed`: the store's idempotency index on a table without the `(conv,
//!   seq)` key;
//! - `hashed`: the idempotency index on 64 bits of SHA-256 of (sender,
//!   `client_msg_id`) instead of the strings (a lookup, then a plain insert);
//! - `clustered`: the store's columns in a `WITHOUT ROWID` table keyed by
//!   `(conv, seq)`, so one b-tree less per message;
//! - `bare`: a rowid table with no key and no index: SQLite's least for a row;
//! - `log`: no SQLite: one `write` of the batch's encoded messages to an
//!   append-only file, the least any store that survives a SIGKILL can do.
//!
//! It prints CPU µs per message of the writing thread and messages/s:
//!
//! ```sh
//! cargo build --release --example store_floor
//! target/release/examples/store_floor --layout store --convs 50 --batch 16 --body 60
//! ```
//!
//! `--cmid uuid` (the default) sends random v4-shaped ids as `chat.js` does;
//! `--cmid counter` ids like the load tool's `pairs --cmid counter`, nearly in
//! order, which the idempotency index takes far more cheaply.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use rusqlite::{Connection, TransactionBehavior, params};

#[derive(Parser)]
struct Opts {
    #[arg(long, value_enum, default_value_t = Layout::Store)]
    layout: Layout,
    /// Emptied before and removed after the run.
    #[arg(long, default_value_os_t = std::env::temp_dir().join("crm-chat-store-floor"))]
    dir: PathBuf,
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Conversations, written in turn.
    #[arg(long, default_value_t = 50)]
    convs: usize,
    /// Messages per commit.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Body length in bytes.
    #[arg(long, default_value_t = 60)]
    body: usize,
    /// The writer's page cache (the store's `cache_size`), KiB.
    #[arg(long, default_value_t = 2048)]
    cache_kib: i64,
    /// `mmap_size`, MiB (the store uses none).
    #[arg(long, default_value_t = 0)]
    mmap_mib: i64,
    #[arg(long, value_enum, default_value_t = Cmid::Uuid)]
    cmid: Cmid,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    Store,
    Keyed,
    Unkeyed,
    Hashed,
    Clustered,
    Bare,
    Log,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Cmid {
    Uuid,
    Counter,
}

const MESSAGES: &str = "CREATE TABLE messages (
    conv INTEGER NOT NULL, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, sender_id TEXT NOT NULL,
    sender_name TEXT NOT NULL, body TEXT NOT NULL, client_msg_id TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0, reply_to INTEGER, edited_at INTEGER,
    reactions TEXT NOT NULL DEFAULT '', last_update INTEGER NOT NULL DEFAULT 0, idem INTEGER";
const IDEMPOTENCY: &str = "CREATE UNIQUE INDEX messages_idempotency ON messages (conv, sender_id, client_msg_id)";
const INSERT: &str = "INSERT INTO messages (conv, seq, ts_ms, sender_id, sender_name, body, client_msg_id, \
     reply_to, idem) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";
/// The engine's insert (`durable/ops.rs`): the idempotency check in the insert.
const INSERT_IDEMPOTENT: &str = "INSERT INTO messages (conv, seq, ts_ms, sender_id, sender_name, body, \
     client_msg_id, reply_to, idem) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
     ON CONFLICT (conv, sender_id, client_msg_id) DO NOTHING";
const FIND_HASHED: &str =
    "SELECT 1 FROM messages WHERE conv = ?1 AND idem = ?2 AND sender_id = ?3 AND client_msg_id = ?4";

impl Layout {
    fn schema(self) -> String {
        let conversations = "CREATE TABLE conversations (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, \
                             last_seq INTEGER NOT NULL DEFAULT 0);";
        let keyed = format!("{MESSAGES}, PRIMARY KEY (conv, seq))");
        let tables = match self {
            Layout::Store => format!("{keyed}; {IDEMPOTENCY}"),
            Layout::Keyed => keyed,
            Layout::Unkeyed => format!("{MESSAGES}); {IDEMPOTENCY}"),
            Layout::Hashed => format!("{keyed}; CREATE INDEX messages_idem ON messages (conv, idem)"),
            Layout::Clustered => format!("{keyed} WITHOUT ROWID; {IDEMPOTENCY}"),
            Layout::Bare => format!("{MESSAGES})"),
            Layout::Log => unreachable!("no SQLite"),
        };
        format!("{conversations} {tables};")
    }

    fn insert(self) -> &'static str {
        match self {
            Layout::Store | Layout::Unkeyed | Layout::Clustered => INSERT_IDEMPOTENT,
            _ => INSERT,
        }
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Msg {
    conv: usize,
    seq: u64,
    sender: String,
    cmid: String,
    body: String,
}

/// The `i`th message: conversations in turn, each a DM of two senders.
fn message(o: &Opts, i: usize, seqs: &mut [u64]) -> Msg {
    let conv = i % o.convs;
    seqs[conv] += 1;
    let turn = i / o.convs;
    let sender = format!("user-{:06}", 2 * conv + turn % 2);
    let cmid = match o.cmid {
        Cmid::Counter => format!("load-p{conv}{}{}", if turn.is_multiple_of(2) { 'a' } else { 'b' }, turn / 2),
        Cmid::Uuid => format!("{:08x}-{:04x}-4000-8000-{:012x}", i.wrapping_mul(2_654_435_761) % (1 << 32), conv, i),
    };
    Msg { conv, seq: seqs[conv], sender, cmid, body: "x".repeat(o.body) }
}

/// 64 bits of SHA-256 over (sender, client_msg_id).
fn idem_hash(sender: &str, cmid: &str) -> i64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(sender.as_bytes());
    h.update([0]);
    h.update(cmid.as_bytes());
    i64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// Checkpoints once a second on its own connection, as the syncer does.
fn checkpointer(db: PathBuf, alive: Arc<AtomicBool>) {
    let Ok(c) = Connection::open(&db) else { return };
    while alive.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_secs(1));
        let big = std::fs::metadata(db.with_extension("db-wal")).is_ok_and(|m| m.len() > 16 << 20);
        for mode in if big { &["PASSIVE", "RESTART"][..] } else { &["PASSIVE"][..] } {
            let _ = c.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()));
        }
    }
}

fn sqlite(o: &Opts, db: &Path) -> anyhow::Result<Duration> {
    let mut conn = Connection::open(db)?;
    conn.pragma_update(None, "page_size", 1024)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "cache_size", -o.cache_kib)?;
    conn.pragma_update(None, "mmap_size", o.mmap_mib << 20)?;
    conn.execute_batch(&o.layout.schema())?;
    for c in 0..o.convs {
        conn.execute("INSERT INTO conversations (id, name) VALUES (?1, ?2)", params![c as i64, format!("dm:{c}")])?;
    }
    let alive = Arc::new(AtomicBool::new(true));
    let ckpt = {
        let (db, alive) = (db.to_path_buf(), alive.clone());
        std::thread::spawn(move || checkpointer(db, alive))
    };
    let mut seqs = vec![0u64; o.convs];
    let mut dirty = vec![false; o.convs];
    let started = thread_cpu();
    let mut i = 0;
    while i < o.messages {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(o.layout.insert())?;
            for _ in 0..o.batch.min(o.messages - i) {
                let m = message(o, i, &mut seqs);
                let idem = (o.layout == Layout::Hashed).then(|| idem_hash(&m.sender, &m.cmid));
                if let Some(h) = idem {
                    let seen = tx.prepare_cached(FIND_HASHED)?.exists(params![m.conv as i64, h, m.sender, m.cmid])?;
                    anyhow::ensure!(!seen, "message {i} was taken for a repeat");
                }
                let ts_ms = 1_765_000_000_000 + i as i64;
                let n = insert.execute(params![
                    m.conv as i64,
                    m.seq as i64,
                    ts_ms,
                    m.sender,
                    m.sender,
                    m.body,
                    m.cmid,
                    None::<i64>,
                    idem
                ])?;
                anyhow::ensure!(n == 1, "message {i} was taken for a repeat");
                dirty[m.conv] = true;
                i += 1;
            }
            let mut upd = tx.prepare_cached("UPDATE conversations SET last_seq = ?2 WHERE id = ?1")?;
            for (c, d) in dirty.iter_mut().enumerate().filter(|(_, d)| **d) {
                upd.execute(params![c as i64, seqs[c] as i64])?;
                *d = false;
            }
        }
        tx.commit()?;
    }
    let cpu = thread_cpu() - started;
    alive.store(false, Ordering::Release);
    let _ = ckpt.join();
    Ok(cpu)
}

/// One `write` per batch of length-prefixed messages to an append-only file.
fn log(o: &Opts, path: &Path) -> anyhow::Result<Duration> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut seqs = vec![0u64; o.convs];
    let mut buf = Vec::with_capacity(o.batch * (o.body + 128));
    let started = thread_cpu();
    let mut i = 0;
    while i < o.messages {
        buf.clear();
        for _ in 0..o.batch.min(o.messages - i) {
            let m = message(o, i, &mut seqs);
            for field in [m.sender.as_bytes(), m.cmid.as_bytes(), m.body.as_bytes()] {
                buf.extend_from_slice(&(field.len() as u32).to_le_bytes());
                buf.extend_from_slice(field);
            }
            buf.extend_from_slice(&(m.conv as u64).to_le_bytes());
            buf.extend_from_slice(&m.seq.to_le_bytes());
            i += 1;
        }
        file.write_all(&buf)?;
    }
    Ok(thread_cpu() - started)
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    anyhow::ensure!(o.convs > 0 && o.batch > 0, "--convs and --batch must be positive");
    let _ = std::fs::remove_dir_all(&o.dir);
    std::fs::create_dir_all(&o.dir)?;
    let wall = Instant::now();
    let cpu = match o.layout {
        Layout::Log => log(&o, &o.dir.join("log"))?,
        _ => sqlite(&o, &o.dir.join("chat.db"))?,
    };
    let wall = wall.elapsed();
    let bytes: u64 = std::fs::read_dir(&o.dir)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    println!(
        "layout={:?} cmid={:?} messages={} convs={} batch={} body={} cache={} KiB: {:.2} µs CPU per message, \
         {:.0} messages/s, {:.1} MiB on disk",
        o.layout,
        o.cmid,
        o.messages,
        o.convs,
        o.batch,
        o.body,
        o.cache_kib,
        cpu.as_secs_f64() * 1e6 / o.messages as f64,
        o.messages as f64 / wall.as_secs_f64(),
        bytes as f64 / (1 << 20) as f64
    );
    let _ = std::fs::remove_dir_all(&o.dir);
    Ok(())
}
