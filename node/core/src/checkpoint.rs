//! Checkpoints: when the next one is due, which records and policy the one in flight
//! saves, and the `ApplyPolicy` commands that wait for the policy to be durable.
//!
//! A checkpoint saves every dirty record whose changes are all acknowledged (a record with
//! a local change still in the log is left for the next one, and the log is then not
//! compacted), and the policy in force when it is not saved yet. A failed checkpoint marks
//! its records dirty again and the node schedules another.

use crdt_schema::policy::SignedPolicy;

use crate::api::{CommandError, CommandId, PolicyOffer, Reply};
use crate::outbox::Outbox;
use crate::records::Records;
use crate::storage::{
    SavedQuarantined, SavedRecord, Signature, StorageError, StorageOpId, StorageOps, StorageRequest,
};
use crate::time::Instant;

/// The checkpoint part.
#[derive(Default)]
pub(crate) struct Checkpoints {
    due: Option<Instant>,
    /// The checkpoint in flight and the records it saves.
    in_flight: Option<(StorageOpId, Vec<String>)>,
    /// Whether the policy in force must ride along with the next checkpoint.
    policy_unsaved: bool,
    /// The checkpoint carrying the policy, so a failure can retry it, and the
    /// `ApplyPolicy` commands it answers once durable.
    policy_in_flight: Option<(StorageOpId, Vec<(CommandId, PolicyOffer)>)>,
    /// `ApplyPolicy` commands whose policy is in force but not yet in a checkpoint: they
    /// are answered only when it is durable, so an acknowledged policy survives a crash.
    policy_unsaved_commands: Vec<(CommandId, PolicyOffer)>,
}

/// What the node needs of the policy in force to save it.
pub(crate) struct PolicyToSave<'a> {
    pub(crate) signed: &'a SignedPolicy,
    pub(crate) hash: [u8; 32],
}

impl Checkpoints {
    /// A new policy is in force: the next checkpoint saves it.
    pub(crate) fn policy_changed(&mut self) {
        self.policy_unsaved = true;
    }

    /// Whether the policy in force is not durable yet (unsaved, or its save in flight).
    pub(crate) fn policy_pending(&self) -> bool {
        self.policy_unsaved || self.policy_in_flight.is_some()
    }

    /// When the next checkpoint must start, if none is in flight.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.due.filter(|_| self.in_flight.is_none())
    }

    /// Whether a checkpoint is due at `now` and none is in flight.
    pub(crate) fn is_due(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|due| due <= now)
    }

    /// Schedules a checkpoint `interval` from `now` if something needs saving and none is
    /// scheduled.
    pub(crate) fn schedule(
        &mut self,
        records: &Records,
        now: Instant,
        interval: std::time::Duration,
    ) {
        if self.due.is_none()
            && (self.policy_unsaved || records.iter().any(|entry| entry.is_dirty()))
        {
            self.due = Some(now + interval);
        }
    }

    /// Whether `op` is the checkpoint in flight.
    pub(crate) fn owns(&self, op: StorageOpId) -> bool {
        self.in_flight.as_ref().is_some_and(|(id, _)| *id == op)
    }

    /// Starts a checkpoint of what needs saving; returns whether there was anything to save
    /// (when not, the caller schedules the next one).
    pub(crate) fn start(
        &mut self,
        records: &mut Records,
        policy: Option<PolicyToSave<'_>>,
        ops: &mut StorageOps,
        out: &mut Outbox,
    ) -> bool {
        let keys: Vec<String> = records
            .iter()
            .filter(|entry| entry.is_dirty() && !entry.has_unacked())
            .map(|entry| entry.record().as_str().to_owned())
            .collect();
        let compact_log = !records
            .iter()
            .any(|entry| entry.is_dirty() && entry.has_unacked());
        self.due = None;
        let judged_under = policy.as_ref().map(|in_force| in_force.hash);
        let policy = policy
            .filter(|_| self.policy_unsaved)
            .map(|in_force| serde_json::to_vec(in_force.signed).expect("policies serialise"));
        if keys.is_empty() && policy.is_none() {
            return false;
        }
        self.policy_unsaved = false;
        let mut saved = Vec::with_capacity(keys.len());
        for key in &keys {
            let document = records.document_bytes(key);
            records.mark_clean(key);
            let entry = records.entry(key).expect("listed above");
            saved.push(SavedRecord {
                record: entry.record().clone(),
                heads: entry.heads().iter().map(|hash| hash.0).collect(),
                document,
                signatures: entry
                    .signatures()
                    .iter()
                    .map(|(hash, signature)| (hash.0, Signature(*signature)))
                    .collect(),
                quarantine: entry
                    .quarantine()
                    .values()
                    .map(|held| SavedQuarantined {
                        envelope: held.envelope.clone(),
                        reason: serde_json::to_string(&held.reason).expect("reasons serialise"),
                        rejected_at_ms: held.rejected_at.as_millis(),
                    })
                    .collect(),
                judged_under,
                deleted: Some(entry.is_deleted()),
            });
        }
        let op = ops.next();
        let saved_policy = policy.is_some();
        out.storage(
            op,
            StorageRequest::Checkpoint {
                records: saved,
                compact_log,
                policy,
            },
        );
        if saved_policy {
            let commands = std::mem::take(&mut self.policy_unsaved_commands);
            self.policy_in_flight = Some((op, commands));
        }
        self.in_flight = Some((op, keys));
        true
    }

    /// Answers `id` once the policy in force is durable; returns whether a checkpoint must
    /// be started now for that (none is in flight). Otherwise one is made due at `now`.
    pub(crate) fn answer_when_policy_saved(
        &mut self,
        id: CommandId,
        offer: PolicyOffer,
        now: Instant,
        out: &mut Outbox,
    ) -> bool {
        if !self.policy_unsaved {
            // The policy in force is saved, or being saved by the checkpoint in flight.
            match &mut self.policy_in_flight {
                Some((_, commands)) => commands.push((id, offer)),
                None => out.complete(id, Ok(Reply::PolicyOffered(offer))),
            }
            return false;
        }
        self.policy_unsaved_commands.push((id, offer));
        if self.in_flight.is_none() {
            return true;
        }
        self.due = Some(now);
        false
    }

    /// The checkpoint `op` (which [`Checkpoints::owns`]) completed: answers the policy
    /// commands it carried; on failure marks its records dirty again and returns the
    /// error, for the node to count, reschedule and report.
    pub(crate) fn complete(
        &mut self,
        op: StorageOpId,
        result: Result<(), StorageError>,
        records: &mut Records,
        out: &mut Outbox,
    ) -> Option<StorageError> {
        let Some((_, keys)) = self.in_flight.take_if(|(id, _)| *id == op) else {
            unreachable!("complete is called only for the checkpoint in flight");
        };
        let answered = self
            .policy_in_flight
            .take_if(|(saved, _)| *saved == op)
            .map(|(_, commands)| commands);
        if let Some(commands) = answered {
            for (id, offer) in commands {
                let reply = match &result {
                    Ok(()) => Ok(Reply::PolicyOffered(offer)),
                    Err(error) => Err(CommandError::Storage(format!(
                        "the policy is in force but could not be saved ({}); it is saved again at the next checkpoint, or apply it again",
                        error.0
                    ))),
                };
                out.complete(id, reply);
            }
            if result.is_err() {
                self.policy_unsaved = true;
            }
        }
        let Err(error) = result else {
            records.mark_persisted(&keys);
            return None;
        };
        for key in keys {
            records.mark_dirty(&key);
        }
        Some(error)
    }
}
