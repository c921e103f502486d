//! The node state machine: `handle(now, input) -> effects`.
//!
//! Everything that can happen to a node is an [`Input`]; everything it asks its driver to
//! do is an [`Effect`]. One call handles one input and returns the effects in the order
//! the driver must carry them out.
//!
//! The write path, local or remote, is one pipeline:
//! 1. a change is verified (remote) or made and signed (local);
//! 2. it joins the next log append; at most one append is in flight, so everything that
//!    arrives meanwhile is committed together (group commit);
//! 3. when the driver reports the append durable, remote changes are applied, local writes
//!    are acknowledged, and only then are the changes pushed to peers.

use std::collections::{BTreeMap, BTreeSet};

use crdt_schema::policy::{Policy, PolicyError, SignedPolicy};
use crdt_schema::{ChangeHash, Edit, Identity, NodeId, RecordId, RecordView, VerifiedChange};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

use crate::admit::{self, Admission, AdmitParts};
use crate::api::{
    Command, CommandError, CommandId, Effect, Event, Input, PolicyOffer, Queues, Reply,
};
use crate::apply::{self, Apply};
use crate::checkpoint::{Checkpoints, PolicyToSave};
use crate::config::Config;
use crate::gossip;
use crate::judge::Judge;
use crate::local;
use crate::outbox::Outbox;
use crate::peers::{self, Peer};
use crate::pipeline::{Origin, Pipeline, PipelineEntry};
use crate::policy::{ApplyVerdict, Endorsed, InForce, OfferVerdict, PolicyState};
use crate::reads;
use crate::records::Records;
use crate::restore::{self, Restored};
use crate::status::{Counters, PeerState, Status};
use crate::storage::{Restore, StorageError, StorageOpId, StorageOps};
use crate::sync::{Routed, Sessions, SyncLog};
use crate::time::Instant;
use crate::views::{self, StatusSources};

/// One mesh node: all it decides, none of its IO.
pub struct Node {
    pub(crate) config: Config,
    pub(crate) identity: Identity,
    pub(crate) rng: ChaCha8Rng,
    pub(crate) now: Instant,
    pub(crate) records: Records,
    pub(crate) pipeline: Pipeline,
    admission: Admission,
    pub(crate) peers: BTreeMap<NodeId, Peer>,
    pub(crate) counters: Counters,
    sync_log: SyncLog,
    storage_ops: StorageOps,
    pub(crate) checkpoints: Checkpoints,
    last_local_change: Option<Instant>,
    last_remote_change: Option<Instant>,
    pub(crate) out: Outbox,
    pub(crate) policy: PolicyState,
    /// Records re-judged while local changes awaited their append; judged again after.
    pub(crate) rejudge_after_ack: BTreeSet<String>,
}

impl Node {
    /// A node with no records. Feed [`Input::Restore`] first if storage holds any.
    pub fn new(config: Config, identity: Identity, seed: u64) -> Node {
        let records = Records::new(identity.node_id(), config.document_cache_bytes);
        Node {
            config,
            identity,
            rng: ChaCha8Rng::seed_from_u64(seed),
            now: Instant::default(),
            records,
            pipeline: Pipeline::default(),
            admission: Admission::default(),
            peers: BTreeMap::new(),
            counters: Counters::default(),
            sync_log: SyncLog::default(),
            storage_ops: StorageOps::default(),
            checkpoints: Checkpoints::default(),
            last_local_change: None,
            last_remote_change: None,
            out: Outbox::default(),
            policy: PolicyState::default(),
            rejudge_after_ack: BTreeSet::new(),
        }
    }

