//! The peer protocol: message types and their versioned, size-limited encoding.
//!
//! A message is `[WIRE_VERSION u8][postcard body]`. The transport (libp2p, the simulator)
//! frames messages and keeps them in order per connection. Decoding refuses anything over
//! [`MESSAGE_BYTES_MAX`] before reading it, then checks every list against its limit, so a
//! peer cannot make a node allocate or loop without bound.
//!
//! The exchanges:
//! - `Hello` once per connection, each way: name, replication scope and policy version;
//!   the side with the newer policy sends it (`Policy`). `Receipt` tells an author that
//!   one of its changes was rejected.
//! - `Push` carries new changes as they are committed; `Announce` carries only the heads
//!   of a record whose change is too large to push; `Need` asks for a record's changes.
//! - A reconciliation session is request/response rounds: the initiator's `SyncRequest`,
//!   the responder's `SyncResponse`, each preceded by the `SyncChanges` and
//!   `SyncSnapshots` batches it sends, and a final `SyncEnd`. A record the peer has none of
//!   goes whole as a `Snapshot` when its saved document is at hand.

use serde::{Deserialize, Serialize};

use crate::digest::Fingerprint;
use crate::limits::*;
use crate::storage::Signature;

/// The protocol version this node speaks.
pub const WIRE_VERSION: u8 = 2;

/// A change hash on the wire.
pub type Hash = [u8; 32];

/// A signed change envelope on the wire.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EnvelopeBytes(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// Everything peers say to each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Sent once on connect.
    Hello {
        /// The sender's human name, for status screens.
        name: String,
        /// Collections the sender replicates; `None` for all.
        #[serde(deserialize_with = "bounded::option_vec::<SCOPE_COLLECTIONS_MAX, _, _>")]
        scope: Option<Vec<String>>,
        /// The policy the sender enforces, if any, so the side with the newer one sends it.
        policy: Option<PolicyTag>,
        /// The org the sender trusts. Nodes of different orgs cannot verify each other's
        /// changes, so they part at once, saying why, instead of refusing every change.
        org: [u8; 32],
    },
    /// The org's signed policy (JSON), sent to a peer that has an older one or none.
    Policy {
        /// The signed policy as `mesh policy sign` wrote it.
        #[serde(with = "serde_bytes")]
        signed: Vec<u8>,
    },
    /// "I rejected your change": sent to the author of a quarantined change.
    Receipt {
        /// The record.
        record: String,
        /// The change.
        change: Hash,
        /// Why, in words.
        reason: String,
    },
    /// Newly committed changes.
    Push {
        /// The envelopes, in dependency order.
        #[serde(deserialize_with = "bounded::vec::<CHANGES_PER_MESSAGE_MAX, _, _>")]
        changes: Vec<EnvelopeBytes>,
    },
    /// A record has new heads whose changes were too large to push.
    Announce {
        /// The record's key.
        record: String,
        /// Its new heads.
        #[serde(deserialize_with = "bounded::hashes::<HEADS_PER_ITEM_MAX, _>")]
        heads: Vec<Hash>,
    },
    /// Requests for changes outside a session (after a push with missing dependencies).
    Need {
        /// What the sender has of each record.
        #[serde(deserialize_with = "bounded::vec::<NEEDS_PER_MESSAGE_MAX, _, _>")]
        needs: Vec<Need>,
    },
    /// One round of a reconciliation, from the initiator.
    SyncRequest(Round),
    /// The responder's answer to one round.
    SyncResponse(Round),
    /// Changes belonging to a session, sent before the round message that follows them.
    SyncChanges {
        /// The session.
        session: u64,
        /// Whether the initiator sent them (session numbers are the initiator's).
        from_initiator: bool,
        /// The envelopes, in dependency order per record.
        #[serde(deserialize_with = "bounded::vec::<CHANGES_PER_MESSAGE_MAX, _, _>")]
        changes: Vec<EnvelopeBytes>,
    },
    /// Whole records belonging to a session, for a peer that has none of them (clone by
    /// snapshot), sent like `SyncChanges` before the round message that follows them.
    SyncSnapshots {
        /// The session.
        session: u64,
        /// Whether the initiator sent them.
        from_initiator: bool,
        /// The records.
        #[serde(deserialize_with = "bounded::vec::<SNAPSHOTS_PER_MESSAGE_MAX, _, _>")]
        snapshots: Vec<Snapshot>,
    },
    /// The initiator ends a session.
    SyncEnd {
        /// The session.
        session: u64,
        /// Whether the two nodes were found in sync.
        completed: bool,
    },
}

