//! The API's replies as types, shared by the handlers that send them (`api.rs`) and the CLI
//! that reads them (`cli/`): a field renamed on one side fails to compile on the other,
//! instead of printing "?" at run time.

use mesh_core::status::{PeerStatus, SyncRecord};
use mesh_core::status::{QuarantineRow, RefusedChange, RefusedPeer};
use serde::{Deserialize, Serialize};

/// `GET /v1/status`: the core's status and what only the daemon knows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReply {
    /// The core's view of the node.
    #[serde(flatten)]
    pub status: mesh_core::Status,
    /// The node's name from `config.toml`.
    pub name: String,
    /// The same as `counters.changes_rejected`.
    pub rejected_changes: u64,
    /// Where the API listens.
    pub api_addr: String,
    /// Where the node listens for peers, once known.
    pub listen_addrs: Vec<String>,
}

/// `GET /v1/peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeersReply {
    /// Every peer the node knows.
    pub peers: Vec<PeerStatus>,
    /// Keys waiting for `mesh peers approve` (only while no policy is in force).
    pub pending: Vec<RefusedPeer>,
    /// Whether the node admits every key (`mesh init --open`, no policy).
    pub open: bool,
}

/// `GET /v1/history`: sync sessions, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryReply {
    /// The sessions.
    pub history: Vec<SyncRecord>,
}

/// `GET /v1/quarantine`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuarantineReply {
    /// Changes the policy rejected, held.
    pub quarantine: Vec<QuarantineRow>,
    /// Changes refused on arrival (bad signature, malformed): not held.
    pub refused: Vec<RefusedChange>,
}
