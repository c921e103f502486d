//! The simulator finds real bugs: each test builds a deliberately broken node here, in the
//! test, by wrapping the real core, and shows that a sweep reports the failure while the
//! real core passes the same sweep.

use std::collections::BTreeSet;
use std::time::Duration;

use crdt_schema::{ChangeHash, FieldEdit, FieldValue, Identity, RecordId};
use mesh_core::{
    Command, CommandId, Config, Digest, Effect, Input, Instant, Node, Queues, Reply, StorageOpId,
    StorageRequest,
};
use sim::{Knobs, Options, Outcome, SimNode};

/// The checker-facing `SimNode` methods of a wrapper, answered by the wrapped core.
macro_rules! delegate_checks {
    ($core:tt) => {
        fn digest(&self) -> Digest {
            self.$core.digest()
        }
        fn holds_change(&self, record: &RecordId, hash: &ChangeHash) -> bool {
            self.$core.holds_change(record, hash)
        }
        fn queues(&self) -> Queues {
            self.$core.queues()
        }
        fn policy(&self) -> Option<crdt_schema::policy::Policy> {
            self.$core.policy().cloned()
        }
        fn record_changes(
            &mut self,
            record: &RecordId,
        ) -> Vec<(ChangeHash, crdt_schema::NodeId, Vec<ChangeHash>)> {
            self.$core.record_changes(record)
        }
        fn quarantined(&self) -> Vec<(String, ChangeHash)> {
            self.$core.quarantined()
        }
        fn accepted_record(
            &mut self,
            record: &RecordId,
        ) -> Option<(crdt_schema::RecordView, Vec<Vec<u8>>)> {
            self.$core.accepted_record(record)
        }
        fn use_document_store(&mut self, store: Box<dyn mesh_core::storage::DocumentStore>) {
            self.$core.use_document_store(store);
        }
    };
}

/// Sweeps seeds with a node factory; returns the outcomes.
fn sweep(
    seeds: std::ops::Range<u64>,
    seconds: u64,
    knobs: &Knobs,
    factory: &sim::NodeFactory,
) -> Vec<Outcome> {
    // The byzantine node's crafted changes make Automerge panic inside the nodes' door,
    // which catches them; keep them off the test output.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(crdt_schema::guard::quiet_guarded_panics);
    seeds
        .map(|seed| {
            let mut options = Options::new(seed, 3);
            options.duration = Duration::from_secs(seconds);
            options.knobs = knobs.clone();
            sim::run(&options, factory)
        })
        .collect()
}

/// Seeds per sweep: each broken variant must be caught in at least a tenth of them.
const SEEDS: u64 = 100;

/// Prints how many seeds caught a variant and asserts it is at least a tenth.
fn assert_caught_often(variant: &str, caught: usize) {
    eprintln!("{variant}: caught in {caught} of {SEEDS} seeds");
    assert!(
        caught as u64 * 10 >= SEEDS,
        "{variant}: caught in only {caught} of {SEEDS} seeds"
    );
}

fn failures<'a>(outcomes: &'a [Outcome], checker: &str) -> Vec<&'a Outcome> {
    outcomes
        .iter()
        .filter(|outcome| {
            outcome
                .failure
                .as_ref()
                .is_some_and(|failure| failure.checker == checker)
        })
        .collect()
}

/// Acknowledges writes before their log append is durable: it tells the core the append
/// is done the moment it is asked for, and swallows the real completion later.
struct AcksBeforeDurable {
    node: Node,
    early: BTreeSet<StorageOpId>,
}

impl SimNode for AcksBeforeDurable {
    fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        if let Input::StorageDone { op, .. } = &input
            && self.early.remove(op)
        {
            return Vec::new();
        }
        let mut effects = self.node.handle(now, input);
        let mut index = 0;
        while index < effects.len() {
            if let Effect::Storage {
                op,
                request: StorageRequest::Append { .. },
            } = &effects[index]
            {
                let op = *op;
                self.early.insert(op);
                let more = self
                    .node
                    .handle(now, Input::StorageDone { op, result: Ok(()) });
                effects.extend(more);
            }
            index += 1;
        }
        effects
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.node.next_deadline()
    }
    delegate_checks!(node);
}

