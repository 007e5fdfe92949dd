//! Who may read the store: the directory is `0700` and every file of the
//! store `0600`, whatever the process umask.
//!
//! - A directory the engine creates gets `0700` (set explicitly after
//!   creation, so the umask does not matter).
//! - An existing directory keeps its mode (it may be a mount point the
//!   operator chose), but one open to group or others gets a warning at start
//!   that names the fix (`chmod 700 <dir>`).
//! - `chat.db` is created by the engine with `0600` before SQLite opens it,
//!   and existing store files are set to `0600` at every start. SQLite
//!   creates `-wal`, `-shm` (and a rollback `-journal`) with the mode of the
//!   database file, so they are `0600` too.

use std::{
    fs::{DirBuilder, File, OpenOptions, Permissions},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

use anyhow::Context;

/// Mode of the store's directory when the engine creates it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file of the store.
pub const FILE_MODE: u32 = 0o600;
/// The files SQLite keeps next to the database.
const SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Creates `dir` (`0700`, parents too) or, when it exists, warns if it is
/// open to group or others.
pub fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        let mode = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{:o}", mode & 0o7777),
                "chat.data_dir is open to other local accounts (group/others may list it); \
                 fix with: chmod 700 {}",
                dir.display()
            );
        }
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .with_context(|| format!("creating chat.data_dir {}", dir.display()))?;
    // The umask may have taken bits off (never added any): set it exactly.
    std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// Opens (creating it `0600`) a file of the store, and sets `0600` on it.
pub fn private_file(path: &Path) -> anyhow::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(FILE_MODE)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    restrict(&f, path)?;
    Ok(f)
}

/// Before SQLite opens `db`: the database file exists with `0600` (so the
/// files SQLite creates beside it inherit that mode), and side files left by
/// an earlier run are `0600` too.
pub fn prepare_db(db: &Path) -> anyhow::Result<()> {
    drop(private_file(db)?);
    for suffix in SIDE_FILES {
        let mut side = db.as_os_str().to_owned();
        side.push(suffix);
        if let Ok(f) = File::open(&side) {
            restrict(&f, Path::new(&side))?;
        }
    }
    Ok(())
}

fn restrict(f: &File, path: &Path) -> anyhow::Result<()> {
    let mode = f.metadata().with_context(|| format!("reading {}", path.display()))?.permissions().mode();
    if mode & 0o777 != FILE_MODE {
        f.set_permissions(Permissions::from_mode(FILE_MODE))
            .with_context(|| format!("setting the mode of {} to 600", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// The engine's own files are private whatever the umask: run with a
    /// permissive umask (0o000), the store still ends 0700/0600.
    #[test]
    fn the_store_is_private_whatever_the_umask() {
        let base = std::env::temp_dir().join(format!("crm-chat-perms-{}", std::process::id()));
        let dir = base.join("nested").join("data");
        // SAFETY: umask only changes this process's file creation mask; the
        // test restores it. Other tests creating files meanwhile get files at
        // most as open as they asked for.
        let old = unsafe { libc::umask(0) };
        let cfg = crate::config::Config::default();
        let opened = super::super::store::open(&dir, cfg.chat.fsync);
        unsafe { libc::umask(old) };
        let opened = opened.unwrap();
        // A write, so the WAL and the shared-memory index exist.
        opened.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', '1')", []).unwrap();
        assert_eq!(mode(&dir), 0o700, "data dir");
        let mut files = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            files.push(p.file_name().unwrap().to_string_lossy().to_string());
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        files.sort();
        assert_eq!(files, ["LOCK", "chat.db", "chat.db-shm", "chat.db-wal"]);
        drop(opened);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn files_left_open_by_an_earlier_run_are_closed_at_start() {
        let dir = std::env::temp_dir().join(format!("crm-chat-perms-old-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("chat.db");
        for f in ["chat.db", "chat.db-wal", "chat.db-shm"] {
            std::fs::write(dir.join(f), b"").unwrap();
            std::fs::set_permissions(dir.join(f), Permissions::from_mode(0o644)).unwrap();
        }
        prepare_db(&db).unwrap();
        for f in ["chat.db", "chat.db-wal", "chat.db-shm"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
