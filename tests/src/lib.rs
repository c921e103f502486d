//! A small deterministic harness that wires several node cores together in memory.
//!
//! Messages travel in one global FIFO, so each connection is ordered. [`Harness::step`]
//! delivers every message in flight at that moment (one "flight"), then completes every
//! storage request the nodes made, as a disk would; the messages this produces wait for the
//! next step. Counting steps therefore counts one-way message flights, and two flights are
//! one round trip. Time moves only when a test says so.
//!
//! The full simulator (faults, crashes, virtual latency) lives in its own crate; this
//! harness is for readable, exact scenarios.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crdt_schema::{FieldEdit, FieldValue, Identity, NodeId, RecordId, RecordView};
use mesh_core::storage::{DocumentStore, Restore, SavedRecord, StorageRequest};
use mesh_core::{
    Command, CommandError, CommandId, Config, Effect, Event, Input, Instant, Node, Reply, Status,
    StorageOpId,
};

/// How storage requests are completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageMode {
    /// Every request completes successfully at the end of the step that made it.
    Immediate,
    /// Requests wait until the test completes them with [`Harness::complete_storage`].
    Manual,
}

/// One node and its in-memory storage.
pub struct HarnessNode {
    /// The core.
    pub node: Node,
    /// Storage requests not yet completed.
    pub pending_storage: VecDeque<(StorageOpId, StorageRequest)>,
    /// Envelopes whose append completed, in order.
    pub log: Vec<Vec<u8>>,
    /// The last checkpoint of each record.
    pub saved: BTreeMap<RecordId, SavedRecord>,
    /// The documents of `saved`, which the node reads back through its document store.
    pub documents: Documents,
    /// The signed policy stored with the last checkpoint that carried one.
    pub policy: Option<Vec<u8>>,
    /// Events the node emitted.
    pub events: Vec<Event>,
    /// Every effect, in order, for assertions on ordering.
    pub effects: Vec<Effect>,
}

/// A node's document store: the documents its completed checkpoints saved, as sled holds
/// them for the daemon. Clones share the documents.
#[derive(Clone, Default)]
pub struct Documents(Arc<Mutex<BTreeMap<RecordId, Vec<u8>>>>);

impl Documents {
    /// Replaces a record's saved document (to damage it, say).
    pub fn set(&self, record: &RecordId, document: Vec<u8>) {
        self.0
            .lock()
            .expect("tests hold no lock across a panic")
            .insert(record.clone(), document);
    }
}

impl DocumentStore for Documents {
    fn document(&self, record: &RecordId) -> Result<Option<Vec<u8>>, mesh_core::StorageError> {
        let documents = self.0.lock().expect("tests hold no lock across a panic");
        Ok(documents.get(record).cloned())
    }
}

/// Several nodes and the links between them.
pub struct Harness {
    /// Virtual time.
    pub now: Instant,
    /// The nodes, by index.
    pub nodes: Vec<HarnessNode>,
    /// How storage completes.
    pub storage_mode: StorageMode,
    links: BTreeSet<(usize, usize)>,
    in_flight: VecDeque<(usize, usize, Vec<u8>)>,
    next_command: u64,
    completions: BTreeMap<CommandId, Result<Reply, CommandError>>,
    /// Messages delivered so far.
    pub messages_delivered: u64,
    /// Bytes delivered so far.
    pub bytes_delivered: u64,
    /// A running hash of every effect, to compare runs.
    trace: u64,
}

/// Builds the field map of a put from pairs.
pub fn fields(pairs: &[(&str, FieldValue)]) -> BTreeMap<String, FieldEdit> {
    pairs
        .iter()
        .map(|(name, value)| ((*name).to_owned(), FieldEdit::Set(value.clone())))
        .collect()
}

impl Harness {
    /// `count` nodes with the default configuration and identities from seeds 1..=count.
    pub fn new(count: usize) -> Harness {
        Harness::with_config(count, |_| Config::default())
    }

