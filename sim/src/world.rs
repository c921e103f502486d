//! The simulated world: nodes, links, disks, a workload and faults, on virtual time.
//!
//! One event queue ordered by (time, sequence number) drives everything, in one thread.
//! All randomness comes from one [`SimRng`] seeded by the run's seed, so a seed replays
//! bit for bit; a running hash of every effect (the trace hash) proves it.
//!
//! - **Links** are ordered and reliable per connection, as TCP is: a message is either
//!   delivered in order or its connection drops (and the dialler reconnects after a
//!   backoff). Latency, jitter and bandwidth delay delivery; a corrupted message arrives
//!   with one byte flipped. An asymmetric partition loses one direction silently, like a
//!   half-open connection, which only the core's stall timeout can notice.
//! - **Disks** complete requests in order after an fsync delay. A crash loses every request
//!   not yet complete; the oldest lost append may be torn (a prefix of its entries
//!   survives). A restarted node is a new core fed what survived.
//! - **Phases**: faults and writes run for `duration`; then everything heals (partitions end,
//!   crashed nodes restart, paused nodes resume, links reconnect, no more faults or writes)
//!   and every node must converge within `heal_bound`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use crdt_schema::policy::Policy;
use crdt_schema::{ChangeHash, FieldEdit, FieldValue, Identity, NodeId, RecordId, RecordView};
use mesh_core::storage::{DocumentStore, Restore, StorageRequest};
use mesh_core::{Command, CommandId, Config, Digest, Effect, Input, Instant, Node, Queues, Reply};

use crate::checkers::{Checkers, Failure};
use crate::disk::Disk;
use crate::faults;
use crate::network::{Network, Transmission};
use crate::plan::{FaultPlan, Options};
use crate::policy::{PolicyPlay, REFERENCE, accepted_offender};
use crate::rng::SimRng;
use crate::trace::Trace;
use crate::workload;

/// Virtual time in milliseconds since the start of the run.
pub type Ms = u64;

/// Wall-clock meaning of virtual time zero, as nodes see it (before skew).
const EPOCH_MS: u64 = 1_790_000_000_000;

/// Most events one run may process: a livelock fails the run instead of hanging it.
const EVENTS_MAX: u64 = 20_000_000;

/// What the simulator needs of a node. The real core implements it; tests wrap the core
/// in deliberately broken variants to show that the checkers catch them.
pub trait SimNode {
    /// Feeds one input.
    fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect>;
    /// When the node must next be ticked.
    fn next_deadline(&self) -> Option<Instant>;
    /// The digest of the node's durable records.
    fn digest(&self) -> Digest;
    /// Whether the node durably holds a change.
    fn holds_change(&self, record: &RecordId, hash: &ChangeHash) -> bool;
    /// Queue lengths, for the bound checkers.
    fn queues(&self) -> Queues;
    /// The policy the node enforces.
    fn policy(&self) -> Option<Policy>;
    /// The changes of a record's accepted document: (hash, author, dependencies).
    fn record_changes(&mut self, record: &RecordId) -> Vec<(ChangeHash, NodeId, Vec<ChangeHash>)>;
    /// Every quarantined change, as (record, change).
    fn quarantined(&self) -> Vec<(String, ChangeHash)>;
    /// The record as a read shows it, with the bytes of its accepted document's changes.
    fn accepted_record(&mut self, record: &RecordId) -> Option<(RecordView, Vec<Vec<u8>>)>;
    /// Where the node reads its saved documents (its simulated disk), before it restores.
    fn use_document_store(&mut self, store: Box<dyn DocumentStore>);
}

impl SimNode for Node {
    fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        Node::handle(self, now, input)
    }

    fn next_deadline(&self) -> Option<Instant> {
        Node::next_deadline(self)
    }

    fn digest(&self) -> Digest {
        Node::digest(self)
    }

    fn holds_change(&self, record: &RecordId, hash: &ChangeHash) -> bool {
        // A later policy may have quarantined an acknowledged write; it is still held.
        Node::holds_change(self, record, hash) || Node::holds_quarantined(self, record, hash)
    }

    fn queues(&self) -> Queues {
        Node::queues(self)
    }

    fn policy(&self) -> Option<Policy> {
        Node::policy(self).cloned()
    }

    fn record_changes(&mut self, record: &RecordId) -> Vec<(ChangeHash, NodeId, Vec<ChangeHash>)> {
        Node::record_changes(self, record)
    }

    fn quarantined(&self) -> Vec<(String, ChangeHash)> {
        Node::quarantined(self)
    }

    fn accepted_record(&mut self, record: &RecordId) -> Option<(RecordView, Vec<Vec<u8>>)> {
        Node::accepted_record(self, record)
    }

    fn use_document_store(&mut self, store: Box<dyn DocumentStore>) {
        Node::use_document_store(self, store);
    }
}

/// Builds a node from its configuration, identity and seed.
pub type NodeFactory = dyn Fn(Config, Identity, u64) -> Box<dyn SimNode>;

/// The real node core.
pub fn real_node(config: Config, identity: Identity, seed: u64) -> Box<dyn SimNode> {
    Box::new(Node::new(config, identity, seed))
}

/// How a run ended and what it did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Number of nodes.
    pub nodes: usize,
    /// Simulated time at the end.
    pub simulated: Duration,
    /// Events processed.
    pub events: u64,
    /// Messages delivered.
    pub messages: u64,
    /// Bytes delivered.
    pub bytes: u64,
    /// Writes acknowledged.
    pub writes_acked: u64,
    /// Simulated time from the start of healing to convergence.
    pub converge: Option<Duration>,
    /// The common digest at convergence.
    pub digest: Option<Digest>,
    /// Hash of every effect of the run.
    pub trace_hash: u64,
    /// The fault classes the seed enabled.
    pub faults: Vec<&'static str>,
    /// The first checker failure, if any.
    pub failure: Option<Failure>,
    /// The readable trace, when asked for.
    pub trace: Vec<String>,
}

