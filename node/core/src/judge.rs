//! The judge: the policy's verdict on the changes a node holds of one record, and the
//! record (document, durable heads, quarantine) that follows from it. The verdicts are
//! pure functions of the changes held and the policy, so every honest node computes the
//! same result from the same held set, whatever the order things arrived in. [`Judge`]
//! applies them to the records through the borrows it is given.

use std::collections::{BTreeMap, BTreeSet};

use crdt_schema::policy::{self, Policy, RejectReason};
use crdt_schema::{
    Change, ChangeHash, Envelope, Identity, NodeId, OrgId, RecordDoc, VerifiedChange,
};

use crate::admit::author_verdict;
use crate::api::Event;
use crate::limits::{QUARANTINE_PER_AUTHOR_MAX, QUARANTINE_PER_RECORD_MAX, QUARANTINE_TOTAL_MAX};
use crate::outbox::Outbox;
use crate::pipeline::WholeDocument;
use crate::records::{Quarantined, Records};
use crate::status::Counters;
use crate::time::Instant;

/// What re-judging one record changed.
#[derive(Default)]
pub(crate) struct Rejudged {
    /// Changes newly in the accepted set (new arrivals and released quarantine).
    pub(crate) accepted: BTreeSet<ChangeHash>,
    /// Changes newly quarantined, with their author and reason.
    pub(crate) rejected: Vec<(ChangeHash, NodeId, RejectReason)>,
    /// Whether the record's accepted state changed.
    pub(crate) changed: bool,
}

/// What judging reads and changes of the rest of the node, as disjoint borrows.
pub(crate) struct Judge<'a> {
    pub(crate) records: &'a mut Records,
    /// The policy in force, if any.
    pub(crate) policy: Option<&'a Policy>,
    /// This node, to sign again its own changes that land in quarantine.
    pub(crate) identity: &'a Identity,
    pub(crate) org: &'a OrgId,
    pub(crate) now: Instant,
    pub(crate) counters: &'a mut Counters,
    pub(crate) out: &'a mut Outbox,
    /// Records judged while local changes awaited their append: judged again after it.
    pub(crate) rejudge_after_ack: &'a mut BTreeSet<String>,
}

