//! Admission: the one door remote changes come in by, whatever brought them (a push, a
//! sync session, later a bundle). A batch is checked for duplicates by hash before
//! anything else, parsed and verified together (one batch signature check), held to the
//! quarantine bounds, and each change then goes to the pipeline or, while its
//! dependencies are missing, to the pending set. The policy's verdict comes only once a
//! change is durable (judge.rs).

use std::collections::{BTreeMap, BTreeSet};

use crdt_schema::policy::{self, Policy, RejectReason};
use crdt_schema::{ChangeHash, Envelope, NodeId, RecordId, VerifiedChange, VerifyError, snapshot};

use crate::api::Event;
use crate::config::Config;
use crate::history;
use crate::limits::{
    PENDING_BYTES_MAX, PENDING_CHANGE_TTL, PENDING_CHANGES_MAX, QUARANTINE_PEER_WINDOW,
    QUARANTINE_PER_AUTHOR_MAX, QUARANTINE_PER_PEER_PER_WINDOW, QUARANTINE_PER_RECORD_MAX,
    QUARANTINE_TOTAL_MAX, REFUSED_CHANGES_MAX,
};
use crate::outbox::Outbox;
use crate::peers::Peer;
use crate::pipeline::{Origin, Pipeline, WholeDocument};
use crate::records::Records;
use crate::status::{Counters, RefusedChange};
use crate::time::Instant;
use crate::wire::{Message, Snapshot};

/// The admission part: the verifying-key cache and the changes waiting for their
/// dependencies.
#[derive(Default)]
pub(crate) struct Admission {
    keys: crdt_schema::change::KeyCache,
    pending: BTreeMap<(String, ChangeHash), PendingChange>,
    /// Envelope bytes held in `pending`, bounded by [`PENDING_BYTES_MAX`].
    pending_bytes: usize,
}

/// A remote change waiting for its dependencies.
struct PendingChange {
    from: NodeId,
    change: VerifiedChange,
    origin: Origin,
    since: Instant,
}

/// What admission reads and changes of the rest of the node, as disjoint borrows.
pub(crate) struct AdmitParts<'a> {
    pub(crate) config: &'a Config,
    pub(crate) policy: Option<&'a Policy>,
    pub(crate) records: &'a mut Records,
    pub(crate) pipeline: &'a mut Pipeline,
    /// The peers, for the sender's counters, its relay budget and its sessions.
    pub(crate) peers: &'a mut BTreeMap<NodeId, Peer>,
    /// The operator's list of changes refused on arrival.
    pub(crate) refused_changes: &'a mut Vec<RefusedChange>,
    pub(crate) counters: &'a mut Counters,
    pub(crate) out: &'a mut Outbox,
    pub(crate) now: Instant,
}

/// What admitting one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AdmitReport {
    /// Changes that failed parsing or verification; each costs the sender its connection.
    pub(crate) refused: usize,
}

impl AdmitReport {
    /// Whether every change of the batch parsed and verified.
    pub(crate) fn all_valid(&self) -> bool {
        self.refused == 0
    }
}

/// Whether the node holds `hash` of record `key`: durable, quarantined, unacknowledged or
/// on its way to the log.
pub(crate) fn holds(records: &Records, pipeline: &Pipeline, key: &str, hash: &ChangeHash) -> bool {
    if pipeline.holds_remote(key, hash) {
        return true;
    }
    match records.entry(key) {
        Some(entry)
            if entry.unacked().contains(hash)
                || entry.signatures().contains_key(hash)
                || entry.quarantine().contains_key(hash) =>
        {
            true
        }
        Some(_) => records.loaded_doc_has(key, hash),
        None => false,
    }
}

/// Whether the node holds every dependency of `change`.
pub(crate) fn deps_held(records: &Records, pipeline: &Pipeline, change: &VerifiedChange) -> bool {
    let key = change.record.as_str();
    change
        .change
        .deps()
        .iter()
        .all(|dep| holds(records, pipeline, key, dep))
}

/// The policy's verdict on `author` writing `collection` (always yes without a policy).
pub(crate) fn author_verdict(
    policy: Option<&Policy>,
    author: &NodeId,
    collection: &str,
) -> Result<(), RejectReason> {
    match policy {
        None => Ok(()),
        Some(policy) => policy::judge_author(policy, author, collection),
    }
}