    /// Where the node reads the documents of the records a [`Restore::index`] names, and
    /// those it dropped from its cache after saving them; set before [`Input::Restore`].
    /// Without one, a dropped document stays in memory as its saved bytes.
    pub fn use_document_store(&mut self, store: Box<dyn crate::storage::DocumentStore>) {
        self.records.set_store(store);
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.identity.node_id()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Feeds one input; returns what the driver must do, in order.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        // Time never runs backwards inside the core, whatever the driver's clock does.
        self.now = self.now.max(now);
        match input {
            Input::Restore(restore) => self.restore(restore),
            Input::Command { id, command } => self.command(id, command),
            Input::PeerConnecting { peer } => self.sessions().peer_connecting(peer),
            Input::PeerConnected { peer } => {
                if peer != self.node_id() && !self.admits(&peer) {
                    // Once a policy is in force only members may connect. The daemon
                    // refuses them at the transport already; this covers every other driver.
                    self.refuse_peer(peer);
                } else {
                    self.sessions().peer_connected(peer);
                }
            }
            Input::PeerRefused { peer, address } => {
                self.policy.note_refused(peer, address, self.now)
            }
            Input::PeerDisconnected { peer } => self.sessions().transport_disconnected(peer),
            Input::MessageReceived { from, bytes } => self.message_received(from, bytes),
            Input::StorageDone { op, result } => self.storage_done(op, result),
            Input::Tick => self.tick(),
        }
        self.start_append();
        for error in self.records.take_damaged() {
            self.counters.storage_errors += 1;
            self.out.emit(Event::StorageFailed { error });
        }
        let effects = self.out.take();
        peers::count_sends(&mut self.peers, &effects);
        effects
    }

