//! The org's policy inside a node: which policy is in force, who may connect, and the
//! verdict on every change.
//!
//! **The verdict rule.** Under a policy, a record's *accepted* changes are every change
//! whose author may write the record's collection (a member, not revoked, with a writer
//! role, and the record as of that change follows the collection's schema), together with
//! every change such an accepted change builds on: what a valid member built on is part
//! of accepted history, whoever wrote it. Everything else the node holds of the record is
//! *quarantined*. This is a pure function of the policy and the set of changes held, so
//! two honest nodes holding the same changes and the same policy hold the same records and
//! the same quarantine, whatever order things arrived in.
//!
//! Quarantined changes are durable, never applied and never pushed, but reconciliation
//! carries them like any other held change, so that every honest node ends up judging the
//! same set. Without that, which node had seen a rejected change would depend on who
//! happened to hear from whom, and a later policy could not be applied the same way
//! everywhere. Changes that fail verification (bad signature, garbage) are never held.
//!
//! A newer policy makes the node re-judge every record and rebuild those whose accepted
//! set changed; Automerge cannot remove a change, so a rebuilt document is made afresh
//! from the accepted changes.

use std::collections::{BTreeMap, BTreeSet};

use crdt_schema::policy::{self, Policy, PolicyError, SignedPolicy};
use crdt_schema::{ChangeHash, NodeId, OrgId};

use crate::api::{CommandError, CommandId, PolicyOffer, Reply};
use crate::limits::{RECEIPTS_MAX, REFUSED_PEERS_MAX};
use crate::status::{PolicyConflict, PolicyView, Receipt, RefusedChange, RefusedPeer};
use crate::time::Instant;
use crate::wire::{Message, PolicyTag};

/// The policy this node enforces, with its signature.
pub(crate) struct InForce {
    pub(crate) policy: Policy,
    pub(crate) signed: SignedPolicy,
    pub(crate) hash: [u8; 32],
}

/// The node's policy state.
#[derive(Default)]
pub(crate) struct PolicyState {
    pub(crate) in_force: Option<InForce>,
    /// A different policy of the same version was seen: an alarm for the operator.
    pub(crate) conflict: Option<PolicyConflict>,
    /// Connection attempts refused because the peer is not a member.
    pub(crate) refused: BTreeMap<NodeId, RefusedPeer>,
    /// Receipts from peers that rejected this node's own changes, oldest first.
    pub(crate) receipts: Vec<Receipt>,
    /// Changes refused before they could be held (bad signature, malformed), newest last.
    pub(crate) refused_changes: Vec<RefusedChange>,
    /// A policy applied here that waits for its endorsements to be durable.
    pub(crate) endorsing: Option<Endorsing>,
}

/// A policy applied at this node that takes write rights away: it is put in force (and
/// sent to peers, and saved) only once the endorsements of the history this node holds are
/// durable, so a crash can never leave the mesh with the policy and without them.
pub(crate) struct Endorsing {
    signed: SignedPolicy,
    version: u64,
    command: CommandId,
    /// Endorsement changes whose append has not completed yet.
    waiting: BTreeSet<ChangeHash>,
}

/// What to do with an offered policy.
pub(crate) enum OfferVerdict {
    /// Put it in force.
    Adopt(Box<InForce>),
    /// Nothing to adopt; answer this.
    Answer(PolicyOffer),
}

impl PolicyState {
    /// The policy in force, if any.
    pub(crate) fn policy(&self) -> Option<&Policy> {
        self.in_force.as_ref().map(|in_force| &in_force.policy)
    }

    pub(crate) fn policy_tag(&self) -> Option<PolicyTag> {
        self.in_force.as_ref().map(|in_force| PolicyTag {
            version: in_force.policy.version,
            hash: in_force.hash,
        })
    }

    /// Records a refused connection attempt (the driver refused it, or the core does).
    pub(crate) fn note_refused(&mut self, peer: NodeId, address: Option<String>, now: Instant) {
        let refused = &mut self.refused;
        if !refused.contains_key(&peer) && refused.len() >= REFUSED_PEERS_MAX {
            // Forget the stalest attempt rather than grow without bound.
            if let Some(stalest) = refused
                .values()
                .min_by_key(|entry| entry.last_at)
                .map(|entry| entry.peer_id)
            {
                refused.remove(&stalest);
            }
        }
        let entry = refused.entry(peer).or_insert(RefusedPeer {
            peer_id: peer,
            attempts: 0,
            last_at: now,
            address: None,
        });
        entry.attempts += 1;
        entry.last_at = now;
        if address.is_some() {
            entry.address = address;
        }
    }

