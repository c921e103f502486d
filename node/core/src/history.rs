//! One record's history on the wire: the durable changes a peer lacks, as envelopes or,
//! for a peer that has none of the record, as a snapshot; and the `Need` that asks a peer
//! for what this node lacks. Functions over the records, used
//! by reconciliation rounds, announcements and admission.

use std::collections::BTreeSet;

use crdt_schema::{ChangeHash, Envelope};

use crate::limits::{CHANGES_PER_MESSAGE_MAX, NEED_ANCESTORS_MAX, SYNC_BATCH_BYTES_MAX};
use crate::records::Records;
use crate::storage::Signature;
use crate::wire::{Need, Snapshot};

/// What this node has of a record, for a `Need`: its advertised heads and, when no
/// local change is in flight, some ancestors, so the sender can skip what is held.
pub(crate) fn need(records: &mut Records, key: &str) -> Need {
    match records.entry(key) {
        None => Need {
            record: key.to_owned(),
            heads: Vec::new(),
            ancestors: Vec::new(),
        },
        Some(entry) => {
            let heads: Vec<[u8; 32]> = entry
                .advertised_for_wire()
                .iter()
                .map(|hash| hash.0)
                .collect();
            let has_unacked = entry.has_unacked();
            let doc = records.doc(key);
            // The ancestors of the document's heads are durable unless local changes
            // are in flight; skip them then rather than reveal unacknowledged hashes.
            let ancestors = if has_unacked {
                Vec::new()
            } else {
                doc.ancestors(NEED_ANCESTORS_MAX)
                    .iter()
                    .map(|hash| hash.0)
                    .collect()
            };
            Need {
                record: key.to_owned(),
                heads,
                ancestors,
            }
        }
    }
}

/// Record `key` whole, for a peer that has none of it, when its saved document is at hand
/// without loading it and is all there is to send: no local change in flight, nothing
/// quarantined (quarantined changes travel as envelopes), and the document is one
/// uncompressed chunk whose heads are the index's (documents saved before saves were
/// uncompressed, or damaged ones, go change by change, which loads and checks them).
pub(crate) fn snapshot(records: &mut Records, key: &str) -> Option<Snapshot> {
    let entry = records.entry(key)?;
    if !entry.unacked().is_empty() || !entry.quarantine().is_empty() || entry.heads().is_empty() {
        return None;
    }
    let signatures = entry.signatures().len();
    if signatures > CHANGES_PER_MESSAGE_MAX {
        return None;
    }
    let document = records.saved_bytes_unloaded(key)?;
    if document.len() + 64 * signatures + key.len() > SYNC_BATCH_BYTES_MAX {
        // Larger than a batch message: its changes go one by one instead.
        return None;
    }
    let header = crdt_schema::snapshot::check_document(&document).ok()?;
    let entry = records.entry(key).expect("checked above");
    let mut heads = header.heads;
    heads.sort_unstable();
    if heads != entry.heads() {
        return None;
    }
    Some(Snapshot {
        record: key.to_owned(),
        document,
        signatures: entry
            .signatures()
            .iter()
            .map(|(_, signature)| Signature(*signature))
            .collect(),
    })
}

/// Durable changes of `key` not in the history of `have`, as envelopes.
pub(crate) fn envelopes_after(
    records: &mut Records,
    key: &str,
    have: &[ChangeHash],
) -> Vec<Vec<u8>> {
    let Some(entry) = records.entry(key) else {
        return Vec::new();
    };
    let record = entry.record().clone();
    let unacked = entry.unacked().clone();
    let changes = records.doc(key).changes_after(have);
    let entry = records.entry(key).expect("checked above");
    let mut envelopes: Vec<Vec<u8>> = changes
        .iter()
        .filter(|change| !unacked.contains(&change.hash()))
        .filter_map(|change| {
            let signature = entry.signatures().get(&change.hash())?;
            Some(Envelope::encode(&record, change.raw_bytes(), signature).into_bytes())
        })
        .collect();
    if !entry.quarantine().is_empty() {
        // Quarantined changes travel by reconciliation too (never by push), so every
        // node judges the same set: those not behind `have`, in dependency order.
        let mut known: BTreeSet<ChangeHash> = BTreeSet::new();
        let mut stack: Vec<ChangeHash> = have.to_vec();
        while let Some(hash) = stack.pop() {
            if let Some(held) = entry.quarantine().get(&hash)
                && known.insert(hash)
            {
                stack.extend(held.change.deps().iter().copied());
            }
            known.insert(hash);
        }
        let mut sent: BTreeSet<ChangeHash> = BTreeSet::new();
        loop {
            let ready: Vec<ChangeHash> = entry
                .quarantine()
                .iter()
                .filter(|(hash, _)| {
                    !known.contains(hash) && !sent.contains(hash) && !unacked.contains(hash)
                })
                .filter(|(_, held)| {
                    held.change.deps().iter().all(|dep| {
                        !entry.quarantine().contains_key(dep)
                            || known.contains(dep)
                            || sent.contains(dep)
                    })
                })
                .map(|(hash, _)| *hash)
                .collect();
            if ready.is_empty() {
                break;
            }
            for hash in ready {
                envelopes.push(entry.quarantine()[&hash].envelope.clone());
                sent.insert(hash);
            }
        }
    }
    envelopes
}
