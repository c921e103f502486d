//! The node's storage: the data directory, the change log and sled.
//!
//! Layout of a data directory:
//!
//! ```text
//! node.key     the node's ed25519 secret key (mode 0600)
//! config.toml  the node's settings (see `config.rs`)
//! api.token    the local API's bearer token (mode 0600)
//! api.addr     the address the running daemon's API listens on
//! LOCK         held by the running daemon; a second daemon is refused
//! policy.signed  the org's signed policy given at `mesh init --policy` (the node enforces
//!              it from its first start; newer ones arrive from peers and are saved in db/)
//! changes.log  the change log: the truth for acknowledged writes
//! db/          sled: saved record documents (a cache the log can be replayed into)
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use mesh_core::storage::{Restore, SavedRecord};

use crate::changelog::{ChangeLog, OpenReport};

/// sled's page cache. Set explicitly: sled's memory otherwise grows far past its default.
const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root`.
    pub fn new(root: PathBuf) -> DataDir {
        DataDir { root }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The secret key file.
    pub fn key(&self) -> PathBuf {
        self.root.join("node.key")
    }

    /// The configuration file.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    /// The API token file.
    pub fn token(&self) -> PathBuf {
        self.root.join("api.token")
    }

    /// The signed policy given at `mesh init --policy`.
    pub fn initial_policy(&self) -> PathBuf {
        self.root.join("policy.signed")
    }

    /// Where the running daemon writes its API address.
    pub fn api_addr(&self) -> PathBuf {
        self.root.join("api.addr")
    }

    fn lock(&self) -> PathBuf {
        self.root.join("LOCK")
    }

    fn log(&self) -> PathBuf {
        self.root.join("changes.log")
    }

    fn db(&self) -> PathBuf {
        self.root.join("db")
    }

    /// Whether `mesh init` ran here.
    pub fn is_initialised(&self) -> bool {
        self.key().exists() && self.config().exists()
    }
}

/// The open store of a running daemon.
pub struct Store {
    log: ChangeLog,
    db: sled::Db,
    records: sled::Tree,
    /// Log entries dropped by compaction so far, so absolute entry counts can be mapped to
    /// positions in the log.
    compacted: u64,
    db_path: PathBuf,
    _lock: File,
}

impl Store {
    /// Opens the store, refusing a second daemon on the same directory, and returns what
    /// the core needs to start.
    pub fn open(dir: &DataDir) -> anyhow::Result<(Store, Restore, OpenReport)> {
        if crate::config::make_private_dir(dir.root())? {
            tracing::warn!(
                dir = %dir.root().display(),
                "the data directory was readable by other users; it is now 0700"
            );
        }
        let lock = take_lock(dir).with_context(|| {
            format!(
                "another mesh daemon is already running on {}; stop it first or use another --data-dir",
                dir.root().display()
            )
        })?;
        let (log, report) = ChangeLog::open(&dir.log())
            .with_context(|| format!("cannot open the change log {}", dir.log().display()))?;
        let db = sled::Config::new()
            .path(dir.db())
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .with_context(|| {
                format!(
                    "the record store {} is damaged or unreadable. The change log holds only the changes since the last checkpoint, so moving the db directory away loses every record saved before it unless peers still hold them: restore the data directory from a backup, or move db away and let the node fetch the rest from its peers",
                    dir.db().display()
                )
            })?;
        let records = db.open_tree("records")?;
        let mut saved = Vec::new();
        for item in records.iter() {
            let (key, value) = item?;
            let record = SavedRecord::decode(&value).with_context(|| {
                format!(
                    "the saved record {} is damaged",
                    String::from_utf8_lossy(&key)
                )
            })?;
            saved.push(record);
        }
        let meta = db.open_tree("meta")?;
        let policy = meta.get(POLICY_KEY)?.map(|bytes| bytes.to_vec());
        let restore = Restore {
            records: saved,
            log: log.entries().to_vec(),
            policy,
        };
        let store = Store {
            log,
            db,
            records,
            compacted: 0,
            db_path: dir.db(),
            _lock: lock,
        };
        Ok((store, restore, report))
    }

    /// Appends envelopes to the change log; returns once they are durable.
    pub fn append(&mut self, envelopes: &[Vec<u8>]) -> std::io::Result<()> {
        self.log.append(envelopes)
    }

    /// Log entries ever appended (compacted ones included).
    pub fn appended_total(&self) -> u64 {
        self.compacted + self.log.len() as u64
    }

    /// Saves records to sled and makes them durable; then, if `compact_before` is given,
    /// drops the log entries before that absolute position, which the records now cover.
    pub fn checkpoint(
        &mut self,
        records: &[SavedRecord],
        policy: Option<&[u8]>,
        compact_before: Option<u64>,
    ) -> anyhow::Result<()> {
        if let Some(policy) = policy {
            // Each record names the policy it was judged under, so a crash between these
            // two writes is noticed on start and those records are judged again.
            self.db.open_tree("meta")?.insert(POLICY_KEY, policy)?;
        }
        let mut batch = sled::Batch::default();
        for record in records {
            batch.insert(record.record.as_str().as_bytes(), record.encode());
        }
        self.records.apply_batch(batch)?;
        self.db.flush()?;
        // sled's flush uses sync_file_range, which does not reach the disk's cache; the
        // log may drop entries only once the documents are truly durable.
        sync_tree(&self.db_path)?;
        if let Some(before) = compact_before {
            let count = before.saturating_sub(self.compacted) as usize;
            self.log.compact(count)?;
            self.compacted += count as u64;
        }
        Ok(())
    }
}

/// Where the signed policy in force is kept, in the `meta` tree.
const POLICY_KEY: &[u8] = b"policy";

/// fsyncs every file under `path`, subdirectories included (sled writes values over
/// about 128 KiB to `blobs/` without an fsync of its own), then each directory.
fn sync_tree(path: &Path) -> std::io::Result<()> {
    sync_tree_with(path, &mut |file, _| file.sync_all())
}

/// [`sync_tree`] with the fsync handed in, so a test can see which paths it reaches.
fn sync_tree_with(
    path: &Path,
    sync: &mut impl FnMut(&File, &Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree_with(&entry.path(), sync)?;
        } else if kind.is_file() {
            sync(&File::open(entry.path())?, &entry.path())?;
        }
    }
    sync(&File::open(path)?, path)
}

/// Repairs the change log of a stopped node (`mesh repair`): see [`ChangeLog::repair`].
pub fn repair(dir: &DataDir) -> anyhow::Result<crate::changelog::RepairReport> {
    if !dir.log().exists() {
        bail!(
            "{} holds no change log; nothing to repair",
            dir.root().display()
        );
    }
    let _lock = take_lock(dir).with_context(|| {
        format!(
            "a mesh daemon is running on {}; stop it before repairing its change log",
            dir.root().display()
        )
    })?;
    ChangeLog::repair(&dir.log())
        .with_context(|| format!("cannot repair the change log {}", dir.log().display()))
}

/// Whether a daemon holds the data directory's LOCK (is running on it).
pub fn daemon_holds_lock(dir: &DataDir) -> bool {
    match File::open(dir.lock()) {
        // Taking the lock means nobody held it; dropping the file releases it.
        Ok(file) => file.try_lock().is_err(),
        Err(_) => false,
    }
}

/// Takes the data directory's LOCK (held while the returned file lives): only one process
/// at a time runs a node on, or repairs, a directory. Fails if another holds it.
fn take_lock(dir: &DataDir) -> anyhow::Result<File> {
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.lock())
        .with_context(|| format!("cannot open {}", dir.lock().display()))?;
    if lock.try_lock().is_err() {
        bail!("{} is locked by another process", dir.lock().display());
    }
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_checkpoint_fsyncs_the_blobs_below_the_db_directory_too() {
        let db = temp_dir("sync-tree");
        std::fs::create_dir_all(db.join("blobs")).unwrap();
        std::fs::write(db.join("conf"), b"top").unwrap();
        std::fs::write(db.join("blobs/17"), b"a value over 128 KiB").unwrap();
        let mut synced = Vec::new();
        sync_tree_with(&db, &mut |_, path| {
            synced.push(path.strip_prefix(&db).unwrap().to_path_buf());
            Ok(())
        })
        .unwrap();
        for expected in ["conf", "blobs/17", "blobs", ""] {
            assert!(
                synced.contains(&PathBuf::from(expected)),
                "{expected:?} not synced: {synced:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&db);
    }

    #[test]
    fn a_damaged_record_store_is_reported_without_advice_that_loses_records() {
        let root = temp_dir("damaged-db");
        // A db that sled cannot open: a plain file where its directory should be.
        std::fs::write(root.join("db"), b"not a sled database").unwrap();
        let error = match Store::open(&DataDir::new(root.clone())) {
            Ok(_) => panic!("a damaged store opened"),
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains("is damaged or unreadable"), "{error}");
        assert!(
            error.contains("holds only the changes since the last checkpoint"),
            "{error}"
        );
        assert!(
            error.contains("restore the data directory from a backup"),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
