//! The core's boundary: what a driver feeds a node ([`Input`], [`Command`]) and what the
//! node asks of it ([`Effect`], [`Reply`], [`Event`]). Every part may name these types;
//! none of them names the node.

use std::collections::BTreeMap;

use crdt_schema::{ChangeHash, FieldEdit, NodeId, RecordId, RecordView, SchemaError};
use serde::{Deserialize, Serialize};

use crate::status::{PolicyView, QuarantineRow, RefusedChange, Status, SyncRecord};
use crate::storage::{Restore, StorageError, StorageOpId, StorageRequest};
use crate::time::Instant;
/// Numbers a command, so its completion can be matched. Chosen by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommandId(pub u64);

/// Everything that can happen to a node.
#[derive(Debug, Clone)]
pub enum Input {
    /// What survived in storage. Fed once, before anything else, when a node starts.
    Restore(Restore),
    /// A request from the local application or user.
    Command {
        /// Echoed in the completion.
        id: CommandId,
        /// What to do.
        command: Command,
    },
    /// The transport is dialling a peer.
    PeerConnecting {
        /// The peer.
        peer: NodeId,
    },
    /// The transport connected a peer (either direction).
    PeerConnected {
        /// The peer.
        peer: NodeId,
    },
    /// The transport refused a connection from a peer that is not a member (see
    /// [`crate::Node::admits`]); recorded for status.
    PeerRefused {
        /// The peer.
        peer: NodeId,
        /// The address it came from or was found at, if known.
        address: Option<String>,
    },
    /// The transport lost a peer.
    PeerDisconnected {
        /// The peer.
        peer: NodeId,
    },
    /// A message from a connected peer.
    MessageReceived {
        /// The peer.
        from: NodeId,
        /// The message as received.
        bytes: Vec<u8>,
    },
    /// A storage request finished.
    StorageDone {
        /// The request.
        op: StorageOpId,
        /// Whether it succeeded; an append succeeds only once durable.
        result: Result<(), StorageError>,
    },
    /// A deadline from [`crate::Node::next_deadline`] passed.
    Tick,
}

/// Everything a node asks its driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send a message to a connected peer.
    Send {
        /// The peer.
        to: NodeId,
        /// The encoded message.
        bytes: Vec<u8>,
    },
    /// Carry out a storage request and report it with [`Input::StorageDone`].
    Storage {
        /// Echo this in the completion.
        op: StorageOpId,
        /// What to do.
        request: StorageRequest,
    },
    /// A command finished.
    Complete {
        /// The command.
        id: CommandId,
        /// Its result.
        result: Result<Reply, CommandError>,
    },
    /// Drop the connection to a peer that broke the protocol.
    Disconnect {
        /// The peer.
        peer: NodeId,
        /// Why, for logs.
        reason: String,
    },
    /// Something worth telling the user or the change feed.
    Emit(Event),
}

/// Requests from the local application or user.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Create or update some fields of a record: set, remove or add to a counter.
    Put {
        /// The record.
        record: RecordId,
        /// What to do to each field.
        fields: BTreeMap<String, FieldEdit>,
    },
    /// Mark a record deleted.
    Delete {
        /// The record.
        record: RecordId,
    },
    /// Read a record.
    Get {
        /// The record.
        record: RecordId,
    },
    /// Read the live records of a collection, in id order, a page at a time.
    List {
        /// The collection.
        collection: String,
        /// Start after this record id (the `next` of the previous page); `None` from the
        /// first.
        after: Option<String>,
        /// Most records in the page; 0 means [`crate::limits::LIST_PAGE_MAX`], and larger
        /// values are lowered to it.
        limit: usize,
    },
    /// The node's status.
    Status,
    /// Reconcile now with every connected peer, or with one.
    SyncNow {
        /// Only this peer.
        peer: Option<NodeId>,
    },
    /// End every running reconciliation this node started; what was applied stays.
    SyncAbort,
    /// The sync history, newest first.
    History,
    /// A record's Automerge document in the standard binary format.
    Export {
        /// The record.
        record: RecordId,
    },
    /// Put a signed policy in force (if it is the org's and newer) and spread it.
    ApplyPolicy {
        /// The signed policy.
        signed: crdt_schema::policy::SignedPolicy,
    },
    /// The policy in force.
    ShowPolicy,
    /// Every quarantined change.
    Quarantine,
    /// Trust a peer: without a policy it is admitted from now on (`mesh peers approve`).
    ApprovePeer {
        /// The peer.
        peer: NodeId,
    },
}

