//! The invariants a run must keep, checked as it goes, not only at the end.
//!
//! - **bad-signature-persisted**: every envelope any node appends to its log carries a valid
//!   signature by the change's author (each distinct envelope is verified once, here,
//!   independently of the node's own verification).
//! - **queue-bound**: every queue that grows with peer input stays within its limit.
//! - **stalled-session**: no session goes without progress past the stall timeout (it must
//!   have been dropped and restarted by then).
//! - **acked-write-lost**: once digests are equal after healing, every acknowledged change is
//!   held by every node.
//! - **quarantine-diverged**: equal digests come with equal quarantines.
//! - **convergence**: all digests equal within the healing bound.
//! - **timer-not-advanced**: after a tick, no deadline is still due (checked in the world).
//! - **counter-mismatch**: at convergence, every counter the workload touched shows on every
//!   node what [`counter_from_changes`] computes from the record's changes (checked in the
//!   world).

use std::collections::BTreeSet;
use std::time::Duration;

use crdt_schema::{ChangeHash, OrgId, RecordId};
use mesh_core::limits::{
    HISTORY_ENTRIES_MAX, PEERS_MAX, PENDING_CHANGES_MAX, PIPELINE_REMOTE_CHANGES_MAX,
    SESSION_DEFERRED_MAX,
};
use mesh_core::{Config, Instant, Queues};
use sha2::{Digest as _, Sha256};

use crate::world::SimNode;

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
    now_ms: u64,
}

impl Checkers {
    /// Records the first failure.
    pub fn fail(&mut self, failure: Failure) {
        if self.failure.is_none() {
            self.failure = Some(failure);
        }
    }

