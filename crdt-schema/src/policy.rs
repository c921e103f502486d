//! The organisation's signed policy and the verdict on a change.
//!
//! A policy says who the members are (node keys with names and roles), which keys are
//! revoked, and, per collection, which roles may write it and which field schema its
//! records follow. The org key signs the policy's canonical encoding; a node accepts a
//! policy only if the org key it trusts signed it, and prefers a higher version. Two
//! different policies with the same version are ordered by their hash, the same way on
//! every node, so the mesh cannot split over them.
//!
//! [`judge_author`] and [`judge_schema`] are the verdict on one change: pure functions of
//! the policy, the change's author and collection, and the record as of the change, so two
//! honest nodes with the same policy and the same changes reach the same verdicts. The node
//! core (`mesh-core`'s `policy` module) applies them to every change it holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::change::VerifiedChange;
use crate::identity::{Identity, NodeId, OrgId};
use crate::record::FieldValue;
use crate::schema::{CollectionSchema, SchemaError};

/// Domain separation for policy signatures.
const POLICY_CONTEXT: &[u8] = b"mesh/policy/v1";

/// A policy as written and signed. Unknown keys are refused, in the TOML an operator writes
/// and in a signed policy alike: a typo (`writer` for `writers`) must not sign as an empty
/// rule, and a node must not enforce a policy it only partly understands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Higher versions replace lower ones.
    pub version: u64,
    /// Members by name.
    #[serde(default)]
    pub members: BTreeMap<String, Member>,
    /// Node ids whose changes are refused from now on.
    #[serde(default)]
    pub revoked: BTreeSet<NodeId>,
    /// Collections by name.
    #[serde(default)]
    pub collections: BTreeMap<String, CollectionRule>,
    /// What a collection the policy does not name is: open to every member (the default),
    /// or refused, so that a typo (`stokc`) is an error instead of a new collection that
    /// replicates everywhere. Left out of the canonical encoding when open, so policies
    /// signed before it existed stay canonical.
    #[serde(default, skip_serializing_if = "UnnamedCollections::is_open")]
    pub unnamed_collections: UnnamedCollections,
}

/// See [`Policy::unnamed_collections`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnnamedCollections {
    /// Every member may write a collection the policy does not name.
    #[default]
    Open,
    /// Nobody may.
    Refused,
}

impl UnnamedCollections {
    fn is_open(&self) -> bool {
        *self == UnnamedCollections::Open
    }
}

/// One member node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The node's id.
    pub node: NodeId,
    /// Its roles, such as `master` or `site`.
    #[serde(default)]
    pub roles: BTreeSet<String>,
}

/// The rule of one collection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CollectionRule {
    /// Roles whose members may write the collection.
    #[serde(default)]
    pub writers: BTreeSet<String>,
    /// Roles whose members replicate it; absent means every member.
    #[serde(default)]
    pub replicated_by: Option<BTreeSet<String>>,
    /// The records' field schema, if any.
    #[serde(default)]
    pub schema: Option<CollectionSchema>,
}

/// A policy with the org's signature over its canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPolicy {
    /// The canonical encoding of the policy (JSON with sorted keys).
    pub policy: String,
    /// The org key's signature, hex.
    pub signature: String,
}

/// Why a signed policy is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The signature is not the pinned org key's.
    #[error(
        "the policy's signature does not match org {0}: another org signed it, or the file was changed after signing; only the org pinned at `mesh init --org` can sign policies"
    )]
    NotSignedByOrg(String),
    /// The node pins no org, so no policy can be verified.
    #[error(
        "this node trusts no org (it was made without `mesh init --org ORG_ID`), so it can accept no policy; set `org` in its config.toml to the org id printed by `mesh org init`"
    )]
    NoOrgPinned,
    /// The bytes are not a policy.
    #[error("the policy is malformed: {0}")]
    Malformed(String),
    /// A rule names something invalid.
    #[error("the policy is invalid: {0}")]
    Invalid(String),
}

