//! The scale benchmark (issue 12): real daemons on loopback, a head office with many
//! records and a laptop that clones them and later catches up. Prints its figures.
//!
//! `cargo bench -p mesh-daemon --bench scale` builds 100,000 records; `-- --records N` sets
//! another count (`-- --records 1000000` for the million). Measured in one run:
//! - bulk load through the API, 16 writers, records of 5 fields;
//! - the head office's memory (resident set) after the load;
//! - cold start: process start until status answers, and the memory then;
//! - clone: a fresh laptop dials the head office, until their digests are equal: records/s
//!   and the bytes the laptop received;
//! - catch-up: the laptop stops, the head office edits one field of every record, the
//!   laptop starts again: time until equal digests, bytes received per edit, and the rounds
//!   of the reconciliation sessions that brought them;
//! - the reference, in the same run: plain Automerge saving and loading the same number of
//!   documents of the same fields eagerly (time and memory).

#![allow(clippy::disallowed_methods, missing_docs)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

const WRITERS: usize = 16;
/// How long any one phase may take before the run is called stuck.
const PHASE_DEADLINE: Duration = Duration::from_secs(1800);

struct Api {
    base: String,
    token: String,
}

fn api(dir: &Path) -> Api {
    let addr = std::fs::read_to_string(dir.join("api.addr")).expect("the daemon wrote its API");
    let token = std::fs::read_to_string(dir.join("api.token")).unwrap();
    Api {
        base: format!("http://{}", addr.trim()),
        token: token.trim().to_owned(),
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn status(agent: &ureq::Agent, api: &Api) -> Option<serde_json::Value> {
    let mut response = agent
        .get(format!("{}/v1/status", api.base))
        .header("Authorization", format!("Bearer {}", api.token))
        .call()
        .ok()?;
    (response.status() == 200)
        .then(|| response.body_mut().read_json().ok())
        .flatten()
}

fn history(agent: &ureq::Agent, api: &Api) -> serde_json::Value {
    agent
        .get(format!("{}/v1/history", api.base))
        .header("Authorization", format!("Bearer {}", api.token))
        .call()
        .expect("history")
        .body_mut()
        .read_json()
        .expect("history is JSON")
}

/// Starts `mesh node run` for `dir` (dialling `peer`), returns it once its API answers,
/// with the time that took.
fn start(dir: &Path, peer: Option<&str>) -> (common::Daemon, Duration) {
    let _ = std::fs::remove_file(dir.join("api.addr"));
    let started = Instant::now();
    let mut command = Command::new(common::MESH);
    command.arg("--data-dir").arg(dir).args(["node", "run"]);
    if let Some(peer) = peer {
        command.args(["--peer", peer]);
    }
    // Killed on drop, should anything below fail.
    let daemon = common::Daemon {
        child: command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the daemon starts"),
    };
    let agent = agent();
    loop {
        if dir.join("api.addr").exists() && status(&agent, &api(dir)).is_some() {
            return (daemon, started.elapsed());
        }
        assert!(
            started.elapsed() < PHASE_DEADLINE,
            "the daemon never answered"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until the daemon of `dir` has checkpointed everything: its change log is back to
/// its 8-byte header, so a start replays nothing (as after a quiet period).
fn until_compacted(dir: &Path) {
    let log = dir.join("changes.log");
    let since = Instant::now();
    while std::fs::metadata(&log).map_or(true, |meta| meta.len() != 8) {
        assert!(
            since.elapsed() < PHASE_DEADLINE,
            "the log was never compacted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a daemon with SIGTERM and waits for it.
fn stop(mut daemon: common::Daemon) {
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.child.id().to_string()])
        .status();
    let _ = daemon.child.wait();
}

/// A process's resident set, MiB.
fn rss_mib(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Writes `fields(record)` to every record through the API with [`WRITERS`] writers;
/// returns records per second.
fn load(api: &Api, records: usize, fields: impl Fn(usize) -> serde_json::Value + Sync) -> f64 {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for writer in 0..WRITERS {
            let fields = &fields;
            scope.spawn(move || {
                let agent = agent();
                for record in (writer..records).step_by(WRITERS) {
                    let response = agent
                        .put(format!("{}/v1/records/stock/r{record:07}", api.base))
                        .header("Authorization", format!("Bearer {}", api.token))
                        .send_json(fields(record))
                        .expect("put");
                    assert_eq!(response.status(), 200);
                }
            });
        }
    });
    records as f64 / started.elapsed().as_secs_f64()
}

fn five_fields(record: usize) -> serde_json::Value {
    serde_json::json!({
        "item": format!("item {record}"),
        "site": format!("clinic-{}", record % 20),
        "count": record % 1000,
        "unit": "box",
        "checked": record.is_multiple_of(2),
    })
}

/// Bytes the node received from all its peers, by its own counters.
fn bytes_received(status: &serde_json::Value) -> u64 {
    status["peers"]
        .as_array()
        .map(|peers| {
            peers
                .iter()
                .filter_map(|peer| peer["counters"]["bytes_received"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

/// Waits until `laptop` has `hub`'s digest; returns how long that took.
fn until_equal(agent: &ureq::Agent, hub: &Api, laptop: &Api, since: Instant) -> Duration {
    let target = status(agent, hub).expect("hub status")["digest"].clone();
    loop {
        if status(agent, laptop).is_some_and(|status| status["digest"] == target) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < PHASE_DEADLINE,
            "the laptop never caught up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Plain Automerge, the reference: `records` documents of the same five fields, saved, then
/// loaded eagerly, in chunks of at most [`REFERENCE_CHUNK`] held at once (a million loaded
/// documents would need about 17 GB). Returns (load seconds over all chunks, resident MiB
/// one chunk of loaded documents added, total saved bytes).
fn automerge_reference(records: usize) -> (f64, f64, usize) {
    use automerge::transaction::Transactable;
    let mut seconds = 0.0;
    let mut added_max: f64 = 0.0;
    let mut bytes = 0;
    for start in (0..records).step_by(REFERENCE_CHUNK) {
        let saved: Vec<Vec<u8>> = (start..records.min(start + REFERENCE_CHUNK))
            .map(|record| {
                let mut doc = automerge::AutoCommit::new();
                let fields = five_fields(record);
                for (name, value) in fields.as_object().expect("an object") {
                    let value: automerge::ScalarValue = match value {
                        serde_json::Value::String(text) => text.as_str().into(),
                        serde_json::Value::Bool(flag) => (*flag).into(),
                        other => other.as_i64().expect("an integer").into(),
                    };
                    doc.put(automerge::ROOT, name, value).expect("put");
                }
                doc.save()
            })
            .collect();
        bytes += saved.iter().map(Vec::len).sum::<usize>();
        let before = rss_mib(std::process::id());
        let started = Instant::now();
        let loaded: Vec<automerge::AutoCommit> = saved
            .iter()
            .map(|bytes| automerge::AutoCommit::load(bytes).expect("loads"))
            .collect();
        seconds += started.elapsed().as_secs_f64();
        added_max = added_max.max(rss_mib(std::process::id()) - before);
        drop(loaded);
    }
    (seconds, added_max, bytes)
}

/// Most reference documents loaded at once.
const REFERENCE_CHUNK: usize = 100_000;

fn main() {
    let mut records = 100_000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--records" {
            records = args
                .next()
                .and_then(|count| count.parse().ok())
                .expect("--records takes a count");
        }
    }
    println!("mesh scale benchmark: {records} records (release build, loopback)");

    let (reference_seconds, reference_mib, reference_bytes) = automerge_reference(records);
    println!(
        "reference, plain Automerge: loads {records} saved documents ({:.1} MB) in {reference_seconds:.2} s = {:.0} documents/s, +{reference_mib:.0} MiB per {} loaded",
        reference_bytes as f64 / 1e6,
        records as f64 / reference_seconds,
        records.min(REFERENCE_CHUNK)
    );

    let hub_dir = common::TempDir::new("scale-hq");
    common::init(&hub_dir.0, "hq");
    let (hub, _) = start(&hub_dir.0, None);
    let hub_api = api(&hub_dir.0);
    let agent = agent();

    let rate = load(&hub_api, records, five_fields);
    println!("bulk load through the API, {WRITERS} writers: {rate:.0} records/s");
    println!(
        "head office memory after the load: {:.0} MiB",
        rss_mib(hub.child.id())
    );

    until_compacted(&hub_dir.0);
    stop(hub);
    let (hub, cold) = start(&hub_dir.0, None);
    // Every start takes a new API port and a new listen port.
    let hub_api = api(&hub_dir.0);
    let at_start = status(&agent, &hub_api).expect("hub status");
    println!(
        "cold start, process start to status answering: {:.2} s, {:.0} MiB, {} records, {} documents loaded",
        cold.as_secs_f64(),
        rss_mib(hub.child.id()),
        at_start["records_total"],
        at_start["loaded_documents"]
    );
    let since = Instant::now();
    let agent_read = agent
        .get(format!(
            "{}/v1/records/stock/r{:07}",
            hub_api.base,
            records / 2
        ))
        .header("Authorization", format!("Bearer {}", hub_api.token))
        .call()
        .expect("a read");
    assert_eq!(agent_read.status(), 200);
    println!(
        "first read after the start: {:.1} ms",
        since.elapsed().as_secs_f64() * 1e3
    );
    let listen = status(&agent, &hub_api).expect("hub status")["listen_addrs"][0]
        .as_str()
        .expect("a listen address")
        .to_owned();

    let laptop_dir = common::TempDir::new("scale-laptop");
    common::init(&laptop_dir.0, "laptop");
    let since = Instant::now();
    let (laptop, _) = start(&laptop_dir.0, Some(&listen));
    let laptop_api = api(&laptop_dir.0);
    let clone = until_equal(&agent, &hub_api, &laptop_api, since);
    let laptop_status = status(&agent, &laptop_api).expect("laptop status");
    let cloned_bytes = bytes_received(&laptop_status);
    println!(
        "clone by snapshot: {} records taken whole as their document came",
        laptop_status["counters"]["snapshots_taken"]
    );
    println!(
        "clone: {records} records in {:.1} s = {:.0} records/s ({:.2}x the reference load rate), {:.1} MB received = {:.0} B per record ({:.2}x the saved documents), laptop at {:.0} MiB",
        clone.as_secs_f64(),
        records as f64 / clone.as_secs_f64(),
        (records as f64 / clone.as_secs_f64()) / (records as f64 / reference_seconds),
        cloned_bytes as f64 / 1e6,
        cloned_bytes as f64 / records as f64,
        cloned_bytes as f64 / reference_bytes as f64,
        rss_mib(laptop.child.id())
    );

    until_compacted(&laptop_dir.0);
    stop(laptop);
    let edits = load(
        &hub_api,
        records,
        |record| serde_json::json!({ "count": record % 1000 + 1 }),
    );
    println!("head office edits one field of every record: {edits:.0} edits/s");
    let since = Instant::now();
    let (laptop, _) = start(&laptop_dir.0, Some(&listen));
    let laptop_api = api(&laptop_dir.0);
    let catch_up = until_equal(&agent, &hub_api, &laptop_api, since);
    let after = status(&agent, &laptop_api).expect("laptop status");
    // The counters start afresh with the process: all of it is the catch-up.
    let caught_bytes = bytes_received(&after);
    // The session that brought the last changes ends just after the digests meet.
    let waited = Instant::now();
    let (rounds, first_changes): (Vec<u64>, Vec<u64>) = loop {
        let sessions = history(&agent, &laptop_api);
        let rows = sessions["history"].as_array().cloned().unwrap_or_default();
        let rounds: Vec<u64> = rows
            .iter()
            .filter_map(|row| row["rounds"].as_u64())
            .collect();
        // Of the sessions that moved changes: the round in which they first moved.
        let first_changes: Vec<u64> = rows
            .iter()
            .filter_map(|row| row["first_changes_round"].as_u64())
            .collect();
        if !rounds.is_empty() || waited.elapsed() > Duration::from_secs(60) {
            break (rounds, first_changes);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "catch-up after {records} one-field edits: converged in {:.1} s, {:.1} MB received = {:.0} B per edit, sessions' rounds (newest first) {rounds:?}, round trips before changes flowed {first_changes:?}",
        catch_up.as_secs_f64(),
        caught_bytes as f64 / 1e6,
        caught_bytes as f64 / records as f64
    );
    println!(
        "memory after the catch-up: laptop {:.0} MiB, head office {:.0} MiB",
        rss_mib(laptop.child.id()),
        rss_mib(hub.child.id())
    );
    stop(laptop);
    stop(hub);
}