    /// Whether `signed` should be put in force here; records a same-version conflict.
    pub(crate) fn judge_offer(
        &mut self,
        signed: SignedPolicy,
        org: &OrgId,
    ) -> Result<OfferVerdict, PolicyError> {
        let policy = signed.verify(org)?;
        let hash = signed.hash();
        if let Some(current) = &self.in_force {
            if current.hash == hash {
                return Ok(OfferVerdict::Answer(PolicyOffer::Unchanged {
                    version: policy.version,
                }));
            }
            if current.policy.version == policy.version {
                let (kept, other) = match hash < current.hash {
                    true => (hash, current.hash),
                    false => (current.hash, hash),
                };
                self.conflict = Some(PolicyConflict {
                    version: policy.version,
                    kept: hex(&kept),
                    other: hex(&other),
                });
            }
            if !policy::supersedes((&policy, &signed), (&current.policy, &current.signed)) {
                return Ok(OfferVerdict::Answer(PolicyOffer::Older {
                    in_force: current.policy.version,
                }));
            }
        }
        Ok(OfferVerdict::Adopt(Box::new(InForce {
            policy,
            signed,
            hash,
        })))
    }

    /// A peer's hello or round named its policy: ours, to send it, if ours is newer.
    pub(crate) fn newer_than(&self, theirs: Option<PolicyTag>) -> Option<Message> {
        let in_force = self.in_force.as_ref()?;
        let ours_newer = match theirs {
            None => true,
            Some(theirs) => {
                (in_force.policy.version, std::cmp::Reverse(in_force.hash))
                    > (theirs.version, std::cmp::Reverse(theirs.hash))
            }
        };
        ours_newer.then(|| Message::Policy {
            signed: serde_json::to_vec(&in_force.signed).expect("policies serialise"),
        })
    }

    /// The policy in force, for `mesh policy show`.
    pub(crate) fn view(&self) -> Option<PolicyView> {
        self.in_force.as_ref().map(|in_force| PolicyView {
            version: in_force.policy.version,
            hash: hex(&in_force.hash),
            policy: in_force.policy.clone(),
            conflict: self.conflict.clone(),
        })
    }

    /// The name to show for a peer: under a policy, a member's name in the policy (a peer
    /// could call itself "hq"); otherwise the name it gave itself.
    pub(crate) fn display_name(&self, peer: &NodeId, claimed: Option<&str>) -> Option<String> {
        match self.policy() {
            Some(policy) => policy.member(peer).map(|(name, _)| name.to_owned()),
            None => claimed.map(str::to_owned),
        }
    }

    /// A peer says it rejected one of our changes (the caller checked that the change is
    /// this node's and held: anyone could otherwise fill "own changes rejected" with
    /// invented receipts and push the real ones out).
    pub(crate) fn receipt_received(
        &mut self,
        from: NodeId,
        record: String,
        change: [u8; 32],
        reason: String,
        now: Instant,
    ) {
        let change = hex(&change);
        let receipts = &mut self.receipts;
        if receipts
            .iter()
            .any(|receipt| receipt.change == change && receipt.rejected_by == from)
        {
            return;
        }
        if receipts.len() >= RECEIPTS_MAX {
            receipts.remove(0);
        }
        receipts.push(Receipt {
            record,
            change,
            reason,
            rejected_by: from,
            at: now,
        });
    }
}

/// What to do with a policy the operator applies here (`mesh policy apply`).
pub(crate) enum ApplyVerdict {
    /// Refuse the command with this error.
    Refuse(CommandError),
    /// Nothing to adopt: answer now.
    Answer(PolicyOffer),
    /// The policy in force again, while its save is pending: answer once it is durable.
    AnswerWhenSaved(PolicyOffer),
    /// Endorse the held history, then put it in force.
    Adopt(Box<InForce>),
}

/// An applied policy whose endorsements are all durable, with its command.
pub(crate) struct Endorsed {
    pub(crate) command: CommandId,
    pub(crate) verdict: Result<OfferVerdict, PolicyError>,
}

impl PolicyState {
    /// Whether `peer` may connect: any peer while no policy is in force (but for a list of
    /// `trusted` peers, if the node keeps one), afterwards only members whose key is not
    /// revoked.
    pub(crate) fn admits(&self, peer: &NodeId, trusted: Option<&BTreeSet<NodeId>>) -> bool {
        match self.policy() {
            Some(policy) => policy.admits(peer),
            None => trusted.is_none_or(|trusted| trusted.contains(peer)),
        }
    }

    /// The node ids allowed to connect: the policy's members while one is in force, else
    /// the trusted peers; `None` for an open mesh (every key).
    pub(crate) fn members(&self, trusted: Option<&BTreeSet<NodeId>>) -> Option<Vec<NodeId>> {
        match self.policy() {
            Some(policy) => Some(
                policy
                    .members
                    .values()
                    .map(|member| member.node)
                    .filter(|node| !policy.revoked.contains(node))
                    .collect(),
            ),
            None => trusted.map(|trusted| trusted.iter().copied().collect()),
        }
    }

    /// Trusts a peer (`mesh peers approve`): without a policy it is admitted from now on.
    /// Says whether it was newly trusted. An open node trusts every key already, and a node
    /// does not approve itself.
    pub(crate) fn approve(
        &mut self,
        peer: NodeId,
        me: &NodeId,
        trusted: &mut Option<BTreeSet<NodeId>>,
    ) -> Result<Reply, CommandError> {
        let Some(trusted) = trusted else {
            let message =
                "this node is open (made with `mesh init --open`): it admits every key already"
                    .to_owned();
            return Err(CommandError::Invalid(message));
        };
        if peer == *me {
            return Err(CommandError::Invalid(
                "that is this node's own id".to_owned(),
            ));
        }
        self.refused.remove(&peer);
        Ok(Reply::PeerApproved {
            newly: trusted.insert(peer),
            policy_in_force: self.in_force.is_some(),
        })
    }