/// Never restarts a stalled session: while a session runs, it ignores the passing of time
/// (and asks for no timer), so a session whose messages were lost waits for ever.
struct KeepsStalledSessions(Node);

impl KeepsStalledSessions {
    fn in_session(&self) -> bool {
        self.0.queues().oldest_session_progress.is_some()
    }
}

impl SimNode for KeepsStalledSessions {
    fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        match input {
            Input::Tick if self.in_session() => Vec::new(),
            input => self.0.handle(now, input),
        }
    }
    fn next_deadline(&self) -> Option<Instant> {
        if self.in_session() {
            None
        } else {
            self.0.next_deadline()
        }
    }
    delegate_checks!(0);
}

/// Treats a counter like any other field, the last writer winning: asked to add N, it reads
/// the counter, removes it and sets a new counter at the sum, so an increment made
/// concurrently elsewhere is lost when the two meet. Its own follow-up commands use ids
/// from the top of the range, and their completions are kept from the world.
struct OverwritesCounters {
    node: Node,
    internal: BTreeSet<CommandId>,
    next_internal: u64,
}

impl OverwritesCounters {
    fn internal_command(&mut self, now: Instant, command: Command) -> Vec<Effect> {
        self.next_internal -= 1;
        let id = CommandId(self.next_internal);
        self.internal.insert(id);
        self.node.handle(now, Input::Command { id, command })
    }
}

impl SimNode for OverwritesCounters {
    fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        let mut effects = Vec::new();
        let input = match input {
            Input::Command {
                id,
                command: Command::Put { record, mut fields },
            } => {
                for (name, edit) in fields.iter_mut() {
                    let FieldEdit::Add(amount) = *edit else {
                        continue;
                    };
                    let get = Command::Get {
                        record: record.clone(),
                    };
                    let read = self.internal_command(now, get);
                    let current = read.iter().find_map(|effect| match effect {
                        Effect::Complete {
                            result: Ok(Reply::Record(Some(view))),
                            ..
                        } => match view.fields.get(name) {
                            Some(FieldValue::Counter(count)) => Some(*count),
                            _ => None,
                        },
                        _ => None,
                    });
                    effects.extend(read);
                    let Some(current) = current else { continue };
                    let remove = Command::Put {
                        record: record.clone(),
                        fields: [(name.clone(), FieldEdit::Remove)].into(),
                    };
                    effects.extend(self.internal_command(now, remove));
                    *edit = FieldEdit::Set(FieldValue::Counter(current + amount));
                }
                Input::Command {
                    id,
                    command: Command::Put { record, fields },
                }
            }
            input => input,
        };
        effects.extend(self.node.handle(now, input));
        effects.retain(
            |effect| !matches!(effect, Effect::Complete { id, .. } if self.internal.contains(id)),
        );
        effects
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.node.next_deadline()
    }
    delegate_checks!(node);
}

fn overwrites_counters(config: Config, identity: Identity, seed: u64) -> Box<dyn SimNode> {
    Box::new(OverwritesCounters {
        node: Node::new(config, identity, seed),
        internal: BTreeSet::new(),
        next_internal: u64::MAX,
    })
}

#[test]
fn a_node_that_lets_the_last_writer_win_on_a_counter_is_caught() {
    // Partitions make nodes count the same stock while cut off from each other.
    let knobs = Knobs {
        partitions: Some(true),
        write_rate: Some(10.0),
        ..Knobs::default()
    };
    let broken = sweep(0..SEEDS, 10, &knobs, &overwrites_counters);
    let caught = failures(&broken, "counter-mismatch");
    assert_caught_often("a counter whose last writer wins", caught.len());
    let real = sweep(0..SEEDS, 10, &knobs, &sim::real_node);
    assert!(
        real.iter().all(|outcome| outcome.failure.is_none()),
        "the real core fails: {:?}",
        real.iter().find_map(|o| o.failure.clone())
    );
}

