//! `sim`: run one seed, or sweep many, and report.
//!
//! ```text
//! sim --seed 1 --nodes 10                 one run, one summary line
//! sim --seeds 1..500 --nodes 3..7         a sweep; node count drawn per seed from the range
//! sim --seed 42 --verbose                 print the trace of one run
//! sim --seeds 1..100 --check-determinism  run every seed twice and compare trace hashes
//! ```
//!
//! Fault knobs override the seed's draw: `--drop-rate F`, `--corrupt-rate F`,
//! `--partitions BOOL`, `--crashes BOOL`, `--pauses BOOL`, `--clock-skew BOOL`,
//! `--bandwidth BYTES_PER_S`, `--offline-node BOOL`, `--policy BOOL` (the policy workload with
//! a byzantine node, see `policy.rs`), `--write-rate PER_S`, `--latency MIN..MAX`
//! and `--disk-latency MIN..MAX` (ms), `--sync-interval S`, `--document-cache-kib N` (the
//! nodes' document cache; small ones make nodes read documents back from disk). `--duration S` sets the fault phase, `--heal-bound S` the time allowed to converge,
//! `--jobs N` how many seeds run at once. Exit code 0 if every seed passed, 1 otherwise,
//! 2 for bad arguments.

use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use sim::{Knobs, Options, Outcome};

struct Args {
    seeds: std::ops::Range<u64>,
    nodes: (usize, usize),
    duration: Option<u64>,
    heal_bound: Option<u64>,
    knobs: Knobs,
    verbose: bool,
    check_determinism: bool,
    jobs: usize,
}

