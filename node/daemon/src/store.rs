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
//! db/          sled: the saved records (what the log is compacted into)
//! ```
//!
//! In sled, the `saved` tree holds each record twice over, written together in one batch
//! (so atomically) by a checkpoint: `i` + key is its index entry ([`SavedIndex`]: heads,
//! signatures, quarantine), which a start reads, and `d` + key its Automerge document,
//! which the node reads through [`SledDocuments`] when it first uses the record. The index
//! entries sort together, so a start reads them without touching a document. Stores made
//! before this layout kept both in one value in the `records` tree; opening one moves them
//! over.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use mesh_core::storage::{DocumentStore, Restore, SavedIndex, SavedRecord, StorageError};

use crate::changelog::{ChangeLog, OpenReport};

/// sled's page cache. Set explicitly: sled's memory otherwise grows far past its default.
/// Measured (heaptrack, a laptop cloning 20,000 records): sled's in-memory tree was the
/// second largest consumer after the parsed changes in flight, 66 MiB at a 64 MiB setting.
/// Documents out of the node's own cache are read through it, and the OS page cache
/// serves what it has dropped.
const SLED_CACHE_BYTES: u64 = 24 * 1024 * 1024;

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
        let records = db.open_tree(SAVED_TREE)?;
        move_old_layout(&db, &records, &dir.db())?;
        let mut index = Vec::new();
        for item in records.scan_prefix(INDEX_PREFIX) {
            let (key, value) = item?;
            let entry = SavedIndex::decode(&value).with_context(|| {
                format!(
                    "the saved record {} is damaged",
                    String::from_utf8_lossy(&key[INDEX_PREFIX.len()..])
                )
            })?;
            index.push(entry);
        }
        let meta = db.open_tree("meta")?;
        let policy = meta.get(POLICY_KEY)?.map(|bytes| bytes.to_vec());
        let restore = Restore {
            records: Vec::new(),
            index,
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

    /// The node's read port into the saved documents.
    pub fn documents(&self) -> Box<dyn DocumentStore> {
        Box::new(SledDocuments(self.records.clone()))
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
            let key = record.record.as_str().as_bytes();
            batch.insert([INDEX_PREFIX, key].concat(), record.encode_index());
            batch.insert([DOCUMENT_PREFIX, key].concat(), record.document.as_slice());
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

/// The tree of saved records (see the module doc), and its two kinds of keys.
const SAVED_TREE: &str = "saved";
const INDEX_PREFIX: &[u8] = b"i";
const DOCUMENT_PREFIX: &[u8] = b"d";

/// The tree where stores made before the index was kept apart held their records.
const OLD_RECORDS_TREE: &str = "records";

/// Reads saved documents for the node, from what the checkpoints wrote.
struct SledDocuments(sled::Tree);

impl DocumentStore for SledDocuments {
    fn document(&self, record: &crdt_schema::RecordId) -> Result<Option<Vec<u8>>, StorageError> {
        self.0
            .get([DOCUMENT_PREFIX, record.as_str().as_bytes()].concat())
            .map(|found| found.map(|bytes| bytes.to_vec()))
            .map_err(|error| StorageError(error.to_string()))
    }
}

/// Moves records saved in the old layout (one value per record in `records`) into the
/// `saved` tree, durably, then drops the old tree. Run again after a crash midway, it
/// moves the same values again.
fn move_old_layout(db: &sled::Db, saved: &sled::Tree, db_path: &Path) -> anyhow::Result<()> {
    if !db
        .tree_names()
        .iter()
        .any(|name| name == OLD_RECORDS_TREE.as_bytes())
    {
        return Ok(());
    }
    let old = db.open_tree(OLD_RECORDS_TREE)?;
    let mut batch = sled::Batch::default();
    let mut moved = 0usize;
    for item in old.iter() {
        let (key, value) = item?;
        let record = SavedRecord::decode(&value).with_context(|| {
            format!(
                "the saved record {} is damaged",
                String::from_utf8_lossy(&key)
            )
        })?;
        batch.insert([INDEX_PREFIX, &key].concat(), record.encode_index());
        batch.insert([DOCUMENT_PREFIX, &key].concat(), record.document);
        moved += 1;
    }
    saved.apply_batch(batch)?;
    db.flush()?;
    sync_tree(db_path)?;
    db.drop_tree(OLD_RECORDS_TREE)?;
    db.flush()?;
    if moved > 0 {
        tracing::info!(
            records = moved,
            "moved the saved records to the layout that keeps the index apart"
        );
    }
    Ok(())
}

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

    fn saved(key: &str, document: &[u8]) -> SavedRecord {
        SavedRecord {
            record: key.parse().unwrap(),
            heads: vec![[3; 32]],
            document: document.to_vec(),
            signatures: Vec::new(),
            quarantine: Vec::new(),
            judged_under: None,
            deleted: Some(false),
        }
    }

    #[test]
    fn a_checkpoint_keeps_index_and_document_apart_and_a_start_reads_only_the_index() {
        let root = temp_dir("index-apart");
        let dir = DataDir::new(root.clone());
        let (mut store, restore, _) = Store::open(&dir).unwrap();
        assert!(restore.index.is_empty());
        let records = [saved("stock/a", b"doc a"), saved("stock/b", b"doc b")];
        store.checkpoint(&records, None, None).unwrap();
        let documents = store.documents();
        assert_eq!(
            documents.document(&records[1].record).unwrap(),
            Some(b"doc b".to_vec())
        );
        assert_eq!(
            documents.document(&"stock/c".parse().unwrap()).unwrap(),
            None
        );
        drop((store, documents));

        let (store, restore, _) = Store::open(&dir).unwrap();
        let (index_a, _) = records[0].clone().split();
        let (index_b, _) = records[1].clone().split();
        assert_eq!(restore.index, vec![index_a, index_b]);
        assert!(restore.records.is_empty(), "no document is read at start");
        assert_eq!(
            store.documents().document(&records[0].record).unwrap(),
            Some(b"doc a".to_vec())
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn records_saved_in_the_old_layout_move_over_on_open() {
        let root = temp_dir("old-layout");
        let dir = DataDir::new(root.clone());
        let old = saved("stock/old", b"old doc");
        {
            let db = sled::open(dir.db()).unwrap();
            db.open_tree(OLD_RECORDS_TREE)
                .unwrap()
                .insert(old.record.as_str(), old.encode())
                .unwrap();
            db.flush().unwrap();
        }
        let (store, restore, _) = Store::open(&dir).unwrap();
        assert_eq!(restore.index, vec![old.clone().split().0]);
        assert_eq!(
            store.documents().document(&old.record).unwrap(),
            Some(b"old doc".to_vec())
        );
        assert!(
            !store
                .db
                .tree_names()
                .iter()
                .any(|name| name == OLD_RECORDS_TREE.as_bytes()),
            "the old tree is dropped once moved"
        );
        drop(store);
        let (_, restore, _) = Store::open(&dir).unwrap();
        assert_eq!(
            restore.index.len(),
            1,
            "a second open finds the moved record"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