#[derive(Debug)]
enum Event {
    Deliver {
        from: usize,
        to: usize,
        conn: u64,
        bytes: Vec<u8>,
    },
    Disconnect {
        a: usize,
        b: usize,
        conn: u64,
    },
    Connect {
        a: usize,
        b: usize,
    },
    StorageDone {
        node: usize,
        incarnation: u64,
    },
    Timer {
        node: usize,
        incarnation: u64,
        generation: u64,
    },
    Write {
        node: usize,
    },
    Crash,
    Restart {
        node: usize,
    },
    Pause,
    Unpause {
        node: usize,
    },
    PartitionStart,
    PartitionEnd,
    Heal,
    /// Head office applies policy `version`.
    PolicyChange {
        version: u64,
    },
    /// The byzantine node sends a crafted message.
    Byzantine,
}

/// Something a paused node receives when it resumes.
enum Held {
    Event(Event),
    Input(Input),
}

struct Scheduled {
    at: Ms,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Slot {
    identity: Identity,
    id: NodeId,
    config: Config,
    node: Option<Box<dyn SimNode>>,
    incarnation: u64,
    paused: bool,
    /// What reached the node while it was paused, in order.
    deferred: Vec<Held>,
    skew_ms: i64,
    disk: Disk,
    timer_at: Option<Ms>,
    timer_generation: u64,
    next_command: u64,
    writes: BTreeMap<CommandId, RecordId>,
    /// Counter writes in flight: the amount each creates or adds, counted once acknowledged.
    counting: BTreeMap<CommandId, (RecordId, i64)>,
    /// Commands whose replies a scenario waits for, and the replies that came.
    wanted: BTreeSet<CommandId>,
    replies: BTreeMap<CommandId, Result<Reply, mesh_core::CommandError>>,
}

/// One simulated run.
pub struct World<'a> {
    options: Options,
    plan: FaultPlan,
    factory: &'a NodeFactory,
    rng: SimRng,
    now: Ms,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    slots: Vec<Slot>,
    index_of: BTreeMap<NodeId, usize>,
    /// Links, connections and cuts.
    network: Network,
    healing: bool,
    heal_started: Ms,
    /// The fault classes the plan enabled, noted before healing turns them off.
    fault_classes: Vec<&'static str>,
    checkers: Checkers,
    events: u64,
    messages: u64,
    bytes: u64,
    /// The trace hash over every effect, and the verbose trace's lines.
    trace: Trace,
    /// The policy workload, with `--policy`.
    play: Option<PolicyPlay>,
    /// Reference records that changed on honest nodes during the current input.
    to_check: Vec<(usize, RecordId)>,
    /// Records whose counter the workload created or added to: checked at convergence.
    counted: BTreeSet<RecordId>,
    /// Records two nodes wrote at the same moment: their conflicts are compared at
    /// convergence.
    contested: BTreeSet<RecordId>,
    /// Per record, the sum of every acknowledged counter write (the creation's value and
    /// each increment): what every node must show once healed, if no policy quarantined
    /// any of them.
    counter_sums: BTreeMap<RecordId, i64>,
}

impl<'a> World<'a> {
    /// A world for `options` whose fault mix is drawn from the seed.
    pub fn new(options: Options, factory: &'a NodeFactory) -> World<'a> {
        let mut rng = SimRng::new(options.seed);
        let plan = FaultPlan::draw(&mut rng, &options.knobs);
        World::with_plan(options, plan, rng, factory)
    }

    /// A world with an explicit fault plan (scenarios use a calm one).
    pub fn with_plan(
        options: Options,
        plan: FaultPlan,
        mut rng: SimRng,
        factory: &'a NodeFactory,
    ) -> World<'a> {
        assert!(options.nodes >= 1, "a world needs a node");
        let mut slots = Vec::with_capacity(options.nodes);
        let mut index_of = BTreeMap::new();
        let identities: Vec<Identity> = (0..options.nodes)
            .map(|index| {
                Identity::from_seed(options.seed.wrapping_mul(1000).wrapping_add(index as u64))
            })
            .collect();
        let play = (options.knobs.policy == Some(true) && options.nodes >= 3)
            .then(|| PolicyPlay::new(options.seed, &identities));
        // A signature check is a pure function of the bytes: the nodes of one world share
        // their results, so each envelope is verified once per world, not once per node.
        let verified_cache = crdt_schema::VerifiedCache::default();
        for (index, identity) in identities.into_iter().enumerate() {
            let id = identity.node_id();
            index_of.insert(id, index);
            let skew_ms = faults::draw_skew(&mut rng, plan.clock_skew_max_ms);
            let config = Config {
                name: format!("node-{index}"),
                sync_interval: plan.sync_interval,
                sync_stall_timeout: plan.sync_stall_timeout,
                document_cache_bytes: plan.document_cache_bytes,
                org: play
                    .as_ref()
                    .map_or_else(Default::default, |play| play.org_id),
                verified_cache: Some(verified_cache.clone()),
                ..Config::default()
            };
            let mut node = factory(config.clone(), identity.clone(), rng.next_u64());
            let disk = Disk::default();
            node.use_document_store(disk.documents());
            slots.push(Slot {
                identity,
                id,
                config,
                node: Some(node),
                incarnation: 0,
                paused: false,
                deferred: Vec::new(),
                skew_ms,
                disk,
                timer_at: None,
                timer_generation: 0,
                next_command: 0,
                writes: BTreeMap::new(),
                counting: BTreeMap::new(),
                wanted: BTreeSet::new(),
                replies: BTreeMap::new(),
            });
        }
        let network = Network::new(options.nodes);
        let fault_classes = plan.classes();
        World {
            options,
            plan,
            factory,
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            seq: 0,
            slots,
            index_of,
            network,
            healing: false,
            heal_started: 0,
            fault_classes,
            checkers: Checkers::default(),
            events: 0,
            messages: 0,
            bytes: 0,
            trace: Trace::default(),
            play,
            to_check: Vec::new(),
            counted: BTreeSet::new(),
            contested: BTreeSet::new(),
            counter_sums: BTreeMap::new(),
        }
    }

