//! What a run looks like: the options a user gives and the fault mix a seed draws.
//!
//! Swarm testing: each seed enables a random subset of fault classes with random rates, so
//! some seeds are calm and some hostile, and a sweep covers combinations no fixed mix
//! would. Every knob can be forced from the command line to reproduce or explore.

use std::time::Duration;

use crate::rng::SimRng;

/// Options of one run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The seed: everything random in the run derives from it.
    pub seed: u64,
    /// Number of nodes.
    pub nodes: usize,
    /// Length of the fault phase, in simulated time.
    pub duration: Duration,
    /// How long the healing phase may take before the run fails.
    pub heal_bound: Duration,
    /// Overrides of the seed's draw.
    pub knobs: Knobs,
    /// Record a readable trace of the run.
    pub verbose: bool,
}

/// Forced values for the fault mix; `None` leaves the seed's draw.
#[derive(Debug, Clone, Default)]
pub struct Knobs {
    /// Per-message probability that the connection drops.
    pub drop_rate: Option<f64>,
    /// Per-message probability that a byte is corrupted.
    pub corrupt_rate: Option<f64>,
    /// Whether partitions form and heal.
    pub partitions: Option<bool>,
    /// Whether nodes crash and restart.
    pub crashes: Option<bool>,
    /// Whether nodes pause.
    pub pauses: Option<bool>,
    /// Whether node clocks are skewed.
    pub clock_skew: Option<bool>,
    /// Link bandwidth in bytes per second (0 for unlimited).
    pub bandwidth: Option<u64>,
    /// Whether one node stays offline for most of the fault phase, writing.
    pub offline_node: Option<bool>,
    /// Writes per second per node.
    pub write_rate: Option<f64>,
    /// Fixed latency range in milliseconds, `(min, max)`.
    pub latency_ms: Option<(u64, u64)>,
    /// Fixed fsync latency range of the disks in milliseconds, `(min, max)`.
    pub disk_latency_ms: Option<(u64, u64)>,
    /// The nodes' anti-entropy interval, in seconds.
    pub sync_interval_s: Option<u64>,
    /// Run the policy workload with a byzantine node (needs at least three nodes).
    pub policy: Option<bool>,
    /// The nodes' document cache in KiB: small caches make nodes read documents back from
    /// their disks all the time.
    pub document_cache_kib: Option<u64>,
}

/// The fault mix of one run, drawn from the seed and the knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    /// Minimum one-way latency, ms.
    pub latency_min_ms: u64,
    /// Maximum one-way latency, ms.
    pub latency_max_ms: u64,
    /// Per-message probability that the connection drops.
    pub drop_rate: f64,
    /// Per-message probability that one byte is flipped.
    pub corrupt_rate: f64,
    /// Bytes per second per link direction; 0 is unlimited.
    pub bandwidth: u64,
    /// Mean time between partitions, if they happen.
    pub partition_every: Option<Duration>,
    /// Mean time between crashes, if they happen.
    pub crash_every: Option<Duration>,
    /// Mean time between pauses, if they happen.
    pub pause_every: Option<Duration>,
    /// Largest clock skew of a node, ms (0: none).
    pub clock_skew_max_ms: u64,
    /// Whether node 0 is offline for most of the fault phase.
    pub offline_node: bool,
    /// Writes per second per node.
    pub write_rate: f64,
    /// Minimum time for a disk to make a request durable, ms.
    pub disk_latency_min_ms: u64,
    /// Maximum time for a disk to make a request durable, ms.
    pub disk_latency_max_ms: u64,
    /// Records per collection that writes choose from.
    pub records_per_collection: u32,
    /// The nodes' anti-entropy interval: short intervals keep sessions running during
    /// faults, so stalls and aborts are exercised.
    pub sync_interval: Duration,
    /// The nodes' session stall timeout.
    pub sync_stall_timeout: Duration,
    /// The size of the nodes' document cache (not drawn: the default unless forced).
    pub document_cache_bytes: usize,
}

impl Options {
    /// Default options for a seed.
    pub fn new(seed: u64, nodes: usize) -> Options {
        Options {
            seed,
            nodes,
            duration: Duration::from_secs(20),
            heal_bound: Duration::from_secs(60),
            knobs: Knobs::default(),
            verbose: false,
        }
    }

    /// The command that reproduces this run.
    pub fn command(&self) -> String {
        let mut command = format!(
            "cargo run --release -p sim -- --seed {} --nodes {} --duration {}",
            self.seed,
            self.nodes,
            self.duration.as_secs()
        );
        let knobs = &self.knobs;
        let mut flag = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                command.push_str(&format!(" --{name} {value}"));
            }
        };
        flag("drop-rate", knobs.drop_rate.map(|v| v.to_string()));
        flag("corrupt-rate", knobs.corrupt_rate.map(|v| v.to_string()));
        flag("partitions", knobs.partitions.map(|v| v.to_string()));
        flag("crashes", knobs.crashes.map(|v| v.to_string()));
        flag("pauses", knobs.pauses.map(|v| v.to_string()));
        flag("clock-skew", knobs.clock_skew.map(|v| v.to_string()));
        flag("bandwidth", knobs.bandwidth.map(|v| v.to_string()));
        flag("offline-node", knobs.offline_node.map(|v| v.to_string()));
        flag("policy", knobs.policy.map(|v| v.to_string()));
        flag("write-rate", knobs.write_rate.map(|v| v.to_string()));
        flag(
            "latency",
            knobs.latency_ms.map(|(min, max)| format!("{min}..{max}")),
        );
        flag(
            "disk-latency",
            knobs
                .disk_latency_ms
                .map(|(min, max)| format!("{min}..{max}")),
        );
        flag(
            "sync-interval",
            knobs.sync_interval_s.map(|v| v.to_string()),
        );
        flag(
            "document-cache-kib",
            knobs.document_cache_kib.map(|v| v.to_string()),
        );
        command
    }
}