    /// Whether the honest nodes (`honest[i]`) have converged: every one is up with node
    /// 0's digest and, under the policy workload, the administrator's latest policy
    /// (`issued`) in force. Once they have, equal digests must come with equal quarantines
    /// (**quarantine-diverged**) and every acknowledged write on every node
    /// (**acked-write-lost**); either failure is recorded and the run is not converged.
    pub fn converged(
        &mut self,
        nodes: &[Option<&dyn SimNode>],
        honest: &[bool],
        issued: Option<u64>,
        now_ms: u64,
    ) -> bool {
        let Some(first) = nodes[0].map(|node| node.digest()) else {
            return false;
        };
        let all_equal = nodes
            .iter()
            .enumerate()
            .all(|(index, node)| !honest[index] || node.is_some_and(|node| node.digest() == first));
        if !all_equal {
            return false;
        }
        if let Some(issued) = issued {
            let everywhere = nodes.iter().enumerate().all(|(index, node)| {
                !honest[index]
                    || node
                        .and_then(|node| node.policy())
                        .is_some_and(|policy| policy.version == issued)
            });
            if !everywhere {
                return false;
            }
        }
        let quarantine = nodes[0].map(|node| node.quarantined());
        for (index, node) in nodes.iter().enumerate() {
            if !honest[index] {
                continue;
            }
            let held = node.map(|node| node.quarantined());
            if held != quarantine {
                let message = format!(
                    "node {index} and node 0 have equal digests but different quarantines: {} and {} changes",
                    held.map_or(0, |held| held.len()),
                    quarantine.as_ref().map_or(0, Vec::len)
                );
                self.fail(Failure {
                    checker: "quarantine-diverged",
                    message,
                    at_ms: now_ms,
                });
                return false;
            }
        }
        for (record, hash, writer) in &self.acked {
            if !honest[*writer] {
                continue;
            }
            for (index, node) in nodes.iter().enumerate() {
                if !honest[index] {
                    continue;
                }
                let node = node.expect("all alive when equal");
                if !node.holds_change(record, hash) {
                    let message = format!(
                        "node {index} lacks change {hash} to {record}, acknowledged by node {writer}, though all digests are equal"
                    );
                    let failure = Failure {
                        checker: "acked-write-lost",
                        message,
                        at_ms: now_ms,
                    };
                    if self.failure.is_none() {
                        self.failure = Some(failure);
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Checks envelopes a node asks to append.
    pub fn appended(&mut self, node: usize, org: &OrgId, envelopes: &[Vec<u8>]) -> Option<Failure> {
        for bytes in envelopes {
            let digest: [u8; 32] = Sha256::digest(bytes).into();
            if self.verified.contains(&digest) {
                continue;
            }
            match independent::verify(org, bytes) {
                Ok(()) => {
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
                "bytes of loaded documents",
                queues.loaded_document_bytes,
                // One document may exceed the cache on its own; two may not.
                if queues.loaded_documents <= 1 {
                    usize::MAX
                } else {
                    config.document_cache_bytes
                },
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

/// Signature checks that share no code with the nodes': the envelope and the change's
/// header are read here, from the formats' definitions, and the signature is checked with
/// another crate (ed25519-zebra, ZIP 215: cofactored, canonical `s`) plus the nodes' rule
/// that a small-order key signs nothing. A node whose own check were broken (accepting
/// every signature, say) would append what this refuses.
pub mod independent {
    use crdt_schema::OrgId;
    use sha2::{Digest as _, Sha256};

    /// Checks one envelope as a node must have before appending it.
    pub fn verify(org: &OrgId, envelope: &[u8]) -> Result<(), String> {
        // [version 1][record len u16 BE][record][change len u32 BE][change][signature 64]
        let (&version, rest) = envelope.split_first().ok_or("empty envelope")?;
        if version != 1 {
            return Err(format!("envelope version {version}"));
        }
        let (record, rest) = take_prefixed::<2>(rest)?;
        let (change, signature) = take_prefixed::<4>(rest)?;
        let signature: [u8; 64] = signature
            .try_into()
            .map_err(|_| "the signature is not 64 bytes".to_owned())?;
        let author = change_actor(change)?;
        // The change hash: SHA-256 over the chunk after its magic and checksum.
        let hash: [u8; 32] = Sha256::digest(&change[8..]).into();
        let mut message = b"mesh/change/v1".to_vec();
        message.extend_from_slice(org.as_bytes());
        message.extend_from_slice(&(record.len() as u16).to_be_bytes());
        message.extend_from_slice(record);
        message.extend_from_slice(&hash);
        let small_order = curve25519_dalek::edwards::CompressedEdwardsY(author)
            .decompress()
            .is_none_or(|point| point.is_small_order());
        if small_order {
            return Err("the author key is not a valid, large-order point".into());
        }
        let key = ed25519_zebra::VerificationKey::try_from(author)
            .map_err(|error| format!("author key: {error}"))?;
        key.verify(&ed25519_zebra::Signature::from_bytes(&signature), &message)
            .map_err(|error| format!("signature: {error}"))
    }

    fn take_prefixed<const N: usize>(bytes: &[u8]) -> Result<(&[u8], &[u8]), String> {
        let (length, rest) = bytes.split_at_checked(N).ok_or("truncated length")?;
        let mut be = [0u8; 8];
        be[8 - N..].copy_from_slice(length);
        let length = u64::from_be_bytes(be) as usize;
        rest.split_at_checked(length)
            .ok_or_else(|| "truncated field".to_owned())
    }

    /// The actor id in an uncompressed Automerge change chunk: `magic(4) checksum(4)
    /// type(1) uleb(body length)`, then the body `deps (uleb count, 32 bytes each), actor
    /// (uleb length, bytes), …`.
    fn change_actor(change: &[u8]) -> Result<[u8; 32], String> {
        if change.len() < 9 || change[..4] != [0x85, 0x6f, 0x4a, 0x83] || change[8] != 1 {
            return Err("not an uncompressed change chunk".into());
        }
        let mut at = 9;
        let _body_length = uleb(change, &mut at)?;
        let deps = uleb(change, &mut at)? as usize;
        at = deps
            .checked_mul(32)
            .and_then(|bytes| at.checked_add(bytes))
            .ok_or("dependency count overflows")?;
        let actor_length = uleb(change, &mut at)? as usize;
        if actor_length != 32 {
            return Err(format!(
                "an actor id of {actor_length} bytes is not a node key"
            ));
        }
        change
            .get(at..at + 32)
            .and_then(|actor| actor.try_into().ok())
            .ok_or_else(|| "truncated actor id".to_owned())
    }

    fn uleb(bytes: &[u8], at: &mut usize) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in 0..10 {
            let byte = *bytes.get(*at).ok_or("truncated number")?;
            *at += 1;
            value |= u64::from(byte & 0x7f) << (7 * shift);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a number over 64 bits".into())
    }
}

/// What a record's counter field shows, recomputed from the record's changes by the
/// simulator's own reading of Automerge's rules, not by loading a document: of the root
/// assignments of `field` (puts and deletes) that no later assignment lists as its
/// predecessor, the one with the greatest op id (counter, then actor bytes) wins; a
/// counter's value is its initial value plus every increment whose predecessors include
/// it. `None` when the field is absent or the winner is not a counter.
pub fn counter_from_changes(changes: &[Vec<u8>], field: &str) -> Result<Option<i64>, String> {
    use automerge::legacy::{Key, ObjectId, OpType};
    type OpKey = (u64, Vec<u8>);
    let mut assigned: Vec<(OpKey, Option<i64>)> = Vec::new();
    let mut overwritten: BTreeSet<OpKey> = BTreeSet::new();
    let mut increments: Vec<(Vec<OpKey>, i64)> = Vec::new();
    for bytes in changes {
        let change = automerge::Change::from_bytes(bytes.clone())
            .map_err(|error| format!("a held change does not parse: {error}"))?
            .decode();
        let actor = change.actor_id.to_bytes().to_vec();
        for (index, op) in change.operations.iter().enumerate() {
            let on_field = matches!(op.obj, ObjectId::Root)
                && matches!(&op.key, Key::Map(name) if name.as_str() == field);
            if !on_field {
                continue;
            }
            let id = (change.start_op.get() + index as u64, actor.clone());
            let pred: Vec<OpKey> = op
                .pred
                .iter()
                .map(|pred| (pred.0, pred.1.to_bytes().to_vec()))
                .collect();
            match &op.action {
                OpType::Increment(amount) => increments.push((pred, *amount)),
                action => {
                    let counter = match action {
                        OpType::Put(automerge::ScalarValue::Counter(counter)) => {
                            Some(i64::from(counter))
                        }
                        _ => None,
                    };
                    overwritten.extend(pred);
                    if !matches!(action, OpType::Delete) {
                        assigned.push((id, counter));
                    }
                }
            }
        }
    }
    let winner = assigned
        .into_iter()
        .filter(|(id, _)| !overwritten.contains(id))
        .max_by(|a, b| a.0.cmp(&b.0));
    let Some((winner, Some(initial))) = winner else {
        return Ok(None);
    };
    let added: i64 = increments
        .iter()
        .filter(|(pred, _)| pred.contains(&winner))
        .map(|(_, amount)| *amount)
        .fold(0i64, |sum, amount| sum.wrapping_add(amount));
    Ok(Some(initial.wrapping_add(added)))
}