fn main() -> ExitCode {
    // The byzantine node's crafted changes make Automerge panic inside the nodes' door,
    // which catches them; only other panics are printed.
    crdt_schema::guard::quiet_guarded_panics();
    let args = match parse(std::env::args().skip(1).collect()) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("error: {message}");
            eprintln!(
                "usage: sim (--seed N | --seeds A..B) [--nodes N | --nodes A..B] [--duration S] [--check-determinism] [--verbose] [fault knobs]"
            );
            return ExitCode::from(2);
        }
    };
    let wall = wall_clock();
    let seeds: Vec<u64> = args.seeds.clone().collect();
    let (sender, receiver) = mpsc::channel::<(usize, SeedResult, Options)>();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut passed = 0;
    let mut failed = 0;
    let mut simulated = Duration::ZERO;
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.max(1) {
            let sender = sender.clone();
            let (seeds, args, next) = (&seeds, &args, &next);
            scope.spawn(move || {
                loop {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&seed) = seeds.get(index) else { break };
                    let options = options_for(args, seed);
                    let result = run_seed(&options, args.check_determinism);
                    if sender.send((index, result, options)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(sender);
        // Print in seed order as results arrive.
        let mut waiting = std::collections::BTreeMap::new();
        let mut printed = 0;
        for (index, result, options) in receiver {
            waiting.insert(index, (result, options));
            while let Some((result, options)) = waiting.remove(&printed) {
                printed += 1;
                simulated += result.outcome.simulated;
                print_outcome(&result.outcome, &options);
                match result.failure {
                    None => passed += 1,
                    Some(why) => {
                        failed += 1;
                        println!("  FAILED seed {}: {why}", options.seed);
                        println!("  reproduce: {}", options.command());
                    }
                }
            }
        }
    });
    let elapsed = wall.elapsed();
    if seeds.len() > 1 {
        println!(
            "{} seeds in {:.1} s ({:.1} seeds/s, {:.0}x real time)",
            seeds.len(),
            elapsed.as_secs_f64(),
            seeds.len() as f64 / elapsed.as_secs_f64(),
            simulated.as_secs_f64() / elapsed.as_secs_f64()
        );
    } else {
        println!(
            "{:.1} s simulated in {:.2} s: {:.0}x real time",
            simulated.as_secs_f64(),
            elapsed.as_secs_f64(),
            simulated.as_secs_f64() / elapsed.as_secs_f64()
        );
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The simulator's own speed is the one thing it measures in wall-clock time; the value
/// never reaches a node.
#[allow(clippy::disallowed_methods)]
fn wall_clock() -> std::time::Instant {
    std::time::Instant::now()
}

fn print_outcome(outcome: &Outcome, options: &Options) {
    if options.verbose {
        for line in &outcome.trace {
            println!("{line}");
        }
    }
    println!("{}", sim::summary(outcome));
}

/// One seed's outcome and, if it failed, why.
struct SeedResult {
    outcome: Outcome,
    failure: Option<String>,
}

fn run_seed(options: &Options, check_determinism: bool) -> SeedResult {
    let outcome = sim::run(options, &sim::real_node);
    if let Some(failure) = &outcome.failure {
        let why = format!(
            "{} at {} ms: {}",
            failure.checker, failure.at_ms, failure.message
        );
        return SeedResult {
            outcome,
            failure: Some(why),
        };
    }
    if check_determinism {
        let again = sim::run(options, &sim::real_node);
        if again.trace_hash != outcome.trace_hash {
            let why = format!(
                "determinism: the same seed gave trace {:016x} then {:016x}",
                outcome.trace_hash, again.trace_hash
            );
            return SeedResult {
                outcome,
                failure: Some(why),
            };
        }
    }
    SeedResult {
        outcome,
        failure: None,
    }
}

fn options_for(args: &Args, seed: u64) -> Options {
    let (low, high) = args.nodes;
    let nodes = low + (seed as usize % (high - low + 1));
    let mut options = Options::new(seed, nodes);
    if let Some(duration) = args.duration {
        options.duration = Duration::from_secs(duration);
    }
    if let Some(bound) = args.heal_bound {
        options.heal_bound = Duration::from_secs(bound);
    }
    options.knobs = args.knobs.clone();
    options.verbose = args.verbose;
    options
}

fn parse(raw: Vec<String>) -> Result<Args, String> {
    let mut args = Args {
        seeds: 1..2,
        nodes: (3, 3),
        duration: None,
        heal_bound: None,
        knobs: Knobs::default(),
        verbose: false,
        check_determinism: false,
        jobs: 1,
    };
    let mut seeds_given = false;
    let mut jobs_given = false;
    let mut iter = raw.into_iter();
    while let Some(flag) = iter.next() {
        let mut value = || iter.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seed" => {
                let seed = number(&value()?)?;
                args.seeds = seed..seed + 1;
                seeds_given = true;
            }
            "--seeds" => {
                let (low, high) = range(&value()?)?;
                if high <= low {
                    return Err("--seeds A..B needs A < B".into());
                }
                args.seeds = low..high;
                seeds_given = true;
            }
            "--nodes" => {
                let text = value()?;
                let (low, high) = match text.split_once("..") {
                    Some(_) => {
                        let (low, high) = range(&text)?;
                        (low as usize, high as usize)
                    }
                    None => {
                        let nodes = number(&text)? as usize;
                        (nodes, nodes)
                    }
                };
                if low == 0 || high < low {
                    return Err("--nodes needs a positive count or range A..B with A <= B".into());
                }
                args.nodes = (low, high);
            }
            "--duration" => args.duration = Some(number(&value()?)?),
            "--heal-bound" => args.heal_bound = Some(number(&value()?)?),
            "--jobs" => {
                args.jobs = number(&value()?)? as usize;
                jobs_given = true;
            }
            "--verbose" => args.verbose = true,
            "--check-determinism" => args.check_determinism = true,
            "--drop-rate" => args.knobs.drop_rate = Some(float(&value()?)?),
            "--corrupt-rate" => args.knobs.corrupt_rate = Some(float(&value()?)?),
            "--partitions" => args.knobs.partitions = Some(boolean(&value()?)?),
            "--crashes" => args.knobs.crashes = Some(boolean(&value()?)?),
            "--pauses" => args.knobs.pauses = Some(boolean(&value()?)?),
            "--clock-skew" => args.knobs.clock_skew = Some(boolean(&value()?)?),
            "--bandwidth" => args.knobs.bandwidth = Some(number(&value()?)?),
            "--offline-node" => args.knobs.offline_node = Some(boolean(&value()?)?),
            "--policy" => args.knobs.policy = Some(boolean(&value()?)?),
            "--write-rate" => args.knobs.write_rate = Some(float(&value()?)?),
            "--latency" => args.knobs.latency_ms = Some(range(&value()?)?),
            "--disk-latency" => args.knobs.disk_latency_ms = Some(range(&value()?)?),
            "--sync-interval" => args.knobs.sync_interval_s = Some(number(&value()?)?),
            "--document-cache-kib" => args.knobs.document_cache_kib = Some(number(&value()?)?),
            "--help" | "-h" => return Err("help requested".into()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if !seeds_given {
        return Err("give --seed N or --seeds A..B".into());
    }
    if !jobs_given {
        args.jobs = std::thread::available_parallelism().map_or(1, usize::from);
    }
    Ok(args)
}

fn number(text: &str) -> Result<u64, String> {
    text.parse()
        .map_err(|_| format!("`{text}` is not a whole number"))
}

fn float(text: &str) -> Result<f64, String> {
    text.parse()
        .map_err(|_| format!("`{text}` is not a number"))
}

fn boolean(text: &str) -> Result<bool, String> {
    match text {
        "true" | "on" | "yes" => Ok(true),
        "false" | "off" | "no" => Ok(false),
        _ => Err(format!("`{text}` is not true or false")),
    }
}

fn range(text: &str) -> Result<(u64, u64), String> {
    let (low, high) = text
        .split_once("..")
        .ok_or_else(|| format!("`{text}` is not a range A..B"))?;
    Ok((number(low)?, number(high)?))
}
