//! What the node knows about each peer: connection state, the sessions running with it,
//! its counters and timers. A peer holds its sessions (session.rs); sync.rs drives them.

use std::collections::BTreeMap;
use std::time::Duration;

use crdt_schema::NodeId;

use crate::api::Effect;

use crate::records::Scope;
use crate::session::Session;
use crate::status::{PeerCounters, PeerState};
use crate::time::Instant;

/// What a node knows about one peer.
pub(crate) struct Peer {
    pub(crate) state: PeerState,
    /// The name the peer gave in its last `Hello`.
    pub(crate) name: Option<String>,
    /// The peer's replication scope, once its `Hello` arrived.
    pub(crate) scope: Option<Scope>,
    pub(crate) connected_since: Option<Instant>,
    pub(crate) last_sync: Option<Instant>,
    pub(crate) next_sync_at: Option<Instant>,
    /// Whether the peer sent its hello on this connection.
    pub(crate) greeted: bool,
    pub(crate) outbound: Option<Session>,
    pub(crate) inbound: Option<Session>,
    pub(crate) counters: PeerCounters,
    pub(crate) last_error: Option<String>,
    pub(crate) behind_estimate: u64,
    /// The highest session number this peer started on the current connection; older
    /// requests are stale (duplicated or delayed) and ignored.
    pub(crate) inbound_session_max: u64,
    /// Changes the policy forbids that this peer relayed in the current window (its start
    /// and the count), bounded by [`QUARANTINE_PER_PEER_PER_WINDOW`]: kept across
    /// reconnections, so that a peer cannot reset it by dialling again.
    pub(crate) forbidden_relayed: (Instant, usize),
}

impl Peer {
    /// The session `id` this node initiated (`initiator`) or the peer did, if it runs.
    pub(crate) fn session_mut(&mut self, id: u64, initiator: bool) -> Option<&mut Session> {
        let session = if initiator {
            self.outbound.as_mut()
        } else {
            self.inbound.as_mut()
        };
        session.filter(|session| session.id == id)
    }

    /// Connected and greeted (its hello arrived, so its scope is known): the peers that
    /// are pushed to and synced with.
    pub(crate) fn is_ready(&self) -> bool {
        self.state == PeerState::Connected && self.scope.is_some()
    }

    /// When this peer's next session is due: only while none runs in either direction.
    pub(crate) fn session_due_at(&self) -> Option<Instant> {
        match (&self.outbound, &self.inbound) {
            (None, None) => self.next_sync_at,
            _ => None,
        }
    }

    /// The instants this peer's timers wait for (its next session, and when each running
    /// session counts as stalled): the one rule both `sync_timers` and `next_deadline` read.
    pub(crate) fn timer_deadlines(&self, stall: Duration) -> impl Iterator<Item = Instant> + '_ {
        let ready = self.is_ready();
        let sessions = self
            .outbound
            .iter()
            .chain(&self.inbound)
            .map(move |session| session.stall_deadline(stall));
        self.session_due_at()
            .into_iter()
            .chain(sessions)
            .filter(move |_| ready)
    }

    pub(crate) fn new() -> Peer {
        Peer {
            state: PeerState::Disconnected,
            name: None,
            scope: None,
            connected_since: None,
            last_sync: None,
            next_sync_at: None,
            greeted: false,
            outbound: None,
            inbound: None,
            counters: PeerCounters::default(),
            last_error: None,
            behind_estimate: 0,
            inbound_session_max: 0,
            forbidden_relayed: (Instant::from_millis(0), 0),
        }
    }
}

/// Adds each message sent to its peer's counters.
pub(crate) fn count_sends(peers: &mut BTreeMap<NodeId, Peer>, effects: &[Effect]) {
    for effect in effects {
        if let Effect::Send { to, bytes } = effect
            && let Some(peer) = peers.get_mut(to)
        {
            peer.counters.messages_sent += 1;
            peer.counters.bytes_sent += bytes.len() as u64;
        }
    }
}
