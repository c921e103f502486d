//! Every bound of the node core, in one place.
//!
//! Anything that grows with peer input has a `*_max` here; input past it is refused,
//! counted and reported. Relationships between limits are checked at compile time.

use std::time::Duration;

/// Largest message a peer may send us, in bytes. Larger ones are refused before decoding.
pub const MESSAGE_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Largest change pushed whole by gossip; larger ones are announced by heads and pulled.
pub const PUSH_CHANGE_BYTES_MAX: usize = 64 * 1024;
/// Most envelope bytes in one `SyncChanges` batch message.
pub const SYNC_BATCH_BYTES_MAX: usize = 1024 * 1024;
/// Most change bytes one side sends in one reconciliation round; the rest waits for the
/// next round, so a receiver applies what it got before it is sent more (flow control).
pub const SYNC_ROUND_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Change bytes a node sends in one round unless configured otherwise: the receiver holds a
/// round's changes parsed (about 4 KB each in memory for a 200-byte change) until they are
/// durable and applied, so 16 MiB rounds of small changes cost it hundreds of MiB; 2 MiB
/// rounds (about 9,000 such changes) cost it about 40 MiB and a round trip more per 2 MiB.
pub const SYNC_ROUND_BYTES_DEFAULT: usize = 2 * 1024 * 1024;
/// Most ranges in one reconciliation message.
pub const RANGES_PER_MESSAGE_MAX: usize = 4096;
/// Most (record, heads) items in one reconciliation message, over all its ranges.
pub const ITEMS_PER_MESSAGE_MAX: usize = 65_536;
/// Most heads one record may list in a message.
pub const HEADS_PER_ITEM_MAX: usize = 64;
/// Most record needs in one message.
pub const NEEDS_PER_MESSAGE_MAX: usize = 16_384;
/// Most ancestor hashes sent with one need.
pub const NEED_ANCESTORS_MAX: usize = 16;
/// Most whole records in one `SyncSnapshots` message.
pub const SNAPSHOTS_PER_MESSAGE_MAX: usize = 16_384;
/// Most changes in one push or batch message.
pub const CHANGES_PER_MESSAGE_MAX: usize = 65_536;
/// Most list elements (changes, ranges, items, needs, collections) all lists of one message
/// hold together, checked while decoding. The largest honest message lists about 86,000
/// (4,096 ranges, 65,536 items, 16,384 needs).
pub const MESSAGE_ELEMENTS_MAX: usize = 131_072;
/// Most records in one page of `Command::List` (and `GET /v1/records/{collection}`).
pub const LIST_PAGE_MAX: usize = 1000;
/// Longest node name, in bytes.
pub const NAME_BYTES_MAX: usize = 128;
/// Most collections named in a replication scope.
pub const SCOPE_COLLECTIONS_MAX: usize = 1024;

/// What one reconciliation answer may hold (reconcile.rs). The default is what a peer
/// accepts on decoding; a node may answer in smaller rounds (tests use small budgets to
/// cross every bound with few records), never in larger ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundBudget {
    /// Ranges in one answer. Default: [`RANGES_PER_MESSAGE_MAX`].
    pub ranges: usize,
    /// Items listed over all the ranges of one answer. Default: [`ITEMS_PER_MESSAGE_MAX`].
    pub items: usize,
    /// Record needs in one answer. Default: [`NEEDS_PER_MESSAGE_MAX`].
    pub needs: usize,
    /// Change bytes sent with one answer. Default: [`SYNC_ROUND_BYTES_DEFAULT`]; at most
    /// [`SYNC_ROUND_BYTES_MAX`].
    pub change_bytes: usize,
}

impl Default for RoundBudget {
    fn default() -> RoundBudget {
        RoundBudget {
            ranges: RANGES_PER_MESSAGE_MAX,
            items: ITEMS_PER_MESSAGE_MAX,
            needs: NEEDS_PER_MESSAGE_MAX,
            change_bytes: SYNC_ROUND_BYTES_DEFAULT,
        }
    }
}

impl RoundBudget {
    /// The budget a node answers with: within the wire's limits, and large enough that
    /// every round settles at least one range (a split and the span after it, a listed
    /// range, a need).
    pub fn effective(self) -> RoundBudget {
        RoundBudget {
            ranges: self.ranges.clamp(RANGE_FANOUT + 1, RANGES_PER_MESSAGE_MAX),
            items: self
                .items
                .clamp(RANGE_ITEMS_THRESHOLD, ITEMS_PER_MESSAGE_MAX),
            needs: self.needs.clamp(1, NEEDS_PER_MESSAGE_MAX),
            change_bytes: self.change_bytes.clamp(1, SYNC_ROUND_BYTES_MAX),
        }
    }
}

/// A range holding at most this many records is answered with its item list.
pub const RANGE_ITEMS_THRESHOLD: usize = 32;
/// A larger range that differs is split into this many subranges.
pub const RANGE_FANOUT: usize = 16;

