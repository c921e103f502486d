//! The node's configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crdt_schema::{CollectionSchema, NodeId, OrgId};

/// How a node behaves. Every field documents its default.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's human name, told to peers so their status can show it. Default: empty.
    pub name: String,
    /// The organisation whose changes this node accepts; it enters every signature.
    /// Default: the all-zero org, for a mesh without a policy.
    pub org: OrgId,
    /// The collections this node replicates; `None` replicates everything. Default: `None`.
    /// Reconciliation between two peers covers the intersection of their scopes.
    pub collections: Option<BTreeSet<String>>,
    /// Field schemas checked on local writes. Default: none.
    pub schemas: BTreeMap<String, CollectionSchema>,
    /// How often each connected peer is reconciled with (anti-entropy). Default: 30 s.
    pub sync_interval: Duration,
    /// A session with no progress for this long is dropped and started afresh. Default: 10 s.
    pub sync_stall_timeout: Duration,
    /// How long applied changes may wait before their records are saved as documents and
    /// the log can be compacted. Default: 1 s.
    pub checkpoint_interval: Duration,
    /// The size of the cache of loaded Automerge documents, in bytes as
    /// [`crate::limits::LOADED_DOCUMENT_BASE_BYTES`] charges them. Default:
    /// [`crate::limits::DOCUMENT_CACHE_BYTES`].
    pub document_cache_bytes: usize,
    /// Without a policy, the only keys admitted as peers; `None` admits every key (an open
    /// mesh). Once a policy is in force its members are admitted instead. Default: `None`
    /// (the daemon sets it unless the node was made with `mesh init --open`).
    pub trusted_peers: Option<BTreeSet<NodeId>>,
    /// Signature checks shared with other nodes in the same process (the simulator's nodes,
    /// a benchmark's baseline): envelopes any of them verified are not verified again.
    /// Default: `None`, every envelope is verified. The daemon never sets it.
    pub verified_cache: Option<crdt_schema::VerifiedCache>,
    /// What one reconciliation answer may hold. Default: the wire's limits (what every
    /// peer accepts); smaller budgets only make more, smaller rounds.
    pub round_budget: crate::limits::RoundBudget,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            name: String::new(),
            org: OrgId::default(),
            collections: None,
            schemas: BTreeMap::new(),
            sync_interval: Duration::from_secs(30),
            sync_stall_timeout: Duration::from_secs(10),
            checkpoint_interval: Duration::from_secs(1),
            document_cache_bytes: crate::limits::DOCUMENT_CACHE_BYTES,
            trusted_peers: None,
            verified_cache: None,
            round_budget: crate::limits::RoundBudget::default(),
        }
    }
}

impl Config {
    /// Whether this node replicates `collection`.
    pub fn replicates(&self, collection: &str) -> bool {
        self.collections
            .as_ref()
            .is_none_or(|collections| collections.contains(collection))
    }
}