/// One record whole: its saved document (one uncompressed Automerge document chunk) and
/// the author's signature of each change in it, in the order of the change hashes
/// (`crdt_schema::snapshot`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The record's key.
    pub record: String,
    /// The document.
    #[serde(with = "serde_bytes")]
    pub document: Vec<u8>,
    /// One signature per change, ordered by change hash.
    #[serde(deserialize_with = "bounded::signatures::<CHANGES_PER_MESSAGE_MAX, _>")]
    pub signatures: Vec<Signature>,
}

impl Snapshot {
    /// What the snapshot costs on the wire, about: its document and signatures.
    pub fn wire_bytes(&self) -> usize {
        self.record.len() + self.document.len() + 64 * self.signatures.len()
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Snapshot({}, {} bytes, {} signatures)",
            self.record,
            self.document.len(),
            self.signatures.len()
        )
    }
}

/// Which policy a node enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTag {
    /// Its version.
    pub version: u64,
    /// The hash of its canonical text (breaks same-version ties: lower wins).
    pub hash: Hash,
}

/// One round of range-based set reconciliation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Round {
    /// The session, numbered by its initiator.
    pub session: u64,
    /// Ranges still to be compared; contiguous and increasing.
    #[serde(deserialize_with = "bounded::vec::<RANGES_PER_MESSAGE_MAX, _, _>")]
    pub ranges: Vec<Range>,
    /// Records whose changes the sender lacks.
    #[serde(deserialize_with = "bounded::vec::<NEEDS_PER_MESSAGE_MAX, _, _>")]
    pub needs: Vec<Need>,
    /// The policy the sender enforces: a policy message lost on a connection that
    /// stayed up is sent again at the next round, not only on the next hello.
    pub policy: Option<PolicyTag>,
}

/// A key range `[lower, upper)` and what the sender knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// Inclusive lower bound; `""` is the start of the key space.
    pub lower: String,
    /// Exclusive upper bound; `None` is the end of the key space.
    pub upper: Option<String>,
    /// The sender's view of the range.
    pub summary: RangeSummary,
}

/// What a range message says about a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RangeSummary {
    /// The sender's fingerprint and record count for the range.
    Fingerprint {
        /// The fingerprint.
        fingerprint: Fingerprint,
        /// How many records the sender has in the range.
        count: u64,
    },
    /// Every record the sender has in the range, with its heads.
    Items(#[serde(deserialize_with = "bounded::vec::<ITEMS_PER_MESSAGE_MAX, _, _>")] Vec<Item>),
}

/// A record and its heads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The record's key.
    pub record: String,
    /// Its heads, sorted.
    #[serde(deserialize_with = "bounded::hashes::<HEADS_PER_ITEM_MAX, _>")]
    pub heads: Vec<Hash>,
}

/// "Send me what I lack of this record."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Need {
    /// The record's key.
    pub record: String,
    /// The sender's heads (empty if it has nothing).
    #[serde(deserialize_with = "bounded::hashes::<HEADS_PER_ITEM_MAX, _>")]
    pub heads: Vec<Hash>,
    /// Some of the sender's older hashes, nearest first, so that a peer whose history
    /// forked can find what both share and send only the rest.
    #[serde(deserialize_with = "bounded::hashes::<NEED_ANCESTORS_MAX, _>")]
    pub ancestors: Vec<Hash>,
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Longer than [`MESSAGE_BYTES_MAX`].
    #[error("message of {0} bytes is over the limit of {MESSAGE_BYTES_MAX}")]
    TooLarge(usize),
    /// Empty.
    #[error("empty message")]
    Empty,
    /// A protocol version this node does not speak.
    #[error("protocol version {0} is not supported (this node speaks {WIRE_VERSION})")]
    Version(u8),
    /// The body does not decode.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A list is longer than its limit.
    #[error("message has {found} {what}; the limit is {limit}")]
    OverLimit {
        /// What was counted.
        what: &'static str,
        /// How many there were.
        found: usize,
        /// The limit.
        limit: usize,
    },
}

