//! The write pipeline: every change, local or remote, waits here for its log append. At
//! most one append is in flight; everything that arrives meanwhile joins the next one
//! (group commit). The pipeline also remembers which remote changes it holds, so a
//! second copy is recognised, and which of them the policy forbade, toward the
//! quarantine bounds.

use std::collections::{BTreeMap, BTreeSet};

use crdt_schema::{ChangeHash, NodeId, RecordId, VerifiedChange};

use crate::api::{CommandError, CommandId};
use crate::limits::PIPELINE_REMOTE_CHANGES_MAX;
use crate::outbox::Outbox;
use crate::status::Counters;
use crate::storage::{StorageError, StorageOpId, StorageOps, StorageRequest};

/// Where a remote change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Pushed: forward it to other peers once applied.
    Push,
    /// Part of a session, initiated by us (`true`) or the peer.
    Session { id: u64, initiator: bool },
    /// Replayed from the log on start: already durable.
    Log,
}

/// One write waiting for its log append.
pub(crate) enum PipelineEntry {
    Local {
        /// The command to complete; `None` for a change the node makes by itself.
        command: Option<CommandId>,
        record: RecordId,
        change: Option<VerifiedChange>,
    },
    Remote {
        from: NodeId,
        change: VerifiedChange,
        origin: Origin,
        /// Whether the change's session counted it as pipelined (the session may have
        /// been created only after the change arrived, or have ended since).
        counted: bool,
    },
}

#[derive(Default)]
pub(crate) struct Pipeline {
    in_flight: Option<(StorageOpId, Vec<PipelineEntry>)>,
    queued: Vec<PipelineEntry>,
    /// Remote changes queued or in flight, so a second copy is recognised.
    remote: BTreeSet<(String, ChangeHash)>,
    /// Those of them whose author the policy forbade when they arrived: they count toward
    /// their record's quarantine bound before they are settled.
    forbidden: BTreeSet<(String, ChangeHash)>,
    /// How many of `forbidden` each author made, toward the per-author bound.
    forbidden_by_author: BTreeMap<NodeId, usize>,
    /// Records new to this node that came whole (a snapshot), by key: every change of the
    /// record is queued here, and once they are durable the record takes this document
    /// instead of building its own change by change.
    whole: BTreeMap<String, WholeDocument>,
}

/// A snapshot's document, checked on admission, waiting for its changes' append.
pub(crate) struct WholeDocument {
    /// The document as received (one uncompressed document chunk).
    pub(crate) bytes: Vec<u8>,
    /// Every change hash it holds.
    pub(crate) hashes: BTreeSet<ChangeHash>,
    /// Whether the record is deleted in it.
    pub(crate) deleted: bool,
}

impl Pipeline {
    /// Queues a local write; `change` is `None` for a write that changed nothing.
    pub(crate) fn queue_local(
        &mut self,
        command: Option<CommandId>,
        record: RecordId,
        change: Option<VerifiedChange>,
    ) {
        self.queued.push(PipelineEntry::Local {
            command,
            record,
            change,
        });
    }

    /// Whether the pipeline holds as many remote changes as it may.
    pub(crate) fn is_full(&self) -> bool {
        self.remote.len() >= PIPELINE_REMOTE_CHANGES_MAX
    }

    /// Queues a remote change (the caller checked [`Pipeline::is_full`]); `forbidden` says
    /// the policy forbade its author on arrival, `counted` that its session counts it.
    pub(crate) fn queue_remote(
        &mut self,
        from: NodeId,
        change: VerifiedChange,
        origin: Origin,
        counted: bool,
        forbidden: bool,
    ) {
        let id = (change.record.as_str().to_owned(), change.hash());
        if forbidden {
            self.note_forbidden(id.clone(), change.author);
        }
        self.remote.insert(id);
        self.queued.push(PipelineEntry::Remote {
            from,
            change,
            origin,
            counted,
        });
    }

    /// Whether a remote change `hash` of `key` is queued or in flight.
    pub(crate) fn holds_remote(&self, key: &str, hash: &ChangeHash) -> bool {
        self.remote.contains(&(key.to_owned(), *hash))
    }

    /// How many remote changes are queued or in flight.
    pub(crate) fn remote_len(&self) -> usize {
        self.remote.len()
    }

    /// How many writes wait for (or are in) an append.
    pub(crate) fn unflushed_len(&self) -> usize {
        let in_flight = self
            .in_flight
            .as_ref()
            .map_or(0, |(_, entries)| entries.len());
        in_flight + self.queued.len()
    }