/// Whether a change the policy would reject may be taken into the record's quarantine
/// (bounds against a member flooding records with changes it may not make): while a
/// bound has room, or when the change's hash is lower than the highest held under it,
/// which the judge's quarantine bounds then drop. Changes of the record still on their
/// way to the log count too, so one large message cannot overshoot by much.
pub(crate) fn quarantine_has_room(
    records: &Records,
    pipeline: &Pipeline,
    key: &str,
    author: &NodeId,
    hash: &ChangeHash,
) -> bool {
    let quarantine = records.entry(key).map(|entry| entry.quarantine());
    let held = quarantine.map_or(0, BTreeMap::len);
    let in_flight = pipeline
        .forbidden_changes(key)
        .take(QUARANTINE_PER_RECORD_MAX)
        .count();
    let below = |highest: Option<&ChangeHash>| highest.is_some_and(|top| hash < top);
    // Over all records too, per author and in all: per record alone, a member could fill
    // the quarantine of every record it can name.
    (held + in_flight < QUARANTINE_PER_RECORD_MAX
        || below(quarantine.and_then(|held| held.keys().next_back())))
        && (records.quarantined_by(author) + pipeline.forbidden_by(author)
            < QUARANTINE_PER_AUTHOR_MAX
            || below(records.highest_quarantined_by(author).map(|(top, _)| top)))
        && (records.quarantined_total() + pipeline.forbidden_len() < QUARANTINE_TOTAL_MAX
            || below(records.highest_quarantined().map(|(top, _)| top)))
}

