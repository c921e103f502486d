//! Start: what the driver hands back from storage becomes the node's state again.
//!
//! The policy comes first (the records were judged under it), then each saved record's
//! index entry as stored (heads, signatures, deleted, quarantine): no document is loaded, so
//! a start costs what reading the index costs. Each document is checked against its stored
//! heads when it is first loaded (`Records::doc_mut`); a damaged one is reported then and
//! its record forgotten, so peers bring its changes again. A damaged quarantined change is
//! reported and skipped at once. The log's changes are
//! returned for the node to replay through its usual write path.

use std::collections::BTreeMap;

use crdt_schema::{ChangeHash, Envelope, NodeId, OrgId, RecordDoc, VerifiedChange};

use crate::api::Event;
use crate::outbox::Outbox;
use crate::policy::InForce;
use crate::records::{Quarantined, Records, RestoredRecord};
use crate::signatures::Signatures;
use crate::status::Counters;
use crate::storage::Restore;
use crate::time::Instant;

/// What the node must still do after [`load`].
pub(crate) struct Restored {
    /// The log's changes that verified, in log order, to replay.
    pub(crate) replayed: Vec<VerifiedChange>,
    /// Records saved under another policy than the one restored: judged again.
    pub(crate) stale: Vec<String>,
}

/// Loads the saved policy and records into `in_force` and `records`.
pub(crate) fn load(
    restore: Restore,
    org: &OrgId,
    me: &NodeId,
    in_force: &mut Option<InForce>,
    records: &mut Records,
    counters: &mut Counters,
    out: &mut Outbox,
) -> Restored {
    // The policy first: the records were judged under it, and the log's changes are.
    if let Some(bytes) = &restore.policy {
        let restored = serde_json::from_slice::<crdt_schema::policy::SignedPolicy>(bytes)
            .map_err(|error| error.to_string())
            .and_then(|signed| {
                let policy = signed.verify(org).map_err(|error| error.to_string())?;
                Ok(InForce {
                    hash: signed.hash(),
                    policy,
                    signed,
                })
            });
        match restored {
            Ok(restored) => *in_force = Some(restored),
            Err(error) => {
                counters.storage_errors += 1;
                out.emit(Event::StorageFailed {
                    error: format!(
                        "the stored policy is unreadable ({error}); a peer will send it again"
                    ),
                });
            }
        }
    }
    let policy_hash = in_force.as_ref().map(|in_force| in_force.hash);
    let mut stale = Vec::new();
    let mut restored = Vec::new();
    // Records restored with their documents' bytes, then those whose documents stay in
    // the document store until used.
    let with_documents = restore.records.into_iter().map(|saved| {
        let (index, document) = saved.split();
        (index, Some(document))
    });
    let in_store = restore.index.into_iter().map(|index| (index, None));
    for (mut saved, document) in with_documents.chain(in_store) {
        let (heads, deleted) = match saved.deleted {
            // The index as stored: the document loads on first use, and is checked against
            // these heads then (`Records::doc_mut`).
            // Moved, not copied: `collect` reuses the vector in place.
            Some(deleted) => (
                std::mem::take(&mut saved.heads)
                    .into_iter()
                    .map(ChangeHash)
                    .collect(),
                deleted,
            ),
            // Saved before `deleted` was stored: the document is loaded and checked now.
            None => match match &document {
                Some(bytes) => check_document(&saved, bytes, me),
                None => records
                    .stored_document(&saved.record)
                    .map_err(|error| {
                        format!(
                            "stored record {} is damaged and was skipped: {error}",
                            saved.record
                        )
                    })
                    .and_then(|bytes| check_document(&saved, &bytes, me)),
            } {
                Ok((heads, deleted, agree)) => {
                    if !agree {
                        counters.storage_errors += 1;
                        out.emit(Event::StorageFailed {
                            error: format!(
                                "stored heads of {} disagree with its document; the document wins",
                                saved.record
                            ),
                        });
                    }
                    (heads, deleted)
                }
                Err(error) => {
                    counters.storage_errors += 1;
                    out.emit(Event::StorageFailed { error });
                    continue;
                }
            },
        };
        let signatures = Signatures::from_unsorted(
            std::mem::take(&mut saved.signatures)
                .into_iter()
                .map(|(hash, signature)| (ChangeHash(hash), signature.0))
                .collect(),
        );
        let mut quarantine = BTreeMap::new();
        for held in saved.quarantine {
            let Ok(change) = Envelope::from_bytes(held.envelope).verify(org) else {
                counters.storage_errors += 1;
                continue;
            };
            let Ok(reason) = serde_json::from_str(&held.reason) else {
                counters.storage_errors += 1;
                continue;
            };
            quarantine.insert(
                change.hash(),
                Quarantined {
                    envelope: change.envelope.as_bytes().to_vec(),
                    author: change.author,
                    change: change.change,
                    reason,
                    rejected_at: Instant::from_millis(held.rejected_at_ms),
                },
            );
        }
        if saved.judged_under != policy_hash {
            stale.push(saved.record.as_str().to_owned());
        }
        restored.push(RestoredRecord {
            record: saved.record,
            heads,
            document,
            signatures,
            deleted,
            quarantine,
        });
    }
    records.restore_all(restored);
    let mut replayed = Vec::new();
    for bytes in restore.log {
        match Envelope::from_bytes(bytes).verify(org) {
            Ok(change) => replayed.push(change),
            // The driver checksums log entries; a bad one here means a bug or
            // tampering, and is counted rather than trusted.
            Err(_) => counters.changes_rejected += 1,
        }
    }
    Restored { replayed, stale }
}

/// Loads a stored document (pair check): its heads, whether it is deleted, and whether its
/// heads are the stored ones (the document wins); an error if it does not load.
fn check_document(
    saved: &crate::storage::SavedIndex,
    document: &[u8],
    me: &NodeId,
) -> Result<(Vec<ChangeHash>, bool, bool), String> {
    let doc = RecordDoc::load(document, me).map_err(|error| {
        format!(
            "stored record {} is damaged and was skipped: {error}",
            saved.record
        )
    })?;
    let heads = doc.heads();
    let agree = heads
        .iter()
        .map(|hash| hash.0)
        .eq(saved.heads.iter().copied());
    Ok((heads, doc.deleted(), agree))
}