    /// Starts the next log append if none is in flight and something is queued. Returns
    /// the entries at once when none of them has a change to write: they are as durable
    /// as what preceded them.
    pub(crate) fn start(
        &mut self,
        ops: &mut StorageOps,
        out: &mut Outbox,
    ) -> Option<Vec<PipelineEntry>> {
        if self.in_flight.is_some() || self.queued.is_empty() {
            return None;
        }
        let entries = std::mem::take(&mut self.queued);
        let envelopes: Vec<Vec<u8>> = entries
            .iter()
            .filter_map(|entry| match entry {
                PipelineEntry::Local { change, .. } => change.as_ref(),
                PipelineEntry::Remote { change, .. } => Some(change),
            })
            .map(|change| change.envelope.as_bytes().to_vec())
            .collect();
        if envelopes.is_empty() {
            return Some(entries);
        }
        let op = ops.next();
        out.storage(op, StorageRequest::Append { envelopes });
        self.in_flight = Some((op, entries));
        None
    }

    /// Whether any change of record `key` waits here.
    pub(crate) fn holds_record(&self, key: &str) -> bool {
        self.remote
            .range((key.to_owned(), ChangeHash([0; 32]))..)
            .next()
            .is_some_and(|(held, _)| held == key)
    }

    /// Keeps a snapshot's document for record `key`, whose every change is queued here.
    pub(crate) fn keep_whole(&mut self, key: String, document: WholeDocument) {
        self.whole.insert(key, document);
    }

    /// The snapshot document kept for `key`, if any.
    pub(crate) fn take_whole(&mut self, key: &str) -> Option<WholeDocument> {
        self.whole.remove(key)
    }

    /// The entries of append `op`, if it is the one in flight.
    pub(crate) fn take_completed(&mut self, op: StorageOpId) -> Option<Vec<PipelineEntry>> {
        self.in_flight
            .take_if(|(id, _)| *id == op)
            .map(|(_, entries)| entries)
    }

    /// Everything queued behind the append in flight (on failure, it fails too).
    pub(crate) fn take_queued(&mut self) -> Vec<PipelineEntry> {
        std::mem::take(&mut self.queued)
    }

    /// An append failed: fails the writes of its `entries` and of every queued entry
    /// (which could build on them) with `error`, and drops their remote changes
    /// (reconciliation brings them again). Returns the local changes to undo, per record.
    pub(crate) fn fail(
        &mut self,
        entries: Vec<PipelineEntry>,
        error: &StorageError,
        out: &mut Outbox,
        counters: &mut Counters,
    ) -> BTreeMap<String, BTreeSet<ChangeHash>> {
        let queued = self.take_queued();
        let mut undone: BTreeMap<String, BTreeSet<ChangeHash>> = BTreeMap::new();
        for entry in entries.into_iter().chain(queued) {
            match entry {
                PipelineEntry::Local {
                    command,
                    change,
                    record,
                    ..
                } => {
                    if let Some(change) = change {
                        undone
                            .entry(record.as_str().to_owned())
                            .or_default()
                            .insert(change.hash());
                    }
                    if let Some(command) = command {
                        out.complete(command, Err(CommandError::Storage(error.0.clone())));
                    }
                }
                PipelineEntry::Remote { change, .. } => {
                    self.settle(&change);
                    self.whole.remove(change.record.as_str());
                    counters.changes_dropped += 1;
                }
            }
        }
        undone
    }

    /// A remote change has left the pipeline (applied, quarantined or dropped).
    pub(crate) fn settle(&mut self, change: &VerifiedChange) {
        let id = (change.record.as_str().to_owned(), change.hash());
        self.settle_forbidden(&id, &change.author);
        self.remote.remove(&id);
    }

    /// How many remote changes by authors the policy forbids are queued for (or in) a log
    /// append, over all records.
    pub(crate) fn forbidden_len(&self) -> usize {
        self.forbidden.len()
    }

    /// How many of those `author` made.
    pub(crate) fn forbidden_by(&self, author: &NodeId) -> usize {
        self.forbidden_by_author.get(author).copied().unwrap_or(0)
    }

    /// The remote changes of one record, by authors the policy forbids, queued for (or in)
    /// a log append.
    pub(crate) fn forbidden_changes<'a>(
        &'a self,
        key: &'a str,
    ) -> impl Iterator<Item = &'a ChangeHash> + 'a {
        self.forbidden
            .range((key.to_owned(), ChangeHash([0; 32]))..)
            .take_while(move |(record, _)| record == key)
            .map(|(_, hash)| hash)
    }

    fn note_forbidden(&mut self, id: (String, ChangeHash), author: NodeId) {
        if self.forbidden.insert(id) {
            *self.forbidden_by_author.entry(author).or_default() += 1;
        }
    }

    fn settle_forbidden(&mut self, id: &(String, ChangeHash), author: &NodeId) {
        if self.forbidden.remove(id)
            && let Some(count) = self.forbidden_by_author.get_mut(author)
        {
            *count -= 1;
            if *count == 0 {
                self.forbidden_by_author.remove(author);
            }
        }
    }
}