impl Admission {
    /// How many changes wait for their dependencies.
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// When the oldest pending change expires.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|pending| pending.since + PENDING_CHANGE_TTL)
            .min()
    }

    /// Drops the pending changes that waited too long for their dependencies (they come
    /// again through reconciliation); returns how many.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let expired: Vec<(String, ChangeHash)> = self
            .pending
            .iter()
            .filter(|(_, pending)| pending.since + PENDING_CHANGE_TTL <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            if let Some(pending) = self.pending.remove(id) {
                self.pending_bytes -= pending.change.envelope.len();
            }
        }
        expired.len()
    }

    /// Admits records that `from` sent whole (snapshots) as `origin`. Each is taken apart
    /// into the envelopes its authors signed (`crdt_schema::snapshot::expand`), and those
    /// are admitted as one batch like any others, so nothing in a document is trusted
    /// because it came in one. A record new to this node whose every change is then queued
    /// keeps the document it came in (`Pipeline::keep_whole`), so that it is not built
    /// change by change and saved again.
    pub(crate) fn admit_whole(
        &mut self,
        from: NodeId,
        snapshots: Vec<Snapshot>,
        origin: Origin,
        parts: &mut AdmitParts<'_>,
    ) -> AdmitReport {
        let mut report = AdmitReport::default();
        let mut envelopes = Vec::new();
        let mut new_here = Vec::new();
        for snapshot in snapshots {
            let record: RecordId = match snapshot.record.parse() {
                Ok(record) => record,
                Err(error) => {
                    let error = VerifyError::Record(format!("{}: {error}", snapshot.record));
                    refuse(from, &error, parts);
                    report.refused += 1;
                    continue;
                }
            };
            if !parts.config.replicates(record.collection()) {
                continue;
            }
            let signatures: Vec<[u8; 64]> = snapshot.signatures.iter().map(|s| s.0).collect();
            let expanded = match snapshot::expand(&record, &snapshot.document, &signatures) {
                Ok(expanded) => expanded,
                Err(error) => {
                    let error = VerifyError::Change(format!("{}: {error}", snapshot.record));
                    refuse(from, &error, parts);
                    report.refused += 1;
                    continue;
                }
            };
            let key = snapshot.record;
            let is_new = parts.records.entry(&key).is_none()
                && !parts.pipeline.holds_record(&key)
                && !self.pending_holds_record(&key);
            envelopes.extend(expanded.envelopes.into_iter().map(Envelope::into_bytes));
            if is_new {
                let whole = WholeDocument {
                    bytes: snapshot.document,
                    hashes: expanded.hashes,
                    deleted: expanded.deleted,
                };
                new_here.push((key, whole));
            }
        }
        report.refused += self.admit(from, envelopes, origin, parts).refused;
        for (key, whole) in new_here {
            if whole
                .hashes
                .iter()
                .all(|hash| parts.pipeline.holds_remote(&key, hash))
            {
                parts.pipeline.keep_whole(key, whole);
            }
        }
        report
    }

    /// Whether any change of record `key` waits for its dependencies.
    fn pending_holds_record(&self, key: &str) -> bool {
        self.pending
            .range((key.to_owned(), ChangeHash([0; 32]))..)
            .next()
            .is_some_and(|((held, _), _)| held == key)
    }

    /// Admits one batch of envelopes that `from` sent as `origin`, in order. The valid
    /// changes before and after a refused one are still admitted.
    pub(crate) fn admit(
        &mut self,
        from: NodeId,
        envelopes: Vec<Vec<u8>>,
        origin: Origin,
        parts: &mut AdmitParts<'_>,
    ) -> AdmitReport {
        let mut report = AdmitReport::default();
        if let Some(peer) = parts.peers.get_mut(&from) {
            peer.counters.changes_received += envelopes.len() as u64;
        }
        let mut parsed_all = Vec::new();
        let mut seen: BTreeSet<(String, ChangeHash)> = BTreeSet::new();
        for bytes in envelopes {
            let envelope = Envelope::from_bytes(bytes);
            // A change already held is recognised by its hash before anything else: in a
            // mesh every change arrives from several peers, and verifying costs more than
            // anything else a node does with it.
            if let Some((key, hash)) = envelope.claimed_identity() {
                let key = key.to_owned();
                if holds(parts.records, parts.pipeline, &key, &hash)
                    || self.pending.contains_key(&(key, hash))
                {
                    parts.counters.changes_duplicate += 1;
                    continue;
                }
            }
            let parsed = match envelope.parse() {
                Ok(parsed) => parsed,
                Err(error) => {
                    refuse(from, &error, parts);
                    report.refused += 1;
                    continue;
                }
            };
            if !parts.config.replicates(parsed.record().collection()) {
                continue;
            }
            let id = (parsed.record().as_str().to_owned(), parsed.hash());
            if holds(parts.records, parts.pipeline, &id.0, &id.1)
                || self.pending.contains_key(&id)
                || !seen.insert(id)
            {
                parts.counters.changes_duplicate += 1;
                continue;
            }
            parsed_all.push(parsed);
        }
        let verified = crdt_schema::verify_all(
            &parts.config.org,
            &mut self.keys,
            parts.config.verified_cache.as_ref(),
            parsed_all,
        );
        for result in verified {
            let change = match result {
                Ok(change) => change,
                Err(error) => {
                    refuse(from, &error, parts);
                    report.refused += 1;
                    continue;
                }
            };
            let key = change.record.as_str().to_owned();
            let forbidden =
                author_verdict(parts.policy, &change.author, change.record.collection()).is_err();
            if forbidden
                && (!quarantine_has_room(
                    parts.records,
                    parts.pipeline,
                    &key,
                    &change.author,
                    &change.hash(),
                ) || !relay_of_forbidden_allowed(from, parts))
            {
                // A member flooding records with changes it may not make: held no further.
                // Reconciliation offers what was dropped for the window again later.
                parts.counters.changes_dropped += 1;
                continue;
            }
            if deps_held(parts.records, parts.pipeline, &change) {
                enqueue(from, change, origin, parts);
            } else {
                self.hold_pending(from, change, origin, parts);
            }
        }
        report
    }

    /// Moves pending changes whose dependencies are now held into the pipeline.
    pub(crate) fn release(&mut self, parts: &mut AdmitParts<'_>) {
        loop {
            // Only the dependencies are copied, not the changes (up to 4 MiB each).
            let waiting: Vec<((String, ChangeHash), Vec<ChangeHash>)> = self
                .pending
                .iter()
                .map(|(id, pending)| (id.clone(), pending.change.change.deps().to_vec()))
                .collect();
            let ready: Vec<(String, ChangeHash)> = waiting
                .into_iter()
                .filter(|(id, deps)| {
                    deps.iter()
                        .all(|dep| holds(parts.records, parts.pipeline, &id.0, dep))
                })
                .map(|(id, _)| id)
                .collect();
            if ready.is_empty() {
                return;
            }
            for id in ready {
                let pending = self.pending.remove(&id).expect("listed above");
                self.pending_bytes -= pending.change.envelope.len();
                let change = &pending.change;
                let forbidden =
                    author_verdict(parts.policy, &change.author, change.record.collection())
                        .is_err();
                if forbidden
                    && !quarantine_has_room(
                        parts.records,
                        parts.pipeline,
                        &id.0,
                        &change.author,
                        &id.1,
                    )
                {
                    // The same bound as on arrival (see `admit`).
                    parts.counters.changes_dropped += 1;
                    continue;
                }
                enqueue(pending.from, pending.change, pending.origin, parts);
            }
        }
    }

    fn hold_pending(
        &mut self,
        from: NodeId,
        change: VerifiedChange,
        origin: Origin,
        parts: &mut AdmitParts<'_>,
    ) {
        let bytes = change.envelope.len();
        if self.pending.len() >= PENDING_CHANGES_MAX
            || self.pending_bytes + bytes > PENDING_BYTES_MAX
        {
            // Counted and dropped: reconciliation brings it again once its dependencies
            // are here.
            parts.counters.changes_dropped += 1;
            return;
        }
        let key = change.record.as_str().to_owned();
        let asked = self
            .pending
            .range((key.clone(), ChangeHash([0; 32]))..)
            .next()
            .is_some_and(|((pending, _), _)| pending == &key);
        self.pending_bytes += bytes;
        self.pending.insert(
            (key.clone(), change.hash()),
            PendingChange {
                from,
                change,
                origin,
                since: parts.now,
            },
        );
        if !asked {
            // Ask the sender for what we lack of this record, once per record.
            let need = history::need(parts.records, &key);
            parts.out.send(from, &Message::Need { needs: vec![need] });
        }
    }
}

