//! What the core asks of storage, and what the driver hands back on start.
//!
//! Storage is the driver's: the daemon maps these requests to the change log and sled, the
//! simulator to an in-memory store that loses unflushed writes on a crash. The core sees
//! only two requests:
//!
//! - [`StorageRequest::Append`]: append signed envelopes to the change log and report done
//!   only once they are durable (fdatasync). Nothing is acknowledged or announced before.
//!   The core has at most one append in flight; everything that arrives meanwhile goes into
//!   the next one, which is group commit.
//! - [`StorageRequest::Checkpoint`]: save these records as documents. Once the driver has
//!   made the checkpoint durable, and if it says `compact_log`, the driver may drop every
//!   log entry of the appends it had completed before the request.
//!
//! On start the driver feeds [`Restore`]: the index of the last saved records (heads,
//! signatures, quarantine, without their documents) and the log entries since. Replaying
//! an entry a document already holds is harmless.
//!
//! The one read the core makes of storage itself goes through [`DocumentStore`]: the
//! document of a record the index names, read when the record is first used, and again
//! whenever the byte-bounded cache dropped it after a completed checkpoint had saved it.
//! It is synchronous, since sled answers from its page cache (and the simulator from its
//! simulated disk) and every code path that touches a document would otherwise have to
//! wait for a completion. The store only ever answers with what a *completed* checkpoint
//! wrote, which is what the index it came with claims.

use serde::{Deserialize, Serialize};

use crdt_schema::{ChangeHash, RecordId};

/// Numbers a storage request, so its completion can be matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StorageOpId(pub u64);

/// One request to the driver's storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageRequest {
    /// Append these envelopes to the change log; complete only when durable.
    Append {
        /// Encoded signed envelopes, in the order they must be replayed.
        envelopes: Vec<Vec<u8>>,
    },
    /// Save these records (replacing earlier saves of the same records).
    Checkpoint {
        /// The records changed since the last checkpoint.
        records: Vec<SavedRecord>,
        /// Whether every change of every append that completed before this request is now
        /// in a saved record, so that once this checkpoint is durable the driver may drop
        /// those log entries. False while a record with changed state is left out because
        /// local changes to it await their append.
        compact_log: bool,
        /// The signed policy in force (JSON), when it changed since the last checkpoint.
        /// Stored with the records, since they were judged under it.
        policy: Option<Vec<u8>>,
    },
}

/// Why storage failed, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StorageError(pub String);

/// A record as stored: its Automerge document and the signatures of its changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRecord {
    /// The record.
    pub record: RecordId,
    /// The document's heads, so a start need not load every document; checked against
    /// the document when it is loaded.
    pub heads: Vec<[u8; 32]>,
    /// The document in Automerge's standard binary format.
    #[serde(with = "serde_bytes")]
    pub document: Vec<u8>,
    /// The author's signature of every change in the document, by change hash.
    pub signatures: Vec<([u8; 32], Signature)>,
    /// Changes the policy rejected, with why and when.
    pub quarantine: Vec<SavedQuarantined>,
    /// The hash of the policy the record was judged under; a start with another policy
    /// judges it again.
    pub judged_under: Option<[u8; 32]>,
    /// Whether the record is deleted, so that a start need not load its document. `None`
    /// in records saved before it was stored: their documents are loaded at start.
    pub deleted: Option<bool>,
}

/// A saved record without its document: what a start reads to rebuild the index. The
/// fields are [`SavedRecord`]'s, in its order, so the driver can store the two apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedIndex {
    /// The record.
    pub record: RecordId,
    /// The document's heads; checked against the document when it is loaded.
    pub heads: Vec<[u8; 32]>,
    /// The author's signature of every change in the document, by change hash.
    pub signatures: Vec<([u8; 32], Signature)>,
    /// Changes the policy rejected, with why and when.
    pub quarantine: Vec<SavedQuarantined>,
    /// The hash of the policy the record was judged under.
    pub judged_under: Option<[u8; 32]>,
    /// Whether the record is deleted; `None` for records saved before it was stored, whose
    /// documents are then loaded at start.
    pub deleted: Option<bool>,
}

/// [`SavedIndex`] borrowed from a [`SavedRecord`], encoding to the same bytes.
#[derive(Serialize)]
struct SavedIndexRef<'a> {
    record: &'a RecordId,
    heads: &'a Vec<[u8; 32]>,
    signatures: &'a Vec<([u8; 32], Signature)>,
    quarantine: &'a Vec<SavedQuarantined>,
    judged_under: &'a Option<[u8; 32]>,
    deleted: &'a Option<bool>,
}

/// Where the core reads the saved documents of the records a [`Restore::index`] names (see
/// the module doc). The driver's implementation answers with what its last completed
/// checkpoint stored for the record.
pub trait DocumentStore: Send {
    /// The saved document of `record` in Automerge's binary format, or `None` if storage
    /// holds none.
    fn document(&self, record: &RecordId) -> Result<Option<Vec<u8>>, StorageError>;
}

/// A record as stored before `deleted` was (decoded when the current layout fails).
#[derive(Deserialize)]
struct SavedRecordWithoutDeleted {
    record: RecordId,
    heads: Vec<[u8; 32]>,
    #[serde(with = "serde_bytes")]
    document: Vec<u8>,
    signatures: Vec<([u8; 32], Signature)>,
    quarantine: Vec<SavedQuarantined>,
    judged_under: Option<[u8; 32]>,
}

/// A quarantined change as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQuarantined {
    /// The signed envelope.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    /// The rejection reason as JSON (it is re-derived on the next policy change anyway).
    pub reason: String,
    /// When it was rejected, in milliseconds since the epoch.
    pub rejected_at_ms: u64,
}

