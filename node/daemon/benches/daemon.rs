//! Daemon benchmarks with real processes on loopback; prints its figures.
//!
//! `cargo bench -p mesh-daemon`. Measures, in one run on the same disk:
//! - the disk's fdatasync rate (256-byte write + fdatasync, repeated), appending and over a
//!   preallocated file;
//! - the API's round trip for a read;
//! - durable acknowledged writes per second through the API, one writer and 16 at once;
//! - message bytes a peer receives for a one-field edit of an 8-byte integer;
//! - time from a write's acknowledgement on one node until two peers report the change
//!   (p50 and p99 over 200 writes).

#![allow(clippy::disallowed_methods, missing_docs)]

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

// The real-daemon helpers the tests use: temporary directories, init, start, kill on drop.
#[path = "../tests/common/mod.rs"]
mod common;

struct Node {
    // Fields drop in order: the daemon is killed before its directory is removed.
    _daemon: common::Daemon,
    _dir: common::TempDir,
    base: String,
    token: String,
}

fn node(name: &str, peers: &[String]) -> Node {
    let dir = common::TempDir::new(&format!("bench-{name}"));
    common::init(&dir.0, name);
    let daemon = common::start_with_peers(&dir.0, peers);
    let addr =
        std::fs::read_to_string(dir.0.join("api.addr")).expect("the daemon wrote its API address");
    let token = std::fs::read_to_string(dir.0.join("api.token"))
        .unwrap()
        .trim()
        .to_owned();
    Node {
        _daemon: daemon,
        _dir: dir,
        base: format!("http://{}", addr.trim()),
        token,
    }
}

fn new_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn status(node: &Node) -> Option<serde_json::Value> {
    let mut response = new_agent()
        .get(format!("{}/v1/status", node.base))
        .header("Authorization", format!("Bearer {}", node.token))
        .call()
        .ok()?;
    (response.status() == 200)
        .then(|| response.body_mut().read_json().ok())
        .flatten()
}

fn put(agent: &ureq::Agent, node: &Node, path: &str, body: serde_json::Value) {
    let response = agent
        .put(format!("{}/v1/records/{path}", node.base))
        .header("Authorization", format!("Bearer {}", node.token))
        .send_json(body)
        .expect("put");
    assert_eq!(response.status(), 200);
}

