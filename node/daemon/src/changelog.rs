//! The change log: the source of truth for acknowledged writes.
//!
//! An append-only file of entries `[length u32 LE][crc32 u32 LE][bytes]` after an 8-byte
//! magic. An append writes every entry of one request and then calls `fdatasync` once, so
//! one sync covers every write waiting at that moment (the core batches them). sled makes
//! its data durable with `sync_file_range`, which flushes neither the disk cache nor
//! metadata, so nothing is acknowledged on sled's word alone.
//!
//! On open the log is read to its end. A torn last entry (short, or failing its checksum,
//! with nothing valid after it) is reported and cut off, since it was never acknowledged.
//! A damaged entry with valid entries after it is not a torn write but a damaged disk:
//! open refuses with [`LogDamaged`], naming the file, the offset and how many entries
//! follow, and [`ChangeLog::repair`] (`mesh repair`) sets the damaged bytes aside in a file
//! of their own and keeps every entry around them. Compaction rewrites the log without the
//! entries a durable checkpoint covers, through a temporary file and a rename; if the log
//! cannot be reopened after the rename, appends fail rather than go to the old, unlinked
//! file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"MESHLOG1";
/// Largest entry accepted on read: a damaged length field must not make us allocate
/// gigabytes.
const ENTRY_BYTES_MAX: usize = 16 * 1024 * 1024;

/// The open change log.
pub struct ChangeLog {
    path: PathBuf,
    file: File,
    /// Entries in the file, in order (kept to rewrite the log on compaction and to hand to
    /// the core on start).
    entries: Vec<Vec<u8>>,
    /// Set when the file could not be reopened after a compaction's rename: `file` is then
    /// the old, unlinked inode, and nothing may be appended to it.
    broken: Option<String>,
    /// Tests make the reopen after a compaction fail.
    #[cfg(test)]
    fail_reopen: bool,
}

/// What opening the log found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Bytes of a torn last entry that were cut off.
    pub truncated_bytes: u64,
}

/// A damaged entry in the middle of the log: the log was left as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the change log {path} is damaged at byte {offset} ({damaged_bytes} bytes), with {entries_after} acknowledged entries after it; \
     the node will not start and drop them. Run `mesh repair` to set the damaged bytes aside \
     (kept in a file beside the log) and keep every entry around them; peers can bring the damaged change again"
)]
pub struct LogDamaged {
    /// The log file.
    pub path: String,
    /// Where the first damaged region starts, in bytes from the start of the file.
    pub offset: u64,
    /// Its length.
    pub damaged_bytes: u64,
    /// Valid entries after it.
    pub entries_after: usize,
}

/// What [`ChangeLog::repair`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Entries kept.
    pub entries: usize,
    /// Damaged regions set aside, as (offset, length).
    pub set_aside: Vec<(u64, u64)>,
    /// The file holding the damaged bytes, if any.
    pub damaged_file: Option<PathBuf>,
    /// Bytes of a torn last entry that were cut off.
    pub truncated_bytes: u64,
}