fn acks_before_durable(config: Config, identity: Identity, seed: u64) -> Box<dyn SimNode> {
    Box::new(AcksBeforeDurable {
        node: Node::new(config, identity, seed),
        early: BTreeSet::new(),
    })
}

fn keeps_stalled_sessions(config: Config, identity: Identity, seed: u64) -> Box<dyn SimNode> {
    Box::new(KeepsStalledSessions(Node::new(config, identity, seed)))
}

#[test]
fn a_node_that_acknowledges_before_its_append_is_durable_is_caught() {
    // Frequent writes, slow disks, crashes and a node that is often cut off: an
    // acknowledged write that never reached the disk or a peer is lost in a crash.
    let knobs = Knobs {
        crashes: Some(true),
        offline_node: Some(true),
        write_rate: Some(10.0),
        disk_latency_ms: Some((20, 40)),
        ..Knobs::default()
    };
    let broken = sweep(0..SEEDS, 10, &knobs, &acks_before_durable);
    let caught = failures(&broken, "acked-write-lost");
    assert_caught_often("acknowledging before the append is durable", caught.len());
    let real = sweep(0..SEEDS, 10, &knobs, &sim::real_node);
    assert!(
        real.iter().all(|outcome| outcome.failure.is_none()),
        "the real core fails: {:?}",
        real.iter().find_map(|o| o.failure.clone())
    );
}

#[test]
fn a_node_that_never_restarts_a_stalled_sync_is_caught() {
    // One-way partitions swallow session messages; only the stall timeout recovers.
    let knobs = Knobs {
        partitions: Some(true),
        write_rate: Some(5.0),
        ..Knobs::default()
    };
    let broken = sweep(0..SEEDS, 30, &knobs, &keeps_stalled_sessions);
    assert_caught_often(
        "never restarting a stalled sync",
        failures(&broken, "stalled-session").len(),
    );
    let real = sweep(0..SEEDS, 30, &knobs, &sim::real_node);
    assert!(
        real.iter().all(|outcome| outcome.failure.is_none()),
        "the real core fails: {:?}",
        real.iter().find_map(|o| o.failure.clone())
    );
}

/// Stores changes whose signature was damaged on the way to its log.
struct StoresBadSignatures(Node);

impl SimNode for StoresBadSignatures {
    fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        let mut effects = self.0.handle(now, input);
        for effect in &mut effects {
            if let Effect::Storage {
                request: StorageRequest::Append { envelopes },
                ..
            } = effect
                && let Some(envelope) = envelopes.last_mut()
            {
                let last = envelope.len() - 1;
                envelope[last] ^= 0x01;
            }
        }
        effects
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.0.next_deadline()
    }
    delegate_checks!(0);
}

#[test]
fn a_node_that_stores_a_change_with_a_bad_signature_is_caught() {
    let stores_bad = |config: Config, identity: Identity, seed: u64| -> Box<dyn SimNode> {
        Box::new(StoresBadSignatures(Node::new(config, identity, seed)))
    };
    let broken = sweep(0..3, 5, &Knobs::default(), &stores_bad);
    assert!(
        broken.iter().all(|outcome| outcome
            .failure
            .as_ref()
            .is_some_and(|f| f.checker == "bad-signature-persisted")),
        "{:?}",
        broken.iter().map(|o| &o.failure).collect::<Vec<_>>()
    );
}

#[test]
fn the_same_seed_replays_bit_for_bit() {
    let options = Options::new(11, 5);
    let first = sim::run(&options, &sim::real_node);
    let second = sim::run(&options, &sim::real_node);
    assert!(first.failure.is_none(), "{:?}", first.failure);
    assert_eq!(first.trace_hash, second.trace_hash);
    assert_eq!(first.events, second.events);
    let other = sim::run(&Options::new(12, 5), &sim::real_node);
    assert_ne!(
        first.trace_hash, other.trace_hash,
        "different seeds give different runs"
    );
}

/// A node whose verdict accepts everything: it drops the policy it starts with and every
/// policy it is given or sent, so it never rejects a change.
struct IgnoresPolicy(Node);

