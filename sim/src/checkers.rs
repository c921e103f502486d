//! The invariants a run must keep, checked as it goes, not only at the end.
//!
//! - **bad-signature-persisted**: every envelope any node appends to its log carries a valid
//!   signature by the change's author (each distinct envelope is verified once, here,
//!   independently of the node's own verification).
//! - **queue-bound**: every queue that grows with peer input stays within its limit.
//! - **stalled-session**: no session goes without progress past the stall timeout (it must
//!   have been dropped and restarted by then).
//! - **acked-write-lost**: once digests are equal after healing, every acknowledged change is
//!   held by every node (checked in the world, which knows when digests are equal).
//! - **convergence**: all digests equal within the healing bound.
//! - **timer-not-advanced**: after a tick, no deadline is still due (checked in the world).

use std::collections::BTreeSet;
use std::time::Duration;

use crdt_schema::{ChangeHash, Envelope, OrgId, RecordId};
use mesh_core::limits::{
    HISTORY_ENTRIES_MAX, PEERS_MAX, PENDING_CHANGES_MAX, PIPELINE_REMOTE_CHANGES_MAX,
    SESSION_DEFERRED_MAX,
};
use mesh_core::{Config, Instant, Queues};
use sha2::{Digest as _, Sha256};

/// A checker that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The checker's name.
    pub checker: &'static str,
    /// What it saw.
    pub message: String,
    /// When, in simulated milliseconds.
    pub at_ms: u64,
}

/// State the checkers keep across a run.
#[derive(Default)]
pub struct Checkers {
    /// The first failure; the run stops at it.
    pub failure: Option<Failure>,
    /// Every acknowledged write: record, change, writer.
    pub acked: Vec<(RecordId, ChangeHash, usize)>,
    /// Hashes of envelopes already verified.
    verified: BTreeSet<[u8; 32]>,
    keys: crdt_schema::KeyCache,
    now_ms: u64,
}

impl Checkers {
    /// Records the first failure.
    pub fn fail(&mut self, failure: Failure) {
        if self.failure.is_none() {
            self.failure = Some(failure);
        }
    }

    /// Checks envelopes a node asks to append.
    pub fn appended(&mut self, node: usize, org: &OrgId, envelopes: &[Vec<u8>]) -> Option<Failure> {
        for bytes in envelopes {
            let digest: [u8; 32] = Sha256::digest(bytes).into();
            if self.verified.contains(&digest) {
                continue;
            }
            match Envelope::from_bytes(bytes.clone()).verify_with(org, &mut self.keys) {
                Ok(_) => {
                    self.verified.insert(digest);
                }
                Err(error) => {
                    let message =
                        format!("node {node} appends a change that fails verification: {error}");
                    return Some(self.failure("bad-signature-persisted", message));
                }
            }
        }
        None
    }

    /// Checks a node's queues after an input at node time `now`.
    pub fn queues(
        &mut self,
        node: usize,
        queues: &Queues,
        now: Instant,
        stall: Duration,
        config: &Config,
    ) -> Option<Failure> {
        let bounds = [
            (
                "pending changes",
                queues.pending_changes,
                PENDING_CHANGES_MAX,
            ),
            (
                "pipelined remote changes",
                queues.pipeline_remote_changes,
                PIPELINE_REMOTE_CHANGES_MAX,
            ),
            ("peers", queues.peers, PEERS_MAX),
            ("history rows", queues.history, HISTORY_ENTRIES_MAX),
            (
                "loaded documents",
                queues.loaded_documents,
                config.loaded_documents_max,
            ),
            (
                "deferred rounds",
                queues.deferred_rounds_max,
                SESSION_DEFERRED_MAX,
            ),
        ];
        for (what, length, limit) in bounds {
            if length > limit {
                return Some(self.failure(
                    "queue-bound",
                    format!("node {node} holds {length} {what}; the limit is {limit}"),
                ));
            }
        }
        if let Some(progress) = queues.oldest_session_progress
            && progress + stall < now
        {
            let idle = (now - progress).as_millis();
            return Some(self.failure(
                "stalled-session",
                format!("node {node} has a session without progress for {idle} ms; the stall timeout is {} ms", stall.as_millis()),
            ));
        }
        None
    }

    /// Sets the simulated time failures are stamped with.
    pub fn set_now(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    fn failure(&self, checker: &'static str, message: String) -> Failure {
        Failure {
            checker,
            message,
            at_ms: self.now_ms,
        }
    }
}
