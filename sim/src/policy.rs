//! The policy workload and the byzantine node (`--policy`).
//!
//! The org signs version 1 before the run: node 0 is head office (`master`), node 1 is a
//! second master, the others are sites, except node 2 (with four nodes or more), which is not
//! a member yet; every node starts with it. Catalogue is written by masters only, stock by
//! everyone. During the fault phase head office adds node 2 and demotes node 1 (version 2),
//! then promotes node 1 again and revokes the byzantine node (version 3), each applied at
//! node 0 while faults go on.
//!
//! The last node is byzantine: a member with the `site` role whose own core is honest, but
//! which also crafts messages directly: changes with forged signatures, catalogue writes
//! signed with its own key, changes replayed into another record, old policies, policies
//! signed by a key that is not the org's, garbage, and the crafted change classes of the
//! security review, signed with its own key: a change that makes Automerge panic when
//! applied (after the change it edits), a non-canonical change (an unknown op column) and a
//! compressed change.
//!
//! The checker `reference-written-by-non-master` runs at every record change on every
//! honest node: every change in a catalogue record's accepted document must be written by
//! a master of the node's policy or be built on by such a change. It judges independently
//! of the core's own verdict code.

use std::collections::BTreeSet;

use crdt_schema::policy::{CollectionRule, Member, Policy, SignedPolicy};
use crdt_schema::{
    ChangeHash, Edit, Envelope, FieldEdit, FieldValue, Identity, NodeId, OrgId, RecordDoc,
    RecordId, VerifiedChange,
};
use mesh_core::wire::{EnvelopeBytes, Message};

use crate::rng::SimRng;

/// The collection only masters may write.
pub const REFERENCE: &str = "catalogue";

/// The org, the policies it signs and the byzantine node.
pub struct PolicyPlay {
    org: Identity,
    /// The org id every node trusts.
    pub org_id: OrgId,
    nodes: Vec<NodeId>,
    /// The byzantine node's index.
    pub byzantine: usize,
    byzantine_identity: Identity,
    /// The latest policy issued.
    pub issued: u64,
    /// Crafted change bytes by the byzantine node, made once: (a record's first change, an
    /// edit of it that makes Automerge panic), a non-canonical change, a compressed one.
    crafted: Crafted,
}

struct Crafted {
    base: Vec<u8>,
    panicking: Option<Vec<u8>>,
    non_canonical: Vec<u8>,
    compressed: Vec<u8>,
}

impl Crafted {
    fn new(author: &NodeId) -> Crafted {
        let (base, edit) = crdt_schema::crafted::edit_of_anothers_objects(author, author);
        let base_change = base
            .changes_after(&[])
            .pop()
            .expect("the base has a change");
        let panicking = crdt_schema::crafted::panicking_mutant(&base, &edit)
            .map(|change| change.raw_bytes().to_vec());
        let mut doc = RecordDoc::new(author);
        let blob = [(
            "blob".to_owned(),
            FieldEdit::Set(FieldValue::Str("z".repeat(2000))),
        )];
        let mut large = doc
            .edit(&Edit::Put(blob.into()), 0)
            .expect("a fresh document takes an edit")
            .expect("setting a field changes it");
        Crafted {
            base: base_change.raw_bytes().to_vec(),
            panicking,
            non_canonical: crdt_schema::crafted::with_unknown_column(edit.raw_bytes()),
            compressed: large.bytes().into_owned(),
        }
    }
}

impl PolicyPlay {
    /// The play for `identities` (at least three nodes).
    pub fn new(seed: u64, identities: &[Identity]) -> PolicyPlay {
        let org = Identity::from_seed(seed.wrapping_mul(1000).wrapping_add(999));
        let org_id = OrgId::from_bytes(*org.node_id().as_bytes());
        let byzantine = identities.len() - 1;
        PolicyPlay {
            org_id,
            org,
            nodes: identities.iter().map(Identity::node_id).collect(),
            byzantine,
            byzantine_identity: identities[byzantine].clone(),
            issued: 1,
            crafted: Crafted::new(&identities[byzantine].node_id()),
        }
    }

    /// Policy `version`: 1 at the start, 2 demotes node 1, 3 promotes it again and
    /// revokes the byzantine node.
    pub fn policy(&self, version: u64) -> Policy {
        let mut members = std::collections::BTreeMap::new();
        for (index, node) in self.nodes.iter().enumerate() {
            if version == 1 && Some(index) == self.newcomer() {
                continue;
            }
            let master = index == 0 || (index == 1 && version != 2 && index != self.byzantine);
            members.insert(
                format!("node-{index}"),
                Member {
                    node: *node,
                    roles: [if master { "master" } else { "site" }.to_owned()].into(),
                },
            );
        }
        let revoked = match version {
            3 => [self.nodes[self.byzantine]].into(),
            _ => BTreeSet::new(),
        };
        let rule = |writers: &[&str]| CollectionRule {
            writers: writers.iter().map(|role| (*role).to_owned()).collect(),
            ..Default::default()
        };
        Policy {
            unnamed_collections: Default::default(),
            version,
            members,
            revoked,
            collections: [
                (REFERENCE.to_owned(), rule(&["master"])),
                ("stock".to_owned(), rule(&["master", "site"])),
                ("visits".to_owned(), rule(&["master", "site"])),
            ]
            .into(),
        }
    }

    /// Policy `version`, signed by the org.
    pub fn signed(&self, version: u64) -> SignedPolicy {
        self.policy(version).sign(&self.org)
    }

    /// The signed policy as nodes store it.
    pub fn stored(&self, version: u64) -> Vec<u8> {
        serde_json::to_vec(&self.signed(version)).expect("policies serialise")
    }

