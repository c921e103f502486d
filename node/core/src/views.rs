//! The operator's views, built from the parts' state: `mesh status`, `mesh quarantine`.
//! Reads only indexes, never a document. (The view types are status.rs's.)

use std::collections::BTreeMap;

use crdt_schema::policy::Policy;
use crdt_schema::{ChangeHash, NodeId};

use crate::api::Queues;
use crate::peers::Peer;
use crate::policy::PolicyState;
use crate::records::Records;
use crate::status::{Counters, PeerStatus, PolicySummary, QuarantineRow, Receipt, Status};
use crate::time::Instant;

/// What the status view reads.
pub(crate) struct StatusSources<'a> {
    pub(crate) me: NodeId,
    pub(crate) records: &'a Records,
    pub(crate) peers: &'a BTreeMap<NodeId, Peer>,
    pub(crate) policy: &'a PolicyState,
    pub(crate) counters: &'a Counters,
    pub(crate) last_local_change: Option<Instant>,
    pub(crate) last_remote_change: Option<Instant>,
    pub(crate) last_sync: Option<Instant>,
    pub(crate) pending_changes: usize,
    pub(crate) unflushed_changes: usize,
    /// Whether any key may connect.
    pub(crate) open: bool,
}

/// The node's status, from indexes only: no document is loaded.
pub(crate) fn status(from: StatusSources<'_>) -> Status {
    let mut records: BTreeMap<String, u64> = BTreeMap::new();
    for entry in from
        .records
        .iter()
        .filter(|entry| !entry.is_deleted() && !entry.heads().is_empty())
    {
        *records
            .entry(entry.record().collection().to_owned())
            .or_default() += 1;
    }
    let peers = from
        .peers
        .iter()
        .map(|(peer_id, peer)| PeerStatus {
            peer_id: *peer_id,
            name: from.policy.display_name(peer_id, peer.name.as_deref()),
            state: peer.state,
            connected_since: peer.connected_since,
            last_sync: peer.last_sync,
            syncing: peer.outbound.is_some() || peer.inbound.is_some(),
            behind_estimate: peer.behind_estimate,
            last_error: peer.last_error.clone(),
            counters: peer.counters.clone(),
        })
        .collect();
    Status {
        node_id: from.me,
        records,
        records_total: from.records.len() as u64,
        digest: from.records.total().digest().to_string(),
        last_local_change: from.last_local_change,
        last_remote_change: from.last_remote_change,
        last_sync: from.last_sync,
        peers,
        counters: from.counters.clone(),
        pending_changes: from.pending_changes as u64,
        unflushed_changes: from.unflushed_changes as u64,
        loaded_documents: from.records.loaded_count() as u64,
        policy: from.policy.in_force.as_ref().map(|in_force| PolicySummary {
            version: in_force.policy.version,
            hash: crate::policy::hex(&in_force.hash),
            members: in_force.policy.members.len() as u64,
            conflict: from.policy.conflict.clone(),
        }),
        quarantined_changes: from
            .records
            .iter()
            .map(|entry| entry.quarantine().len() as u64)
            .sum(),
        own_changes_rejected: own_rejections(from.records, &from.policy.receipts, from.me),
        refused_connections: from.policy.refused.values().cloned().collect(),
        open: from.open,
    }
}

/// Every quarantined change, by record.
pub(crate) fn quarantine_rows(
    records: &Records,
    policy: Option<&Policy>,
    me: NodeId,
) -> Vec<QuarantineRow> {
    records
        .iter()
        .flat_map(|entry| {
            entry.quarantine().iter().map(|(hash, held)| QuarantineRow {
                record: entry.record().as_str().to_owned(),
                change: hash.to_string(),
                author: held.author,
                author_name: policy
                    .and_then(|policy| policy.member(&held.author))
                    .map(|(name, _)| name.to_owned()),
                reason: held.reason.clone(),
                reason_text: held.reason.to_string(),
                rejected_by: me,
                rejected_at: held.rejected_at,
            })
        })
        .collect()
}

/// This node's own changes that were rejected: in its own quarantine, and receipts.
pub(crate) fn own_rejections(records: &Records, receipts: &[Receipt], me: NodeId) -> Vec<Receipt> {
    let mut rows: Vec<Receipt> = records
        .iter()
        .flat_map(|entry| {
            entry
                .quarantine()
                .iter()
                .filter(|(_, held)| held.author == me)
                .map(|(hash, held)| Receipt {
                    record: entry.record().as_str().to_owned(),
                    change: hash.to_string(),
                    reason: held.reason.to_string(),
                    rejected_by: me,
                    at: held.rejected_at,
                })
        })
        .collect();
    rows.extend(receipts.iter().cloned());
    rows
}

/// The current length of every queue that grows with peer input, for checkers and
/// metrics. Cheap: no document is loaded.
pub(crate) fn queues(
    peers: &BTreeMap<NodeId, Peer>,
    records: &Records,
    pending_changes: usize,
    pipeline_remote_changes: usize,
    history: usize,
) -> Queues {
    let sessions = peers
        .values()
        .flat_map(|peer| peer.outbound.iter().chain(&peer.inbound));
    Queues {
        pending_changes,
        pipeline_remote_changes,
        peers: peers.len(),
        history,
        loaded_documents: records.loaded_count(),
        loaded_document_bytes: records.loaded_bytes(),
        held_documents: records.held_bytes(),
        store_reads: records.store_reads(),
        deferred_rounds_max: sessions
            .clone()
            .map(|session| session.deferred_len())
            .max()
            .unwrap_or(0),
        oldest_session_progress: sessions.map(|session| session.last_progress_at).min(),
    }
}

/// Every quarantined change as (record, change), in order.
pub(crate) fn quarantined(records: &Records) -> Vec<(String, ChangeHash)> {
    records
        .iter()
        .flat_map(|entry| {
            entry
                .quarantine()
                .keys()
                .map(|hash| (entry.record().as_str().to_owned(), *hash))
        })
        .collect()
}