impl ChangeLog {
    /// Opens or creates the log at `path`, cutting off a torn last entry. A damaged entry
    /// that is not the last is an error ([`LogDamaged`] inside the `io::Error`), and the
    /// file is left untouched.
    pub fn open(path: &Path) -> io::Result<(ChangeLog, OpenReport)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut report = OpenReport::default();
        if bytes.is_empty() {
            file.write_all(MAGIC)?;
            file.sync_all()?;
            sync_parent(path)?;
            return Ok((ChangeLog::with(path, file, Vec::new()), report));
        }
        check_magic(path, &bytes)?;
        let parsed = parse_entries(&bytes[MAGIC.len()..]);
        if let Some(&(offset, length)) = parsed.damaged.first() {
            let entries_after = parsed.entries.iter().filter(|(at, _)| *at > offset).count();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                LogDamaged {
                    path: path.display().to_string(),
                    offset: (MAGIC.len() + offset) as u64,
                    damaged_bytes: length as u64,
                    entries_after,
                },
            ));
        }
        let good_len = MAGIC.len() + parsed.good_len;
        if good_len < bytes.len() {
            report.truncated_bytes = (bytes.len() - good_len) as u64;
            file.set_len(good_len as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        let entries = parsed.entries.into_iter().map(|(_, entry)| entry).collect();
        Ok((ChangeLog::with(path, file, entries), report))
    }

    fn with(path: &Path, file: File, entries: Vec<Vec<u8>>) -> ChangeLog {
        ChangeLog {
            path: path.to_owned(),
            file,
            entries,
            broken: None,
            #[cfg(test)]
            fail_reopen: false,
        }
    }

    /// Repairs a log that [`ChangeLog::open`] refused: copies each damaged region to
    /// `changes.log.damaged-<offset>` beside it, rewrites the log with every valid entry
    /// (through a temporary file and a rename), and cuts a torn tail. The daemon must not
    /// be running (the caller holds the data directory's lock).
    pub fn repair(path: &Path) -> io::Result<RepairReport> {
        let bytes = std::fs::read(path)?;
        check_magic(path, &bytes)?;
        let parsed = parse_entries(&bytes[MAGIC.len()..]);
        let mut report = RepairReport {
            entries: parsed.entries.len(),
            truncated_bytes: (bytes.len() - MAGIC.len() - parsed.good_len) as u64,
            ..RepairReport::default()
        };
        if parsed.damaged.is_empty() {
            return Ok(report);
        }
        let first = MAGIC.len() + parsed.damaged[0].0;
        let aside = path.with_extension(format!("log.damaged-{first}"));
        let mut damaged = File::create(&aside)?;
        for &(offset, length) in &parsed.damaged {
            let start = MAGIC.len() + offset;
            damaged.write_all(&bytes[start..start + length])?;
            report.set_aside.push((start as u64, length as u64));
        }
        damaged.sync_all()?;
        report.damaged_file = Some(aside);
        let entries: Vec<Vec<u8>> = parsed.entries.into_iter().map(|(_, entry)| entry).collect();
        rewrite(path, &entries)?;
        Ok(report)
    }
    /// The entries in the log, oldest first.
    pub fn entries(&self) -> &[Vec<u8>] {
        &self.entries
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Appends entries and makes them durable with one `fdatasync`.
    pub fn append(&mut self, entries: &[Vec<u8>]) -> io::Result<()> {
        if let Some(reason) = &self.broken {
            return Err(io::Error::other(reason.clone()));
        }
        if let Some(entry) = entries.iter().find(|entry| entry.len() > ENTRY_BYTES_MAX) {
            // A longer entry would be read back as damage.
            return Err(io::Error::other(format!(
                "a log entry of {} bytes is over the limit of {ENTRY_BYTES_MAX}",
                entry.len()
            )));
        }
        let mut buffer = Vec::with_capacity(entries.iter().map(|entry| entry.len() + 8).sum());
        for entry in entries {
            let length =
                u32::try_from(entry.len()).map_err(|_| io::Error::other("entry over 4 GiB"))?;
            buffer.extend_from_slice(&length.to_le_bytes());
            buffer.extend_from_slice(&crc32fast::hash(entry).to_le_bytes());
            buffer.extend_from_slice(entry);
        }
        let before = self.file.stream_position()?;
        if let Err(error) = self
            .file
            .write_all(&buffer)
            .and_then(|()| self.file.sync_data())
        {
            // Leave no partial entry behind a failed append (disk full): the write was
            // never acknowledged, and the next append must start on a boundary.
            let _ = self.file.set_len(before);
            let _ = self.file.seek(SeekFrom::Start(before));
            return Err(error);
        }
        self.entries.extend(entries.iter().cloned());
        Ok(())
    }

    /// Drops the first `count` entries, which a durable checkpoint covers.
    pub fn compact(&mut self, count: usize) -> io::Result<()> {
        let count = count.min(self.entries.len());
        if count == 0 {
            return Ok(());
        }
        if let Some(reason) = &self.broken {
            return Err(io::Error::other(reason.clone()));
        }
        let kept = self.entries[count..].to_vec();
        rewrite(&self.path, &kept)?;
        // The rename is done: the old file is unlinked. Whatever fails from here, `file`
        // must not stay the old inode, or acknowledged appends would go to a deleted file.
        let reopened = self.reopen();
        match reopened {
            Ok(file) => {
                self.file = file;
                self.entries = kept;
                Ok(())
            }
            Err(error) => {
                let reason = format!(
                    "the change log {} could not be reopened after compaction ({error}); no write is taken until the daemon restarts",
                    self.path.display()
                );
                self.broken = Some(reason.clone());
                Err(io::Error::other(reason))
            }
        }
    }

    fn reopen(&self) -> io::Result<File> {
        #[cfg(test)]
        if self.fail_reopen {
            return Err(io::Error::other("reopen failed (test)"));
        }
        let mut file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        file.seek(SeekFrom::End(0))?;
        Ok(file)
    }
}

/// Writes `entries` as a whole log through a temporary file, fsynced, renamed over `path`,
/// and the directory fsynced. On a failure before the rename the log is as it was and the
/// half-written copy is removed.
fn rewrite(path: &Path, entries: &[Vec<u8>]) -> io::Result<()> {
    let temporary = path.with_extension("log.compacting");
    let written = (|| {
        let mut file = File::create(&temporary)?;
        file.write_all(MAGIC)?;
        for entry in entries {
            file.write_all(&(entry.len() as u32).to_le_bytes())?;
            file.write_all(&crc32fast::hash(entry).to_le_bytes())?;
            file.write_all(entry)?;
        }
        file.sync_all()
    })();
    if let Err(error) = written {
        // A full disk: the log stays as it was, and the half-written copy goes.
        let _ = std::fs::remove_file(&temporary);
        return Err(error);
    }
    std::fs::rename(&temporary, path)?;
    sync_parent(path)
}

fn check_magic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a mesh change log (bad magic); move it away or restore it from a backup",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// What [`parse_entries`] found.
struct Parsed {
    /// Valid entries with their offsets (from the end of the magic).
    entries: Vec<(usize, Vec<u8>)>,
    /// Damaged regions with valid entries after them, as (offset, length).
    damaged: Vec<(usize, usize)>,
    /// Length of the prefix that ends with the last valid entry; what follows is a torn
    /// tail.
    good_len: usize,
}

/// The entry at the start of `bytes`, if it is a whole, valid one (never empty: the core
/// never logs an empty entry, and zeros would otherwise read as empty entries).
fn entry_at(bytes: &[u8]) -> Option<&[u8]> {
    let length = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let checksum = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    if length == 0 || length > ENTRY_BYTES_MAX {
        return None;
    }
    let entry = bytes.get(8..8 + length)?;
    (crc32fast::hash(entry) == checksum).then_some(entry)
}

/// Parses every valid entry. Past a damaged one it looks for the next valid entry: where
/// the damaged entry's own length says it ends, else at every later byte. Damage with a
/// valid entry after it is listed; damage at the end is a torn tail.
fn parse_entries(bytes: &[u8]) -> Parsed {
    let mut parsed = Parsed {
        entries: Vec::new(),
        damaged: Vec::new(),
        good_len: 0,
    };
    let mut at = 0;
    while at < bytes.len() {
        if let Some(entry) = entry_at(&bytes[at..]) {
            parsed.entries.push((at, entry.to_vec()));
            at += 8 + entry.len();
            parsed.good_len = at;
            continue;
        }
        let claimed_end = bytes
            .get(at..at + 4)
            .map(|length| u32::from_le_bytes(length.try_into().expect("4 bytes")) as usize)
            .and_then(|length| at.checked_add(8)?.checked_add(length))
            .filter(|end| *end < bytes.len() && entry_at(&bytes[*end..]).is_some());
        let next = claimed_end
            .or_else(|| (at + 1..bytes.len()).find(|next| entry_at(&bytes[*next..]).is_some()));
        match next {
            Some(next) => {
                parsed.damaged.push((at, next - at));
                at = next;
            }
            None => break,
        }
    }
    parsed
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => File::open(parent)?.sync_all(),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("mesh-changelog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn entries_survive_reopen_and_a_torn_tail_is_cut_off() {
        let dir = temp_dir("torn");
        let path = dir.join("changes.log");
        let (mut log, _) = ChangeLog::open(&path).unwrap();
        log.append(&[b"one".to_vec(), b"two".to_vec()]).unwrap();
        log.append(&[b"three".to_vec()]).unwrap();
        drop(log);
        // A crash in the middle of the next append leaves half an entry.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(file);
        let (log, report) = ChangeLog::open(&path).unwrap();
        assert_eq!(
            log.entries(),
            &[b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        assert_eq!(report.truncated_bytes, 6);
        let (log, report) = ChangeLog::open(&path).unwrap();
        assert_eq!(log.len(), 3);
        assert_eq!(report.truncated_bytes, 0, "the cut is durable");
    }

    #[test]
    fn a_corrupted_entry_ends_the_log_there() {
        let dir = temp_dir("crc");
        let path = dir.join("changes.log");
        let (mut log, _) = ChangeLog::open(&path).unwrap();
        log.append(&[b"good".to_vec(), b"flipped".to_vec()])
            .unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let (log, report) = ChangeLog::open(&path).unwrap();
        assert_eq!(log.entries(), &[b"good".to_vec()]);
        assert!(report.truncated_bytes > 0);
    }

    #[test]
    fn compaction_keeps_the_uncovered_tail_and_appends_continue() {
        let dir = temp_dir("compact");
        let path = dir.join("changes.log");
        let (mut log, _) = ChangeLog::open(&path).unwrap();
        log.append(&[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()])
            .unwrap();
        log.compact(2).unwrap();
        log.append(&[b"d".to_vec()]).unwrap();
        drop(log);
        let (log, _) = ChangeLog::open(&path).unwrap();
        assert_eq!(log.entries(), &[b"c".to_vec(), b"d".to_vec()]);
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused_not_reset() {
        let dir = temp_dir("magic");
        let path = dir.join("changes.log");
        std::fs::write(&path, b"something else entirely").unwrap();
        let error = ChangeLog::open(&path).err().expect("refused");
        assert!(
            error.to_string().contains("not a mesh change log"),
            "{error}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"something else entirely");
    }

    fn damaged(error: io::Error) -> LogDamaged {
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<LogDamaged>())
            .cloned()
            .unwrap_or_else(|| panic!("not a LogDamaged: {error}"))
    }

    #[test]
    fn a_damaged_entry_before_others_refuses_to_open_and_repair_keeps_the_rest() {
        let dir = temp_dir("middle");
        let path = dir.join("changes.log");
        let (mut log, _) = ChangeLog::open(&path).unwrap();
        log.append(&[b"first".to_vec(), b"second".to_vec(), b"third".to_vec()])
            .unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        // Inside the payload of "second": MAGIC, [8 + 5], then its header.
        let offset = MAGIC.len() + 8 + 5;
        bytes[offset + 8 + 2] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();

        let error = damaged(ChangeLog::open(&path).err().expect("refused"));
        assert_eq!(error.offset, offset as u64);
        assert_eq!(error.entries_after, 1);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the file is untouched"
        );
        let message = error.to_string();
        assert!(
            message.contains("mesh repair") && message.contains("changes.log"),
            "{message}"
        );

        let report = ChangeLog::repair(&path).unwrap();
        assert_eq!(report.entries, 2);
        assert_eq!(report.set_aside, vec![(offset as u64, 8 + 6)]);
        let aside = std::fs::read(report.damaged_file.unwrap()).unwrap();
        assert_eq!(aside, bytes[offset..offset + 14]);
        let (log, _) = ChangeLog::open(&path).unwrap();
        assert_eq!(log.entries(), &[b"first".to_vec(), b"third".to_vec()]);
    }

    #[test]
    fn a_damaged_length_field_is_found_past_by_scanning() {
        let dir = temp_dir("length");
        let path = dir.join("changes.log");
        let (mut log, _) = ChangeLog::open(&path).unwrap();
        let entries: Vec<Vec<u8>> = (0..10).map(|n| format!("entry {n}").into_bytes()).collect();
        log.append(&entries).unwrap();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        // The length field of the fourth entry, each entry being 8 + 7 bytes.
        let offset = MAGIC.len() + 3 * 15;
        bytes[offset + 1] = 0x7f;
        std::fs::write(&path, &bytes).unwrap();
        let error = damaged(ChangeLog::open(&path).err().expect("refused"));
        assert_eq!(error.offset, offset as u64);
        assert_eq!(error.entries_after, 6);
        let report = ChangeLog::repair(&path).unwrap();
        assert_eq!(report.entries, 9);
        let (log, _) = ChangeLog::open(&path).unwrap();
        let mut expected = entries.clone();
        expected.remove(3);
        assert_eq!(log.entries(), &expected[..]);
    }

    #[test]
    fn a_failed_reopen_after_compaction_stops_appends() {
        let dir = temp_dir("reopen");
        let path = dir.join("changes.log");
        let (mut log, _) = ChangeLog::open(&path).unwrap();
        log.append(&[b"a".to_vec(), b"b".to_vec()]).unwrap();
        log.fail_reopen = true;
        assert!(log.compact(1).is_err());
        // Without the guard this append would go to the unlinked file and be lost.
        let error = log.append(&[b"c".to_vec()]).unwrap_err();
        assert!(
            error.to_string().contains("could not be reopened"),
            "{error}"
        );
        drop(log);
        let (log, _) = ChangeLog::open(&path).unwrap();
        assert_eq!(log.entries(), &[b"b".to_vec()]);
    }

    #[test]
    fn an_entry_over_the_read_limit_is_refused_on_append() {
        let dir = temp_dir("big");
        let path = dir.join("changes.log");
        let (mut log, _) = ChangeLog::open(&path).unwrap();
        assert!(log.append(&[vec![0; ENTRY_BYTES_MAX + 1]]).is_err());
        log.append(&[b"ok".to_vec()]).unwrap();
        drop(log);
        assert_eq!(ChangeLog::open(&path).unwrap().0.len(), 1);
    }
}