impl Message {
    /// Encodes the message with its version byte.
    pub fn encode(&self) -> Vec<u8> {
        let bytes = vec![WIRE_VERSION];
        postcard::to_extend(self, bytes).expect("encoding into a Vec cannot fail")
    }

    /// Decodes and checks a message from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        if bytes.len() > MESSAGE_BYTES_MAX {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
        if version != WIRE_VERSION {
            return Err(WireError::Version(version));
        }
        bounded::start_message();
        let message: Message =
            postcard::from_bytes(body).map_err(|error| WireError::Malformed(error.to_string()))?;
        message.check_limits()?;
        Ok(message)
    }

    fn check_limits(&self) -> Result<(), WireError> {
        match self {
            Message::Policy { signed } => check("policy bytes", signed.len(), POLICY_BYTES_MAX),
            Message::Receipt { reason, record, .. } => {
                check("reason bytes", reason.len(), REASON_BYTES_MAX)?;
                check("record bytes", record.len(), REASON_BYTES_MAX)
            }
            Message::Hello { name, scope, .. } => {
                check("name bytes", name.len(), NAME_BYTES_MAX)?;
                let collections = scope.as_ref().map_or(0, Vec::len);
                check("scope collections", collections, SCOPE_COLLECTIONS_MAX)
            }
            Message::Push { changes } | Message::SyncChanges { changes, .. } => {
                check("changes", changes.len(), CHANGES_PER_MESSAGE_MAX)
            }
            Message::Announce { heads, .. } => check("heads", heads.len(), HEADS_PER_ITEM_MAX),
            Message::Need { needs } => check_needs(needs),
            Message::SyncRequest(round) | Message::SyncResponse(round) => {
                check("ranges", round.ranges.len(), RANGES_PER_MESSAGE_MAX)?;
                let mut items = 0;
                for range in &round.ranges {
                    if let RangeSummary::Items(list) = &range.summary {
                        items += list.len();
                        for item in list {
                            check("heads", item.heads.len(), HEADS_PER_ITEM_MAX)?;
                        }
                    }
                }
                check("items", items, ITEMS_PER_MESSAGE_MAX)?;
                check_needs(&round.needs)
            }
            Message::SyncSnapshots { snapshots, .. } => {
                check("snapshots", snapshots.len(), SNAPSHOTS_PER_MESSAGE_MAX)?;
                let signatures = snapshots.iter().map(|s| s.signatures.len()).sum();
                check("signatures", signatures, CHANGES_PER_MESSAGE_MAX)?;
                for snapshot in snapshots {
                    check("record bytes", snapshot.record.len(), REASON_BYTES_MAX)?;
                }
                Ok(())
            }
            Message::SyncEnd { .. } => Ok(()),
        }
    }
}

fn check_needs(needs: &[Need]) -> Result<(), WireError> {
    check("needs", needs.len(), NEEDS_PER_MESSAGE_MAX)?;
    for need in needs {
        check("heads", need.heads.len(), HEADS_PER_ITEM_MAX)?;
        check("ancestors", need.ancestors.len(), NEED_ANCESTORS_MAX)?;
    }
    Ok(())
}

fn check(what: &'static str, found: usize, limit: usize) -> Result<(), WireError> {
    if found > limit {
        Err(WireError::OverLimit { what, found, limit })
    } else {
        Ok(())
    }
}

/// Limits checked while decoding, before anything is allocated for them: each list has its
/// own bound, and the lists of one message together hold at most
/// [`MESSAGE_ELEMENTS_MAX`] elements. Checked only after decoding, a list of empty elements
/// (one byte each on the wire, 24 or more in memory) would cost about 25 times the
/// message's size first: 200 MB for one 8 MiB message.
mod bounded {
    use std::cell::Cell;
    use std::marker::PhantomData;

    use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

    use crate::limits::MESSAGE_ELEMENTS_MAX;

    thread_local! {
        /// List elements the message being decoded may still hold. Decoding runs on one
        /// thread from start to end, so a thread-local budget is exact.
        static BUDGET: Cell<usize> = const { Cell::new(MESSAGE_ELEMENTS_MAX) };
    }

    /// Resets the budget for the next message.
    pub(super) fn start_message() {
        BUDGET.with(|budget| budget.set(MESSAGE_ELEMENTS_MAX));
    }