    /// Notes that the core refuses a connected peer that is not a member, unless the
    /// driver reported this very attempt already (with its address).
    pub(crate) fn note_refused_member(&mut self, peer: NodeId, now: Instant) {
        let noted_now = self
            .refused
            .get(&peer)
            .is_some_and(|entry| entry.last_at == now);
        if !noted_now {
            self.note_refused(peer, None, now);
        }
    }

    /// A policy handed to this node `me` by its operator. It is refused while another
    /// waits for its endorsements, and if it would cut this node off (a policy that
    /// revokes it or does not list it is applied at a node that stays a member).
    pub(crate) fn judge_apply(
        &mut self,
        signed: SignedPolicy,
        org: &OrgId,
        me: &NodeId,
        save_pending: bool,
    ) -> ApplyVerdict {
        if let Some(endorsing) = &self.endorsing {
            let version = endorsing.version;
            let message = format!(
                "policy version {version} is being applied (its endorsements are being saved); try again in a moment"
            );
            return ApplyVerdict::Refuse(CommandError::Policy(message));
        }
        let in_force = match self.judge_offer(signed, org) {
            Err(error) => return ApplyVerdict::Refuse(CommandError::Policy(error.to_string())),
            Ok(OfferVerdict::Answer(offer @ PolicyOffer::Unchanged { .. })) if save_pending => {
                // Applied again after its save failed (or while it is being saved): answer
                // once it is durable, as the first time.
                return ApplyVerdict::AnswerWhenSaved(offer);
            }
            Ok(OfferVerdict::Answer(offer)) => return ApplyVerdict::Answer(offer),
            Ok(OfferVerdict::Adopt(in_force)) => in_force,
        };
        let excluded = if in_force.policy.revoked.contains(me) {
            Some("revokes this node")
        } else if in_force.policy.member(me).is_none() {
            Some("does not list this node as a member")
        } else {
            None
        };
        match excluded {
            Some(excluded) => {
                let message = format!(
                    "policy version {} {excluded} ({me}): applied here it would cut this node off from every peer; apply it at a node that stays a member",
                    in_force.policy.version
                );
                ApplyVerdict::Refuse(CommandError::Policy(message))
            }
            None => ApplyVerdict::Adopt(in_force),
        }
    }

    /// An applied policy waits for its endorsement changes (`waiting`) to be durable.
    pub(crate) fn await_endorsements(
        &mut self,
        in_force: InForce,
        command: CommandId,
        waiting: BTreeSet<ChangeHash>,
    ) {
        self.endorsing = Some(Endorsing {
            version: in_force.policy.version,
            signed: in_force.signed,
            command,
            waiting,
        });
    }

    /// Own changes whose append completed: an applied policy whose endorsements are all
    /// durable now is judged again (a newer one may have arrived meanwhile).
    pub(crate) fn own_changes_durable(
        &mut self,
        hashes: &[ChangeHash],
        org: &OrgId,
    ) -> Option<Endorsed> {
        let endorsing = self.endorsing.as_mut()?;
        for hash in hashes {
            endorsing.waiting.remove(hash);
        }
        if !endorsing.waiting.is_empty() {
            return None;
        }
        let Endorsing {
            signed, command, ..
        } = self.endorsing.take().expect("checked above");
        let verdict = self.judge_offer(signed, org);
        Some(Endorsed { command, verdict })
    }

    /// Own changes whose append failed: an applied policy waiting for them is not adopted.
    /// Returns its command and the error to answer it with.
    pub(crate) fn own_changes_lost(
        &mut self,
        hashes: &BTreeSet<ChangeHash>,
        error: &str,
    ) -> Option<(CommandId, CommandError)> {
        let lost = self
            .endorsing
            .as_ref()
            .is_some_and(|endorsing| !endorsing.waiting.is_disjoint(hashes));
        if !lost {
            return None;
        }
        let endorsing = self.endorsing.take().expect("checked above");
        let message = format!(
            "could not save the endorsements policy version {} needs ({error}); the policy was not applied: apply it again",
            endorsing.version
        );
        Some((endorsing.command, CommandError::Storage(message)))
    }

    /// Puts a policy in force. A tie of an older version is settled by it.
    pub(crate) fn put_in_force(&mut self, in_force: InForce) {
        let version = in_force.policy.version;
        if self
            .conflict
            .as_ref()
            .is_some_and(|conflict| conflict.version < version)
        {
            self.conflict = None;
        }
        self.in_force = Some(in_force);
    }

    /// The policy in force as a message for peers.
    pub(crate) fn message(&self) -> Option<Message> {
        let in_force = self.in_force.as_ref()?;
        Some(Message::Policy {
            signed: serde_json::to_vec(&in_force.signed).expect("policies serialise"),
        })
    }
}

/// Lower-case hex of some bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
