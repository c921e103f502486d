//! The durable half of the write path: what follows once an append is durable. Local
//! writes are marked durable and acknowledged; remote changes are settled by the judge,
//! per record, into their documents or quarantine; the change feed hears of every record
//! whose durable state changed; and what may travel on is sorted from what may not.
//!
//! [`Apply`] works through the judge's borrows plus the peers (for the receipt a rejected
//! author gets and the counters of the peer that relayed it). It sends nothing on its own
//! but receipts: the node pushes what [`Apply::relayable`] keeps.

use std::collections::{BTreeMap, BTreeSet};

use crdt_schema::{ChangeHash, NodeId, RecordId, VerifiedChange};

use crate::api::{CommandError, CommandId, Event, Reply};
use crate::gossip;
use crate::judge::Judge;
use crate::outbox::Outbox;
use crate::peers::Peer;
use crate::pipeline::{Origin, WholeDocument};
use crate::records::Records;
use crate::time::Instant;

/// Applying durable changes: the judge's borrows and what else it reads and counts.
pub(crate) struct Apply<'a> {
    pub(crate) judge: Judge<'a>,
    pub(crate) peers: &'a mut BTreeMap<NodeId, Peer>,
    /// When a peer's change last changed a record here (status shows it).
    pub(crate) last_remote_change: &'a mut Option<Instant>,
}