fn wait(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// TCP payload bytes sent plus received on every established socket whose local port is
/// `port` (the hub's side of its peer connections), from the kernel's tcp_info via `ss`.
fn tcp_bytes(port: u16) -> Option<u64> {
    let output = Command::new("ss")
        .args([
            "-tinH",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let mut total = 0;
    for field in text.split_whitespace() {
        for key in ["bytes_sent:", "bytes_received:"] {
            if let Some(value) = field.strip_prefix(key) {
                total += value.parse::<u64>().ok()?;
            }
        }
    }
    (output.status.success() && total > 0).then_some(total)
}

/// 256-byte writes each followed by fdatasync, for two seconds. `preallocated`: over a file
/// written beforehand (the way fio measures a disk), else appending to a growing file (the
/// way the change log writes).
fn fdatasync_rate(dir: &Path, preallocated: bool) -> f64 {
    let path = dir.join(format!("mesh-bench-fsync-{}", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    if preallocated {
        file.write_all(&vec![0u8; 64 << 20]).unwrap();
        file.sync_all().unwrap();
        std::io::Seek::rewind(&mut file).unwrap();
    }
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        file.write_all(&[7u8; 256]).unwrap();
        file.sync_data().unwrap();
        count += 1;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(path);
    rate
}

fn main() {
    // `cargo bench` passes --bench; anything else (a filter) is ignored: this runs everything.
    println!("mesh daemon benchmarks (release build, loopback)");
    let fsync = fdatasync_rate(&std::env::temp_dir(), false);
    println!("disk fdatasync rate, appending: {fsync:.0}/s");
    let fsync_preallocated = fdatasync_rate(&std::env::temp_dir(), true);
    println!("disk fdatasync rate, over a preallocated file: {fsync_preallocated:.0}/s");

    let hub = node("hub", &[]);
    let agent = new_agent();
    let writes = 300;
    let started = Instant::now();
    for n in 0..writes {
        put(
            &agent,
            &hub,
            &format!("single/r{n}"),
            serde_json::json!({ "n": n }),
        );
    }
    let single = writes as f64 / started.elapsed().as_secs_f64();
    println!(
        "durable writes, 1 writer: {single:.0}/s ({:.2}x the appending fdatasync rate, {:.2}x the preallocated one)",
        single / fsync,
        single / fsync_preallocated
    );
    // The API's own round trip, without a write: one client reading one record.
    let reads = 1000;
    let started = Instant::now();
    for _ in 0..reads {
        let response = agent
            .get(format!("{}/v1/records/single/r0", hub.base))
            .header("Authorization", format!("Bearer {}", hub.token))
            .call()
            .expect("get");
        assert_eq!(response.status(), 200);
    }
    println!(
        "API round trip of a read, 1 client: {:.0} µs",
        started.elapsed().as_secs_f64() * 1e6 / reads as f64
    );

    let writers = 16;
    let per_writer = 100;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for writer in 0..writers {
            let hub = &hub;
            scope.spawn(move || {
                let agent = new_agent();
                for n in 0..per_writer {
                    put(
                        &agent,
                        hub,
                        &format!("group/w{writer}-{n}"),
                        serde_json::json!({ "n": n }),
                    );
                }
            });
        }
    });
    let group = (writers * per_writer) as f64 / started.elapsed().as_secs_f64();
    println!("durable writes, {writers} writers: {group:.0}/s (group commit)");

    let listen = status(&hub).unwrap()["listen_addrs"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let peers = [
        node("peer-a", std::slice::from_ref(&listen)),
        node("peer-b", std::slice::from_ref(&listen)),
    ];
    wait(|| {
        peers.iter().all(|peer| {
            status(peer).is_some_and(|s| s["digest"] == status(&hub).unwrap()["digest"])
        })
    });

    // Bytes a peer receives for a one-field edit of an 8-byte integer.
    put(&agent, &hub, "wire/r", serde_json::json!({ "value": 1 }));
    wait(|| status(&peers[0]).is_some_and(|s| s["digest"] == status(&hub).unwrap()["digest"]));
    let received = |peer: &Node| -> u64 {
        status(peer).unwrap()["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["counters"]["bytes_received"].as_u64().unwrap())
            .sum()
    };
    let hub_port: u16 = listen.rsplit('/').next().unwrap().parse().unwrap();
    let before = received(&peers[0]);
    let tcp_before = tcp_bytes(hub_port);
    put(
        &agent,
        &hub,
        "wire/r",
        serde_json::json!({ "value": 1_234_567_890_123i64 }),
    );
    wait(|| {
        peers.iter().all(|peer| {
            status(peer).is_some_and(|s| s["digest"] == status(&hub).unwrap()["digest"])
        })
    });
    std::thread::sleep(Duration::from_millis(200));
    println!(
        "one-field edit of an 8-byte integer: {} message bytes received by a peer (signature included)",
        received(&peers[0]) - before
    );
    match (tcp_before, tcp_bytes(hub_port)) {
        (Some(before), Some(after)) => println!(
            "  on the wire (TCP payload both ways: Noise, Yamux, framing): {} bytes per receiving peer",
            (after - before) / peers.len() as u64
        ),
        _ => println!("  on the wire: not measured (needs `ss` from iproute2)"),
    }

    // Convergence: from the acknowledgement on the hub until both peers' feeds report it.
    let (events, arrivals) = mpsc::channel::<(usize, String, Instant)>();
    for (index, peer) in peers.iter().enumerate() {
        let url = format!("{}/v1/changes?collection=conv", peer.base);
        let token = peer.token.clone();
        let events = events.clone();
        std::thread::spawn(move || {
            let response = new_agent()
                .get(url)
                .header("Authorization", format!("Bearer {token}"))
                .call()
                .expect("feed");
            let reader = std::io::BufReader::new(response.into_body().into_reader());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if let Some(record) = event["record"].as_str()
                    && events
                        .send((index, record.to_owned(), Instant::now()))
                        .is_err()
                {
                    return;
                }
            }
        });
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut latencies = Vec::new();
    for n in 0..200 {
        let record = format!("conv/r{n}");
        put(&agent, &hub, &record, serde_json::json!({ "n": n }));
        let acked = Instant::now();
        let mut seen = [false; 2];
        let mut last = acked;
        while !seen.iter().all(|seen| *seen) {
            let (index, name, at) = arrivals
                .recv_timeout(Duration::from_secs(10))
                .expect("the change arrives");
            if name == record {
                seen[index] = true;
                last = last.max(at);
            }
        }
        latencies.push(last.duration_since(acked));
    }
    latencies.sort();
    let percentile =
        |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "convergence of 3 daemons after one write: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(0.5).as_secs_f64() * 1000.0,
        percentile(0.99).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0
    );
    drop(peers);
    drop(hub);
    let _ = std::io::stdout().flush();
}