    fn take<E: Error>(count: usize) -> Result<(), E> {
        BUDGET.with(|budget| match budget.get().checked_sub(count) {
            Some(left) => {
                budget.set(left);
                Ok(())
            }
            None => Err(E::custom(format!(
                "the message holds more than {MESSAGE_ELEMENTS_MAX} list elements"
            ))),
        })
    }

    struct Bounded<const MAX: usize, const COUNTED: bool, T>(PhantomData<T>);

    impl<'de, const MAX: usize, const COUNTED: bool, T: Deserialize<'de>> Visitor<'de>
        for Bounded<MAX, COUNTED, T>
    {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a list of at most {MAX} elements")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let declared = seq.size_hint().unwrap_or(0);
            if declared > MAX {
                return Err(A::Error::custom(format!(
                    "a list of {declared} elements; the limit is {MAX}"
                )));
            }
            if COUNTED {
                take::<A::Error>(declared)?;
            }
            let mut list = Vec::with_capacity(declared);
            while let Some(element) = seq.next_element()? {
                if list.len() == MAX {
                    return Err(A::Error::custom(format!("a list over the limit of {MAX}")));
                }
                list.push(element);
            }
            Ok(list)
        }
    }

    /// A `Vec` of at most `MAX` elements, counted against the message's budget.
    pub(super) fn vec<'de, const MAX: usize, D: Deserializer<'de>, T: Deserialize<'de>>(
        deserializer: D,
    ) -> Result<Vec<T>, D::Error> {
        deserializer.deserialize_seq(Bounded::<MAX, true, T>(PhantomData))
    }

    /// A `Vec` of at most `MAX` hashes: 32 bytes on the wire and in memory, so not counted
    /// against the budget.
    pub(super) fn hashes<'de, const MAX: usize, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<[u8; 32]>, D::Error> {
        deserializer.deserialize_seq(Bounded::<MAX, false, [u8; 32]>(PhantomData))
    }

    /// A `Vec` of at most `MAX` signatures: 64 bytes on the wire and in memory, so not
    /// counted against the budget.
    pub(super) fn signatures<'de, const MAX: usize, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<crate::storage::Signature>, D::Error> {
        deserializer.deserialize_seq(Bounded::<MAX, false, crate::storage::Signature>(
            PhantomData,
        ))
    }

    struct BoundedOption<const MAX: usize, T>(PhantomData<T>);

    impl<'de, const MAX: usize, T: Deserialize<'de>> Visitor<'de> for BoundedOption<MAX, T> {
        type Value = Option<Vec<T>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "nothing, or a list of at most {MAX} elements")
        }

        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            vec::<MAX, D, T>(deserializer).map(Some)
        }
    }

    /// An `Option<Vec>` of at most `MAX` elements.
    pub(super) fn option_vec<'de, const MAX: usize, D: Deserializer<'de>, T: Deserialize<'de>>(
        deserializer: D,
    ) -> Result<Option<Vec<T>>, D::Error> {
        deserializer.deserialize_option(BoundedOption::<MAX, T>(PhantomData))
    }
}

impl std::fmt::Debug for EnvelopeBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Envelope({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let message = Message::SyncRequest(Round {
            session: 7,
            ranges: vec![Range {
                lower: String::new(),
                upper: Some("b/1".into()),
                summary: RangeSummary::Fingerprint {
                    fingerprint: [3; 16],
                    count: 9,
                },
            }],
            needs: vec![],
            policy: None,
        });
        let bytes = message.encode();
        assert_eq!(Message::decode(&bytes), Ok(message));
        assert_eq!(Message::decode(&[]), Err(WireError::Empty));
        assert_eq!(Message::decode(&[9, 0]), Err(WireError::Version(9)));
        assert!(matches!(
            Message::decode(&[WIRE_VERSION, 200, 1]),
            Err(WireError::Malformed(_))
        ));
        for len in 1..bytes.len() {
            assert!(
                Message::decode(&bytes[..len]).is_err(),
                "truncated at {len}"
            );
        }
    }

    #[test]
    fn a_declared_huge_list_is_refused_without_allocating_it() {
        // Variant 1 (Push) with a varint length of about 2^62.
        let bytes = [
            WIRE_VERSION,
            1,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x3f,
        ];
        assert!(Message::decode(&bytes).is_err());
    }
}