    /// `count` nodes, each configured by `config(index)`.
    pub fn with_config(count: usize, config: impl Fn(usize) -> Config) -> Harness {
        let nodes = (0..count)
            .map(|index| {
                let documents = Documents::default();
                let mut node = Node::new(
                    config(index),
                    Identity::from_seed(index as u64 + 1),
                    index as u64,
                );
                node.use_document_store(Box::new(documents.clone()));
                (node, documents)
            })
            .map(|(node, documents)| HarnessNode {
                node,
                pending_storage: VecDeque::new(),
                log: Vec::new(),
                saved: BTreeMap::new(),
                documents,
                policy: None,
                events: Vec::new(),
                effects: Vec::new(),
            })
            .collect();
        Harness {
            now: Instant::from_millis(1_790_000_000_000),
            nodes,
            storage_mode: StorageMode::Immediate,
            links: BTreeSet::new(),
            in_flight: VecDeque::new(),
            next_command: 0,
            completions: BTreeMap::new(),
            messages_delivered: 0,
            bytes_delivered: 0,
            trace: 0xcbf2_9ce4_8422_2325,
        }
    }

    /// Restarts node `index` as the daemon does: a new core with `config` (and seed
    /// `seed`) restored from the index of its saved records, the log and the policy,
    /// reading documents from its store. Storage requests in flight are lost.
    pub fn restart(&mut self, index: usize, config: Config, seed: u64) -> Vec<Effect> {
        let harness_node = &mut self.nodes[index];
        harness_node.pending_storage.clear();
        let mut node = Node::new(config, Identity::from_seed(index as u64 + 1), seed);
        node.use_document_store(Box::new(harness_node.documents.clone()));
        harness_node.node = node;
        let restore = Restore {
            index: harness_node
                .saved
                .values()
                .map(|saved| saved.clone().split().0)
                .collect(),
            log: harness_node.log.clone(),
            policy: harness_node.policy.clone(),
            ..Restore::default()
        };
        let effects = harness_node.node.handle(self.now, Input::Restore(restore));
        self.carry_out(index, effects.clone());
        effects
    }

    /// The id of node `index`.
    pub fn id(&self, index: usize) -> NodeId {
        self.nodes[index].node.node_id()
    }

    fn index_of(&self, id: NodeId) -> usize {
        self.nodes
            .iter()
            .position(|node| node.node.node_id() == id)
            .expect("effects name known nodes")
    }

    /// Feeds one input to a node and carries out its effects.
    pub fn input(&mut self, index: usize, input: Input) {
        let effects = self.nodes[index].node.handle(self.now, input);
        self.carry_out(index, effects);
    }

    fn carry_out(&mut self, index: usize, effects: Vec<Effect>) {
        for effect in effects {
            self.trace_effect(index, &effect);
            self.nodes[index].effects.push(effect.clone());
            match effect {
                Effect::Send { to, bytes } => {
                    let to = self.index_of(to);
                    if self.linked(index, to) {
                        self.in_flight.push_back((index, to, bytes));
                    }
                }
                Effect::Storage { op, request } => {
                    self.nodes[index].pending_storage.push_back((op, request));
                }
                Effect::Complete { id, result } => {
                    self.completions.insert(id, result);
                }
                Effect::Disconnect { peer, .. } => {
                    let peer = self.index_of(peer);
                    self.disconnect(index, peer);
                }
                Effect::Emit(event) => self.nodes[index].events.push(event),
            }
        }
    }

