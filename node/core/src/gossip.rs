//! Gossip: newly durable changes go to every connected peer that replicates their
//! collection, except the peer each came from (and the author's own changes to all). A
//! change too large for a push is announced instead, and the peer asks for it with a
//! `Need`. Lazy push (announcing hashes to peers that probably have the change) lands here.

use std::collections::BTreeMap;

use crdt_schema::policy::RejectReason;
use crdt_schema::{ChangeHash, NodeId, VerifiedChange};

use crate::limits::{PUSH_CHANGE_BYTES_MAX, SYNC_BATCH_BYTES_MAX};
use crate::outbox::Outbox;
use crate::peers::Peer;
use crate::records::{Records, Scope, in_scope};
use crate::wire::{EnvelopeBytes, Message};

/// Pushes newly durable changes to connected peers that replicate their collection,
/// except the peer each came from.
pub(crate) fn push(
    changes: Vec<(Option<NodeId>, VerifiedChange)>,
    peers: &mut BTreeMap<NodeId, Peer>,
    records: &Records,
    out: &mut Outbox,
) {
    if changes.is_empty() {
        return;
    }
    let local = changes.iter().filter(|(from, _)| from.is_none()).count() as u64;
    for peer in peers.values_mut() {
        if !peer.is_ready() {
            peer.behind_estimate += local;
        }
    }
    let targets: Vec<(NodeId, Option<Scope>)> = peers
        .iter()
        .filter(|(_, peer)| peer.is_ready())
        .map(|(id, peer)| (*id, peer.scope.clone()))
        .collect();
    for (target, scope) in targets {
        let scope = scope.expect("filtered above");
        let mut batch: Vec<EnvelopeBytes> = Vec::new();
        let mut batch_bytes = 0;
        for (from, change) in &changes {
            if *from == Some(target) || !in_scope(&scope, change.record.collection()) {
                continue;
            }
            let envelope = change.envelope.as_bytes();
            if envelope.len() > PUSH_CHANGE_BYTES_MAX {
                let heads = records
                    .entry(change.record.as_str())
                    .map(|entry| entry.heads().iter().map(|hash| hash.0).collect())
                    .unwrap_or_default();
                let record = change.record.as_str().to_owned();
                out.send(target, &Message::Announce { record, heads });
                continue;
            }
            if batch_bytes + envelope.len() > SYNC_BATCH_BYTES_MAX {
                flush(target, &mut batch, peers, out);
                batch_bytes = 0;
            }
            batch_bytes += envelope.len();
            batch.push(EnvelopeBytes(envelope.to_vec()));
        }
        flush(target, &mut batch, peers, out);
    }
}

fn flush(
    target: NodeId,
    batch: &mut Vec<EnvelopeBytes>,
    peers: &mut BTreeMap<NodeId, Peer>,
    out: &mut Outbox,
) {
    if batch.is_empty() {
        return;
    }
    let changes = std::mem::take(batch);
    if let Some(peer) = peers.get_mut(&target) {
        peer.counters.changes_sent += changes.len() as u64;
    }
    out.send(target, &Message::Push { changes });
}

/// Tells the author of a change this node rejected, if it is connected.
pub(crate) fn receipt(
    peers: &BTreeMap<NodeId, Peer>,
    out: &mut Outbox,
    record: &str,
    hash: ChangeHash,
    author: NodeId,
    reason: &RejectReason,
) {
    let connected = peers.get(&author).is_some_and(Peer::is_ready);
    if connected {
        let message = Message::Receipt {
            record: record.to_owned(),
            change: hash.0,
            reason: reason.to_string(),
        };
        out.send(author, &message);
    }
}
