//! Peers and reconciliation: range-based set reconciliation over (record, heads).
//!
//! [`Sessions`] is the part that owns the peers' connection lifecycle, decodes their
//! messages, answers announcements and needs, and runs the sessions (the rounds are in
//! session.rs). What belongs to another part (changes to admit, a policy, a receipt) it
//! hands back to the node as [`Routed`].
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

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crdt_schema::policy::SignedPolicy;
use crdt_schema::{NodeId, RecordId};
use rand_chacha::ChaCha8Rng;
use rand_core::Rng;

use crate::admit;
use crate::api::Event;
use crate::config::Config;
use crate::history;
use crate::limits::*;
use crate::outbox::Outbox;
use crate::peers::Peer;
use crate::pipeline::{Origin, Pipeline};
use crate::policy::PolicyState;
use crate::reconcile::{Reconcile, RoundOutput, batches, change_hashes};
use crate::records::{Records, Scope};
use crate::status::{Counters, PeerState, SyncOutcome, SyncRecord};
use crate::time::Instant;
use crate::wire::{Hash, Message, Need, Snapshot};

/// What the sessions keep across peers: the sync history and when a sync last completed.
#[derive(Default)]
pub(crate) struct SyncLog {
    /// The latest sessions, oldest first, at most [`HISTORY_ENTRIES_MAX`].
    pub(crate) history: VecDeque<SyncRecord>,
    /// The number of the last session this node started.
    pub(crate) next_session: u64,
    pub(crate) last_sync: Option<Instant>,
}

/// A peer's message that another part must handle: the node routes it.
pub(crate) enum Routed {
    /// Changes for admission; if any is refused the peer is disconnected with `refusal`.
    Admit {
        envelopes: Vec<Vec<u8>>,
        origin: Origin,
        refusal: &'static str,
    },
    /// Records whole for admission (clone by snapshot); if any is refused the peer is
    /// disconnected.
    AdmitWhole {
        snapshots: Vec<Snapshot>,
        origin: Origin,
    },
    /// A signed policy.
    Policy { signed: SignedPolicy },
    /// A peer rejected one of this node's changes.
    Receipt {
        record: String,
        change: [u8; 32],
        reason: String,
    },
}

/// The peers and their sessions, with what they read and change of the rest of the node.
pub(crate) struct Sessions<'a> {
    pub(crate) me: NodeId,
    pub(crate) now: Instant,
    pub(crate) config: &'a Config,
    /// For the jitter of sync timers.
    pub(crate) rng: &'a mut ChaCha8Rng,
    pub(crate) peers: &'a mut BTreeMap<NodeId, Peer>,
    pub(crate) log: &'a mut SyncLog,
    pub(crate) counters: &'a mut Counters,
    pub(crate) out: &'a mut Outbox,
    /// Read (and its document cache warmed) by reconciliation rounds.
    pub(crate) records: &'a mut Records,
    /// Changes on their way to the log count as held.
    pub(crate) pipeline: &'a Pipeline,
    /// The policy's tag goes with every round and hello; a peer behind gets the policy.
    pub(crate) policy: &'a PolicyState,
}

fn intersect(own: &Option<BTreeSet<String>>, theirs: &Scope) -> Scope {
    match (own, theirs) {
        (None, None) => None,
        (Some(own), None) => Some(own.clone()),
        (None, Some(theirs)) => Some(theirs.clone()),
        (Some(own), Some(theirs)) => Some(own.intersection(theirs).cloned().collect()),
    }
}