impl FaultPlan {
    /// Draws the fault mix for a seed, then applies the knobs.
    pub fn draw(rng: &mut SimRng, knobs: &Knobs) -> FaultPlan {
        let latency_min_ms = rng.range(1, 40);
        let latency_max_ms = latency_min_ms + rng.range(0, 60);
        let mut plan = FaultPlan {
            latency_min_ms,
            latency_max_ms,
            drop_rate: if rng.chance(0.5) {
                rng.range_f64(0.0005, 0.01)
            } else {
                0.0
            },
            corrupt_rate: if rng.chance(0.3) {
                rng.range_f64(0.0001, 0.003)
            } else {
                0.0
            },
            bandwidth: if rng.chance(0.3) {
                rng.range(20_000, 2_000_000)
            } else {
                0
            },
            partition_every: rng
                .chance(0.5)
                .then(|| Duration::from_millis(rng.range(3_000, 15_000))),
            crash_every: rng
                .chance(0.5)
                .then(|| Duration::from_millis(rng.range(4_000, 20_000))),
            pause_every: rng
                .chance(0.3)
                .then(|| Duration::from_millis(rng.range(4_000, 20_000))),
            clock_skew_max_ms: if rng.chance(0.4) {
                rng.range(1, 10_000)
            } else {
                0
            },
            offline_node: rng.chance(0.2),
            write_rate: rng.range_f64(0.2, 3.0),
            disk_latency_min_ms: 1,
            disk_latency_max_ms: if rng.chance(0.5) { 8 } else { 40 },
            records_per_collection: rng.range(5, 200) as u32,
            sync_interval: Duration::from_millis(rng.range(1_000, 10_000)),
            sync_stall_timeout: Duration::from_millis(rng.range(2_000, 8_000)),
            document_cache_bytes: mesh_core::limits::DOCUMENT_CACHE_BYTES,
        };
        if let Some(kib) = knobs.document_cache_kib {
            plan.document_cache_bytes = (kib as usize).max(1) * 1024;
        }
        if let Some((min, max)) = knobs.latency_ms {
            plan.latency_min_ms = min;
            plan.latency_max_ms = max.max(min);
        }
        if let Some(seconds) = knobs.sync_interval_s {
            plan.sync_interval = Duration::from_secs(seconds);
        }
        if let Some((min, max)) = knobs.disk_latency_ms {
            plan.disk_latency_min_ms = min;
            plan.disk_latency_max_ms = max.max(min);
        }
        if let Some(rate) = knobs.drop_rate {
            plan.drop_rate = rate;
        }
        if let Some(rate) = knobs.corrupt_rate {
            plan.corrupt_rate = rate;
        }
        if let Some(bandwidth) = knobs.bandwidth {
            plan.bandwidth = bandwidth;
        }
        let every = |on: bool, current: Option<Duration>, default_ms: u64| match (on, current) {
            (false, _) => None,
            (true, Some(current)) => Some(current),
            (true, None) => Some(Duration::from_millis(default_ms)),
        };
        if let Some(on) = knobs.partitions {
            plan.partition_every = every(on, plan.partition_every, 8_000);
        }
        if let Some(on) = knobs.crashes {
            plan.crash_every = every(on, plan.crash_every, 10_000);
        }
        if let Some(on) = knobs.pauses {
            plan.pause_every = every(on, plan.pause_every, 10_000);
        }
        if let Some(on) = knobs.clock_skew {
            plan.clock_skew_max_ms = if on {
                plan.clock_skew_max_ms.max(5_000)
            } else {
                0
            };
        }
        if let Some(on) = knobs.offline_node {
            plan.offline_node = on;
        }
        if let Some(rate) = knobs.write_rate {
            plan.write_rate = rate;
        }
        plan
    }

    /// A plan with no faults: fixed small latency, for scripted scenarios.
    pub fn calm() -> FaultPlan {
        FaultPlan {
            latency_min_ms: 5,
            latency_max_ms: 5,
            drop_rate: 0.0,
            corrupt_rate: 0.0,
            bandwidth: 0,
            partition_every: None,
            crash_every: None,
            pause_every: None,
            clock_skew_max_ms: 0,
            offline_node: false,
            write_rate: 0.0,
            disk_latency_min_ms: 1,
            disk_latency_max_ms: 1,
            records_per_collection: 10,
            sync_interval: Duration::from_secs(30),
            sync_stall_timeout: Duration::from_secs(10),
            document_cache_bytes: mesh_core::limits::DOCUMENT_CACHE_BYTES,
        }
    }

    /// The fault classes this plan enables, for the summary line.
    pub fn classes(&self) -> Vec<&'static str> {
        let mut classes = Vec::new();
        let mut add = |on: bool, name| {
            if on {
                classes.push(name);
            }
        };
        add(self.drop_rate > 0.0, "drops");
        add(self.corrupt_rate > 0.0, "corruption");
        add(self.bandwidth > 0, "bandwidth");
        add(self.partition_every.is_some(), "partitions");
        add(self.crash_every.is_some(), "crashes");
        add(self.pause_every.is_some(), "pauses");
        add(self.clock_skew_max_ms > 0, "skew");
        add(self.offline_node, "offline");
        classes
    }
}