/// Why a change is rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum RejectReason {
    /// The author is not a member.
    NotAMember {
        /// The author.
        author: NodeId,
    },
    /// The author's key is revoked.
    Revoked {
        /// The author.
        author: NodeId,
    },
    /// None of the author's roles may write the collection.
    MayNotWrite {
        /// The author's name in the policy.
        member: String,
        /// The collection.
        collection: String,
        /// The roles that may.
        writers: Vec<String>,
    },
    /// The policy names no such collection and refuses unnamed ones.
    UnnamedCollection {
        /// The collection.
        collection: String,
    },
    /// The change does not continue its author's chain: its sequence number is not one more
    /// than the author's latest change in its history, another change of the author has the
    /// same number (a forked chain), or it builds on such a change. Automerge cannot apply
    /// it, with or without a policy.
    BrokenHistory {
        /// The author.
        author: NodeId,
        /// Its sequence number.
        seq: u64,
    },
    /// Automerge cannot apply the change to the document its history makes (it panicked or
    /// refused), or could not give it back as it came; or the change builds on such a
    /// change. Crafted bytes, never an honest change; with or without a policy.
    Damaging {
        /// The author.
        author: NodeId,
        /// What went wrong.
        problem: String,
    },
    /// The record the change produces breaks the collection's schema.
    Schema {
        /// The collection.
        collection: String,
        /// Every problem.
        errors: Vec<String>,
    },
}

/// The verdict on one change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it.
    Accept,
    /// Quarantine it, with the rule it broke.
    Reject(RejectReason),
}

impl Policy {
    /// The canonical encoding signed by the org: JSON with every map sorted.
    pub fn canonical(&self) -> String {
        serde_json::to_string(self).expect("policies serialise")
    }

    /// Checks names in the policy.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.version == 0 {
            return Err(PolicyError::Invalid(
                "version must be at least 1 (a node without a policy is at version 0)".into(),
            ));
        }
        let mut names_of_node: BTreeMap<&NodeId, &str> = BTreeMap::new();
        for (name, member) in &self.members {
            if let Some(other) = names_of_node.insert(&member.node, name) {
                return Err(PolicyError::Invalid(format!(
                    "members `{other}` and `{name}` have the same node id {}",
                    member.node
                )));
            }
        }
        for name in self.collections.keys() {
            crate::record::check_collection(name)
                .map_err(|error| PolicyError::Invalid(error.to_string()))?;
        }
        for rule in self.collections.values() {
            if let Some(schema) = &rule.schema {
                schema
                    .validate()
                    .map_err(|error| PolicyError::Invalid(error.to_string()))?;
            }
        }
        Ok(())
    }

    /// Writer roles that no member holds, as (collection, role): not an error (a member may
    /// get the role later), but usually a typo worth a warning.
    pub fn roles_without_members(&self) -> Vec<(String, String)> {
        let held: BTreeSet<&String> = self
            .members
            .values()
            .flat_map(|member| &member.roles)
            .collect();
        self.collections
            .iter()
            .flat_map(|(collection, rule)| {
                rule.writers
                    .iter()
                    .filter(|role| !held.contains(role))
                    .map(move |role| (collection.clone(), role.clone()))
            })
            .collect()
    }

    /// The member whose node id is `node`, with its name.
    pub fn member(&self, node: &NodeId) -> Option<(&str, &Member)> {
        self.members
            .iter()
            .find(|(_, member)| member.node == *node)
            .map(|(name, member)| (name.as_str(), member))
    }

    /// Signs the policy with the org key.
    pub fn sign(&self, org: &Identity) -> SignedPolicy {
        let policy = self.canonical();
        let signature = org.sign(&signed_bytes(&policy));
        SignedPolicy {
            policy,
            signature: hex(&signature),
        }
    }
}