    fn trace_effect(&mut self, index: usize, effect: &Effect) {
        // FNV-1a over the debug text: cheap, and any difference in effects shows.
        for byte in format!("{index}:{effect:?}").bytes() {
            self.trace ^= u64::from(byte);
            self.trace = self.trace.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// A hash of every effect so far; equal across runs of the same scenario.
    pub fn trace_hash(&self) -> u64 {
        self.trace
    }

    fn linked(&self, a: usize, b: usize) -> bool {
        self.links.contains(&(a.min(b), a.max(b)))
    }

    /// Connects two nodes.
    pub fn connect(&mut self, a: usize, b: usize) {
        if !self.links.insert((a.min(b), a.max(b))) {
            return;
        }
        let (id_a, id_b) = (self.id(a), self.id(b));
        self.input(a, Input::PeerConnected { peer: id_b });
        self.input(b, Input::PeerConnected { peer: id_a });
        if !self.linked(a, b) {
            // `a` closed the connection at once (a refusal), before `b` had heard of it:
            // `b` sees it open and then close, as a transport would report.
            self.input(b, Input::PeerDisconnected { peer: id_a });
        }
    }

    /// Connects every pair.
    pub fn connect_all(&mut self) {
        for a in 0..self.nodes.len() {
            for b in a + 1..self.nodes.len() {
                self.connect(a, b);
            }
        }
    }

    /// Disconnects two nodes; messages in flight between them are lost.
    pub fn disconnect(&mut self, a: usize, b: usize) {
        if !self.links.remove(&(a.min(b), a.max(b))) {
            return;
        }
        self.in_flight
            .retain(|(from, to, _)| !((*from == a && *to == b) || (*from == b && *to == a)));
        let (id_a, id_b) = (self.id(a), self.id(b));
        self.input(a, Input::PeerDisconnected { peer: id_b });
        self.input(b, Input::PeerDisconnected { peer: id_a });
    }

    /// Disconnects every pair.
    pub fn disconnect_all(&mut self) {
        let links: Vec<(usize, usize)> = self.links.iter().copied().collect();
        for (a, b) in links {
            self.disconnect(a, b);
        }
    }

    /// Injects raw bytes as if `from` had sent them to `to` (they must be linked).
    pub fn inject(&mut self, from: usize, to: usize, bytes: Vec<u8>) {
        assert!(self.linked(from, to), "inject needs a link");
        self.in_flight.push_back((from, to, bytes));
    }

    /// Messages currently in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Takes every message in flight out of the network, for a test to reorder or repeat.
    pub fn take_in_flight(&mut self) -> Vec<(usize, usize, Vec<u8>)> {
        self.in_flight.drain(..).collect()
    }

    /// Delivers the `index`-th message in flight (modulo their number), out of order; with
    /// `duplicate` a copy stays in flight to be delivered again. Returns false if nothing
    /// was in flight. Storage completes afterwards as in [`Harness::step`].
    pub fn deliver_nth(&mut self, index: usize, duplicate: bool) -> bool {
        if self.in_flight.is_empty() {
            return false;
        }
        let index = index % self.in_flight.len();
        let (from, to, bytes) = match duplicate {
            true => self.in_flight[index].clone(),
            false => self.in_flight.remove(index).expect("index is in range"),
        };
        self.deliver(from, to, bytes);
        if self.storage_mode == StorageMode::Immediate {
            self.complete_all_storage();
        }
        true
    }

    /// Delivers one message now, if the two nodes are still linked.
    pub fn deliver(&mut self, from: usize, to: usize, bytes: Vec<u8>) {
        if !self.linked(from, to) {
            return;
        }
        self.messages_delivered += 1;
        self.bytes_delivered += bytes.len() as u64;
        let from_id = self.id(from);
        self.input(
            to,
            Input::MessageReceived {
                from: from_id,
                bytes,
            },
        );
    }

    /// One flight: delivers every message in flight now, then completes storage.
    /// Returns how many messages were delivered.
    pub fn step(&mut self) -> usize {
        let flight: Vec<_> = self.in_flight.drain(..).collect();
        let count = flight.len();
        for (from, to, bytes) in flight {
            self.deliver(from, to, bytes);
        }
        if self.storage_mode == StorageMode::Immediate {
            self.complete_all_storage();
        }
        count
    }

    /// Completes every pending storage request of every node, including the ones that
    /// completions cause.
    pub fn complete_all_storage(&mut self) {
        loop {
            let next =
                (0..self.nodes.len()).find(|index| !self.nodes[*index].pending_storage.is_empty());
            let Some(index) = next else { return };
            self.complete_storage(index, Ok(()));
        }
    }

    /// Completes the oldest pending storage request of `index` with `result`.
    pub fn complete_storage(&mut self, index: usize, result: Result<(), String>) {
        let (op, request) = self.nodes[index]
            .pending_storage
            .pop_front()
            .expect("a storage request is pending");
        if result.is_ok() {
            let node = &mut self.nodes[index];
            match request {
                StorageRequest::Append { envelopes } => node.log.extend(envelopes),
                StorageRequest::Checkpoint {
                    records, policy, ..
                } => {
                    if policy.is_some() {
                        node.policy = policy;
                    }
                    for record in records {
                        node.documents.set(&record.record, record.document.clone());
                        node.saved.insert(record.record.clone(), record);
                    }
                }
            }
        }
        let result = result.map_err(mesh_core::StorageError);
        self.input(index, Input::StorageDone { op, result });
    }

    /// Steps until no message is in flight and no storage is pending; returns the number
    /// of flights. Panics after `flights_max`, so a livelock fails instead of hanging.
    pub fn run_until_quiet(&mut self, flights_max: usize) -> usize {
        let mut flights = 0;
        if self.storage_mode == StorageMode::Immediate {
            self.complete_all_storage();
        }
        while !self.in_flight.is_empty() {
            assert!(
                flights < flights_max,
                "not quiet after {flights_max} flights"
            );
            self.step();
            flights += 1;
        }
        flights
    }

    /// Moves time forward by `duration`, ticking every node whose deadline passes, in
    /// order of deadline, and delivering messages as they go.
    pub fn advance(&mut self, duration: Duration) {
        let end = self.now + duration;
        for _ in 0..100_000 {
            let next = (0..self.nodes.len())
                .filter_map(|index| self.nodes[index].node.next_deadline().map(|at| (at, index)))
                .filter(|(at, _)| *at <= end)
                .min();
            let Some((at, index)) = next else { break };
            self.now = self.now.max(at);
            self.input(index, Input::Tick);
            self.run_until_quiet(10_000);
        }
        self.now = end;
    }

    /// Runs a command on a node and returns its result, completing storage as needed.
    pub fn command(&mut self, index: usize, command: Command) -> Result<Reply, CommandError> {
        self.next_command += 1;
        let id = CommandId(self.next_command);
        self.input(index, Input::Command { id, command });
        if self.storage_mode == StorageMode::Immediate {
            self.complete_all_storage();
        }
        self.completions
            .remove(&id)
            .expect("the command completed (storage is immediate)")
    }

    /// Sends a command without waiting; see [`Harness::completion`].
    pub fn command_async(&mut self, index: usize, command: Command) -> CommandId {
        self.next_command += 1;
        let id = CommandId(self.next_command);
        self.input(index, Input::Command { id, command });
        id
    }

    /// The result of a command, if it completed.
    pub fn completion(&mut self, id: CommandId) -> Option<Result<Reply, CommandError>> {
        self.completions.remove(&id)
    }

    /// Puts fields into a record on a node; panics if the write fails.
    pub fn put(&mut self, index: usize, record: &str, pairs: &[(&str, FieldValue)]) {
        let command = Command::Put {
            record: record.parse().expect("valid record"),
            fields: fields(pairs),
        };
        self.command(index, command).expect("the write succeeds");
    }

    /// Adds `amount` to a counter field of a record on a node; panics if the write fails.
    pub fn add(&mut self, index: usize, record: &str, field: &str, amount: i64) {
        let command = Command::Put {
            record: record.parse().expect("valid record"),
            fields: [(field.to_owned(), FieldEdit::Add(amount))].into(),
        };
        self.command(index, command)
            .expect("the increment succeeds");
    }

    /// Reads a record on a node.
    pub fn get(&mut self, index: usize, record: &str) -> Option<RecordView> {
        let command = Command::Get {
            record: record.parse().expect("valid record"),
        };
        match self.command(index, command) {
            Ok(Reply::Record(view)) => view,
            other => panic!("get failed: {other:?}"),
        }
    }

    /// A node's status.
    pub fn status(&mut self, index: usize) -> Status {
        match self.command(index, Command::Status) {
            Ok(Reply::Status(status)) => *status,
            other => panic!("status failed: {other:?}"),
        }
    }

    /// A node's digest.
    pub fn digest(&self, index: usize) -> mesh_core::Digest {
        self.nodes[index].node.digest()
    }

    /// Whether every node has the same digest.
    pub fn converged(&self) -> bool {
        (1..self.nodes.len()).all(|index| self.digest(index) == self.digest(0))
    }
}