    /// When the driver must next call `handle(now, Input::Tick)`.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut deadline: Option<Instant> = None;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                deadline = Some(deadline.map_or(at, |current| current.min(at)));
            }
        };
        consider(self.checkpoints.deadline());
        for peer in self.peers.values() {
            for at in peer.timer_deadlines(self.config.sync_stall_timeout) {
                consider(Some(at));
            }
        }
        consider(self.admission.deadline());
        deadline
    }

    /// Whether this node holds `hash` as a durable change of `record`. For checkers: reads
    /// only the index.
    pub fn holds_change(&self, record: &RecordId, hash: &ChangeHash) -> bool {
        self.records
            .entry(record.as_str())
            .is_some_and(|entry| entry.signatures().contains_key(hash))
    }

    /// Whether this node holds `hash` of `record` in quarantine. For checkers.
    pub fn holds_quarantined(&self, record: &RecordId, hash: &ChangeHash) -> bool {
        self.records
            .entry(record.as_str())
            .is_some_and(|entry| entry.quarantine().contains_key(hash))
    }

    /// Every quarantined change as (record, change), in order. For checkers.
    pub fn quarantined(&self) -> Vec<(String, ChangeHash)> {
        views::quarantined(&self.records)
    }

    /// The current length of every queue that grows with peer input, for checkers and
    /// metrics. Cheap: no document is loaded.
    pub fn queues(&self) -> Queues {
        views::queues(
            &self.peers,
            &self.records,
            self.admission.pending_len(),
            self.pipeline.remote_len(),
            self.sync_log.history.len(),
        )
    }

    /// The node's status, from indexes only: no document is loaded.
    pub fn status(&self) -> Status {
        views::status(StatusSources {
            me: self.node_id(),
            records: &self.records,
            peers: &self.peers,
            policy: &self.policy,
            counters: &self.counters,
            last_local_change: self.last_local_change,
            last_remote_change: self.last_remote_change,
            last_sync: self.sync_log.last_sync,
            pending_changes: self.admission.pending_len(),
            unflushed_changes: self.pipeline.unflushed_len(),
            open: self.is_open(),
        })
    }

    // ----- start -----

    fn restore(&mut self, restore: Restore) {
        let me = self.node_id();
        let Restored { replayed, stale } = restore::load(
            restore,
            &self.config.org,
            &me,
            &mut self.policy.in_force,
            &mut self.records,
            &mut self.counters,
            &mut self.out,
        );
        for change in replayed {
            let key = change.record.as_str().to_owned();
            if admit::holds(&self.records, &self.pipeline, &key, &change.hash()) {
                continue;
            }
            if admit::deps_held(&self.records, &self.pipeline, &change) {
                let me = self.node_id();
                self.apply()
                    .remote_batch(vec![(me, change, Origin::Log)], BTreeMap::new());
            } else {
                self.counters.changes_dropped += 1;
            }
        }
        // Records saved under another policy than the one restored are judged again.
        for key in stale {
            if self.records.entry(&key).is_some() {
                self.judge().rejudge(&key, Vec::new());
            }
        }
    }

    // ----- commands -----

    fn command(&mut self, id: CommandId, command: Command) {
        match command {
            Command::Put { record, fields } => self.write(id, record, Edit::Put(fields)),
            Command::Delete { record } => {
                if self.records.entry(record.as_str()).is_none() {
                    self.out.complete(id, Err(CommandError::NotFound(record)));
                } else {
                    self.write(id, record, Edit::Delete);
                }
            }
            Command::Get { record } => {
                let mut view = reads::record(&mut self.records, &record);
                if let Some(view) = view.as_mut() {
                    self.name_authors(view);
                }
                self.out.complete(id, Ok(Reply::Record(view)));
            }
            Command::List {
                collection,
                after,
                limit,
            } => {
                let (mut records, next) =
                    reads::list(&mut self.records, &collection, after.as_deref(), limit);
                for view in &mut records {
                    self.name_authors(view);
                }
                self.out.complete(id, Ok(Reply::Records { records, next }));
            }
            Command::Status => {
                let status = self.status();
                self.out.complete(id, Ok(Reply::Status(Box::new(status))));
            }
            Command::SyncNow { peer } => self.sessions().sync_now(id, peer),
            Command::SyncAbort => {
                let sessions = self.sessions().abort_syncs();
                self.out.complete(id, Ok(Reply::SyncAborted { sessions }));
            }
            Command::History => {
                let rows = self.sync_log.history.iter().rev().cloned().collect();
                self.out.complete(id, Ok(Reply::History(rows)));
            }
            Command::Export { record } => match reads::export(&mut self.records, &record) {
                Some(bytes) => self.out.complete(id, Ok(Reply::Document(bytes))),
                None => self.out.complete(id, Err(CommandError::NotFound(record))),
            },
            Command::ApplyPolicy { signed } => self.apply_policy(id, signed),
            Command::ShowPolicy => {
                let view = self.policy.view().map(Box::new);
                self.out.complete(id, Ok(Reply::Policy(view)));
            }
            Command::Quarantine => {
                let held = views::quarantine_rows(&self.records, self.policy(), self.node_id());
                let refused = self.policy.refused_changes.clone();
                self.out
                    .complete(id, Ok(Reply::Quarantine { held, refused }));
            }
            Command::ApprovePeer { peer } => {
                let me = self.node_id();
                let reply = self
                    .policy
                    .approve(peer, &me, &mut self.config.trusted_peers);
                self.out.complete(id, reply);
            }
        }
    }

    fn write(&mut self, id: CommandId, record: RecordId, edit: Edit) {
        let written = local::write(
            &record,
            &edit,
            self.now,
            &self.config,
            self.policy
                .in_force
                .as_ref()
                .map(|in_force| &in_force.policy),
            &self.identity,
            &mut self.records,
        );
        match written {
            Err(error) => self.out.complete(id, Err(error)),
            Ok(change) => {
                if change.is_some() {
                    self.last_local_change = Some(self.now);
                }
                self.pipeline.queue_local(Some(id), record, change);
            }
        }
    }

    /// Queues a change this node made by itself (not for a command) for the next append.
    /// Answers `id` with `offer` once the policy in force is in a durable checkpoint, and
    /// starts that checkpoint now rather than at the next interval.
    pub(crate) fn answer_when_policy_saved(&mut self, id: CommandId, offer: PolicyOffer) {
        if self
            .checkpoints
            .answer_when_policy_saved(id, offer, self.now, &mut self.out)
        {
            self.checkpoint();
        }
    }

    /// Returns the change's hash.
    pub(crate) fn queue_own_change(
        &mut self,
        record: RecordId,
        change: crdt_schema::Change,
    ) -> ChangeHash {
        let change = local::sign(
            record.clone(),
            change,
            &self.config,
            &self.identity,
            &mut self.records,
        );
        self.last_local_change = Some(self.now);
        let hash = change.hash();
        self.pipeline.queue_local(None, record, Some(change));
        hash
    }

    // ----- the write pipeline -----

    /// Starts the next log append if none is in flight.
    fn start_append(&mut self) {
        if let Some(entries) = self.pipeline.start(&mut self.storage_ops, &mut self.out) {
            self.append_done(entries);
        }
    }

    fn storage_done(&mut self, op: StorageOpId, result: Result<(), StorageError>) {
        if self.checkpoints.owns(op) {
            let failed = self
                .checkpoints
                .complete(op, result, &mut self.records, &mut self.out);
            if let Some(error) = failed {
                self.counters.storage_errors += 1;
                self.schedule_checkpoint();
                self.out.emit(Event::StorageFailed { error: error.0 });
            }
            return;
        }
        let Some(entries) = self.pipeline.take_completed(op) else {
            // A completion for nothing we asked: a driver bug, not a peer's doing.
            panic!("storage completion for unknown op {op:?}");
        };
        match result {
            Ok(()) => self.append_done(entries),
            Err(error) => self.append_failed(entries, error),
        }
    }

    /// The append is durable: acknowledge, apply, announce, push (apply.rs).
    fn append_done(&mut self, entries: Vec<PipelineEntry>) {
        let mut remote = Vec::new();
        let mut pushed: Vec<(Option<NodeId>, VerifiedChange)> = Vec::new();
        let mut own_durable = Vec::new();
        for entry in entries {
            match entry {
                PipelineEntry::Local {
                    command,
                    record,
                    change,
                } => {
                    own_durable.extend(change.as_ref().map(VerifiedChange::hash));
                    let to_push = self.apply().local_durable(command, record, change);
                    pushed.extend(to_push.map(|change| (None, change)));
                }
                PipelineEntry::Remote {
                    from,
                    change,
                    origin,
                    counted,
                } => {
                    self.pipeline.settle(&change);
                    if let Origin::Session { id, initiator } = origin
                        && counted
                        && let Some(session) = self
                            .peers
                            .get_mut(&from)
                            .and_then(|peer| peer.session_mut(id, initiator))
                    {
                        session.pipelined_settled();
                    }
                    if origin == Origin::Push {
                        pushed.push((Some(from), change.clone()));
                    }
                    remote.push((from, change, origin));
                }
            }
        }
        let mut whole = BTreeMap::new();
        for (_, change, _) in &remote {
            let key = change.record.as_str();
            if let Some(document) = self.pipeline.take_whole(key) {
                whole.insert(key.to_owned(), document);
            }
        }
        let mut apply = self.apply();
        let accepted = apply.remote_batch(remote, whole);
        apply.rejudge_acknowledged();
        let pushed = apply.relayable(pushed, &accepted);
        self.schedule_checkpoint();
        self.push_to_peers(pushed);
        // After the push: peers get a policy's endorsements before the policy.
        self.own_changes_durable(&own_durable);
        self.release_pending();
        self.sessions().resume_sessions();
    }

    /// Tells the change feed that a record's durable state changed.
    pub(crate) fn announce_record(
        &mut self,
        key: &str,
        from: Option<NodeId>,
        authors: Vec<NodeId>,
    ) {
        apply::announce_record(&self.records, &mut self.out, key, from, authors);
    }

    /// The append failed: nothing in it is durable. Fail its writes, undo its local changes
    /// and every queued local change that could build on them, drop its remote changes
    /// (reconciliation brings them again).
    fn append_failed(&mut self, entries: Vec<PipelineEntry>, error: StorageError) {
        self.counters.storage_errors += 1;
        let undone = self
            .pipeline
            .fail(entries, &error, &mut self.out, &mut self.counters);
        let lost: BTreeSet<ChangeHash> = undone.values().flatten().copied().collect();
        if let Some((command, lost)) = self.policy.own_changes_lost(&lost, &error.0) {
            self.out.complete(command, Err(lost));
        }
        let me = self.node_id();
        for (key, hashes) in undone {
            let still_held = local::undo(&mut self.records, &me, &key, &hashes);
            if still_held && self.policy.in_force.is_some() {
                // The undone write may have carried this node's quarantined changes into
                // the document (see `local::own_quarantined_chain`): judge it again.
                self.judge().rejudge(&key, Vec::new());
            }
        }
        // The dropped remote changes belonged to sessions that now cannot finish; end
        // them, and the next timer reconciles again.
        self.sessions()
            .fail_all_sessions(&format!("storage failed: {}", error.0));
        self.out.emit(Event::StorageFailed { error: error.0 });
    }

    // ----- peers -----

    /// A peer's message: the sessions handle what is theirs and hand back the rest.
    fn message_received(&mut self, from: NodeId, bytes: Vec<u8>) {
        match self.sessions().receive(from, bytes) {
            None => {}
            Some(Routed::Admit {
                envelopes,
                origin,
                refusal,
            }) => {
                let admitted = self.admit_changes(from, envelopes, origin);
                if !admitted {
                    self.sessions().reject_message(from, refusal.into());
                }
            }
            Some(Routed::AdmitWhole { snapshots, origin }) => {
                let (admission, mut parts) = self.admission();
                let admitted = admission
                    .admit_whole(from, snapshots, origin, &mut parts)
                    .all_valid();
                if !admitted {
                    let refusal = "sent a record whose document or changes failed verification";
                    self.sessions().reject_message(from, refusal.into());
                }
            }
            Some(Routed::Policy { signed }) => {
                if let Err(error) = self.offer_policy(signed, from) {
                    let reason = format!("sent a policy this node refuses: {error}");
                    self.sessions().reject_message(from, reason);
                }
            }
            Some(Routed::Receipt {
                record,
                change,
                reason,
            }) => {
                let me = self.node_id();
                if self
                    .records
                    .holds_own_change(&record, &ChangeHash(change), &me)
                {
                    self.policy
                        .receipt_received(from, record, change, reason, self.now);
                }
            }
        }
    }

    /// The peers and their sessions (sync.rs).
    pub(crate) fn sessions(&mut self) -> Sessions<'_> {
        Sessions {
            me: self.identity.node_id(),
            now: self.now,
            config: &self.config,
            rng: &mut self.rng,
            peers: &mut self.peers,
            log: &mut self.sync_log,
            counters: &mut self.counters,
            out: &mut self.out,
            records: &mut self.records,
            pipeline: &self.pipeline,
            policy: &self.policy,
        }
    }

    /// The name to show for another node: a member's name under a policy, else the name it
    /// gave in its hello, if it is or was a peer.
    pub fn name_of(&self, node: &NodeId) -> Option<String> {
        let claimed = self.peers.get(node).and_then(|peer| peer.name.as_deref());
        self.policy.display_name(node, claimed)
    }

    /// The digest over every record's durable heads.
    pub fn digest(&self) -> crate::digest::Digest {
        self.records.total().digest()
    }

    // ----- policy -----

    /// The policy in force, if any.
    pub fn policy(&self) -> Option<&Policy> {
        self.policy.policy()
    }

    /// Whether `peer` may connect: any peer while no policy is in force (but for the
    /// trusted peers of a closed node), afterwards only members whose key is not revoked.
    /// The daemon asks this of every new connection.
    pub fn admits(&self, peer: &NodeId) -> bool {
        self.policy.admits(peer, self.config.trusted_peers.as_ref())
    }

    /// The node ids allowed to connect: the policy's members while one is in force, else
    /// the trusted peers; `None` for an open mesh (every key).
    pub fn members(&self) -> Option<Vec<NodeId>> {
        self.policy.members(self.config.trusted_peers.as_ref())
    }

    /// Whether any key may connect: no policy and no list of trusted peers.
    pub fn is_open(&self) -> bool {
        self.policy().is_none() && self.config.trusted_peers.is_none()
    }

    /// The changes of a record's accepted document: (hash, author, dependencies). For
    /// checkers that judge what a node shows independently of the node.
    pub fn record_changes(
        &mut self,
        record: &RecordId,
    ) -> Vec<(ChangeHash, NodeId, Vec<ChangeHash>)> {
        reads::accepted_changes(&mut self.records, record)
    }

    /// Names the authors of a view's conflicting values: member names under a policy,
    /// the names peers gave otherwise, this node's own name for its own values.
    fn name_authors(&self, view: &mut RecordView) {
        let me = self.identity.node_id();
        for other in view.conflicts.values_mut().flatten() {
            other.author_name = self
                .name_of(&other.author)
                .or_else(|| (other.author == me).then(|| self.config.name.clone()));
        }
    }

    /// The record as a read shows it, with the bytes of every change of its accepted
    /// document: for checkers that recompute what a node shows from the changes alone.
    pub fn accepted_record(&mut self, record: &RecordId) -> Option<(RecordView, Vec<Vec<u8>>)> {
        let view = reads::record(&mut self.records, record)?;
        let changes = self
            .records
            .doc(record.as_str())
            .changes_after(&[])
            .iter()
            .map(|change| change.raw_bytes().to_vec())
            .collect();
        Some((view, changes))
    }

    /// Refuses a connected peer that is not a member.
    fn refuse_peer(&mut self, peer: NodeId) {
        self.policy.note_refused_member(peer, self.now);
        self.out
            .disconnect(peer, "not a member of the org's policy".into());
        self.sessions().peer_disconnected(peer);
    }

    /// A signed policy from a peer.
    fn offer_policy(
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
    /// `local::endorsement`) and adopts the policy once that is durable. The command is
    /// answered once the policy is saved.
    fn apply_policy(&mut self, id: CommandId, signed: SignedPolicy) {
        let me = self.node_id();
        let pending = self.checkpoints.policy_pending();
        let in_force = match self
            .policy
            .judge_apply(signed, &self.config.org, &me, pending)
        {
            ApplyVerdict::Refuse(error) => return self.out.complete(id, Err(error)),
            ApplyVerdict::Answer(offer) => {
                return self.out.complete(id, Ok(Reply::PolicyOffered(offer)));
            }
            ApplyVerdict::AnswerWhenSaved(offer) => {
                return self.answer_when_policy_saved(id, offer);
            }
            ApplyVerdict::Adopt(in_force) => in_force,
        };
        let mut waiting = BTreeSet::new();
        for key in self.records.keys() {
            let endorsement = local::endorsement(
                &mut self.records,
                &key,
                self.policy.policy(),
                &in_force.policy,
                me,
                self.config.trusted_peers.as_ref(),
                self.now,
            );
            if let Some((record, change)) = endorsement {
                waiting.insert(self.queue_own_change(record, change));
            }
        }
        if waiting.is_empty() {
            self.adopt_applied(id, *in_force);
        } else {
            self.policy.await_endorsements(*in_force, id, waiting);
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
    fn own_changes_durable(&mut self, hashes: &[ChangeHash]) {
        let Some(Endorsed { command, verdict }) =
            self.policy.own_changes_durable(hashes, &self.config.org)
        else {
            return;
        };
        match verdict {
            Ok(OfferVerdict::Adopt(in_force)) => self.adopt_applied(command, *in_force),
            Ok(OfferVerdict::Answer(offer)) => {
                self.out.complete(command, Ok(Reply::PolicyOffered(offer)));
            }
            Err(error) => self
                .out
                .complete(command, Err(CommandError::Policy(error.to_string()))),
        }
    }

    /// Puts a policy in force: re-judges every record and drops peers that are no longer
    /// members.
    fn adopt_policy(&mut self, in_force: InForce) {
        let version = in_force.policy.version;
        self.policy.put_in_force(in_force);
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

    /// Sends the policy in force to every connected peer but `except`.
    fn spread_policy(&mut self, except: Option<NodeId>) {
        if let Some(message) = self.policy.message() {
            self.sessions().send_to_ready(&message, except);
        }
    }

    /// Re-judges every record under the policy in force.
    fn rejudge_all(&mut self) {
        for key in self.records.keys() {
            let rejudged = self.judge().rejudge(&key, Vec::new());
            if rejudged.changed {
                self.announce_record(&key, None, Vec::new());
            }
        }
    }

    // ----- remote changes -----

    /// Applying durable changes: the judge plus the peers (apply.rs).
    fn apply(&mut self) -> Apply<'_> {
        Apply {
            judge: Judge {
                records: &mut self.records,
                policy: self
                    .policy
                    .in_force
                    .as_ref()
                    .map(|in_force| &in_force.policy),
                identity: &self.identity,
                org: &self.config.org,
                now: self.now,
                counters: &mut self.counters,
                out: &mut self.out,
                rejudge_after_ack: &mut self.rejudge_after_ack,
            },
            peers: &mut self.peers,
            last_remote_change: &mut self.last_remote_change,
        }
    }

    /// The judge, over the records and the policy in force (judge.rs).
    pub(crate) fn judge(&mut self) -> Judge<'_> {
        self.apply().judge
    }

    /// Admission and the borrows it works through (admit.rs).
    fn admission(&mut self) -> (&mut Admission, AdmitParts<'_>) {
        let parts = AdmitParts {
            config: &self.config,
            policy: self
                .policy
                .in_force
                .as_ref()
                .map(|in_force| &in_force.policy),
            records: &mut self.records,
            pipeline: &mut self.pipeline,
            peers: &mut self.peers,
            refused_changes: &mut self.policy.refused_changes,
            counters: &mut self.counters,
            out: &mut self.out,
            now: self.now,
        };
        (&mut self.admission, parts)
    }

    /// Admits a batch of changes `from` sent as `origin`; returns false if any was
    /// refused, which costs the sender its connection.
    pub(crate) fn admit_changes(
        &mut self,
        from: NodeId,
        envelopes: Vec<Vec<u8>>,
        origin: Origin,
    ) -> bool {
        let (admission, mut parts) = self.admission();
        admission
            .admit(from, envelopes, origin, &mut parts)
            .all_valid()
    }

    /// Moves pending changes whose dependencies are now held into the pipeline.
    fn release_pending(&mut self) {
        let (admission, mut parts) = self.admission();
        admission.release(&mut parts);
    }

    /// Pushes newly durable changes to connected peers (gossip.rs).
    fn push_to_peers(&mut self, changes: Vec<(Option<NodeId>, VerifiedChange)>) {
        gossip::push(changes, &mut self.peers, &self.records, &mut self.out);
    }

    // ----- checkpoints and timers -----

    pub(crate) fn schedule_checkpoint(&mut self) {
        self.checkpoints
            .schedule(&self.records, self.now, self.config.checkpoint_interval);
    }

    fn checkpoint(&mut self) {
        let policy = self.policy.in_force.as_ref().map(|in_force| PolicyToSave {
            signed: &in_force.signed,
            hash: in_force.hash,
        });
        let started = self.checkpoints.start(
            &mut self.records,
            policy,
            &mut self.storage_ops,
            &mut self.out,
        );
        if !started {
            self.schedule_checkpoint();
        }
    }

    fn tick(&mut self) {
        let now = self.now;
        if self.checkpoints.is_due(now) {
            self.checkpoint();
        }
        let expired = self.admission.expire(now);
        self.counters.changes_dropped += expired as u64;
        self.sessions().sync_timers();
    }
}
