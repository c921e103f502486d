//! The deterministic multi-node simulator: many node cores in one thread, on virtual time,
//! with every random choice drawn from one seed.
//!
//! It drives the same `mesh-core` the daemon runs, through [`world::SimNode`], under the
//! faults of a [`plan::FaultPlan`] drawn from the seed (connection drops, latency and
//! bandwidth, partitions that form and heal including one-way ones, corrupted bytes, node
//! crashes with torn writes, pauses and clock skew), with a workload of creates, edits,
//! deletes, concurrent edits of one field, bursts and a node that stays away. After the
//! fault phase everything heals and every node must converge; [`checkers`] watch the
//! invariants throughout. The same seed replays the same run bit for bit, shown by the
//! trace hash.
//!
//! ```
//! let options = sim::Options::new(7, 3);
//! let outcome = sim::run(&options, &sim::real_node);
//! assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
//! assert_eq!(outcome.trace_hash, sim::run(&options, &sim::real_node).trace_hash);
//! ```

pub mod checkers;
mod disk;
mod faults;
mod network;
pub mod plan;
pub mod policy;
pub mod rng;
pub mod scenario;
mod trace;
mod workload;
pub mod world;

pub use plan::{FaultPlan, Knobs, Options};
pub use world::{NodeFactory, Outcome, SimNode, World, real_node};

/// Runs one seed with a node factory.
pub fn run(options: &Options, factory: &NodeFactory) -> Outcome {
    World::new(options.clone(), factory).run()
}

/// Formats the one-line summary of a run.
pub fn summary(outcome: &Outcome) -> String {
    let converge = match outcome.converge {
        Some(time) => format!("{} ms", time.as_millis()),
        None => "-".into(),
    };
    let digest = outcome
        .digest
        .map_or_else(|| "-".into(), |digest| digest.to_string()[..12].to_owned());
    let status = match &outcome.failure {
        None => "ok".to_owned(),
        Some(failure) => format!("FAILED {}", failure.checker),
    };
    format!(
        "seed {} nodes {} simulated {:.1} s events {} messages {} bytes {} writes {} converged {} digest {} trace {:016x} faults [{}] {}",
        outcome.seed,
        outcome.nodes,
        outcome.simulated.as_secs_f64(),
        outcome.events,
        outcome.messages,
        outcome.bytes,
        outcome.writes_acked,
        converge,
        digest,
        outcome.trace_hash,
        outcome.faults.join(","),
        status
    )
}