impl SimNode for IgnoresPolicy {
    fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        match input {
            Input::Restore(mut restore) => {
                restore.policy = None;
                self.0.handle(now, Input::Restore(restore))
            }
            Input::Command {
                command: mesh_core::Command::ApplyPolicy { .. },
                ..
            } => Vec::new(),
            Input::MessageReceived { bytes, .. }
                if matches!(
                    mesh_core::wire::Message::decode(&bytes),
                    Ok(mesh_core::wire::Message::Policy { .. })
                ) =>
            {
                Vec::new()
            }
            input => self.0.handle(now, input),
        }
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.0.next_deadline()
    }
    delegate_checks!(0);
}

fn ignores_policy(config: Config, identity: Identity, seed: u64) -> Box<dyn SimNode> {
    Box::new(IgnoresPolicy(Node::new(config, identity, seed)))
}

#[test]
fn a_verdict_that_accepts_everything_is_caught() {
    // The byzantine node writes reference data it may not write; a node that applies it
    // shows a value no master wrote.
    let knobs = Knobs {
        policy: Some(true),
        ..Knobs::default()
    };
    let broken = sweep(0..SEEDS, 10, &knobs, &ignores_policy);
    let caught = failures(&broken, "reference-written-by-non-master");
    assert_caught_often("a verdict that accepts everything", caught.len());
    let real = sweep(0..SEEDS, 10, &knobs, &sim::real_node);
    assert!(
        real.iter().all(|outcome| outcome.failure.is_none()),
        "the real core fails: {:?}",
        real.iter().map(|o| &o.failure).collect::<Vec<_>>()
    );
}

/// Accepts every signature: it tells the shared cache of verified envelopes that every
/// envelope it receives was checked, so its core never checks one.
struct AcceptsEverySignature {
    node: Node,
    cache: crdt_schema::VerifiedCache,
    org: crdt_schema::OrgId,
}

impl SimNode for AcceptsEverySignature {
    fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        if let Input::MessageReceived { bytes, .. } = &input
            && let Ok(
                mesh_core::wire::Message::Push { changes }
                | mesh_core::wire::Message::SyncChanges { changes, .. },
            ) = mesh_core::wire::Message::decode(bytes)
        {
            for envelope in &changes {
                self.cache.trust_unchecked(&self.org, &envelope.0);
            }
        }
        self.node.handle(now, input)
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.node.next_deadline()
    }
    delegate_checks!(node);
}

fn accepts_every_signature(config: Config, identity: Identity, seed: u64) -> Box<dyn SimNode> {
    let cache = config
        .verified_cache
        .clone()
        .expect("the simulator shares a cache of verified envelopes");
    let org = config.org;
    Box::new(AcceptsEverySignature {
        node: Node::new(config, identity, seed),
        cache,
        org,
    })
}

#[test]
fn a_verifier_that_accepts_every_signature_is_caught() {
    // Without a policy, bad signatures come from bytes corrupted on the way; with one, the
    // byzantine node also forges them. The checker verifies with its own code and another
    // ed25519 crate, so a broken verifier in the nodes cannot fool it.
    for policy in [false, true] {
        let knobs = Knobs {
            policy: Some(policy),
            corrupt_rate: Some(0.01),
            ..Knobs::default()
        };
        let broken = sweep(0..SEEDS, 10, &knobs, &accepts_every_signature);
        let caught = failures(&broken, "bad-signature-persisted").len();
        eprintln!(
            "policy {policy}: a verifier that accepts everything is caught in {caught} of {SEEDS} seeds"
        );
        assert!(
            caught >= SEEDS as usize / 10,
            "policy {policy}: caught in {caught} of {SEEDS} seeds: {:?}",
            broken.iter().map(|o| &o.failure).collect::<Vec<_>>()
        );
        let real = sweep(0..SEEDS, 10, &knobs, &sim::real_node);
        assert!(
            real.iter().all(|outcome| outcome.failure.is_none()),
            "policy {policy}: the real core fails: {:?}",
            real.iter().find_map(|o| o.failure.clone())
        );
    }
}
