//! Peers and reconciliation: range-based set reconciliation over (record, heads).
//!
//! A session is rounds of request and response between an initiator and a responder.
//! Each round carries key ranges with either a fingerprint (sum of item hashes and a
//! count) or, for small ranges, the list of records and heads. A side that receives a
//! fingerprint it does not match splits its own items in the range into
//! [`RANGE_FANOUT`] parts, or lists them once there are at most [`RANGE_ITEMS_THRESHOLD`].
//! A side that receives a list compares it with its own records and sends what the other
//! lacks or asks (`Need`) for what it lacks. Finding the differences among `n` records
//! therefore costs about `log_16(n)` rounds, whatever `n` is.
//!
//! Changes travel in `SyncChanges` batches just before the round message they belong to.
//! A side processes a round message only after the changes that came before it are
//! durable and applied, so every round sees the other side's latest answer and a round
//! never sends more than [`SYNC_ROUND_BYTES_MAX`] (flow control). After any changes moved,
//! the initiator ends with one more root fingerprint: equal means converged.
//!
//! Each connection starts with fresh session state, and a session without progress for
//! `sync_stall_timeout` is dropped and started again, so a lost message cannot stall a
//! pair for ever.

use std::collections::BTreeSet;

use crdt_schema::{ChangeHash, NodeId, RecordId};
use rand_core::Rng;

use crate::admit;
use crate::api::{CommandError, CommandId, Event, Reply};
use crate::limits::*;
use crate::node::Node;
use crate::peers::Peer;
use crate::pipeline::Origin;
use crate::reconcile::{self, RoundOutput, batches, change_hashes};
use crate::records::Scope;
use crate::session::Session;
use crate::status::{PeerState, SyncOutcome, SyncRecord};
use crate::wire::{EnvelopeBytes, Hash, Message, Need, Round};

fn intersect(own: &Option<BTreeSet<String>>, theirs: &Scope) -> Scope {
    match (own, theirs) {
        (None, None) => None,
        (Some(own), None) => Some(own.clone()),
        (None, Some(theirs)) => Some(theirs.clone()),
        (Some(own), Some(theirs)) => Some(own.intersection(theirs).cloned().collect()),
    }
}

impl Node {
    // ----- peers -----

    pub(crate) fn peer_connecting(&mut self, peer: NodeId) {
        if peer == self.node_id() || !self.make_room_for(peer) {
            return;
        }
        let entry = self.peers.entry(peer).or_insert_with(Peer::new);
        if entry.state == PeerState::Disconnected {
            entry.state = PeerState::Connecting;
        }
    }

    pub(crate) fn peer_connected(&mut self, peer: NodeId) {
        if peer == self.node_id() {
            return;
        }
        if !self.admits(&peer) {
            // Once a policy is in force only members may connect. The daemon refuses them
            // at the transport already; this covers every other driver.
            return self.refuse_peer(peer);
        }
        if !self.make_room_for(peer) {
            return;
        }
        // Fresh session state on every connection: whatever was in flight is gone.
        self.end_sessions(peer, SyncOutcome::Error("connection replaced".into()));
        let now = self.now;
        let entry = self.peers.entry(peer).or_insert_with(Peer::new);
        entry.state = PeerState::Connected;
        entry.connected_since = Some(now);
        entry.greeted = false;
        entry.scope = None;
        // The sync timer starts when the peer's hello arrives.
        entry.next_sync_at = None;
        entry.inbound_session_max = 0;
        let scope = self
            .config
            .collections
            .as_ref()
            .map(|set| set.iter().cloned().collect());
        let name = self.config.name.clone();
        let policy = self.policy.policy_tag();
        let org = *self.config.org.as_bytes();
        self.out.send(
            peer,
            &Message::Hello {
                name,
                scope,
                policy,
                org,
            },
        );
    }

    /// The transport reports the connection closed.
    pub(crate) fn transport_disconnected(&mut self, peer: NodeId) {
        if let Some(entry) = self.peers.get_mut(&peer)
            && entry.state == PeerState::Connected
            && !entry.greeted
        {
            // Closed before it greeted us: the likeliest cause is a peer whose policy does
            // not admit this node, which refuses during the handshake and cannot say so.
            entry.last_error = Some(
                "the peer closed the connection before greeting; its policy may not list this node as a member (or it is shutting down)".into(),
            );
        }
        self.peer_disconnected(peer);
    }