impl SignedPolicy {
    /// Checks the org's signature and decodes the policy.
    pub fn verify(&self, org: &OrgId) -> Result<Policy, PolicyError> {
        if *org == OrgId::default() {
            return Err(PolicyError::NoOrgPinned);
        }
        let key = VerifyingKey::from_bytes(org.as_bytes())
            .map_err(|_| PolicyError::NotSignedByOrg(org.to_string()))?;
        let signature: [u8; 64] = unhex(&self.signature)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| PolicyError::Malformed("the signature is not 64 hex bytes".into()))?;
        key.verify_strict(
            &signed_bytes(&self.policy),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| PolicyError::NotSignedByOrg(org.to_string()))?;
        let policy: Policy = serde_json::from_str(&self.policy)
            .map_err(|error| PolicyError::Malformed(error.to_string()))?;
        if policy.canonical() != self.policy {
            return Err(PolicyError::Malformed(
                "the policy is not in canonical form".into(),
            ));
        }
        policy.validate()?;
        Ok(policy)
    }

    /// The hash that breaks ties between different policies of the same version.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.policy.as_bytes()).into()
    }
}

/// Whether `candidate` replaces `current`: a higher version wins; for equal versions the
/// lower hash wins, the same on every node.
pub fn supersedes(candidate: (&Policy, &SignedPolicy), current: (&Policy, &SignedPolicy)) -> bool {
    match candidate.0.version.cmp(&current.0.version) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => candidate.1.hash() < current.1.hash(),
    }
}

/// The verdict on a verified change, given the record's fields and tombstone after it.
pub fn judge(
    policy: &Policy,
    change: &VerifiedChange,
    fields_after: &BTreeMap<String, FieldValue>,
    deleted_after: bool,
) -> Verdict {
    let collection = change.record.collection();
    let verdict = judge_author(policy, &change.author, collection)
        .and_then(|()| judge_schema(policy, collection, fields_after, deleted_after));
    match verdict {
        Ok(()) => Verdict::Accept,
        Err(reason) => Verdict::Reject(reason),
    }
}

/// Whether `author` may write `collection`: a member, not revoked, with a writer role. A
/// collection the policy does not name is open to every member.
pub fn judge_author(
    policy: &Policy,
    author: &NodeId,
    collection: &str,
) -> Result<(), RejectReason> {
    if policy.revoked.contains(author) {
        return Err(RejectReason::Revoked { author: *author });
    }
    let Some((name, member)) = policy.member(author) else {
        return Err(RejectReason::NotAMember { author: *author });
    };
    let rule = policy.collections.get(collection);
    if rule.is_none() && policy.unnamed_collections == UnnamedCollections::Refused {
        return Err(RejectReason::UnnamedCollection {
            collection: collection.to_owned(),
        });
    }
    if let Some(rule) = rule
        && rule.writers.is_disjoint(&member.roles)
    {
        return Err(RejectReason::MayNotWrite {
            member: name.to_owned(),
            collection: collection.to_owned(),
            writers: rule.writers.iter().cloned().collect(),
        });
    }
    Ok(())
}

/// Whether a record's fields and tombstone follow the collection's schema in the policy.
pub fn judge_schema(
    policy: &Policy,
    collection: &str,
    fields: &BTreeMap<String, FieldValue>,
    deleted: bool,
) -> Result<(), RejectReason> {
    let Some(schema) = policy
        .collections
        .get(collection)
        .and_then(|rule| rule.schema.as_ref())
    else {
        return Ok(());
    };
    schema
        .check(fields, deleted)
        .map_err(|errors| RejectReason::Schema {
            collection: collection.to_owned(),
            errors: errors.iter().map(SchemaError::to_string).collect(),
        })
}

impl Policy {
    /// Whether `node` may connect: a member whose key is not revoked.
    pub fn admits(&self, node: &NodeId) -> bool {
        !self.revoked.contains(node) && self.member(node).is_some()
    }