    /// Runs the fault phase and the healing phase; returns the outcome.
    pub fn run(mut self) -> Outcome {
        self.start();
        let end = self.options.duration.as_millis() as Ms;
        self.schedule(end, Event::Heal);
        let bound = end + self.options.heal_bound.as_millis() as Ms;
        while self.checkers.failure.is_none() {
            let Some(Reverse(next)) = self.queue.pop() else {
                self.fail(
                    "convergence",
                    "the event queue ran dry before the nodes converged".into(),
                );
                break;
            };
            if self.healing && next.at > bound {
                self.now = bound;
                let digests = self.digest_list();
                self.fail(
                    "convergence",
                    format!(
                        "not converged {} s after healing began: {digests}",
                        self.options.heal_bound.as_secs()
                    ),
                );
                break;
            }
            self.now = next.at;
            self.checkers.set_now(self.now);
            self.events += 1;
            if self.events > EVENTS_MAX {
                self.fail("livelock", format!("more than {EVENTS_MAX} events"));
                break;
            }
            self.process(next.event);
            if self.healing && self.converged() {
                break;
            }
        }
        self.outcome()
    }

    fn outcome(&self) -> Outcome {
        let converged = self.checkers.failure.is_none() && self.healing;
        Outcome {
            seed: self.options.seed,
            nodes: self.options.nodes,
            simulated: Duration::from_millis(self.now),
            events: self.events,
            messages: self.messages,
            bytes: self.bytes,
            writes_acked: self.checkers.acked.len() as u64,
            converge: converged.then(|| Duration::from_millis(self.now - self.heal_started)),
            digest: converged.then(|| {
                self.slots[0]
                    .node
                    .as_ref()
                    .expect("alive after healing")
                    .digest()
            }),
            trace_hash: self.trace.hash(),
            faults: self.fault_classes.clone(),
            failure: self.checkers.failure.clone(),
            trace: self.trace.lines().to_vec(),
        }
    }

    // ----- stepping, for scripted scenarios -----

    /// Connects every pair at the current time.
    pub fn connect_all(&mut self) {
        self.reconnect_all();
    }

    /// Processes every event due up to `until_ms` (simulated), then sets the clock there.
    pub fn run_until(&mut self, until_ms: Ms) {
        while let Some(Reverse(next)) = self.queue.peek() {
            if next.at > until_ms || self.checkers.failure.is_some() {
                break;
            }
            let Reverse(next) = self.queue.pop().expect("peeked");
            self.now = next.at;
            self.checkers.set_now(self.now);
            self.events += 1;
            self.process(next.event);
        }
        self.now = self.now.max(until_ms);
    }