/// Most changes held because their dependencies have not arrived yet.
pub const PENDING_CHANGES_MAX: usize = 4096;
/// Most envelope bytes the pending set holds (changes whose dependencies have not arrived):
/// the count alone would allow 4,096 changes of 4 MiB, 16 GiB.
pub const PENDING_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How long a change waits for its dependencies before it is dropped (anti-entropy will
/// bring it again with its dependencies).
pub const PENDING_CHANGE_TTL: Duration = Duration::from_secs(120);
/// Most remote changes waiting for their log append; past it a batch is refused and
/// reconciliation fetches it again later.
pub const PIPELINE_REMOTE_CHANGES_MAX: usize = 200_000;
/// Most peers the node keeps state for.
pub const PEERS_MAX: usize = 1024;
/// Most reconciliation rounds in one session before it ends and the next timer retries:
/// a livelock fails a session instead of hanging it.
pub const SYNC_ROUNDS_MAX: u32 = 64;
/// Most messages deferred in one session while its changes are made durable.
pub const SESSION_DEFERRED_MAX: usize = 64;
/// After a session brings new changes, how soon the node syncs with its other peers (a
/// short wait gathers several sessions' news into one round).
pub const SYNC_FOLLOW_UP_DELAY: Duration = Duration::from_millis(50);
/// Entries kept in the in-memory sync history.
pub const HISTORY_ENTRIES_MAX: usize = 1000;

/// Most quarantined changes held for one record; past it, and past the per-author and total
/// bounds below, the changes with the highest hashes are dropped, so that nodes flooded
/// differently still hold the same ones (`Judge::enforce_quarantine_bounds` in judge.rs).
pub const QUARANTINE_PER_RECORD_MAX: usize = 32;
/// Most quarantined changes by one author over all records.
pub const QUARANTINE_PER_AUTHOR_MAX: usize = 4096;
/// Most quarantined changes over all records and authors.
pub const QUARANTINE_TOTAL_MAX: usize = 65_536;
/// Most changes the policy forbids that one peer may relay in [`QUARANTINE_PEER_WINDOW`];
/// past it they are dropped until the window ends (reconciliation offers them again).
pub const QUARANTINE_PER_PEER_PER_WINDOW: usize = 4096;
/// The window of [`QUARANTINE_PER_PEER_PER_WINDOW`].
pub const QUARANTINE_PEER_WINDOW: Duration = Duration::from_secs(60);
/// Most rejection receipts kept.
pub const RECEIPTS_MAX: usize = 256;
/// Most changes refused on arrival (bad signature, malformed) remembered for the operator.
pub const REFUSED_CHANGES_MAX: usize = 256;
/// Most refused peers remembered for status.
pub const REFUSED_PEERS_MAX: usize = 256;
/// Largest signed policy a peer may send, in bytes.
pub const POLICY_BYTES_MAX: usize = 1024 * 1024;
/// Longest rejection reason in a receipt, in bytes.
pub const REASON_BYTES_MAX: usize = 4096;

/// The default size of the cache of loaded Automerge documents, in the bytes charged for
/// them (below): about 2,000 small records. Documents out of the cache are read back from
/// the document store, so memory does not grow with the number of records.
pub const DOCUMENT_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// What a loaded document is charged in the cache, plus [`LOADED_DOCUMENT_CHANGE_BYTES`]
/// per change it holds. Measured with automerge 0.12 (heap allocated per loaded document
/// of five short fields): 16.0 KB with 1 change, 16.6 KB with 2, 19.7 KB with 20, 30.5 KB
/// with 100, 176 KB with 1,000.
pub const LOADED_DOCUMENT_BASE_BYTES: usize = 16 * 1024;

/// What each change of a loaded document adds to its charge (see above).
pub const LOADED_DOCUMENT_CHANGE_BYTES: usize = 160;

const _: () = assert!(PUSH_CHANGE_BYTES_MAX < MESSAGE_BYTES_MAX);
const _: () = assert!(SYNC_BATCH_BYTES_MAX + 64 * 1024 < MESSAGE_BYTES_MAX);
const _: () = assert!(SYNC_BATCH_BYTES_MAX <= SYNC_ROUND_BYTES_DEFAULT);
const _: () = assert!(SYNC_ROUND_BYTES_DEFAULT <= SYNC_ROUND_BYTES_MAX);
const _: () = assert!(crdt_schema::change::CHANGE_BYTES_MAX + 64 * 1024 < MESSAGE_BYTES_MAX);
const _: () = assert!(RANGE_ITEMS_THRESHOLD * RANGE_FANOUT <= ITEMS_PER_MESSAGE_MAX);
const _: () = assert!(RANGE_FANOUT >= 2);
const _: () = assert!(POLICY_BYTES_MAX + 1024 < MESSAGE_BYTES_MAX);
const _: () = assert!(QUARANTINE_PER_RECORD_MAX < HEADS_PER_ITEM_MAX);
const _: () = assert!(CHANGES_PER_MESSAGE_MAX <= MESSAGE_ELEMENTS_MAX);
const _: () = assert!(
    RANGES_PER_MESSAGE_MAX + ITEMS_PER_MESSAGE_MAX + NEEDS_PER_MESSAGE_MAX <= MESSAGE_ELEMENTS_MAX
);
