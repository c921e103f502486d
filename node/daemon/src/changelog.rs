//! The change log: the source of truth for acknowledged writes.
//!
//! An append-only file of entries `[length u32 LE][crc32 u32 LE][bytes]` after an 8-byte
//! magic. An append writes every entry of one request and then calls `fdatasync` once, so
//! one sync covers every write waiting at that moment (the core batches them). sled makes
//! its data durable with `sync_file_range`, which flushes neither the disk cache nor
//! metadata, so nothing is acknowledged on sled's word alone.
//!
//! On open the log is read to its end; a torn last entry (short, or failing its checksum)
//! is reported and cut off, since it was never acknowledged. Compaction rewrites the log
//! without the entries a durable checkpoint covers, through a temporary file and a rename.

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
}

/// What opening the log found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Bytes of a torn last entry that were cut off.
    pub truncated_bytes: u64,
}

impl ChangeLog {
    /// Opens or creates the log at `path`, cutting off a torn last entry.
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
            return Ok((
                ChangeLog {
                    path: path.to_owned(),
                    file,
                    entries: Vec::new(),
                },
                report,
            ));
        }
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not a mesh change log (bad magic); move it away or restore it from a backup",
                    path.display()
                ),
            ));
        }
        let (entries, good_len) = parse_entries(&bytes[MAGIC.len()..]);
        let good_len = MAGIC.len() + good_len;
        if good_len < bytes.len() {
            report.truncated_bytes = (bytes.len() - good_len) as u64;
            file.set_len(good_len as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok((
            ChangeLog {
                path: path.to_owned(),
                file,
                entries,
            },
            report,
        ))
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
        let kept = self.entries[count..].to_vec();
        let temporary = self.path.with_extension("log.compacting");
        let written = (|| {
            let mut file = File::create(&temporary)?;
            file.write_all(MAGIC)?;
            for entry in &kept {
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
        std::fs::rename(&temporary, &self.path)?;
        sync_parent(&self.path)?;
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        self.file.seek(SeekFrom::End(0))?;
        self.entries = kept;
        Ok(())
    }
}

/// Parses entries until the end or the first damaged one; returns them and the length of
/// the good prefix.
fn parse_entries(mut bytes: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let mut entries = Vec::new();
    let mut good = 0;
    while bytes.len() >= 8 {
        let length = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        let checksum = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        if length > ENTRY_BYTES_MAX || bytes.len() < 8 + length {
            break;
        }
        let entry = &bytes[8..8 + length];
        if crc32fast::hash(entry) != checksum {
            break;
        }
        entries.push(entry.to_vec());
        good += 8 + length;
        bytes = &bytes[8 + length..];
    }
    (entries, good)
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
}
