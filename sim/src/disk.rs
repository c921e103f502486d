//! A simulated disk: the durable log and saved records, and the requests in flight, which
//! complete in order after their fsync latency and are lost (the oldest append possibly
//! torn) when the node crashes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use crdt_schema::RecordId;
use mesh_core::storage::{
    DocumentStore, Restore, SavedRecord, StorageError, StorageOpId, StorageRequest,
};

use crate::world::Ms;

/// A node's disk: what is durable, and the requests not yet complete.
#[derive(Default)]
pub(crate) struct Disk {
    log: VecDeque<Vec<u8>>,
    /// Entries ever appended; `log` holds the last `log.len()` of them.
    log_appended: u64,
    /// The saved records, shared with the node's [`DocumentStore`] as sled is in the daemon.
    saved: Arc<Mutex<BTreeMap<RecordId, SavedRecord>>>,
    /// The signed policy stored with the last checkpoint that carried one.
    policy: Option<Vec<u8>>,
    in_flight: VecDeque<(StorageOpId, StorageRequest, u64)>,
    busy_until: Ms,
}

impl Disk {
    /// Queues a request at `now` taking `fsync` ms once the disk is free; returns when it
    /// completes.
    pub(crate) fn request(
        &mut self,
        op: StorageOpId,
        request: StorageRequest,
        now: Ms,
        fsync: Ms,
    ) -> Ms {
        let done = self.busy_until.max(now) + fsync;
        self.busy_until = done;
        let appended = self.log_appended;
        self.in_flight.push_back((op, request, appended));
        done
    }

    /// Completes the oldest request in flight; returns its op.
    pub(crate) fn complete(&mut self) -> StorageOpId {
        let (op, request, appended_before) = self
            .in_flight
            .pop_front()
            .expect("a completion follows a request");
        match request {
            StorageRequest::Append { envelopes } => {
                self.log_appended += envelopes.len() as u64;
                self.log.extend(envelopes);
            }
            StorageRequest::Checkpoint {
                records,
                compact_log,
                policy,
            } => {
                if policy.is_some() {
                    self.policy = policy;
                }
                let mut saved = self.saved.lock().expect("the simulator is one thread");
                for record in records {
                    saved.insert(record.record.clone(), record);
                }
                if compact_log {
                    // Drop the entries of appends completed before the request.
                    let dropped_before = self.log_appended - self.log.len() as u64;
                    let drop = appended_before.saturating_sub(dropped_before) as usize;
                    self.log.drain(..drop.min(self.log.len()));
                }
            }
        }
        op
    }

    /// The node crashed at `now`: requests not complete are lost; if `torn`, the oldest
    /// append leaves a prefix (its length picked by `keep`).
    pub(crate) fn crash(&mut self, torn: bool, keep: u64, now: Ms) {
        let lost = std::mem::take(&mut self.in_flight);
        if torn && let Some((_, StorageRequest::Append { envelopes }, _)) = lost.into_iter().next()
        {
            let survivors = (keep % envelopes.len() as u64) as usize;
            self.log_appended += survivors as u64;
            self.log.extend(envelopes.into_iter().take(survivors));
        }
        self.busy_until = now;
    }

    /// What a starting node reads back: the index of the saved records (their documents
    /// are read through [`Disk::documents`]), the log and the policy.
    pub(crate) fn restore(&self) -> Restore {
        let saved = self.saved.lock().expect("the simulator is one thread");
        Restore {
            records: Vec::new(),
            index: saved
                .values()
                .map(|record| record.clone().split().0)
                .collect(),
            log: self.log.iter().cloned().collect(),
            policy: self.policy.clone(),
        }
    }

    /// The node's read port into the saved documents.
    pub(crate) fn documents(&self) -> Box<dyn DocumentStore> {
        Box::new(SavedDocuments(self.saved.clone()))
    }

    /// Stores a signed policy, as `mesh policy apply` before the run.
    pub(crate) fn store_policy(&mut self, signed: Vec<u8>) {
        self.policy = Some(signed);
    }
}

/// A node's reads of its simulated disk's saved documents: what completed checkpoints
/// wrote, as sled answers the daemon.
struct SavedDocuments(Arc<Mutex<BTreeMap<RecordId, SavedRecord>>>);

impl DocumentStore for SavedDocuments {
    fn document(&self, record: &RecordId) -> Result<Option<Vec<u8>>, StorageError> {
        let saved = self.0.lock().expect("the simulator is one thread");
        Ok(saved.get(record).map(|saved| saved.document.clone()))
    }
}