/// Successful command results.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A write is durable.
    Written {
        /// The record.
        record: RecordId,
        /// The change the write made, or `None` if it changed nothing.
        change: Option<ChangeHash>,
        /// Its heads after the write.
        heads: Vec<ChangeHash>,
        /// Whether the write changed anything.
        changed: bool,
    },
    /// A record, or `None` if it does not exist.
    Record(Option<RecordView>),
    /// A page of a collection's records.
    Records {
        /// The records, in id order.
        records: Vec<RecordView>,
        /// The id to ask the next page `after`, if more records follow.
        next: Option<String>,
    },
    /// Status.
    Status(Box<Status>),
    /// How many reconciliations were started.
    SyncStarted {
        /// Peers a session was started with.
        peers: Vec<NodeId>,
    },
    /// How many reconciliations were aborted.
    SyncAborted {
        /// Sessions ended.
        sessions: usize,
    },
    /// Sync history rows, newest first.
    History(Vec<SyncRecord>),
    /// A document's bytes.
    Document(Vec<u8>),
    /// What became of an offered policy.
    PolicyOffered(PolicyOffer),
    /// The policy in force, if any.
    Policy(Option<Box<PolicyView>>),
    /// Quarantined changes, and changes refused on arrival.
    Quarantine {
        /// Held, never applied: rejected by the policy.
        held: Vec<QuarantineRow>,
        /// Not held: failed parsing or verification (recent ones only).
        refused: Vec<RefusedChange>,
    },
    /// A peer is trusted.
    PeerApproved {
        /// Whether it was not trusted before.
        newly: bool,
        /// Whether a policy is in force, which decides admission instead.
        policy_in_force: bool,
    },
}

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandError {
    /// The record does not exist.
    #[error("record {0} does not exist")]
    NotFound(RecordId),
    /// The request itself is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The write breaks the collection's schema.
    #[error("the write breaks the schema of `{collection}`: {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Schema {
        /// The collection.
        collection: String,
        /// Every problem.
        errors: Vec<SchemaError>,
    },
    /// The change could not be made durable; nothing was written.
    #[error("storage failed, nothing was written: {0}")]
    Storage(String),
    /// The peer is not connected.
    #[error("peer {0} is not connected")]
    PeerNotConnected(NodeId),
    /// The org's policy forbids the write; nothing was written.
    #[error("refused by the org's policy (version {version}): {reason}")]
    Forbidden {
        /// The version of the policy in force.
        version: u64,
        /// The rule.
        reason: crdt_schema::policy::RejectReason,
    },
    /// A policy offered to the node is not valid.
    #[error("{0}")]
    Policy(String),
}

/// Things worth telling the user or a change feed.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A record's durable state changed.
    RecordChanged {
        /// The record.
        record: RecordId,
        /// Its new durable heads.
        heads: Vec<ChangeHash>,
        /// The peer it came from, or `None` for a local write.
        from: Option<NodeId>,
        /// Who wrote the changes that changed it (empty when a new policy changed what
        /// is accepted).
        authors: Vec<NodeId>,
        /// Whether the record is now deleted.
        deleted: bool,
    },
    /// A change from a peer was refused.
    ChangeRejected {
        /// The peer that sent it.
        from: NodeId,
        /// Why.
        reason: String,
    },
    /// A message from a peer was refused.
    MessageRejected {
        /// The peer.
        from: NodeId,
        /// Why.
        reason: String,
    },
    /// A reconciliation started.
    SyncStarted {
        /// The peer.
        peer: NodeId,
        /// The session.
        session: u64,
        /// Whether this node started it.
        initiator: bool,
    },
    /// A reconciliation ended.
    SyncEnded(SyncRecord),
    /// A storage request failed.
    StorageFailed {
        /// The driver's error.
        error: String,
    },
    /// A new policy is in force.
    PolicyAdopted {
        /// Its version.
        version: u64,
    },
    /// A durable change was quarantined by the policy.
    ChangeQuarantined {
        /// The record.
        record: RecordId,
        /// The change.
        change: ChangeHash,
        /// Why.
        reason: String,
    },
}

/// Queue lengths, from [`crate::Node::queues`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queues {
    /// Changes waiting for their dependencies.
    pub pending_changes: usize,
    /// Remote changes waiting for their log append.
    pub pipeline_remote_changes: usize,
    /// Peers tracked.
    pub peers: usize,
    /// Sync history rows.
    pub history: usize,
    /// Loaded Automerge documents.
    pub loaded_documents: usize,
    /// What the loaded documents are charged in the cache, together.
    pub loaded_document_bytes: usize,
    /// Documents kept in memory as saved bytes (not loaded, not only in the store), and
    /// those bytes together.
    pub held_documents: (usize, usize),
    /// Documents read from the document store since the start.
    pub store_reads: u64,
    /// The most rounds any session holds deferred.
    pub deferred_rounds_max: usize,
    /// The last progress of the session that has waited longest, if any runs.
    pub oldest_session_progress: Option<Instant>,
}

/// What became of a policy offered to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum PolicyOffer {
    /// It is now in force.
    Adopted {
        /// Its version.
        version: u64,
    },
    /// It is the policy already in force.
    Unchanged {
        /// Its version.
        version: u64,
    },
    /// The node holds a newer policy (or the winner of a same-version tie).
    Older {
        /// The version in force.
        in_force: u64,
    },
}
