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

use crate::api::{CommandError, CommandId, Event, PolicyOffer, Reply};
use crate::limits::{RECEIPTS_MAX, REFUSED_PEERS_MAX};
use crate::node::Node;
use crate::status::{PeerState, PolicyConflict, PolicyView, Receipt, RefusedChange, RefusedPeer};
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
enum OfferVerdict {
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
    fn judge_offer(
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

impl Node {
    /// The policy in force, if any.
    pub fn policy(&self) -> Option<&Policy> {
        self.policy.policy()
    }

    /// Whether `peer` may connect: any peer while no policy is in force, afterwards only
    /// members whose key is not revoked. The daemon asks this of every new connection.
    pub fn admits(&self, peer: &NodeId) -> bool {
        match self.policy() {
            Some(policy) => policy.admits(peer),
            None => self
                .config
                .trusted_peers
                .as_ref()
                .is_none_or(|trusted| trusted.contains(peer)),
        }
    }

    /// The node ids allowed to connect: the policy's members while one is in force, else
    /// the trusted peers; `None` for an open mesh (every key).
    pub fn members(&self) -> Option<Vec<NodeId>> {
        match self.policy() {
            Some(policy) => Some(
                policy
                    .members
                    .values()
                    .map(|member| member.node)
                    .filter(|node| !policy.revoked.contains(node))
                    .collect(),
            ),
            None => self
                .config
                .trusted_peers
                .as_ref()
                .map(|trusted| trusted.iter().copied().collect()),
        }
    }

    /// Whether any key may connect: no policy and no list of trusted peers.
    pub fn is_open(&self) -> bool {
        self.policy().is_none() && self.config.trusted_peers.is_none()
    }

    /// Trusts a peer (`mesh peers approve`): without a policy it is admitted from now on.
    /// Returns whether it was newly trusted. An open mesh trusts every key already.
    pub(crate) fn approve_peer(&mut self, peer: NodeId) -> bool {
        self.policy.refused.remove(&peer);
        match &mut self.config.trusted_peers {
            Some(trusted) => trusted.insert(peer),
            None => false,
        }
    }

    /// Refuses a connected peer that is not a member.
    pub(crate) fn refuse_peer(&mut self, peer: NodeId) {
        // The driver may have reported this very attempt already (with its address).
        let noted_now = self
            .policy
            .refused
            .get(&peer)
            .is_some_and(|entry| entry.last_at == self.now);
        if !noted_now {
            self.policy.note_refused(peer, None, self.now);
        }
        self.out
            .disconnect(peer, "not a member of the org's policy".into());
        self.sessions().peer_disconnected(peer);
    }

    /// A signed policy from the user (`from` is `None`) or a peer.
    pub(crate) fn offer_policy(
        &mut self,
        signed: SignedPolicy,
        from: NodeId,
    ) -> Result<PolicyOffer, PolicyError> {
        match self.policy.judge_offer(signed, &self.config.org)? {
            OfferVerdict::Answer(offer) => Ok(offer),
            OfferVerdict::Adopt(in_force) => {
                let version = in_force.policy.version;
                self.adopt_policy(*in_force);
                self.spread_policy(Some(from));
                Ok(PolicyOffer::Adopted { version })
            }
        }
    }

    /// A policy handed to this node by its operator (`mesh policy apply`). If it takes
    /// write rights away, the node first endorses the history it holds (see
    /// [`Node::endorse_held_history`]) and adopts the policy once that is durable. The
    /// command is answered once the policy is saved.
    pub(crate) fn apply_policy(&mut self, id: CommandId, signed: SignedPolicy) {
        if let Some(endorsing) = &self.policy.endorsing {
            let version = endorsing.version;
            let message = format!(
                "policy version {version} is being applied (its endorsements are being saved); try again in a moment"
            );
            return self.out.complete(id, Err(CommandError::Policy(message)));
        }
        let in_force = match self.policy.judge_offer(signed, &self.config.org) {
            Err(error) => {
                return self
                    .out
                    .complete(id, Err(CommandError::Policy(error.to_string())));
            }
            Ok(OfferVerdict::Answer(offer @ PolicyOffer::Unchanged { .. }))
                if self.checkpoints.policy_pending() =>
            {
                // Applied again after its save failed (or while it is being saved): answer
                // once it is durable, as the first time.
                return self.answer_when_policy_saved(id, offer);
            }
            Ok(OfferVerdict::Answer(offer)) => {
                return self.out.complete(id, Ok(Reply::PolicyOffered(offer)));
            }
            Ok(OfferVerdict::Adopt(in_force)) => in_force,
        };
        let me = self.node_id();
        let excluded = if in_force.policy.revoked.contains(&me) {
            Some("revokes this node")
        } else if in_force.policy.member(&me).is_none() {
            Some("does not list this node as a member")
        } else {
            None
        };
        if let Some(excluded) = excluded {
            let message = format!(
                "policy version {} {excluded} ({me}): applied here it would cut this node off from every peer; apply it at a node that stays a member",
                in_force.policy.version
            );
            return self.out.complete(id, Err(CommandError::Policy(message)));
        }
        let waiting = self.endorse_held_history(&in_force.policy);
        if waiting.is_empty() {
            self.adopt_applied(id, *in_force);
        } else {
            self.policy.endorsing = Some(Endorsing {
                version: in_force.policy.version,
                signed: in_force.signed,
                command: id,
                waiting,
            });
        }
    }

    fn adopt_applied(&mut self, id: CommandId, in_force: InForce) {
        let version = in_force.policy.version;
        self.adopt_policy(in_force);
        self.spread_policy(None);
        self.answer_when_policy_saved(id, PolicyOffer::Adopted { version });
    }

    /// Own changes whose append completed: an applied policy whose endorsements are all
    /// durable now goes in force (unless a newer one arrived meanwhile).
    pub(crate) fn own_changes_durable(&mut self, hashes: &[ChangeHash]) {
        let Some(endorsing) = &mut self.policy.endorsing else {
            return;
        };
        for hash in hashes {
            endorsing.waiting.remove(hash);
        }
        if !endorsing.waiting.is_empty() {
            return;
        }
        let Endorsing {
            signed, command, ..
        } = self.policy.endorsing.take().expect("checked above");
        match self.policy.judge_offer(signed, &self.config.org) {
            Ok(OfferVerdict::Adopt(in_force)) => self.adopt_applied(command, *in_force),
            Ok(OfferVerdict::Answer(offer)) => {
                self.out.complete(command, Ok(Reply::PolicyOffered(offer)));
            }
            Err(error) => self
                .out
                .complete(command, Err(CommandError::Policy(error.to_string()))),
        }
    }

    /// Own changes whose append failed: an applied policy waiting for them is not adopted.
    pub(crate) fn own_changes_lost(&mut self, hashes: &BTreeSet<ChangeHash>, error: &str) {
        let lost = self
            .policy
            .endorsing
            .as_ref()
            .is_some_and(|endorsing| !endorsing.waiting.is_disjoint(hashes));
        if !lost {
            return;
        }
        let endorsing = self.policy.endorsing.take().expect("checked above");
        let message = format!(
            "could not save the endorsements policy version {} needs ({error}); the policy was not applied: apply it again",
            endorsing.version
        );
        self.out
            .complete(endorsing.command, Err(CommandError::Storage(message)));
    }

    /// Puts a policy in force: re-judges every record and drops peers that are no longer
    /// members.
    pub(crate) fn adopt_policy(&mut self, in_force: InForce) {
        let version = in_force.policy.version;
        // A tie of an older version is settled once a newer policy is in force.
        if self
            .policy
            .conflict
            .as_ref()
            .is_some_and(|conflict| conflict.version < version)
        {
            self.policy.conflict = None;
        }
        self.policy.in_force = Some(in_force);
        self.checkpoints.policy_changed();
        self.rejudge_all();
        self.schedule_checkpoint();
        let outsiders: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(id, peer)| peer.state == PeerState::Connected && !self.admits(id))
            .map(|(id, _)| *id)
            .collect();
        for peer in outsiders {
            self.refuse_peer(peer);
        }
        self.out.emit(Event::PolicyAdopted { version });
    }

    /// Before a policy applied here takes away someone's right to write a record, this
    /// node (if the new policy lets it write the record) endorses the record: a change that
    /// builds on everything it holds of it. What a valid member built on stays accepted, so
    /// the history this node has seen stays, while what the demoted or revoked author writes
    /// from now on (or wrote unseen, behind a partition) is rejected, the same on every node.
    /// Returns the endorsement changes queued for the log.
    fn endorse_held_history(&mut self, new: &Policy) -> BTreeSet<ChangeHash> {
        let mut queued = BTreeSet::new();
        let me = self.node_id();
        let time_ms = i64::try_from(self.now.as_millis()).unwrap_or(i64::MAX);
        for key in self.records.keys() {
            let Some(entry) = self.records.entry(&key) else {
                continue;
            };
            if !entry.is_visible() {
                continue;
            }
            let record = entry.record().clone();
            let collection = record.collection();
            if policy::judge_author(new, &me, collection).is_err() {
                continue;
            }
            // Only history by authors who were allowed to write it is kept: under the
            // previous policy, or before the first one this node and its trusted peers.
            // Writes by keys that never had the right (a stranger while the mesh was open)
            // are not laundered into accepted history.
            let previous = self
                .policy
                .in_force
                .as_ref()
                .map(|in_force| &in_force.policy);
            let trusted = self.config.trusted_peers.as_ref();
            let was_allowed = |author: &NodeId| match previous {
                Some(previous) => policy::judge_author(previous, author, collection).is_ok(),
                None => *author == me || trusted.is_some_and(|trusted| trusted.contains(author)),
            };
            let loses_a_writer = self
                .records
                .doc_mut(&key)
                .changes_after(&[])
                .iter()
                .filter_map(|change| NodeId::from_slice(change.actor_id().to_bytes()).ok())
                .any(|author| {
                    was_allowed(&author) && policy::judge_author(new, &author, collection).is_err()
                });
            if !loses_a_writer {
                continue;
            }
            if let Ok(Some(change)) = self.records.doc_mut(&key).endorse(new.version, time_ms) {
                queued.insert(self.queue_own_change(record, change));
            }
        }
        queued
    }

    /// Sends the policy in force to every connected peer but `except`.
    fn spread_policy(&mut self, except: Option<NodeId>) {
        let Some(in_force) = &self.policy.in_force else {
            return;
        };
        let message = Message::Policy {
            signed: serde_json::to_vec(&in_force.signed).expect("policies serialise"),
        };
        let targets: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(id, peer)| peer.is_ready() && Some(**id) != except)
            .map(|(id, _)| *id)
            .collect();
        for peer in targets {
            self.out.send(peer, &message);
        }
    }

    /// Re-judges every record under the policy in force.
    pub(crate) fn rejudge_all(&mut self) {
        for key in self.records.keys() {
            let rejudged = self.judge().rejudge(&key, Vec::new());
            if rejudged.changed {
                self.announce_record(&key, None, Vec::new());
            }
        }
    }

    /// The changes of a record's accepted document: (hash, author, dependencies). For
    /// checkers that judge what a node shows independently of the node.
    pub fn record_changes(
        &mut self,
        record: &crdt_schema::RecordId,
    ) -> Vec<(ChangeHash, NodeId, Vec<ChangeHash>)> {
        if self.records.entry(record.as_str()).is_none() {
            return Vec::new();
        }
        self.records
            .doc_mut(record.as_str())
            .changes_after(&[])
            .iter()
            .filter_map(|change| {
                let author = NodeId::from_slice(change.actor_id().to_bytes()).ok()?;
                Some((change.hash(), author, change.deps().to_vec()))
            })
            .collect()
    }
}

/// Lower-case hex of some bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
