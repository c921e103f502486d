//! The rounds of reconciliation sessions (the protocol is in sync.rs's module doc): start,
//! answer, defer while changes are in the pipeline, resume, finish, and the timers that
//! start due sessions and restart stalled ones. The second half of [`Sessions`].

use crdt_schema::NodeId;

use crate::api::{CommandError, CommandId, Event, Reply};
use crate::limits::*;
use crate::peers::Peer;
use crate::pipeline::Origin;
use crate::reconcile::{self, batches, snapshot_batches};
use crate::session::Session;
use crate::status::{SyncOutcome, SyncRecord};
use crate::sync::{Routed, Sessions};
use crate::wire::{EnvelopeBytes, Message, Round, Snapshot};

/// What a round sends before its round message: changes, and records whole.
#[derive(Default)]
pub(crate) struct Sent {
    changes: Vec<Vec<u8>>,
    snapshots: Vec<Snapshot>,
}

impl Sent {
    fn new(changes: Vec<Vec<u8>>, snapshots: Vec<Snapshot>) -> Sent {
        Sent { changes, snapshots }
    }
}

impl Sessions<'_> {
    pub(crate) fn session_mut(
        &mut self,
        peer: NodeId,
        id: u64,
        initiator: bool,
    ) -> Option<&mut Session> {
        self.peers.get_mut(&peer)?.session_mut(id, initiator)
    }

    pub(crate) fn start_session(&mut self, peer: NodeId) {
        self.log.next_session += 1;
        let id = self.log.next_session;
        let scope = self.scope_with(peer);
        let mut session = Session::new(id, true, scope, self.now);
        session.rounds = 1;
        let root = reconcile::root_range(self.records, &session.scope);
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
            Sent::default(),
        );
    }

    /// Sends a round's records whole and its changes in batches, then the round message
    /// itself.
    pub(crate) fn send_round(
        &mut self,
        peer: NodeId,
        initiator: bool,
        mut round: Round,
        sent: Sent,
    ) {
        let Sent { changes, snapshots } = sent;
        round.policy = self.policy.policy_tag();
        let session = round.session;
        let in_snapshots: u64 = snapshots.iter().map(|s| s.signatures.len() as u64).sum();
        let count = changes.len() as u64 + in_snapshots;
        let bytes: u64 = changes
            .iter()
            .map(|change| change.len() as u64)
            .sum::<u64>()
            + snapshots.iter().map(|s| s.wire_bytes() as u64).sum::<u64>();
        let whole = snapshots.len() as u64;
        if let Some(state) = self.session_mut(peer, session, initiator) {
            state.changes_sent += count;
            state.bytes_sent += bytes;
            state.snapshots_sent += whole;
            if count > 0 {
                state.changes_moved();
            }
        }
        if let Some(entry) = self.peers.get_mut(&peer) {
            entry.counters.changes_sent += count;
        }
        self.counters.snapshots_sent += whole;
        for batch in snapshot_batches(snapshots) {
            let message = Message::SyncSnapshots {
                session,
                from_initiator: initiator,
                snapshots: batch,
            };
            self.out.send(peer, &message);
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

    pub(crate) fn sync_request(&mut self, from: NodeId, round: Round) {
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

    pub(crate) fn sync_response(&mut self, from: NodeId, round: Round) {
        let current = self.peers[&from]
            .outbound
            .as_ref()
            .map(|session| session.id);
        if current == Some(round.session) {
            self.process_or_defer(from, true, round);
        }
    }

    pub(crate) fn process_or_defer(&mut self, from: NodeId, initiator: bool, round: Round) {
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

    pub(crate) fn sync_changes(
        &mut self,
        from: NodeId,
        session: u64,
        from_initiator: bool,
        changes: Vec<EnvelopeBytes>,
    ) -> Option<Routed> {
        let initiator = !from_initiator;
        let now = self.now;
        if let Some(state) = self.session_mut(from, session, initiator) {
            state.changes_received += changes.len() as u64;
            state.bytes_received += changes
                .iter()
                .map(|change| change.0.len() as u64)
                .sum::<u64>();
            state.changes_moved();
            state.last_progress_at = now;
        }
        let origin = Origin::Session {
            id: session,
            initiator,
        };
        let envelopes = changes.into_iter().map(|envelope| envelope.0).collect();
        Some(Routed::Admit {
            envelopes,
            origin,
            refusal: "sent a change that failed verification",
        })
    }

    /// Records whole that a session brought: counted like the changes in them, then handed
    /// to admission.
    pub(crate) fn sync_snapshots(
        &mut self,
        from: NodeId,
        session: u64,
        from_initiator: bool,
        snapshots: Vec<Snapshot>,
    ) -> Option<Routed> {
        let initiator = !from_initiator;
        let now = self.now;
        if let Some(state) = self.session_mut(from, session, initiator) {
            state.changes_received += snapshots
                .iter()
                .map(|snapshot| snapshot.signatures.len() as u64)
                .sum::<u64>();
            state.bytes_received += snapshots
                .iter()
                .map(|snapshot| snapshot.wire_bytes() as u64)
                .sum::<u64>();
            state.snapshots_received += snapshots.len() as u64;
            state.changes_moved();
            state.last_progress_at = now;
        }
        Some(Routed::AdmitWhole {
            snapshots,
            origin: Origin::Session {
                id: session,
                initiator,
            },
        })
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
    pub(crate) fn next_deferred(&mut self, peer: NodeId, initiator: bool) -> Option<Round> {
        let entry = self.peers.get_mut(&peer)?;
        let session = match initiator {
            true => entry.outbound.as_mut(),
            false => entry.inbound.as_mut(),
        };
        let session = session.filter(|session| session.pipelined == 0)?;
        session.deferred.pop_front()
    }

    pub(crate) fn process_round(&mut self, peer: NodeId, initiator: bool, round: Round) {
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
            return self.send_round(
                peer,
                false,
                round,
                Sent::new(output.changes, output.snapshots),
            );
        }
        if output.is_empty() {
            if session.exchanged && session.rounds < SYNC_ROUNDS_MAX {
                // Changes moved: confirm with one more root comparison.
                session.exchanged = false;
                session.rounds += 1;
                let root = reconcile::root_range(self.records, &scope);
                let round = Round {
                    session: id,
                    ranges: vec![root],
                    needs: vec![],
                    policy: None,
                };
                return self.send_round(peer, true, round, Sent::default());
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
        self.send_round(
            peer,
            true,
            round,
            Sent::new(output.changes, output.snapshots),
        );
    }

    pub(crate) fn finish_session(&mut self, peer: NodeId, initiator: bool, outcome: SyncOutcome) {
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
                self.log.last_sync = Some(now);
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
            first_changes_round: session.first_changes_round,
            snapshots_received: session.snapshots_received,
            snapshots_sent: session.snapshots_sent,
        };
        if self.log.history.len() == HISTORY_ENTRIES_MAX {
            self.log.history.pop_front();
        }
        self.log.history.push_back(row.clone());
        self.out.emit(Event::SyncEnded(row));
    }

    pub(crate) fn end_sessions(&mut self, peer: NodeId, outcome: SyncOutcome) {
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
}