impl Apply<'_> {
    /// A local write of `record` is durable (`change` is `None` for a write that changed
    /// nothing): marks it durable and answers its command. Returns the change if it is to
    /// be pushed.
    pub(crate) fn local_durable(
        &mut self,
        command: Option<CommandId>,
        record: RecordId,
        change: Option<VerifiedChange>,
    ) -> Option<VerifiedChange> {
        let changed = change.is_some();
        let change_hash = change.as_ref().map(VerifiedChange::hash);
        let records = &mut *self.judge.records;
        let forbidden = change.as_ref().and_then(|change| {
            let entry = records.entry(record.as_str())?;
            let held = entry.quarantine().get(&change.hash())?;
            Some(held.reason.clone())
        });
        if let Some(reason) = forbidden {
            // A newer policy arrived while the append was in flight and forbids this
            // write: it is durable, but in quarantine, never applied.
            let key = record.as_str();
            records.remove_unacked(key, &change_hash.expect("a change exists"));
            records.refresh_item(key);
            if let Some(command) = command {
                let version = self.judge.policy.map_or(0, |policy| policy.version);
                self.judge
                    .out
                    .complete(command, Err(CommandError::Forbidden { version, reason }));
            }
            return None;
        }
        let mut pushed = None;
        if let Some(change) = change {
            let key = record.as_str();
            let deps = change.change.deps().to_vec();
            records.mark_durable(key, change.hash(), &deps, change.signature());
            let quarantined_here = records
                .entry(key)
                .is_some_and(|entry| !entry.quarantine().is_empty());
            if quarantined_here && self.judge.policy.is_some() {
                // It may build on this node's quarantined changes (see
                // `local::own_quarantined_chain`), which it accepts: judge again.
                self.judge.rejudge(key, Vec::new());
            }
            let records = &mut *self.judge.records;
            records.refresh_deleted(key);
            self.judge.counters.changes_local += 1;
            let entry = records.entry(key).expect("written");
            let (heads, deleted) = (entry.heads().to_vec(), entry.is_deleted());
            self.judge.out.emit(Event::RecordChanged {
                record: record.clone(),
                heads,
                from: None,
                authors: vec![self.judge.identity.node_id()],
                deleted,
            });
            pushed = Some(change);
        }
        let heads = self
            .judge
            .records
            .entry(record.as_str())
            .map(|entry| entry.heads().to_vec());
        if let Some(command) = command {
            self.judge.out.complete(
                command,
                Ok(Reply::Written {
                    record,
                    change: change_hash,
                    heads: heads.unwrap_or_default(),
                    changed,
                }),
            );
        }
        pushed
    }

    /// Applies durable remote changes, grouped per record, under the policy: accepted
    /// ones join their documents, the rest go to quarantine. A record that came whole
    /// takes its document from `whole` when every change of it is accepted as it is.
    /// Returns the accepted ones.
    pub(crate) fn remote_batch(
        &mut self,
        batch: Vec<(NodeId, VerifiedChange, Origin)>,
        mut whole: BTreeMap<String, WholeDocument>,
    ) -> BTreeSet<(String, ChangeHash)> {
        let mut by_record: BTreeMap<String, Vec<(NodeId, VerifiedChange, Origin)>> =
            BTreeMap::new();
        for item in batch {
            by_record
                .entry(item.1.record.as_str().to_owned())
                .or_default()
                .push(item);
        }
        let me = self.judge.identity.node_id();
        let mut accepted = BTreeSet::new();
        for (key, items) in by_record {
            let record = items[0].1.record.clone();
            self.judge.records.create(&record);
            let changes = items.iter().map(|(_, change, _)| change.clone()).collect();
            let settled = self.judge.settle(&key, changes, whole.remove(&key));
            let mut from = None;
            let mut authors: Vec<NodeId> = Vec::new();
            for (peer, change, origin) in &items {
                let hash = change.hash();
                if settled.accepted.contains(&hash) {
                    if !authors.contains(&change.author) {
                        authors.push(change.author);
                    }
                    accepted.insert((key.clone(), hash));
                    if *origin != Origin::Log {
                        self.judge.counters.changes_applied += 1;
                        *self.last_remote_change = Some(self.judge.now);
                        from = Some(*peer);
                    }
                }
            }
            for (hash, author, reason) in &settled.rejected {
                let arrived = items
                    .iter()
                    .find(|(_, change, _)| change.hash() == *hash)
                    .filter(|(_, _, origin)| *origin != Origin::Log);
                if let Some((peer, _, _)) = arrived {
                    self.judge.counters.changes_rejected += 1;
                    if let Some(peer) = self.peers.get_mut(peer) {
                        peer.counters.rejected += 1;
                    }
                    if *author != me {
                        gossip::receipt(self.peers, self.judge.out, &key, *hash, *author, reason);
                    }
                }
                self.judge.out.emit(Event::ChangeQuarantined {
                    record: record.clone(),
                    change: *hash,
                    reason: reason.to_string(),
                });
            }
            if settled.changed {
                announce_record(self.judge.records, self.judge.out, &key, from, authors);
            } else {
                // A record created for changes that Automerge refused holds nothing.
                self.judge.records.remove_empty(&key);
            }
        }
        accepted
    }

    /// Records judged while local changes awaited an append are judged again once none
    /// of their local changes is waiting any more.
    pub(crate) fn rejudge_acknowledged(&mut self) {
        let records = &*self.judge.records;
        let waiting: Vec<String> = self
            .judge
            .rejudge_after_ack
            .iter()
            .filter(|key| records.entry(key).is_none_or(|entry| !entry.has_unacked()))
            .cloned()
            .collect();
        for key in waiting {
            self.judge.rejudge_after_ack.remove(&key);
            if self.judge.records.entry(&key).is_some()
                && self.judge.rejudge(&key, Vec::new()).changed
            {
                announce_record(self.judge.records, self.judge.out, &key, None, Vec::new());
            }
        }
    }

    /// Keeps of the durable changes those that may travel on: own changes and remote
    /// changes the judge `accepted`, and none that sits in quarantine now. Rejected changes
    /// are never pushed.
    pub(crate) fn relayable(
        &self,
        mut pushed: Vec<(Option<NodeId>, VerifiedChange)>,
        accepted: &BTreeSet<(String, ChangeHash)>,
    ) -> Vec<(Option<NodeId>, VerifiedChange)> {
        pushed.retain(|(from, change)| {
            from.is_none() || accepted.contains(&(change.record.as_str().to_owned(), change.hash()))
        });
        let records = &*self.judge.records;
        pushed.retain(|(_, change)| {
            records
                .entry(change.record.as_str())
                .is_some_and(|entry| !entry.quarantine().contains_key(&change.hash()))
        });
        pushed
    }
}

/// Tells the change feed that a record's durable state changed.
pub(crate) fn announce_record(
    records: &Records,
    out: &mut Outbox,
    key: &str,
    from: Option<NodeId>,
    authors: Vec<NodeId>,
) {
    let Some(entry) = records.entry(key) else {
        return;
    };
    out.emit(Event::RecordChanged {
        record: entry.record().clone(),
        heads: entry.heads().to_vec(),
        from,
        authors,
        deleted: entry.is_deleted(),
    });
}
