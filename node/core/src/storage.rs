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
//! On start the driver feeds [`Restore`]: the last saved documents and the log entries
//! since. Replaying an entry a document already holds is harmless.

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
    /// The records as last checkpointed.
    pub records: Vec<SavedRecord>,
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

    /// The signature of one change, if stored.
    pub fn signature(&self, hash: &ChangeHash) -> Option<&Signature> {
        self.signatures
            .iter()
            .find(|(stored, _)| stored == &hash.0)
            .map(|(_, signature)| signature)
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
}