    /// The node that is not a member in version 1 and is added in version 2 (with at least
    /// four nodes): refused by everyone until the new policy reaches them.
    pub fn newcomer(&self) -> Option<usize> {
        (self.nodes.len() >= 4).then_some(2)
    }

    /// Whether `node` is excluded from the honest set's checks.
    pub fn is_byzantine(&self, node: usize) -> bool {
        node == self.byzantine
    }

    /// One crafted message from the byzantine node, and what it is.
    pub fn attack(&self, rng: &mut SimRng, records: u32, time_ms: i64) -> (&'static str, Vec<u8>) {
        let record = RecordId::new(REFERENCE, &format!("r{}", rng.range(0, u64::from(records))))
            .expect("valid names");
        let push = |envelope: Vec<u8>| {
            Message::Push {
                changes: vec![EnvelopeBytes(envelope)],
            }
            .encode()
        };
        let value = rng.range(0, 1000) as i64;
        let own_change = |author: &NodeId| {
            let mut doc = RecordDoc::new(author);
            let fields = [("f0".to_owned(), FieldEdit::Set(FieldValue::Int(value)))];
            doc.edit(&Edit::Put(fields.into()), time_ms)
                .expect("a fresh document takes an edit")
                .expect("setting a field changes it")
        };
        let sign = |record: &RecordId, bytes: &[u8]| {
            crdt_schema::crafted::sign_raw(&self.byzantine_identity, &self.org_id, record, bytes)
                .into_bytes()
        };
        // Crafted changes go to a collection every member may write, so they reach
        // Automerge rather than stop at the writer rule.
        let open = RecordId::new("crafted", &format!("c{}", rng.range(0, 4))).expect("valid names");
        match rng.range(0, 9) {
            6 => match &self.crafted.panicking {
                Some(panicking) => (
                    "change that makes automerge panic",
                    Message::Push {
                        changes: vec![
                            EnvelopeBytes(sign(&open, &self.crafted.base)),
                            EnvelopeBytes(sign(&open, panicking)),
                        ],
                    }
                    .encode(),
                ),
                None => ("garbage", vec![0xff]),
            },
            7 => (
                "non-canonical change",
                push(sign(&open, &self.crafted.non_canonical)),
            ),
            8 => (
                "compressed change",
                push(sign(&open, &self.crafted.compressed)),
            ),
            0 => {
                // Claims head office's authorship; signed with its own key.
                let change = own_change(&self.nodes[0]);
                let signature = self.byzantine_identity.sign(b"not the signed message");
                let envelope = Envelope::encode(&record, change.raw_bytes(), &signature);
                ("forged signature", push(envelope.into_bytes()))
            }
            1 => {
                let change = own_change(&self.byzantine_identity.node_id());
                let signed =
                    VerifiedChange::sign(&self.byzantine_identity, &self.org_id, record, change);
                (
                    "non-master reference write",
                    push(signed.envelope.as_bytes().to_vec()),
                )
            }
            2 => {
                let change = own_change(&self.byzantine_identity.node_id());
                let signed = VerifiedChange::sign(
                    &self.byzantine_identity,
                    &self.org_id,
                    record,
                    change.clone(),
                );
                let other = RecordId::new("stock", "replayed").expect("valid names");
                let replayed =
                    Envelope::encode(&other, change.raw_bytes(), &signed.signature()).into_bytes();
                ("change replayed into another record", push(replayed))
            }
            3 => (
                "old policy",
                Message::Policy {
                    signed: self.stored(1),
                }
                .encode(),
            ),
            4 => {
                let forged = self.policy(self.issued + 10).sign(&self.byzantine_identity);
                (
                    "policy signed by a non-org key",
                    Message::Policy {
                        signed: serde_json::to_vec(&forged).expect("policies serialise"),
                    }
                    .encode(),
                )
            }
            _ => {
                let length = value as usize % 64 + 1;
                (
                    "garbage",
                    (0..length).map(|_| rng.range(0, 256) as u8).collect(),
                )
            }
        }
    }
}

/// The first change of a record's accepted document (as `changes`: hash, author, deps)
/// that no author `policy` lets write `collection` wrote or built on, by the policy's own
/// rules read here (a member, not revoked, with a writer role; a collection the policy
/// does not name is open to every member), not the core's.
pub fn accepted_offender(
    policy: &Policy,
    collection: &str,
    changes: &[(ChangeHash, NodeId, Vec<ChangeHash>)],
) -> Option<(ChangeHash, NodeId)> {
    let writer = |author: &NodeId| {
        !policy.revoked.contains(author)
            && policy.members.values().any(|member| {
                member.node == *author
                    && match policy.collections.get(collection) {
                        Some(rule) => member.roles.iter().any(|role| rule.writers.contains(role)),
                        None => {
                            policy.unnamed_collections
                                != crdt_schema::policy::UnnamedCollections::Refused
                        }
                    }
            })
    };
    let mut vouched: BTreeSet<ChangeHash> = BTreeSet::new();
    let mut stack: Vec<ChangeHash> = changes
        .iter()
        .filter(|(_, author, _)| writer(author))
        .map(|(hash, _, _)| *hash)
        .collect();
    while let Some(hash) = stack.pop() {
        if vouched.insert(hash)
            && let Some((_, _, deps)) = changes.iter().find(|(held, _, _)| *held == hash)
        {
            stack.extend(deps.iter().copied());
        }
    }
    changes
        .iter()
        .find(|(hash, _, _)| !vouched.contains(hash))
        .map(|(hash, author, _)| (*hash, *author))
}