/// An ed25519 signature, serialised as bytes.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature(#[serde(with = "serde_bytes")] pub [u8; 64]);

/// What survived in storage, handed to a new node before anything else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restore {
    /// Records as last checkpointed, documents included (drivers that keep no
    /// [`DocumentStore`], and tests).
    pub records: Vec<SavedRecord>,
    /// Records as last checkpointed, whose documents the node reads from its
    /// [`DocumentStore`] when it first uses them.
    pub index: Vec<SavedIndex>,
    /// Log entries appended since, in order.
    pub log: Vec<Vec<u8>>,
    /// The signed policy (JSON) stored with the last checkpoint that carried one.
    pub policy: Option<Vec<u8>>,
}

/// Why stored bytes could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored record is damaged: {0}")]
pub struct DecodeError(pub String);

impl SavedRecord {
    /// Encodes the record for the driver to store.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encoding into a Vec cannot fail")
    }

    /// Decodes a stored record, of this layout or the one before `deleted` was stored.
    pub fn decode(bytes: &[u8]) -> Result<SavedRecord, DecodeError> {
        postcard::from_bytes(bytes).or_else(|error| {
            let old: SavedRecordWithoutDeleted =
                postcard::from_bytes(bytes).map_err(|_| DecodeError(error.to_string()))?;
            Ok(SavedRecord {
                record: old.record,
                heads: old.heads,
                document: old.document,
                signatures: old.signatures,
                quarantine: old.quarantine,
                judged_under: old.judged_under,
                deleted: None,
            })
        })
    }

    /// The record without its document, encoded as [`SavedIndex::encode`] would.
    pub fn encode_index(&self) -> Vec<u8> {
        postcard::to_allocvec(&SavedIndexRef {
            record: &self.record,
            heads: &self.heads,
            signatures: &self.signatures,
            quarantine: &self.quarantine,
            judged_under: &self.judged_under,
            deleted: &self.deleted,
        })
        .expect("encoding into a Vec cannot fail")
    }

    /// Splits the record into its index and its document.
    pub fn split(self) -> (SavedIndex, Vec<u8>) {
        let index = SavedIndex {
            record: self.record,
            heads: self.heads,
            signatures: self.signatures,
            quarantine: self.quarantine,
            judged_under: self.judged_under,
            deleted: self.deleted,
        };
        (index, self.document)
    }

    /// The signature of one change, if stored.
    pub fn signature(&self, hash: &ChangeHash) -> Option<&Signature> {
        self.signatures
            .iter()
            .find(|(stored, _)| stored == &hash.0)
            .map(|(_, signature)| signature)
    }
}

impl SavedIndex {
    /// Encodes the index entry for the driver to store.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encoding into a Vec cannot fail")
    }

    /// Decodes a stored index entry.
    pub fn decode(bytes: &[u8]) -> Result<SavedIndex, DecodeError> {
        postcard::from_bytes(bytes).map_err(|error| DecodeError(error.to_string()))
    }
}

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signature({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// Hands out storage op ids, shared by the parts that ask storage for something.
#[derive(Debug, Default)]
pub(crate) struct StorageOps {
    last: u64,
}

impl StorageOps {
    /// The next unused id.
    pub(crate) fn next(&mut self) -> StorageOpId {
        self.last += 1;
        StorageOpId(self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout before `deleted` was stored, as such records lie on disk.
    #[derive(Serialize)]
    struct Before<'a> {
        record: &'a RecordId,
        heads: &'a Vec<[u8; 32]>,
        #[serde(with = "serde_bytes")]
        document: &'a Vec<u8>,
        signatures: &'a Vec<([u8; 32], Signature)>,
        quarantine: &'a Vec<SavedQuarantined>,
        judged_under: &'a Option<[u8; 32]>,
    }

    #[test]
    fn a_record_saved_before_deleted_was_stored_still_decodes() {
        let record = SavedRecord {
            record: "stock/a".parse().unwrap(),
            heads: vec![[7; 32]],
            document: vec![1, 2, 3],
            signatures: vec![([7; 32], Signature([9; 64]))],
            quarantine: Vec::new(),
            judged_under: Some([5; 32]),
            deleted: Some(true),
        };
        assert_eq!(SavedRecord::decode(&record.encode()), Ok(record.clone()));
        let before = postcard::to_allocvec(&Before {
            record: &record.record,
            heads: &record.heads,
            document: &record.document,
            signatures: &record.signatures,
            quarantine: &record.quarantine,
            judged_under: &record.judged_under,
        })
        .unwrap();
        let decoded = SavedRecord::decode(&before).unwrap();
        assert_eq!(decoded.deleted, None, "its documents are loaded at start");
        assert_eq!(decoded.heads, record.heads);
        assert_eq!(decoded.document, record.document);
        assert!(SavedRecord::decode(&before[..before.len() - 3]).is_err());
    }

    #[test]
    fn a_record_splits_into_an_index_that_encodes_as_its_borrowed_form() {
        let record = SavedRecord {
            record: "stock/a".parse().unwrap(),
            heads: vec![[7; 32]],
            document: vec![1, 2, 3],
            signatures: vec![([7; 32], Signature([9; 64]))],
            quarantine: vec![SavedQuarantined {
                envelope: vec![4, 5],
                reason: "{}".to_owned(),
                rejected_at_ms: 12,
            }],
            judged_under: None,
            deleted: Some(false),
        };
        let borrowed = record.encode_index();
        let (index, document) = record.clone().split();
        assert_eq!(document, record.document);
        assert_eq!(index.encode(), borrowed);
        assert_eq!(SavedIndex::decode(&borrowed), Ok(index));
        assert!(SavedIndex::decode(&borrowed[..borrowed.len() - 1]).is_err());
    }
}