impl Judge<'_> {
    /// Settles newly durable remote changes of one record: applies those the policy
    /// accepts, quarantines the rest. The common case (every change allowed, nothing in
    /// quarantine) applies them directly; anything else re-judges the record whole.
    pub(crate) fn settle(
        &mut self,
        key: &str,
        new: Vec<VerifiedChange>,
        whole: Option<WholeDocument>,
    ) -> Rejudged {
        let collection = new[0].record.collection().to_owned();
        let entry = self
            .records
            .entry(key)
            .expect("the caller created the record");
        let mut direct = entry.quarantine().is_empty()
            && new
                .iter()
                .all(|change| author_verdict(self.policy, &change.author, &collection).is_ok());
        if direct {
            // Each change must continue its author's chain in the document: Automerge
            // panics on a gap and refuses a duplicate. Anything else is judged whole.
            let mut seqs = self.records.author_seqs(key);
            for change in &new {
                let latest = seqs.entry(change.author).or_default();
                if change.change.seq() != *latest + 1 {
                    direct = false;
                    break;
                }
                *latest = change.change.seq();
            }
        }
        if !direct {
            return self.rejudge(key, new);
        }
        // A record new here that came whole takes the document it came in when these are
        // exactly its changes; anything else is applied change by change.
        let entry = self
            .records
            .entry(key)
            .expect("the caller created the record");
        let adopted = whole.filter(|whole| {
            entry.heads().is_empty()
                && entry.unacked().is_empty()
                && whole.hashes.len() == new.len()
                && new
                    .iter()
                    .all(|change| whole.hashes.contains(&change.hash()))
        });
        let adopted = match adopted {
            Some(whole) => {
                self.records.adopt(key, whole.bytes, whole.deleted);
                self.counters.snapshots_taken += 1;
                true
            }
            None => {
                let changes = new.iter().map(|change| change.change.clone()).collect();
                if self.records.doc_mut(key).apply(changes).is_err() {
                    // Crafted bytes Automerge cannot take (the document is untouched):
                    // judged whole, they end in quarantine as damaging, the same on every
                    // node.
                    return self.rejudge(key, new);
                }
                false
            }
        };
        let mut rejudged = Rejudged {
            changed: true,
            ..Rejudged::default()
        };
        for change in &new {
            let hash = change.hash();
            if !adopted && !self.records.doc(key).has_change(&hash) {
                // Queued by Automerge for a missing dependency: cannot happen for changes
                // whose dependencies were checked; judge the record whole rather than trust it.
                self.records.forget_author_seqs(key);
                return self.rejudge(key, Vec::new());
            }
            let deps = change.change.deps().to_vec();
            self.records
                .mark_durable(key, hash, &deps, change.signature());
            self.records
                .note_seq(key, change.author, change.change.seq());
            rejudged.accepted.insert(hash);
        }
        if !adopted {
            self.records.refresh_deleted(key);
        }
        let schema_broken = match self.policy {
            Some(in_force) if in_force.has_schema(&collection) => {
                let doc = self.records.doc(key);
                new.iter().any(|change| {
                    schema_verdict(in_force, &collection, doc, &change.hash()).is_err()
                })
            }
            _ => false,
        };
        if schema_broken {
            let again = self.rejudge(key, Vec::new());
            for (hash, author, reason) in again.rejected {
                rejudged.accepted.remove(&hash);
                rejudged.rejected.push((hash, author, reason));
            }
        }
        rejudged
    }

    /// Judges everything held of one record (its document, its quarantine and `extra`,
    /// newly durable changes) and rebuilds the document if its accepted set changed.
    pub(crate) fn rejudge(&mut self, key: &str, extra: Vec<VerifiedChange>) -> Rejudged {
        self.rejudge_with(key, extra, false)
    }

    /// [`Judge::rejudge`]; `force_replay` replays the whole held history change by
    /// change to find damaging changes (after an accepted set failed to apply).
    fn rejudge_with(
        &mut self,
        key: &str,
        extra: Vec<VerifiedChange>,
        force_replay: bool,
    ) -> Rejudged {
        let me = self.identity.node_id();
        let now = self.now;
        let entry = self.records.entry(key).expect("record exists");
        let record = entry.record().clone();
        let collection = record.collection().to_owned();
        let unacked = entry.unacked().clone();
        let old_quarantine = entry.quarantine().clone();
        if !unacked.is_empty() {
            self.rejudge_after_ack.insert(key.to_owned());
        }
        let mut signatures: BTreeMap<ChangeHash, [u8; 64]> = entry
            .signatures()
            .iter()
            .map(|(hash, signature)| (*hash, *signature))
            .collect();
        let doc_changes = self.records.doc(key).changes_after(&[]);
        let in_doc: BTreeSet<ChangeHash> = doc_changes.iter().map(Change::hash).collect();

        // Everything held: hash → (change, author).
        let mut held: BTreeMap<ChangeHash, (Change, NodeId)> = BTreeMap::new();
        for change in doc_changes {
            let author = NodeId::from_slice(change.actor_id().to_bytes())
                .expect("held changes were verified, so their actor is a node key");
            held.insert(change.hash(), (change, author));
        }
        for (hash, quarantined) in &old_quarantine {
            held.insert(*hash, (quarantined.change.clone(), quarantined.author));
            // Released from quarantine, a change needs its signature beside the document.
            let envelope = &quarantined.envelope;
            if let Some(signature) = envelope
                .len()
                .checked_sub(crdt_schema::change::SIGNATURE_LEN)
                .and_then(|start| <[u8; 64]>::try_from(&envelope[start..]).ok())
            {
                signatures.insert(*hash, signature);
            }
        }
        let mut envelopes: BTreeMap<ChangeHash, Vec<u8>> = BTreeMap::new();
        for change in extra {
            let hash = change.hash();
            signatures.insert(hash, change.signature());
            envelopes.insert(hash, change.envelope.as_bytes().to_vec());
            held.insert(hash, (change.change, change.author));
        }

        // Changes that do not continue their author's chain, and everything built on them:
        // Automerge cannot apply them, so no verdict can accept them.
        let mut broken = broken_history(&held);
        // Changes Automerge cannot take, and everything built on them. Cheap for the common
        // case: the sound changes not yet in the document are tried on a copy of it, and
        // only if that fails is the whole history replayed change by change.
        let trial: Vec<Change> = held
            .iter()
            .filter(|(hash, _)| !in_doc.contains(*hash) && !broken.contains_key(*hash))
            .map(|(_, (change, _))| change.clone())
            .collect();
        if force_replay
            || (!trial.is_empty() && self.records.doc(key).clone().apply(trial).is_err())
        {
            broken.extend(damaging_changes(&me, &held, &broken));
        }

        // The direct verdict on each change, local ones awaiting their append included: a
        // policy that arrived meanwhile may forbid them (their write then fails).
        let in_force = self.policy;
        let full = in_force
            .filter(|in_force| in_force.has_schema(&collection))
            .map(|_| {
                let mut full = RecordDoc::new(&me);
                // Every sound held change's dependencies are held and sound, so all apply.
                let sound = held
                    .iter()
                    .filter(|(hash, _)| !broken.contains_key(*hash))
                    .map(|(_, (change, _))| change.clone())
                    .collect();
                let _ = full.apply(sound);
                full
            });
        let mut verdicts: BTreeMap<ChangeHash, Result<(), RejectReason>> = BTreeMap::new();
        for (hash, (_, author)) in &held {
            let mut verdict = match (broken.get(hash), in_force) {
                (Some(reason), _) => Err(reason.clone()),
                (None, None) => Ok(()),
                (None, Some(in_force)) => policy::judge_author(in_force, author, &collection),
            };
            if verdict.is_ok()
                && let (Some(full), Some(in_force)) = (&full, in_force)
            {
                verdict = schema_verdict(in_force, &collection, full, hash);
            }
            verdicts.insert(*hash, verdict);
        }

        // Accepted: every allowed change and everything it builds on.
        let mut accepted: BTreeSet<ChangeHash> = BTreeSet::new();
        let mut stack: Vec<ChangeHash> = verdicts
            .iter()
            .filter(|(_, verdict)| verdict.is_ok())
            .map(|(hash, _)| *hash)
            .collect();
        while let Some(hash) = stack.pop() {
            if !accepted.insert(hash) {
                continue;
            }
            if let Some((change, _)) = held.get(&hash) {
                stack.extend(change.deps().iter().filter(|dep| held.contains_key(dep)));
            }
        }

        // The document: rebuilt if anything left it, extended if anything joined.
        let leaves = in_doc.iter().any(|hash| !accepted.contains(hash));
        let joins: Vec<Change> = accepted
            .iter()
            .filter(|hash| !in_doc.contains(hash))
            .map(|hash| held[hash].0.clone())
            .collect();
        let changed = leaves || !joins.is_empty();
        // An accepted set is closed under dependencies, with every author's chain whole and
        // unforked, so it applies; if Automerge still refuses, keep the record as it was.
        let applied = if leaves {
            let mut rebuilt = RecordDoc::new(&me);
            let result = rebuilt.apply(accepted.iter().map(|hash| held[hash].0.clone()).collect());
            if result.is_ok() {
                self.records.replace_doc(key, rebuilt);
            }
            result
        } else if !joins.is_empty() {
            let result = self.records.doc_mut(key).apply(joins);
            self.records.forget_author_seqs(key);
            result
        } else {
            Ok(())
        };
        if applied.is_err() && !force_replay {
            // Damage that shows only in the accepted set rebuilt from scratch: find it
            // change by change, and judge again with it set aside.
            let extra: Vec<VerifiedChange> = Vec::new();
            return self.rejudge_with(key, extra, true);
        }
        if let Err(error) = applied {
            self.counters.changes_rejected += 1;
            self.out.emit(Event::ChangeRejected {
                from: me,
                reason: format!("automerge refused the accepted changes of {key}: {error}"),
            });
            return Rejudged::default();
        }

        // The quarantine: everything held and not accepted.
        let mut quarantine = BTreeMap::new();
        let mut rejudged = Rejudged {
            changed,
            ..Rejudged::default()
        };
        for (hash, (change, author)) in &held {
            if accepted.contains(hash) {
                if !in_doc.contains(hash) {
                    rejudged.accepted.insert(*hash);
                }
                continue;
            }
            let reason = verdicts[hash]
                .clone()
                .expect_err("an allowed change is accepted");
            let (envelope, rejected_at) = match old_quarantine.get(hash) {
                Some(old) => (old.envelope.clone(), old.rejected_at),
                None => {
                    let envelope = match (envelopes.get(hash), signatures.get(hash)) {
                        (Some(envelope), _) => envelope.clone(),
                        (None, Some(signature)) => {
                            Envelope::encode(&record, change.raw_bytes(), signature).into_bytes()
                        }
                        // A local change still awaiting its append: its signature is not
                        // stored yet; ed25519 signs deterministically, so sign it again.
                        (None, None) => VerifiedChange::sign(
                            self.identity,
                            self.org,
                            record.clone(),
                            change.clone(),
                        )
                        .envelope
                        .into_bytes(),
                    };
                    rejudged.rejected.push((*hash, *author, reason.clone()));
                    (envelope, now)
                }
            };
            quarantine.insert(
                *hash,
                Quarantined {
                    envelope,
                    change: change.clone(),
                    author: *author,
                    reason,
                    rejected_at,
                },
            );
        }

        // Durable heads: of the accepted changes whose append is done.
        let durable: BTreeSet<ChangeHash> = accepted.difference(&unacked).copied().collect();
        let built_on: BTreeSet<ChangeHash> = durable
            .iter()
            .flat_map(|hash| held[hash].0.deps().iter().copied())
            .collect();
        let heads: Vec<ChangeHash> = durable.difference(&built_on).copied().collect();
        signatures.retain(|hash, _| accepted.contains(hash));

        let quarantine_changed =
            quarantine.len() != old_quarantine.len() || quarantine.keys().ne(old_quarantine.keys());
        self.records.set_judged(key, heads, signatures);
        self.records.set_quarantine(key, quarantine);
        if changed || quarantine_changed {
            self.records.refresh_item(key);
        }
        if changed {
            self.records.refresh_deleted(key);
        }
        if quarantine_changed {
            self.enforce_quarantine_bounds(key);
        }
        rejudged
    }

    /// Brings the quarantine back within its bounds after `key`'s grew, per record, per
    /// author and in all, by dropping the changes with the highest hashes (and what builds
    /// on them). Which changes are held is then a function of the changes seen, not of
    /// the order they came in: nodes that a member floods with different changes hold the
    /// same ones once they have exchanged theirs, and their digests agree.
    pub(crate) fn enforce_quarantine_bounds(&mut self, key: &str) {
        let mut dropped = 0;
        while let Some(top) = self
            .records
            .entry(key)
            .filter(|entry| entry.quarantine().len() > QUARANTINE_PER_RECORD_MAX)
            .and_then(|entry| entry.quarantine().keys().next_back().copied())
        {
            dropped += self.records.evict_quarantined(key, top);
        }
        let authors: BTreeSet<NodeId> = self
            .records
            .entry(key)
            .map(|entry| {
                entry
                    .quarantine()
                    .values()
                    .map(|held| held.author)
                    .collect()
            })
            .unwrap_or_default();
        for author in authors {
            while self.records.quarantined_by(&author) > QUARANTINE_PER_AUTHOR_MAX {
                let (top, record) = self
                    .records
                    .highest_quarantined_by(&author)
                    .cloned()
                    .expect("over the bound, so some are held");
                dropped += self.records.evict_quarantined(&record, top);
            }
        }
        while self.records.quarantined_total() > QUARANTINE_TOTAL_MAX {
            let (top, record) = self
                .records
                .highest_quarantined()
                .cloned()
                .expect("over the bound, so some are held");
            dropped += self.records.evict_quarantined(&record, top);
        }
        self.counters.changes_dropped += dropped as u64;
    }
}