    pub(crate) fn peer_disconnected(&mut self, peer: NodeId) {
        self.end_sessions(peer, SyncOutcome::Error("peer disconnected".into()));
        if let Some(entry) = self.peers.get_mut(&peer) {
            entry.state = PeerState::Disconnected;
            entry.connected_since = None;
            entry.scope = None;
            entry.next_sync_at = None;
        }
    }

    /// Whether a peer may be tracked: refuses new peers past [`PEERS_MAX`].
    fn make_room_for(&mut self, peer: NodeId) -> bool {
        if self.peers.contains_key(&peer) || self.peers.len() < PEERS_MAX {
            return true;
        }
        // Forget a disconnected peer (the first in id order), if any, before refusing.
        let forgettable = self
            .peers
            .iter()
            .find(|(_, entry)| entry.state == PeerState::Disconnected)
            .map(|(id, _)| *id);
        match forgettable {
            Some(old) => {
                self.peers.remove(&old);
                true
            }
            None => {
                self.out
                    .disconnect(peer, format!("this node already tracks {PEERS_MAX} peers"));
                false
            }
        }
    }

    /// Refuses a message: counted, reported, and the peer is disconnected.
    fn reject_message(&mut self, from: NodeId, reason: String) {
        self.counters.messages_rejected += 1;
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.counters.rejected += 1;
        }
        self.out.emit(Event::MessageRejected {
            from,
            reason: reason.clone(),
        });
        self.out.disconnect(from, reason);
        self.peer_disconnected(from);
    }

    pub(crate) fn message_received(&mut self, from: NodeId, bytes: Vec<u8>) {
        let Some(peer) = self
            .peers
            .get_mut(&from)
            .filter(|peer| peer.state == PeerState::Connected)
        else {
            // The driver delivers only from connected peers; a late message after a
            // disconnect is dropped.
            self.counters.messages_rejected += 1;
            return;
        };
        peer.counters.messages_received += 1;
        peer.counters.bytes_received += bytes.len() as u64;
        let message = match Message::decode(&bytes) {
            Ok(message) => message,
            Err(error) => return self.reject_message(from, error.to_string()),
        };
        let has_hello = peer.scope.is_some();
        let greeted_before = peer.greeted;
        if matches!(message, Message::Hello { .. }) {
            if greeted_before {
                // A hello restarts nothing: each one would make the node recompute its
                // whole digest and start a session, for a few bytes of the peer's.
                return self.reject_message(from, "a second hello on one connection".to_owned());
            }
            peer.greeted = true;
        }
        match message {
            Message::Hello { org, name, .. } if org != *self.config.org.as_bytes() => {
                let theirs = crdt_schema::OrgId::from_bytes(org);
                let reason = format!(
                    "this peer trusts org {theirs}, this node org {}: nodes of different orgs cannot share records (make both with the same `mesh init --org`)",
                    self.config.org
                );
                // The connection stays, inert (no hello accepted: no sessions, no pushes),
                // so that both sides learn why; closing it could drop our own hello.
                self.out.emit(Event::MessageRejected {
                    from,
                    reason: reason.clone(),
                });
                if let Some(peer) = self.peers.get_mut(&from) {
                    peer.last_error = Some(reason);
                    peer.name = Some(name).filter(|name| !name.is_empty());
                }
            }
            Message::Hello {
                name,
                scope,
                policy,
                ..
            } => {
                self.hello(from, name, scope);
                if self
                    .peers
                    .get(&from)
                    .is_some_and(|peer| peer.scope.is_some())
                    && let Some(message) = self.policy.newer_than(policy)
                {
                    self.out.send(from, &message);
                }
            }
            _ if !has_hello => self.reject_message(from, "message before hello".into()),
            Message::Push { changes } => {
                let envelopes = changes.into_iter().map(|envelope| envelope.0).collect();
                if !self.admit_changes(from, envelopes, Origin::Push) {
                    self.reject_message(from, "pushed a change that failed verification".into());
                }
            }
            Message::Announce { record, heads } => self.announced(from, &record, &heads),
            Message::Policy { signed } => {
                let offered = serde_json::from_slice(&signed)
                    .map_err(|error| error.to_string())
                    .and_then(|signed| {
                        self.offer_policy(signed, from)
                            .map_err(|error| error.to_string())
                    });
                if let Err(reason) = offered {
                    self.reject_message(from, format!("sent a policy this node refuses: {reason}"));
                }
            }
            Message::Receipt {
                record,
                change,
                reason,
            } => {
                let me = self.node_id();
                if self
                    .records
                    .holds_own_change(&record, &ChangeHash(change), &me)
                {
                    self.policy
                        .receipt_received(from, record, change, reason, self.now);
                }
            }
            Message::Need { needs } => self.answer_needs(from, needs),
            Message::SyncRequest(round) => {
                if let Some(message) = self.policy.newer_than(round.policy) {
                    self.out.send(from, &message);
                }
                self.sync_request(from, round)
            }
            Message::SyncResponse(round) => {
                if let Some(message) = self.policy.newer_than(round.policy) {
                    self.out.send(from, &message);
                }
                self.sync_response(from, round)
            }
            Message::SyncChanges {
                session,
                from_initiator,
                changes,
            } => self.sync_changes(from, session, from_initiator, changes),
            Message::SyncEnd { session, completed } => {
                let ours = self.peers[&from]
                    .inbound
                    .as_ref()
                    .is_some_and(|s| s.id == session);
                if ours {
                    let outcome = match completed {
                        true => SyncOutcome::Completed,
                        false => SyncOutcome::Error("the peer ended the session".into()),
                    };
                    self.finish_session(from, false, outcome);
                }
            }
        }
    }

    /// The name to show for another node: a member's name under a policy, else the name it
    /// gave in its hello, if it is or was a peer.
    pub fn name_of(&self, node: &NodeId) -> Option<String> {
        let claimed = self.peers.get(node).and_then(|peer| peer.name.as_deref());
        self.policy.display_name(node, claimed)
    }

    fn hello(&mut self, from: NodeId, name: String, scope: Option<Vec<String>>) {
        if let Some(collections) = &scope
            && let Some(bad) = collections
                .iter()
                .find(|name| crdt_schema::record::check_collection(name).is_err())
        {
            return self.reject_message(from, format!("hello names an invalid collection `{bad}`"));
        }
        let now = self.now;
        let interval = self.config.sync_interval;
        let jitter = self.jitter();
        let peer = self
            .peers
            .get_mut(&from)
            .expect("connected peers are tracked");
        peer.name = Some(name).filter(|name| !name.is_empty());
        peer.scope = Some(scope.map(|names| names.into_iter().collect()));
        peer.next_sync_at = Some(now + interval + jitter);
        // One side starts the first session, so a new connection is reconciled once, not twice.
        if self.node_id() < from {
            self.start_session(from);
        }
    }

    fn jitter(&mut self) -> std::time::Duration {
        let spread_ms = (self.config.sync_interval.as_millis() / 10).max(1) as u64;
        std::time::Duration::from_millis(self.rng.next_u64() % spread_ms)
    }

    fn announced(&mut self, from: NodeId, record: &str, heads: &[Hash]) {
        let Ok(record) = record.parse::<RecordId>() else {
            return self
                .reject_message(from, format!("announce names an invalid record `{record}`"));
        };
        if !self.config.replicates(record.collection()) {
            return;
        }
        let key = record.as_str();
        if change_hashes(heads)
            .iter()
            .any(|head| !admit::holds(&self.records, &self.pipeline, key, head))
        {
            let need = self.records.need(key);
            self.out.send(from, &Message::Need { needs: vec![need] });
        }
    }

    fn answer_needs(&mut self, from: NodeId, needs: Vec<Need>) {
        let mut output = RoundOutput::default();
        let scope = self.scope_with(from);
        for need in &needs {
            self.reconcile().answer_need(&scope, need, &mut output);
        }
        let changes = std::mem::take(&mut output.changes);
        for batch in batches(changes) {
            if let Some(peer) = self.peers.get_mut(&from) {
                peer.counters.changes_sent += batch.len() as u64;
            }
            self.out.send(from, &Message::Push { changes: batch });
        }
        if !output.needs.is_empty() {
            self.out.send(
                from,
                &Message::Need {
                    needs: output.needs,
                },
            );
        }
    }

    fn scope_with(&self, peer: NodeId) -> Scope {
        let theirs = self
            .peers
            .get(&peer)
            .and_then(|peer| peer.scope.clone())
            .flatten();
        intersect(&self.config.collections, &theirs)
    }

    // ----- sessions -----

    pub(crate) fn session_mut(
        &mut self,
        peer: NodeId,
        id: u64,
        initiator: bool,
    ) -> Option<&mut Session> {
        self.peers.get_mut(&peer)?.session_mut(id, initiator)
    }

    fn start_session(&mut self, peer: NodeId) {
        self.next_session += 1;
        let id = self.next_session;
        let scope = self.scope_with(peer);
        let mut session = Session::new(id, true, scope, self.now);
        session.rounds = 1;
        let root = reconcile::root_range(&self.records, &session.scope);
        let entry = self
            .peers
            .get_mut(&peer)
            .expect("sessions start with connected peers");
        entry.outbound = Some(session);
        entry.next_sync_at = None;
        self.out.emit(Event::SyncStarted {
            peer,
            session: id,
            initiator: true,
        });
        self.send_round(
            peer,
            true,
            Round {
                session: id,
                ranges: vec![root],
                needs: vec![],
                policy: None,
            },
            Vec::new(),
        );
    }

    /// Sends a round's changes in batches, then the round message itself.
    fn send_round(
        &mut self,
        peer: NodeId,
        initiator: bool,
        mut round: Round,
        changes: Vec<Vec<u8>>,
    ) {
        round.policy = self.policy.policy_tag();
        let session = round.session;
        let count = changes.len() as u64;
        let bytes: u64 = changes.iter().map(|change| change.len() as u64).sum();
        if let Some(state) = self.session_mut(peer, session, initiator) {
            state.changes_sent += count;
            state.bytes_sent += bytes;
            if count > 0 {
                state.exchanged = true;
            }
        }
        if let Some(entry) = self.peers.get_mut(&peer) {
            entry.counters.changes_sent += count;
        }
        for batch in batches(changes) {
            let message = Message::SyncChanges {
                session,
                from_initiator: initiator,
                changes: batch,
            };
            self.out.send(peer, &message);
        }
        let message = match initiator {
            true => Message::SyncRequest(round),
            false => Message::SyncResponse(round),
        };
        self.out.send(peer, &message);
    }

    fn sync_request(&mut self, from: NodeId, round: Round) {
        let peer = &self.peers[&from];
        let current = peer.inbound.as_ref().map(|session| session.id);
        if current != Some(round.session) && round.session <= peer.inbound_session_max {
            // A stale request of a session that already ended.
            return;
        }
        if current != Some(round.session) {
            self.peers
                .get_mut(&from)
                .expect("checked")
                .inbound_session_max = round.session;
            if current.is_some() {
                self.finish_session(
                    from,
                    false,
                    SyncOutcome::Error("superseded by a new session".into()),
                );
            }
            let scope = self.scope_with(from);
            let session = Session::new(round.session, false, scope, self.now);
            self.peers.get_mut(&from).expect("checked").inbound = Some(session);
            self.out.emit(Event::SyncStarted {
                peer: from,
                session: round.session,
                initiator: false,
            });
        }
        self.process_or_defer(from, false, round);
    }

    fn sync_response(&mut self, from: NodeId, round: Round) {
        let current = self.peers[&from]
            .outbound
            .as_ref()
            .map(|session| session.id);
        if current == Some(round.session) {
            self.process_or_defer(from, true, round);
        }
    }

    fn process_or_defer(&mut self, from: NodeId, initiator: bool, round: Round) {
        let session = self
            .session_mut(from, round.session, initiator)
            .expect("callers ensure the session exists");
        if session.pipelined > 0 || !session.deferred.is_empty() {
            if session.deferred.len() >= SESSION_DEFERRED_MAX {
                return self.reject_message(from, "too many rounds in flight".into());
            }
            session.deferred.push_back(round);
            return;
        }
        self.process_round(from, initiator, round);
    }

    fn sync_changes(
        &mut self,
        from: NodeId,
        session: u64,
        from_initiator: bool,
        changes: Vec<EnvelopeBytes>,
    ) {
        let initiator = !from_initiator;
        let now = self.now;
        if let Some(state) = self.session_mut(from, session, initiator) {
            state.changes_received += changes.len() as u64;
            state.bytes_received += changes
                .iter()
                .map(|change| change.0.len() as u64)
                .sum::<u64>();
            state.exchanged = true;
            state.last_progress_at = now;
        }
        let origin = Origin::Session {
            id: session,
            initiator,
        };
        let envelopes = changes.into_iter().map(|envelope| envelope.0).collect();
        if !self.admit_changes(from, envelopes, origin) {
            self.reject_message(from, "sent a change that failed verification".into());
        }
    }

    /// Processes deferred rounds of sessions whose changes are now applied.
    pub(crate) fn resume_sessions(&mut self) {
        let ready: Vec<(NodeId, bool)> = self
            .peers
            .iter()
            .flat_map(|(id, peer)| {
                [peer.outbound.as_ref(), peer.inbound.as_ref()]
                    .into_iter()
                    .flatten()
                    .filter(|session| session.pipelined == 0 && !session.deferred.is_empty())
                    .map(|session| (*id, session.initiator))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (peer, initiator) in ready {
            while let Some(round) = self.next_deferred(peer, initiator) {
                self.process_round(peer, initiator, round);
            }
        }
    }

    /// The next deferred round of a session whose changes are all applied.
    fn next_deferred(&mut self, peer: NodeId, initiator: bool) -> Option<Round> {
        let entry = self.peers.get_mut(&peer)?;
        let session = match initiator {
            true => entry.outbound.as_mut(),
            false => entry.inbound.as_mut(),
        };
        let session = session.filter(|session| session.pipelined == 0)?;
        session.deferred.pop_front()
    }

    fn process_round(&mut self, peer: NodeId, initiator: bool, round: Round) {
        let id = round.session;
        let scope = {
            let session = self
                .session_mut(peer, id, initiator)
                .expect("session exists");
            session.scope.clone()
        };
        let output = match self.reconcile().answer_round(&scope, &round) {
            Ok(output) => output,
            Err(reason) => return self.reject_message(peer, reason),
        };
        let now = self.now;
        let session = self
            .session_mut(peer, id, initiator)
            .expect("session exists");
        session.last_progress_at = now;
        if output.truncated {
            session.exchanged = true;
        }
        if !initiator {
            session.rounds += 1;
            let round = Round {
                session: id,
                ranges: output.ranges,
                needs: output.needs,
                policy: None,
            };
            return self.send_round(peer, false, round, output.changes);
        }
        if output.is_empty() {
            if session.exchanged && session.rounds < SYNC_ROUNDS_MAX {
                // Changes moved: confirm with one more root comparison.
                session.exchanged = false;
                session.rounds += 1;
                let root = reconcile::root_range(&self.records, &scope);
                let round = Round {
                    session: id,
                    ranges: vec![root],
                    needs: vec![],
                    policy: None,
                };
                return self.send_round(peer, true, round, Vec::new());
            }
            self.out.send(
                peer,
                &Message::SyncEnd {
                    session: id,
                    completed: true,
                },
            );
            return self.finish_session(peer, true, SyncOutcome::Completed);
        }
        if session.rounds >= SYNC_ROUNDS_MAX {
            self.out.send(
                peer,
                &Message::SyncEnd {
                    session: id,
                    completed: false,
                },
            );
            let reason = format!("not converged after {SYNC_ROUNDS_MAX} rounds; will retry");
            return self.finish_session(peer, true, SyncOutcome::Error(reason));
        }
        session.rounds += 1;
        let round = Round {
            session: id,
            ranges: output.ranges,
            needs: output.needs,
            policy: None,
        };
        self.send_round(peer, true, round, output.changes);
    }

    fn finish_session(&mut self, peer: NodeId, initiator: bool, outcome: SyncOutcome) {
        let now = self.now;
        let interval = self.config.sync_interval;
        let jitter = self.jitter();
        let Some(entry) = self.peers.get_mut(&peer) else {
            return;
        };
        let session = match initiator {
            true => entry.outbound.take(),
            false => entry.inbound.take(),
        };
        let Some(session) = session else { return };
        if outcome == SyncOutcome::Completed {
            entry.last_sync = Some(now);
            entry.behind_estimate = 0;
            entry.last_error = None;
        } else if let SyncOutcome::Error(reason) = &outcome {
            entry.last_error = Some(reason.clone());
        }
        if entry.outbound.is_none() && entry.inbound.is_none() {
            // Keep an earlier follow-up (see below) that came while this session ran.
            let regular = now + interval + jitter;
            entry.next_sync_at = Some(entry.next_sync_at.map_or(regular, |at| at.min(regular)));
        }
        // Only a completed session: a failed one (a full disk) would otherwise make every
        // peer resync at once, again and again.
        if outcome == SyncOutcome::Completed && session.changes_new > 0 {
            // Changes learned by reconciliation are not pushed on (only pushes are
            // relayed), so the other peers would wait for their next interval: sync with
            // them soon instead. Only new changes trigger this, so it dies out.
            let soon = now + SYNC_FOLLOW_UP_DELAY;
            for (id, other) in self.peers.iter_mut() {
                if *id != peer && other.is_ready() {
                    other.next_sync_at = Some(other.next_sync_at.map_or(soon, |at| at.min(soon)));
                }
            }
        }
        match outcome {
            SyncOutcome::Completed => {
                self.counters.syncs_completed += 1;
                self.last_sync = Some(now);
            }
            _ => self.counters.syncs_failed += 1,
        }
        let row = SyncRecord {
            peer,
            session: session.id,
            initiator,
            started: session.started_at,
            ended: now,
            outcome,
            rounds: session.rounds,
            changes_received: session.changes_received,
            changes_sent: session.changes_sent,
            bytes_received: session.bytes_received,
            bytes_sent: session.bytes_sent,
        };
        if self.history.len() == HISTORY_ENTRIES_MAX {
            self.history.pop_front();
        }
        self.history.push_back(row.clone());
        self.out.emit(Event::SyncEnded(row));
    }

    fn end_sessions(&mut self, peer: NodeId, outcome: SyncOutcome) {
        self.finish_session(peer, true, outcome.clone());
        self.finish_session(peer, false, outcome);
    }

    pub(crate) fn fail_all_sessions(&mut self, reason: &str) {
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for peer in peers {
            if let Some(session) = self.peers[&peer].outbound.as_ref() {
                let id = session.id;
                self.out.send(
                    peer,
                    &Message::SyncEnd {
                        session: id,
                        completed: false,
                    },
                );
            }
            self.end_sessions(peer, SyncOutcome::Error(reason.to_owned()));
        }
    }

    pub(crate) fn sync_now(&mut self, id: CommandId, only: Option<NodeId>) {
        if let Some(peer) = only {
            let connected = self.peers.get(&peer).is_some_and(Peer::is_ready);
            if !connected {
                return self
                    .out
                    .complete(id, Err(CommandError::PeerNotConnected(peer)));
            }
        }
        let targets: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(peer, entry)| only.is_none_or(|only| only == **peer) && entry.is_ready())
            .map(|(peer, _)| *peer)
            .collect();
        for peer in &targets {
            if self.peers[peer].outbound.is_none() {
                self.start_session(*peer);
            }
        }
        self.out
            .complete(id, Ok(Reply::SyncStarted { peers: targets }));
    }

    pub(crate) fn abort_syncs(&mut self) -> usize {
        let running: Vec<(NodeId, u64)> = self
            .peers
            .iter()
            .filter_map(|(peer, entry)| entry.outbound.as_ref().map(|session| (*peer, session.id)))
            .collect();
        for (peer, session) in &running {
            self.out.send(
                *peer,
                &Message::SyncEnd {
                    session: *session,
                    completed: false,
                },
            );
            self.finish_session(*peer, true, SyncOutcome::Aborted);
        }
        running.len()
    }

    /// Starts due sessions and restarts stalled ones.
    pub(crate) fn sync_timers(&mut self) {
        let now = self.now;
        let stall = self.config.sync_stall_timeout;
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for peer in peers {
            let entry = &self.peers[&peer];
            if !entry.is_ready() {
                continue;
            }
            let stalled = |session: &Option<Session>| {
                session
                    .as_ref()
                    .is_some_and(|session| session.stall_deadline(stall) <= now)
            };
            let reason = format!("no progress for {} s; starting afresh", stall.as_secs());
            if stalled(&entry.inbound) {
                self.finish_session(peer, false, SyncOutcome::Error(reason.clone()));
            }
            if stalled(&self.peers[&peer].outbound) {
                let id = self.peers[&peer]
                    .outbound
                    .as_ref()
                    .map(|session| session.id);
                if let Some(id) = id {
                    self.out.send(
                        peer,
                        &Message::SyncEnd {
                            session: id,
                            completed: false,
                        },
                    );
                }
                self.finish_session(peer, true, SyncOutcome::Error(reason));
                self.start_session(peer);
                continue;
            }
            if self.peers[&peer]
                .session_due_at()
                .is_some_and(|at| at <= now)
            {
                self.start_session(peer);
            }
        }
    }

    /// The digest over every record's durable heads.
    pub fn digest(&self) -> crate::digest::Digest {
        self.records.total().digest()
    }
}