    /// Whether the collection has a field schema.
    pub fn has_schema(&self, collection: &str) -> bool {
        self.collections
            .get(collection)
            .is_some_and(|rule| rule.schema.is_some())
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::NotAMember { author } => {
                write!(f, "author {author} is not a member of the policy")
            }
            RejectReason::Revoked { author } => write!(f, "author {author} is revoked"),
            RejectReason::UnnamedCollection { collection } => write!(
                f,
                "the policy names no collection `{collection}` and refuses unnamed ones (a typo?)"
            ),
            RejectReason::MayNotWrite {
                member,
                collection,
                writers,
            } => write!(
                f,
                "member `{member}` may not write `{collection}`: the policy lets only roles [{}] write it",
                writers.join(", ")
            ),
            RejectReason::BrokenHistory { author, seq } => write!(
                f,
                "change {seq} of {author} does not continue its author's chain (a gap, a fork, or built on one)"
            ),
            RejectReason::Damaging { author, problem } => write!(
                f,
                "a change by {author} would damage the record (it cannot be applied: {problem})"
            ),
            RejectReason::Schema { collection, errors } => {
                write!(
                    f,
                    "the record breaks the schema of `{collection}`: {}",
                    errors.join("; ")
                )
            }
        }
    }
}

fn signed_bytes(policy: &str) -> Vec<u8> {
    let mut bytes = POLICY_CONTEXT.to_vec();
    bytes.extend_from_slice(policy.as_bytes());
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(text.get(index..index + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Edit, RecordDoc};

    fn org() -> Identity {
        Identity::from_seed(1000)
    }

    fn policy(version: u64) -> Policy {
        let member = |seed: u64, role: &str| Member {
            node: Identity::from_seed(seed).node_id(),
            roles: [role.to_owned()].into(),
        };
        Policy {
            unnamed_collections: Default::default(),
            version,
            members: [
                ("hq".to_owned(), member(1, "master")),
                ("clinic1".to_owned(), member(2, "site")),
            ]
            .into(),
            revoked: BTreeSet::new(),
            collections: [
                (
                    "catalogue".to_owned(),
                    CollectionRule {
                        writers: ["master".to_owned()].into(),
                        ..Default::default()
                    },
                ),
                (
                    "stock".to_owned(),
                    CollectionRule {
                        writers: ["master".to_owned(), "site".to_owned()].into(),
                        ..Default::default()
                    },
                ),
            ]
            .into(),
        }
    }

    fn change_by(seed: u64, record: &str) -> VerifiedChange {
        let identity = Identity::from_seed(seed);
        let mut doc = RecordDoc::new(&identity.node_id());
        let edit = Edit::Put(
            [(
                "price".to_owned(),
                crate::FieldEdit::Set(FieldValue::Int(3)),
            )]
            .into(),
        );
        let change = doc.edit(&edit, 0).unwrap().unwrap();
        VerifiedChange::sign(
            &identity,
            &OrgId::from_bytes(*org().node_id().as_bytes()),
            record.parse().unwrap(),
            change,
        )
    }

    fn verdict(policy: &Policy, change: &VerifiedChange) -> Verdict {
        judge(
            policy,
            change,
            &[("price".to_owned(), FieldValue::Int(3))].into(),
            false,
        )
    }

    #[test]
    fn only_masters_write_reference_data_and_the_reason_names_the_rule() {
        let policy = policy(1);
        assert_eq!(
            verdict(&policy, &change_by(1, "catalogue/p1")),
            Verdict::Accept
        );
        assert_eq!(verdict(&policy, &change_by(2, "stock/p1")), Verdict::Accept);
        let Verdict::Reject(reason) = verdict(&policy, &change_by(2, "catalogue/p1")) else {
            panic!("accepted")
        };
        assert_eq!(
            reason.to_string(),
            "member `clinic1` may not write `catalogue`: the policy lets only roles [master] write it"
        );
    }

    #[test]
    fn strangers_and_revoked_members_are_rejected() {
        let mut policy = policy(2);
        assert!(matches!(
            verdict(&policy, &change_by(3, "stock/p1")),
            Verdict::Reject(RejectReason::NotAMember { .. })
        ));
        policy.revoked.insert(Identity::from_seed(2).node_id());
        assert!(matches!(
            verdict(&policy, &change_by(2, "stock/p1")),
            Verdict::Reject(RejectReason::Revoked { .. })
        ));
    }

    #[test]
    fn the_schema_of_a_collection_is_part_of_the_verdict() {
        let mut policy = policy(1);
        let schema = CollectionSchema {
            fields: [(
                "price".to_owned(),
                crate::schema::FieldSchema {
                    field_type: crate::schema::FieldType::String,
                    required: false,
                },
            )]
            .into(),
            allow_other_fields: false,
        };
        policy.collections.get_mut("catalogue").unwrap().schema = Some(schema);
        let Verdict::Reject(RejectReason::Schema { errors, .. }) =
            verdict(&policy, &change_by(1, "catalogue/p1"))
        else {
            panic!("schema not checked")
        };
        assert_eq!(errors, ["field `price` must be string but is integer"]);
    }

    #[test]
    fn only_the_pinned_org_signs_policies_and_tampering_is_caught() {
        let org_id = OrgId::from_bytes(*org().node_id().as_bytes());
        let signed = policy(1).sign(&org());
        assert_eq!(signed.verify(&org_id).unwrap(), policy(1));
        let by_stranger = policy(1).sign(&Identity::from_seed(5));
        assert!(matches!(
            by_stranger.verify(&org_id),
            Err(PolicyError::NotSignedByOrg(_))
        ));
        let mut tampered = signed.clone();
        tampered.policy = tampered.policy.replace("\"version\":1", "\"version\":9");
        assert!(tampered.verify(&org_id).is_err());
    }

    #[test]
    fn higher_versions_win_and_equal_versions_resolve_alike_everywhere() {
        let (one, two) = (policy(1), policy(2));
        let (signed_one, signed_two) = (one.sign(&org()), two.sign(&org()));
        assert!(supersedes((&two, &signed_two), (&one, &signed_one)));
        assert!(!supersedes((&one, &signed_one), (&two, &signed_two)));
        let mut rival = policy(2);
        rival.revoked.insert(Identity::from_seed(2).node_id());
        let signed_rival = rival.sign(&org());
        let rival_wins = supersedes((&rival, &signed_rival), (&two, &signed_two));
        let two_wins = supersedes((&two, &signed_two), (&rival, &signed_rival));
        assert_ne!(
            rival_wins, two_wins,
            "exactly one of two same-version policies wins"
        );
    }

    #[test]
    fn typos_version_zero_and_shared_node_ids_are_refused() {
        let typo = r#"{"version":1,"collections":{"catalogue":{"writer":["master"]}}}"#;
        let error = serde_json::from_str::<Policy>(typo)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `writer`"), "{error}");
        let mut zero = policy(1);
        zero.version = 0;
        assert!(
            zero.validate()
                .unwrap_err()
                .to_string()
                .contains("at least 1")
        );
        let mut shared = policy(1);
        let node = shared.members.values().next().unwrap().node;
        shared.members.insert(
            "again".into(),
            Member {
                node,
                roles: BTreeSet::new(),
            },
        );
        let error = shared.validate().unwrap_err().to_string();
        assert!(error.contains("the same node id"), "{error}");
    }

    #[test]
    fn a_node_without_an_org_says_so_instead_of_blaming_the_signature() {
        let error = policy(1)
            .sign(&org())
            .verify(&OrgId::default())
            .unwrap_err();
        assert_eq!(error, PolicyError::NoOrgPinned);
    }
}