/// For Kahn's order over the held changes: how many held dependencies each change waits
/// for, and which held changes depend on each.
#[allow(clippy::type_complexity)]
fn dependency_graph(
    held: &BTreeMap<ChangeHash, (Change, NodeId)>,
) -> (
    BTreeMap<ChangeHash, usize>,
    BTreeMap<ChangeHash, Vec<ChangeHash>>,
) {
    let mut waiting: BTreeMap<ChangeHash, usize> = BTreeMap::new();
    let mut dependants: BTreeMap<ChangeHash, Vec<ChangeHash>> = BTreeMap::new();
    for (hash, (change, _)) in held {
        let deps: Vec<ChangeHash> = change
            .deps()
            .iter()
            .filter(|dep| held.contains_key(*dep))
            .copied()
            .collect();
        waiting.insert(*hash, deps.len());
        for dep in deps {
            dependants.entry(dep).or_default().push(*hash);
        }
    }
    (waiting, dependants)
}

/// The sound held changes (not in `broken`) that Automerge cannot take, applied one at a
/// time in dependency order (ties by hash, so every node replays alike), and everything
/// built on them.
pub(crate) fn damaging_changes(
    me: &NodeId,
    held: &BTreeMap<ChangeHash, (Change, NodeId)>,
    broken: &BTreeMap<ChangeHash, RejectReason>,
) -> BTreeMap<ChangeHash, RejectReason> {
    let mut damaging: BTreeMap<ChangeHash, RejectReason> = BTreeMap::new();
    let (mut waiting, dependants) = dependency_graph(held);
    let mut ready: BTreeSet<ChangeHash> = waiting
        .iter()
        .filter(|(_, count)| **count == 0)
        .map(|(hash, _)| *hash)
        .collect();
    let mut scratch = RecordDoc::new(me);
    while let Some(hash) = ready.pop_first() {
        let (change, author) = &held[&hash];
        let dep_bad = change
            .deps()
            .iter()
            .any(|dep| damaging.contains_key(dep) || broken.contains_key(dep));
        if !broken.contains_key(&hash) {
            let problem = if dep_bad {
                Some("it builds on a change that cannot be applied".to_owned())
            } else {
                scratch
                    .apply(vec![change.clone()])
                    .err()
                    .map(|error| error.to_string())
            };
            if let Some(problem) = problem {
                damaging.insert(
                    hash,
                    RejectReason::Damaging {
                        author: *author,
                        problem,
                    },
                );
            }
        }
        for next in dependants.get(&hash).into_iter().flatten() {
            let count = waiting.get_mut(next).expect("counted above");
            *count -= 1;
            if *count == 0 {
                ready.insert(*next);
            }
        }
    }
    damaging
}

