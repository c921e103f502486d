//! One side's state of one reconciliation session (the protocol is in sync.rs's module
//! doc). A peer holds its sessions (peers.rs); rounds.rs drives them.

use std::collections::VecDeque;
use std::time::Duration;

use crate::records::Scope;
use crate::time::Instant;
use crate::wire::Round;

/// One side's state of one reconciliation session.
pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) initiator: bool,
    pub(crate) scope: Scope,
    pub(crate) started_at: Instant,
    pub(crate) last_progress_at: Instant,
    pub(crate) rounds: u32,
    /// This session's remote changes waiting for their log append.
    pub(crate) pipelined: usize,
    /// Round messages waiting until `pipelined` reaches zero.
    pub(crate) deferred: VecDeque<Round>,
    /// Whether changes moved since the last root comparison.
    pub(crate) exchanged: bool,
    /// Changes this session brought that the node did not hold.
    pub(crate) changes_new: u64,
    pub(crate) changes_received: u64,
    pub(crate) changes_sent: u64,
    pub(crate) bytes_received: u64,
    pub(crate) bytes_sent: u64,
    /// The round in which changes first moved either way.
    pub(crate) first_changes_round: Option<u32>,
    pub(crate) snapshots_received: u64,
    pub(crate) snapshots_sent: u64,
}

impl Session {
    /// When the session counts as stalled if it makes no progress before.
    pub(crate) fn stall_deadline(&self, stall: Duration) -> Instant {
        self.last_progress_at + stall
    }

    /// Changes moved in the session's current round.
    pub(crate) fn changes_moved(&mut self) {
        self.exchanged = true;
        self.first_changes_round.get_or_insert(self.rounds);
    }

    /// One of the session's changes joined the pipeline: its next round waits for it.
    pub(crate) fn pipelined_one(&mut self) {
        self.pipelined += 1;
        self.changes_new += 1;
    }

    /// One of the session's changes left the pipeline.
    pub(crate) fn pipelined_settled(&mut self) {
        // Saturating: a duplicated request can recreate a session under an old number,
        // and peer input must never panic the node.
        self.pipelined = self.pipelined.saturating_sub(1);
    }

    pub(crate) fn deferred_len(&self) -> usize {
        self.deferred.len()
    }

    pub(crate) fn new(id: u64, initiator: bool, scope: Scope, now: Instant) -> Session {
        Session {
            id,
            initiator,
            scope,
            started_at: now,
            last_progress_at: now,
            rounds: 0,
            pipelined: 0,
            deferred: VecDeque::new(),
            exchanged: false,
            changes_new: 0,
            changes_received: 0,
            changes_sent: 0,
            bytes_received: 0,
            bytes_sent: 0,
            first_changes_round: None,
            snapshots_received: 0,
            snapshots_sent: 0,
        }
    }
}
