//! The sans-IO core of a mesh node: everything a node decides, nothing it does.
//!
//! A [`Node`] is a state machine. The driver (the daemon, the simulator, a test harness)
//! feeds it one [`Input`] at a time with the current time, and carries out the
//! [`Effect`]s it returns, in order: send bytes to a peer, append to the change log,
//! complete a command, disconnect a peer, emit an event. It also calls
//! `handle(now, Input::Tick)` when [`Node::next_deadline`] passes.
//!
//! ```
//! use mesh_core::{Command, CommandId, Config, Effect, Input, Instant, Node};
//! use crdt_schema::{FieldEdit, FieldValue, Identity};
//!
//! let mut node = Node::new(Config::default(), Identity::from_seed(1), 1);
//! let now = Instant::from_millis(0);
//! let put = Command::Put {
//!     record: "stock/aspirin".parse().unwrap(),
//!     fields: [("count".to_owned(), FieldEdit::Set(FieldValue::Int(12)))].into(),
//! };
//! let effects = node.handle(now, Input::Command { id: CommandId(1), command: put });
//! // The write is not acknowledged yet: first the driver must make the change durable.
//! let Effect::Storage { op, .. } = &effects[0] else { panic!("an append comes first") };
//! let effects = node.handle(now, Input::StorageDone { op: *op, result: Ok(()) });
//! assert!(effects.iter().any(|effect| matches!(effect, Effect::Complete { .. })));
//! ```
//!
//! The core does no IO, reads no clock and draws no OS entropy: time is an argument,
//! randomness comes from a seeded rng, ids from counters. The same inputs give the same
//! effects, which is what lets the simulator replay any run from its seed.
//!
//! The core is a set of parts that never see the node: node.rs routes between them (see
//! ARCHITECTURE.md for the map). The public modules:
//! - [`node`]: the state machine and its routing.
//! - [`api`]: inputs, effects, commands, replies and events.
//! - [`records`]: the record index (durable heads, digest) and the document cache.
//! - [`wire`]: the versioned peer protocol with its size limits.
//! - [`digest`]: item hashes, accumulators and fingerprints.
//! - [`storage`]: what the core asks of storage and what it gets back on start.
//! - [`policy`]: the org's policy in force, membership, and the verdict on every change.
//! - [`status`]: the serialisable views.
//! - [`limits`]: every bound, in one place.

mod admit;
pub mod api;
mod apply;
mod checkpoint;
pub mod config;
pub mod digest;
mod gossip;
mod history;
mod judge;
pub mod limits;
mod local;
pub mod node;
mod outbox;
mod peers;
mod pipeline;
pub mod policy;
mod reads;
mod reconcile;
pub mod records;
mod restore;
mod rounds;
mod session;
pub mod signatures;
pub mod status;
pub mod storage;
mod sync;
pub mod time;
mod views;
pub mod wire;

pub use api::{Command, CommandError, CommandId, Effect, Event, Input, PolicyOffer, Queues, Reply};
pub use config::Config;
pub use digest::Digest;
pub use node::Node;
pub use status::{PeerState, PolicyView, QuarantineRow, Status, SyncOutcome, SyncRecord};
pub use storage::{Restore, SavedRecord, StorageError, StorageOpId, StorageRequest};
pub use time::Instant;