/// The held changes that do not continue their author's chain, with why: a sequence number
/// that is not one more than the author's latest in the change's own history, a number two
/// held changes of one author share (a fork), or a dependency that is itself broken. A pure
/// function of the held set.
pub(crate) fn broken_history(
    held: &BTreeMap<ChangeHash, (Change, NodeId)>,
) -> BTreeMap<ChangeHash, RejectReason> {
    let reason = |change: &Change, author: &NodeId| RejectReason::BrokenHistory {
        author: *author,
        seq: change.seq(),
    };
    let mut broken: BTreeMap<ChangeHash, RejectReason> = BTreeMap::new();
    let mut by_position: BTreeMap<(NodeId, u64), Vec<ChangeHash>> = BTreeMap::new();
    for (hash, (change, author)) in held {
        by_position
            .entry((*author, change.seq()))
            .or_default()
            .push(*hash);
    }
    for hashes in by_position.values().filter(|hashes| hashes.len() > 1) {
        for hash in hashes {
            let (change, author) = &held[hash];
            broken.insert(*hash, reason(change, author));
        }
    }
    // Dependencies first (Kahn's order); each change learns its authors' latest numbers in
    // its own history.
    let (mut waiting, dependants) = dependency_graph(held);
    let mut ready: Vec<ChangeHash> = waiting
        .iter()
        .filter(|(_, count)| **count == 0)
        .map(|(hash, _)| *hash)
        .collect();
    let mut latest: BTreeMap<ChangeHash, BTreeMap<NodeId, u64>> = BTreeMap::new();
    while let Some(hash) = ready.pop() {
        let (change, author) = &held[&hash];
        let mut history: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut dep_broken = false;
        for dep in change.deps().iter().filter(|dep| held.contains_key(*dep)) {
            dep_broken |= broken.contains_key(dep);
            for (who, seq) in latest.get(dep).into_iter().flatten() {
                let entry = history.entry(*who).or_default();
                *entry = (*entry).max(*seq);
            }
        }
        let before = history.get(author).copied().unwrap_or(0);
        if dep_broken || change.seq() != before + 1 {
            broken.insert(hash, reason(change, author));
        }
        let own = history.entry(*author).or_default();
        *own = (*own).max(change.seq());
        latest.insert(hash, history);
        for next in dependants.get(&hash).into_iter().flatten() {
            let count = waiting.get_mut(next).expect("counted above");
            *count -= 1;
            if *count == 0 {
                ready.push(*next);
            }
        }
    }
    broken
}

/// Whether the record as of `hash` (the change and its history) follows the collection's
/// schema: a verdict that does not depend on what arrived later.
pub(crate) fn schema_verdict(
    policy: &Policy,
    collection: &str,
    doc: &RecordDoc,
    hash: &ChangeHash,
) -> Result<(), RejectReason> {
    match doc.state_at(&[*hash]) {
        Ok((fields, deleted)) => policy::judge_schema(policy, collection, &fields, deleted),
        Err(error) => Err(RejectReason::Schema {
            collection: collection.to_owned(),
            errors: vec![error.to_string()],
        }),
    }
}
