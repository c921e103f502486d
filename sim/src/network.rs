//! The simulated network: a link per pair of nodes with at most one connection at a
//! time, per-direction bandwidth and in-order delivery, and cuts (directed pairs whose
//! messages are lost and which cannot connect). Every draw comes from the run's one rng,
//! in the order the world asks.

use std::collections::{BTreeMap, BTreeSet};

use crate::plan::FaultPlan;
use crate::rng::SimRng;
use crate::world::Ms;

#[derive(Default)]
struct Link {
    conn: Option<u64>,
    /// Per direction (lower index first): last delivery time and when the link is free.
    last_delivery: [Ms; 2],
    busy_until: [Ms; 2],
}

/// What became of one message.
pub(crate) enum Transmission {
    /// No connection, or a one-way cut: lost without a trace (only the stall timeout
    /// notices).
    Lost,
    /// Dropped: the connection breaks at `at`.
    Breaks { at: Ms, conn: u64 },
    /// Delivered at `at` on `conn`, possibly with a flipped bit.
    Arrives { at: Ms, conn: u64, bytes: Vec<u8> },
}

/// Every link of the run.
pub(crate) struct Network {
    links: BTreeMap<(usize, usize), Link>,
    next_conn: u64,
    /// Directed pairs whose messages are lost and which cannot connect.
    blocked: BTreeSet<(usize, usize)>,
}

impl Network {
    /// A network of `nodes` nodes, every pair linked, nothing connected.
    pub(crate) fn new(nodes: usize) -> Network {
        let mut links = BTreeMap::new();
        for a in 0..nodes {
            for b in a + 1..nodes {
                links.insert((a, b), Link::default());
            }
        }
        Network {
            links,
            next_conn: 0,
            blocked: BTreeSet::new(),
        }
    }

    fn link(&mut self, a: usize, b: usize) -> &mut Link {
        self.links
            .get_mut(&(a.min(b), a.max(b)))
            .expect("every pair has a link")
    }

    /// The connection between `a` and `b`, if one is up.
    pub(crate) fn conn(&self, a: usize, b: usize) -> Option<u64> {
        self.links[&(a.min(b), a.max(b))].conn
    }

    /// Every pair, lower index first.
    pub(crate) fn pairs(&self) -> Vec<(usize, usize)> {
        self.links.keys().copied().collect()
    }

    /// Cuts messages from `from` to `to`.
    pub(crate) fn block(&mut self, from: usize, to: usize) {
        self.blocked.insert((from, to));
    }

    /// Whether messages from `from` to `to` are cut.
    pub(crate) fn is_blocked(&self, from: usize, to: usize) -> bool {
        self.blocked.contains(&(from, to))
    }

    /// Whether any cut is in place.
    pub(crate) fn any_blocked(&self) -> bool {
        !self.blocked.is_empty()
    }

    /// Lifts every cut.
    pub(crate) fn unblock_all(&mut self) {
        self.blocked.clear();
    }

    /// Connects `a` and `b` at `now` unless they are cut or connected; returns whether a
    /// new connection is up.
    pub(crate) fn open(&mut self, a: usize, b: usize, now: Ms) -> bool {
        let blocked = self.is_blocked(a, b) || self.is_blocked(b, a);
        if blocked || self.link(a, b).conn.is_some() {
            return false;
        }
        self.next_conn += 1;
        let conn = self.next_conn;
        let link = self.link(a, b);
        link.conn = Some(conn);
        link.last_delivery = [now; 2];
        link.busy_until = [now; 2];
        true
    }

    /// Breaks the connection between `a` and `b`; returns whether one was up.
    pub(crate) fn close(&mut self, a: usize, b: usize) -> bool {
        self.link(a, b).conn.take().is_some()
    }

    /// Sends `bytes` from `from` to `to` at `now`: latency, loss and corruption drawn from
    /// `rng` as `plan` says, bandwidth queued per direction, delivery in order.
    pub(crate) fn transmit(
        &mut self,
        from: usize,
        to: usize,
        mut bytes: Vec<u8>,
        now: Ms,
        rng: &mut SimRng,
        plan: &FaultPlan,
    ) -> Transmission {
        let Some(conn) = self.link(from, to).conn else {
            return Transmission::Lost;
        };
        if self.blocked.contains(&(from, to)) {
            return Transmission::Lost;
        }
        let latency = rng.range(plan.latency_min_ms, plan.latency_max_ms + 1);
        if rng.chance(plan.drop_rate) {
            return Transmission::Breaks {
                at: now + latency,
                conn,
            };
        }
        if !bytes.is_empty() && rng.chance(plan.corrupt_rate) {
            let index = rng.index(bytes.len());
            bytes[index] ^= 1 << rng.range(0, 8);
        }
        let direction = usize::from(from > to);
        let transmit = match plan.bandwidth {
            0 => 0,
            bandwidth => (bytes.len() as u64 * 1000).div_ceil(bandwidth),
        };
        let link = self.link(from, to);
        let start = link.busy_until[direction].max(now);
        link.busy_until[direction] = start + transmit;
        let arrival = (start + transmit + latency).max(link.last_delivery[direction]);
        link.last_delivery[direction] = arrival;
        Transmission::Arrives {
            at: arrival,
            conn,
            bytes,
        }
    }
}