impl Sessions<'_> {
    // ----- peers -----

    pub(crate) fn peer_connecting(&mut self, peer: NodeId) {
        if peer == self.me || !self.make_room_for(peer) {
            return;
        }
        let entry = self.peers.entry(peer).or_insert_with(Peer::new);
        if entry.state == PeerState::Disconnected {
            entry.state = PeerState::Connecting;
        }
    }

    pub(crate) fn peer_connected(&mut self, peer: NodeId) {
        if peer == self.me {
            return;
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
    pub(crate) fn make_room_for(&mut self, peer: NodeId) -> bool {
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
    pub(crate) fn reject_message(&mut self, from: NodeId, reason: String) {
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

    /// Handles a peer's message; returns what another part must handle.
    pub(crate) fn receive(&mut self, from: NodeId, bytes: Vec<u8>) -> Option<Routed> {
        let Some(peer) = self
            .peers
            .get_mut(&from)
            .filter(|peer| peer.state == PeerState::Connected)
        else {
            // The driver delivers only from connected peers; a late message after a
            // disconnect is dropped.
            self.counters.messages_rejected += 1;
            return None;
        };
        peer.counters.messages_received += 1;
        peer.counters.bytes_received += bytes.len() as u64;
        let message = match Message::decode(&bytes) {
            Ok(message) => message,
            Err(error) => {
                self.reject_message(from, error.to_string());
                return None;
            }
        };
        let has_hello = peer.scope.is_some();
        let greeted_before = peer.greeted;
        if matches!(message, Message::Hello { .. }) {
            if greeted_before {
                // A hello restarts nothing: each one would make the node recompute its
                // whole digest and start a session, for a few bytes of the peer's.
                self.reject_message(from, "a second hello on one connection".to_owned());
                return None;
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
                return Some(Routed::Admit {
                    envelopes,
                    origin: Origin::Push,
                    refusal: "pushed a change that failed verification",
                });
            }
            Message::Announce { record, heads } => self.announced(from, &record, &heads),
            Message::Policy { signed } => match serde_json::from_slice(&signed) {
                Ok(signed) => return Some(Routed::Policy { signed }),
                Err(error) => {
                    let reason = format!("sent a policy this node refuses: {error}");
                    self.reject_message(from, reason);
                }
            },
            Message::Receipt {
                record,
                change,
                reason,
            } => {
                return Some(Routed::Receipt {
                    record,
                    change,
                    reason,
                });
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
            } => return self.sync_changes(from, session, from_initiator, changes),
            Message::SyncSnapshots {
                session,
                from_initiator,
                snapshots,
            } => return self.sync_snapshots(from, session, from_initiator, snapshots),
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
        None
    }

    pub(crate) fn hello(&mut self, from: NodeId, name: String, scope: Option<Vec<String>>) {
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
        if self.me < from {
            self.start_session(from);
        }
    }

    pub(crate) fn jitter(&mut self) -> std::time::Duration {
        let spread_ms = (self.config.sync_interval.as_millis() / 10).max(1) as u64;
        std::time::Duration::from_millis(self.rng.next_u64() % spread_ms)
    }

    pub(crate) fn announced(&mut self, from: NodeId, record: &str, heads: &[Hash]) {
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
            .any(|head| !admit::holds(self.records, self.pipeline, key, head))
        {
            let need = history::need(self.records, key);
            self.out.send(from, &Message::Need { needs: vec![need] });
        }
    }

    pub(crate) fn answer_needs(&mut self, from: NodeId, needs: Vec<Need>) {
        let mut output = RoundOutput::new(self.config.round_budget);
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

    pub(crate) fn scope_with(&self, peer: NodeId) -> Scope {
        let theirs = self
            .peers
            .get(&peer)
            .and_then(|peer| peer.scope.clone())
            .flatten();
        intersect(&self.config.collections, &theirs)
    }

    /// Sends `message` to every connected, greeted peer but `except`.
    pub(crate) fn send_to_ready(&mut self, message: &Message, except: Option<NodeId>) {
        let targets: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(id, peer)| peer.is_ready() && Some(**id) != except)
            .map(|(id, _)| *id)
            .collect();
        for peer in targets {
            self.out.send(peer, message);
        }
    }

    pub(crate) fn reconcile(&mut self) -> Reconcile<'_> {
        Reconcile {
            records: self.records,
            pipeline: self.pipeline,
            budget: self.config.round_budget,
        }
    }
}
