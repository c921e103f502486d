//! What a node reports about itself: status, per-peer state, counters and sync history.
//! These types serialise to the JSON that `mesh status --json` prints.

use std::collections::BTreeMap;

use crdt_schema::NodeId;
use crdt_schema::policy::{Policy, RejectReason};
use serde::{Deserialize, Serialize};

use crate::time::Instant;

/// A peer's connection state, as the PRISMAsync seed shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// The transport reports the peer connected.
    Connected,
    /// The transport is dialling the peer (reported by the driver).
    Connecting,
    /// Not connected.
    Disconnected,
}

/// A node's view of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// This node's id.
    pub node_id: NodeId,
    /// Live (not deleted) records per collection.
    pub records: BTreeMap<String, u64>,
    /// All records, deleted ones included.
    pub records_total: u64,
    /// Digest over every record's durable heads; equal digests mean equal records.
    pub digest: String,
    /// When this node last made a change.
    pub last_local_change: Option<Instant>,
    /// When a change from a peer was last applied.
    pub last_remote_change: Option<Instant>,
    /// When a reconciliation with any peer last completed.
    pub last_sync: Option<Instant>,
    /// Every peer the node knows.
    pub peers: Vec<PeerStatus>,
    /// Event counters since start.
    pub counters: Counters,
    /// Changes waiting for their dependencies.
    pub pending_changes: u64,
    /// Changes waiting for their log append.
    pub unflushed_changes: u64,
    /// Loaded Automerge documents.
    pub loaded_documents: u64,
    /// The org policy in force, if any.
    pub policy: Option<PolicySummary>,
    /// Changes held in quarantine (rejected by the policy), over all records.
    pub quarantined_changes: u64,
    /// This node's own changes that were rejected: by itself under a newer policy, or by
    /// peers (their receipts).
    pub own_changes_rejected: Vec<Receipt>,
    /// Peers refused because they are not members.
    pub refused_connections: Vec<RefusedPeer>,
    /// Whether any key may connect and write: no policy and no list of trusted peers (a
    /// node made with `mesh init --open`).
    pub open: bool,
}

/// The policy in force, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySummary {
    /// Its version.
    pub version: u64,
    /// The hash of its canonical text, hex.
    pub hash: String,
    /// How many members it names.
    pub members: u64,
    /// Set when two different policies claimed the same version: an alarm.
    pub conflict: Option<PolicyConflict>,
}

/// One peer as this node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's id.
    pub peer_id: NodeId,
    /// The name the peer gave itself, once it said hello.
    pub name: Option<String>,
    /// Connection state.
    pub state: PeerState,
    /// When the current connection was made.
    pub connected_since: Option<Instant>,
    /// When a reconciliation with this peer last completed.
    pub last_sync: Option<Instant>,
    /// Whether a reconciliation with this peer is running.
    pub syncing: bool,
    /// Local changes made since the last completed sync with this peer that were not
    /// pushed to it: an upper bound on how far behind it is.
    pub behind_estimate: u64,
    /// The last error of a sync with this peer.
    pub last_error: Option<String>,
    /// Traffic with this peer.
    pub counters: PeerCounters,
}

/// Per-peer traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    /// Messages received.
    pub messages_received: u64,
    /// Messages sent.
    pub messages_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Changes received (all, duplicates included).
    pub changes_received: u64,
    /// Changes sent.
    pub changes_sent: u64,
    /// Messages or changes from this peer that were refused.
    pub rejected: u64,
}

/// Node-wide counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Changes this node made and made durable.
    pub changes_local: u64,
    /// Remote changes applied.
    pub changes_applied: u64,
    /// Remote changes already held.
    pub changes_duplicate: u64,
    /// Changes refused: bad signature or malformed envelope, or rejected by the policy.
    pub changes_rejected: u64,
    /// Messages refused: garbage, truncated, oversized or out of protocol.
    pub messages_rejected: u64,
    /// Changes dropped because the pending set or pipeline was full, or they waited too long.
    pub changes_dropped: u64,
    /// Log appends that failed.
    pub storage_errors: u64,
    /// Reconciliation sessions completed.
    pub syncs_completed: u64,
    /// Reconciliation sessions that failed, stalled or were aborted.
    pub syncs_failed: u64,
    /// Records sent whole, as snapshots, to peers that had none of them.
    #[serde(default)]
    pub snapshots_sent: u64,
    /// Records new to this node that came whole and were taken as their document came.
    #[serde(default)]
    pub snapshots_taken: u64,
}

/// How a sync session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "reason")]
pub enum SyncOutcome {
    /// Both sides were found in sync.
    Completed,
    /// The session failed.
    Error(String),
    /// A user aborted it.
    Aborted,
}

/// One row of the sync history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// The peer.
    pub peer: NodeId,
    /// The session number, in the initiator's numbering.
    pub session: u64,
    /// Whether this node started the session.
    pub initiator: bool,
    /// When it started.
    pub started: Instant,
    /// When it ended.
    pub ended: Instant,
    /// How it ended.
    pub outcome: SyncOutcome,
    /// Request/response rounds.
    pub rounds: u32,
    /// Changes received.
    pub changes_received: u64,
    /// Changes sent.
    pub changes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// The round in which changes first moved either way (1 is the first request and its
    /// answer); `None` if none moved.
    #[serde(default)]
    pub first_changes_round: Option<u32>,
    /// Records received whole (snapshots); their changes count in `changes_received`.
    #[serde(default)]
    pub snapshots_received: u64,
    /// Records sent whole (snapshots); their changes count in `changes_sent`.
    #[serde(default)]
    pub snapshots_sent: u64,
}

/// A change refused on arrival: it failed parsing or verification, so it is not held, not
/// judged and not passed on; only this record of it is kept, for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedChange {
    /// The peer that sent it.
    pub from: NodeId,
    /// Why, naming the record, claimed author and change where they could be read.
    pub reason: String,
    /// When.
    pub at: Instant,
}

/// Two different policies with the same version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyConflict {
    /// The version both claim.
    pub version: u64,
    /// The hash of the policy in force (the lower one).
    pub kept: String,
    /// The hash of the other one.
    pub other: String,
}

/// A peer that tried to connect without being a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedPeer {
    /// The peer's node id.
    pub peer_id: NodeId,
    /// How many times.
    pub attempts: u64,
    /// The last attempt.
    pub last_at: Instant,
    /// The address it came from or was found at, if the driver knows it.
    pub address: Option<String>,
}

/// A peer's word that it rejected one of this node's changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The record.
    pub record: String,
    /// The change, hex.
    pub change: String,
    /// Why, as the rejecting node put it.
    pub reason: String,
    /// The node that rejected it.
    pub rejected_by: NodeId,
    /// When the receipt arrived.
    pub at: Instant,
}

/// One quarantined change, as `mesh quarantine` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineRow {
    /// The record.
    pub record: String,
    /// The change, hex.
    pub change: String,
    /// Its author.
    pub author: NodeId,
    /// The author's name in the policy, if a member.
    pub author_name: Option<String>,
    /// The rule it broke.
    pub reason: RejectReason,
    /// The same, in words.
    pub reason_text: String,
    /// The node that rejected it (this one).
    pub rejected_by: NodeId,
    /// When.
    pub rejected_at: Instant,
}

/// The policy as `mesh policy show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    /// Its version.
    pub version: u64,
    /// The hash of its canonical text, hex.
    pub hash: String,
    /// The policy itself.
    pub policy: Policy,
    /// A same-version conflict, if one was seen.
    pub conflict: Option<PolicyConflict>,
}