    /// The current simulated time.
    pub fn now_ms(&self) -> Ms {
        self.now
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the world has no nodes (never: a world needs one).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// A live node's digest.
    pub fn digest(&self, node: usize) -> Option<Digest> {
        self.slots[node].node.as_ref().map(|core| core.digest())
    }

    /// Runs a command now and returns its reply, if it completes without waiting on time
    /// (reads do; writes need their append, see [`World::run_until`]).
    pub fn command_now(
        &mut self,
        node: usize,
        command: Command,
    ) -> Option<Result<Reply, mesh_core::CommandError>> {
        let id = self.command_later(node, command);
        self.slots[node].replies.remove(&id)
    }

    /// Issues a command; its reply is kept for [`World::reply`].
    pub fn command_later(&mut self, node: usize, command: Command) -> CommandId {
        let slot = &mut self.slots[node];
        let id = CommandId(slot.next_command + 1);
        slot.wanted.insert(id);
        let issued = self.command(node, command);
        debug_assert_eq!(issued, id);
        id
    }

    /// The reply to a command, once it completed.
    pub fn reply(
        &mut self,
        node: usize,
        id: CommandId,
    ) -> Option<Result<Reply, mesh_core::CommandError>> {
        self.slots[node].replies.remove(&id)
    }

    /// Cuts the network between two groups; connections across break.
    pub fn partition(&mut self, left: &[usize], right: &[usize]) {
        for &a in left {
            for &b in right {
                self.network.block(a, b);
                self.network.block(b, a);
                self.drop_link(a, b);
            }
        }
    }

    /// Ends every partition and reconnects every pair.
    pub fn heal_network(&mut self) {
        self.partition_end();
    }

    /// Crashes a node now.
    pub fn crash_now(&mut self, node: usize) {
        if self.slots[node].node.is_some() {
            self.crash_node(node);
        }
    }

    /// Restarts a crashed node now.
    pub fn restart_now(&mut self, node: usize) {
        self.restart(node);
    }

    /// Whether every live node has the same digest and all nodes are live.
    pub fn all_equal(&self) -> bool {
        let digests: Vec<Option<Digest>> = (0..self.slots.len())
            .map(|node| self.digest(node))
            .collect();
        digests
            .iter()
            .all(|digest| digest.is_some() && *digest == digests[0])
    }

    /// Every acknowledged write that some live node lacks.
    pub fn missing_acked(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for (record, hash, writer) in &self.checkers.acked {
            for (index, slot) in self.slots.iter().enumerate() {
                if slot
                    .node
                    .as_ref()
                    .is_some_and(|node| !node.holds_change(record, hash))
                {
                    missing.push(format!(
                        "node {index} lacks {hash} to {record} (written on node {writer})"
                    ));
                }
            }
        }
        missing
    }

    /// The first checker failure so far.
    pub fn failure(&self) -> Option<&Failure> {
        self.checkers.failure.as_ref()
    }

    // ----- scheduling -----

    fn schedule(&mut self, at: Ms, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            event,
        }));
    }

    fn start(&mut self) {
        if let Some(play) = &self.play {
            // Every node starts with the org's first policy, as `mesh init --org` plus
            // `mesh policy apply` leaves it.
            let stored = play.stored(1);
            let end = self.options.duration.as_millis() as Ms;
            for node in 0..self.slots.len() {
                self.slots[node].disk.store_policy(stored.clone());
                let restore = Restore {
                    policy: Some(stored.clone()),
                    ..Restore::default()
                };
                self.input(node, Input::Restore(restore));
            }
            self.schedule(end / 3, Event::PolicyChange { version: 2 });
            self.schedule(end * 2 / 3, Event::PolicyChange { version: 3 });
            let at = self.rng.exponential_ms(3000.0);
            self.schedule(at, Event::Byzantine);
        }
        for a in 0..self.slots.len() {
            for b in a + 1..self.slots.len() {
                self.schedule(0, Event::Connect { a, b });
            }
        }
        if self.plan.write_rate > 0.0 {
            for node in 0..self.slots.len() {
                let delay = self.write_delay();
                self.schedule(delay, Event::Write { node });
            }
        }
        if let Some(every) = self.plan.partition_every {
            let at = faults::draw_next(&mut self.rng, every);
            self.schedule(at, Event::PartitionStart);
        }
        if let Some(every) = self.plan.crash_every {
            let at = faults::draw_next(&mut self.rng, every);
            self.schedule(at, Event::Crash);
        }
        if let Some(every) = self.plan.pause_every {
            let at = faults::draw_next(&mut self.rng, every);
            self.schedule(at, Event::Pause);
        }
        if self.plan.offline_node && self.slots.len() > 1 {
            // Node 0 is the laptop that goes away for most of the fault phase.
            let end = self.options.duration.as_millis() as Ms;
            for other in 1..self.slots.len() {
                self.network.block(0, other);
                self.network.block(other, 0);
                self.drop_link(0, other);
            }
            self.schedule(end * 4 / 5, Event::PartitionEnd);
        }
    }

    fn write_delay(&mut self) -> Ms {
        self.rng.exponential_ms(1000.0 / self.plan.write_rate)
    }

    // ----- events -----

    fn process(&mut self, event: Event) {
        if self.options.verbose {
            self.trace
                .line(format!("{:>8} {}", self.now, describe(&event)));
        }
        match event {
            Event::Deliver {
                from,
                to,
                conn,
                bytes,
            } => {
                if self.network.conn(from, to) != Some(conn) {
                    return;
                }
                if self.defer_if_paused(
                    to,
                    Event::Deliver {
                        from,
                        to,
                        conn,
                        bytes: bytes.clone(),
                    },
                ) {
                    return;
                }
                self.messages += 1;
                self.bytes += bytes.len() as u64;
                let from_id = self.slots[from].id;
                self.input(
                    to,
                    Input::MessageReceived {
                        from: from_id,
                        bytes,
                    },
                );
            }
            Event::Disconnect { a, b, conn } => {
                if self.network.conn(a, b) == Some(conn) {
                    self.drop_link(a, b);
                    let backoff = self.rng.range(200, 3000);
                    self.schedule(self.now + backoff, Event::Connect { a, b });
                }
            }
            Event::Connect { a, b } => self.connect(a, b),
            Event::StorageDone { node, incarnation } => {
                if self.slots[node].incarnation != incarnation || self.slots[node].node.is_none() {
                    return;
                }
                if self.defer_if_paused(node, Event::StorageDone { node, incarnation }) {
                    return;
                }
                self.storage_done(node);
            }
            Event::Timer {
                node,
                incarnation,
                generation,
            } => {
                let slot = &self.slots[node];
                if slot.incarnation != incarnation
                    || slot.timer_generation != generation
                    || slot.node.is_none()
                {
                    return;
                }
                if self.defer_if_paused(
                    node,
                    Event::Timer {
                        node,
                        incarnation,
                        generation,
                    },
                ) {
                    return;
                }
                self.slots[node].timer_at = None;
                self.input(node, Input::Tick);
            }
            Event::Write { node } => self.write(node),
            Event::Crash => self.crash(),
            Event::Restart { node } => self.restart(node),
            Event::Pause => self.pause(),
            Event::Unpause { node } => self.unpause(node),
            Event::PartitionStart => self.partition_start(),
            Event::PartitionEnd => self.partition_end(),
            Event::Heal => self.heal(),
            Event::PolicyChange { version }
                if self.slots[0].node.is_none() || self.slots[0].paused =>
            {
                // Head office is down: the administrator tries again a little later.
                self.schedule(self.now + 1000, Event::PolicyChange { version });
            }
            Event::PolicyChange { version } => {
                let in_force = self.slots[0]
                    .node
                    .as_ref()
                    .and_then(|node| node.policy())
                    .map_or(0, |policy| policy.version);
                if in_force >= version {
                    return;
                }
                if let Some(play) = &mut self.play {
                    play.issued = version;
                    let signed = play.signed(version);
                    self.command(0, Command::ApplyPolicy { signed });
                    // Like an administrator, look again later: a crash before the policy
                    // was saved (or its endorsements failing) means applying it again.
                    self.schedule(self.now + 5000, Event::PolicyChange { version });
                }
            }
            Event::Byzantine => self.byzantine(),
        }
    }

    fn defer_if_paused(&mut self, node: usize, event: Event) -> bool {
        if self.slots[node].paused {
            self.slots[node].deferred.push(Held::Event(event));
            true
        } else {
            false
        }
    }

    fn node_now(&self, node: usize) -> Instant {
        let ms = (EPOCH_MS + self.now) as i64 + self.slots[node].skew_ms;
        Instant::from_millis(ms as u64)
    }

    /// Feeds one input to a live node, carries out its effects, re-arms its timer and runs
    /// the continuous checkers.
    pub(crate) fn input(&mut self, node: usize, input: Input) {
        let now = self.node_now(node);
        let tick = matches!(input, Input::Tick);
        let Some(core) = self.slots[node].node.as_mut() else {
            return;
        };
        let effects = core.handle(now, input);
        for effect in effects {
            self.effect(node, effect);
        }
        let Some(core) = self.slots[node].node.as_ref() else {
            return;
        };
        if tick && core.next_deadline().is_some_and(|deadline| deadline <= now) {
            // A tick must handle everything due; a deadline left in the past would spin.
            let message = format!("node {node} still has a deadline due after a tick");
            return self.fail("timer-not-advanced", message);
        }
        self.arm_timer(node);
        self.check_reference_data();
        let Some(core) = self.slots[node].node.as_ref() else {
            return;
        };
        let queues = core.queues();
        let stall = self.slots[node].config.sync_stall_timeout;
        if let Some(failure) =
            self.checkers
                .queues(node, &queues, now, stall, &self.slots[node].config)
        {
            self.checkers.fail(failure);
        }
    }

    fn arm_timer(&mut self, node: usize) {
        let skew = self.slots[node].skew_ms;
        let Some(core) = self.slots[node].node.as_ref() else {
            return;
        };
        let Some(deadline) = core.next_deadline() else {
            return;
        };
        let at = (deadline.as_millis() as i64 - skew - EPOCH_MS as i64).max(self.now as i64) as Ms;
        let slot = &mut self.slots[node];
        if slot.timer_at.is_some_and(|armed| armed <= at) {
            return;
        }
        slot.timer_at = Some(at);
        slot.timer_generation += 1;
        let (incarnation, generation) = (slot.incarnation, slot.timer_generation);
        self.schedule(
            at,
            Event::Timer {
                node,
                incarnation,
                generation,
            },
        );
    }

    fn effect(&mut self, node: usize, effect: Effect) {
        self.trace.effect(self.now, node, &effect);
        match effect {
            Effect::Send { to, bytes } => {
                if let Some(&to) = self.index_of.get(&to) {
                    self.send(node, to, bytes);
                }
            }
            Effect::Storage { op, request } => {
                if let StorageRequest::Append { envelopes } = &request {
                    let org = self.slots[node].config.org;
                    if let Some(failure) = self.checkers.appended(node, &org, envelopes) {
                        self.checkers.fail(failure);
                    }
                }
                let fsync = self.rng.range(
                    self.plan.disk_latency_min_ms,
                    self.plan.disk_latency_max_ms + 1,
                );
                let done = self.slots[node].disk.request(op, request, self.now, fsync);
                let incarnation = self.slots[node].incarnation;
                self.schedule(done, Event::StorageDone { node, incarnation });
            }
            Effect::Complete { id, result } => {
                if let Some(record) = self.slots[node].writes.remove(&id)
                    && let Ok(Reply::Written {
                        change: Some(hash), ..
                    }) = &result
                {
                    self.checkers.acked.push((record, *hash, node));
                }
                if let Some((record, amount)) = self.slots[node].counting.remove(&id)
                    && let Ok(Reply::Written {
                        change: Some(_), ..
                    }) = &result
                {
                    let sum = self.counter_sums.entry(record).or_default();
                    *sum = sum.wrapping_add(amount);
                }
                if self.slots[node].wanted.remove(&id) {
                    self.slots[node].replies.insert(id, result);
                }
            }
            Effect::Disconnect { peer, .. } => {
                if let Some(&peer) = self.index_of.get(&peer)
                    && let Some(conn) = self.network.conn(node, peer)
                {
                    self.schedule(
                        self.now,
                        Event::Disconnect {
                            a: node,
                            b: peer,
                            conn,
                        },
                    );
                }
            }
            Effect::Emit(event) => {
                if let Some(play) = &self.play
                    && !play.is_byzantine(node)
                {
                    match &event {
                        mesh_core::Event::RecordChanged { record, .. } => {
                            self.to_check.push((node, record.clone()));
                        }
                        mesh_core::Event::PolicyAdopted { .. } => {
                            for collection in workload::COLLECTIONS.iter().chain([&"crafted"]) {
                                for id in 0..self.plan.records_per_collection {
                                    let record = RecordId::new(collection, &format!("r{id}"))
                                        .expect("valid names");
                                    self.to_check.push((node, record));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                if self.options.verbose {
                    self.trace
                        .line(format!("{:>8}   node {node}: {event:?}", self.now));
                }
            }
        }
    }

    // ----- network -----

    fn send(&mut self, from: usize, to: usize, bytes: Vec<u8>) {
        match self
            .network
            .transmit(from, to, bytes, self.now, &mut self.rng, &self.plan)
        {
            Transmission::Lost => {}
            Transmission::Breaks { at, conn } => self.schedule(
                at,
                Event::Disconnect {
                    a: from,
                    b: to,
                    conn,
                },
            ),
            Transmission::Arrives { at, conn, bytes } => self.schedule(
                at,
                Event::Deliver {
                    from,
                    to,
                    conn,
                    bytes,
                },
            ),
        }
    }

    fn connect(&mut self, a: usize, b: usize) {
        let up = self.slots[a].node.is_some() && self.slots[b].node.is_some();
        if !up || !self.network.open(a, b, self.now) {
            return;
        }
        let (id_a, id_b) = (self.slots[a].id, self.slots[b].id);
        self.input_or_defer(a, Input::PeerConnected { peer: id_b });
        self.input_or_defer(b, Input::PeerConnected { peer: id_a });
    }

    fn drop_link(&mut self, a: usize, b: usize) {
        if !self.network.close(a, b) {
            return;
        }
        let (id_a, id_b) = (self.slots[a].id, self.slots[b].id);
        self.input_or_defer(a, Input::PeerDisconnected { peer: id_b });
        self.input_or_defer(b, Input::PeerDisconnected { peer: id_a });
    }

    /// Connection changes reach a paused node when it resumes, in order with the rest.
    fn input_or_defer(&mut self, node: usize, input: Input) {
        if self.slots[node].node.is_none() {
            return;
        }
        if self.slots[node].paused {
            self.slots[node].deferred.push(Held::Input(input));
            return;
        }
        self.input(node, input);
    }

    // ----- storage -----

    fn storage_done(&mut self, node: usize) {
        let op = self.slots[node].disk.complete();
        self.input(node, Input::StorageDone { op, result: Ok(()) });
    }

    // ----- workload -----

    fn write(&mut self, node: usize) {
        if self.healing {
            return;
        }
        let delay = self.write_delay();
        self.schedule(self.now + delay, Event::Write { node });
        if self.slots[node].node.is_none() || self.slots[node].paused {
            return;
        }
        let roll = self.rng.unit();
        if roll < 0.05 {
            let record = workload::random_record(&mut self.rng, self.plan.records_per_collection);
            self.command(node, Command::Delete { record });
        } else if roll < 0.15 && self.slots.len() > 1 {
            // Two nodes edit the same field of the same record at the same moment.
            let record = workload::random_record(&mut self.rng, self.plan.records_per_collection);
            self.contested.insert(record.clone());
            let other = (node + 1 + self.rng.index(self.slots.len() - 1)) % self.slots.len();
            for writer in [node, other] {
                if self.slots[writer].node.is_some() && !self.slots[writer].paused {
                    let fields = workload::random_fields(&mut self.rng, 1);
                    self.command(
                        writer,
                        Command::Put {
                            record: record.clone(),
                            fields,
                        },
                    );
                }
            }
        } else if roll < 0.18 {
            for _ in 0..20 {
                let record =
                    workload::random_record(&mut self.rng, self.plan.records_per_collection);
                let fields = workload::random_fields(&mut self.rng, 3);
                self.command(node, Command::Put { record, fields });
            }
        } else if roll < 0.30 {
            self.count_stock(node);
        } else {
            let record = workload::random_record(&mut self.rng, self.plan.records_per_collection);
            let count = 1 + self.rng.index(3);
            let fields = workload::random_fields(&mut self.rng, count);
            self.command(node, Command::Put { record, fields });
        }
    }

    /// A stock count: the node adds to the record's counter if it shows one. Only node 0
    /// creates counters (when it shows none), so every increment lands on the one counter
    /// and the sum of the acknowledged writes is what every node must show once healed.
    fn count_stock(&mut self, node: usize) {
        let record = workload::counted_record(&mut self.rng);
        let amount = self.rng.range(0, 41) as i64 - 20;
        let shown = match self.command_now(
            node,
            Command::Get {
                record: record.clone(),
            },
        ) {
            Some(Ok(Reply::Record(Some(view)))) => view.fields.get(workload::COUNTER).cloned(),
            _ => None,
        };
        let edit = match shown {
            Some(FieldValue::Counter(_)) => FieldEdit::Add(amount),
            _ if node == 0 => FieldEdit::Set(FieldValue::Counter(amount)),
            _ => return,
        };
        let fields = [(workload::COUNTER.to_owned(), edit)].into();
        // Noted before the command goes in: a refusal completes at once.
        let id = CommandId(self.slots[node].next_command + 1);
        self.slots[node]
            .counting
            .insert(id, (record.clone(), amount));
        let issued = self.command(
            node,
            Command::Put {
                record: record.clone(),
                fields,
            },
        );
        debug_assert_eq!(issued, id);
        self.counted.insert(record);
    }

    /// Runs a command on a node, remembering writes so their acknowledgement is checked.
    pub(crate) fn command(&mut self, node: usize, command: Command) -> CommandId {
        let slot = &mut self.slots[node];
        slot.next_command += 1;
        let id = CommandId(slot.next_command);
        if let Command::Put { record, .. } | Command::Delete { record } = &command {
            slot.writes.insert(id, record.clone());
        }
        self.input(node, Input::Command { id, command });
        id
    }

    // ----- faults -----

    fn crash(&mut self) {
        let Some(every) = self.plan.crash_every else {
            return;
        };
        if self.healing {
            return;
        }
        let next = faults::draw_next(&mut self.rng, every);
        self.schedule(self.now + next, Event::Crash);
        let node = faults::draw_target(&mut self.rng, self.slots.len());
        if self.slots[node].node.is_none() {
            return;
        }
        self.crash_node(node);
        let down = faults::draw_downtime(&mut self.rng);
        self.schedule(self.now + down, Event::Restart { node });
    }

    pub(crate) fn crash_node(&mut self, node: usize) {
        for other in 0..self.slots.len() {
            if other != node {
                self.drop_link(node, other);
            }
        }
        let (torn, keep) = faults::draw_crash_damage(&mut self.rng);
        let slot = &mut self.slots[node];
        slot.node = None;
        slot.paused = false;
        slot.deferred.clear();
        slot.incarnation += 1;
        slot.timer_at = None;
        slot.writes.clear();
        slot.counting.clear();
        slot.disk.crash(torn, keep, self.now);
    }

    pub(crate) fn restart(&mut self, node: usize) {
        if self.slots[node].node.is_some() {
            return;
        }
        let seed = self.rng.next_u64();
        let slot = &mut self.slots[node];
        let mut core = (self.factory)(slot.config.clone(), slot.identity.clone(), seed);
        core.use_document_store(slot.disk.documents());
        let restore = slot.disk.restore();
        let now = Instant::from_millis(((EPOCH_MS + self.now) as i64 + slot.skew_ms) as u64);
        let effects = core.handle(now, Input::Restore(restore));
        slot.node = Some(core);
        for effect in effects {
            self.effect(node, effect);
        }
        self.arm_timer(node);
        for other in 0..self.slots.len() {
            if other != node {
                let delay = faults::draw_dial_delay(&mut self.rng, 500);
                let (a, b) = (node.min(other), node.max(other));
                self.schedule(self.now + delay, Event::Connect { a, b });
            }
        }
    }

    fn pause(&mut self) {
        let Some(every) = self.plan.pause_every else {
            return;
        };
        if self.healing {
            return;
        }
        let next = faults::draw_next(&mut self.rng, every);
        self.schedule(self.now + next, Event::Pause);
        let node = faults::draw_target(&mut self.rng, self.slots.len());
        if self.slots[node].node.is_none() || self.slots[node].paused {
            return;
        }
        self.slots[node].paused = true;
        let length = faults::draw_pause(&mut self.rng);
        self.schedule(self.now + length, Event::Unpause { node });
    }

    fn unpause(&mut self, node: usize) {
        if !self.slots[node].paused {
            return;
        }
        self.slots[node].paused = false;
        if self.slots[node].node.is_none() {
            return;
        }
        // A resumed node first notices the time, then everything that waited for it.
        self.input(node, Input::Tick);
        for held in std::mem::take(&mut self.slots[node].deferred) {
            match held {
                Held::Event(event) => self.process(event),
                Held::Input(input) => self.input(node, input),
            }
        }
    }

    fn partition_start(&mut self) {
        let Some(every) = self.plan.partition_every else {
            return;
        };
        if self.healing || self.slots.len() < 2 || self.network.any_blocked() {
            if !self.healing {
                let next = faults::draw_next(&mut self.rng, every);
                self.schedule(self.now + next, Event::PartitionStart);
            }
            return;
        }
        for (from, to) in faults::draw_cut(&mut self.rng, self.slots.len()) {
            self.network.block(from, to);
        }
        // Symmetric cuts break connections at once; a one-way cut leaves them half open.
        for (a, b) in self.network.pairs() {
            if self.network.is_blocked(a, b) && self.network.is_blocked(b, a) {
                self.drop_link(a, b);
            }
        }
        let length = faults::draw_partition_length(&mut self.rng);
        self.schedule(self.now + length, Event::PartitionEnd);
        let next = length + faults::draw_next(&mut self.rng, every);
        self.schedule(self.now + next, Event::PartitionStart);
    }

    fn partition_end(&mut self) {
        self.network.unblock_all();
        self.reconnect_all();
    }

    fn reconnect_all(&mut self) {
        for (a, b) in self.network.pairs() {
            let delay = faults::draw_dial_delay(&mut self.rng, 300);
            self.schedule(self.now + delay, Event::Connect { a, b });
        }
    }

    fn heal(&mut self) {
        self.healing = true;
        self.heal_started = self.now;
        self.network.unblock_all();
        self.plan.drop_rate = 0.0;
        self.plan.corrupt_rate = 0.0;
        for node in 0..self.slots.len() {
            if self.slots[node].paused {
                self.unpause(node);
            }
            if self.slots[node].node.is_none() {
                self.restart(node);
            }
        }
        self.reconnect_all();
    }

    // ----- the byzantine node and the reference-data checker -----

    fn byzantine(&mut self) {
        let Some(play) = &self.play else { return };
        if self.healing {
            return;
        }
        let byzantine = play.byzantine;
        let records = self.plan.records_per_collection;
        let time_ms = (EPOCH_MS + self.now) as i64;
        let (what, bytes) = play.attack(&mut self.rng, records, time_ms);
        let target = self.rng.index(self.slots.len() - 1);
        if self.options.verbose {
            self.trace.line(format!(
                "{:>8}   node {byzantine} (byzantine) sends node {target}: {what}",
                self.now
            ));
        }
        self.send(byzantine, target, bytes);
        let next = self.rng.exponential_ms(3000.0);
        self.schedule(self.now + next, Event::Byzantine);
    }

    /// No honest node shows a change that no writer its policy allows wrote or built on
    /// (a revoked key, a non-member, a role that may not write the collection), in any
    /// collection; judged by the simulator's own reading of the policy.
    fn check_reference_data(&mut self) {
        let checks = std::mem::take(&mut self.to_check);
        let Some(play) = &self.play else { return };
        let first = play.policy(1);
        for (node, record) in checks {
            let Some(core) = self.slots[node].node.as_mut() else {
                continue;
            };
            let policy = core.policy().unwrap_or_else(|| first.clone());
            let changes = core.record_changes(&record);
            if let Some((hash, author)) = accepted_offender(&policy, record.collection(), &changes)
            {
                let checker = if record.collection() == REFERENCE {
                    "reference-written-by-non-master"
                } else {
                    "written-by-non-writer"
                };
                let message = format!(
                    "node {node} shows change {hash} to {record} by {author}, which no writer policy version {} allows wrote or built on",
                    policy.version
                );
                return self.fail(checker, message);
            }
        }
    }

    /// Whether a node takes part in convergence: every node but the byzantine one.
    fn honest(&self, node: usize) -> bool {
        self.play
            .as_ref()
            .is_none_or(|play| !play.is_byzantine(node))
    }

    // ----- checks -----

    fn converged(&mut self) -> bool {
        let nodes: Vec<Option<&dyn SimNode>> =
            self.slots.iter().map(|slot| slot.node.as_deref()).collect();
        let honest: Vec<bool> = (0..self.slots.len())
            .map(|node| self.honest(node))
            .collect();
        let issued = self.play.as_ref().map(|play| play.issued);
        if !self.checkers.converged(&nodes, &honest, issued, self.now) {
            return false;
        }
        self.check_counters(&honest) && self.check_conflicts(&honest)
    }

    /// **conflict-diverged**: every honest node shows each record two nodes wrote at once
    /// with the same fields and the same conflicts (the same other values by the same
    /// authors), whatever order the changes came in.
    fn check_conflicts(&mut self, honest: &[bool]) -> bool {
        let contested = std::mem::take(&mut self.contested);
        let mut failure = None;
        'records: for record in &contested {
            let mut first: Option<(usize, String)> = None;
            for (index, slot) in self.slots.iter_mut().enumerate() {
                let Some(node) = slot.node.as_mut().filter(|_| honest[index]) else {
                    continue;
                };
                let shown = node.accepted_record(record).map(|(view, _)| {
                    let conflicts: Vec<_> = view
                        .conflicts
                        .iter()
                        .map(|(name, others)| {
                            let others: Vec<_> = others
                                .iter()
                                .map(|other| {
                                    (format!("{:?}", other.value), other.author, other.time_ms)
                                })
                                .collect();
                            (name.clone(), others)
                        })
                        .collect();
                    format!("{:?} {conflicts:?}", view.fields)
                });
                let shown = shown.unwrap_or_else(|| "not shown".into());
                match &first {
                    None => first = Some((index, shown)),
                    Some((other, seen)) if *seen != shown => {
                        failure = Some(format!(
                            "{record}: node {other} shows {seen} but node {index} shows {shown}"
                        ));
                        break 'records;
                    }
                    Some(_) => {}
                }
            }
        }
        self.contested = contested;
        match failure {
            Some(message) => {
                self.fail("conflict-diverged", message);
                false
            }
            None => true,
        }
    }

    /// **counter-mismatch**: on every honest node, every counter the workload touched shows
    /// what the simulator computes from the record's changes by its own reading of
    /// Automerge's rules (`checkers::counter_from_changes`) and, when no policy can have
    /// quarantined a write, the sum of the acknowledged counter writes.
    fn check_counters(&mut self, honest: &[bool]) -> bool {
        if self
            .slots
            .iter()
            .any(|slot| !slot.counting.is_empty() || !slot.writes.is_empty())
        {
            // A node shows its own write before the append that acknowledges it: wait.
            return false;
        }
        let counted = std::mem::take(&mut self.counted);
        let mut failure = None;
        'records: for record in &counted {
            for (index, slot) in self.slots.iter_mut().enumerate() {
                let Some(node) = slot.node.as_mut().filter(|_| honest[index]) else {
                    continue;
                };
                let Some((view, changes)) = node.accepted_record(record) else {
                    continue;
                };
                let expected = crate::checkers::counter_from_changes(&changes, workload::COUNTER);
                let shown = match view.fields.get(workload::COUNTER) {
                    Some(FieldValue::Counter(count)) => Some(*count),
                    _ => None,
                };
                if expected != Ok(shown) {
                    failure = Some(format!(
                        "node {index} shows {record} {} = {shown:?}, but its {} changes make it {expected:?}",
                        workload::COUNTER,
                        changes.len()
                    ));
                    break 'records;
                }
                let acknowledged = self.counter_sums.get(record).copied();
                if self.play.is_none() && shown != acknowledged {
                    failure = Some(format!(
                        "node {index} shows {record} {} = {shown:?}, but the acknowledged counter writes add up to {acknowledged:?}",
                        workload::COUNTER,
                    ));
                    break 'records;
                }
            }
        }
        self.counted = counted;
        match failure {
            Some(message) => {
                self.fail("counter-mismatch", message);
                false
            }
            None => true,
        }
    }

    fn digest_list(&self) -> String {
        self.slots
            .iter()
            .enumerate()
            .map(|(index, slot)| match &slot.node {
                Some(node) => format!("node {index}: {}", node.digest()),
                None => format!("node {index}: down"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn fail(&mut self, checker: &'static str, message: String) {
        self.checkers.fail(Failure {
            checker,
            message,
            at_ms: self.now,
        });
    }
}

fn describe(event: &Event) -> String {
    match event {
        Event::Deliver {
            from, to, bytes, ..
        } => format!("deliver {from} -> {to} ({} bytes)", bytes.len()),
        other => format!("{other:?}"),
    }
}