/// Queues a change whose dependencies are held for the log append.
fn enqueue(from: NodeId, change: VerifiedChange, origin: Origin, parts: &mut AdmitParts<'_>) {
    if parts.pipeline.is_full() {
        parts.counters.changes_dropped += 1;
        return;
    }
    let forbidden =
        author_verdict(parts.policy, &change.author, change.record.collection()).is_err();
    let mut counted = false;
    if let Origin::Session { id, initiator } = origin
        && let Some(session) = parts
            .peers
            .get_mut(&from)
            .and_then(|peer| peer.session_mut(id, initiator))
    {
        session.pipelined_one();
        counted = true;
    }
    parts
        .pipeline
        .queue_remote(from, change, origin, counted, forbidden);
}

/// Whether `from` may relay one more change the policy forbids in this window (and counts
/// it): each costs a log append and a judgement, and a member relaying changes by ever
/// new keys passes every per-author bound. Honest relays of a large quarantine (a node
/// catching up on one) are slowed to this rate, never refused for good.
fn relay_of_forbidden_allowed(from: NodeId, parts: &mut AdmitParts<'_>) -> bool {
    let now = parts.now;
    let Some(peer) = parts.peers.get_mut(&from) else {
        return true;
    };
    let (since, count) = &mut peer.forbidden_relayed;
    if now.saturating_since(*since) >= QUARANTINE_PEER_WINDOW {
        *since = now;
        *count = 0;
    }
    if *count >= QUARANTINE_PER_PEER_PER_WINDOW {
        return false;
    }
    *count += 1;
    true
}

/// Counts, lists and reports a change that failed parsing or verification.
fn refuse(from: NodeId, error: &crdt_schema::VerifyError, parts: &mut AdmitParts<'_>) {
    let refused = &mut *parts.refused_changes;
    if refused.len() >= REFUSED_CHANGES_MAX {
        refused.remove(0);
    }
    refused.push(RefusedChange {
        from,
        reason: error.to_string(),
        at: parts.now,
    });
    parts.counters.changes_rejected += 1;
    if let Some(peer) = parts.peers.get_mut(&from) {
        peer.counters.rejected += 1;
    }
    parts.out.emit(Event::ChangeRejected {
        from,
        reason: error.to_string(),
    });
}
